"""Caches on disk: every family and codec round-trips bit for bit (a row into another row of
another cache, a paged sequence into other pages of a fresh pool, a whole cache), fingerprints
refuse the wrong file field by field, truncated and damaged files are caught by their checksums,
newer layouts and wrong targets are refused with the argument named, and a failed write never
leaves a partial file or loses the old one.

Caches are small and hold real data: written through ``concatenate_to_cache`` (and ``read`` for
recurrent views) with random keys, values and states and ragged row counts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from jaxkv.caches import (
    HybridCache,
    HybridCacheMetadata,
    LinearAttentionCacheMetadata,
    Mamba2CacheMetadata,
    MambaCacheMetadata,
    PagedCache,
    PagedCacheMetadata,
    PagedCacheView,
    RecurrentCache,
    RecurrentRuntimeMetadata,
    TransformerCache,
    TransformerCacheMetadata,
    TransformerCacheView,
    TransformerRuntimeMetadata,
)
from jaxkv.engine.step_inputs import hybrid_page_manager, paged_runtime
from jaxkv.io import (
    CACHE_LAYOUT_VERSION,
    CacheFileCorruptedError,
    CacheFileError,
    CacheFileVersionError,
    CacheFingerprint,
    CacheTargetMismatchError,
    FingerprintMismatchError,
    Tokenizer,
    cache_store,
    hash_model_file,
    hash_text,
    hash_tokens,
    load_cache,
    read_cache_info,
    save_cache,
    tokenizer_identity,
)
from jaxkv.ops import attention
from jaxkv.pages import PageManager

MODEL = hash_text("a model file")  # stands for hash_model_file(path) of a real checkpoint
TOKENIZER = "tokenizer-1"
TEMPLATE = "{{ messages }}"
BUCKET = 16  # the paged tests' one token bucket


def _fingerprint(cache, tokens):
    return CacheFingerprint.create(
        cache, tokens, model_sha256=MODEL, tokenizer_id=TOKENIZER, chat_template=TEMPLATE
    )


def _tokens(count, start=100):
    return list(range(start, start + count))


def _bits(array):
    array = np.asarray(array)
    return array.dtype, array.shape, np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _assert_same_bits(got, want):
    got_dtype, got_shape, got_bytes = _bits(got)
    want_dtype, want_shape, want_bytes = _bits(want)
    assert (got_dtype, got_shape) == (want_dtype, want_shape)
    np.testing.assert_array_equal(got_bytes, want_bytes)


def _assert_same_leaves(got, want):
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for got_leaf, want_leaf in zip(got_leaves, want_leaves, strict=True):
        _assert_same_bits(got_leaf, want_leaf)


def _pages(pool, pages):
    return np.asarray(pool)[np.asarray(pages, dtype=np.int64)]


def _snapshot(cache):
    return [np.array(leaf) for leaf in jax.tree.leaves(cache)]


def _assert_unchanged(cache, before):
    for got, want in zip(_snapshot(cache), before, strict=True):
        _assert_same_bits(got, want)


def _arrays(view):
    return {
        name: value
        for name, value in vars(view).items()
        if isinstance(value, jax.Array) and name != "overflow"
    }


def _assert_row_copied(source, source_row, loaded, loaded_row, length):
    """Row ``loaded_row`` of view ``loaded`` holds row ``source_row`` of ``source``: the same
    bits, a contiguous row's slots past ``length`` zeroed, no overflow flag."""
    assert set(_arrays(source)) == set(_arrays(loaded))
    for name, array in _arrays(source).items():
        want, got = np.asarray(array)[source_row], np.asarray(getattr(loaded, name))[loaded_row]
        if want.shape != got.shape:  # a contiguous row's slots: the target's capacity differs
            _assert_same_bits(got[:length], want[:length])
            assert not got[length:].any()
        else:
            _assert_same_bits(got, want)
    if getattr(loaded, "overflow", None) is not None:
        assert not np.asarray(loaded.overflow)[loaded_row]


@jax.jit
def _write_kv(view, key, value, runtime):
    return view.concatenate_to_cache(key, value, runtime)[1]


@functools.partial(jax.jit, static_argnums=2)
def _write_state(view, runtime, new_tokens, conv_input, state):
    step = view.read(runtime, new_tokens, conv_input)
    return view.concatenate_to_cache(step, state)[1]


def _write(view, counts, rng):
    """One ragged write of ``counts[b]`` real tokens per row, through the view's own API
    (jitted: one compilation per configuration instead of one per operation)."""
    new_tokens = max(max(counts), 1)
    m = view.metadata
    if isinstance(view, TransformerCacheView):
        batch = m.batch_size
        key = rng.standard_normal((batch, new_tokens, m.num_kv_heads, m.head_dim))
        value = rng.standard_normal((batch, new_tokens, m.value_heads, m.value_dim))
        runtime = TransformerRuntimeMetadata.create(counts)
        return _write_kv(view, jnp.asarray(key), jnp.asarray(value), runtime)
    runtime = RecurrentRuntimeMetadata.create(counts)
    conv_input = None
    if hasattr(view, "conv_state"):
        conv_input = jnp.asarray(rng.standard_normal((m.batch_size, new_tokens, m.conv_dim)))
    shape = m.ssm_state_shape if hasattr(view, "ssm_state") else m.state_shape
    state = jnp.asarray(rng.standard_normal(shape))
    return _write_state(view, runtime, new_tokens, conv_input, state)


