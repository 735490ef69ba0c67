"""Contiguous and sliding-window key/value caches.

Without a window, each batch row stores up to ``max_length`` tokens in
``keys: [batch, max_length, num_kv_heads, head_dim]`` and
``values: [batch, max_length, value_heads, value_dim]``; slot ``s`` holds position ``s``.

With ``sliding_window=W`` each row stores only ``W`` slots, used as a ring: the token at absolute
position ``p`` lives in slot ``p % W`` and ``positions: [batch, W]`` records which position each
slot holds (``-1`` while empty). A write costs O(new tokens) whatever the window; attention of a
new chunk reads the ring as it was *before* the write plus the chunk's own keys, so every query
sees exactly the previous ``W`` positions even when the chunk is longer than ``W`` or wraps the
ring.

Every row has its own fill length (``lengths: [batch]``), so a batch may hold sequences of
different lengths; ``TransformerRuntimeMetadata`` says how many of the ``T`` new tokens of each
row are real and on which side the padding is.

Capacity: a row may hold at most ``max_length`` tokens in its life (with a window too, where it
bounds the positions). A write that would pass it writes *nothing* for that row and flags it:
called eagerly, ``concatenate_to_cache`` raises ``CacheOverflowError``; under ``jax.jit`` it cannot
raise, so the returned view's ``overflow: [batch]`` flag turns (and stays) ``True`` for that row --
check it with ``TransformerCache.check_overflow`` (or ``overflow_rows``) after the step.

Rows: every row operation of ``jaxkv.abstracts.RowOperations`` works on views and caches
(``jaxkv.caches.rows.RowView``). A full cache truncates to any shorter length. A ring has
overwritten the slots of the tokens before its window, so by default it cannot truncate at all;
with ``rollback_depth=D`` it keeps ``W + D`` slots per row instead of ``W`` and can forget up to
its last ``D`` tokens (speculative decoding: the verifier rolls back the rejected drafts)::

    ring slots (W=4, D=2), after 9 tokens:   [6 7 8 | 3 4 5]   positions held: 3 .. 8
    the next query (position 9) sees 6 .. 9: the ring's 6 .. 8 (masked by position) and itself
    truncate to 7 (within D): the slots of 7 and 8 are emptied; the next query (7) sees 4 .. 7

Attention masks by position, so a ring with ``rollback_depth`` gives exactly the outputs of one
without. Every write keeps the invariant that a row can go back to any length in
``[rollback_floor, lengths]``, where ``rollback_floor`` is at least ``lengths - D`` (and never
moves down: a truncate does not bring back the slots that later writes overwrote). A truncate
outside that range raises ``ValueError`` eagerly; under ``jax.jit`` the row keeps its tokens and
its ``rollback_refused`` flag turns ``True`` (``overflow_rows``/``check_overflow`` report it).
Cost: ``D`` more slots of keys and values per row and layer (``D * bytes_per_token()`` per
sequence once it passes ``W`` tokens) plus 5 bytes of bookkeeping per row and layer.

Storage: keys and values go through the metadata's storage codec (``jaxkv.quantization``):
floats of ``dtype`` (16-bit ones held as ``uint16`` words so that XLA's CPU backend writes them
in place), or with ``kv_quantization`` set to ``"int8"``, ``"int4"`` or ``"fp8"`` the codec's
words plus ``key_scales``/``value_scales``; each token is encoded as it is written and attention
decodes block by block.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv import _validation as v
from jaxkv.abstracts import (
    AttentionCacheView,
    BaseCacheMetadata,
    pytree_dataclass,
    static_field,
)
from jaxkv.caches.kv_storage import KVStorageMetadata, decode_states
from jaxkv.caches.rows import (
    LayerCache,
    RaggedRuntimeMetadata,
    RowView,
    check_ragged_runtime,
    rollback_targets,
    token_layout,
    truncate_lengths,
)
from jaxkv.errors import CacheOverflowError
from jaxkv.kv import CachedKV, KVSegment

MAX_LENGTH = 2**30
"""Most tokens a row may hold: positions are int32, and ``length + new tokens`` must not wrap."""

_LEGACY_NAMES = {"key_heads": "num_kv_heads", "key_dim": "head_dim"}
"""Field names of earlier releases, still accepted by ``create`` and ``from_dict``."""


@pytree_dataclass
class TransformerCacheMetadata(KVStorageMetadata, BaseCacheMetadata):
    """Static configuration of a contiguous or sliding-window KV cache.

    Attributes:
        batch_size: rows of the cache.
        max_length: most tokens one row holds over its life.
        num_layers: layers (views) in the cache.
        num_kv_heads: KV heads (of keys; and of values unless ``value_heads`` differs).
        head_dim: head dimension of keys (and queries).
        value_dim: head dimension of values (``head_dim`` unless given).
        value_heads: heads of values (``num_kv_heads`` unless given).
        sliding_window: ``None`` for a full cache, else the ring size ``W`` (slots per row are
            ``min(W, max_length)``).
        dtype: dtype of keys and values (float32, bfloat16 or float16); with a codec, the dtype
            ``key_states()``/``value_states()`` return.
        kv_quantization: storage codec, one of ``jaxkv.quantization.CODECS`` (``"none"``:
            plain ``dtype`` floats).
        quantization_group_size: int4 only: channels per scale (must divide ``head_dim`` and
            ``value_dim``); ``None`` for the other codecs.
        rollback_depth: rings only: how many of its last tokens a row can forget (``truncate``
            / ``rollback``); the ring keeps ``W + rollback_depth`` slots. ``0`` (the default): a
            ring cannot truncate.
    """

    batch_size: int
    max_length: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    value_dim: int | None = None
    value_heads: int | None = None
    sliding_window: int | None = None
    dtype: np.dtype = np.dtype(np.float32)
    kv_quantization: str = "none"
    quantization_group_size: int | None = None
    rollback_depth: int = 0

    @classmethod
    def create(
        cls,
        batch_size: int,
        max_length: int,
        num_layers: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        value_dim: int | None = None,
        value_heads: int | None = None,
        sliding_window: int | None = None,
        dtype: Any = jnp.float32,
        kv_quantization: str = "none",
        quantization_group_size: int | None = None,
        rollback_depth: int = 0,
        key_heads: int | None = None,
        key_dim: int | None = None,
    ) -> TransformerCacheMetadata:
        """Validated metadata.

        ``value_dim`` defaults to ``head_dim`` and ``value_heads`` to ``num_kv_heads``
        (``key_heads``/``key_dim`` are accepted as the former names of ``num_kv_heads`` and
        ``head_dim``). ``kv_quantization`` picks the storage codec (``"none"``, ``"int8"``,
        ``"int4"``, ``"fp8"``); int4's ``quantization_group_size`` defaults to
        ``min(64, head_dim, value_dim)``. ``rollback_depth`` (rings only) gives the ring that
        many extra slots so ``truncate`` can forget up to that many of its last tokens. Raises
        ``ValueError``/``TypeError`` naming the field.
        """
        owner = "TransformerCacheMetadata.create"
        return cls._construct(
            dict(
                batch_size=batch_size,
                max_length=max_length,
                num_layers=num_layers,
                num_kv_heads=_pick(owner, "key_heads", key_heads, "num_kv_heads", num_kv_heads),
                head_dim=_pick(owner, "key_dim", key_dim, "head_dim", head_dim),
                value_dim=value_dim,
                value_heads=value_heads,
                sliding_window=sliding_window,
                dtype=dtype,
                kv_quantization=kv_quantization,
                quantization_group_size=quantization_group_size,
                rollback_depth=rollback_depth,
            )
        )

    @classmethod
    def fill_defaults(cls, fields: dict[str, Any]) -> dict[str, Any]:
        fields = cls.fill_kv_defaults(cls.__name__, fields)
        if fields.get("value_heads") is None:
            fields["value_heads"] = fields.get("num_kv_heads")
        return fields

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformerCacheMetadata:
        """Metadata from ``to_dict`` output (the field names of earlier releases, ``key_heads``
        and ``key_dim``, are accepted)."""
        if isinstance(data, dict) and any(name in data for name in _LEGACY_NAMES):
            data = dict(data)
            for old, new in _LEGACY_NAMES.items():
                if old in data:
                    data[new] = _pick(
                        f"{cls.__name__}.from_dict", old, data.pop(old), new, data.get(new)
                    )
        return super().from_dict(data)

    def validate(self) -> None:
        owner = type(self).__name__
        for name in ("batch_size", "max_length", "num_layers"):
            v.require_size(owner, name, getattr(self, name))
        self.validate_kv()
        v.require_size(owner, "value_heads", self.value_heads)
        if self.max_length > MAX_LENGTH:
            raise ValueError(
                f"{owner}: max_length must be <= {MAX_LENGTH} (positions and lengths are int32, "
                f"with room for any write), got {self.max_length}"
            )
        v.require_optional_int(owner, "sliding_window", self.sliding_window, minimum=1)
        v.require_int(owner, "rollback_depth", self.rollback_depth, minimum=0)
        if self.rollback_depth and self.sliding_window is None:
            raise ValueError(
                f"{owner}: rollback_depth={self.rollback_depth} needs a sliding_window (a full "
                f"cache truncates to any length without spare slots); give rollback_depth=0"
            )
        if self.rollback_depth > MAX_LENGTH:
            raise ValueError(
                f"{owner}: rollback_depth must be <= {MAX_LENGTH}, got {self.rollback_depth}"
            )

    @property
    def num_slots(self) -> int:
        """Slots stored per row: ``max_length``, or the window plus ``rollback_depth`` when that
        is smaller."""
        if self.sliding_window is None:
            return self.max_length
        return min(self.sliding_window + self.rollback_depth, self.max_length)

    @property
    def is_ring(self) -> bool:
        """Whether rows are rings (a window smaller than ``max_length``)."""
        return self.sliding_window is not None and self.sliding_window < self.max_length

    @property
    def keeps_rollback(self) -> bool:
        """Whether rows are rings with ``rollback_depth > 0`` (and so keep ``rollback_floor``
        and ``rollback_refused``)."""
        return self.is_ring and self.rollback_depth > 0

    def bytes_per_sequence(self, length: int) -> int:
        """Bytes of keys and values a sequence of ``length`` tokens occupies across all layers:
        ``min(length, slots)`` slots (a ring holds at most its window plus ``rollback_depth``)."""
        length = v.require_int(
            f"{type(self).__name__}.bytes_per_sequence", "length", length, minimum=0
        )
        return min(length, self.num_slots) * self.bytes_per_token()

    def bytes_total(self) -> int:
        """Bytes the whole cache allocates (keys, values and bookkeeping: lengths, overflow
        flags, a ring's slot positions and, with ``rollback_depth``, its floors and flags)."""
        per_row = self.num_slots * self.bytes_per_token()
        ring = 4 * self.num_slots if self.is_ring else 0
        rollback = 4 + 1 if self.keeps_rollback else 0
        bookkeeping = self.num_layers * (4 + 1 + ring + rollback)
        return self.batch_size * (per_row + bookkeeping)


def _pick(owner: str, name: str, value: Any, fallback_name: str, fallback: Any) -> Any:
    if value is None and fallback is None:
        raise ValueError(f"{owner}: give {fallback_name} or {name}")
    if value is not None and fallback is not None and value != fallback:
        raise ValueError(
            f"{owner}: {name}={value!r} conflicts with {fallback_name}={fallback!r}; give one"
        )
    return fallback if value is None else value


@pytree_dataclass
class TransformerRuntimeMetadata(RaggedRuntimeMetadata):
    """Runtime metadata of one write into a ``TransformerCache``: which of the ``T`` tokens of
    each row are real (see ``jaxkv.caches.rows.RaggedRuntimeMetadata``)."""


TransformerMetadata = TransformerRuntimeMetadata
"""Former name of ``TransformerRuntimeMetadata``."""


@pytree_dataclass
class TransformerCacheView(RowView, AttentionCacheView):
    """One layer of a contiguous or sliding-window cache.

    Attributes:
        keys: ``[batch, slots, num_kv_heads, storage.stored_dim(head_dim)]`` stored words of the
            metadata's storage codec (``key_states()`` gives the floats).
        values: ``[batch, slots, value_heads, storage.stored_dim(value_dim)]``, likewise.
        lengths: ``[batch]`` int32, tokens written so far per row (the next position).
        positions: ``[batch, slots]`` int32 position held by each ring slot (``-1`` empty); ``None``
            for a full cache, where slot ``s`` holds position ``s``.
        overflow: ``[batch]`` bool, sticky: a write to this row did not fit and was dropped.
        metadata: the cache's ``TransformerCacheMetadata`` (static).
        layer_index: which layer this view belongs to (static).
        key_scales: with a quantising codec, ``[batch, slots, num_kv_heads, groups]`` uint16
            (float16 bits), one scale per token per head (per channel group for int4); ``None``
            unquantised.
        value_scales: ``[batch, slots, value_heads, groups]``, likewise.
        rollback_floor: rings with ``rollback_depth`` only (else ``None``): ``[batch]`` int32,
            the shortest length each row can still be truncated to.
        rollback_refused: rings with ``rollback_depth`` only (else ``None``): ``[batch]`` bool,
            sticky: a truncate under ``jit`` went past ``rollback_floor`` and was refused.
    """

    keys: jax.Array
    values: jax.Array
    lengths: jax.Array
    positions: jax.Array | None
    overflow: jax.Array
    metadata: TransformerCacheMetadata = static_field()
    layer_index: int | None = static_field(None)
    key_scales: jax.Array | None = None
    value_scales: jax.Array | None = None
    rollback_floor: jax.Array | None = None
    rollback_refused: jax.Array | None = None

    def _family(self) -> str:
        return "sliding-window ring" if self.metadata.is_ring else "contiguous"

    def _empty_fields(self) -> dict[str, Any]:
        return {
            "lengths": 0,
            "positions": -1,
            "overflow": False,
            "rollback_floor": 0,
            "rollback_refused": False,
        }

    def _overflow_limit(self) -> str:
        return f"max_length={self.metadata.max_length}"

    @classmethod
    def init(
        cls, metadata: TransformerCacheMetadata, layer_index: int | None = None
    ) -> TransformerCacheView:
        """An empty view (all rows of length 0) for ``metadata``."""
        if not isinstance(metadata, TransformerCacheMetadata):
            raise TypeError(
                f"TransformerCacheView.init: metadata must be TransformerCacheMetadata, "
                f"got {type(metadata).__name__}"
            )
        m = metadata
        slots = m.num_slots
        keys, key_scales = m.storage.allocate((m.batch_size, slots, m.num_kv_heads), m.head_dim)
        values, value_scales = m.storage.allocate((m.batch_size, slots, m.value_heads), m.value_dim)
        rollback = m.keeps_rollback
        return cls(
            keys=keys,
            values=values,
            lengths=jnp.zeros((m.batch_size,), jnp.int32),
            positions=jnp.full((m.batch_size, slots), -1, jnp.int32) if m.is_ring else None,
            overflow=jnp.zeros((m.batch_size,), jnp.bool_),
            metadata=m,
            layer_index=layer_index,
            key_scales=key_scales,
            value_scales=value_scales,
            rollback_floor=jnp.zeros((m.batch_size,), jnp.int32) if rollback else None,
            rollback_refused=jnp.zeros((m.batch_size,), jnp.bool_) if rollback else None,
        )

    def key_states(self) -> jax.Array:
        """``[batch, slots, num_kv_heads, head_dim]`` keys as ``metadata.dtype`` floats (a
        quantised cache is dequantised whole: for inspection, attention reads it block by
        block)."""
        return decode_states(self.keys, self.key_scales, self.metadata)

    def value_states(self) -> jax.Array:
        """``[batch, slots, value_heads, value_dim]`` values as ``metadata.dtype`` floats."""
        return decode_states(self.values, self.value_scales, self.metadata)

    def query_positions(
        self, runtime: TransformerRuntimeMetadata | None, num_tokens: int
    ) -> jax.Array:
        """``[batch, num_tokens]`` int32 absolute positions the next write will give its tokens
        (``-1`` for padding): what a model needs for RoPE before it writes."""
        return token_layout(self.lengths, runtime, num_tokens)[1]

    def concatenate_to_cache(
        self,
        key: jax.Array,
        value: jax.Array,
        runtime: TransformerRuntimeMetadata | None = None,
    ) -> tuple[CachedKV, TransformerCacheView]:
        """Write ``T`` new tokens per row at each row's own position.

        Args:
            key: ``[batch, T, num_kv_heads, head_dim]``, any float dtype (encoded with the
                metadata's storage codec).
            value: ``[batch, T, value_heads, value_dim]``.
            runtime: which of the ``T`` tokens per row are real (default: all).

        Returns:
            ``(kv, new_view)``: ``kv`` is the ``CachedKV`` to pass to ``jaxkv.ops.attention``
            (segments to read, the new queries' positions, the overflow flags of this write);
            ``new_view`` holds the written tokens. ``self`` is unchanged.

        Raises:
            ValueError/TypeError: a shape or dtype that does not fit the metadata.
            CacheOverflowError: (eager calls only) a row would pass ``max_length``.
        """
        m = self.metadata
        owner = self._owner("concatenate_to_cache")
        v.check_array(owner, "key", key, (m.batch_size, None, m.num_kv_heads, m.head_dim))
        new_tokens = key.shape[1]
        v.check_array(owner, "value", value, (m.batch_size, new_tokens, m.value_heads, m.value_dim))
        for name, array in (("key", key), ("value", value)):
            if not jnp.issubdtype(array.dtype, jnp.floating):
                raise TypeError(f"{owner}: {name} must be a float array, got {array.dtype}")
        if new_tokens < 1:
            raise ValueError(f"{owner}: key must hold at least one new token, got T={new_tokens}")
        check_ragged_runtime(owner, runtime, TransformerRuntimeMetadata, m.batch_size, new_tokens)

        storage = m.storage
        key, key_scale = storage.encode(key)
        value, value_scale = storage.encode(value)

        def segment(keys, values, positions, live, key_scales, value_scales):
            return KVSegment(keys, values, positions, live, storage, key_scales, value_scales)

        def scatter(buffer, rows, slots, new):
            return None if buffer is None else buffer.at[rows, slots].set(new, mode="drop")

        index, positions = token_layout(self.lengths, runtime, new_tokens)
        real = positions >= 0
        counts = jnp.sum(real, axis=1, dtype=jnp.int32)
        overflow = self.lengths + counts > m.max_length
        if not v.is_traced(self.lengths, counts) and bool(jnp.any(overflow)):
            rows = np.flatnonzero(np.asarray(overflow)).tolist()
            raise CacheOverflowError(
                f"{owner}: writing {np.asarray(counts)[rows].tolist()} token(s) to row(s) {rows} "
                f"holding {np.asarray(self.lengths)[rows].tolist()} would pass "
                f"max_length={m.max_length}; nothing was written"
            )
        write = real & ~overflow[:, None]
        query_positions = jnp.where(overflow[:, None], -1, positions)
        new_lengths = self.lengths + jnp.where(overflow, 0, counts)
        rows = jnp.broadcast_to(jnp.arange(m.batch_size)[:, None], positions.shape)

        if not m.is_ring:
            # Dropped (out-of-range) slot ids write nothing: padding and overflowing rows.
            slots = jnp.where(write, positions, m.num_slots)
            keys = scatter(self.keys, rows, slots, key)
            values = scatter(self.values, rows, slots, value)
            key_scales = scatter(self.key_scales, rows, slots, key_scale)
            value_scales = scatter(self.value_scales, rows, slots, value_scale)
            segments = (segment(keys, values, None, new_lengths, key_scales, value_scales),)
            slot_positions = None
        else:
            window = m.num_slots
            # Only a row's last W real tokens survive in the ring; writing earlier ones would put
            # duplicate slot ids into one scatter, whose order is unspecified.
            keep = write & (index >= counts[:, None] - window)
            slots = jnp.where(keep, positions % window, window)
            keys = scatter(self.keys, rows, slots, key)
            values = scatter(self.values, rows, slots, value)
            key_scales = scatter(self.key_scales, rows, slots, key_scale)
            value_scales = scatter(self.value_scales, rows, slots, value_scale)
            slot_positions = self.positions.at[rows, slots].set(positions, mode="drop")
            filled = jnp.minimum(self.lengths, window)
            full_batch = jnp.full((m.batch_size,), new_tokens, jnp.int32)
            # The chunk's own keys are read in stored form too, so that every query sees the
            # same (quantised) keys whether its token came in this chunk or an earlier one.
            segments = (
                segment(
                    self.keys,
                    self.values,
                    self.positions,
                    filled,
                    self.key_scales,
                    self.value_scales,
                ),
                segment(key, value, query_positions, full_batch, key_scale, value_scale),
            )

        kv = CachedKV(
            segments=segments,
            query_positions=query_positions,
            overflow=overflow,
            sliding_window=m.sliding_window,
        )
        rollback_floor = self.rollback_floor
        if rollback_floor is not None:
            # Slots of positions before new_lengths - D now hold newer tokens.
            rollback_floor = jnp.maximum(rollback_floor, new_lengths - m.rollback_depth)
        new_view = dataclasses.replace(
            self,
            keys=keys,
            values=values,
            lengths=new_lengths,
            positions=slot_positions,
            overflow=self.overflow | overflow,
            key_scales=key_scales,
            value_scales=value_scales,
            rollback_floor=rollback_floor,
        )
        return kv, new_view

    def truncate(self, lengths: Any) -> TransformerCacheView:
        """A view whose rows keep only their first ``lengths[b]`` tokens (``lengths: [batch]``
        ints), e.g. to roll a conversation back to the longest prefix it shares with a new
        prompt, or to forget a speculative decoder's rejected drafts.

        A full cache takes any length in ``[0, current length]``. A ring with ``rollback_depth``
        takes any length in ``[rollback_floor, current length]`` (``rollback_floor`` is at least
        ``current - rollback_depth``); the slots of the forgotten tokens are emptied. Under
        ``jit`` a row given an out-of-range length keeps its tokens (a ring also sets its
        ``rollback_refused`` flag).

        Raises:
            UnsupportedOperationError: on a ring with ``rollback_depth=0``, whose slots before
                the window already hold newer tokens.
            ValueError: (eager calls only) a length out of its row's range; nothing changes.
        """
        owner = self._owner("truncate")
        m = self.metadata
        if m.is_ring and not m.rollback_depth:
            raise self._unsupported(
                "truncate",
                "a ring has overwritten the slots of the tokens before its window, so the "
                "state at an earlier length is gone; create the cache with rollback_depth=D to "
                "keep D spare slots per row and truncate up to D tokens back",
            )
        lengths = truncate_lengths(owner, lengths, m.batch_size)
        if not m.is_ring:
            targets, _ = rollback_targets(owner, lengths, 0, self.lengths)
            return dataclasses.replace(self, lengths=targets)
        targets, ok = rollback_targets(
            owner,
            lengths,
            self.rollback_floor,
            self.lengths,
            limit=f" (rollback_depth={m.rollback_depth}: at most that many tokens back, and not "
            f"past the slots later writes overwrote)",
        )
        positions = jnp.where(self.positions >= targets[:, None], -1, self.positions)
        return dataclasses.replace(
            self,
            lengths=targets,
            positions=positions,
            rollback_refused=self.rollback_refused | ~ok,
        )

    def overflow_rows(self) -> jax.Array:
        """``[batch]`` bool: rows where a write did not fit and was dropped, or (rings with
        ``rollback_depth``) a truncate was refused (sticky)."""
        if self.rollback_refused is None:
            return self.overflow
        return self.overflow | self.rollback_refused

    def mark_overflow(self, rows: jax.Array) -> TransformerCacheView:
        """A view whose rows where ``rows: [batch]`` bool is true are flagged as having had a
        write dropped (a stack refusing a row in every layer flags it here)."""
        return dataclasses.replace(self, overflow=self.overflow | rows)


@pytree_dataclass
class TransformerCache(LayerCache):
    """A contiguous or sliding-window KV cache: one ``TransformerCacheView`` per layer."""

    views: tuple[TransformerCacheView | None, ...]

    metadata_types = (TransformerCacheMetadata,)


TransformerCacheMetadata.view_type = TransformerCacheView
