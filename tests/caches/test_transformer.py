"""Contiguous and sliding-window caches against dense reference attention over whole sequences."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv import CacheOverflowError
from jaxkv.caches import (
    TransformerCache,
    TransformerCacheMetadata,
    TransformerCacheView,
    TransformerMetadata,
)
from jaxkv.ops import attention
from jaxkv.ops.reference import naive_attention

ATOL = 1e-5


def _sequences(rng, lengths, query_heads, key_heads, value_heads, key_dim, value_dim):
    """Random q/k/v for whole sequences, one per row: lists of [L, heads, dim] arrays."""
    make = lambda n, h, d: rng.standard_normal((n, h, d)).astype(np.float32)  # noqa: E731
    return [
        (
            make(n, query_heads, key_dim),
            make(n, key_heads, key_dim),
            make(n, value_heads, value_dim),
        )
        for n in lengths
    ]


def _expected(seqs, window=None, soft_cap=None, scale=None):
    """Per row, dense causal attention over the whole sequence: [L, query_heads, value_dim]."""
    out = []
    for q, k, v in seqs:
        pos = np.arange(len(q))[None]
        out.append(
            naive_attention(
                q[None],
                k[None],
                v[None],
                pos,
                pos,
                sliding_window=window,
                logit_soft_cap=soft_cap,
                scale=scale,
            )[0]
        )
    return out


def _run_chunks(
    metadata,
    seqs,
    plan,
    padding_side="right",
    jit=True,
    block_size=4,
    width=None,
    **attention_kwargs,
):
    """Feed each row's sequence through a 1-layer cache in the chunk sizes of ``plan`` (a list of
    per-row counts per step) and return, per row, the attention output at every position.

    Each step writes ``width`` tokens per row (default: the step's largest count), padded."""
    view = TransformerCacheView.init(metadata, 0)
    batch = len(seqs)
    done = [0] * batch
    outputs = [np.zeros((len(q), q.shape[1], seqs[0][2].shape[2]), np.float32) for q, _, _ in seqs]

    def step(view, q, k, v, runtime):
        kv, view = view.concatenate_to_cache(k, v, runtime)
        return attention(q, kv, block_size=block_size, **attention_kwargs), view

    if jit:
        step = jax.jit(step, donate_argnums=0)
    step_width = width
    for counts in plan:
        width = step_width or max(max(counts), 1)
        arrays = []
        for part in range(3):
            shape = (batch, width) + seqs[0][part].shape[1:]
            padded = np.full(shape, 7.0, np.float32)  # junk in padding must not leak
            for row, n in enumerate(counts):
                chunk = seqs[row][part][done[row] : done[row] + n]
                if padding_side == "right":
                    padded[row, :n] = chunk
                else:
                    padded[row, width - n :] = chunk
            arrays.append(jnp.asarray(padded))
        runtime = TransformerMetadata.create(np.asarray(counts, np.int32), padding_side)
        out, view = step(view, *arrays, runtime)
        out = np.asarray(out)
        for row, n in enumerate(counts):
            got = out[row, :n] if padding_side == "right" else out[row, width - n :]
            outputs[row][done[row] : done[row] + n] = got
            done[row] += n
    np.testing.assert_array_equal(np.asarray(view.lengths), done)
    return outputs, view


def _random_plan(rng, lengths, max_chunk):
    remaining = list(lengths)
    plan = []
    while any(remaining):
        counts = [int(min(r, rng.integers(0, max_chunk + 1))) for r in remaining]
        if not any(counts):
            continue
        plan.append(counts)
        remaining = [r - c for r, c in zip(remaining, counts, strict=True)]
    return plan


def _prefill_then_decode(lengths, prompt_lengths):
    plan = [list(prompt_lengths)]
    remaining = [n - p for n, p in zip(lengths, prompt_lengths, strict=True)]
    while any(remaining):
        plan.append([1 if r else 0 for r in remaining])
        remaining = [max(r - 1, 0) for r in remaining]
    return plan


def _assert_close(outputs, expected):
    for got, want in zip(outputs, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("jit", [False, True])
def test_prefill_then_decode_ragged_gqa_matches_dense(padding_side, jit):
    rng = np.random.default_rng(0)
    lengths, prompts = [13, 7, 10], [5, 7, 1]
    seqs = _sequences(rng, lengths, 4, 2, 2, 8, 8)
    metadata = TransformerCacheMetadata.create(3, 16, 1, 2, 8)
    plan = _prefill_then_decode(lengths, prompts)
    outputs, _ = _run_chunks(metadata, seqs, plan, padding_side, jit)
    _assert_close(outputs, _expected(seqs))


def test_random_chunks_distinct_key_value_heads_and_dims():
    rng = np.random.default_rng(1)
    lengths = [11, 4]
    seqs = _sequences(rng, lengths, 6, 3, 2, 8, 5)
    metadata = TransformerCacheMetadata.create(
        2, 12, 1, key_heads=3, value_heads=2, key_dim=8, value_dim=5
    )
    outputs, _ = _run_chunks(metadata, seqs, _random_plan(rng, lengths, 5), jit=True, width=5)
    _assert_close(outputs, _expected(seqs))


def test_soft_cap_and_custom_scale():
    rng = np.random.default_rng(2)
    seqs = _sequences(rng, [9, 6], 2, 1, 1, 4, 4)
    metadata = TransformerCacheMetadata.create(2, 9, 1, 1, 4)
    outputs, _ = _run_chunks(metadata, seqs, [[4, 6], [5, 0]], logit_soft_cap=2.0, scale=0.7)
    _assert_close(outputs, _expected(seqs, soft_cap=2.0, scale=0.7))


def test_sliding_window_short_prefill_then_long_chunk():
    """W=8, a 3-token prefill, then a 7-token chunk: every query sees exactly the last W keys."""
    rng = np.random.default_rng(3)
    seqs = _sequences(rng, [10], 2, 1, 1, 4, 4)
    metadata = TransformerCacheMetadata.create(1, 64, 1, 1, 4, sliding_window=8)
    outputs, view = _run_chunks(metadata, seqs, [[3], [7]])
    _assert_close(outputs, _expected(seqs, window=8))
    # The ring holds positions 2..9 after wrapping, each in slot position % 8.
    np.testing.assert_array_equal(np.asarray(view.positions)[0], [8, 9, 2, 3, 4, 5, 6, 7])


@pytest.mark.parametrize("seed", range(6))
def test_sliding_window_every_split_matches_dense(seed):
    rng = np.random.default_rng(10 + seed)
    lengths = [int(rng.integers(1, 30)) for _ in range(3)]
    window = int(rng.integers(1, 10))
    seqs = _sequences(rng, lengths, 4, 2, 2, 4, 4)
    metadata = TransformerCacheMetadata.create(3, 32, 1, 2, 4, sliding_window=window)
    side = "left" if seed % 2 else "right"
    plan = _random_plan(rng, lengths, 12)
    outputs, _ = _run_chunks(metadata, seqs, plan, side, jit=True, width=12)
    _assert_close(outputs, _expected(seqs, window=window))


def test_sliding_window_prefill_longer_than_window_then_decode_jit():
    rng = np.random.default_rng(4)
    lengths = [40, 25]
    seqs = _sequences(rng, lengths, 2, 1, 1, 4, 4)
    metadata = TransformerCacheMetadata.create(2, 64, 1, 1, 4, sliding_window=6)
    outputs, _ = _run_chunks(metadata, seqs, _prefill_then_decode(lengths, [20, 17]))
    _assert_close(outputs, _expected(seqs, window=6))


def test_window_not_smaller_than_capacity_uses_contiguous_storage():
    metadata = TransformerCacheMetadata.create(1, 8, 1, 1, 4, sliding_window=8)
    assert not metadata.is_ring
    rng = np.random.default_rng(5)
    seqs = _sequences(rng, [8], 1, 1, 1, 4, 4)
    outputs, view = _run_chunks(metadata, seqs, [[5], [3]])
    assert view.positions is None
    _assert_close(outputs, _expected(seqs, window=8))


def test_attention_window_argument_narrows_a_full_cache():
    rng = np.random.default_rng(6)
    seqs = _sequences(rng, [12], 2, 2, 2, 4, 4)
    metadata = TransformerCacheMetadata.create(1, 12, 1, 2, 4)
    outputs, _ = _run_chunks(metadata, seqs, [[5], [7]], sliding_window=3)
    _assert_close(outputs, _expected(seqs, window=3))


def test_bfloat16_storage_accumulates_in_float32():
    rng = np.random.default_rng(7)
    seqs = _sequences(rng, [20], 2, 1, 1, 8, 8)
    metadata = TransformerCacheMetadata.create(1, 32, 1, 1, 8, dtype=jnp.bfloat16)
    outputs, view = _run_chunks(metadata, seqs, [[12], [8]])
    assert view.key_states().dtype == jnp.bfloat16 and view.keys.dtype == jnp.uint16
    rounded = [
        tuple(np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32)) for x in s)
        for s in seqs
    ]
    # Queries are not stored: only keys/values are rounded to bfloat16.
    rounded = [(q, k, v) for (q, _, _), (_, k, v) in zip(seqs, rounded, strict=True)]
    _assert_close(outputs, _expected(rounded))


