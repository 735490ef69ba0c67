"""One cache for a stack whose layers mix attention (full or sliding window), Mamba, Mamba2 and
linear attention, and layers that keep nothing.

``HybridCacheMetadata`` holds the kind of every layer and one metadata per kind in use (its
``num_layers`` is the number of layers of that kind); ``HybridCache.init_cache`` builds the view
each per-kind metadata names (``metadata.view_type``), ``None`` for ``"none"`` layers. What differs
between kinds is one record each in ``LAYER_KIND_TABLE`` (``jaxkv.caches.layer_kinds``: its
metadata class per attention backend, which runtime part it takes, its window rule); everything
else -- building, validation, the row operations, overflow -- is one loop over the table or over
the views, with no per-family code. The runtime metadata of a forward pass live in
``jaxkv.caches.hybrid_runtime``.

Attention layers are built by the backend named by ``attention_backend``:

* ``"contiguous"``: ``TransformerCacheView`` rows ``[batch, max_length, ...]`` (a ring for sliding
  layers). One ``HybridRuntimeMetadata`` drives a forward pass: its ``attention`` part
  (``TransformerRuntimeMetadata``) goes to attention views, its ``recurrent`` part
  (``RecurrentRuntimeMetadata``) to recurrent views; both come from the same per-row counts.
* ``"paged"``: one page pool per attention layer (``PagedCacheView``; sliding layers use the
  paged cache's ``sliding_window``). Full and sliding layers share ``page_size``, ``batch_size``
  and ``max_pages_per_seq``. Either one host ``jaxkv.pages.PageManager`` drives every paged layer
  (one page table; both kinds then have the same ``num_pages``), or the sliding layers get their
  own, smaller pool and page table from a windowed manager that gives the pages before the window
  back (``jaxkv.pages.HybridPageManager`` drives both in lockstep; ``paged_geometry()`` and
  ``sliding_paged_geometry()`` give their arguments). Recurrent layers keep their per-row state,
  with as many rows as a step's page table. One ``HybridPagedRuntimeMetadata`` drives a forward
  pass (with its ``sliding_attention`` part for the second table).

Two token layouts, one step (paged backend). Attention layers read the step's *packed* axis
``[num_tokens]`` (row ``i``'s new tokens at ``query_start_loc[i] .. query_start_loc[i + 1] - 1``,
then padding); recurrent layers and the rest of the model use ``[batch, T]``: batch row ``r`` holds
the new tokens of the sequence in *slot* ``r``, padded on the ``padding_side``.
``HybridPagedRuntimeMetadata.token_index: [batch, T]`` maps every entry to its packed index
(``-1`` for padding); ``attention_inputs`` / ``attention_outputs`` (``to_packed`` / ``to_batch``)
move activations between the two, and are the identity for the contiguous backend, so a model
runs both backends with the same code.

Slots. A batch row of the recurrent state belongs to one sequence for that sequence's whole
life, but the step's rows are the *scheduled* sequences in schedule order, which changes as
sequences start, finish or sit a step out. The hybrid runtime therefore takes the slot of each
scheduled sequence (``jaxkv.engine.step_inputs.hybrid_paged_runtime(step, slots=...)``); by
default the ``i``-th scheduled sequence uses slot ``i``, which is stable only when the host
schedules the same sequences in the same order every step. ``jaxkv.pages.PagedRows`` keeps slots
stable (row ``r`` holds one sequence; ``rows.slots()`` is the mapping to pass) and applies the
row operations to the page tables; the same operation on the ``HybridCache`` applies it to the
recurrent rows (paged views move nothing on the device). Slots not scheduled in a step keep their
state exactly. Recurrent state is not paged: prefix caching and ``fork`` share *pages* only, so a
stack with recurrent layers must run its ``PageManager`` with ``enable_prefix_caching=False`` and
never fork (a stack of attention layers only may use both).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv import _validation as v
from jaxkv.abstracts import BaseCacheMetadata, pytree_dataclass, static_field
from jaxkv.caches.hybrid_runtime import (
    HybridMetadata,
    HybridPagedMetadata,
    HybridPagedRuntimeMetadata,
    HybridRuntimeMetadata,
)
from jaxkv.caches.layer_kinds import (
    ATTENTION_BACKENDS,
    ATTENTION_KINDS,
    ATTENTION_METADATA,
    KIND_METADATA,
    LAYER_KIND_TABLE,
    LAYER_KINDS,
    PAGED_GEOMETRY,
    RECURRENT_KINDS,
    AttentionMetadata,
    LayerKind,
)
from jaxkv.caches.paged import PagedCacheMetadata
from jaxkv.caches.recurrent import (
    LinearAttentionCacheMetadata,
    Mamba2CacheMetadata,
    MambaCacheMetadata,
)
from jaxkv.caches.rows import (
    LayerCache,
    raise_if_overflowed,
    rollback_counts,
    rollback_targets,
    truncate_lengths,
)
from jaxkv.caches.transformer import TransformerCacheMetadata
from jaxkv.errors import CacheOverflowError, UnsupportedOperationError

__all__ = [
    "ATTENTION_BACKENDS",
    "ATTENTION_KINDS",
    "ATTENTION_METADATA",
    "KIND_METADATA",
    "LAYER_KINDS",
    "LAYER_KIND_TABLE",
    "PAGED_GEOMETRY",
    "RECURRENT_KINDS",
    "HybridCache",
    "HybridCacheMetadata",
    "HybridMetadata",
    "HybridPagedMetadata",
    "HybridPagedRuntimeMetadata",
    "HybridRuntimeMetadata",
    "LayerKind",
]

_RESERVED = ("batch_size", "num_layers", "max_num_seqs")
"""Settings that come from the hybrid cache itself (``max_num_seqs``: paged ``batch_size``)."""


@pytree_dataclass
class HybridCacheMetadata(BaseCacheMetadata):
    """Static configuration of a hybrid cache.

    Attributes:
        layer_kinds: the kind of every layer, one of ``LAYER_KINDS``.
        attention: metadata of the full-attention layers (``sliding_window`` ``None``), or
            ``None`` when no layer is ``"attention"``: a ``TransformerCacheMetadata`` for the
            ``"contiguous"`` backend, a ``PagedCacheMetadata`` for ``"paged"``.
        sliding_attention: metadata of the sliding-window layers (``sliding_window`` set), same
            class as ``attention``.
        mamba, mamba2, linear_attention: metadata of the recurrent layers of each kind.
        attention_backend: which attention view to build (a key of ``ATTENTION_BACKENDS``).

    Each per-kind metadata has ``num_layers`` equal to the number of layers of its kind and the
    cache's ``batch_size``; it is present exactly when some layer has that kind. Paged full and
    sliding metadata share ``PAGED_GEOMETRY`` (``num_pages`` may differ: see the module
    docstring).
    """

    layer_kinds: tuple[str, ...]
    attention: TransformerCacheMetadata | PagedCacheMetadata | None = None
    sliding_attention: TransformerCacheMetadata | PagedCacheMetadata | None = None
    mamba: MambaCacheMetadata | None = None
    mamba2: Mamba2CacheMetadata | None = None
    linear_attention: LinearAttentionCacheMetadata | None = None
    attention_backend: str = "contiguous"

    @classmethod
    def create(
        cls,
        layer_kinds: Sequence[str],
        *,
        batch_size: int,
        attention: Mapping[str, Any] | AttentionMetadata | None = None,
        sliding_attention: Mapping[str, Any] | AttentionMetadata | None = None,
        mamba: Mapping[str, Any] | MambaCacheMetadata | None = None,
        mamba2: Mapping[str, Any] | Mamba2CacheMetadata | None = None,
        linear_attention: Mapping[str, Any] | LinearAttentionCacheMetadata | None = None,
        attention_backend: str = "contiguous",
    ) -> HybridCacheMetadata:
        """Validated metadata from the per-layer kinds and per-kind settings.

        Each per-kind setting is either a mapping of the keyword arguments of that kind's
        ``create`` without the fields filled in here (``batch_size`` and ``num_layers``), e.g.
        ``attention=dict(max_length=4096, num_kv_heads=8, head_dim=128)``,
        ``sliding_attention=dict(..., sliding_window=1024)``,
        ``mamba2=dict(num_heads=24, head_dim=64, state_size=128)``; with
        ``attention_backend="paged"``: ``attention=dict(num_pages=64, page_size=16,
        num_kv_heads=8, head_dim=128, max_pages_per_seq=16)``. Or a ready metadata of the
        backend's class with these rows and ``num_layers`` equal to the layers of that kind.
        Raises ``ValueError``/``TypeError`` naming the field.
        """
        owner = "HybridCacheMetadata.create"
        if isinstance(layer_kinds, str) or not isinstance(layer_kinds, Sequence):
            raise TypeError(
                f"{owner}: layer_kinds must be a sequence of kind names, got {layer_kinds!r}"
            )
        layer_kinds = tuple(layer_kinds)
        v.require_int(owner, "batch_size", batch_size, minimum=1)
        v.require_choice(owner, "attention_backend", attention_backend, tuple(ATTENTION_BACKENDS))
        given = {
            "attention": attention,
            "sliding_attention": sliding_attention,
            "mamba": mamba,
            "mamba2": mamba2,
            "linear_attention": linear_attention,
        }
        built = {}
        for name, kind in LAYER_KIND_TABLE.items():
            settings, count = given[name], layer_kinds.count(name)
            if isinstance(settings, Mapping) and count:
                settings = _build_kind(owner, kind, settings, attention_backend, batch_size, count)
            elif isinstance(settings, BaseCacheMetadata) and hasattr(settings, "batch_size"):
                if settings.batch_size != batch_size:
                    raise ValueError(
                        f"{owner}: {name}.batch_size={settings.batch_size} must equal "
                        f"batch_size={batch_size}"
                    )
            built[name] = settings
        return cls(layer_kinds=layer_kinds, attention_backend=attention_backend, **built)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HybridCacheMetadata:
        """Metadata from ``to_dict`` output; attention settings decode to the class of the
        dict's ``attention_backend``."""
        if isinstance(data, dict):
            backend = data.get("attention_backend", "contiguous")
            metadata_type = ATTENTION_METADATA.get(backend) if isinstance(backend, str) else None
            if metadata_type is not None:
                data = dict(data)
                for kind in ATTENTION_KINDS:
                    if isinstance(data.get(kind), dict):
                        data[kind] = metadata_type.from_dict(data[kind])
        return super().from_dict(data)

    def validate(self) -> None:
        owner = type(self).__name__
        if not isinstance(self.layer_kinds, tuple) or not self.layer_kinds:
            raise ValueError(
                f"{owner}: layer_kinds must be a non-empty tuple, got {self.layer_kinds!r}"
            )
        for index, kind in enumerate(self.layer_kinds):
            if kind not in LAYER_KINDS:
                raise ValueError(
                    f"{owner}: layer_kinds[{index}] must be one of {LAYER_KINDS}, got {kind!r}"
                )
        v.require_choice(
            owner, "attention_backend", self.attention_backend, tuple(ATTENTION_BACKENDS)
        )
        rows = set()
        for name, kind in LAYER_KIND_TABLE.items():
            metadata = getattr(self, name)
            count = self.layer_kinds.count(name)
            if metadata is None:
                if count:
                    raise ValueError(
                        f"{owner}: {count} layer(s) have kind {name!r} but no {name} settings "
                        f"were given"
                    )
                continue
            if not count:
                raise ValueError(f"{owner}: {name} settings given but no layer has kind {name!r}")
            metadata_type = kind.metadata_type(self.attention_backend)
            if not isinstance(metadata, metadata_type):
                raise TypeError(
                    f"{owner}: {name} must be {metadata_type.__name__} (attention_backend="
                    f"{self.attention_backend!r}) or a mapping of its settings, "
                    f"got {type(metadata).__name__}"
                )
            if metadata.num_layers != count:
                raise ValueError(
                    f"{owner}: {name}.num_layers must equal the {count} layer(s) of kind "
                    f"{name!r}, got {metadata.num_layers}"
                )
            if kind.windowed is False and metadata.sliding_window is not None:
                raise ValueError(
                    f"{owner}: {name}.sliding_window must be None (use sliding_attention), "
                    f"got {metadata.sliding_window}"
                )
            if kind.windowed and metadata.sliding_window is None:
                raise ValueError(f"{owner}: {name}.sliding_window must be set, got None")
            rows.add(metadata.batch_size)
        if len(rows) > 1:
            raise ValueError(
                f"{owner}: every kind must have the same batch_size, got {sorted(rows)}"
            )
        paged = [getattr(self, name) for name in ATTENTION_KINDS if getattr(self, name)]
        if self.attention_backend == "paged" and len(paged) == 2:
            for field in PAGED_GEOMETRY:
                full, sliding = (getattr(metadata, field) for metadata in paged)
                if full != sliding:
                    raise ValueError(
                        f"{owner}: attention.{field}={full} and sliding_attention.{field}="
                        f"{sliding} must be equal (both kinds plan one token layout and one "
                        f"page-table shape)"
                    )

    @property
    def num_layers(self) -> int:
        return len(self.layer_kinds)

    def kind_metadata(self) -> dict[str, BaseCacheMetadata]:
        """The per-kind metadata in use, by kind name."""
        return {
            name: getattr(self, name)
            for name in LAYER_KIND_TABLE
            if getattr(self, name) is not None
        }

    @property
    def batch_size(self) -> int | None:
        """Rows of the cache (``None`` when every layer is ``"none"``); for the paged backend
        also the rows of every step's page table."""
        for metadata in self.kind_metadata().values():
            return metadata.batch_size
        return None

    def with_batch_size(self, batch_size: int) -> HybridCacheMetadata:
        """The same stack with ``batch_size`` rows in every kind."""
        return self.replace(
            **{
                name: metadata.replace(batch_size=batch_size)
                for name, metadata in self.kind_metadata().items()
            }
        )

    def paged_geometry(self) -> dict[str, int]:
        """``num_pages``, ``page_size``, ``max_num_seqs`` and ``max_pages_per_seq`` of the paged
        attention layers, the arguments of the ``jaxkv.pages.PageManager`` that drives them:
        ``PageManager(**metadata.paged_geometry(), enable_prefix_caching=False)``.

        Raises:
            ValueError: the backend is not ``"paged"`` or no layer is an attention layer.
        """
        owner = "HybridCacheMetadata.paged_geometry"
        paged = self.attention if self.attention is not None else self.sliding_attention
        if self.attention_backend != "paged" or paged is None:
            raise ValueError(
                f"{owner}: needs attention_backend='paged' and at least one attention layer, got "
                f"attention_backend={self.attention_backend!r} and layer kinds {self.layer_kinds}"
            )
        return {
            "num_pages": paged.num_pages,
            "page_size": paged.page_size,
            "max_num_seqs": paged.batch_size,
            "max_pages_per_seq": paged.max_pages_per_seq,
        }

    def sliding_paged_geometry(self) -> dict[str, int]:
        """The arguments of the windowed ``jaxkv.pages.PageManager`` that drives the sliding
        layers on their own pool: ``num_pages``, ``page_size``, ``max_num_seqs``,
        ``max_pages_per_seq`` and ``sliding_window``.

        Raises:
            ValueError: the backend is not ``"paged"`` or no layer is ``"sliding_attention"``.
        """
        paged = self.sliding_attention
        if self.attention_backend != "paged" or paged is None:
            raise ValueError(
                f"HybridCacheMetadata.sliding_paged_geometry: needs attention_backend='paged' and "
                f"a sliding_attention layer, got attention_backend={self.attention_backend!r} and "
                f"layer kinds {self.layer_kinds}"
            )
        return {
            "num_pages": paged.num_pages,
            "page_size": paged.page_size,
            "max_num_seqs": paged.batch_size,
            "max_pages_per_seq": paged.max_pages_per_seq,
            "sliding_window": paged.sliding_window,
        }

    def layer_metadata(self, layer: int) -> BaseCacheMetadata | None:
        """The metadata of layer ``layer``'s view (``None`` for a ``"none"`` layer)."""
        v.require_int("HybridCacheMetadata.layer_metadata", "layer", layer, minimum=0)
        if layer >= self.num_layers:
            raise ValueError(
                f"HybridCacheMetadata.layer_metadata: layer {layer} out of range for "
                f"{self.num_layers} layers"
            )
        kind = self.layer_kinds[layer]
        return None if kind == "none" else getattr(self, kind)

    def bytes_per_token(self) -> int:
        """Bytes one more token adds across all layers (recurrent layers add none; a ring adds
        them only up to its window, see ``bytes_per_sequence``)."""
        return sum(m.bytes_per_token() for m in self.kind_metadata().values())

    def bytes_per_sequence(self, length: int) -> int:
        """Bytes a sequence of ``length`` tokens occupies across all layers (every kind's own
        ``bytes_per_sequence``)."""
        return sum(m.bytes_per_sequence(length) for m in self.kind_metadata().values())

    def bytes_total(self) -> int:
        """Bytes the whole cache allocates (every kind's ``bytes_total``)."""
        return sum(m.bytes_total() for m in self.kind_metadata().values())


