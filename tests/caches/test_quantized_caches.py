"""Quantised contiguous, sliding-window ring and paged caches.

Each codec on each cache type is checked against dense reference attention twice: over the
dequantised keys/values (what the cache must hold: equal up to float rounding) and over the
full-precision ones (the quantisation error, bounded). Writing a sequence in one chunk and one
token at a time must give the same outputs, since each token is quantised on its own. The rest
covers storage (1- and 2-byte words, in-place donated writes, no full-precision copy of the cache
in the compiled decode step), metadata (serialisation, PyTree, validation) and the views' other
operations.
"""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.caches import (
    PagedCache,
    PagedCacheMetadata,
    PagedCacheView,
    TransformerCache,
    TransformerCacheMetadata,
    TransformerCacheView,
    TransformerMetadata,
)
from jaxkv.engine.step_inputs import paged_runtime
from jaxkv.ops import PagedKV, attention
from jaxkv.ops.attention import CachedKV
from jaxkv.ops.reference import naive_attention
from jaxkv.pages import PageManager

Q_HEADS, KV_HEADS, DIM = 4, 2, 16
LENGTHS = (13, 9)  # two ragged rows / sequences
CODECS = {
    "int8": {"kv_quantization": "int8"},
    "int4": {"kv_quantization": "int4", "quantization_group_size": 8},
    "fp8": {"kv_quantization": "fp8"},
}
# Largest |output - full-precision output| allowed for unit-normal q/k/v.
TOLERANCE = {"int8": 0.03, "int4": 0.4, "fp8": 0.15}
EXACT = 2e-5  # against attention over the dequantised keys/values
PAGE_SIZE, MAX_SEQS, MAX_PAGES, NUM_PAGES = 4, 2, 5, 12
TOKENS = 16


def _sequences(seed=0):
    """Per row: q ``[L, Q_HEADS, DIM]``, k and v ``[L, KV_HEADS, DIM]`` float32."""
    rng = np.random.default_rng(seed)
    make = lambda n, h: rng.standard_normal((n, h, DIM)).astype(np.float32)  # noqa: E731
    return [(make(n, Q_HEADS), make(n, KV_HEADS), make(n, KV_HEADS)) for n in LENGTHS]


def _round_trip(x, codec):
    return np.asarray(codec.decode(*codec.encode(jnp.asarray(x))))


def _expected(seqs, codec=None, window=None):
    """Dense causal attention per row; with ``codec``, over the dequantised keys/values."""
    out = []
    for q, k, v in seqs:
        if codec is not None:
            k, v = _round_trip(k, codec), _round_trip(v, codec)
        pos = np.arange(len(q))[None]
        out.append(naive_attention(q[None], k[None], v[None], pos, pos, sliding_window=window)[0])
    return out


def _check(outputs, seqs, codec, window=None):
    for got, exact, full in zip(
        outputs, _expected(seqs, codec, window), _expected(seqs, None, window), strict=True
    ):
        np.testing.assert_allclose(got, exact, atol=EXACT)
        error = np.abs(got - full).max()
        assert 0 < error <= TOLERANCE[codec.name], (codec, error)  # lossy, within bounds


# --------------------------------------------------------------------------------------------
# Contiguous and ring caches
# --------------------------------------------------------------------------------------------


@jax.jit
def _contiguous_step(view, q, k, v, runtime):
    kv, view = view.concatenate_to_cache(k, v, runtime)
    return attention(q, kv, block_size=4), view


def _run_contiguous(metadata, seqs, plan):
    """Feed the rows through a one-layer cache in chunks (``plan``: per step, per-row counts,
    right-padded to the plan's largest count, so one compiled step serves the whole plan);
    return each row's outputs ``[L, Hq, D]``."""
    view = TransformerCacheView.init(metadata, 0)
    done = [0] * len(seqs)
    outputs = [np.zeros_like(q) for q, _, _ in seqs]
    width = max(max(counts) for counts in plan)
    for counts in plan:
        arrays = [np.zeros((len(seqs), width, a.shape[1], DIM), np.float32) for a in seqs[0]]
        for row, (count, seq) in enumerate(zip(counts, seqs, strict=True)):
            for array, source in zip(arrays, seq, strict=True):
                array[row, :count] = source[done[row] : done[row] + count]
        runtime = TransformerMetadata.create(np.asarray(counts, np.int32))
        out, view = _contiguous_step(view, *(jnp.asarray(a) for a in arrays), runtime)
        for row, count in enumerate(counts):
            outputs[row][done[row] : done[row] + count] = np.asarray(out)[row, :count]
            done[row] += count
    assert done == list(LENGTHS)
    return outputs, view


