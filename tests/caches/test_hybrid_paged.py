"""Hybrid caches with the paged attention backend: metadata (paged pools per attention layer,
shared paging geometry, rows = max_num_seqs, exact serialisation), the hybrid runtime built from a
``PageManager`` step (slot layout against a hand-written expectation, packing round trips, exact
serialisation, validation), and the cache operations that treat paged layers specially."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.caches.hybrid import (
    HybridCache,
    HybridCacheMetadata,
    HybridPagedMetadata,
)
from jaxkv.caches.paged import PagedCacheMetadata, PagedCacheView, PagedRuntimeMetadata
from jaxkv.caches.recurrent import Mamba2CacheView, MambaCacheView, RecurrentMetadata
from jaxkv.engine.step_inputs import hybrid_page_managers, hybrid_paged_runtime
from jaxkv.pages import HybridStep, PageManager

KINDS = ("attention", "mamba2", "sliding_attention", "none", "mamba", "attention")
PAGING = dict(num_pages=12, page_size=4, max_pages_per_seq=3)


def _settings(**overrides):
    settings = dict(
        batch_size=3,
        attention=dict(PAGING, num_kv_heads=1, head_dim=4),
        sliding_attention=dict(PAGING, num_kv_heads=1, head_dim=4, sliding_window=3),
        mamba=dict(d_inner=6, state_size=2, conv_kernel=3),
        mamba2=dict(num_heads=2, head_dim=2, state_size=2, n_groups=1),
        attention_backend="paged",
    )
    settings.update(overrides)
    return settings


def _metadata(**overrides):
    return HybridCacheMetadata.create(KINDS, **_settings(**overrides))


def test_paged_backend_builds_one_pool_per_attention_layer():
    metadata = _metadata()
    cache = HybridCache.init_cache(metadata)
    types = [type(view) if view is not None else None for view in cache]
    assert types == [
        PagedCacheView,
        Mamba2CacheView,
        PagedCacheView,
        None,
        MambaCacheView,
        PagedCacheView,
    ]
    assert metadata.attention.num_layers == 2 and metadata.attention.max_num_seqs == 3
    assert cache[0].key_pages.shape == (12, 1, 4, 4)  # [pages, kv_heads, page_size, dim]
    assert cache[2].metadata.sliding_window == 3 and cache[0].metadata.sliding_window is None
    assert cache[0].key_pages is not cache[5].key_pages
    assert metadata.batch_size == 3
    assert metadata.paged_geometry() == dict(
        num_pages=12, page_size=4, max_num_seqs=3, max_pages_per_seq=3
    )
    allocated = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(cache))
    assert allocated == metadata.bytes_total()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_paged_metadata_round_trips_exactly(dtype):
    metadata = _metadata(attention=dict(PAGING, num_kv_heads=1, head_dim=4, dtype=dtype))
    for restored in (
        HybridCacheMetadata.from_json(metadata.to_json()),
        HybridCacheMetadata.from_dict(metadata.to_dict()),
    ):
        assert restored == metadata and hash(restored) == hash(metadata)
        assert isinstance(restored.attention, PagedCacheMetadata)
        assert isinstance(restored.sliding_attention, PagedCacheMetadata)
        assert restored.attention.dtype == np.dtype(dtype)
        assert restored.attention_backend == "paged"
    data = metadata.to_dict()
    data["attention"]["max_length"] = 8
    with pytest.raises(ValueError, match=r"PagedCacheMetadata.from_dict: unknown field"):
        HybridCacheMetadata.from_dict(data)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (
            dict(
                sliding_attention=dict(
                    PAGING, page_size=8, num_kv_heads=1, head_dim=4, sliding_window=3
                )
            ),
            ValueError,
            "attention.page_size=4 and sliding_attention.page_size=8 must be equal",
        ),
        (
            dict(
                sliding_attention=dict(
                    PAGING, max_pages_per_seq=2, num_kv_heads=1, head_dim=4, sliding_window=3
                )
            ),
            ValueError,
            "attention.max_pages_per_seq=3 and sliding_attention.max_pages_per_seq=2 must be equal",
        ),
        (
            dict(attention=PagedCacheMetadata.create(2, 12, 4, 1, 4, 5, 3)),
            ValueError,
            "attention.batch_size=5 must equal batch_size=3",
        ),
        (
            dict(attention=dict(PAGING, num_kv_heads=1, head_dim=4, max_num_seqs=3)),
            ValueError,
            "attention settings must not give max_num_seqs",
        ),
        (
            dict(attention=dict(max_length=8, num_kv_heads=1, head_dim=4)),
            TypeError,
            "attention settings do not fit PagedCacheMetadata.create",
        ),
        (
            dict(attention=dict(PAGING, num_kv_heads=1, head_dim=4, sliding_window=2)),
            ValueError,
            "attention.sliding_window must be None",
        ),
        (
            dict(attention=dict(PAGING, page_size=0, num_kv_heads=1, head_dim=4)),
            ValueError,
            "page_size must be >= 1, got 0",
        ),
    ],
)
def test_paged_metadata_validation_names_the_field(overrides, error, message):
    with pytest.raises(error, match=message):
        _metadata(**overrides)


def test_backend_and_metadata_class_must_agree():
    contiguous = _metadata(
        attention=dict(max_length=8, num_kv_heads=1, head_dim=4),
        sliding_attention=dict(max_length=8, num_kv_heads=1, head_dim=4, sliding_window=3),
        attention_backend="contiguous",
    )
    with pytest.raises(TypeError, match=r"attention must be PagedCacheMetadata \(attention_"):
        contiguous.replace(attention_backend="paged")
    with pytest.raises(ValueError, match="paged_geometry: needs attention_backend='paged'"):
        contiguous.paged_geometry()
    with pytest.raises(ValueError, match="every kind must have the same batch_size"):
        _metadata().replace(mamba=_metadata().mamba.replace(batch_size=2))
    recurrent_only = HybridCacheMetadata.create(
        ("mamba",), batch_size=2, mamba=dict(d_inner=4), attention_backend="paged"
    )
    with pytest.raises(ValueError, match="at least one attention layer"):
        recurrent_only.paged_geometry()


def _manager(metadata=None):
    metadata = metadata or _metadata()
    return PageManager(
        **metadata.paged_geometry(), enable_prefix_caching=False, token_buckets=(8, 16)
    )


def _step(manager, batch, prompts):
    for seq_id, prompt in prompts.items():
        manager.add_sequence(seq_id, prompt)
    return manager.schedule(batch)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_from_step_lays_each_scheduled_sequence_into_its_slot(padding_side):
    # Scheduled rows: "b" (3 new tokens, packed 0..2), then "a" (1 new token, packed 3).
    step = _step(_manager(), [("b", 3), ("a", 1)], {"a": [5], "b": [7, 8, 9]})
    runtime = hybrid_paged_runtime(step, slots={"a": 0, "b": 2}, width=4, padding_side=padding_side)
    if padding_side == "right":
        expected = [[3, -1, -1, -1], [-1, -1, -1, -1], [0, 1, 2, -1]]
    else:
        expected = [[-1, -1, -1, 3], [-1, -1, -1, -1], [-1, 0, 1, 2]]
    np.testing.assert_array_equal(np.asarray(runtime.token_index), expected)
    assert runtime.token_index.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(runtime.recurrent.new_lengths), [1, 0, 3])
    assert runtime.recurrent.padding_side == padding_side
    assert (runtime.num_tokens, runtime.batch_size, runtime.width) == (8, 3, 4)
    assert runtime.attention.max_query_len == 4
    assert runtime.for_kind("mamba") is runtime.recurrent
    assert runtime.for_kind("sliding_attention") is runtime.attention
    assert runtime.for_kind("none") is None
    tokens = np.asarray(runtime.batch_token_ids())
    np.testing.assert_array_equal(tokens[0][np.asarray(expected[0]) >= 0], [5])
    np.testing.assert_array_equal(tokens[2][np.asarray(expected[2]) >= 0], [7, 8, 9])
    assert not tokens[1].any()
    # Packing round trip: real entries survive, padding reads zero.
    batched = jnp.arange(3 * 4 * 2, dtype=jnp.float32).reshape(3, 4, 2) + 1
    packed = runtime.to_packed(batched)
    assert packed.shape == (8, 2) and not np.asarray(packed[4:]).any()
    real = np.asarray(runtime.token_index) >= 0
    np.testing.assert_array_equal(
        np.asarray(runtime.to_batch(packed)), np.where(real[..., None], batched, 0)
    )
    np.testing.assert_array_equal(np.asarray(packed[:4]), np.asarray(batched)[real][[1, 2, 3, 0]])


def test_default_slots_and_width():
    step = _step(_manager(), [("a", 3), ("b", 2)], {"a": [1, 2, 3], "b": [4, 5]})
    runtime = hybrid_paged_runtime(step)
    # Row i takes slot i; width = longest row (3) rounded up to a power of two.
    np.testing.assert_array_equal(
        np.asarray(runtime.token_index), [[0, 1, 2, -1], [3, 4, -1, -1], [-1] * 4]
    )
    jitted = jax.jit(lambda r, x: r.to_batch(r.to_packed(x)))
    ones = jnp.ones((3, 4))
    np.testing.assert_array_equal(
        np.asarray(jitted(runtime, ones)), np.asarray(runtime.token_index) >= 0
    )


def test_runtime_round_trips_exactly():
    step = _step(_manager(), [("b", 2), ("a", 3)], {"a": [1, 2, 3], "b": [4, 5]})
    runtime = hybrid_paged_runtime(step, slots=[1, 0], width=8, padding_side="left")
    for restored in (
        HybridPagedMetadata.from_json(runtime.to_json()),
        HybridPagedMetadata.from_dict(runtime.to_dict()),
    ):
        assert isinstance(restored.attention, PagedRuntimeMetadata)
        assert restored.attention.max_query_len == 8
        assert restored.recurrent.padding_side == "left"
        before = jax.tree_util.tree_leaves(runtime)
        after = jax.tree_util.tree_leaves(restored)
        assert len(before) == len(after) == 11
        for old, new in zip(before, after, strict=True):
            assert old.dtype == new.dtype and old.shape == new.shape
            np.testing.assert_array_equal(np.asarray(old), np.asarray(new))
        assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(runtime)


def test_from_step_validation_names_the_argument():
    step = _step(_manager(), [("a", 3), ("b", 2)], {"a": [1, 2, 3], "b": [4, 5]})
    cases = [
        (dict(slots=[0]), ValueError, r"slots has 1 entries; expected one per scheduled"),
        (dict(slots=[1, 1]), ValueError, r"slots must be distinct, got \[1, 1\]"),
        (dict(slots=[0, 3]), ValueError, r"slots\[1\]=3 outside \[0, max_num_seqs=3\)"),
        (dict(slots=[0, 1.0]), TypeError, r"slots\[1\] must be an int"),
        (dict(slots={"a": 0}), ValueError, r"no entry for scheduled seq id\(s\) \['b'\]"),
        (dict(slots="ab"), TypeError, "slots must be a sequence of ints or a mapping"),
        (dict(width=2), ValueError, "width=2 is shorter than the longest row of new tokens"),
        (dict(width=0), ValueError, "width must be >= 1, got 0"),
        (dict(padding_side="top"), ValueError, "padding_side must be one of"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            hybrid_paged_runtime(step, **kwargs)
    with pytest.raises(TypeError, match="step must be a StepMetadata or HybridStep, got dict"):
        hybrid_paged_runtime({})


def test_constructor_checks_layout_consistency():
    step = _step(_manager(), [("a", 3), ("b", 2)], {"a": [1, 2, 3], "b": [4, 5]})
    good = hybrid_paged_runtime(step, width=4)
    index = np.asarray(good.token_index)
    lengths = RecurrentMetadata.create([3, 2, 0])

    def build(token_index, recurrent=lengths, attention=good.attention):
        return HybridPagedMetadata(
            attention=attention, recurrent=recurrent, token_index=jnp.asarray(token_index)
        )

    assert np.array_equal(np.asarray(build(index).token_index), index)
    with pytest.raises(ValueError, match="must count the real"):
        build(index, RecurrentMetadata.create([3, 1, 0]))
    with pytest.raises(ValueError, match="one run of consecutive packed indices"):
        build(index[:, ::-1].copy(), RecurrentMetadata.create([3, 2, 0]))
    with pytest.raises(ValueError, match="one run of consecutive packed indices"):
        build(np.where(index == 4, 5, index))
    with pytest.raises(ValueError, match=r"packed indices in \[0, 8\) or -1"):
        build(np.where(index == 4, 9, index))
    with pytest.raises(ValueError, match="names a packed token twice"):
        build(np.where(index >= 3, index - 3, index))
    with pytest.raises(ValueError, match=r"token_index must have shape \(3, \*\), got \(2, 4\)"):
        build(index[:2], RecurrentMetadata.create([3, 2]))
    with pytest.raises(ValueError, match="recurrent.new_lengths must be a"):
        build(index, RecurrentMetadata.create())
    with pytest.raises(TypeError, match="token_index must be a \\[batch, T\\] int array"):
        build(index.astype(np.float32))
    with pytest.raises(TypeError, match="attention must be PagedRuntimeMetadata"):
        build(index, attention=lengths)


def test_cache_operations_leave_paged_pools_to_the_page_manager():
    metadata = _metadata()
    cache = HybridCache.init_cache(metadata)
    page_ids = jnp.arange(12, dtype=jnp.float32)[:, None, None, None]

    def fill(view):
        if view is None:
            return None
        if isinstance(view, PagedCacheView):
            return dataclasses.replace(view, key_pages=view.key_pages + page_ids + 1)
        return dataclasses.replace(view, ssm_state=view.ssm_state + 1.0, lengths=view.lengths + 2)

    cache = cache.with_views(fill(view) for view in cache)
    reset = cache.reset_rows([1])
    assert reset[0].key_pages is cache[0].key_pages
    np.testing.assert_array_equal(np.asarray(reset.lengths()), [2, 0, 2])
    assert not np.asarray(reset[1].ssm_state[1]).any() and np.asarray(reset[1].ssm_state[0]).all()
    np.testing.assert_array_equal(np.asarray(cache.overflow_rows()), [False] * 3)
    cache.check_overflow()
    copied = cache.copy_pages(jnp.asarray([[0, 5], [-1, -1]], jnp.int32))
    for layer in (0, 2, 5):
        before, after = np.asarray(cache[layer].key_pages), np.asarray(copied[layer].key_pages)
        np.testing.assert_array_equal(after[5], before[0])
        np.testing.assert_array_equal(np.delete(after, 5, 0), np.delete(before, 5, 0))
        assert before[0].min() == 1 and before[5].min() == 6
    assert copied[1] is cache[1]
    contiguous = HybridCache.init_cache(
        HybridCacheMetadata.create(("mamba",), batch_size=2, mamba=dict(d_inner=4))
    )
    with pytest.raises(ValueError, match="copy_pages: needs attention_backend='paged'"):
        contiguous.copy_pages(jnp.full((2, 2), -1, jnp.int32))
    attention_only = HybridCache.init_cache(
        HybridCacheMetadata.create(
            ("attention",),
            batch_size=3,
            attention=dict(PAGING, num_kv_heads=1, head_dim=4),
            attention_backend="paged",
        )
    )
    with pytest.raises(ValueError, match="no view with per-row lengths"):
        attention_only.lengths()


# -- the sliding layers on their own, windowed pool ---------------------------------------------

WINDOWED_KINDS = ("attention", "sliding_attention", "sliding_attention", "attention")


def _windowed_metadata(sliding_pages: int = 5) -> HybridCacheMetadata:
    return HybridCacheMetadata.create(
        WINDOWED_KINDS,
        batch_size=2,
        attention=dict(num_pages=16, page_size=4, max_pages_per_seq=8, num_kv_heads=1, head_dim=4),
        sliding_attention=dict(
            num_pages=sliding_pages,
            page_size=4,
            max_pages_per_seq=8,
            num_kv_heads=1,
            head_dim=4,
            sliding_window=4,
        ),
        attention_backend="paged",
    )


def _windowed_step(pages, batch, prompts):
    for seq_id, prompt in prompts.items():
        pages.add_sequence(seq_id, prompt)
    return pages.schedule(batch)


def test_sliding_layers_get_their_own_smaller_pool_and_page_table():
    metadata = _windowed_metadata()
    cache = HybridCache.init_cache(metadata)
    assert cache[1].key_pages.shape[0] == 5 and cache[0].key_pages.shape[0] == 16
    assert metadata.sliding_paged_geometry() == dict(
        num_pages=5, page_size=4, max_num_seqs=2, max_pages_per_seq=8, sliding_window=4
    )
    with pytest.raises(ValueError, match="sliding_paged_geometry: needs attention_backend"):
        HybridCacheMetadata.create(
            ("attention",),
            batch_size=3,
            attention=dict(PAGING, num_kv_heads=1, head_dim=4),
            attention_backend="paged",
        ).sliding_paged_geometry()
    pages = hybrid_page_managers(metadata, window_margin=1, token_buckets=(8, 16))
    assert pages.sliding.sliding_window == 4 and pages.sliding.window_margin == 1
    assert pages.full.num_pages == 16 and pages.sliding.num_pages == 5
    step = _windowed_step(pages, [("a", 12)], {"a": list(range(20))})
    pages.commit_step(step)
    step = pages.schedule([("a", 4)])
    assert isinstance(step, HybridStep)
    runtime = hybrid_paged_runtime(step, width=4)
    sliding = runtime.for_kind("sliding_attention")
    assert (
        sliding is runtime.sliding_attention and runtime.for_kind("attention") is runtime.attention
    )
    assert (sliding.num_pages, runtime.attention.num_pages) == (5, 16)
    # 12 computed, W + M = 5: page 0 (positions 0..3) went back, its entry is -1.
    assert int(sliding.page_tables[0, 0]) == -1 and int(runtime.attention.page_tables[0, 0]) >= 0
    np.testing.assert_array_equal(np.asarray(sliding.positions), runtime.attention.positions)
    for part in (sliding, runtime.attention):  # each part's slots follow its own table
        assert int(part.slot_mapping[0]) // 4 == int(part.page_tables[0, 3])
    # Each kind writes its own pool, at its own slots; a layer refuses the other pool's plan.
    key = jnp.ones((8, 1, 4), jnp.float32)
    _, written = cache[1].concatenate_to_cache(key, key, sliding)
    rows = np.flatnonzero(np.asarray(written.key_pages).any(axis=(1, 2, 3)))
    assert rows.tolist() == [int(np.asarray(sliding.slot_mapping)[0]) // 4]
    with pytest.raises(ValueError, match="built for a pool of 16 pages"):
        cache[1].concatenate_to_cache(key, key, runtime.attention)
    # Dropping a slot drops its writes in both parts.
    dropped = runtime.drop_slots(jnp.asarray([True, False]))
    assert (np.asarray(dropped.sliding_attention.slot_mapping) == -1).all()
    assert (np.asarray(dropped.attention.slot_mapping) == -1).all()
    for restored in (
        HybridPagedMetadata.from_json(runtime.to_json()),
        HybridPagedMetadata.from_dict(runtime.to_dict()),
    ):
        assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(runtime)
        for old, new in zip(
            jax.tree_util.tree_leaves(runtime), jax.tree_util.tree_leaves(restored), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(old), np.asarray(new))
    pages.commit_step(step)
    pages.check_invariants()


def test_the_two_plans_of_a_step_must_lay_out_the_same_tokens():
    metadata = _windowed_metadata(sliding_pages=16)
    pages = hybrid_page_managers(metadata, token_buckets=(8, 16))
    step = _windowed_step(pages, [("a", 3)], {"a": [1, 2, 3], "b": [4, 5]})
    other = PageManager(**metadata.paged_geometry(), token_buckets=(8, 16))
    other.add_sequence("b", [4, 5])
    with pytest.raises(ValueError, match=r"step.full.seq_ids=\('a',\) and step.sliding.seq_ids"):
        hybrid_paged_runtime(HybridStep(full=step.full, sliding=other.schedule([("b", 2)])))
    good = hybrid_paged_runtime(step, width=4)
    shifted = good.attention.replace(positions=good.attention.positions + 1)
    with pytest.raises(ValueError, match="sliding_attention.positions .* differs"):
        dataclasses.replace(good, sliding_attention=shifted)
    with pytest.raises(TypeError, match="sliding_attention must be None or PagedRuntimeMetadata"):
        dataclasses.replace(good, sliding_attention=good.recurrent)
    with pytest.raises(ValueError, match="needs a stack of 'attention' and 'sliding_attention'"):
        hybrid_page_managers(_metadata())
    with pytest.raises(ValueError, match="enable_prefix_caching=True cannot serve"):
        hybrid_page_managers(metadata, enable_prefix_caching=True)


def test_copy_pages_applies_each_pool_its_own_copies():
    cache = HybridCache.init_cache(_windowed_metadata())
    full_ids = jnp.arange(16, dtype=jnp.float32)[:, None, None, None] + 1
    sliding_ids = jnp.arange(5, dtype=jnp.float32)[:, None, None, None] + 100
    cache = cache.with_views(
        dataclasses.replace(
            view, key_pages=view.key_pages + (full_ids if i in (0, 3) else sliding_ids)
        )
        for i, view in enumerate(cache)
    )
    with pytest.raises(ValueError, match="pass their step's copies as sliding_copy_ops"):
        cache.copy_pages(jnp.asarray([[0, 9]], jnp.int32))
    copied = cache.copy_pages(
        jnp.asarray([[0, 9]], jnp.int32), sliding_copy_ops=jnp.asarray([[1, 4]], jnp.int32)
    )
    assert float(copied[0].key_pages[9].min()) == 1 and float(copied[3].key_pages[9].min()) == 1
    assert float(copied[1].key_pages[4].min()) == 101 and float(copied[2].key_pages[4].min()) == 101
    assert float(copied[1].key_pages[0].min()) == 100
