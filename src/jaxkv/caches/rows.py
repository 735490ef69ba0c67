"""Rows: the per-row layout of a ragged write, and the row operations of every family whose
state is a batch of rows on the device (contiguous, ring, Mamba, Mamba2, linear attention).

* ``RaggedRuntimeMetadata`` says how many of the ``T`` new tokens of each row are real and on
  which side the padding is; ``token_layout`` turns that into ranks and absolute positions.
* ``RowView`` implements ``jaxkv.abstracts.RowOperations`` once for every view whose array
  fields all have the batch as their leading axis: ``select``, ``reorder``, ``repeat``,
  ``insert`` and ``extract`` move whole rows, ``reset_rows`` clears the fields a family names in
  ``_empty_fields`` (the rest of a row is dead once its length is 0). A family adds only what
  differs: its family name, its empty fields, ``truncate`` and overflow flags.
* ``LayerCache`` implements ``init_cache``/``init_empty`` and the cache-level row operations
  (each applied to every layer) once for every cache made of one family's views.

Row ids are checked eagerly; under ``jax.jit`` an out-of-range id (negative ones included, which
JAX would otherwise wrap onto the last row) touches no row: ``reset_rows`` and ``insert`` skip it,
``reorder``/``extract`` give an empty row for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv import _validation as v
from jaxkv.abstracts import (
    BaseCache,
    BaseCacheMetadata,
    BaseRunTimeMetadata,
    RowOperations,
    pytree_dataclass,
    static_field,
)
from jaxkv.errors import CacheOverflowError, UnsupportedOperationError

PaddingSide = Literal["right", "left"]
PADDING_SIDES = ("right", "left")


# --------------------------------------------------------------------------------------------
# Ragged writes
# --------------------------------------------------------------------------------------------


@pytree_dataclass
class RaggedRuntimeMetadata(BaseRunTimeMetadata):
    """Runtime metadata of ``T`` new tokens per row, some of them padding.

    Attributes:
        new_lengths: ``[batch]`` int32, real new tokens in each row; ``None`` means all ``T`` are
            real. A row with 0 real tokens keeps its state exactly.
        padding_side: ``"right"`` (real tokens first) or ``"left"`` (real tokens last).
    """

    new_lengths: jax.Array | None = None
    padding_side: str = static_field("right")

    def __post_init__(self) -> None:
        v.require_choice(type(self).__name__, "padding_side", self.padding_side, PADDING_SIDES)

    @classmethod
    def create(cls, new_lengths: Any = None, padding_side: PaddingSide = "right"):
        """Runtime metadata from per-row real token counts (``None``: every token is real)."""
        if new_lengths is not None:
            new_lengths = jnp.asarray(new_lengths)
            if not jnp.issubdtype(new_lengths.dtype, jnp.integer) or new_lengths.ndim != 1:
                raise ValueError(
                    f"{cls.__name__}.create: new_lengths must be a [batch] int array, got "
                    f"shape {new_lengths.shape} dtype {new_lengths.dtype}"
                )
            new_lengths = new_lengths.astype(jnp.int32)
        return cls(new_lengths=new_lengths, padding_side=padding_side)


RaggedRows = RaggedRuntimeMetadata
"""Former name of ``RaggedRuntimeMetadata``."""


def check_ragged_runtime(
    owner: str, runtime: Any, runtime_type: type, batch_size: int, new_tokens: int
) -> None:
    """``runtime`` is ``None`` or a ``runtime_type`` whose counts fit ``[batch_size]`` rows of
    ``new_tokens`` tokens (values checked when concrete)."""
    if runtime is not None and not isinstance(runtime, runtime_type):
        raise TypeError(
            f"{owner}: runtime must be {runtime_type.__name__}, got {type(runtime).__name__}"
        )
    if runtime is None or runtime.new_lengths is None:
        return
    v.check_array(owner, "runtime.new_lengths", runtime.new_lengths, (batch_size,))
    if not v.is_traced(runtime.new_lengths):
        counts = np.asarray(runtime.new_lengths)
        if counts.min() < 0 or counts.max() > new_tokens:
            raise ValueError(
                f"{owner}: runtime.new_lengths must lie in [0, {new_tokens}], got {counts}"
            )


def token_layout(
    lengths: jax.Array, runtime: RaggedRuntimeMetadata | None, new_tokens: int
) -> tuple[jax.Array, jax.Array]:
    """Where each of ``new_tokens`` written per row lands.

    Args:
        lengths: ``[batch]`` int32 tokens already seen per row.
        runtime: says which tokens are real (``None``: all of them).
        new_tokens: ``T``.

    Returns:
        ``index: [batch, T]`` int32, the token's rank among the row's real new tokens, and
        ``positions: [batch, T]`` int32 absolute positions, ``-1`` for padding.
    """
    batch = lengths.shape[0]
    steps = jnp.arange(new_tokens, dtype=jnp.int32)[None, :]
    if runtime is None or runtime.new_lengths is None:
        counts = jnp.full((batch,), new_tokens, jnp.int32)
        padding_side = "right"
    else:
        counts = runtime.new_lengths.astype(jnp.int32)
        padding_side = runtime.padding_side
    index = steps if padding_side == "right" else steps - (new_tokens - counts)[:, None]
    index = jnp.broadcast_to(index, (batch, new_tokens))
    real = (index >= 0) & (index < counts[:, None])
    positions = jnp.where(real, lengths[:, None] + index, -1)
    return index, positions


# --------------------------------------------------------------------------------------------
# Row arguments
# --------------------------------------------------------------------------------------------


def _as_array(owner: str, name: str, value: Any, expected: str) -> jax.Array:
    """``value`` as a JAX array, or ``TypeError`` naming what was expected."""
    if isinstance(value, str | bytes) or value is None:
        raise TypeError(f"{owner}: {name} must be {expected}, got {value!r}")
    try:
        return jnp.asarray(value)
    except (TypeError, ValueError):
        raise TypeError(f"{owner}: {name} must be {expected}, got {value!r:.80}") from None


def row_mask(owner: str, rows: Any, batch_size: int) -> jax.Array:
    """``[batch]`` bool mask from a bool mask or a sequence of row ids (validated when concrete;
    a traced out-of-range id, negative ones included, selects nothing)."""
    array = _as_array(owner, "rows", rows, "a [batch] bool mask or a list of row ids")
    if array.dtype == jnp.bool_:
        v.check_array(owner, "rows", array, (batch_size,))
        return array
    if array.shape == (0,):  # no row ids at all (a float array when built from [])
        array = array.astype(jnp.int32)
    if not jnp.issubdtype(array.dtype, jnp.integer) or array.ndim != 1:
        raise TypeError(
            f"{owner}: rows must be a [batch] bool mask or a list of row ids, got {rows!r}"
        )
    if not v.is_traced(array) and array.size and (array.min() < 0 or array.max() >= batch_size):
        raise ValueError(f"{owner}: row ids must lie in [0, {batch_size}), got {np.asarray(array)}")
    return (
        jnp.zeros((batch_size,), jnp.bool_).at[safe_index(array, batch_size)].set(True, mode="drop")
    )


def safe_index(index: jax.Array, size: int) -> jax.Array:
    """``index`` with every id outside ``[0, size)`` replaced by ``size``, which a
    ``mode="drop"`` scatter discards (JAX would wrap a negative id onto the last row)."""
    index = jnp.asarray(index, jnp.int32)
    return jnp.where((index >= 0) & (index < size), index, size)


def static_row_ids(owner: str, name: str, rows: Any, batch_size: int) -> tuple[int, ...]:
    """Distinct row ids as Python ints (they fix a result's shape, so they must be concrete)."""
    if v.is_traced(rows):
        raise TypeError(
            f"{owner}: {name} sets the number of rows of the result, so it must be concrete "
            f"(a list of ints), not a traced array"
        )
    array = np.asarray(rows)
    if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"{owner}: {name} must be a sequence of row ids, got {rows!r}")
    ids = [int(i) for i in array]
    if not ids:
        raise ValueError(f"{owner}: {name} must name at least one row, got {rows!r}")
    bad = [i for i in ids if not 0 <= i < batch_size]
    if bad:
        raise ValueError(f"{owner}: {name} must lie in [0, {batch_size}), got {ids}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{owner}: {name} must be distinct row ids, got {ids}")
    return tuple(ids)