# ------------------------------------------------------------------------------------------
# Overflow, reset, validation
# ------------------------------------------------------------------------------------------


def test_overflow_eager_raises_and_leaves_view_intact():
    metadata = TransformerCacheMetadata.create(2, 4, 1, 1, 2)
    view = TransformerCacheView.init(metadata, 0)
    _, view = view.concatenate_to_cache(jnp.ones((2, 3, 1, 2)), jnp.ones((2, 3, 1, 2)))
    with pytest.raises(CacheOverflowError, match=r"row\(s\) \[0, 1\].*max_length=4"):
        view.concatenate_to_cache(jnp.ones((2, 2, 1, 2)), jnp.ones((2, 2, 1, 2)))
    np.testing.assert_array_equal(np.asarray(view.lengths), [3, 3])
    np.testing.assert_array_equal(np.asarray(view.keys[:, :3]), 1.0)


def test_overflow_under_jit_flags_row_and_drops_only_that_write():
    metadata = TransformerCacheMetadata.create(2, 4, 1, 1, 2)
    cache = TransformerCache.init_cache(metadata)

    @jax.jit
    def write(cache, key, counts):
        kv, view = cache[0].concatenate_to_cache(key, key, TransformerMetadata.create(counts))
        return kv.overflow, cache.replace_view(0, view)

    ones = jnp.ones((2, 3, 1, 2))
    _, cache = write(cache, ones, jnp.array([3, 1]))
    flags, cache = write(cache, 2 * ones, jnp.array([2, 3]))
    np.testing.assert_array_equal(np.asarray(flags), [True, False])
    np.testing.assert_array_equal(np.asarray(cache[0].lengths), [3, 4])
    np.testing.assert_array_equal(np.asarray(cache[0].keys[0, :, 0, 0]), [1, 1, 1, 0])
    np.testing.assert_array_equal(np.asarray(cache[0].keys[1, :, 0, 0]), [1, 2, 2, 2])
    with pytest.raises(CacheOverflowError, match=r"rows \[0\]"):
        cache.check_overflow()
    cache = cache.reset_rows([0])
    cache.check_overflow()
    np.testing.assert_array_equal(np.asarray(cache[0].lengths), [0, 4])


