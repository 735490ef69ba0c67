"""Contiguous and sliding-window key/value caches.

Without a window, each batch row stores up to ``max_length`` tokens in
``keys: [batch, max_length, key_heads, key_dim]`` and
``values: [batch, max_length, value_heads, value_dim]``; slot ``s`` holds position ``s``.

With ``sliding_window=W`` each row stores only ``W`` slots, used as a ring: the token at absolute
position ``p`` lives in slot ``p % W`` and ``positions: [batch, W]`` records which position each
slot holds (``-1`` while empty). A write costs O(new tokens) whatever the window; attention of a
new chunk reads the ring as it was *before* the write plus the chunk's own keys, so every query
sees exactly the previous ``W`` positions even when the chunk is longer than ``W`` or wraps the
ring.

Every row has its own fill length (``lengths: [batch]``), so a batch may hold sequences of
different lengths; ``TransformerMetadata`` says how many of the ``T`` new tokens of each row are
real and on which side the padding is.

Capacity: a row may hold at most ``max_length`` tokens in its life (with a window too, where it
bounds the positions). A write that would pass it writes *nothing* for that row and flags it:
called eagerly, ``concatenate_to_cache`` raises ``CacheOverflowError``; under ``jax.jit`` it cannot
raise, so the returned view's ``overflow: [batch]`` flag turns (and stays) ``True`` for that row --
check it with ``TransformerCache.check_overflow`` (or ``overflow_rows``) after the step.

Quantised storage: with ``kv_quantization`` set to ``"int8"``, ``"int4"`` or ``"fp8"`` (see
``jaxkv.quantization``) the views hold the codec's words plus ``key_scales``/``value_scales``;
each token is quantised as it is written and attention dequantises block by block.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv import _validation as v
from jaxkv import quantization
from jaxkv.abstracts import (
    BaseCache,
    BaseCacheMetadata,
    BaseCacheView,
    pytree_dataclass,
    static_field,
)
from jaxkv.caches import storage
from jaxkv.caches.rows import RaggedRows, row_mask, token_layout
from jaxkv.errors import CacheOverflowError
from jaxkv.ops.attention import CachedKV, KVSegment


@pytree_dataclass
class TransformerCacheMetadata(BaseCacheMetadata):
    """Static configuration of a contiguous or sliding-window KV cache.

    Attributes:
        batch_size: rows of the cache.
        max_length: most tokens one row holds over its life.
        num_layers: layers (views) in the cache.
        key_heads, value_heads: KV heads for keys and for values.
        key_dim, value_dim: head dimension of keys and of values.
        sliding_window: ``None`` for a full cache, else the ring size ``W`` (slots per row are
            ``min(W, max_length)``).
        dtype: storage dtype of keys and values (float32, bfloat16 or float16); with a codec,
            the dtype ``key_states()``/``value_states()`` return.
        kv_quantization: storage codec, one of ``jaxkv.quantization.CODECS`` (``"none"``:
            plain ``dtype`` floats).
        quantization_group_size: int4 only: channels per scale (must divide ``key_dim`` and
            ``value_dim``); ``None`` for the other codecs.
    """

    batch_size: int
    max_length: int
    num_layers: int
    key_heads: int
    value_heads: int
    key_dim: int
    value_dim: int
    sliding_window: int | None = None
    dtype: np.dtype = np.dtype(np.float32)
    kv_quantization: str = "none"
    quantization_group_size: int | None = None

    @classmethod
    def create(
        cls,
        batch_size: int,
        max_length: int,
        num_layers: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        key_heads: int | None = None,
        value_heads: int | None = None,
        key_dim: int | None = None,
        value_dim: int | None = None,
        sliding_window: int | None = None,
        dtype: Any = jnp.float32,
        kv_quantization: str = "none",
        quantization_group_size: int | None = None,
    ) -> TransformerCacheMetadata:
        """Validated metadata.

        Give ``num_kv_heads``/``head_dim`` for the usual case, or ``key_heads``/``value_heads`` and
        ``key_dim``/``value_dim`` when keys and values differ. ``kv_quantization`` picks the
        storage codec (``"none"``, ``"int8"``, ``"int4"``, ``"fp8"``); int4's
        ``quantization_group_size`` defaults to ``min(64, key_dim, value_dim)``. Raises
        ``ValueError``/``TypeError`` naming the field on bad input.
        """
        owner = "TransformerCacheMetadata.create"
        key_heads = _pick(owner, "key_heads", key_heads, "num_kv_heads", num_kv_heads)
        value_heads = _pick(owner, "value_heads", value_heads, "num_kv_heads", num_kv_heads)
        key_dim = _pick(owner, "key_dim", key_dim, "head_dim", head_dim)
        value_dim = _pick(owner, "value_dim", value_dim, "head_dim", head_dim)
        return cls(
            batch_size=batch_size,
            max_length=max_length,
            num_layers=num_layers,
            key_heads=key_heads,
            value_heads=value_heads,
            key_dim=key_dim,
            value_dim=value_dim,
            sliding_window=sliding_window,
            dtype=v.require_float_dtype(owner, "dtype", dtype),
            kv_quantization=kv_quantization,
            quantization_group_size=quantization_group_size,
        )

    def validate(self) -> None:
        owner = type(self).__name__
        for name in (
            "batch_size",
            "max_length",
            "num_layers",
            "key_heads",
            "value_heads",
            "key_dim",
            "value_dim",
        ):
            v.require_int(owner, name, getattr(self, name), minimum=1)
        v.require_optional_int(owner, "sliding_window", self.sliding_window, minimum=1)
        if not isinstance(self.dtype, np.dtype):
            raise TypeError(f"{owner}: dtype must be a numpy dtype, got {self.dtype!r}")
        v.require_float_dtype(owner, "dtype", self.dtype)
        group_size = quantization.resolve_group_size(
            owner,
            self.kv_quantization,
            self.quantization_group_size,
            (("key_dim", self.key_dim), ("value_dim", self.value_dim)),
        )
        if group_size != self.quantization_group_size:
            # int4's default group size, fixed here so that it is part of the (static) metadata.
            object.__setattr__(self, "quantization_group_size", group_size)

    @property
    def codec(self) -> quantization.KVCodec | None:
        """The storage codec, or ``None`` when unquantised."""
        return quantization.make_codec(self.kv_quantization, self.quantization_group_size)

    @property
    def num_slots(self) -> int:
        """Slots stored per row: ``max_length``, or the window when it is smaller."""
        if self.sliding_window is None:
            return self.max_length
        return min(self.sliding_window, self.max_length)

    @property
    def is_ring(self) -> bool:
        """Whether rows are rings (a window smaller than ``max_length``)."""
        return self.sliding_window is not None and self.sliding_window < self.max_length

    def bytes_per_token(self) -> int:
        """Bytes of keys and values one token occupies across all layers (scales included)."""
        codec = self.codec
        per_layer = self.key_heads * quantization.bytes_per_head(
            codec, self.key_dim, self.dtype
        ) + self.value_heads * quantization.bytes_per_head(codec, self.value_dim, self.dtype)
        return self.num_layers * per_layer

    def bytes_total(self) -> int:
        """Bytes the whole cache allocates (keys, values and bookkeeping)."""
        per_row = self.num_slots * self.bytes_per_token()
        bookkeeping = self.num_layers * (4 + 1 + (4 * self.num_slots if self.is_ring else 0))
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
class TransformerMetadata(RaggedRows):
    """Runtime metadata of one write into a ``TransformerCache``: which of the ``T`` tokens of
    each row are real (see ``jaxkv.caches.rows.RaggedRows``)."""


@pytree_dataclass
class TransformerCacheView(BaseCacheView):
    """One layer of a contiguous or sliding-window cache.

    Attributes:
        keys: ``[batch, slots, key_heads, key_dim]`` in ``metadata.dtype``, 16-bit floats held as
            ``uint16`` words (see ``jaxkv.caches.storage``; ``key_states()`` gives the floats).
            With a codec: its words, ``[batch, slots, key_heads, codec.stored_dim(key_dim)]``.
        values: ``[batch, slots, value_heads, value_dim]``, likewise.
        lengths: ``[batch]`` int32, tokens written so far per row (the next position).
        positions: ``[batch, slots]`` int32 position held by each ring slot (``-1`` empty); ``None``
            for a full cache, where slot ``s`` holds position ``s``.
        overflow: ``[batch]`` bool, sticky: a write to this row did not fit and was dropped.
        metadata: the cache's ``TransformerCacheMetadata`` (static).
        layer_index: which layer this view belongs to (static).
        key_scales: with a codec, ``[batch, slots, key_heads, groups]`` uint16 (float16 bits),
            one scale per token per head (per channel group for int4); ``None`` unquantised.
        value_scales: ``[batch, slots, value_heads, groups]``, likewise.
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
        codec = m.codec
        keys, key_scales = storage.allocate(
            (m.batch_size, slots, m.key_heads), m.key_dim, m.dtype, codec
        )
        values, value_scales = storage.allocate(
            (m.batch_size, slots, m.value_heads), m.value_dim, m.dtype, codec
        )
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
        )

    def key_states(self) -> jax.Array:
        """``[batch, slots, key_heads, key_dim]`` keys as ``metadata.dtype`` floats (a quantised
        cache is dequantised whole: for inspection, attention reads it block by block)."""
        m = self.metadata
        return storage.decode_values(self.keys, self.key_scales, m.dtype, m.codec)

    def value_states(self) -> jax.Array:
        """``[batch, slots, value_heads, value_dim]`` values as ``metadata.dtype`` floats."""
        m = self.metadata
        return storage.decode_values(self.values, self.value_scales, m.dtype, m.codec)

    def query_positions(self, runtime: TransformerMetadata | None, new_tokens: int) -> jax.Array:
        """``[batch, new_tokens]`` int32 absolute positions the next write will give its tokens
        (``-1`` for padding): what a model needs for RoPE before it writes."""
        return token_layout(self.lengths, runtime, new_tokens)[1]

    def concatenate_to_cache(
        self,
        key: jax.Array,
        value: jax.Array,
        runtime: TransformerMetadata | None = None,
    ) -> tuple[CachedKV, TransformerCacheView]:
        """Write ``T`` new tokens per row at each row's own position.

        Args:
            key: ``[batch, T, key_heads, key_dim]``, any float dtype (cast to ``metadata.dtype``,
                or quantised token by token with the metadata's codec).
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
        owner = f"TransformerCacheView.concatenate_to_cache (layer {self.layer_index})"
        v.check_array(owner, "key", key, (m.batch_size, None, m.key_heads, m.key_dim))
        new_tokens = key.shape[1]
        v.check_array(owner, "value", value, (m.batch_size, new_tokens, m.value_heads, m.value_dim))
        for name, array in (("key", key), ("value", value)):
            if not jnp.issubdtype(array.dtype, jnp.floating):
                raise TypeError(f"{owner}: {name} must be a float array, got {array.dtype}")
        if new_tokens < 1:
            raise ValueError(f"{owner}: key must hold at least one new token, got T={new_tokens}")
        if runtime is not None and not isinstance(runtime, TransformerMetadata):
            raise TypeError(
                f"{owner}: runtime must be TransformerMetadata, got {type(runtime).__name__}"
            )
        if runtime is not None and runtime.new_lengths is not None:
            v.check_array(owner, "runtime.new_lengths", runtime.new_lengths, (m.batch_size,))
            if not v.is_traced(runtime.new_lengths):
                counts = np.asarray(runtime.new_lengths)
                if counts.min() < 0 or counts.max() > new_tokens:
                    raise ValueError(
                        f"{owner}: runtime.new_lengths must lie in [0, {new_tokens}], got {counts}"
                    )

        codec = m.codec
        key, key_scale = storage.encode_values(key, m.dtype, codec)
        value, value_scale = storage.encode_values(value, m.dtype, codec)
        stored_as = None if codec is not None else storage.stored_as(m.dtype)

        def segment(keys, values, positions, live, key_scales, value_scales):
            return KVSegment(
                keys, values, positions, live, stored_as, key_scales, value_scales, codec
            )

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
        new_view = dataclasses.replace(
            self,
            keys=keys,
            values=values,
            lengths=new_lengths,
            positions=slot_positions,
            overflow=self.overflow | overflow,
            key_scales=key_scales,
            value_scales=value_scales,
        )
        return kv, new_view

    def truncate(self, lengths: Any) -> TransformerCacheView:
        """A view whose rows keep only their first ``lengths[b]`` tokens (``lengths: [batch]``,
        each at most the row's current length), e.g. to roll a conversation back to the longest
        prefix it shares with a new prompt. Not possible on a ring, whose old slots are gone."""
        owner = "TransformerCacheView.truncate"
        if self.metadata.is_ring:
            raise ValueError(f"{owner}: a sliding-window ring cannot be truncated")
        lengths = jnp.asarray(lengths, jnp.int32)
        v.check_array(owner, "lengths", lengths, (self.metadata.batch_size,))
        if not v.is_traced(lengths, self.lengths):
            current = np.asarray(self.lengths)
            wanted = np.asarray(lengths)
            if (wanted < 0).any() or (wanted > current).any():
                raise ValueError(
                    f"{owner}: lengths must lie in [0, current lengths {current.tolist()}], "
                    f"got {wanted.tolist()}"
                )
        return dataclasses.replace(self, lengths=jnp.minimum(lengths, self.lengths))

    def reset_rows(self, rows: Any) -> TransformerCacheView:
        """A view whose selected rows are empty again (length 0, overflow cleared), so a batch
        slot can take a new sequence. ``rows``: ``[batch]`` bool mask or a sequence of row ids."""
        mask = row_mask("TransformerCacheView.reset_rows", rows, self.metadata.batch_size)
        positions = self.positions
        if positions is not None:
            positions = jnp.where(mask[:, None], -1, positions)
        return dataclasses.replace(
            self,
            lengths=jnp.where(mask, 0, self.lengths),
            positions=positions,
            overflow=self.overflow & ~mask,
        )


@pytree_dataclass
class TransformerCache(BaseCache):
    """A contiguous or sliding-window KV cache: one ``TransformerCacheView`` per layer."""

    views: tuple[TransformerCacheView | None, ...]

    @classmethod
    def init_cache(
        cls, metadata: TransformerCacheMetadata, *, layers: Any = None
    ) -> TransformerCache:
        """A cache with an empty view for every layer (or only for the layer ids in ``layers``;
        the others are ``None``)."""
        if not isinstance(metadata, TransformerCacheMetadata):
            raise TypeError(
                f"TransformerCache.init_cache: metadata must be TransformerCacheMetadata, "
                f"got {type(metadata).__name__}"
            )
        wanted = v.require_layers("TransformerCache.init_cache", layers, metadata.num_layers)
        return cls(
            views=tuple(
                TransformerCacheView.init(metadata, i) if i in wanted else None
                for i in range(metadata.num_layers)
            )
        )

    @classmethod
    def init_empty(cls, num_layers: int) -> TransformerCache:
        """A cache of ``num_layers`` ``None`` views."""
        v.require_int("TransformerCache.init_empty", "num_layers", num_layers, minimum=1)
        return cls(views=(None,) * num_layers)

    def _live_views(self) -> list[TransformerCacheView]:
        return [view for view in self.views if view is not None]

    def reset_rows(self, rows: Any) -> TransformerCache:
        """Empty the selected rows in every layer (see ``TransformerCacheView.reset_rows``)."""
        return self.with_views(
            view if view is None else view.reset_rows(rows) for view in self.views
        )

    def truncate(self, lengths: Any) -> TransformerCache:
        """Keep only the first ``lengths[b]`` tokens of each row in every layer."""
        return self.with_views(
            view if view is None else view.truncate(lengths) for view in self.views
        )

    def overflow_rows(self) -> jax.Array:
        """``[batch]`` bool: rows where some write did not fit (any layer)."""
        flags = [view.overflow for view in self._live_views()]
        if not flags:
            raise ValueError("TransformerCache.overflow_rows: the cache has no initialised views")
        return jnp.any(jnp.stack(flags), axis=0)

    def check_overflow(self) -> None:
        """Raise ``CacheOverflowError`` if any row overflowed (call after a jitted step)."""
        rows = np.flatnonzero(np.asarray(self.overflow_rows())).tolist()
        if rows:
            view = self._live_views()[0]
            raise CacheOverflowError(
                f"rows {rows} overflowed max_length={view.metadata.max_length}: their last write "
                f"was dropped (cached tokens are intact)"
            )