CHUNKED = [(5, 4), (1, 1), (7, 4)]
ONE_BY_ONE = [(int(i < LENGTHS[0]), int(i < LENGTHS[1])) for i in range(max(LENGTHS))]


@pytest.mark.parametrize("window", [None, 5], ids=["contiguous", "ring"])
@pytest.mark.parametrize("name", CODECS)
def test_contiguous_and_ring_attend_over_dequantised_keys(name, window):
    metadata = TransformerCacheMetadata.create(
        2, 16, 1, KV_HEADS, DIM, sliding_window=window, **CODECS[name]
    )
    seqs = _sequences()
    chunked, view = _run_contiguous(metadata, seqs, CHUNKED)
    _check(chunked, seqs, metadata.codec, window)
    one_by_one, _ = _run_contiguous(metadata, seqs, ONE_BY_ONE)
    for got, want in zip(one_by_one, chunked, strict=True):
        np.testing.assert_allclose(got, want, atol=EXACT)
    # key_states() dequantises the whole cache for inspection.
    keys = np.asarray(view.key_states())
    assert keys.shape == (2, metadata.num_slots, KV_HEADS, DIM) and keys.dtype == np.float32
    if window is None:
        for row, (_, k, _) in enumerate(seqs):
            np.testing.assert_array_equal(keys[row, : len(k)], _round_trip(k, metadata.codec))


# --------------------------------------------------------------------------------------------
# Paged cache
# --------------------------------------------------------------------------------------------


@jax.jit
def _paged_step(cache, q, k, v, runtime):
    cache = cache.copy_pages(runtime.copy_ops)
    kv, view = cache[0].concatenate_to_cache(k, v, runtime)
    return attention(q, kv, block_size=8), cache.replace_view(0, view)


def _run_paged(metadata, seqs, plan):
    """Schedule the two sequences through a ``PageManager`` in chunks; return each sequence's
    outputs ``[L, Hq, D]`` and the cache."""
    manager = PageManager(
        NUM_PAGES, PAGE_SIZE, MAX_SEQS, MAX_PAGES, enable_prefix_caching=False,
        token_buckets=(TOKENS,),
    )  # fmt: skip
    for seq, length in enumerate(LENGTHS):
        manager.add_sequence(seq, list(range(1, length + 1)))
    cache = PagedCache.init_cache(metadata)
    outputs = [np.zeros_like(q) for q, _, _ in seqs]
    for counts in plan:
        step = manager.schedule([(seq, n) for seq, n in enumerate(counts) if n])
        runtime = paged_runtime(step)
        positions = np.asarray(runtime.token_positions())
        arrays = [np.zeros((TOKENS, a.shape[1], DIM), np.float32) for a in seqs[0]]
        starts = step.query_start_loc
        for row, seq in enumerate(step.seq_ids):
            for token in range(starts[row], starts[row + 1]):
                for array, source in zip(arrays, seqs[seq], strict=True):
                    array[token] = source[positions[token]]
        out, cache = _paged_step(cache, *(jnp.asarray(a) for a in arrays), runtime)
        manager.commit_step(step)
        for row, seq in enumerate(step.seq_ids):
            for token in range(starts[row], starts[row + 1]):
                outputs[seq][positions[token]] = np.asarray(out)[token]
    return outputs, cache


@pytest.mark.parametrize("window", [None, 5], ids=["full", "window"])
@pytest.mark.parametrize("name", CODECS)
def test_paged_attends_over_dequantised_keys(name, window):
    metadata = PagedCacheMetadata.create(
        1, NUM_PAGES, PAGE_SIZE, KV_HEADS, DIM, MAX_SEQS, MAX_PAGES, sliding_window=window,
        **CODECS[name],
    )  # fmt: skip
    seqs = _sequences(1)
    chunked, cache = _run_paged(metadata, seqs, CHUNKED)
    _check(chunked, seqs, metadata.codec, window)
    one_by_one, _ = _run_paged(metadata, seqs, ONE_BY_ONE)
    for got, want in zip(one_by_one, chunked, strict=True):
        np.testing.assert_allclose(got, want, atol=EXACT)
    view = cache[0]
    assert view.key_pages.dtype == metadata.codec.word_dtype
    assert view.key_scales.dtype == np.uint16
    assert view.key_states().shape == (NUM_PAGES, KV_HEADS, PAGE_SIZE, DIM)