def row_indices(owner: str, indices: Any, batch_size: int) -> jax.Array:
    """``[batch]`` int32 source rows for ``reorder`` (validated when concrete)."""
    array = _as_array(owner, "indices", indices, "a [batch] array of row ids")
    if not jnp.issubdtype(array.dtype, jnp.integer) or array.ndim != 1:
        raise TypeError(f"{owner}: indices must be a [batch] array of row ids, got {indices!r}")
    v.check_array(owner, "indices", array, (batch_size,))
    if not v.is_traced(array) and (array.min() < 0 or array.max() >= batch_size):
        raise ValueError(
            f"{owner}: indices must lie in [0, {batch_size}), got {np.asarray(array).tolist()}"
        )
    return array.astype(jnp.int32)


def slot_index(owner: str, slot: Any, batch_size: int) -> jax.Array:
    """A row id as an int32 scalar (validated when concrete)."""
    if isinstance(slot, bool) or isinstance(slot, np.bool_):
        raise TypeError(f"{owner}: slot must be an int row id, got {slot!r}")
    array = _as_array(owner, "slot", slot, "an int row id")
    if array.ndim != 0 or not jnp.issubdtype(array.dtype, jnp.integer):
        raise TypeError(f"{owner}: slot must be an int row id, got {slot!r}")
    if not v.is_traced(array) and not 0 <= int(array) < batch_size:
        raise ValueError(f"{owner}: slot must lie in [0, {batch_size}), got {int(array)}")
    return array.astype(jnp.int32)


