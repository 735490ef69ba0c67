"""Mamba, Mamba2 and linear-attention layers: whole sequences in one call (a scan from a zero
state, no cache) against the same sequences fed through a recurrent cache token by token, in one
call and in random ragged chunks (left or right padding, junk in the padding), and with a batch
slot reset and reused."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.caches.recurrent import (
    LinearAttentionCacheView,
    Mamba2CacheView,
    MambaCacheView,
    RecurrentMetadata,
    init_view,
)
from jaxkv.models import linear_attention as linear
from jaxkv.models import mamba, mamba2

ATOL = 1e-5
HIDDEN = 12
BATCH = 3
# Every batch of inputs is [BATCH, LONGEST, HIDDEN], and every cached step is either WIDTH tokens
# per row (padded) or one, so each layer compiles three times: whole sequence, chunk, token.
LONGEST = 13
WIDTH = LONGEST
MAX_CHUNK = 5

KINDS = {
    "mamba": (
        mamba.MambaConfig(HIDDEN, 24, state_size=6, conv_kernel=4),
        mamba.init_mamba,
        mamba.mamba_forward,
        mamba.mamba_cached,
    ),
    "mamba2": (
        mamba2.Mamba2Config(HIDDEN, 4, 6, state_size=5, n_groups=2, conv_kernel=3, block_size=4),
        mamba2.init_mamba2,
        mamba2.mamba2_forward,
        mamba2.mamba2_cached,
    ),
    "mamba2_ungated": (
        mamba2.Mamba2Config(HIDDEN, 2, 4, state_size=4, gated_norm=False, block_size=2),
        mamba2.init_mamba2,
        mamba2.mamba2_forward,
        mamba2.mamba2_cached,
    ),
    "lightning": (
        linear.LinearAttentionConfig(
            HIDDEN, 3, 4, 5, "elu_plus_one", linear.lightning_decay(3), block_size=3
        ),
        linear.init_linear_attention,
        linear.linear_attention_forward,
        linear.linear_attention_cached,
    ),
    "linear_plain": (
        linear.LinearAttentionConfig(HIDDEN, 2, 4, 4, output_norm=False, block_size=4),
        linear.init_linear_attention,
        linear.linear_attention_forward,
        linear.linear_attention_cached,
    ),
}


# These tiny models are compiled a few times each and run for microseconds: spend less on codegen.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.cache
def _layer(kind):
    """(config, params, jitted full forward, jitted cached step) of one kind, built once."""
    config, init, forward, cached = KINDS[kind]
    # One compiled init instead of dozens of small eager random ops.
    params = jax.jit(init, static_argnums=1, compiler_options=FAST_COMPILE)(
        jax.random.PRNGKey(len(kind)), config
    )
    full = jax.jit(functools.partial(forward, params, config), compiler_options=FAST_COMPILE)
    step = jax.jit(
        functools.partial(cached, params, config), donate_argnums=1, compiler_options=FAST_COMPILE
    )
    return config, params, full, step


def _sequences(rng):
    return rng.standard_normal((BATCH, LONGEST, HIDDEN)).astype(np.float32)


def _expected(kind, inputs):
    """Causal, so the whole-sequence output of the padded batch is each row's reference."""
    return np.asarray(_layer(kind)[2](jnp.asarray(inputs)))


def _run_plan(kind, inputs, lengths, plan, padding_side="right", view=None):
    """Feed each row's tokens through a cache in the per-row counts of ``plan``; return the
    outputs per row (``[length, hidden]``) and the final view."""
    config, _, _, step = _layer(kind)
    if view is None:
        view = init_view(config.cache_metadata(len(lengths)), 0)
    start_lengths = np.asarray(view.lengths)
    done = [0] * len(lengths)
    outputs = [np.zeros((n, HIDDEN), np.float32) for n in lengths]
    for counts in plan:
        width = 1 if max(counts) == 1 else WIDTH
        chunk = np.full((len(lengths), width, HIDDEN), 7.0, np.float32)  # junk must not leak
        for row, n in enumerate(counts):
            start = 0 if padding_side == "right" else width - n
            chunk[row, start : start + n] = inputs[row, done[row] : done[row] + n]
        runtime = RecurrentMetadata.create(np.asarray(counts, np.int32), padding_side)
        out, view = step(jnp.asarray(chunk), view, runtime)
        out = np.asarray(out)
        for row, n in enumerate(counts):
            start = 0 if padding_side == "right" else width - n
            outputs[row][done[row] : done[row] + n] = out[row, start : start + n]
            assert not out[row, :start].any() and not out[row, start + n :].any()
            done[row] += n
    np.testing.assert_array_equal(np.asarray(view.lengths), start_lengths + done)
    return outputs, view