def test_paged_copy_pages_copies_scales_with_words():
    metadata = PagedCacheMetadata.create(1, 6, PAGE_SIZE, KV_HEADS, DIM, 1, 3, **CODECS["int4"])
    view = PagedCacheView.init(metadata, 0)
    rng = np.random.default_rng(2)
    view = dataclasses.replace(
        view,
        key_pages=jnp.asarray(rng.integers(0, 256, view.key_pages.shape), jnp.uint8),
        key_scales=jnp.asarray(rng.integers(0, 2**14, view.key_scales.shape), jnp.uint16),
        value_scales=jnp.asarray(rng.integers(0, 2**14, view.value_scales.shape), jnp.uint16),
    )
    copied = view.copy_pages(jnp.asarray([[1, 4], [-1, -1]], jnp.int32))
    for name in ("key_pages", "key_scales", "value_scales"):
        before, after = np.asarray(getattr(view, name)), np.asarray(getattr(copied, name))
        np.testing.assert_array_equal(after[4], before[1])
        np.testing.assert_array_equal(np.delete(after, 4, 0), np.delete(before, 4, 0))


def test_memory_budget_holds_about_twice_the_pages_with_int8():
    args = (2, PAGE_SIZE, KV_HEADS, DIM, MAX_SEQS, MAX_PAGES)
    bfloat16 = PagedCacheMetadata.from_memory_budget(*args, dtype=jnp.bfloat16, memory_bytes=2**20)
    int8 = PagedCacheMetadata.from_memory_budget(*args, memory_bytes=2**20, kv_quantization="int8")
    assert int8.kv_quantization == "int8"
    assert int8.num_pages == 2**20 // (PAGE_SIZE * int8.bytes_per_token())
    assert int8.num_pages >= 1.75 * bfloat16.num_pages


# --------------------------------------------------------------------------------------------
# Storage: words, in-place writes, no full-precision copy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CODECS)
def test_views_store_words_and_float16_scale_words(name):
    metadata = TransformerCacheMetadata.create(2, 8, 1, KV_HEADS, DIM, **CODECS[name])
    view = TransformerCacheView.init(metadata, 0)
    stored_dim = DIM // 2 if name == "int4" else DIM
    groups = DIM // 8 if name == "int4" else 1
    assert view.keys.shape == view.values.shape == (2, 8, KV_HEADS, stored_dim)
    assert view.keys.dtype == {"int8": np.int8, "int4": np.uint8, "fp8": np.uint8}[name]
    assert view.key_scales.shape == (2, 8, KV_HEADS, groups)
    assert view.key_scales.dtype == view.value_scales.dtype == np.uint16
    plain = TransformerCacheView.init(TransformerCacheMetadata.create(2, 8, 1, KV_HEADS, DIM), 0)
    assert plain.key_scales is None and plain.value_scales is None


@pytest.mark.parametrize("family", ["contiguous", "paged"])
def test_donated_quantised_writes_are_in_place(family):
    if family == "contiguous":
        cache = TransformerCache.init_cache(
            TransformerCacheMetadata.create(2, 1024, 1, KV_HEADS, DIM, **CODECS["int4"])
        )
        runtime = None
        key = jnp.ones((2, 1, KV_HEADS, DIM))
        names = ("keys", "key_scales")
    else:
        metadata = PagedCacheMetadata.create(
            1, 256, PAGE_SIZE, KV_HEADS, DIM, 1, 4, **CODECS["int8"]
        )
        cache = PagedCache.init_cache(metadata)
        manager = PageManager(256, PAGE_SIZE, 1, 4, token_buckets=(4,))
        manager.add_sequence("a", [1, 2, 3])
        runtime = paged_runtime(manager.schedule([("a", 3)]))
        key = jnp.ones((4, KV_HEADS, DIM))
        names = ("key_pages", "value_scales")

    def write(cache, key):
        _, view = cache[0].concatenate_to_cache(key, key, runtime)
        return cache.replace_view(0, view)

    step = jax.jit(write, donate_argnums=0)
    cache = step(cache, key)
    before = [getattr(cache[0], name).unsafe_buffer_pointer() for name in names]
    cache = step(cache, key)
    assert [getattr(cache[0], name).unsafe_buffer_pointer() for name in names] == before