def require_count(owner: str, n: Any) -> int:
    """``repeat``'s ``n``: a concrete int >= 1."""
    if v.is_traced(n):
        raise TypeError(f"{owner}: n sets the number of rows of the result, so it must be an int")
    return v.require_int(owner, "n", n, minimum=1)


def rollback_counts(owner: str, n: Any, batch_size: int) -> jax.Array:
    """``rollback``'s ``n`` as ``[batch]`` int32 (an int is broadcast; negatives refused when
    concrete, and under ``jit`` a negative count asks for a length past the current one, which
    ``truncate`` refuses)."""
    if isinstance(n, bool | np.bool_):
        raise TypeError(f"{owner}: n must be an int or a [batch] int array, got {n!r}")
    counts = _as_array(owner, "n", n, "an int or a [batch] int array")
    if not jnp.issubdtype(counts.dtype, jnp.integer) or counts.ndim > 1:
        raise TypeError(f"{owner}: n must be an int or a [batch] int array, got {n!r:.80}")
    if counts.ndim == 1:
        v.check_array(owner, "n", counts, (batch_size,))
    if not v.is_traced(counts) and bool(jnp.any(counts < 0)):
        raise ValueError(f"{owner}: n must be >= 0 tokens per row, got {np.asarray(counts)}")
    return jnp.broadcast_to(counts.astype(jnp.int32), (batch_size,))


def _rows_first(array: jax.Array, rows: jax.Array) -> jax.Array:
    """``rows`` (``[n]`` bool or per-row values) broadcast against ``array: [n, ...]``."""
    return rows.reshape(rows.shape + (1,) * (array.ndim - rows.ndim))


# --------------------------------------------------------------------------------------------
# Views made of rows
# --------------------------------------------------------------------------------------------


