"""Causal attention of new queries over what a cache holds, read block by block.

A cache's ``concatenate_to_cache`` returns a ``CachedKV``: one or more ``KVSegment``\\ s (runs of
key/value slots with their absolute positions) plus the positions of the new queries. ``attention``
scans each segment in blocks of ``block_size`` slots with an online (streaming) softmax, and the
number of blocks is a *dynamic* loop trip count taken from the live length, so a decode step costs
what the live context costs, not what the cache capacity costs.

Masking is by absolute position: a query at position ``q`` sees a key at position ``k`` when
``0 <= k <= q`` and, with a sliding window ``W``, ``q - k < W``. Slots with position ``-1`` are
empty; queries with position ``-1`` are padding and produce zeros.

Quantised caches (``jaxkv.quantization``) hand over their stored words with per-token scales;
each block is dequantised to float32 as it is read, so no full-precision copy of the cache is
ever made.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxkv import quantization
from jaxkv.abstracts import pytree_dataclass, static_field

if TYPE_CHECKING:
    from jaxkv.ops.paged_attention import PagedKV

DEFAULT_BLOCK_SIZE = 256


@pytree_dataclass
class KVSegment:
    """A run of key/value slots that attention reads.

    Attributes:
        keys: ``[batch, slots, key_heads, key_dim]`` (with a codec: the stored words,
            ``[batch, slots, key_heads, codec.stored_dim(key_dim)]``).
        values: ``[batch, slots, value_heads, value_dim]``, likewise.
        positions: ``[batch, slots]`` int32 absolute position of each slot, ``-1`` when empty; or
            ``None``, meaning slot ``s`` holds position ``s`` (a contiguous cache).
        live: ``[batch]`` int32; only slots ``[0, live)`` can hold keys. Attention scans
            ``ceil(max(live) / block_size)`` blocks.
        stored_as: the float dtype ``keys``/``values`` hold as raw bits (static), or ``None``
            when they are plain float arrays. Caches keep 16-bit floats as ``uint16`` words so
            that XLA's CPU backend updates them in place; blocks are bit-cast back when read.
        key_scales: ``[batch, slots, key_heads, groups]`` uint16 (float16 bits) with a codec,
            else ``None``.
        value_scales: ``[batch, slots, value_heads, groups]`` likewise.
        codec: the ``jaxkv.quantization.KVCodec`` the words are in (static), or ``None``.
    """

    keys: jax.Array
    values: jax.Array
    positions: jax.Array | None
    live: jax.Array
    stored_as: np.dtype | None = static_field(None)
    key_scales: jax.Array | None = None
    value_scales: jax.Array | None = None
    codec: quantization.KVCodec | None = static_field(None)

    @property
    def key_dim(self) -> int:
        """Channels per key head (not stored words)."""
        return quantization.head_dim_of(self.keys, self.codec)

    @property
    def value_dim(self) -> int:
        """Channels per value head."""
        return quantization.head_dim_of(self.values, self.codec)


@pytree_dataclass
class CachedKV:
    """What attention needs from a cache after a write (returned by ``concatenate_to_cache``).

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


def _combine_windows(first: int | None, second: int | None) -> int | None:
    if first is None:
        return second
    if second is None:
        return first
    return min(first, second)