def _filled(cache, writes, seed=0):
    rng = np.random.default_rng(seed)
    for counts in writes:
        cache = cache.with_views(
            None if view is None else _write(view, counts, rng) for view in cache
        )
    return cache


WRITES = ((4, 3, 0), (3, 4, 1))  # rows end with 7, 7 and 1 tokens


def _transformer(codec="none", dtype=jnp.float32, window=None, batch_size=3, max_length=12):
    metadata = TransformerCacheMetadata.create(
        batch_size=batch_size,
        max_length=max_length,
        num_layers=2,
        num_kv_heads=2,
        head_dim=8,
        value_dim=4,
        sliding_window=window,
        dtype=dtype,
        kv_quantization=codec,
    )
    return TransformerCache.init_cache(metadata)


TRANSFORMER_CASES = [
    pytest.param(codec, dtype, window, id=f"{codec}-{np.dtype(dtype).name}-{window or 'full'}")
    for codec, dtype in (
        ("none", jnp.float32),
        ("none", jnp.bfloat16),
        ("none", jnp.float16),
        ("int8", jnp.float32),
        ("int4", jnp.float32),
        ("fp8", jnp.bfloat16),
    )
    for window in (None, 4)
]


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize(("codec", "dtype", "window"), TRANSFORMER_CASES)
def test_a_transformer_row_loads_bit_for_bit_into_another_row_of_another_cache(
    tmp_path, codec, dtype, window
):
    source = _filled(_transformer(codec, dtype, window), WRITES)
    tokens = _tokens(7)
    path = tmp_path / "prompt.jkv"
    save_cache(path, source, tokens, _fingerprint(source, tokens), rows=1)

    # Another batch size and (for the full cache) another capacity.
    target = _transformer(codec, dtype, window, batch_size=2, max_length=9)
    loaded = load_cache(path, _fingerprint(target, tokens), target, rows=0)
    assert loaded.tokens == (tuple(tokens),) and loaded.token_ids == tuple(tokens)
    assert loaded.rows == (0,) and loaded.page_table is None
    for layer in range(2):
        _assert_row_copied(source[layer], 1, loaded.cache[layer], 0, length=7)
        assert np.asarray(loaded.cache[layer].lengths).tolist() == [7, 0]

    # Into another row of a cache full of data: the other rows keep theirs.
    before = _snapshot(source)
    loaded = load_cache(path, _fingerprint(source, tokens), source, rows=2)
    for layer in range(2):
        _assert_row_copied(source[layer], 1, loaded.cache[layer], 2, length=7)
        for row in (0, 1):
            _assert_row_copied(source[layer], row, loaded.cache[layer], row, length=7)
    _assert_unchanged(source, before)


@pytest.mark.parametrize(("codec", "dtype", "window"), TRANSFORMER_CASES[::3])
def test_a_whole_transformer_cache_round_trips_exactly(tmp_path, codec, dtype, window):
    source = _filled(_transformer(codec, dtype, window), WRITES)
    tokens = [_tokens(7), _tokens(7, start=200), _tokens(1, start=300)]
    path = tmp_path / "cache.jkv"
    info = save_cache(path, source, tokens, _fingerprint(source, tokens))
    assert info.num_sequences == 3 and info.source_rows == (0, 1, 2)

    target = TransformerCache.init_cache(read_cache_info(path).cache_metadata())
    loaded = load_cache(path, _fingerprint(source, tokens), target)
    _assert_same_leaves(loaded.cache, source)
    assert loaded.tokens == tuple(tuple(row) for row in tokens)


RECURRENT_CASES = [
    pytest.param(
        MambaCacheMetadata.create(3, 2, d_inner=4, state_size=2, conv_kernel=3), id="mamba"
    ),
    pytest.param(
        Mamba2CacheMetadata.create(3, 2, num_heads=2, head_dim=2, state_size=2, n_groups=1),
        id="mamba2",
    ),
    pytest.param(
        LinearAttentionCacheMetadata.create(3, 2, num_heads=2, key_dim=3, value_dim=2),
        id="linear",
    ),
    pytest.param(
        MambaCacheMetadata.create(3, 2, d_inner=4, state_size=2, dtype=jnp.bfloat16),
        id="mamba-bfloat16",
    ),
    pytest.param(
        LinearAttentionCacheMetadata.create(3, 1, 2, 2, decay=(0.5, 0.9), dtype=jnp.bfloat16),
        id="linear-bfloat16",
    ),
]


@pytest.mark.parametrize("metadata", RECURRENT_CASES)
def test_a_recurrent_row_and_a_whole_recurrent_cache_round_trip(tmp_path, metadata):
    source = _filled(RecurrentCache.init_cache(metadata), WRITES)
    tokens = _tokens(7)
    path = tmp_path / "state.jkv"
    save_cache(path, source, tokens, _fingerprint(source, tokens), rows=1)
    target = RecurrentCache.init_cache(metadata.replace(batch_size=4))
    loaded = load_cache(path, _fingerprint(source, tokens), target, rows=3)
    again = load_cache(path, _fingerprint(source, tokens), source, rows=0)
    for layer in range(metadata.num_layers):
        _assert_row_copied(source[layer], 1, loaded.cache[layer], 3, length=7)
        _assert_row_copied(source[layer], 1, again.cache[layer], 0, length=7)
        for row in (1, 2):  # the other rows keep their data
            _assert_row_copied(source[layer], row, again.cache[layer], row, length=7)

    everything = [_tokens(7), _tokens(7, start=5), _tokens(1)]
    save_cache(path, source, everything, _fingerprint(source, everything))
    whole = load_cache(
        path, _fingerprint(source, None), RecurrentCache.init_cache(metadata), rows=[0, 1, 2]
    )
    _assert_same_leaves(whole.cache, source)