def _float_sizes(hlo: str) -> dict[str, int]:
    """Element counts of the float arrays a compiled module mentions, by shape string."""
    shapes = set(re.findall(r"f(?:32|16|64)\[[0-9,]+\]", hlo))
    return {s: int(np.prod([int(n) for n in s[s.index("[") + 1 : -1].split(",")])) for s in shapes}


@pytest.mark.parametrize("name", CODECS)
def test_decode_step_never_builds_a_full_precision_copy_of_the_cache(name):
    """The compiled decode step holds float blocks only: no float array of the cache's size."""
    capacity, block = 1024, 64
    metadata = TransformerCacheMetadata.create(2, capacity, 1, KV_HEADS, DIM, **CODECS[name])
    view = TransformerCacheView.init(metadata, 0)
    query = jnp.ones((2, 1, Q_HEADS, DIM))
    token = jnp.ones((2, 1, KV_HEADS, DIM))

    def decode(view, query, token):
        kv, view = view.concatenate_to_cache(token, token)
        return attention(query, kv, block_size=block), view

    sizes = _float_sizes(jax.jit(decode).lower(view, query, token).compile().as_text())
    # One dequantised block (int4: its even and its odd channels, read as two halves).
    run = DIM // 2 if name == "int4" else DIM
    assert f"f32[2,{block},{KV_HEADS},{run}]" in sizes
    assert max(sizes.values()) < capacity * KV_HEADS * DIM, sorted(sizes)

    paged = PagedCacheMetadata.create(1, 256, 16, KV_HEADS, DIM, 2, 16, **CODECS[name])
    manager = PageManager(256, 16, 2, 16, token_buckets=(2,))
    for seq in range(2):
        manager.add_sequence(seq, [1])
    runtime = paged_runtime(manager.schedule([(0, 1), (1, 1)]))
    pool = PagedCacheView.init(paged, 0)
    token = jnp.ones((2, KV_HEADS, DIM))

    def paged_decode(view, token, runtime):
        kv, view = view.concatenate_to_cache(token, token, runtime)
        return attention(jnp.ones((2, Q_HEADS, DIM)), kv, block_size=64), view

    sizes = _float_sizes(jax.jit(paged_decode).lower(pool, token, runtime).compile().as_text())
    assert max(sizes.values()) < 16 * 16 * KV_HEADS * DIM, sorted(sizes)  # < one sequence


# --------------------------------------------------------------------------------------------
# Metadata, PyTree, validation, other view operations
# --------------------------------------------------------------------------------------------


def _both_metadata(**kwargs):
    return (
        TransformerCacheMetadata.create(2, 16, 2, KV_HEADS, DIM, **kwargs),
        PagedCacheMetadata.create(2, 8, PAGE_SIZE, KV_HEADS, DIM, 2, 4, **kwargs),
    )


@pytest.mark.parametrize("name", ["none", *CODECS])
def test_metadata_round_trips_and_is_static(name):
    for metadata in _both_metadata(**CODECS.get(name, {})):
        assert type(metadata).from_json(metadata.to_json()) == metadata
        assert type(metadata).from_dict(metadata.to_dict()) == metadata
        assert hash(metadata) == hash(type(metadata).from_json(metadata.to_json()))
        assert metadata.kv_quantization == name
        assert jax.tree_util.tree_leaves(metadata) == []
    # A dict written before codecs existed still loads, as an unquantised cache.
    old = TransformerCacheMetadata.create(2, 16, 1, KV_HEADS, DIM).to_dict()
    del old["kv_quantization"], old["quantization_group_size"]
    assert TransformerCacheMetadata.from_dict(old).codec is None


def test_int4_default_group_size_is_fixed_in_the_metadata():
    for metadata in _both_metadata(kv_quantization="int4"):
        assert metadata.quantization_group_size == DIM  # min(64, head dim)
        assert json.loads(metadata.to_json())["quantization_group_size"] == DIM
    big = TransformerCacheMetadata.create(1, 8, 1, 1, 128, kv_quantization="int4")
    assert big.quantization_group_size == 64
    plain = TransformerCacheMetadata.create(1, 8, 1, 1, 128)
    assert plain.replace(kv_quantization="int4").quantization_group_size == 64