def attention(
    query: jax.Array,
    kv: CachedKV | PagedKV,
    *,
    scale: float | None = None,
    logit_soft_cap: float | None = None,
    sliding_window: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> jax.Array:
    """Causal grouped-query attention of ``query`` over a cache's ``CachedKV``.

    A ``PagedKV`` (from a paged cache) is handed to ``jaxkv.ops.paged_attention.paged_attention``
    with the same options (``block_size`` rounded down to whole pages), so a model calls
    ``attention(query, kv)`` whatever its cache; the query is then the packed
    ``[num_tokens, query_heads, key_dim]`` and so is the result.

    Args:
        query: ``[batch, new_tokens, query_heads, key_dim]``; ``query_heads`` must be a multiple of
            the key heads and of the value heads.
        kv: the ``CachedKV`` returned by the cache's ``concatenate_to_cache``.
        scale: multiplier of the logits; default ``key_dim ** -0.5``.
        logit_soft_cap: if set, logits become ``cap * tanh(logits / cap)``.
        sliding_window: an extra window on top of the cache's own (the smaller wins).
        block_size: key slots read per loop step.

    Returns:
        ``[batch, new_tokens, query_heads, value_dim]`` in ``query.dtype``; softmax and
        accumulation run in float32 whatever the storage dtype. Padding queries give zeros.
    """
    from jaxkv.ops.paged_attention import PagedKV, paged_attention

    if isinstance(kv, PagedKV):
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"attention: block_size must be a positive int, got {block_size!r}")
        return paged_attention(
            query,
            kv,
            scale=scale,
            logit_soft_cap=logit_soft_cap,
            sliding_window=sliding_window,
            pages_per_block=max(1, block_size // kv.page_size),
        )
    if query.ndim != 4:
        raise ValueError(
            f"attention: query must be [batch, new_tokens, query_heads, key_dim], "
            f"got shape {query.shape}"
        )
    if not kv.segments:
        raise ValueError("attention: kv has no segments to attend over")
    for segment in kv.segments:
        has_scales = (segment.key_scales is not None, segment.value_scales is not None)
        if has_scales != ((segment.codec is not None),) * 2:
            raise ValueError(
                f"attention: a KVSegment's key_scales and value_scales must be given exactly "
                f"when its codec is set; got codec={segment.codec!r} with scales present="
                f"{has_scales}"
            )
    batch, new_tokens, query_heads, key_dim = query.shape
    first = kv.segments[0]
    codec = first.codec
    if any(segment.codec != codec for segment in kv.segments):
        codecs = [segment.codec for segment in kv.segments]
        raise ValueError(f"attention: every KVSegment must share one codec, got {codecs}")
    key_heads, value_heads = first.keys.shape[2], first.values.shape[2]
    value_dim = first.value_dim
    if first.key_dim != key_dim:
        raise ValueError(
            f"attention: query key_dim {key_dim} does not match the cache's key_dim {first.key_dim}"
        )
    if query_heads % key_heads or query_heads % value_heads:
        raise ValueError(
            f"attention: query_heads={query_heads} must be a multiple of key_heads={key_heads} "
            f"and value_heads={value_heads}"
        )
    if kv.query_positions.shape != (batch, new_tokens):
        raise ValueError(
            f"attention: query is [batch={batch}, new_tokens={new_tokens}, ...] but the cache "
            f"wrote positions of shape {kv.query_positions.shape}"
        )
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"attention: block_size must be a positive int, got {block_size!r}")
    if logit_soft_cap is not None and not logit_soft_cap > 0:
        raise ValueError(f"attention: logit_soft_cap must be > 0, got {logit_soft_cap!r}")
    window = _combine_windows(kv.sliding_window, sliding_window)
    if scale is None:
        scale = 1.0 / math.sqrt(key_dim)

    # When key and value head counts differ, attend per query head (groups of one).
    grouped = key_heads == value_heads
    heads = key_heads if grouped else query_heads
    groups = query_heads // heads
    # A rotating codec stores keys and values rotated; rotate the queries to match, and the
    # output back at the end (see jaxkv.quantization).
    q = quantization.to_attention_basis(query.astype(jnp.float32), codec) * scale
    q = q.reshape(batch, new_tokens, heads, groups, key_dim)

    state = init_softmax_state(batch, heads, groups, new_tokens, value_dim)
    for segment in kv.segments:
        state = _scan_segment(
            q,
            kv.query_positions,
            segment,
            state,
            heads=heads,
            window=window,
            soft_cap=logit_soft_cap,
            block_size=block_size,
        )
    out = quantization.from_attention_basis(finish_softmax(state, new_tokens), codec)
    return out.astype(query.dtype)


SoftmaxState = tuple[jax.Array, jax.Array, jax.Array]
"""Online-softmax carry: running max and denominator, float32, and the unnormalised output,
float32 with a trailing ``value_dim``. Their query axes are ``[batch, heads, new_tokens, groups]``
when there are several new tokens (prefill) and ``[batch, heads, groups, 1]`` for one (decode):
XLA's CPU backend runs each kind of step fastest in its own order (prefill attention about a third
faster tokens-first; batch-8 decode with 4 groups of 128-dim heads about a quarter faster
groups-first). ``init_softmax_state`` / ``finish_softmax`` pick and undo the order."""


def _token_major(new_tokens: int) -> bool:
    return new_tokens > 1


def init_softmax_state(
    batch: int, heads: int, groups: int, new_tokens: int, value_dim: int
) -> SoftmaxState:
    """The empty online-softmax carry (no key seen yet)."""
    if _token_major(new_tokens):
        axes = (batch, heads, new_tokens, groups)
    else:
        axes = (batch, heads, groups, new_tokens)
    return (
        jnp.full(axes, -jnp.inf, jnp.float32),
        jnp.zeros(axes, jnp.float32),
        jnp.zeros((*axes, value_dim), jnp.float32),
    )