def test_non_native_dtypes_are_stored_as_raw_words_with_their_true_dtype(tmp_path):
    metadata = MambaCacheMetadata.create(2, 1, d_inner=4, state_size=2, dtype=jnp.bfloat16)
    source = _filled(RecurrentCache.init_cache(metadata), ((2, 1),))
    path = tmp_path / "bf16.jkv"
    save_cache(path, source, _tokens(2), _fingerprint(source, _tokens(2)), rows=0)
    plain = safetensors.numpy.load_file(path)  # any safetensors reader opens the file
    assert plain["layer.0.ssm_state"].dtype == np.uint16
    assert plain["tokens"].tolist() == _tokens(2)
    with safe_open(path, framework="numpy") as file:
        header = json.loads(file.metadata()["header"])
    assert header["tensors"]["layer.0.ssm_state"]["dtype"] == "bfloat16"
    loaded = load_cache(
        path, _fingerprint(source, None), RecurrentCache.init_cache(metadata), rows=1
    )
    assert loaded.cache[0].ssm_state.dtype == jnp.bfloat16
    _assert_same_bits(loaded.cache[0].ssm_state[1], source[0].ssm_state[0])


def _hybrid_metadata(batch_size=2, max_length=10):
    return HybridCacheMetadata.create(
        ("attention", "mamba2", "sliding_attention", "none", "linear_attention"),
        batch_size=batch_size,
        attention=dict(max_length=max_length, num_kv_heads=1, head_dim=4, kv_quantization="int8"),
        sliding_attention=dict(max_length=max_length, num_kv_heads=1, head_dim=4, sliding_window=3),
        mamba2=dict(num_heads=2, head_dim=2, state_size=2, n_groups=1, conv_kernel=3),
        linear_attention=dict(num_heads=2, key_dim=2),
    )


def test_a_contiguous_hybrid_row_round_trips(tmp_path):
    source = _filled(HybridCache.init_cache(_hybrid_metadata()), ((4, 2), (3, 2)))
    tokens = _tokens(4)
    path = tmp_path / "hybrid.jkv"
    save_cache(path, source, tokens, _fingerprint(source, tokens), rows=1)
    target = HybridCache.init_cache(_hybrid_metadata(batch_size=3, max_length=12))
    loaded = load_cache(path, _fingerprint(target, tokens), target, rows=2)
    assert loaded.cache[3] is None and loaded.cache.metadata == target.metadata
    for layer in (0, 1, 2, 4):
        _assert_row_copied(source[layer], 1, loaded.cache[layer], 2, length=4)
    assert np.asarray(loaded.cache.lengths()).tolist() == [0, 0, 4]


# -- paged ------------------------------------------------------------------------------------


def _paged_metadata(num_pages, codec="none"):
    return PagedCacheMetadata.create(
        num_layers=2,
        num_pages=num_pages,
        page_size=4,
        num_kv_heads=2,
        head_dim=8,
        batch_size=2,
        max_pages_per_seq=4,
        kv_quantization=codec,
    )


def _manager(num_pages):
    return PageManager(num_pages, 4, 2, 4, enable_prefix_caching=False, token_buckets=(BUCKET,))


def _occupy(manager, seq_id, count):
    """A sequence that holds ``count`` tokens' pages, so the next one gets other page ids."""
    manager.add_sequence(seq_id, _tokens(count, start=1))
    manager.commit_step(manager.schedule([(seq_id, count)]))


@jax.jit
def _paged_step(cache, runtime, keys, values, query):
    outputs, views = [], []
    for view, key, value in zip(cache, keys, values, strict=True):
        kv, view = view.concatenate_to_cache(key, value, runtime)
        outputs.append(attention(query, kv))
        views.append(view)
    return outputs, cache.with_views(views)


def _run_step(cache, step, rng, query=None):
    """Write the step's keys and values into every layer; return (attention outputs of
    ``query: [BUCKET, 4, head_dim]``, cache)."""
    m = cache[0].metadata
    keys, values = (
        [jnp.asarray(rng.standard_normal((BUCKET, m.num_kv_heads, dim))) for _ in cache]
        for dim in (m.head_dim, m.value_dim)
    )
    if query is None:
        query = jnp.zeros((BUCKET, 4, m.head_dim))
    return _paged_step(cache, paged_runtime(step), keys, values, query)