class RowView(RowOperations):
    """Row operations of a view whose array fields all have the batch as their leading axis.

    A family pins ``family`` (or ``_family()`` when it depends on the metadata), lists in
    ``_empty_fields()`` the fields an empty row must hold and their fill value, and implements
    ``truncate``. ``self.metadata`` must have a ``batch_size`` field.
    """

    family: ClassVar[str] = "?"

    def _family(self) -> str:
        return self.family

    def _empty_fields(self) -> dict[str, Any]:
        """``{field: fill value}`` of an empty row (e.g. ``lengths: 0``)."""
        raise NotImplementedError

    def _owner(self, operation: str) -> str:
        return f"{type(self).__name__}.{operation} (layer {self.layer_index})"

    @property
    def batch_size(self) -> int:
        """Rows of the view."""
        return self.metadata.batch_size

    def _row_arrays(self) -> dict[str, jax.Array]:
        """Every array field (all ``[batch, ...]``); ``None`` fields are left out."""
        fields = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, jax.Array | np.ndarray):
                fields[field.name] = value
        return fields

    def _with_rows(self, arrays: dict[str, jax.Array], batch_size: int) -> Any:
        metadata = self.metadata
        if batch_size != metadata.batch_size:
            metadata = metadata.replace(batch_size=batch_size)
        return dataclasses.replace(self, metadata=metadata, **arrays)

    def _emptied(self, arrays: dict[str, jax.Array], empty: jax.Array) -> dict[str, jax.Array]:
        """``arrays`` with the rows where ``empty: [n]`` is true set to the empty row."""
        fills = self._empty_fields()
        return {
            name: jnp.where(_rows_first(array, empty), fills[name], array)
            if name in fills
            else array
            for name, array in arrays.items()
        }

    def reset_rows(self, rows: Any) -> Any:
        """A view whose selected rows are empty again, so a batch slot can take a new sequence.
        ``rows``: ``[batch]`` bool mask or a sequence of row ids."""
        mask = row_mask(self._owner("reset_rows"), rows, self.batch_size)
        fills = self._empty_fields()
        arrays = self._row_arrays()
        return self._with_rows(
            self._emptied({name: arrays[name] for name in fills if name in arrays}, mask),
            self.batch_size,
        )

    def select(self, rows: Sequence[int]) -> Any:
        """A view of only ``rows`` (distinct row ids, in this order)."""
        ids = static_row_ids(self._owner("select"), "rows", rows, self.batch_size)
        index = jnp.asarray(ids, jnp.int32)
        arrays = {name: array[index] for name, array in self._row_arrays().items()}
        return self._with_rows(arrays, len(ids))

    def reorder(self, indices: Any) -> Any:
        """Row ``b`` becomes row ``indices[b]`` (``[batch]`` ints, duplicates allowed)."""
        index = row_indices(self._owner("reorder"), indices, self.batch_size)
        return self._gather(index, self.batch_size)

    def _gather(self, index: jax.Array, batch_size: int) -> Any:
        valid = (index >= 0) & (index < self.batch_size)
        safe = jnp.where(valid, index, 0)
        arrays = {name: array[safe] for name, array in self._row_arrays().items()}
        return self._with_rows(self._emptied(arrays, ~valid), batch_size)

    def repeat(self, n: int) -> Any:
        """Every row repeated ``n`` times, interleaved (``n * batch`` rows)."""
        n = require_count(self._owner("repeat"), n)
        arrays = {name: jnp.repeat(a, n, axis=0) for name, a in self._row_arrays().items()}
        return self._with_rows(arrays, n * self.batch_size)

    def insert(self, other: Any, slot: Any) -> Any:
        """Row ``slot`` replaced by the single row of ``other`` (a one-row view of this family
        with this metadata otherwise)."""
        owner = self._owner("insert")
        expected = self.metadata.replace(batch_size=1)
        if type(other) is not type(self) or other.metadata != expected:
            raise TypeError(
                f"{owner}: other must be a one-row {type(self).__name__} with metadata "
                f"{expected}, got {type(other).__name__} with metadata "
                f"{getattr(other, 'metadata', None)}"
            )
        index = safe_index(slot_index(owner, slot, self.batch_size), self.batch_size)
        theirs = other._row_arrays()
        arrays = {
            name: array.at[index].set(theirs[name][0].astype(array.dtype), mode="drop")
            for name, array in self._row_arrays().items()
        }
        return self._with_rows(arrays, self.batch_size)

    def extract(self, slot: Any) -> Any:
        """Row ``slot`` as a one-row view (an empty row for a traced out-of-range ``slot``)."""
        index = slot_index(self._owner("extract"), slot, self.batch_size)
        return self._gather(index[None], 1)

    def rollback(self, n: Any) -> Any:
        """Forget the last ``n`` tokens of each row: ``truncate(lengths - n)`` (``n``: an int, or
        ``[batch]`` ints, each ``>= 0``). A speculative-decoding verifier calls it with the
        number of rejected draft tokens per row."""
        owner = self._owner("rollback")
        counts = rollback_counts(owner, n, self.batch_size)
        return self.truncate(self.lengths - counts)

    def overflow_rows(self) -> jax.Array:
        """``[batch]`` bool: rows where a write was dropped (none, unless the family keeps
        overflow flags) or, with ``rollback_depth``, whose rollback was refused."""
        refused = getattr(self, "rollback_refused", None)
        if refused is not None:
            return refused
        return jnp.zeros((self.batch_size,), jnp.bool_)

    def check_overflow(self) -> None:
        """Raise ``CacheOverflowError`` if a row's write was dropped (or its rollback refused)."""
        raise_if_overflowed(
            self.overflow_rows(), self._overflow_limit(), getattr(self, "rollback_refused", None)
        )

    def mark_rollback_refused(self, rows: jax.Array) -> Any:
        """A view whose rows where ``rows: [batch]`` bool is true are flagged as having had a
        rollback refused (a stack refusing a row in every layer flags it here); a view without
        ``rollback_depth`` keeps no such flag and is returned as is."""
        if getattr(self, "rollback_refused", None) is None:
            return self
        return dataclasses.replace(self, rollback_refused=self.rollback_refused | rows)

    def _overflow_limit(self) -> str:
        return "its capacity"

    def _unsupported(self, operation: str, reason: str) -> UnsupportedOperationError:
        return UnsupportedOperationError(self._family(), operation, reason)


