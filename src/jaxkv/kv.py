"""What a cache hands to attention after a write: the boundary types between ``jaxkv.caches`` and
``jaxkv.ops``. No kernels live here, so caches and kernels both import this module and neither
imports the other.

* ``KVSegment`` -- a run of key/value slots (a contiguous row buffer, a ring, or a chunk's own
  keys) with the absolute position of each slot.
* ``CachedKV`` -- what a contiguous or ring cache returns: segments plus the new queries'
  positions and the write's overflow flags.
* ``PagedKV`` -- what a paged cache returns: one layer's page pools plus the step's page tables.

Keys and values travel as the cache stores them (its storage codec's words, and scales for a
quantising codec); the kernels decode each block as they read it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.abstracts import pytree_dataclass, static_field
from jaxkv.quantization import RawCodec, StorageCodec


def resolve_codec(words: jax.Array, codec: StorageCodec | None) -> StorageCodec:
    """``codec``, or for ``None`` the raw codec of plain float ``words`` (hand-built inputs).

    Raises:
        ValueError: ``codec`` is ``None`` but ``words`` are not floats (stored words need the
            codec that wrote them).
    """
    if codec is not None:
        return codec
    if not jnp.issubdtype(words.dtype, jnp.floating):
        raise ValueError(
            f"keys/values of dtype {np.dtype(words.dtype).name} are stored words: give the "
            f"storage codec that wrote them (codec=None means plain float arrays)"
        )
    return RawCodec(np.dtype(words.dtype))


def check_scales(
    owner: str,
    names: tuple[str, str],
    codec: StorageCodec | None,
    key_scales: object,
    value_scales: object,
) -> None:
    """Scales must come exactly with a quantising codec (``names``: how the message calls the
    two scale fields)."""
    has_scales = (key_scales is not None, value_scales is not None)
    wants = codec is not None and codec.has_scales
    if has_scales != (wants, wants):
        raise ValueError(
            f"{owner}: {names[0]} and {names[1]} must be given exactly when the codec keeps "
            f"scales (a quantising codec); got codec={codec!r} with scales present={has_scales}"
        )


class _StoredKV:
    """What ``KVSegment`` and ``PagedKV`` both answer about their stored keys and values."""

    codec: StorageCodec | None

    def _stored(self) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError

    @property
    def storage(self) -> StorageCodec:
        """The storage codec (``codec``, or the raw codec of plain float arrays)."""
        return resolve_codec(self._stored()[0], self.codec)

    @property
    def key_dim(self) -> int:
        """Channels per key head (not stored words)."""
        return self.storage.head_dim(self._stored()[0].shape[-1])

    @property
    def value_dim(self) -> int:
        """Channels per value head."""
        return self.storage.head_dim(self._stored()[1].shape[-1])


@pytree_dataclass
class KVSegment(_StoredKV):
    """A run of key/value slots that attention reads.

    Attributes:
        keys: ``[batch, slots, kv_heads, codec.stored_dim(head_dim)]`` stored words.
        values: ``[batch, slots, value_heads, codec.stored_dim(value_dim)]``, likewise.
        positions: ``[batch, slots]`` int32 absolute position of each slot, ``-1`` when empty; or
            ``None``, meaning slot ``s`` holds position ``s`` (a contiguous cache).
        live: ``[batch]`` int32; only slots ``[0, live)`` can hold keys. Attention scans
            ``ceil(max(live) / block_size)`` blocks.
        codec: the storage codec of ``keys``/``values`` (static); ``None`` means plain float
            arrays (a ``RawCodec`` of their dtype).
        key_scales: ``[batch, slots, kv_heads, groups]`` uint16 (float16 bits) with a quantising
            codec, else ``None``.
        value_scales: ``[batch, slots, value_heads, groups]`` likewise.
    """

    keys: jax.Array
    values: jax.Array
    positions: jax.Array | None
    live: jax.Array
    codec: StorageCodec | None = static_field(None)
    key_scales: jax.Array | None = None
    value_scales: jax.Array | None = None

    def _stored(self) -> tuple[jax.Array, jax.Array]:
        return self.keys, self.values


@pytree_dataclass
class CachedKV:
    """What attention needs from a contiguous or ring cache after a write.

    Attributes:
        segments: the key/value runs to attend over, in any order.
        query_positions: ``[batch, new_tokens]`` int32 absolute position of each new query,
            ``-1`` for padding.
        overflow: ``[batch]`` bool; ``True`` where the write did not fit the cache. That row's
            write was dropped (nothing cached was overwritten) and its outputs are meaningless.
        sliding_window: the cache's window (static), or ``None``.
    """

    segments: tuple[KVSegment, ...]
    query_positions: jax.Array
    overflow: jax.Array
    sliding_window: int | None = static_field(None)


@pytree_dataclass
class PagedKV(_StoredKV):
    """What paged attention reads after a paged cache's write.

    Attributes:
        key_pages: ``[num_pages, kv_heads, page_size, codec.stored_dim(head_dim)]`` pool of one
            layer, as stored (each page one contiguous run, heads first within it).
        value_pages: ``[num_pages, kv_heads, page_size, codec.stored_dim(value_dim)]``, likewise.
        page_tables: ``[batch, max_pages_per_seq]`` int32, each row's pages in position order,
            ``-1`` where unused.
        context_lens: ``[batch]`` int32, tokens in the pool per row after this step's writes
            (``0`` for unused rows).
        query_start_loc: ``[batch + 1]`` int32, where each row's new tokens start in the packed
            axis (non-decreasing; entries past the last real row repeat the token count).
        query_positions: ``[num_tokens]`` int32 absolute position of each packed query, ``-1``
            for padding.
        max_query_len: (static) bound on any row's new tokens; ``0`` = ``num_tokens``.
        prefill_rows: (static) ``0``, or how many leading rows may have more than one new token
            (the others have at most one).
        sliding_window: the cache's window (static), or ``None``.
        codec: the storage codec of the pools (static); ``None`` means plain float arrays.
        key_scales: ``[num_pages, kv_heads, page_size, groups]`` uint16 (float16 bits) with a
            quantising codec, else ``None``.
        value_scales: likewise for values.
    """

    key_pages: jax.Array
    value_pages: jax.Array
    page_tables: jax.Array
    context_lens: jax.Array
    query_start_loc: jax.Array
    query_positions: jax.Array
    max_query_len: int = static_field(0)
    prefill_rows: int = static_field(0)
    sliding_window: int | None = static_field(None)
    codec: StorageCodec | None = static_field(None)
    key_scales: jax.Array | None = None
    value_scales: jax.Array | None = None

    def _stored(self) -> tuple[jax.Array, jax.Array]:
        return self.key_pages, self.value_pages

    @property
    def page_size(self) -> int:
        """Tokens per page."""
        return self.key_pages.shape[2]
