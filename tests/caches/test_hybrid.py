"""Hybrid caches: metadata built from per-layer kinds (validation, exact serialisation of the
nested per-kind metadata), one view of the right family per layer, one runtime metadata for the
whole stack, reset, overflow, PyTree behaviour and donation under jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv import CacheOverflowError
from jaxkv.caches.hybrid import (
    ATTENTION_BACKENDS,
    HybridCache,
    HybridCacheMetadata,
    HybridMetadata,
)
from jaxkv.caches.recurrent import (
    LinearAttentionCacheView,
    Mamba2CacheMetadata,
    Mamba2CacheView,
    MambaCacheView,
    RecurrentMetadata,
)
from jaxkv.caches.transformer import TransformerCacheView, TransformerMetadata

KINDS = (
    "attention",
    "mamba2",
    "sliding_attention",
    "none",
    "mamba",
    "linear_attention",
    "mamba2",
)


def _settings(**overrides):
    settings = dict(
        batch_size=2,
        attention=dict(max_length=8, num_kv_heads=1, head_dim=4),
        sliding_attention=dict(max_length=8, num_kv_heads=1, head_dim=4, sliding_window=3),
        mamba=dict(d_inner=6, state_size=2, conv_kernel=3),
        mamba2=dict(num_heads=2, head_dim=2, state_size=2, n_groups=1),
        linear_attention=dict(num_heads=2, key_dim=2, value_dim=3, decay=(0.5, 0.25)),
    )
    settings.update(overrides)
    return settings


def _metadata(**overrides):
    return HybridCacheMetadata.create(KINDS, **_settings(**overrides))


def test_init_cache_builds_the_view_of_each_layers_kind():
    metadata = _metadata()
    cache = HybridCache.init_cache(metadata)
    types = [type(view) if view is not None else None for view in cache]
    assert types == [
        TransformerCacheView,
        Mamba2CacheView,
        TransformerCacheView,
        None,
        MambaCacheView,
        LinearAttentionCacheView,
        Mamba2CacheView,
    ]
    assert [view.layer_index for view in cache if view is not None] == [0, 1, 2, 4, 5, 6]
    assert cache[0].metadata.sliding_window is None and cache[2].metadata.is_ring
    assert metadata.mamba2.num_layers == 2 and metadata.attention.num_layers == 1
    assert metadata.num_layers == 7 and metadata.batch_size == 2
    assert metadata.layer_metadata(6) is metadata.mamba2 and metadata.layer_metadata(3) is None
    assert cache.layer_kind(5) == "linear_attention"
    allocated = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(cache))
    assert allocated == metadata.bytes_total()
    empty = HybridCache.init_empty(metadata)
    assert list(empty) == [None] * 7 and empty.metadata is metadata
    assert tuple(ATTENTION_BACKENDS) == ("contiguous", "paged")


def test_ready_metadata_may_stand_in_for_settings():
    mamba2 = Mamba2CacheMetadata.create(2, 2, 2, 2, 2, 1)
    assert _metadata(mamba2=mamba2) == _metadata()
    with pytest.raises(ValueError, match="mamba2.num_layers must equal the 2 layer"):
        _metadata(mamba2=mamba2.replace(num_layers=3))
    with pytest.raises(ValueError, match="mamba2.batch_size=3 must equal batch_size=2"):
        _metadata(mamba2=mamba2.replace(batch_size=3))


@pytest.mark.parametrize(
    ("kinds", "overrides", "message"),
    [
        (KINDS[:1] + ("ssm",), {}, r"layer_kinds\[1\] must be one of"),
        ((), {}, "layer_kinds must be a non-empty tuple"),
        ("attention", {}, "layer_kinds must be a sequence of kind names"),
        (KINDS, dict(mamba=None), "1 layer.* have kind 'mamba' but no mamba settings"),
        (("attention",), {}, "sliding_attention settings given but no layer has kind"),
        (KINDS, dict(attention_backend="ring"), "attention_backend must be one of"),
        (KINDS, dict(batch_size=0), "batch_size must be >= 1, got 0"),
        (
            KINDS,
            dict(attention=dict(max_length=8, num_kv_heads=1, head_dim=4, sliding_window=2)),
            "attention.sliding_window must be None",
        ),
        (
            KINDS,
            dict(sliding_attention=dict(max_length=8, num_kv_heads=1, head_dim=4)),
            "sliding_attention.sliding_window must be set",
        ),
        (
            KINDS,
            dict(mamba=dict(d_inner=6, num_layers=1)),
            "mamba settings must not give num_layers",
        ),
        (KINDS, dict(mamba=dict(d_inner=0)), "d_inner must be >= 1, got 0"),
        (KINDS, dict(mamba=Mamba2CacheMetadata.create(2, 1, 2, 2)), "mamba must be Mamba"),
    ],
)
def test_metadata_validation_names_the_field(kinds, overrides, message):
    settings = _settings(**overrides)
    if kinds != KINDS:
        settings = {
            k: v
            for k, v in settings.items()
            if k in ("batch_size", "attention", "sliding_attention")
        }
    with pytest.raises((ValueError, TypeError), match=message):
        HybridCacheMetadata.create(kinds, **settings)


def test_from_dict_and_replace_revalidate():
    metadata = _metadata()
    with pytest.raises(ValueError, match="no linear_attention settings"):
        metadata.replace(linear_attention=None)
    data = metadata.to_dict()
    data["layer_kinds"] = list(data["layer_kinds"])[:-1]
    with pytest.raises(ValueError, match="mamba2.num_layers must equal the 1 layer"):
        HybridCacheMetadata.from_dict(data)
    with pytest.raises(ValueError, match=r"layer 9 out of range for 7 layers"):
        metadata.layer_metadata(9)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_metadata_round_trips_exactly_with_nested_metadata(dtype):
    attention = dict(max_length=8, num_kv_heads=1, head_dim=4, dtype=dtype)
    metadata = _metadata(attention=attention, mamba=dict(d_inner=6, dtype=dtype))
    for restored in (
        HybridCacheMetadata.from_json(metadata.to_json()),
        HybridCacheMetadata.from_dict(metadata.to_dict()),
    ):
        assert restored == metadata and hash(restored) == hash(metadata)
        assert restored.attention.dtype == np.dtype(dtype)
        assert restored.mamba.dtype == np.dtype(dtype)
        assert restored.linear_attention.decay == (0.5, 0.25)
        assert isinstance(restored.layer_kinds, tuple)
    data = metadata.to_dict()
    assert isinstance(data["mamba2"], dict) and data["mamba2"]["num_heads"] == 2


def test_runtime_metadata_drives_both_families_and_round_trips():
    runtime = HybridMetadata.create([2, 0], "left")
    assert isinstance(runtime.for_kind("attention"), TransformerMetadata)
    assert isinstance(runtime.for_kind("mamba2"), RecurrentMetadata)
    assert runtime.for_kind("none") is None
    np.testing.assert_array_equal(np.asarray(runtime.attention.new_lengths), [2, 0])
    assert runtime.recurrent.padding_side == runtime.attention.padding_side == "left"
    restored = HybridMetadata.from_json(runtime.to_json())
    np.testing.assert_array_equal(np.asarray(restored.recurrent.new_lengths), [2, 0])
    assert restored.attention.padding_side == "left"
    assert HybridMetadata.create().attention.new_lengths is None
    with pytest.raises(ValueError, match="kind must be one of"):
        runtime.for_kind("ssm")
    with pytest.raises(TypeError, match="recurrent must be RecurrentMetadata"):
        HybridMetadata(recurrent=TransformerMetadata.create())
    with pytest.raises(TypeError, match="attention must be TransformerMetadata"):
        HybridMetadata(attention=RecurrentMetadata.create())


def _write_all(cache, runtime, value):
    """One step of 3 tokens through every layer, with constant inputs/states."""
    views = list(cache.views)
    for index, view in enumerate(views):
        if view is None:
            continue
        part = runtime.for_kind(cache.layer_kind(index))
        if isinstance(view, TransformerCacheView):
            m = view.metadata
            key = jnp.full((2, 3, m.key_heads, m.key_dim), value)
            _, views[index] = view.concatenate_to_cache(key, key, part)
        elif isinstance(view, LinearAttentionCacheView):
            step = view.read(part, 3)
            _, views[index] = view.concatenate_to_cache(step, view.state + value)
        else:
            conv_input = jnp.full((2, 3, view.metadata.conv_dim), value)
            step = view.read(part, 3, conv_input)
            _, views[index] = view.concatenate_to_cache(step, view.ssm_state + value)
    return cache.with_views(views)


_write_all_jit = jax.jit(_write_all)


def test_one_runtime_steps_every_layer_then_reset_a_row():
    cache = HybridCache.init_cache(_metadata())
    cache = _write_all_jit(cache, HybridMetadata.create([3, 1], "left"), 1.0)
    for view in cache:
        if view is not None:
            np.testing.assert_array_equal(np.asarray(view.lengths), [3, 1])
    np.testing.assert_array_equal(np.asarray(cache.lengths()), [3, 1])
    cache = cache.reset_rows([0])
    for view in cache:
        if view is not None:
            np.testing.assert_array_equal(np.asarray(view.lengths), [0, 1])
    assert not np.asarray(cache[1].ssm_state[0]).any() and np.asarray(cache[1].ssm_state[1]).all()
    assert not np.asarray(cache[5].state[0]).any()


def test_overflow_is_flagged_under_jit_and_checked_on_the_host():
    cache = HybridCache.init_cache(_metadata())
    step = _write_all_jit
    runtime = HybridMetadata.create([3, 1])
    for _ in range(2):
        cache = step(cache, runtime, 1.0)
    cache.check_overflow()
    cache = step(cache, runtime, 1.0)  # row 0 would hold 9 > max_length=8 tokens
    np.testing.assert_array_equal(np.asarray(cache.overflow_rows()), [True, False])
    with pytest.raises(CacheOverflowError, match=r"rows \[0\]"):
        cache.check_overflow()
    recurrent_only = HybridCache.init_cache(
        HybridCacheMetadata.create(("mamba",), batch_size=2, mamba=dict(d_inner=4))
    )
    np.testing.assert_array_equal(np.asarray(recurrent_only.overflow_rows()), [False, False])


def test_cache_is_a_pytree_and_donation_writes_in_place():
    metadata = _metadata()
    cache = HybridCache.init_cache(metadata)
    leaves, treedef = jax.tree_util.tree_flatten(cache)
    # attention 4 leaves (no ring positions), ring 5, mamba/mamba2 3 each, linear 2.
    assert len(leaves) == 4 + 3 + 5 + 3 + 2 + 3
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(rebuilt, HybridCache) and rebuilt.metadata is metadata
    assert rebuilt[3] is None and isinstance(rebuilt[6], Mamba2CacheView)
    traces = []

    def step(cache, runtime):
        traces.append(1)
        return _write_all(cache, runtime, 1.0)

    donated = jax.jit(step, donate_argnums=0)
    runtime = HybridMetadata.create([1, 1])
    cache = donated(cache, runtime)
    pointers = [cache[0].keys.unsafe_buffer_pointer(), cache[1].ssm_state.unsafe_buffer_pointer()]
    cache = donated(cache, runtime)
    after = [cache[0].keys.unsafe_buffer_pointer(), cache[1].ssm_state.unsafe_buffer_pointer()]
    assert after == pointers
    np.testing.assert_array_equal(np.asarray(cache[1].ssm_state[0]), 2.0)
    assert len(traces) == 1