@pytest.mark.parametrize("codec", ["none", "int4"])
def test_a_paged_sequence_loads_into_other_pages_of_a_fresh_pool(tmp_path, codec):
    prompt = _tokens(10)
    source_manager = _manager(8)
    _occupy(source_manager, "other", 3)
    source_manager.add_sequence("a", prompt)
    step = source_manager.schedule([("a", len(prompt))])
    _, source = _run_step(
        PagedCache.init_cache(_paged_metadata(8, codec)), step, np.random.default_rng(0)
    )
    source_manager.commit_step(step)
    source_pages = source_manager.get_sequence("a").page_ids
    path = tmp_path / "paged.jkv"
    info = save_cache(path, source, prompt, _fingerprint(source, prompt), pages=source_pages)
    assert info.source_page_table == source_pages and info.num_pages == 3

    # The engine's way in: register the prompt, let the manager allocate its pages, load the
    # file into them, commit.
    target_manager = _manager(12)
    _occupy(target_manager, "x", 13)
    info = read_cache_info(path)
    target_manager.add_sequence("b", info.token_ids)
    step = target_manager.schedule([("b", len(info.token_ids))])
    pages = target_manager.get_sequence("b").page_ids
    assert pages != source_pages  # really other page ids
    target = PagedCache.init_cache(_paged_metadata(12, codec))
    loaded = load_cache(path, _fingerprint(target, prompt), target, pages=pages)
    target_manager.commit_step(step)
    assert loaded.page_table == pages and loaded.rows is None

    for layer in range(2):
        for name in ("key_pages", "value_pages", "key_scales", "value_scales"):
            saved = getattr(source[layer], name)
            if saved is None:
                continue
            _assert_same_bits(
                _pages(getattr(loaded.cache[layer], name), pages), _pages(saved, source_pages)
            )
        untouched = np.setdiff1d(np.arange(12), pages)
        assert not _pages(loaded.cache[layer].key_pages, untouched).any()

    # One more decode token in both pools reads the same history: the same attention output.
    query = jnp.asarray(np.random.default_rng(2).standard_normal((BUCKET, 4, 8)))
    outputs = []
    for manager, seq_id, cache in (
        (source_manager, "a", source),
        (target_manager, "b", loaded.cache),
    ):
        manager.append_tokens(seq_id, [7])
        step = manager.schedule([(seq_id, 1)])
        out, _ = _run_step(cache, step, np.random.default_rng(1), query)
        outputs.append([np.asarray(layer_out[0]) for layer_out in out])
    for got, want in zip(outputs[1], outputs[0], strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_pages_a_prefix_cache_hit_already_holds_are_kept_and_the_rest_loaded(tmp_path):
    prompt = _tokens(10)
    manager = PageManager(8, 4, 2, 4, enable_prefix_caching=True, token_buckets=(BUCKET,))
    manager.add_sequence("a", prompt)
    step = manager.schedule([("a", len(prompt))])
    _, cache = _run_step(PagedCache.init_cache(_paged_metadata(8)), step, np.random.default_rng(0))
    manager.commit_step(step)
    source_pages = manager.get_sequence("a").page_ids
    path = tmp_path / "paged.jkv"
    fingerprint = _fingerprint(cache, prompt)
    save_cache(path, cache, prompt, fingerprint, pages=source_pages)

    # The same prompt again: its two full pages are prefix-cache hits, the third is new.
    hit = manager.add_sequence("b", prompt)
    step = manager.schedule([("b", len(prompt) - hit)])
    held = manager.get_sequence("b").page_ids
    assert hit == 8 and held[:2] == source_pages[:2] and held[2] != source_pages[2]
    pages = [-1] * (hit // 4) + list(held[hit // 4 :])
    loaded = load_cache(path, fingerprint, cache, pages=pages)
    manager.commit_step(step)
    assert loaded.page_table == tuple(pages)
    others = np.setdiff1d(np.arange(8), held[2:])
    for layer in range(2):
        got, want = loaded.cache[layer].key_pages, cache[layer].key_pages
        _assert_same_bits(_pages(got, held), _pages(want, source_pages))
        _assert_same_bits(_pages(got, others), _pages(want, others))  # nothing else written


def _paged_hybrid_metadata(num_pages):
    paging = dict(num_pages=num_pages, page_size=4, max_pages_per_seq=3)
    return HybridCacheMetadata.create(
        ("attention", "mamba", "sliding_attention"),
        batch_size=2,
        attention=dict(paging, num_kv_heads=1, head_dim=4),
        sliding_attention=dict(paging, num_kv_heads=1, head_dim=4, sliding_window=3),
        mamba=dict(d_inner=4, state_size=2, conv_kernel=3),
        attention_backend="paged",
    )


def _hybrid_step(cache, manager, seq_id, prompt, slot, rng):
    manager.add_sequence(seq_id, prompt)
    step = manager.schedule([(seq_id, len(prompt))])
    runtime = paged_runtime(step)
    views = []
    for view in cache:
        if isinstance(view, PagedCacheView):
            m = view.metadata
            key = jnp.asarray(rng.standard_normal((BUCKET, m.num_kv_heads, m.head_dim)))
            view = view.concatenate_to_cache(key, key, runtime)[1]
        else:
            counts = [len(prompt) if row == slot else 0 for row in range(2)]
            view = _write(view, counts, rng)
        views.append(view)
    manager.commit_step(step)
    return cache.with_views(views)


def test_a_paged_hybrid_sequence_loads_into_another_slot_and_other_pages(tmp_path):
    prompt = _tokens(6)
    metadata = _paged_hybrid_metadata(8)
    source_manager = hybrid_page_manager(metadata, token_buckets=(BUCKET,))
    source = _hybrid_step(
        HybridCache.init_cache(metadata), source_manager, "a", prompt, 1, np.random.default_rng(0)
    )
    source_pages = source_manager.get_sequence("a").page_ids
    path = tmp_path / "hybrid-paged.jkv"
    save_cache(path, source, prompt, _fingerprint(source, prompt), rows=1, pages=source_pages)

    target_metadata = _paged_hybrid_metadata(10)
    target_manager = hybrid_page_manager(target_metadata, token_buckets=(BUCKET,))
    _occupy(target_manager, "x", 9)
    target_manager.add_sequence("b", prompt)
    step = target_manager.schedule([("b", len(prompt))])
    pages = target_manager.get_sequence("b").page_ids
    assert pages != source_pages
    target = HybridCache.init_cache(target_metadata)
    loaded = load_cache(path, _fingerprint(target, prompt), target, rows=0, pages=pages)
    target_manager.commit_step(step)
    _assert_row_copied(source[1], 1, loaded.cache[1], 0, length=6)
    for layer in (0, 2):
        _assert_same_bits(
            _pages(loaded.cache[layer].key_pages, pages),
            _pages(source[layer].key_pages, source_pages),
        )


# -- fingerprints -----------------------------------------------------------------------------


def _saved(tmp_path, codec="int8"):
    source = _filled(_transformer(codec), WRITES)
    tokens = _tokens(7)
    path = tmp_path / "saved.jkv"
    save_cache(path, source, tokens, _fingerprint(source, tokens), rows=0)
    return path, source, tokens


@pytest.mark.parametrize(
    ("field", "other"),
    [
        ("model_sha256", hash_text("another model")),
        ("tokenizer_id", "tokenizer-2"),
        ("chat_template_sha256", hash_text("another template")),
        ("dtype", "bfloat16"),
        ("kv_codec", "int4/g4"),
        ("page_size", 16),
        ("tokens_sha256", hash_tokens([1, 2, 3])),
        ("layout_version", CACHE_LAYOUT_VERSION + 1),
    ],
)
def test_a_fingerprint_that_differs_in_any_field_is_refused(tmp_path, field, other):
    path, source, tokens = _saved(tmp_path)
    stored = _fingerprint(source, tokens)
    target = _transformer("int8")
    before = _snapshot(target)
    with pytest.raises(FingerprintMismatchError) as caught:
        load_cache(path, stored.replace(**{field: other}), target, rows=0)
    assert caught.value.differences == {field: (getattr(stored, field), other)}
    assert f"{field}: file has {getattr(stored, field)!r}, expected {other!r}" in str(caught.value)
    assert isinstance(caught.value, CacheFileError) and isinstance(caught.value, ValueError)
    _assert_unchanged(target, before)


def test_an_expected_fingerprint_without_tokens_accepts_the_files_tokens(tmp_path):
    path, source, tokens = _saved(tmp_path)
    expected = _fingerprint(source, None)
    assert expected.tokens_sha256 is None
    loaded = load_cache(path, expected, _transformer("int8"), rows=2)
    assert loaded.token_ids == tuple(tokens)
    assert loaded.fingerprint == _fingerprint(source, tokens)


def test_fingerprint_fields_describe_the_cache():
    paged = PagedCache.init_cache(_paged_metadata(8, "int4"))
    fingerprint = _fingerprint(paged, [1, 2])
    assert (fingerprint.dtype, fingerprint.kv_codec, fingerprint.page_size) == (
        "float32",
        "int4/g8",
        4,
    )
    assert fingerprint.chat_template_sha256 == hash_text(TEMPLATE)
    assert fingerprint.layout_version == CACHE_LAYOUT_VERSION
    assert CacheFingerprint.from_dict(fingerprint.to_dict()) == fingerprint
    recurrent = RecurrentCache.init_cache(MambaCacheMetadata.create(1, 1, 4, dtype=jnp.bfloat16))
    assert _fingerprint(recurrent, None).kv_codec == "none"
    hybrid = _fingerprint(HybridCache.init_cache(_hybrid_metadata()), None)
    assert hybrid.dtype == "float32" and hybrid.page_size is None
    assert hybrid.kv_codec == "attention=int8,sliding_attention=none"
    with pytest.raises(ValueError, match="CacheFingerprint: model_sha256 must be a sha256"):
        fingerprint.replace(model_sha256="abc")
    with pytest.raises(ValueError, match="CacheFingerprint: page_size must be >= 1, got 0"):
        fingerprint.replace(page_size=0)
    with pytest.raises(ValueError, match="CacheFingerprint.from_dict: expected fields"):
        CacheFingerprint.from_dict({"model_sha256": MODEL})


def test_hash_tokens_separates_sequences():
    assert hash_tokens([[1, 2], [3]]) != hash_tokens([[1], [2, 3]])
    assert hash_tokens([1, 2, 3]) == hash_tokens([[1, 2, 3]]) == hash_tokens(np.arange(1, 4))
    assert hash_tokens([]) != hash_tokens([0])
    with pytest.raises(TypeError, match=r"hash_tokens: tokens\[1\] must be an int, got True"):
        hash_tokens([1, True])
    with pytest.raises(ValueError, match=r"token ids in \[0, 2147483647\], got -1"):
        hash_tokens([3, -1])


def test_hash_model_file_hashes_a_file_once_until_it_changes(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    reads = []
    real = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda *a, **k: reads.append(1) or real(*a, **k))
    first = hash_model_file(path)
    assert first == hashlib.sha256(path.read_bytes()).hexdigest()
    assert hash_model_file(str(path)) == first and len(reads) == 1  # remembered
    path.write_bytes(b"GGUF" + bytes(64))
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert hash_model_file(path) == hashlib.sha256(path.read_bytes()).hexdigest() != first
    assert len(reads) == 2
    with pytest.raises(ValueError, match="hash_model_file: path must be a regular file"):
        hash_model_file(tmp_path)
    with pytest.raises(TypeError, match="hash_model_file: path must be a str or os.PathLike"):
        hash_model_file(b"model.gguf")


def test_tokenizer_identity_follows_the_vocabulary_and_special_ids():
    tokens = ["<s>", "a", "b", "ab"]
    identity = tokenizer_identity(Tokenizer(tokens, ["a b"], bos_token_id=0))
    assert identity == tokenizer_identity(Tokenizer(tokens, ["a b"], bos_token_id=0))
    assert identity != tokenizer_identity(
        Tokenizer(["<s>", "a", "b", "ba"], ["b a"], bos_token_id=0)
    )
    assert identity != tokenizer_identity(Tokenizer(tokens, ["a b"], bos_token_id=1))
    with pytest.raises(
        TypeError, match="tokenizer_identity: tokenizer must be a jaxkv.io.Tokenizer"
    ):
        tokenizer_identity("gpt2")


# -- damaged files ----------------------------------------------------------------------------


@pytest.fixture
def saved_bytes(tmp_path):
    path, source, tokens = _saved(tmp_path)
    return path, path.read_bytes(), _fingerprint(source, tokens)


def _header_end(data):
    return 8 + int.from_bytes(data[:8], "little")


@pytest.mark.parametrize("cut", [0, 5, 8, 40, -200, -1])
def test_a_truncated_file_is_refused(saved_bytes, cut):
    path, data, fingerprint = saved_bytes
    path.write_bytes(data[:cut])
    with pytest.raises(CacheFileCorruptedError, match="not a complete safetensors file"):
        load_cache(path, fingerprint, _transformer("int8"), rows=0)
    with pytest.raises(CacheFileCorruptedError):
        read_cache_info(path)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(fraction=st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
def test_a_file_cut_anywhere_is_refused(saved_bytes, fraction):
    path, data, fingerprint = saved_bytes
    damaged = path.with_name("cut.jkv")
    damaged.write_bytes(data[: int(fraction * len(data))])
    with pytest.raises(CacheFileCorruptedError):
        load_cache(damaged, fingerprint, _transformer("int8"), rows=0)


def test_a_flipped_byte_in_a_tensor_is_refused(saved_bytes):
    path, data, fingerprint = saved_bytes
    damaged = bytearray(data)
    damaged[_header_end(data) + 3] ^= 0x01  # the first tensor's data
    path.write_bytes(bytes(damaged))
    target = _transformer("int8")
    before = _snapshot(target)
    with pytest.raises(CacheFileCorruptedError, match="does not match its checksum"):
        load_cache(path, fingerprint, target, rows=0)
    _assert_unchanged(target, before)


def test_a_flipped_byte_in_the_header_is_refused(saved_bytes):
    path, data, fingerprint = saved_bytes
    at = data.index(b"max_length") + 3  # inside the saved metadata, still valid JSON
    damaged = bytearray(data)
    damaged[at] = ord("X")
    path.write_bytes(bytes(damaged))
    with pytest.raises(CacheFileCorruptedError, match="header checksum"):
        load_cache(path, fingerprint, _transformer("int8"), rows=0)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(position=st.floats(min_value=0.0, max_value=1.0, exclude_max=True), bits=st.integers(1, 255))
def test_a_flipped_byte_anywhere_never_loads_wrong_data(saved_bytes, position, bits):
    path, data, fingerprint = saved_bytes
    damaged = bytearray(data)
    damaged[int(position * len(data))] ^= bits
    flipped = path.with_name("flipped.jkv")
    flipped.write_bytes(bytes(damaged))
    try:
        loaded = load_cache(flipped, fingerprint, _transformer("int8"), rows=0)
    except CacheFileError:
        return
    # Only a harmless change can load (e.g. header padding turned into other whitespace).
    _assert_same_leaves(
        loaded.cache, load_cache(path, fingerprint, _transformer("int8"), rows=0).cache
    )


def test_not_a_cache_file_is_refused(tmp_path):
    path = tmp_path / "weights.safetensors"
    safetensors.numpy.save_file({"w": np.ones(3, np.float32)}, path)
    with pytest.raises(CacheFileCorruptedError, match="not a jaxkv cache file"):
        read_cache_info(path)
    with pytest.raises(FileNotFoundError, match="load_cache: path"):
        load_cache(tmp_path / "missing.jkv", _fingerprint(_transformer(), None), _transformer())


def test_a_newer_layout_version_is_refused(tmp_path, monkeypatch):
    source = _filled(_transformer(), WRITES)
    tokens = _tokens(7)
    path = tmp_path / "future.jkv"
    monkeypatch.setattr(cache_store, "CACHE_LAYOUT_VERSION", CACHE_LAYOUT_VERSION + 1)
    future = _fingerprint(source, tokens).replace(layout_version=CACHE_LAYOUT_VERSION + 1)
    save_cache(path, source, tokens, future, rows=0)
    monkeypatch.undo()
    newer = CACHE_LAYOUT_VERSION + 1
    with pytest.raises(CacheFileVersionError, match=f"layout version {newer} is newer") as caught:
        load_cache(path, _fingerprint(source, tokens), _transformer(), rows=0)
    assert (caught.value.version, caught.value.supported) == (newer, CACHE_LAYOUT_VERSION)
    with pytest.raises(CacheFileVersionError):
        read_cache_info(path)


def test_a_file_of_an_older_layout_version_is_refused_and_the_pool_left_alone(
    tmp_path, monkeypatch
):
    # Version 1 stored paged pools [pages, page_size, kv_heads, dim]; read as today's
    # [pages, kv_heads, page_size, dim] they would be scrambled, so such a file must not load.
    prompt = _tokens(10)
    manager = _manager(8)
    manager.add_sequence("a", prompt)
    step = manager.schedule([("a", len(prompt))])
    _, source = _run_step(PagedCache.init_cache(_paged_metadata(8)), step, np.random.default_rng(0))
    manager.commit_step(step)
    pages = manager.get_sequence("a").page_ids
    path = tmp_path / "old.jkv"
    monkeypatch.setattr(cache_store, "CACHE_LAYOUT_VERSION", 1)
    old = _fingerprint(source, prompt).replace(layout_version=1)
    save_cache(path, source, prompt, old, pages=pages)
    monkeypatch.undo()
    assert read_cache_info(path).fingerprint.layout_version == 1
    target = _filled_paged_target()
    before = [np.asarray(view.key_pages).copy() for view in target]
    with pytest.raises(FingerprintMismatchError, match="layout_version"):
        load_cache(path, _fingerprint(target, prompt), target, pages=pages)
    for view, kept in zip(target, before, strict=True):
        np.testing.assert_array_equal(np.asarray(view.key_pages), kept)


def _filled_paged_target():
    """A paged cache whose pools hold random data (what a load must not disturb)."""
    rng = np.random.default_rng(9)
    cache = PagedCache.init_cache(_paged_metadata(8))
    return cache.with_views(
        [
            dataclasses.replace(
                view,
                key_pages=jnp.asarray(rng.standard_normal(view.key_pages.shape), jnp.float32),
            )
            for view in cache
        ]
    )


# -- wrong targets and arguments --------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (
            lambda: RecurrentCache.init_cache(MambaCacheMetadata.create(3, 2, 4)),
            "cache must be a TransformerCache (the file holds one), got a RecurrentCache",
        ),
        (
            lambda: TransformerCache.init_cache(
                _transformer("int8")[0].metadata.replace(num_kv_heads=1)
            ),
            "has num_kv_heads=1, but the file was saved from a cache with num_kv_heads=2",
        ),
        (
            lambda: _transformer("int8", dtype=jnp.bfloat16),
            "has dtype=bfloat16, but the file was saved from a cache with dtype=float32",
        ),
        (
            lambda: _transformer("none"),
            "has kv_quantization='none', but the file was saved from a cache with "
            "kv_quantization='int8'",
        ),
        (
            lambda: _transformer("int8", max_length=5),
            "has max_length=5, but the file holds a sequence of 7",
        ),
        (lambda: _transformer("int8", window=4), "has sliding_window=4"),
        (
            lambda: TransformerCache.init_cache(
                _transformer("int8")[0].metadata.replace(num_layers=3)
            ),
            "cache must have 2 layers like the saved cache, got 3",
        ),
        (
            lambda: TransformerCache.init_cache(_transformer("int8")[0].metadata, layers=[1]),
            "cache layer 0 has no view, but the saved cache had a TransformerCacheView there",
        ),
    ],
)
def test_a_target_that_does_not_fit_is_refused_and_left_as_it_was(tmp_path, target, message):
    path, source, tokens = _saved(tmp_path)
    cache = target()
    before = _snapshot(cache)
    with pytest.raises(CacheTargetMismatchError) as caught:
        load_cache(path, _fingerprint(source, None), cache, rows=0)
    assert message in str(caught.value) and str(path) in str(caught.value)
    _assert_unchanged(cache, before)