def raise_if_overflowed(flags: jax.Array, limit: str, refused: jax.Array | None = None) -> None:
    """``CacheOverflowError`` naming the rows whose flag is set.

    Args:
        flags: ``[batch]`` bool, rows whose write was dropped (or whose rollback was refused).
        limit: what the rows overflowed, for the message.
        refused: ``[batch]`` bool or ``None``: the rows among ``flags`` whose ``truncate`` /
            ``rollback`` under ``jit`` went past ``rollback_depth`` and was refused.
    """
    rows = np.flatnonzero(np.asarray(flags)).tolist()
    if not rows:
        return
    refused_rows = [] if refused is None else np.flatnonzero(np.asarray(refused)).tolist()
    dropped = [row for row in rows if row not in refused_rows]
    parts = []
    if dropped:
        parts.append(
            f"rows {dropped} overflowed {limit}: their last write was dropped (cached tokens are "
            f"intact)"
        )
    if refused_rows:
        parts.append(
            f"rows {refused_rows} were asked to truncate past what rollback_depth keeps: the "
            f"truncate was refused and those rows kept their tokens"
        )
    raise CacheOverflowError("; ".join(parts))


def truncate_lengths(owner: str, lengths: Any, batch_size: int) -> jax.Array:
    """``truncate``'s ``lengths`` as a ``[batch]`` int32 array (shape and dtype checked)."""
    lengths = _as_array(owner, "lengths", lengths, "a [batch] int array")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"{owner}: lengths must be a [batch] int array, got {lengths.dtype}")
    v.check_array(owner, "lengths", lengths, (batch_size,))
    return lengths.astype(jnp.int32)


def rollback_targets(
    owner: str,
    lengths: jax.Array,
    floor: jax.Array | int,
    current: jax.Array,
    *,
    limit: str = "",
) -> tuple[jax.Array, jax.Array]:
    """Where each row lands after ``truncate(lengths)``, given that a row may go back to any
    length in ``[floor[b], current[b]]``.

    Args:
        lengths: ``[batch]`` int32 wanted lengths (see ``truncate_lengths``).
        floor: ``[batch]`` int32 (or ``0``), the shortest length each row can still restore.
        current: ``[batch]`` int32 lengths now.
        limit: why the floor is where it is, for the message (e.g. the ``rollback_depth``).

    Returns:
        ``(targets, ok)``: ``[batch]`` int32 new lengths (a row whose wanted length is out of
        range keeps its length) and ``[batch]`` bool, which rows were in range.

    Raises:
        ValueError: (eager calls only) a wanted length outside its row's range; nothing changes.
    """
    ok = (lengths >= floor) & (lengths <= current)
    if not v.is_traced(lengths, current, floor) and not bool(jnp.all(ok)):
        lows = np.broadcast_to(np.asarray(floor), np.shape(current)).tolist()
        highs = np.asarray(current).tolist()
        bad = np.flatnonzero(~np.asarray(ok)).tolist()
        ranges = ", ".join(f"row {row}: [{lows[row]}, {highs[row]}]" for row in bad)
        raise ValueError(
            f"{owner}: lengths must lie in [shortest restorable length, current length] per row"
            f"{limit}; got {np.asarray(lengths).tolist()}, allowed {ranges}; nothing was changed"
        )
    return jnp.where(ok, lengths, current), ok


# --------------------------------------------------------------------------------------------
# Caches made of one family's views
# --------------------------------------------------------------------------------------------


