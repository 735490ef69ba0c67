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

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxkv.kv import CachedKV, KVSegment, PagedKV, check_scales
from jaxkv.ops.paged_attention import paged_attention
from jaxkv.ops.softmax import (
    DECODE_BLOCK_SIZE,
    DEFAULT_BLOCK_SIZE,
    check_options,
    combine_windows,
    default_block_size,
    finish_softmax,
    init_softmax_state,
    online_softmax_update,
    two_block_size,
)

__all__ = [
    "DECODE_BLOCK_SIZE",
    "DEFAULT_BLOCK_SIZE",
    "CachedKV",
    "KVSegment",
    "attention",
    "two_block_size",
]


def attention(
    query: jax.Array,
    kv: CachedKV | PagedKV,
    *,
    scale: float | None = None,
    logit_soft_cap: float | None = None,
    sliding_window: int | None = None,
    block_size: int | None = None,
) -> jax.Array:
    """Causal grouped-query attention of ``query`` over a cache's ``CachedKV``.

    A ``PagedKV`` (from a paged cache) is handed to ``jaxkv.ops.paged_attention.paged_attention``
    with the same options (a given ``block_size`` rounded down to whole pages), so a model calls
    ``attention(query, kv)`` whatever its cache; the query is then the packed
    ``[num_tokens, query_heads, key_dim]`` and so is the result.

    Args:
        query: ``[batch, new_tokens, query_heads, key_dim]``; ``query_heads`` must be a multiple of
            the key heads and of the value heads.
        kv: the ``CachedKV`` returned by the cache's ``concatenate_to_cache``.
        scale: multiplier of the logits; default ``key_dim ** -0.5``.
        logit_soft_cap: if set, logits become ``cap * tanh(logits / cap)``.
        sliding_window: an extra window on top of the cache's own (the smaller wins).
        block_size: key slots read per loop step; default ``DECODE_BLOCK_SIZE`` when there is
            one new token per row, else ``DEFAULT_BLOCK_SIZE`` (``default_block_size``).

    Returns:
        ``[batch, new_tokens, query_heads, value_dim]`` in ``query.dtype``; softmax and
        accumulation run in float32 whatever the storage dtype. Padding queries give zeros.
    """
    check_options(
        "attention",
        scale=scale,
        logit_soft_cap=logit_soft_cap,
        sliding_window=sliding_window,
        block=("block_size", block_size),
    )
    if isinstance(kv, PagedKV):
        return paged_attention(
            query,
            kv,
            scale=scale,
            logit_soft_cap=logit_soft_cap,
            sliding_window=sliding_window,
            pages_per_block=None if block_size is None else max(1, block_size // kv.page_size),
        )
    if not hasattr(query, "ndim") or not jnp.issubdtype(query.dtype, jnp.floating):
        raise TypeError(f"attention: query must be a float array, got {query!r:.80}")
    if query.ndim != 4:
        raise ValueError(
            f"attention: query must be [batch, new_tokens, query_heads, key_dim], "
            f"got shape {query.shape}"
        )
    if not kv.segments:
        raise ValueError("attention: kv has no segments to attend over")
    for segment in kv.segments:
        check_scales(
            "attention",
            ("a KVSegment's key_scales", "value_scales"),
            segment.codec,
            segment.key_scales,
            segment.value_scales,
        )
    batch, new_tokens, query_heads, key_dim = query.shape
    first = kv.segments[0]
    codec = first.storage
    if any(segment.storage != codec for segment in kv.segments):
        codecs = [segment.storage for segment in kv.segments]
        raise ValueError(f"attention: every KVSegment must share one codec, got {codecs}")
    key_heads, value_heads = first.keys.shape[2], first.values.shape[2]
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
    window = combine_windows(kv.sliding_window, sliding_window)
    if scale is None:
        scale = 1.0 / math.sqrt(key_dim)
    if block_size is None:
        block_size = default_block_size(new_tokens)
    return _attend(
        query,
        kv,
        scale=float(scale),
        soft_cap=logit_soft_cap,
        window=window,
        block_size=block_size,
    )


@functools.partial(jax.jit, static_argnames=("scale", "soft_cap", "window", "block_size"))
def _attend(query, kv, *, scale, soft_cap, window, block_size):
    """The kernel behind ``attention``, on checked inputs. Jitted on its own so that the layers
    of a model, which call it with the same shapes and options, trace it once per step shape
    instead of once per layer (the step is traced and lowered that much sooner; XLA inlines the
    call, so the compiled step is the same)."""
    batch, new_tokens, query_heads, key_dim = query.shape
    first = kv.segments[0]
    codec = first.storage
    key_heads, value_heads = first.keys.shape[2], first.values.shape[2]
    value_dim = first.value_dim

    # When key and value head counts differ, attend per query head (groups of one).
    grouped = key_heads == value_heads
    heads = key_heads if grouped else query_heads
    groups = query_heads // heads
    # A rotating codec stores keys and values rotated; rotate the queries to match, and the
    # output back at the end (see jaxkv.quantization).
    q = codec.to_attention_basis(query.astype(jnp.float32)) * scale
    q = q.reshape(batch, new_tokens, heads, groups, key_dim)

    state = init_softmax_state(batch, heads, groups, new_tokens, value_dim)
    for segment in kv.segments:
        state = _scan_segment(
            q,
            kv.query_positions,
            segment,
            codec,
            state,
            heads=heads,
            window=window,
            soft_cap=soft_cap,
            block_size=block_size,
        )
    out = codec.from_attention_basis(finish_softmax(state, new_tokens))
    return out.astype(query.dtype)


def _expand_heads(block: jax.Array, heads: int) -> jax.Array:
    """``[batch, slots, h, dim]`` -> ``[batch, slots, heads, dim]`` by repeating each head."""
    if block.shape[2] == heads:
        return block
    return jnp.repeat(block, heads // block.shape[2], axis=2)


QUERY_TILE = 256
"""Queries attended together in a long prefill: each tile of them reads only the key blocks at or
before its last position (and, with a window, after its first position's window start), so a
causal prefill skips the blocks above the diagonal, about half the work."""


def _scan_segment(
    q, query_positions, segment, codec, state, *, heads, window, soft_cap, block_size
):
    """Online-softmax pass over the live blocks of one segment.

    q: ``[batch, new_tokens, heads, groups, key_dim]`` float32, pre-scaled.
    state: the online-softmax carry (see ``SoftmaxState``).
    """
    slots = segment.keys.shape[1]
    block = two_block_size(block_size, slots)
    live = jnp.minimum(jnp.max(segment.live), slots)
    num_blocks = (live + block - 1) // block
    scan = functools.partial(
        _scan_blocks,
        segment=segment,
        codec=codec,
        heads=heads,
        window=window,
        soft_cap=soft_cap,
        block=block,
    )
    new_tokens = q.shape[1]
    if new_tokens <= QUERY_TILE or segment.positions is not None:
        # Short query runs, and rings (whose slots are not in position order), read every
        # live block.
        return scan(q, query_positions, state, 0, num_blocks)
    return _scan_tiles(q, query_positions, state, scan, num_blocks, block, window)


def _scan_tiles(q, query_positions, state, scan, num_blocks, block, window):
    """``scan`` over tiles of ``QUERY_TILE`` queries, each over the blocks its positions can see
    (slot ``i`` holds position ``i`` here)."""
    batch, new_tokens = query_positions.shape
    tile = QUERY_TILE
    tiles = -(-new_tokens // tile)
    pad = tiles * tile - new_tokens
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
        query_positions = jnp.pad(query_positions, ((0, 0), (0, pad)), constant_values=-1)
        state = _pad_state(state, pad)

    def split(x, axis):  # the token axis -> [tiles, ..., tile, ...]
        shape = (*x.shape[:axis], tiles, tile, *x.shape[axis + 1 :])
        return jnp.moveaxis(x.reshape(shape), axis, 0)

    def join(x, axis):
        x = jnp.moveaxis(x, 0, axis)
        return x.reshape(*x.shape[:axis], tiles * tile, *x.shape[axis + 2 :])

    def one(args):
        q_tile, positions, tile_state = args
        real = positions >= 0
        last = jnp.max(jnp.where(real, positions, -1))
        hi = jnp.minimum((last + block) // block, num_blocks)  # blocks holding slots <= last
        lo = 0
        if window is not None:
            first = jnp.min(jnp.where(real, positions, jnp.iinfo(jnp.int32).max))
            lo = jnp.clip((first - window + 1) // block, 0, hi)
        return scan(q_tile, positions, tile_state, lo, hi)

    token_axis = 2  # of the state arrays: [batch, heads, new_tokens, groups(, value_dim)]
    tiled_state = tuple(split(part, token_axis) for part in state)
    out = lax.map(one, (split(q, 1), split(query_positions, 1), tiled_state))
    out = tuple(join(part, token_axis) for part in out)
    if pad:
        out = tuple(part[:, :, :new_tokens] for part in out)
    return out


def _pad_state(state, pad):
    """The carry with ``pad`` more (empty) queries on its token axis."""
    running_max, denominator, accumulator = state
    widths = [(0, 0)] * running_max.ndim
    widths[2] = (0, pad)
    return (
        jnp.pad(running_max, widths, constant_values=-jnp.inf),
        jnp.pad(denominator, widths),
        jnp.pad(accumulator, [*widths, (0, 0)]),
    )


def _scan_blocks(
    q,
    query_positions,
    state,
    first_block,
    end_block,
    *,
    segment,
    codec,
    heads,
    window,
    soft_cap,
    block,
):
    """Fold blocks ``[first_block, end_block)`` of one segment into the carry."""
    slots = segment.keys.shape[1]
    offsets = jnp.arange(block, dtype=jnp.int32)
    query_pos = query_positions[:, :, None]  # [batch, new_tokens, 1]

    def read(words, scales, start):
        """Slots ``[start, start + block)`` as float32 ``[batch, block, heads, dim]`` channel
        runs (``codec.decode_parts``)."""
        words = _expand_heads(lax.dynamic_slice_in_dim(words, start, block, axis=1), heads)
        if scales is not None:
            scales = _expand_heads(lax.dynamic_slice_in_dim(scales, start, block, axis=1), heads)
        return codec.decode_parts(words, scales)

    def body(index, carry):
        nominal_start = index * block
        # The last block may be shifted left to stay in bounds; slots it re-reads are masked.
        start = jnp.minimum(nominal_start, slots - block)
        keys = read(segment.keys, segment.key_scales, start)
        values = read(segment.values, segment.value_scales, start)
        slot_ids = start + offsets  # [block]
        if segment.positions is None:
            key_pos = jnp.broadcast_to(slot_ids, (segment.keys.shape[0], block))
        else:
            key_pos = lax.dynamic_slice_in_dim(segment.positions, start, block, axis=1)
        valid = (slot_ids >= nominal_start)[None, :] & (slot_ids[None, :] < segment.live[:, None])
        valid &= key_pos >= 0
        key_pos = key_pos[:, None, :]  # [batch, 1, block]
        visible = valid[:, None, :] & (key_pos <= query_pos) & (query_pos >= 0)
        if window is not None:
            visible &= query_pos - key_pos < window
        return online_softmax_update(carry, q_parts, keys, values, visible, soft_cap=soft_cap)

    q_parts = codec.split_query(q)
    return lax.fori_loop(first_block, end_block, body, state)