def test_rows_and_pages_of_a_load_are_checked(tmp_path):
    path, source, tokens = _saved(tmp_path)
    expected = _fingerprint(source, None)
    with pytest.raises(ValueError, match=r"load_cache: rows must name 1 row\(s\), one per saved"):
        load_cache(path, expected, _transformer("int8"), rows=[0, 1])
    with pytest.raises(ValueError, match=r"load_cache: rows must lie in \[0, 3\)"):
        load_cache(path, expected, _transformer("int8"), rows=3)
    with pytest.raises(CacheTargetMismatchError, match="holds 1 sequence.* cache has 3 rows"):
        load_cache(path, expected, _transformer("int8"))
    with pytest.raises(ValueError, match="load_cache: the cache has no paged layers"):
        load_cache(path, expected, _transformer("int8"), rows=0, pages=[0])
    with pytest.raises(TypeError, match="load_cache: expected_fingerprint must be"):
        load_cache(path, "fingerprint", _transformer("int8"), rows=0)

    manager = _manager(8)
    manager.add_sequence("a", _tokens(5))
    step = manager.schedule([("a", 5)])
    _, paged = _run_step(PagedCache.init_cache(_paged_metadata(8)), step, np.random.default_rng(0))
    paged_path = tmp_path / "paged.jkv"
    save_cache(paged_path, paged, _tokens(5), _fingerprint(paged, _tokens(5)), pages=[0, 1])
    expected = _fingerprint(paged, None)
    with pytest.raises(ValueError, match=r"load_cache: pages must hold 2 page id\(s\)"):
        load_cache(paged_path, expected, paged, pages=[3])
    with pytest.raises(ValueError, match=r"pages must hold page ids in \[0, 8\) or -1"):
        load_cache(paged_path, expected, paged, pages=[3, 8])
    with pytest.raises(ValueError, match="load_cache: pages must be distinct"):
        load_cache(paged_path, expected, paged, pages=[3, 3])
    with pytest.raises(ValueError, match="load_cache: a paged cache keeps no rows"):
        load_cache(paged_path, expected, paged, rows=0, pages=[3, 4])
    small = PagedCache.init_cache(_paged_metadata(8).replace(max_pages_per_seq=1))
    with pytest.raises(CacheTargetMismatchError, match="has max_pages_per_seq=1"):
        load_cache(paged_path, expected, small, pages=[3, 4])
    with pytest.raises(CacheTargetMismatchError, match="has page_size=2"):
        load_cache(
            paged_path,
            expected,
            PagedCache.init_cache(_paged_metadata(8).replace(page_size=2)),
            pages=[3, 4],
        )