class LayerCache(BaseCache, RowOperations):
    """``init_cache``/``init_empty`` and the cache-level row operations of a cache whose views
    are all of one family: each operation is applied to every layer (``None`` layers stay).

    A subclass pins ``metadata_types`` (the metadata classes it accepts); each metadata class
    names the view class it builds as ``view_type``.
    """

    metadata_types: ClassVar[tuple[type, ...]] = ()

    @classmethod
    def init_cache(cls, metadata: BaseCacheMetadata, *, layers: Any = None) -> Any:
        """A cache with an empty view for every layer (or only for the layer ids in ``layers``;
        the others are ``None``)."""
        owner = f"{cls.__name__}.init_cache"
        if not isinstance(metadata, cls.metadata_types):
            allowed = ", ".join(t.__name__ for t in cls.metadata_types)
            if len(cls.metadata_types) > 1:
                allowed = f"one of {allowed}"
            raise TypeError(f"{owner}: metadata must be {allowed}, got {type(metadata).__name__}")
        wanted = v.require_layers(owner, layers, metadata.num_layers)
        view_type = metadata.view_type
        return cls(
            views=tuple(
                view_type.init(metadata, i) if i in wanted else None
                for i in range(metadata.num_layers)
            )
        )

    @classmethod
    def init_empty(cls, num_layers: int) -> Any:
        """A cache of ``num_layers`` ``None`` views."""
        v.require_int(f"{cls.__name__}.init_empty", "num_layers", num_layers, minimum=1)
        return cls(views=(None,) * num_layers)

    def _live_views(self) -> list[Any]:
        views = [view for view in self.views if view is not None]
        if not views:
            raise ValueError(f"{type(self).__name__}: the cache has no initialised views")
        return views

    def _map(self, operation: str, *args: Any) -> Any:
        return self.with_views(
            view if view is None else getattr(view, operation)(*args) for view in self.views
        )

    def reset_rows(self, rows: Any) -> Any:
        """Empty the selected rows in every layer (see the views' ``reset_rows``)."""
        return self._map("reset_rows", rows)

    def truncate(self, lengths: Any) -> Any:
        """Keep only the first ``lengths[b]`` tokens of each row in every layer."""
        return self._map("truncate", lengths)

    def rollback(self, n: Any) -> Any:
        """Forget the last ``n`` tokens (an int or ``[batch]`` ints) of each row in every layer
        (``truncate(lengths - n)``)."""
        return self._map("rollback", n)

    def select(self, rows: Sequence[int]) -> Any:
        """Only ``rows`` (distinct, in this order) in every layer."""
        return self._map("select", rows)

    def reorder(self, indices: Any) -> Any:
        """Row ``b`` becomes row ``indices[b]`` in every layer."""
        return self._map("reorder", indices)

    def repeat(self, n: int) -> Any:
        """Every row repeated ``n`` times, interleaved, in every layer."""
        return self._map("repeat", n)

    def insert(self, other: Any, slot: Any) -> Any:
        """Row ``slot`` of every layer replaced by the single row of ``other`` (a one-row cache
        of the same type, with views in the same layers)."""
        owner = f"{type(self).__name__}.insert"
        if type(other) is not type(self) or len(other) != len(self):
            raise TypeError(
                f"{owner}: other must be a one-row {type(self).__name__} of {len(self)} layers, "
                f"got {type(other).__name__}"
            )
        views = []
        for layer, (mine, theirs) in enumerate(zip(self.views, other.views, strict=True)):
            if (mine is None) != (theirs is None):
                raise ValueError(
                    f"{owner}: layer {layer} is initialised in only one of the two caches"
                )
            views.append(None if mine is None else mine.insert(theirs, slot))
        return self.with_views(views)

    def extract(self, slot: Any) -> Any:
        """Row ``slot`` of every layer as a one-row cache."""
        return self._map("extract", slot)

    def overflow_rows(self) -> jax.Array:
        """``[batch]`` bool: rows where some write did not fit (any layer)."""
        return jnp.any(jnp.stack([view.overflow_rows() for view in self._live_views()]), axis=0)

    def check_overflow(self) -> None:
        """Raise ``CacheOverflowError`` if any row overflowed or had a rollback refused (call
        after a jitted step)."""
        raise_if_overflowed(
            self.overflow_rows(), self._live_views()[0]._overflow_limit(), self.refused_rollbacks()
        )

    def refused_rollbacks(self) -> jax.Array | None:
        """``[batch]`` bool: rows of any layer whose rollback under ``jit`` went past
        ``rollback_depth`` and was refused; ``None`` when no layer keeps the flag."""
        flags = [
            view.rollback_refused
            for view in self.views
            if getattr(view, "rollback_refused", None) is not None
        ]
        return None if not flags else jnp.any(jnp.stack(flags), axis=0)