def test_ring_overflow_is_bounded_by_max_length():
    metadata = TransformerCacheMetadata.create(1, 10, 1, 1, 2, sliding_window=4)
    view = TransformerCacheView.init(metadata, 0)
    _, view = view.concatenate_to_cache(jnp.ones((1, 9, 1, 2)), jnp.ones((1, 9, 1, 2)))
    with pytest.raises(CacheOverflowError):
        view.concatenate_to_cache(jnp.ones((1, 2, 1, 2)), jnp.ones((1, 2, 1, 2)))


def test_reset_rows_lets_a_slot_take_a_new_sequence():
    rng = np.random.default_rng(8)
    metadata = TransformerCacheMetadata.create(2, 8, 1, 1, 4, sliding_window=3)
    view = TransformerCacheView.init(metadata, 0)
    old = jnp.asarray(rng.standard_normal((2, 5, 1, 4)), jnp.float32)
    _, view = view.concatenate_to_cache(old, old)
    view = view.reset_rows(jnp.array([True, False]))
    q, k, v = _sequences(rng, [4], 1, 1, 1, 4, 4)[0]
    pad = lambda x: jnp.asarray(np.stack([x, np.zeros_like(x)]))  # noqa: E731
    kv, view = view.concatenate_to_cache(pad(k), pad(v), TransformerMetadata.create([4, 0]))
    out = np.asarray(attention(pad(q), kv))[0]
    np.testing.assert_allclose(out, _expected([(q, k, v)], window=3)[0], atol=ATOL)
    np.testing.assert_array_equal(np.asarray(view.lengths), [4, 5])