def test_save_checks_its_arguments_and_writes_nothing_on_error(tmp_path):
    source = _filled(_transformer(), WRITES)
    tokens = _tokens(7)
    fingerprint = _fingerprint(source, tokens)
    path = tmp_path / "never.jkv"
    cases = [
        (
            dict(tokens=_tokens(3)),
            ValueError,
            "tokens holds 3 token ids, but row 1 of layer 0 holds 7",
        ),
        (dict(rows=3), ValueError, r"save_cache: rows must lie in \[0, 3\)"),
        (dict(rows=[0, 0]), ValueError, "save_cache: rows must be distinct"),
        (
            dict(rows=[0, 1]),
            ValueError,
            r"tokens must hold 2 token sequence\(s\), one per saved row",
        ),
        (dict(rows=True), TypeError, "save_cache: rows must be an int row id"),
        (dict(pages=[0]), ValueError, "save_cache: the cache has no paged layers"),
        (dict(tokens=[-1] * 7), ValueError, r"save_cache: tokens must hold token ids in \[0, "),
        (
            dict(fingerprint=_fingerprint(source, _tokens(7, start=1))),
            ValueError,
            "fingerprint.tokens_sha256=.* does not describe what is saved",
        ),
        (
            dict(fingerprint=_fingerprint(_transformer(dtype=jnp.bfloat16), tokens)),
            ValueError,
            "fingerprint.dtype='bfloat16' does not describe what is saved",
        ),
        (
            dict(fingerprint=fingerprint.to_dict()),
            TypeError,
            "fingerprint must be a CacheFingerprint",
        ),
        (dict(cache=source[0]), TypeError, "save_cache: cache must be one of TransformerCache"),
        (dict(path=b"x.jkv"), TypeError, "save_cache: path must be a str or os.PathLike"),
        (dict(path=tmp_path / "no" / "x.jkv"), FileNotFoundError, "path's directory"),
        (dict(path=tmp_path), ValueError, "path must be a file path, got the directory"),
    ]
    for changes, error, message in cases:
        arguments = dict(path=path, cache=source, tokens=tokens, fingerprint=fingerprint, rows=1)
        arguments.update(changes)
        rows, pages = arguments.pop("rows"), arguments.pop("pages", None)
        with pytest.raises(error, match=message):
            save_cache(**arguments, rows=rows, pages=pages)
    assert os.listdir(tmp_path) == []

    paged = PagedCache.init_cache(_paged_metadata(8))
    paged_fingerprint = _fingerprint(paged, _tokens(5))
    with pytest.raises(ValueError, match="so pages must give the sequence's page ids"):
        save_cache(path, paged, _tokens(5), paged_fingerprint)
    with pytest.raises(ValueError, match=r"5 tokens fill 2 page\(s\) of 4, so pages must hold 2"):
        save_cache(path, paged, _tokens(5), paged_fingerprint, pages=[0, 1, 2])
    with pytest.raises(ValueError, match="a paged cache keeps no rows on the device"):
        save_cache(path, paged, _tokens(5), paged_fingerprint, rows=0, pages=[0, 1])
    assert os.listdir(tmp_path) == []


