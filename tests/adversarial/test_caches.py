"""Hostile input to the device side: metadata, views, caches, row operations, runtime metadata,
attention and sampling. Every probe asserts the promised behaviour -- a clear error naming the
argument, the value and what was expected, with nothing changed -- or, under ``jax.jit`` where
nothing can raise, that no valid row or slot is touched and the refusal is visible (a flag, or
NaN logits)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxkv import CacheOverflowError
from jaxkv.caches import (
    HybridCache,
    HybridRuntimeMetadata,
    LinearAttentionCacheMetadata,
    Mamba2CacheMetadata,
    MambaCacheMetadata,
    PagedCache,
    PagedCacheMetadata,
    PagedRuntimeMetadata,
    RecurrentCache,
    TransformerCache,
    TransformerCacheMetadata,
    TransformerRuntimeMetadata,
)
from jaxkv.engine.sampling import sample_dynamic
from jaxkv.engine.step_inputs import hybrid_page_manager, hybrid_paged_runtime, paged_runtime
from jaxkv.models import hybrid, mamba
from jaxkv.ops import attention
from jaxkv.pages import PageManager

HOSTILE_INTS = [0, -1, -(2**31), 2**31, 2**63, True, False, 1.0, 2.5, float("nan"), "4", None]


def _leaves_equal(a, b):
    left, right = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(left) == len(right)
    for x, y in zip(left, right, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------------------------
# Metadata: every size field refuses every hostile value with a clear error
# --------------------------------------------------------------------------------------------

CREATORS = {
    "contiguous": (
        TransformerCacheMetadata.create,
        dict(batch_size=2, max_length=8, num_layers=1, num_kv_heads=1, head_dim=4),
    ),
    "paged": (
        PagedCacheMetadata.create,
        dict(
            num_layers=1,
            num_pages=8,
            page_size=4,
            num_kv_heads=1,
            head_dim=4,
            batch_size=2,
            max_pages_per_seq=2,
        ),
    ),
    "mamba": (MambaCacheMetadata.create, dict(batch_size=2, num_layers=1, d_inner=4)),
    "mamba2": (
        Mamba2CacheMetadata.create,
        dict(batch_size=2, num_layers=1, num_heads=2, head_dim=2),
    ),
    "linear": (
        LinearAttentionCacheMetadata.create,
        dict(batch_size=2, num_layers=1, num_heads=2, key_dim=2),
    ),
}
PROBES = [
    (family, field, value)
    for family, (_, arguments) in CREATORS.items()
    for field in arguments
    for value in HOSTILE_INTS
    if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value < 2**31)
]


@pytest.mark.parametrize(("family", "field", "value"), PROBES)
def test_every_size_field_refuses_hostile_values(family, field, value):
    create, arguments = CREATORS[family]
    arguments = dict(arguments, **{field: value})
    with pytest.raises((ValueError, TypeError), match=field.split("_")[0]):
        create(**arguments)


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(list(CREATORS)),
    st.dictionaries(
        st.sampled_from(["dtype", "sliding_window", "kv_quantization", "quantization_group_size"]),
        st.one_of(
            st.none(),
            st.integers(-3, 300),
            st.booleans(),
            st.floats(allow_nan=True),
            st.sampled_from(["int8", "int4", "fp8", "none", "bogus", jnp.int8, jnp.bfloat16]),
        ),
    ),
)
def test_optional_settings_give_valid_metadata_or_a_clear_error(family, extra):
    create, arguments = CREATORS[family]
    if family in ("mamba", "mamba2", "linear"):
        extra = {k: value for k, value in extra.items() if k == "dtype"}
    try:
        metadata = create(**arguments, **extra)
    except (ValueError, TypeError) as error:
        assert type(metadata_name := create.__qualname__.split(".")[0]) is str
        assert metadata_name in str(error) or "dtype" in str(error)
        return
    assert type(metadata).from_json(metadata.to_json()) == metadata


def test_a_ring_of_an_absurd_capacity_is_refused_at_create():
    with pytest.raises(ValueError, match=r"max_length must be <= 1073741824"):
        TransformerCacheMetadata.create(1, 2**30 + 1, 1, 1, 4, sliding_window=8)
    with pytest.raises(ValueError, match=r"max_length must be <= 2147483647"):
        TransformerCacheMetadata.create(1, 2**31, 1, 1, 4, sliding_window=8)
    TransformerCacheMetadata.create(1, 2**30, 1, 1, 4, sliding_window=8)  # the bound itself


# --------------------------------------------------------------------------------------------
# Row operations under jit: a negative or out-of-range id never wraps onto a valid row
# --------------------------------------------------------------------------------------------


def _filled(kind):
    if kind == "contiguous":
        cache = TransformerCache.init_cache(TransformerCacheMetadata.create(3, 8, 1, 1, 4))
    elif kind == "ring":
        cache = TransformerCache.init_cache(
            TransformerCacheMetadata.create(3, 8, 1, 1, 4, sliding_window=2)
        )
    else:
        cache = RecurrentCache.init_cache(MambaCacheMetadata.create(3, 1, 4))
    return jax.tree_util.tree_map(lambda x: x + 1 if x.dtype != jnp.bool_ else x, cache)


@pytest.mark.parametrize("kind", ["contiguous", "ring", "mamba"])
@pytest.mark.parametrize("bad", [-1, -3, 3, 2**31 - 1])
def test_out_of_range_row_ids_under_jit_touch_no_row(kind, bad):
    cache = _filled(kind)
    one = cache.extract(0)
    reset, inserted, reordered, extracted = jax.jit(
        lambda c, o, i: (
            c.reset_rows(jnp.stack([i])),
            c.insert(o, i),
            c.reorder(jnp.stack([i, 1, 2])),
            c.extract(i),
        )
    )(cache, one, jnp.asarray(bad, jnp.int32))
    _leaves_equal(reset, cache)
    _leaves_equal(inserted, cache)
    # A row taken from nowhere is an empty row; the others are the rows they name.
    np.testing.assert_array_equal(np.asarray(reordered[0].lengths), [0, 1, 1])
    np.testing.assert_array_equal(np.asarray(extracted[0].lengths), [0])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda c: c.reset_rows([True, False]), ValueError, r"rows must have shape \(3,\)"),
        (lambda c: c.reset_rows([0.5]), TypeError, "rows must be a"),
        (lambda c: c.reset_rows([[0]]), TypeError, "rows must be a"),
        (lambda c: c.reset_rows([3]), ValueError, r"row ids must lie in \[0, 3\)"),
        (lambda c: c.select(i for i in [0]), TypeError, "rows must be a sequence"),
        (lambda c: c.select([0.0]), TypeError, "rows must be a sequence of row ids"),
        (lambda c: c.reorder([0, 1, -1]), ValueError, r"indices must lie in \[0, 3\)"),
        (lambda c: c.reorder([0, 1, 2.0]), TypeError, "indices must be a"),
        (lambda c: c.repeat(2.0), TypeError, "n must be an int"),
        (lambda c: c.repeat(-2), ValueError, "n must be >= 1"),
        (lambda c: c.extract(-1), ValueError, r"slot must lie in \[0, 3\)"),
        (lambda c: c.extract("0"), TypeError, "slot must be an int row id"),
        (lambda c: c.insert(c, 0), TypeError, "other must be a one-row"),
        (lambda c: c.insert(c.extract(0), 1.0), TypeError, "slot must be an int row id"),
        (lambda c: c.truncate([1, 1, 1.5]), TypeError, "lengths must be a"),
        (lambda c: c.truncate([-1, 0, 0]), ValueError, "lengths must lie in"),
        (lambda c: c.truncate([0, 0]), ValueError, r"lengths must have shape \(3,\)"),
    ],
)
def test_row_operation_arguments_are_refused_clearly(call, error, match):
    cache = _filled("contiguous")
    with pytest.raises(error, match=match):
        call(cache)


# --------------------------------------------------------------------------------------------
# Hybrid stacks: a row one layer refuses is untouched in every layer
# --------------------------------------------------------------------------------------------

HYBRID = hybrid.HybridConfig(
    vocab_size=16,
    hidden_size=8,
    layer_kinds=("mamba", "attention"),
    mamba=mamba.MambaConfig(8, 8, state_size=2, conv_kernel=3),
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
    attention_block_size=4,
)


@functools.cache
def _hybrid_params():
    return hybrid.init_hybrid(jax.random.PRNGKey(0), HYBRID)


def test_hybrid_overflow_under_jit_leaves_the_row_untouched_in_every_layer():
    cache = HybridCache.init_cache(HYBRID.cache_metadata(2, 5))
    step = jax.jit(functools.partial(hybrid.hybrid_forward_cached, _hybrid_params(), HYBRID))
    tokens = jnp.ones((2, 3), jnp.int32)
    _, cache = step(tokens, cache, HybridRuntimeMetadata.create([3, 1]))
    before = cache
    logits, cache = step(tokens, cache, HybridRuntimeMetadata.create([3, 2]))  # row 0: 6 > 5
    np.testing.assert_array_equal(np.asarray(cache[0].lengths), [3, 3])  # mamba
    np.testing.assert_array_equal(np.asarray(cache[1].lengths), [3, 3])  # attention
    np.testing.assert_array_equal(np.asarray(cache[0].ssm_state[0]), before[0].ssm_state[0])
    np.testing.assert_array_equal(np.asarray(cache[0].conv_state[0]), before[0].conv_state[0])
    assert np.isnan(np.asarray(logits[0])).all() and np.isfinite(np.asarray(logits[1])).all()
    with pytest.raises(CacheOverflowError, match=r"rows \[0\].*cached tokens are intact"):
        cache.check_overflow()
    with pytest.raises(CacheOverflowError, match=r"row\(s\) \[0\].*nothing was written"):
        hybrid.hybrid_forward_cached(
            _hybrid_params(), HYBRID, tokens, before, HybridRuntimeMetadata.create([3, 2])
        )


def test_hybrid_paged_stacks_refuse_prefix_caching():
    metadata = HYBRID.cache_metadata(2, 16, attention_backend="paged", page_size=4)
    with pytest.raises(ValueError, match="enable_prefix_caching=True cannot serve a stack"):
        hybrid_page_manager(metadata, enable_prefix_caching=True)
    assert not hybrid_page_manager(metadata).enable_prefix_caching
    # A manager made by hand with prefix caching on: the second request hits the first's pages.
    manager = PageManager(**metadata.paged_geometry(), token_buckets=(16,))
    cache = HybridCache.init_cache(metadata)
    prompt = [1, 2, 3, 4, 5, 6]
    manager.add_sequence("a", prompt)
    step = manager.schedule([("a", 6)])
    runtime = hybrid_paged_runtime(step, slots={"a": 0}, width=8)
    _, cache = hybrid.hybrid_forward_cached(
        _hybrid_params(), HYBRID, runtime.batch_token_ids(), cache, runtime
    )
    manager.commit_step(step)
    assert manager.add_sequence("b", prompt) == 4  # four tokens served from the prefix cache
    step = manager.schedule([("b", 2)])
    runtime = hybrid_paged_runtime(step, slots={"b": 1}, width=8)
    tokens = runtime.batch_token_ids()
    with pytest.raises(ValueError, match=r"slot\(s\) \[1\] continue their sequences at"):
        hybrid.hybrid_forward_cached(_hybrid_params(), HYBRID, tokens, cache, runtime)
    logits, after = jax.jit(
        functools.partial(hybrid.hybrid_forward_cached, _hybrid_params(), HYBRID)
    )(tokens, cache, runtime)
    assert np.isnan(np.asarray(logits[1])).all()
    _leaves_equal(after[0], cache[0])  # the Mamba layer: slot 1 still empty, slot 0 as it was
    _leaves_equal(after[1], cache[1])  # the attention pool: no page written


# --------------------------------------------------------------------------------------------
# Paged steps: two writes on one slot, two copies into one page
# --------------------------------------------------------------------------------------------


def _paged_view():
    metadata = PagedCacheMetadata.create(1, 4, 4, 1, 4, batch_size=1, max_pages_per_seq=4)
    return PagedCache.init_cache(metadata)[0]


def _runtime(slots, copy_ops=((-1, -1),)):
    tokens = len(slots)
    return PagedRuntimeMetadata(
        page_tables=jnp.asarray([[0, 1, 2, 3]], jnp.int32),
        context_lens=jnp.asarray([tokens], jnp.int32),
        query_start_loc=jnp.asarray([0, tokens], jnp.int32),
        num_seqs=jnp.asarray(1, jnp.int32),
        slot_mapping=jnp.asarray(slots, jnp.int32),
        positions=jnp.arange(tokens, dtype=jnp.int32),
        token_ids=jnp.zeros((tokens,), jnp.int32),
        copy_ops=jnp.asarray(copy_ops, jnp.int32),
        logits_indices=jnp.zeros((1,), jnp.int32),
        num_pages=4,
        page_size=4,
    )


def test_two_tokens_on_one_slot_are_refused_eagerly():
    view = _paged_view()
    key = jnp.ones((2, 1, 4))
    with pytest.raises(ValueError, match=r"slot_mapping writes slot 3 twice"):
        view.concatenate_to_cache(key, key, _runtime([3, 3]))


def test_two_copies_into_one_page_are_refused_eagerly():
    view = _paged_view()
    with pytest.raises(ValueError, match="copy_ops copies into page 2 twice"):
        view.copy_pages(jnp.asarray([[0, 2], [1, 2]], jnp.int32))


def test_a_runtime_built_for_another_pool_is_refused_even_under_jit():
    cache = PagedCache.init_cache(PagedCacheMetadata.create(1, 4, 4, 1, 4, 2, 2))
    manager = PageManager(8, 4, 2, 2, token_buckets=(8,))
    manager.add_sequence("a", [1, 2, 3])
    runtime = paged_runtime(manager.schedule([("a", 3)]))
    key = jnp.ones((8, 1, 4))
    for write in (cache[0].concatenate_to_cache, jax.jit(cache[0].concatenate_to_cache)):
        with pytest.raises(ValueError, match="built for a pool of 8 pages of 4 tokens"):
            write(key, key, runtime)


# --------------------------------------------------------------------------------------------
# Attention options and sampling
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(sliding_window=0), "sliding_window must be an int >= 1, got 0"),
        (dict(sliding_window=-1), "sliding_window must be an int >= 1, got -1"),
        (dict(sliding_window=True), "sliding_window must be an int >= 1, got True"),
        (dict(scale=float("nan")), "scale must be a finite float"),
        (dict(scale=float("inf")), "scale must be a finite float"),
        (dict(logit_soft_cap=float("nan")), "logit_soft_cap must be > 0"),
        (dict(logit_soft_cap=-1.0), "logit_soft_cap must be > 0"),
        (dict(block_size=0), "block_size must be an int >= 1"),
        (dict(block_size=2.0), "block_size must be an int >= 1"),
    ],
)
def test_contiguous_attention_refuses_bad_options(options, match):
    view = TransformerCache.init_cache(TransformerCacheMetadata.create(1, 8, 1, 1, 4))[0]
    x = jnp.ones((1, 2, 1, 4))
    kv, _ = view.concatenate_to_cache(x, x)
    with pytest.raises(ValueError, match=match):
        attention(x, kv, **options)
    with pytest.raises(TypeError, match="query must be a float array"):
        attention(x.astype(jnp.int32), kv)


@pytest.mark.parametrize("temperature", [1e-39, 1e-30, 1e-8])
def test_a_tiny_temperature_samples_the_best_token_not_token_zero(temperature):
    logits = jnp.asarray([[0.0, 3.0, 1.0, 2.9], [5.0, -1.0, 4.0, 0.0]], jnp.float32)
    tokens = sample_dynamic(
        logits,
        jax.random.key(0),
        jnp.float32(temperature),
        jnp.int32(4),
        jnp.float32(1.0),
    )
    np.testing.assert_array_equal(np.asarray(tokens), [1, 0])


def test_ragged_runtime_counts_are_checked_eagerly():
    view = TransformerCache.init_cache(TransformerCacheMetadata.create(2, 8, 1, 1, 4))[0]
    x = jnp.ones((2, 2, 1, 4))
    for counts, match in (([3, 0], r"must lie in \[0, 2\]"), ([-1, 0], r"must lie in \[0, 2\]")):
        with pytest.raises(ValueError, match=match):
            view.concatenate_to_cache(x, x, TransformerRuntimeMetadata.create(counts))
    with pytest.raises(ValueError, match=r"new_lengths must be a \[batch\] int array"):
        TransformerRuntimeMetadata.create([1.5, 2.0])