def online_softmax_update(
    state: SoftmaxState,
    q: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    visible: jax.Array,
    *,
    soft_cap: float | None,
) -> SoftmaxState:
    """Fold one block of keys into the online-softmax carry.

    Args:
        state: the carry (see ``SoftmaxState``).
        q: ``[batch, new_tokens, heads, groups, key_dim]`` float32, already scaled.
        keys: ``[batch, slots, heads, key_dim]`` float32.
        values: ``[batch, slots, heads, value_dim]`` float32.
        visible: ``[batch, new_tokens, slots]`` bool, which keys each query may see.
        soft_cap: if set, logits become ``cap * tanh(logits / cap)``.
    """
    running_max, denominator, accumulator = state
    if _token_major(q.shape[1]):
        query_axes, visible = "tg", visible[:, None, :, None, :]
    else:
        query_axes, visible = "gt", visible[:, None, None, :, :]
    # Slots no query may see can hold stale or uninitialised data; zero them so that even a NaN
    # there cannot reach the output through 0 * NaN.
    slot_used = jnp.any(visible, axis=(1, 2, 3))[:, :, None, None]
    values = jnp.where(slot_used, values, 0.0)
    logits = jnp.einsum(f"bthgd,bshd->bh{query_axes}s", q, keys)
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    logits = jnp.where(visible, logits, -jnp.inf)
    new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
    # A query that has seen no visible key yet keeps max -inf; use 0 so exp() stays finite.
    safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
    probs = jnp.exp(logits - safe_max[..., None])
    correction = jnp.exp(running_max - safe_max)
    denominator = denominator * correction + jnp.sum(probs, axis=-1)
    weighted = jnp.einsum(f"bh{query_axes}s,bshd->bh{query_axes}d", probs, values)
    accumulator = accumulator * correction[..., None] + weighted
    return new_max, denominator, accumulator


def finish_softmax(state: SoftmaxState, new_tokens: int) -> jax.Array:
    """Normalise the carry of ``new_tokens`` queries: ``[batch, new_tokens, heads * groups,
    value_dim]`` float32; queries that saw no key (padding) give zeros."""
    _, denominator, accumulator = state
    out = accumulator / jnp.where(denominator > 0, denominator, 1.0)[..., None]
    if _token_major(new_tokens):
        batch, heads, _, groups, value_dim = out.shape
        out = out.transpose(0, 2, 1, 3, 4)
    else:
        batch, heads, groups, _, value_dim = out.shape
        out = out.transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, new_tokens, heads * groups, value_dim)


def _expand_heads(block: jax.Array, heads: int) -> jax.Array:
    """``[batch, slots, h, dim]`` -> ``[batch, slots, heads, dim]`` by repeating each head."""
    if block.shape[2] == heads:
        return block
    return jnp.repeat(block, heads // block.shape[2], axis=2)


def two_block_size(block_size: int, length: int) -> int:
    """The block actually scanned over ``length`` slots (or pages): ``block_size``, but at most
    half of ``length`` (rounded up) so that a loop always has room for two blocks.

    With a single block covering everything, the block's start is loop-invariant and XLA hoists
    the reads out of the loop: the contiguous step gets slower (about twice the attention time of
    a batch-8 decode at 256 slots), and in a paged step the hoisted page gather fuses with the
    step's write into the pool, forcing a copy of the whole pool.
    """
    return min(block_size, max(1, -(-length // 2)))


def _scan_segment(q, query_positions, segment, state, *, heads, window, soft_cap, block_size):
    """Online-softmax pass over the live blocks of one segment.

    q: ``[batch, new_tokens, heads, groups, key_dim]`` float32, pre-scaled.
    state: the online-softmax carry (see ``SoftmaxState``).
    """
    slots = segment.keys.shape[1]
    block = two_block_size(block_size, slots)
    live = jnp.minimum(jnp.max(segment.live), slots)
    num_blocks = (live + block - 1) // block
    offsets = jnp.arange(block, dtype=jnp.int32)
    query_pos = query_positions[:, :, None]  # [batch, new_tokens, 1]

    def read(words, scales, start):
        """Slots ``[start, start + block)`` as float32 ``[batch, block, heads, dim]``."""
        words = _expand_heads(lax.dynamic_slice_in_dim(words, start, block, axis=1), heads)
        if scales is not None:
            scales = _expand_heads(lax.dynamic_slice_in_dim(scales, start, block, axis=1), heads)
        return quantization.read_block(words, scales, segment.codec, segment.stored_as)

    def body(index, carry):
        nominal_start = index * block
        # The last block may be shifted left to stay in bounds; slots it re-reads are masked.
        start = jnp.minimum(nominal_start, slots - block)
        keys = read(segment.keys, segment.key_scales, start)
        values = read(segment.values, segment.value_scales, start)
        slot_ids = start + offsets  # [block]
        if segment.positions is None:
            key_pos = jnp.broadcast_to(slot_ids, (keys.shape[0], block))
        else:
            key_pos = lax.dynamic_slice_in_dim(segment.positions, start, block, axis=1)
        valid = (slot_ids >= nominal_start)[None, :] & (slot_ids[None, :] < segment.live[:, None])
        valid &= key_pos >= 0
        key_pos = key_pos[:, None, :]  # [batch, 1, block]
        visible = valid[:, None, :] & (key_pos <= query_pos) & (query_pos >= 0)
        if window is not None:
            visible &= query_pos - key_pos < window
        return online_softmax_update(carry, q, keys, values, visible, soft_cap=soft_cap)

    return lax.fori_loop(0, num_blocks, body, state)