# -- atomic writes ----------------------------------------------------------------------------


def _failing_write(file, payload):
    file.write(payload[: len(payload) // 2])
    raise OSError("disk full")


def test_a_write_that_fails_midway_keeps_the_old_file_and_leaves_nothing_behind(
    tmp_path, monkeypatch
):
    path, source, tokens = _saved(tmp_path)
    good = path.read_bytes()
    other = _tokens(7, start=200)
    monkeypatch.setattr(cache_store, "_write_all", _failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_cache(path, source, other, _fingerprint(source, other), rows=1)
    assert path.read_bytes() == good and os.listdir(tmp_path) == [path.name]
    fresh = tmp_path / "fresh.jkv"
    with pytest.raises(OSError, match="disk full"):
        save_cache(fresh, source, other, _fingerprint(source, other), rows=1)
    assert not fresh.exists() and os.listdir(tmp_path) == [path.name]
    monkeypatch.undo()
    assert read_cache_info(path).token_ids == tuple(tokens)


def test_a_failed_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path, source, tokens = _saved(tmp_path)
    good = path.read_bytes()

    def refuse(source, destination):
        raise OSError("read-only file system")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="read-only file system"):
        save_cache(path, source, _tokens(7, 200), _fingerprint(source, _tokens(7, 200)), rows=1)
    monkeypatch.undo()
    assert path.read_bytes() == good and os.listdir(tmp_path) == [path.name]
    save_cache(path, source, _tokens(7, 200), _fingerprint(source, _tokens(7, 200)), rows=1)
    assert read_cache_info(path).token_ids == tuple(_tokens(7, 200))  # a later save replaces it