def test_padding_queries_give_zeros():
    metadata = TransformerCacheMetadata.create(2, 8, 1, 1, 4)
    view = TransformerCacheView.init(metadata, 0)
    x = jnp.ones((2, 3, 1, 4))
    kv, _ = view.concatenate_to_cache(x, x, TransformerMetadata.create([3, 1], "left"))
    out = np.asarray(attention(x, kv))
    np.testing.assert_array_equal(out[1, :2], 0.0)
    np.testing.assert_array_equal(np.asarray(kv.query_positions), [[0, 1, 2], [-1, -1, 0]])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(batch_size=0), "batch_size must be >= 1, got 0"),
        (dict(max_length=-3), "max_length must be >= 1, got -3"),
        (dict(num_layers=2.5), "num_layers must be an int"),
        (dict(num_kv_heads=None), "give num_kv_heads or key_heads"),
        (dict(head_dim=None), "give head_dim or key_dim"),
        (dict(key_heads=3), "key_heads=3 conflicts with num_kv_heads=2"),
        (dict(sliding_window=0), "sliding_window must be >= 1, got 0"),
        (dict(dtype=jnp.int32), "dtype must be one of float32, bfloat16, float16, got int32"),
        (dict(dtype="nonsense"), "dtype must be a dtype"),
        (dict(batch_size=True), "batch_size must be an int"),
    ],
)
def test_metadata_validation_names_the_field(kwargs, message):
    arguments = dict(batch_size=2, max_length=8, num_layers=1, num_kv_heads=2, head_dim=4)
    arguments.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        TransformerCacheMetadata.create(**arguments)


def test_replace_and_from_dict_revalidate():
    metadata = TransformerCacheMetadata.create(2, 8, 1, 2, 4)
    assert metadata.replace(max_length=16).max_length == 16
    with pytest.raises(ValueError, match="max_length must be >= 1, got 0"):
        metadata.replace(max_length=0)
    with pytest.raises(ValueError, match="unknown field"):
        metadata.replace(max_len=3)
    data = metadata.to_dict()
    data["head_dim"] = -1
    with pytest.raises(ValueError, match="head_dim must be >= 1"):
        TransformerCacheMetadata.from_dict(data)