def _random_plan(rng, lengths, max_chunk=MAX_CHUNK):
    remaining, plan = list(lengths), []
    while any(remaining):
        counts = [int(min(r, rng.integers(0, max_chunk + 1))) for r in remaining]
        if any(counts):
            plan.append(counts)
            remaining = [r - c for r, c in zip(remaining, counts, strict=True)]
    return plan


def _assert_rows_close(outputs, expected, lengths):
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(outputs[row], expected[row, :n], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", list(KINDS))
def test_one_call_token_by_token_and_random_chunks_agree(kind):
    rng = np.random.default_rng(0)
    lengths = [LONGEST] * BATCH
    inputs = _sequences(rng)
    expected = _expected(kind, inputs)
    # The whole sequence in one cached call (T = 13 > kernel, several SSD/lightning blocks).
    one_call, _ = _run_plan(kind, inputs, lengths, [lengths])
    _assert_rows_close(one_call, expected, lengths)
    # Token by token.
    by_token, _ = _run_plan(kind, inputs, lengths, [[1] * BATCH] * LONGEST)
    _assert_rows_close(by_token, expected, lengths)
    # Random ragged chunks (rows advance by different counts, some by none).
    chunked, _ = _run_plan(kind, inputs, lengths, _random_plan(rng, lengths))
    _assert_rows_close(chunked, expected, lengths)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("kind", ["mamba", "mamba2", "lightning"])
def test_ragged_prefill_then_decode(kind, padding_side):
    rng = np.random.default_rng(1)
    lengths, prompts = [9, 4, 7], [5, 1, 3]
    inputs = _sequences(rng)
    plan = [prompts]
    remaining = [n - p for n, p in zip(lengths, prompts, strict=True)]
    while any(remaining):
        plan.append([min(r, 1) for r in remaining])
        remaining = [max(r - 1, 0) for r in remaining]
    outputs, _ = _run_plan(kind, inputs, lengths, plan, padding_side)
    _assert_rows_close(outputs, _expected(kind, inputs), lengths)


@pytest.mark.parametrize("kind", ["mamba", "mamba2_ungated", "linear_plain"])
def test_random_left_padded_chunks(kind):
    rng = np.random.default_rng(2)
    lengths = [13, 6, 9]
    inputs = _sequences(rng)
    outputs, _ = _run_plan(kind, inputs, lengths, _random_plan(rng, lengths), "left")
    _assert_rows_close(outputs, _expected(kind, inputs), lengths)


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "lightning"])
def test_padding_only_step_leaves_state_bitwise_unchanged(kind):
    rng = np.random.default_rng(3)
    inputs = _sequences(rng)
    _, view = _run_plan(kind, inputs, [4, 4, 4], [[4, 2, 0]])
    before = [np.asarray(x) for x in jax.tree_util.tree_leaves(view)]
    junk = jnp.full((BATCH, WIDTH, HIDDEN), 1e3, jnp.float32)
    out, view = _layer(kind)[3](junk, view, RecurrentMetadata.create([0, 0, 0]))
    assert not np.asarray(out).any()
    for old, new in zip(before, jax.tree_util.tree_leaves(view), strict=True):
        np.testing.assert_array_equal(old, np.asarray(new))


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "lightning"])
def test_reset_slot_takes_a_new_sequence(kind):
    rng = np.random.default_rng(4)
    first = _sequences(rng)
    _, view = _run_plan(kind, first, [5, 5, 5], [[5, 5, 5]])
    view = view.reset_rows(jnp.array([True, False, False]))
    np.testing.assert_array_equal(np.asarray(view.lengths), [0, 5, 5])
    # Row 0 now starts a new sequence while rows 1 and 2 go on with theirs.
    fresh = _sequences(rng)
    rest = np.zeros_like(first)
    rest[0, :3] = fresh[0, :3]
    rest[1:, :3] = first[1:, 5:8]
    outputs, view = _run_plan(kind, rest, [3, 3, 3], [[3, 3, 3]], view=view)
    np.testing.assert_allclose(outputs[0], _expected(kind, fresh)[0, :3], atol=ATOL)
    continued = _expected(kind, first)
    for row in (1, 2):
        np.testing.assert_allclose(outputs[row], continued[row, 5:8], atol=ATOL)
    np.testing.assert_array_equal(np.asarray(view.lengths), [3, 8, 8])


