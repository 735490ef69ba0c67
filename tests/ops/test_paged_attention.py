"""Ragged paged attention against dense reference attention and against the contiguous cache.

Each case builds a pool whose pages are scattered in random order, packs a ragged batch (prefill
chunks next to single-token decodes, padding at the end) and compares every real query's output
with ``naive_attention`` over that sequence's own history.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.caches import TransformerCache, TransformerCacheMetadata, TransformerMetadata
from jaxkv.ops import PagedKV, attention, paged_attention
from jaxkv.ops.reference import naive_attention
from jaxkv.quantization import RawCodec

ATOL = 1e-5
PAGE_SIZE = 4
MAX_PAGES = 8
NUM_PAGES = 40


def _ragged_batch(
    rng,
    contexts,
    new_counts,
    *,
    kv_heads=2,
    query_heads=4,
    key_dim=8,
    value_dim=8,
    num_tokens=32,
    max_seqs=None,
):
    """A pool with the sequences' keys on randomly chosen pages, and the packed new queries.

    Sequence ``i`` holds ``contexts[i]`` tokens after the step, the last ``new_counts[i]`` of
    them new. Returns ``(query [T, Hq, D], kv, history)`` where ``history[i] = (q, k, v, pos)``
    holds sequence ``i``'s new queries and its whole key/value history for the reference.
    """
    max_seqs = max_seqs or len(contexts)
    pages = rng.permutation(NUM_PAGES)
    # Pools are [pages, kv_heads, page_size, dim]; tokens_first views them [pages, page_size, ...].
    keys = rng.standard_normal((NUM_PAGES, kv_heads, PAGE_SIZE, key_dim)).astype(np.float32)
    values = rng.standard_normal((NUM_PAGES, kv_heads, PAGE_SIZE, value_dim)).astype(np.float32)
    tokens_first_keys, tokens_first_values = keys.swapaxes(1, 2), values.swapaxes(1, 2)
    tables = np.full((max_seqs, MAX_PAGES), -1, np.int32)
    context_lens = np.zeros((max_seqs,), np.int32)
    start = np.full((max_seqs + 1,), sum(new_counts), np.int32)
    start[0] = 0
    query = np.zeros((num_tokens, query_heads, key_dim), np.float32)
    positions = np.full((num_tokens,), -1, np.int32)
    history = []
    cursor, next_page = 0, 0
    for row, (context, count) in enumerate(zip(contexts, new_counts, strict=True)):
        used = -(-context // PAGE_SIZE)
        tables[row, :used] = pages[next_page : next_page + used]
        next_page += used
        context_lens[row] = context
        start[row + 1] = cursor + count
        q = rng.standard_normal((count, query_heads, key_dim)).astype(np.float32)
        query[cursor : cursor + count] = q
        positions[cursor : cursor + count] = np.arange(context - count, context)
        cursor += count
        flat_keys = tokens_first_keys[tables[row, :used]].reshape(-1, kv_heads, key_dim)[:context]
        flat_values = tokens_first_values[tables[row, :used]].reshape(-1, kv_heads, value_dim)
        flat_values = flat_values[:context]
        history.append((q, flat_keys, flat_values, np.arange(context - count, context)))
    kv = PagedKV(
        key_pages=jnp.asarray(keys),
        value_pages=jnp.asarray(values),
        page_tables=jnp.asarray(tables),
        context_lens=jnp.asarray(context_lens),
        query_start_loc=jnp.asarray(start),
        query_positions=jnp.asarray(positions),
    )
    return jnp.asarray(query), kv, history


def _check(out, history, *, window=None, soft_cap=None, scale=None):
    out = np.asarray(out)
    cursor = 0
    for q, k, v, pos in history:
        expected = naive_attention(
            q[None],
            k[None],
            v[None],
            pos[None],
            np.arange(len(k))[None],
            sliding_window=window,
            logit_soft_cap=soft_cap,
            scale=scale,
        )[0]
        np.testing.assert_allclose(out[cursor : cursor + len(q)], expected, atol=ATOL, rtol=0)
        cursor += len(q)
    np.testing.assert_array_equal(out[cursor:], 0.0)  # padding queries give zeros


CONTEXTS = (13, 1, 30, 7, 32)
NEW = (5, 1, 1, 7, 1)  # two prefill chunks (one the whole prompt), three decodes


@pytest.mark.parametrize("pages_per_block", [None, 1, 3])
def test_ragged_prefill_and_decode_gqa_matches_dense(pages_per_block):
    rng = np.random.default_rng(0)
    query, kv, history = _ragged_batch(rng, CONTEXTS, NEW, max_seqs=7)
    out = jax.jit(paged_attention, static_argnames="pages_per_block")(
        query, kv, pages_per_block=pages_per_block
    )
    assert out.shape == (32, 4, 8) and out.dtype == jnp.float32
    _check(out, history)


@pytest.mark.parametrize(
    ("window", "soft_cap", "scale", "cache_window"),
    [(5, None, None, None), (None, 3.0, 0.2, None), (9, 2.0, None, 6)],
)
def test_window_soft_cap_scale(window, soft_cap, scale, cache_window):
    rng = np.random.default_rng(1)
    query, kv, history = _ragged_batch(rng, CONTEXTS, NEW, value_dim=6, query_heads=6)
    kv = _replace(kv, sliding_window=cache_window)
    out = paged_attention(
        query,
        kv,
        sliding_window=window,
        logit_soft_cap=soft_cap,
        scale=scale,
        pages_per_block=2,
    )
    windows = [w for w in (window, cache_window) if w is not None]
    effective = min(windows) if windows else None
    _check(out, history, window=effective, soft_cap=soft_cap, scale=scale)


def test_bfloat16_pool_and_attention_dispatch():
    rng = np.random.default_rng(2)
    query, kv, history = _ragged_batch(rng, CONTEXTS, NEW)
    # Held as uint16 words like a cache stores them; attention bit-casts each block back.
    words = lambda x: jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)  # noqa: E731
    stored = PagedKV(
        key_pages=words(kv.key_pages),
        value_pages=words(kv.value_pages),
        page_tables=kv.page_tables,
        context_lens=kv.context_lens,
        query_start_loc=kv.query_start_loc,
        query_positions=kv.query_positions,
        codec=RawCodec(jnp.bfloat16),
    )
    rounded = [
        (
            q,
            np.asarray(jnp.asarray(k).astype(jnp.bfloat16).astype(jnp.float32)),
            np.asarray(jnp.asarray(v).astype(jnp.bfloat16).astype(jnp.float32)),
            pos,
        )
        for q, k, v, pos in history
    ]
    out = attention(query, stored, block_size=8)  # dispatches to paged_attention
    _check(out, rounded)


def test_matches_contiguous_cache_attention():
    rng = np.random.default_rng(3)
    contexts, new = (12, 9, 20), (3, 1, 6)
    query, kv, history = _ragged_batch(rng, contexts, new, num_tokens=16)
    paged_out = np.asarray(paged_attention(query, kv))
    metadata = TransformerCacheMetadata.create(3, 32, 1, 2, 8)
    view = TransformerCache.init_cache(metadata)[0]
    width = max(new)
    q_rows = np.zeros((3, width, 4, 8), np.float32)
    prefix = np.zeros((3, max(contexts), 2, 8), np.float32)
    prefix_v = np.zeros_like(prefix)
    for row, (q, k, v, _) in enumerate(history):
        q_rows[row, : len(q)] = q
        prefix[row, : len(k) - len(q)] = k[: len(k) - len(q)]
        prefix_v[row, : len(k) - len(q)] = v[: len(k) - len(q)]
    old = [c - n for c, n in zip(contexts, new, strict=True)]
    _, view = view.concatenate_to_cache(
        jnp.asarray(prefix), jnp.asarray(prefix_v), TransformerMetadata.create(old)
    )
    chunk_k = np.zeros((3, width, 2, 8), np.float32)
    chunk_v = np.zeros_like(chunk_k)
    for row, (q, k, v, _) in enumerate(history):
        chunk_k[row, : len(q)] = k[len(k) - len(q) :]
        chunk_v[row, : len(q)] = v[len(k) - len(q) :]
    contiguous, _ = view.concatenate_to_cache(
        jnp.asarray(chunk_k), jnp.asarray(chunk_v), TransformerMetadata.create(new)
    )
    contiguous_out = np.asarray(attention(jnp.asarray(q_rows), contiguous))
    cursor = 0
    for row, count in enumerate(new):
        np.testing.assert_allclose(
            paged_out[cursor : cursor + count], contiguous_out[row, :count], atol=ATOL, rtol=0
        )
        cursor += count
    _check(paged_out, history)


def test_pages_outside_the_tables_are_never_read():
    rng = np.random.default_rng(4)
    query, kv, history = _ragged_batch(rng, CONTEXTS, NEW)
    used = np.asarray(kv.page_tables)
    unused = np.setdiff1d(np.arange(NUM_PAGES), used[used >= 0])
    unused = unused[unused != 0]  # page 0 stands in for -1 entries (masked, finite)
    poisoned = kv.key_pages.at[unused].set(jnp.nan)
    poisoned_v = kv.value_pages.at[unused].set(jnp.nan)
    out = paged_attention(query, _replace(kv, key_pages=poisoned, value_pages=poisoned_v))
    _check(out, history)


def _replace(kv, **changes):
    fields = {name: getattr(kv, name) for name in kv.__dataclass_fields__}
    fields.update(changes)
    return PagedKV(**fields)


def test_compiles_once_for_any_context_length():
    rng = np.random.default_rng(5)
    traces = []

    @jax.jit
    def step(query, kv):
        traces.append(None)
        return paged_attention(query, kv)

    for contexts in ((3, 1), (32, 17), (9, 32)):
        query, kv, history = _ragged_batch(rng, contexts, (2, 1), num_tokens=8, max_seqs=2)
        _check(step(query, kv), history)
    assert len(traces) == 1


def test_validation_errors():
    rng = np.random.default_rng(6)
    query, kv, _ = _ragged_batch(rng, (5,), (2,), num_tokens=4)
    with pytest.raises(TypeError, match="kv must be a PagedKV"):
        paged_attention(query, object())
    with pytest.raises(ValueError, match=r"query must be \[num_tokens"):
        paged_attention(query[None], kv)
    with pytest.raises(TypeError, match="query must be a float array"):
        paged_attention(query.astype(jnp.int32), kv)
    with pytest.raises(ValueError, match="key_dim 4 does not match"):
        paged_attention(query[..., :4], kv)
    with pytest.raises(ValueError, match="query_heads=3 must be a multiple of kv_heads=2"):
        paged_attention(query[:, :3], kv)
    with pytest.raises(ValueError, match="query holds 3 tokens"):
        paged_attention(query[:3], kv)
    with pytest.raises(ValueError, match="context_lens must be"):
        paged_attention(query, _replace(kv, context_lens=kv.context_lens[:0]))
    with pytest.raises(ValueError, match="logit_soft_cap must be > 0, got 0"):
        paged_attention(query, kv, logit_soft_cap=0)
    with pytest.raises(ValueError, match="sliding_window must be an int >= 1, got 0"):
        paged_attention(query, kv, sliding_window=0)
    with pytest.raises(ValueError, match="pages_per_block must be an int >= 1, got 0"):
        paged_attention(query, kv, pages_per_block=0)
    with pytest.raises(ValueError, match="scale must be a finite float"):
        paged_attention(query, kv, scale=float("nan"))
    with pytest.raises(ValueError, match="block_size must be an int >= 1, got 0"):
        attention(query, kv, block_size=0)