@pytest.mark.parametrize(
    ("key_shape", "value_shape", "dtype", "message"),
    [
        ((3, 2, 2, 4), (3, 2, 2, 4), jnp.float32, r"key must have shape \(2, \*, 2, 4\)"),
        ((2, 2, 1, 4), (2, 2, 1, 4), jnp.float32, r"key must have shape"),
        ((2, 2, 2, 4), (2, 3, 2, 4), jnp.float32, r"value must have shape \(2, 2, 2, 4\)"),
        ((2, 2, 2, 4), (2, 2, 2, 4), jnp.int32, "key must be a float array"),
    ],
)
def test_write_validation(key_shape, value_shape, dtype, message):
    view = TransformerCacheView.init(TransformerCacheMetadata.create(2, 8, 1, 2, 4), 0)
    with pytest.raises((ValueError, TypeError), match=message):
        view.concatenate_to_cache(jnp.ones(key_shape, dtype), jnp.ones(value_shape, dtype))


def test_write_validation_of_runtime_counts():
    view = TransformerCacheView.init(TransformerCacheMetadata.create(2, 8, 1, 2, 4), 0)
    x = jnp.ones((2, 3, 2, 4))
    with pytest.raises(ValueError, match=r"new_lengths must lie in \[0, 3\]"):
        view.concatenate_to_cache(x, x, TransformerMetadata.create([4, 1]))
    with pytest.raises(ValueError, match=r"runtime.new_lengths must have shape \(2,\)"):
        view.concatenate_to_cache(x, x, TransformerMetadata.create([1, 1, 1]))
    with pytest.raises(ValueError, match="padding_side must be one of"):
        TransformerMetadata.create([1, 1], "middle")


# ------------------------------------------------------------------------------------------
# PyTree behaviour, jit, donation
# ------------------------------------------------------------------------------------------


def test_cache_is_a_pytree_with_static_metadata():
    metadata = TransformerCacheMetadata.create(2, 8, 3, 2, 4, sliding_window=4)
    cache = TransformerCache.init_cache(metadata)
    leaves, treedef = jax.tree_util.tree_flatten(cache)
    assert len(leaves) == 3 * 5  # keys, values, lengths, positions, overflow per layer
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(rebuilt, TransformerCache) and rebuilt[2].layer_index == 2
    assert rebuilt[1].metadata is metadata
    doubled = jax.tree_util.tree_map(lambda x: x * 2, cache)
    assert isinstance(doubled[0], TransformerCacheView)
    assert len(cache) == 3 and list(cache)[1] is cache[1]
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(cache)[0]]
    assert ".views[0].keys" in paths


def test_init_empty_and_partial_layers():
    metadata = TransformerCacheMetadata.create(1, 8, 3, 1, 4)
    assert list(TransformerCache.init_empty(3)) == [None, None, None]
    partial = TransformerCache.init_cache(metadata, layers=[0, 2])
    assert partial[1] is None and partial[2].layer_index == 2
    assert jax.tree_util.tree_structure(partial).num_leaves == 8
    with pytest.raises(ValueError, match="layer 3 out of range"):
        TransformerCache.init_cache(metadata, layers=[3])
    with pytest.raises(IndexError, match="index 5 out of range"):
        partial.replace_view(5, None)


def test_jit_specialises_on_metadata_and_donation_writes_in_place():
    metadata = TransformerCacheMetadata.create(2, 1024, 1, 2, 16)
    cache = TransformerCache.init_cache(metadata)
    traces = []

    @jax.jit
    def write(cache, key):
        traces.append(1)
        kv, view = cache[0].concatenate_to_cache(key, key)
        return cache.replace_view(0, view)

    donated = jax.jit(write.__wrapped__, donate_argnums=0)
    key = jnp.ones((2, 1, 2, 16))
    cache = donated(cache, key)
    before = cache[0].keys.unsafe_buffer_pointer()
    cache = donated(cache, key)
    assert cache[0].keys.unsafe_buffer_pointer() == before
    np.testing.assert_array_equal(np.asarray(cache[0].lengths), [2, 2])
    # Same metadata -> no retrace; different metadata -> a new trace.
    write(cache, key)
    count = len(traces)
    write(cache, key)
    assert len(traces) == count
    other = TransformerCache.init_cache(dataclasses.replace(metadata, max_length=512))
    write(other, key)
    assert len(traces) == count + 1