def test_views_of_the_right_family_are_required():
    config, params, _, _ = _layer("mamba")
    hidden = jnp.zeros((BATCH, 2, HIDDEN))
    wrong_family = init_view(KINDS["mamba2"][0].cache_metadata(BATCH), 0)
    with pytest.raises(TypeError, match="view must be MambaCacheView, got Mamba2CacheView"):
        mamba.mamba_cached(params, config, hidden, wrong_family)
    other_sizes = init_view(mamba.MambaConfig(HIDDEN, 8).cache_metadata(BATCH), 0)
    with pytest.raises(ValueError, match="does not match the layer's sizes"):
        mamba.mamba_cached(params, config, hidden, other_sizes)
    lin_config, lin_params, _, _ = _layer("lightning")
    no_decay = init_view(linear.LinearAttentionConfig(HIDDEN, 3, 4, 5).cache_metadata(BATCH), 0)
    assert isinstance(no_decay, LinearAttentionCacheView)
    with pytest.raises(ValueError, match="does not match the layer's sizes"):
        linear.linear_attention_cached(lin_params, lin_config, hidden, no_decay)
    with pytest.raises(ValueError, match=r"hidden must have shape \(\*, \*, 12\)"):
        mamba.mamba_forward(params, config, jnp.zeros((1, 3, 5)))
    with pytest.raises(TypeError, match="hidden must be a float array"):
        mamba2.mamba2_forward(
            _layer("mamba2")[1], KINDS["mamba2"][0], jnp.zeros((1, 3, HIDDEN), jnp.int32)
        )
    assert isinstance(init_view(KINDS["mamba2"][0].cache_metadata(1)), Mamba2CacheView)
    assert isinstance(init_view(config.cache_metadata(1)), MambaCacheView)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: mamba.MambaConfig(16, 0), "d_inner must be >= 1, got 0"),
        (lambda: mamba.MambaConfig(16, 32, conv_kernel=1), "conv_kernel must be >= 2, got 1"),
        (lambda: mamba2.Mamba2Config(16, 3, 4, n_groups=2), "n_groups=2 must divide num_heads=3"),
        (lambda: mamba2.Mamba2Config(16, 2, 4, norm_eps=0.0), "norm_eps must be a float > 0"),
        (
            lambda: linear.LinearAttentionConfig(16, 2, 4, 4, feature_map="relu"),
            "feature_map must be one of",
        ),
        (
            lambda: linear.LinearAttentionConfig(16, 2, 4, 4, decay=(0.5, 1.5)),
            r"decay\[1\] must be a float in \(0, 1\], got 1.5",
        ),
        (lambda: linear.lightning_decay(0), "num_heads must be >= 1, got 0"),
        (lambda: mamba.init_mamba(jax.random.PRNGKey(0), None), "config must be MambaConfig"),
    ],
)
def test_config_validation_names_the_field(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_chunked_recurrence_matches_scan_with_strong_decay_and_padding():
    """The block-parallel form against the token scan directly, with decays near 0 and 1."""
    rng = np.random.default_rng(5)
    batch, length, heads, key_dim, value_dim = 2, 10, 3, 4, 2
    q, k = (jnp.asarray(rng.standard_normal((batch, length, heads, key_dim))) for _ in "qk")
    v = jnp.asarray(rng.standard_normal((batch, length, heads, value_dim)))
    log_decay = -jnp.asarray(rng.uniform(0, 5, (batch, length, heads)))
    state = jnp.asarray(rng.standard_normal((batch, heads, key_dim, value_dim)))
    mask = jnp.asarray(rng.uniform(size=(batch, length)) < 0.7)
    want_out, want_state = jax.jit(linear.scan_recurrence)(q, k, v, log_decay, state, mask)
    chunked = jax.jit(linear.chunked_recurrence, static_argnums=6)
    for block in (3, 16):
        out, got_state = chunked(q, k, v, log_decay, state, mask, block)
        np.testing.assert_allclose(got_state, want_state, atol=ATOL, rtol=1e-5)
        real = np.asarray(mask)
        np.testing.assert_allclose(np.asarray(out)[real], np.asarray(want_out)[real], atol=ATOL)
