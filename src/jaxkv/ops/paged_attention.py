"""Ragged attention over a paged KV pool: prefill chunks and decodes of many sequences in one call.

A paged cache keeps every layer's keys and values in a pool of pages,
``[num_pages, kv_heads, page_size, head_dim]``; a sequence's tokens live in the pages its row of
``page_tables`` lists, in position order. One step packs the new tokens of up to ``max_num_seqs``
sequences into one axis (``query_start_loc`` says where each sequence's run starts), so some
sequences prefill a chunk while others decode a single token.

``paged_attention`` lays the packed queries out per sequence, ``[max_num_seqs, max_query_len]``
(``max_query_len`` is a static bound on any sequence's new tokens: 1 in a pure decode step), then
scans blocks of ``pages_per_block`` pages with an online softmax, gathering each block of each
sequence's pages once, and scatters the outputs back to the packed order. The number of blocks
is a *dynamic* loop trip count, ``ceil(max(context_lens) / (pages_per_block * page_size))`` (with
a sliding window, blocks wholly before every query's window are skipped), so the cost follows
the live context, never ``max_pages_per_seq``. Each block reads
``[max_num_seqs, pages_per_block, kv_heads, page_size, head_dim]``: one read of the live keys per
sequence, whether it decodes one token or prefills a chunk. A decode step (one query per row)
attends each gathered page in place (``online_softmax_update_pages``); a step with longer query
runs lays each block out heads first once and attends it as one run of slots per head, the copy
paid for by all the block's queries.

Masking is by absolute position, as in ``jaxkv.ops.attention``: a query at position ``q`` of
sequence ``s`` sees the keys of ``s`` at positions ``k`` with ``k <= q``, ``k < context_lens[s]``
and, with a window ``W``, ``q - k < W``. Queries with position ``-1`` are padding and give zeros.
The step's own new keys are already in the pool (``concatenate_to_cache`` writes before it
returns the ``PagedKV``), so causality inside a chunk comes from the same rule.

A quantised pool (``jaxkv.quantization``) comes with its scale pools; each gathered block is
dequantised to float32 as it is read.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxkv.kv import PagedKV, check_scales
from jaxkv.ops.softmax import (
    DEFAULT_BLOCK_SIZE,
    check_options,
    combine_windows,
    finish_softmax,
    init_softmax_state,
    online_softmax_update,
    online_softmax_update_pages,
    two_block_size,
)

__all__ = ["PagedKV", "paged_attention"]


def _check_inputs(query, kv, scale, logit_soft_cap, sliding_window, pages_per_block):
    owner = "paged_attention"
    if not isinstance(kv, PagedKV):
        raise TypeError(f"{owner}: kv must be a PagedKV, got {type(kv).__name__}")
    if not hasattr(query, "ndim") or query.ndim != 3:
        raise ValueError(
            f"{owner}: query must be [num_tokens, query_heads, key_dim], "
            f"got shape {getattr(query, 'shape', None)}"
        )
    if not jnp.issubdtype(query.dtype, jnp.floating):
        raise TypeError(f"{owner}: query must be a float array, got {query.dtype}")
    check_scales(
        owner, ("kv.key_scales", "kv.value_scales"), kv.codec, kv.key_scales, kv.value_scales
    )
    num_tokens, query_heads, key_dim = query.shape
    kv_heads, pool_key_dim = kv.key_pages.shape[1], kv.key_dim
    if pool_key_dim != key_dim:
        raise ValueError(
            f"{owner}: query key_dim {key_dim} does not match the pool's key_dim {pool_key_dim}"
        )
    if query_heads % kv_heads:
        raise ValueError(
            f"{owner}: query_heads={query_heads} must be a multiple of kv_heads={kv_heads}"
        )
    if kv.query_positions.shape != (num_tokens,):
        raise ValueError(
            f"{owner}: query holds {num_tokens} tokens but kv.query_positions has shape "
            f"{kv.query_positions.shape}"
        )
    num_seqs = kv.page_tables.shape[0]
    if kv.context_lens.shape != (num_seqs,) or kv.query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(
            f"{owner}: page_tables has {num_seqs} rows, so context_lens must be ({num_seqs},) and "
            f"query_start_loc ({num_seqs + 1},); got {kv.context_lens.shape} and "
            f"{kv.query_start_loc.shape}"
        )
    check_options(
        owner,
        scale=scale,
        logit_soft_cap=logit_soft_cap,
        sliding_window=sliding_window,
        block=("pages_per_block", pages_per_block),
    )


def paged_attention(
    query: jax.Array,
    kv: PagedKV,
    *,
    scale: float | None = None,
    logit_soft_cap: float | None = None,
    sliding_window: int | None = None,
    pages_per_block: int | None = None,
) -> jax.Array:
    """Causal grouped-query attention of a packed ragged batch over a paged pool.

    Args:
        query: ``[num_tokens, query_heads, key_dim]``, the step's new queries packed like its new
            keys (row ``i``'s tokens at ``query_start_loc[i] .. query_start_loc[i + 1] - 1``);
            ``query_heads`` must be a multiple of the pool's kv heads.
        kv: the ``PagedKV`` returned by ``PagedCacheView.concatenate_to_cache``.
        scale: multiplier of the logits; default ``key_dim ** -0.5``.
        logit_soft_cap: if set, logits become ``cap * tanh(logits / cap)``.
        sliding_window: an extra window on top of the cache's own (the smaller wins).
        pages_per_block: pages read per loop step; default ``DEFAULT_BLOCK_SIZE`` tokens' worth
            (at least one page, at most ``max_pages_per_seq``), for decoding rows too: this
            kernel gathers each block's pages into a copy first, and blocks of 256 slots (whose
            copy stays in the CPU's cache) decode as fast as blocks of 512 or 1,024 at one row
            of 8,192 live tokens and at 8 rows of 2,048.

    Returns:
        ``[num_tokens, query_heads, value_dim]`` in ``query.dtype``; softmax and accumulation run
        in float32 whatever the storage dtype. Padding queries give zeros.
    """
    _check_inputs(query, kv, scale, logit_soft_cap, sliding_window, pages_per_block)
    window = combine_windows(kv.sliding_window, sliding_window)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    return _attend(
        query,
        kv,
        scale=float(scale),
        soft_cap=logit_soft_cap,
        window=window,
        pages_per_block=pages_per_block,
    )


@functools.partial(jax.jit, static_argnames=("scale", "soft_cap", "window", "pages_per_block"))
def _attend(query, kv, *, scale, soft_cap, window, pages_per_block):
    """The kernel behind ``paged_attention``, on checked inputs; jitted on its own so that a
    model's layers trace it once per step shape (see ``jaxkv.ops.attention._attend``)."""
    num_tokens, query_heads, key_dim = query.shape
    max_pages = kv.page_tables.shape[1]
    kv_heads = kv.key_pages.shape[1]
    groups = query_heads // kv_heads
    num_seqs = kv.page_tables.shape[0]
    max_query_len = min(kv.max_query_len or num_tokens, num_tokens)
    # A rotating codec stores keys and values rotated (see jaxkv.quantization): rotate the
    # queries to match, and the output back.
    codec = kv.storage
    q_all = codec.to_attention_basis(query.astype(jnp.float32)) * scale

    page_size = kv.page_size
    pages = max(1, DEFAULT_BLOCK_SIZE // page_size) if pages_per_block is None else pages_per_block
    block = two_block_size(pages, max_pages)  # see two_block_size

    options = dict(window=window, soft_cap=soft_cap, groups=groups)
    split = kv.prefill_rows
    if 0 < split < num_seqs and max_query_len > 1:
        # Rows past ``split`` decode one token: lay them out one query wide.
        wide = _attend_rows(q_all, kv, slice(0, split), max_query_len, block=block, **options)
        narrow = _attend_rows(q_all, kv, slice(split, num_seqs), 1, block=block, **options)
        packed = wide + narrow
    else:
        packed = _attend_rows(q_all, kv, slice(0, num_seqs), max_query_len, block=block, **options)
    return codec.from_attention_basis(packed).astype(query.dtype)


def _attend_rows(q_all, kv, rows, max_query_len, *, block, window, soft_cap, groups):
    """Attention of the packed queries of rows ``rows`` (a slice of the step's rows) laid out
    ``[rows, max_query_len]``; ``[num_tokens, heads, value_dim]`` float32 with zeros at every
    other row's tokens (in the attention basis of the codec)."""
    num_tokens, query_heads, key_dim = q_all.shape
    _, kv_heads, page_size, _ = kv.key_pages.shape
    value_dim = kv.value_dim
    max_pages = kv.page_tables.shape[1]
    pages_per_block = block
    block = pages_per_block * page_size
    page_tables = kv.page_tables[rows]
    context_lens = kv.context_lens[rows]
    query_start_loc = kv.query_start_loc[rows.start : rows.stop + 1]
    num_seqs = page_tables.shape[0]

    # Per-sequence layout: row s, slot j holds packed query query_start_loc[s] + j.
    starts = query_start_loc[:-1]
    counts = query_start_loc[1:] - starts
    slot = jnp.arange(max_query_len, dtype=jnp.int32)
    packed_index = starts[:, None] + slot[None, :]  # [S, Q]
    present = (slot[None, :] < counts[:, None]) & (packed_index < num_tokens)
    gather_index = jnp.where(present, packed_index, 0)
    query_pos = jnp.where(present, kv.query_positions[gather_index], -1).astype(jnp.int32)
    real = query_pos >= 0  # [S, Q]

    # Live blocks: up to the longest context; with a window, from the earliest visible key.
    live_pages = (jnp.max(context_lens) + page_size - 1) // page_size
    end_block = (jnp.minimum(live_pages, max_pages) + pages_per_block - 1) // pages_per_block
    if window is None:
        start_block = jnp.int32(0)
    else:
        first_key = jnp.min(jnp.where(real, jnp.maximum(query_pos - window + 1, 0), 2**30))
        start_block = jnp.minimum(first_key // block, end_block)

    codec = kv.storage
    q = q_all[gather_index]  # [S, Q, Hq, D]
    q = q.reshape(num_seqs, max_query_len, kv_heads, groups, key_dim)
    state = init_softmax_state(num_seqs, kv_heads, groups, max_query_len, value_dim)
    page_offsets = jnp.arange(pages_per_block, dtype=jnp.int32)
    slot_offsets = jnp.arange(block, dtype=jnp.int32)
    context = context_lens[:, None, None]
    query_pos_3d = query_pos[:, :, None]

    def gather(pool, pages):
        return pool.at[pages].get(mode="promise_in_bounds")  # [S, ppb, h, page_size, d]

    def heads_first(run):  # [S, ppb, h, page_size, d] -> [S, h, block, d]
        return run.transpose(0, 2, 1, 3, 4).reshape(num_seqs, kv_heads, block, run.shape[-1])

    def read(pool, scales, pages):
        """The block's pages as float32 channel runs (``codec.decode_parts``):
        ``[S, ppb, kv_heads, page_size, dim]`` when decoding, else ``[S, kv_heads, block, dim]``."""
        scales = None if scales is None else gather(scales, pages)
        runs = codec.decode_parts(gather(pool, pages), scales)
        return runs if decoding else tuple(heads_first(run) for run in runs)

    def body(index, carry):
        nominal_page = index * pages_per_block
        # The last block may be shifted left to stay in the table; pages it re-reads are masked.
        first_page = jnp.minimum(nominal_page, max_pages - pages_per_block)
        pages = lax.dynamic_slice_in_dim(page_tables, first_page, pages_per_block, axis=1)
        # Unused entries (-1) lie past the context and are masked; read page 0 in their place.
        pages = jnp.maximum(pages, 0)
        keys = read(kv.key_pages, kv.key_scales, pages)
        values = read(kv.value_pages, kv.value_scales, pages)
        key_pos = (first_page * page_size + slot_offsets)[None, None, :]  # [1, 1, block]
        fresh = (page_offsets >= nominal_page - first_page).repeat(page_size)[None, None, :]
        visible = fresh & (key_pos < context) & (key_pos <= query_pos_3d) & real[:, :, None]
        if window is not None:
            visible &= query_pos_3d - key_pos < window
        if decoding:
            return online_softmax_update_pages(
                carry, q_parts, keys, values, visible, soft_cap=soft_cap
            )
        return online_softmax_update(
            carry, q_parts, keys, values, visible, soft_cap=soft_cap, slots_first=False
        )

    decoding = max_query_len == 1
    q_parts = codec.split_query(q)
    if decoding:  # each row's query once per page of a block, made once for every block
        q_parts = [
            jnp.broadcast_to(run, (num_seqs, pages_per_block, *run.shape[2:])) for run in q_parts
        ]
    state = lax.fori_loop(start_block, end_block, body, state)
    out = finish_softmax(state, max_query_len)  # [S, Q, Hq, Dv]
    scatter_index = jnp.where(present, packed_index, num_tokens)  # absent slots are dropped
    packed = jnp.zeros((num_tokens, query_heads, value_dim), jnp.float32)
    return packed.at[scatter_index].set(out, mode="drop")