def test_views_are_pytrees_and_jit_specialises_on_the_codec():
    traces = []

    @jax.jit
    def write(view, key):
        traces.append(view.metadata.kv_quantization)
        return view.concatenate_to_cache(key, key)[1]

    key = jnp.ones((2, 1, KV_HEADS, DIM))
    for name in ("int8", "int8", "fp8"):
        metadata = TransformerCacheMetadata.create(2, 16, 1, KV_HEADS, DIM, **CODECS[name])
        view = write(TransformerCacheView.init(metadata, 0), key)
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(view)]
        assert paths == [
            ".keys",
            ".values",
            ".lengths",
            ".overflow",
            ".key_scales",
            ".value_scales",
        ]
        leaves, treedef = jax.tree_util.tree_flatten(view)
        rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
        assert rebuilt.metadata == metadata
        np.testing.assert_array_equal(rebuilt.key_scales, view.key_scales)
    assert traces == ["int8", "fp8"]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"kv_quantization": "int2"}, ValueError, "kv_quantization must be one of"),
        ({"kv_quantization": 8}, ValueError, "kv_quantization must be one of"),
        (
            {"kv_quantization": "int4", "quantization_group_size": 6},
            ValueError,
            "quantization_group_size=6 must divide",
        ),
        (
            {"kv_quantization": "int4", "quantization_group_size": 0},
            ValueError,
            "quantization_group_size must be >= 1",
        ),
        (
            {"kv_quantization": "int8", "quantization_group_size": 8},
            ValueError,
            "quantization_group_size applies to kv_quantization='int4' only",
        ),
        (
            {"kv_quantization": "int4", "quantization_group_size": "8"},
            TypeError,
            "quantization_group_size must be an int or None",
        ),
    ],
)
def test_metadata_validation_names_the_field(kwargs, error, message):
    for build in (
        lambda: TransformerCacheMetadata.create(2, 16, 1, KV_HEADS, DIM, **kwargs),
        lambda: PagedCacheMetadata.create(1, 8, 4, KV_HEADS, DIM, 2, 4, **kwargs),
        lambda: TransformerCacheMetadata.create(2, 16, 1, KV_HEADS, DIM).replace(**kwargs),
    ):
        with pytest.raises(error, match=message):
            build()


def test_int4_needs_even_head_dims():
    with pytest.raises(ValueError, match="value_dim must be even, got 7"):
        TransformerCacheMetadata.create(1, 8, 1, 1, key_dim=8, value_dim=7, kv_quantization="int4")
    with pytest.raises(ValueError, match="head_dim must be even, got 5"):
        PagedCacheMetadata.create(1, 8, 4, 1, 5, 1, 2, kv_quantization="int4")


def test_reset_rows_and_truncate_keep_the_scales():
    metadata = TransformerCacheMetadata.create(2, 16, 1, KV_HEADS, DIM, **CODECS["fp8"])
    cache = TransformerCache.init_cache(metadata)
    key = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, KV_HEADS, DIM)))
    _, view = cache[0].concatenate_to_cache(key, key)
    for changed in (view.reset_rows([0]), view.truncate(jnp.asarray([2, 3]))):
        assert changed.key_scales is view.key_scales and changed.value_scales is view.value_scales
    np.testing.assert_array_equal(view.truncate(jnp.asarray([2, 3])).lengths, [2, 3])


def test_attention_rejects_scales_that_do_not_match_the_codec():
    metadata = TransformerCacheMetadata.create(1, 8, 1, KV_HEADS, DIM, **CODECS["int8"])
    view = TransformerCacheView.init(metadata, 0)
    token = jnp.ones((1, 1, KV_HEADS, DIM))
    kv, _ = view.concatenate_to_cache(token, token)
    query = jnp.ones((1, 1, Q_HEADS, DIM))
    for segment in (
        dataclasses.replace(kv.segments[0], key_scales=None),  # a codec without scales
        dataclasses.replace(kv.segments[0], codec=None),  # scales without a codec
    ):
        with pytest.raises(ValueError, match="key_scales and value_scales must be given exactly"):
            attention(query, CachedKV((segment,), kv.query_positions, kv.overflow))
    pool = PagedCacheView.init(
        PagedCacheMetadata.create(1, 4, 4, KV_HEADS, DIM, 1, 2, **CODECS["int8"]), 0
    )
    paged = PagedKV(
        key_pages=pool.key_pages,
        value_pages=pool.value_pages,
        page_tables=jnp.zeros((1, 2), jnp.int32),
        context_lens=jnp.ones((1,), jnp.int32),
        query_start_loc=jnp.asarray([0, 1], jnp.int32),
        query_positions=jnp.zeros((1,), jnp.int32),
        codec=pool.metadata.codec,
    )
    with pytest.raises(ValueError, match="paged_attention: kv.key_scales and kv.value_scales"):
        attention(jnp.ones((1, Q_HEADS, DIM)), paged)