def _build_kind(
    owner: str,
    kind: LayerKind,
    settings: Mapping[str, Any],
    backend: str,
    batch_size: int,
    count: int,
) -> BaseCacheMetadata:
    """The per-kind metadata from a mapping of its ``create`` keyword arguments."""
    for reserved in _RESERVED:
        if reserved in settings:
            raise ValueError(
                f"{owner}: {kind.name} settings must not give {reserved} (it comes from the "
                f"hybrid cache), got {reserved}={settings[reserved]!r}"
            )
    metadata_type = kind.metadata_type(backend)
    try:
        return metadata_type.create(batch_size=batch_size, num_layers=count, **dict(settings))
    except TypeError as error:
        raise TypeError(
            f"{owner}: {kind.name} settings do not fit {metadata_type.__name__}.create "
            f"(attention_backend={backend!r}): {error}"
        ) from error


@pytree_dataclass
class HybridCache(LayerCache):
    """One view per layer of a hybrid stack (``None`` for ``"none"`` layers).

    Attributes:
        views: attention views (``ATTENTION_BACKENDS[metadata.attention_backend]``),
            ``MambaCacheView``, ``Mamba2CacheView``, ``LinearAttentionCacheView`` or ``None``.
        metadata: the ``HybridCacheMetadata`` (static).

    Row operations apply to every layer together; with the paged backend the paged views move
    nothing on the device (their rows are the host's page tables: apply the same operation to
    the ``jaxkv.pages.PagedRows`` of the page manager).
    """

    views: tuple[Any, ...]
    metadata: HybridCacheMetadata = static_field()

    @classmethod
    def init_cache(cls, metadata: HybridCacheMetadata) -> HybridCache:
        """A cache with an empty view of the right kind for every layer."""
        if not isinstance(metadata, HybridCacheMetadata):
            raise TypeError(
                f"HybridCache.init_cache: metadata must be HybridCacheMetadata, "
                f"got {type(metadata).__name__}"
            )
        views = []
        for layer in range(metadata.num_layers):
            kind_metadata = metadata.layer_metadata(layer)
            views.append(
                None
                if kind_metadata is None
                else kind_metadata.view_type.init(kind_metadata, layer)
            )
        return cls(views=tuple(views), metadata=metadata)

    @classmethod
    def init_empty(cls, metadata: HybridCacheMetadata) -> HybridCache:
        """A cache of ``None`` views, one per layer of ``metadata``."""
        if not isinstance(metadata, HybridCacheMetadata):
            raise TypeError(
                f"HybridCache.init_empty: metadata must be HybridCacheMetadata, "
                f"got {type(metadata).__name__}"
            )
        return cls(views=(None,) * metadata.num_layers, metadata=metadata)

    def layer_kind(self, layer: int) -> str:
        """The kind of layer ``layer``."""
        return self.metadata.layer_kinds[layer]

    def _recurrent_kinds(self) -> list[str]:
        return [kind for kind in RECURRENT_KINDS if kind in self.metadata.layer_kinds]

    def _map(self, operation: str, *args: Any) -> HybridCache:
        if operation in ("select", "repeat", "extract"):
            self._check_rows_can_change(operation)
        cache = super()._map(operation, *args)
        return cache._with_rows_of_views()

    def truncate(self, lengths: Any) -> HybridCache:
        """Every row goes back to its first ``lengths[b]`` tokens in every layer together, or
        in none: a row that some layer cannot restore (a ring or recurrent layer asked to go
        back further than its ``rollback_depth`` keeps) keeps its tokens in every layer.
        Eagerly that raises ``ValueError`` and nothing changes; under ``jit`` the row is left
        untouched everywhere and flagged in every layer that keeps rollback flags
        (``overflow_rows``/``check_overflow`` report it). Paged attention layers change nothing
        on the device (shorten the page tables with ``PagedRows.truncate``).

        Raises:
            UnsupportedOperationError: a recurrent layer or a sliding-window ring without
                ``rollback_depth`` (create the cache with ``rollback_depth > 0``); nothing
                changes.
            ValueError: (eager calls only) a length some layer cannot restore.
        """
        owner = "HybridCache.truncate"
        self._check_can_truncate()
        live = [view for view in self.views if getattr(view, "lengths", None) is not None]
        if not live:  # paged attention only: the host's page tables hold every length
            return self._map("truncate", lengths)
        batch = live[0].metadata.batch_size
        lengths = truncate_lengths(owner, lengths, batch)
        floors = [view.rollback_floor for view in live if view.rollback_floor is not None]
        floor = functools.reduce(jnp.maximum, floors, jnp.zeros((batch,), jnp.int32))
        current = functools.reduce(jnp.minimum, [view.lengths for view in live])
        depths = "/".join(
            str(depth) for depth in sorted({view.metadata.rollback_depth for view in live} - {0})
        )
        _, ok = rollback_targets(
            owner,
            lengths,
            floor,
            current,
            limit=f" (the lengths every layer can restore: rollback_depth={depths} bounds the "
            f"rings and recurrent layers; every layer truncates together or none does)",
        )
        views = []
        for view in self.views:
            if getattr(view, "lengths", None) is not None:
                view = view.truncate(jnp.where(ok, lengths, view.lengths))
                view = view.mark_rollback_refused(~ok)
            elif view is not None:
                view = view.truncate(lengths)
            views.append(view)
        return self.with_views(views)

    def rollback(self, n: Any) -> HybridCache:
        """Every row forgets its last ``n`` tokens (an int or ``[batch]`` ints) in every layer
        together or in none (``truncate(lengths - n)``, see ``truncate``)."""
        self._check_can_truncate()
        lengths = self._row_lengths()
        if lengths is None:  # paged attention only: nothing on the device
            return self._map("rollback", n)
        counts = rollback_counts("HybridCache.rollback", n, lengths.shape[0])
        return self.truncate(lengths - counts)

    def _check_can_truncate(self) -> None:
        """``UnsupportedOperationError`` unless every layer can roll back at all."""
        states, rings = [], []
        for view, kind in zip(self.views, self.metadata.layer_kinds, strict=True):
            depth = getattr(getattr(view, "metadata", None), "rollback_depth", None)
            if view is None or depth is None or depth > 0:
                continue
            if kind in RECURRENT_KINDS and kind not in states:
                states.append(kind)
            elif kind in ATTENTION_KINDS and view.metadata.is_ring and kind not in rings:
                rings.append(kind)
        if not states and not rings:
            return
        reasons = []
        if states:
            reasons.append(
                f"its {', '.join(k for k in RECURRENT_KINDS if k in states)} layers keep one "
                f"state per row, not one per token"
            )
        if rings:
            reasons.append(
                f"its {', '.join(rings)} layers are rings that have overwritten the slots "
                f"before their window"
            )
        raise UnsupportedOperationError(
            "hybrid",
            "truncate",
            f"{' and '.join(reasons)}; create the cache with rollback_depth=D "
            f"(HybridConfig.cache_metadata(..., rollback_depth=D)) to roll back up to D tokens. "
            f"Every layer rolls back together or none does (nothing was changed)",
        )

    def _check_rows_can_change(self, operation: str) -> None:
        if self.metadata.attention_backend == "paged" and self._recurrent_kinds():
            raise UnsupportedOperationError(
                "hybrid (paged attention)",
                operation,
                "a step always has max_num_seqs slots and the recurrent layers keep one row per "
                "slot, so the number of rows cannot change; use reorder (duplicates allowed) "
                "and reset_rows on the cache, and the same operation on the PagedRows",
            )

    def _with_rows_of_views(self) -> HybridCache:
        """The cache with its metadata's ``batch_size`` following its views' (after ``select``,
        ``repeat``, ``extract``)."""
        live = [view for view in self.views if view is not None]
        if not live or live[0].metadata.batch_size == self.metadata.batch_size:
            return self
        return dataclasses.replace(
            self, metadata=self.metadata.with_batch_size(live[0].metadata.batch_size)
        )

    def insert(self, other: Any, slot: Any) -> HybridCache:
        """Row ``slot`` of every layer replaced by the single row of ``other`` (a one-row hybrid
        cache of the same stack)."""
        self._check_rows_can_change("insert")
        expected = self.metadata
        if self.metadata.attention_backend != "paged" and self.metadata.batch_size:
            expected = self.metadata.with_batch_size(1)
        if not isinstance(other, HybridCache) or other.metadata != expected:
            raise TypeError(
                f"HybridCache.insert: other must be a one-row HybridCache of the same stack "
                f"(metadata {expected}), got {type(other).__name__}"
            )
        return super().insert(other, slot)

    def admit(
        self, runtime: HybridRuntimeMetadata | HybridPagedRuntimeMetadata, num_tokens: int
    ) -> tuple[HybridCache, Any, jax.Array]:
        """Decide, for the whole stack at once, which rows may take this step's tokens; a
        forward pass calls it before any layer writes (``hybrid_forward_cached`` does). A row
        that one layer would refuse is refused by every layer, so it stays untouched everywhere.

        * Contiguous backend: a row whose write would pass an attention layer's
          ``max_length``. Eagerly: ``CacheOverflowError``, nothing written. Under ``jit``: the
          row's tokens are dropped in every layer and its attention ``overflow`` flags are set
          (``check_overflow`` reports it).
        * Paged backend: a scheduled slot whose recurrent state has not seen exactly the
          tokens before this step's (the page manager served a prefix-cache hit or a fork the
          recurrent state never saw). Eagerly: ``ValueError``. Under ``jit``: the slot's tokens
          are dropped in every layer (no attention write, no state change).

        Args:
            runtime: the step's hybrid runtime metadata.
            num_tokens: ``T``, tokens per row of the ``[batch, T]`` layout.

        Returns:
            ``(cache, runtime, refused)``: the cache (with overflow flags set), the runtime with
            the refused rows' tokens dropped, and ``refused: [batch]`` bool.
        """
        lengths = self._row_lengths()
        if self.metadata.attention_backend == "paged":
            return self._admit_paged(runtime, lengths)
        return self._admit_contiguous(runtime, num_tokens)

    def _row_lengths(self) -> jax.Array | None:
        try:
            return self.lengths()
        except ValueError:
            return None

    def _admit_contiguous(
        self, runtime: HybridRuntimeMetadata, num_tokens: int
    ) -> tuple[HybridCache, HybridRuntimeMetadata, jax.Array]:
        batch = self.metadata.batch_size or 0
        part = runtime.attention if runtime.attention is not None else runtime.recurrent
        if part is None or part.new_lengths is None:
            counts = jnp.full((batch,), num_tokens, jnp.int32)
        else:
            counts = part.new_lengths.astype(jnp.int32)
        refused = jnp.zeros((batch,), jnp.bool_)
        limits = []
        for view, kind in zip(self.views, self.metadata.layer_kinds, strict=True):
            if view is not None and kind in ATTENTION_KINDS:
                refused |= view.lengths + counts > view.metadata.max_length
                limits.append(view.metadata.max_length)
        if not v.is_traced(refused) and bool(jnp.any(refused)):
            rows = np.flatnonzero(np.asarray(refused)).tolist()
            raise CacheOverflowError(
                f"HybridCache: writing {np.asarray(counts)[rows].tolist()} token(s) to row(s) "
                f"{rows} would pass an attention layer's max_length ({sorted(set(limits))}); "
                f"nothing was written in any layer"
            )
        admitted = jnp.where(refused, 0, counts)
        side = "right" if part is None else part.padding_side
        runtime = HybridRuntimeMetadata.create(admitted, side)
        views = [
            view.mark_overflow(refused) if view is not None and kind in ATTENTION_KINDS else view
            for view, kind in zip(self.views, self.metadata.layer_kinds, strict=True)
        ]
        return self.with_views(views), runtime, refused

    def _admit_paged(
        self, runtime: HybridPagedRuntimeMetadata, lengths: jax.Array | None
    ) -> tuple[HybridCache, HybridPagedRuntimeMetadata, jax.Array]:
        batch = runtime.batch_size
        if lengths is None:  # no recurrent layer: every layer's bookkeeping is the host's
            return self, runtime, jnp.zeros((batch,), jnp.bool_)
        offsets = runtime.slot_offsets()
        refused = (offsets >= 0) & (lengths != offsets)
        if not v.is_traced(refused) and bool(jnp.any(refused)):
            slots = np.flatnonzero(np.asarray(refused)).tolist()
            raise ValueError(
                f"HybridCache: slot(s) {slots} continue their sequences at position(s) "
                f"{np.asarray(offsets)[slots].tolist()} but their recurrent state has seen "
                f"{np.asarray(lengths)[slots].tolist()} token(s): the page manager served "
                f"pages (a prefix-cache hit or a fork) that the recurrent state never saw. Run "
                f"the PageManager of a stack with recurrent layers with "
                f"enable_prefix_caching=False (jaxkv.engine.step_inputs.hybrid_page_manager) "
                f"and move rows with the same operation on the cache and on PagedRows; nothing "
                f"was written"
            )
        return self, runtime.drop_slots(refused), refused

    def copy_pages(
        self, copy_ops: jax.Array, sliding_copy_ops: jax.Array | None = None
    ) -> HybridCache:
        """Apply a step's ``(src, dst)`` page copies (``copy_ops: [C, 2]`` int, ``-1`` rows are
        no-ops) in every paged attention layer; jittable. The paged views apply their step's
        copies themselves in ``concatenate_to_cache``; this is for driving the pools by hand.

        Args:
            copy_ops: the copies of the global layers' pools (and of the sliding layers' when
                one page table drives both).
            sliding_copy_ops: the copies of the sliding layers' own pool (its windowed manager's
                step), or ``None``: they take ``copy_ops``, which needs one pool geometry.

        Raises:
            ValueError: the cache's backend is not ``"paged"``; ``sliding_copy_ops`` missing for
                a sliding pool of another size (its page ids name other pages).
        """
        owner = "HybridCache.copy_pages"
        if self.metadata.attention_backend != "paged":
            raise ValueError(
                f"{owner}: needs attention_backend='paged', got {self.metadata.attention_backend!r}"
            )
        full, sliding = self.metadata.attention, self.metadata.sliding_attention
        if (
            sliding_copy_ops is None
            and full is not None
            and sliding is not None
            and full.num_pages != sliding.num_pages
        ):
            raise ValueError(
                f"{owner}: the sliding layers have their own pool ({sliding.num_pages} pages, "
                f"the global layers {full.num_pages}); pass their step's copies as "
                f"sliding_copy_ops"
            )
        ops = {"attention": copy_ops, "sliding_attention": copy_ops}
        if sliding_copy_ops is not None:
            ops["sliding_attention"] = sliding_copy_ops
        return self.with_views(
            view.copy_pages(ops[kind]) if kind in ATTENTION_KINDS else view
            for view, kind in zip(self.views, self.metadata.layer_kinds, strict=True)
        )

    def lengths(self) -> jax.Array:
        """``[batch]`` int32 tokens seen per row, from the first layer that keeps per-row
        lengths (paged attention layers do not: the page manager knows each sequence's)."""
        for view in self.views:
            lengths = getattr(view, "lengths", None)
            if lengths is not None:
                return lengths
        raise ValueError(
            "HybridCache.lengths: the cache has no view with per-row lengths (paged attention "
            "layers keep them on the host, in the PageManager)"
        )

    def overflow_rows(self) -> jax.Array:
        """``[batch]`` bool: rows where an attention write did not fit (recurrent layers never
        overflow; paged capacity is checked on the host by the page manager), or whose rollback
        was refused (layers with ``rollback_depth``)."""
        flags = [view.overflow_rows() for view in self.views if view is not None]
        if not flags:
            return jnp.zeros((self.metadata.batch_size or 0,), jnp.bool_)
        return jnp.any(jnp.stack(flags), axis=0)

    def check_overflow(self) -> None:
        """Raise ``CacheOverflowError`` if any row overflowed or had a rollback refused (call
        after a jitted step)."""
        raise_if_overflowed(
            self.overflow_rows(), "an attention layer's max_length", self.refused_rollbacks()
        )
