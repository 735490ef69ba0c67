"""Tiny hybrid stacks (attention + Mamba2 + Mamba + linear attention + an MLP-only layer; global
+ sliding-window attention): prefill and incremental decoding through a ``HybridCache`` give the
logits of the whole-sequence forward, for ragged batches padded on either side, in random
chunks, and after a batch slot is reset and reused."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.caches.hybrid import HybridCache, HybridMetadata
from jaxkv.models import hybrid, mamba, mamba2
from jaxkv.models import linear_attention as linear

ATOL = 1e-5
HIDDEN = 16
BATCH = 3
LONGEST = 12
WIDTH = 6  # tokens per row of a chunked step (padded); decode steps take one

CONFIGS = {
    "mixed": hybrid.HybridConfig(
        vocab_size=40,
        hidden_size=HIDDEN,
        layer_kinds=("attention", "mamba2", "none", "mamba", "attention", "linear_attention"),
        mamba=mamba.MambaConfig(HIDDEN, 16, state_size=4, conv_kernel=3),
        mamba2=mamba2.Mamba2Config(HIDDEN, 2, 8, state_size=4, n_groups=1, block_size=4),
        linear_attention=linear.LinearAttentionConfig(
            HIDDEN, 2, 4, 4, "elu_plus_one", linear.lightning_decay(2), block_size=4
        ),
        attention_block_size=4,
    ),
    "global_and_sliding": hybrid.HybridConfig(
        vocab_size=40,
        hidden_size=HIDDEN,
        layer_kinds=("sliding_attention", "attention", "sliding_attention"),
        sliding_window=4,
        attention_block_size=4,
    ),
}


# These tiny models are compiled a few times each and run for microseconds: spend less on codegen.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.cache
def _model(name):
    config = CONFIGS[name]
    params = jax.jit(hybrid.init_hybrid, static_argnums=1, compiler_options=FAST_COMPILE)(
        jax.random.PRNGKey(7), config
    )
    full = jax.jit(
        functools.partial(hybrid.hybrid_forward, params, config), compiler_options=FAST_COMPILE
    )
    step = jax.jit(
        functools.partial(hybrid.hybrid_forward_cached, params, config),
        donate_argnums=1,
        compiler_options=FAST_COMPILE,
    )
    return config, params, full, step


def _run(name, tokens, lengths, plan, padding_side, cache=None):
    """Feed each row's tokens in the per-row counts of ``plan``; logits per row."""
    config, _, _, step = _model(name)
    if cache is None:
        cache = HybridCache.init_cache(config.cache_metadata(BATCH, LONGEST))
    done = [0] * BATCH
    logits = [np.zeros((n, config.vocab_size), np.float32) for n in lengths]
    for counts in plan:
        width = 1 if max(counts) == 1 else WIDTH
        chunk = np.full((BATCH, width), 39, np.int32)  # padding ids: any token
        starts = [0 if padding_side == "right" else width - n for n in counts]
        for row, n in enumerate(counts):
            chunk[row, starts[row] : starts[row] + n] = tokens[row, done[row] : done[row] + n]
        out, cache = step(jnp.asarray(chunk), cache, HybridMetadata.create(counts, padding_side))
        out = np.asarray(out)
        for row, n in enumerate(counts):
            logits[row][done[row] : done[row] + n] = out[row, starts[row] : starts[row] + n]
            done[row] += n
    cache.check_overflow()
    return logits, cache


def _assert_matches_full(name, tokens, lengths, logits):
    expected = np.asarray(_model(name)[2](jnp.asarray(tokens)))  # causal: prefixes are exact
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(logits[row], expected[row, :n], atol=ATOL, rtol=0)


def _prefill_then_decode(lengths, prompts):
    plan = [list(prompts)]
    remaining = [n - p for n, p in zip(lengths, prompts, strict=True)]
    while any(remaining):
        plan.append([min(r, 1) for r in remaining])
        remaining = [max(r - 1, 0) for r in remaining]
    return plan


@pytest.mark.parametrize(
    ("name", "padding_side"),
    [("mixed", "right"), ("global_and_sliding", "left")],
)
def test_ragged_prefill_then_decode_matches_full_forward(name, padding_side):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 39, (BATCH, LONGEST)).astype(np.int32)
    lengths, prompts = [12, 7, 10], [6, 2, 5]
    logits, cache = _run(
        name, tokens, lengths, _prefill_then_decode(lengths, prompts), padding_side
    )
    _assert_matches_full(name, tokens, lengths, logits)
    np.testing.assert_array_equal(np.asarray(cache.lengths()), lengths)


def test_random_left_padded_chunks_match_full_forward():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 39, (BATCH, LONGEST)).astype(np.int32)
    lengths = [LONGEST, 9, 11]
    remaining, plan = list(lengths), []
    while any(remaining):
        counts = [int(min(r, rng.integers(0, WIDTH + 1))) for r in remaining]
        if max(counts) > 1 or 0 < sum(remaining) == max(counts):
            plan.append(counts)
            remaining = [r - c for r, c in zip(remaining, counts, strict=True)]
    logits, _ = _run("mixed", tokens, lengths, plan, "left")
    _assert_matches_full("mixed", tokens, lengths, logits)


def test_reset_slot_serves_a_new_sequence():
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 39, (BATCH, LONGEST)).astype(np.int32)
    _, cache = _run("mixed", tokens, [5] * BATCH, [[5, 5, 5]], "right")
    cache = cache.reset_rows([1])
    fresh = rng.integers(0, 39, (BATCH, LONGEST)).astype(np.int32)
    following = tokens.copy()
    following[1] = fresh[1]
    # Row 1 starts over with a new prompt; rows 0 and 2 decode on.
    step_tokens = np.stack([tokens[0, 5:], fresh[1, :7], tokens[2, 5:]])
    logits, cache = _run("mixed", step_tokens, [3, 3, 3], [[3, 3, 3]], "right", cache)
    expected = np.asarray(_model("mixed")[2](jnp.asarray(following)))
    np.testing.assert_allclose(logits[0], expected[0, 5:8], atol=ATOL)
    np.testing.assert_allclose(logits[1], expected[1, :3], atol=ATOL)
    np.testing.assert_allclose(logits[2], expected[2, 5:8], atol=ATOL)
    np.testing.assert_array_equal(np.asarray(cache.lengths()), [8, 3, 8])


def test_config_and_cache_validation():
    config, params, _, _ = _model("global_and_sliding")
    with pytest.raises(ValueError, match="sliding_window must be set for sliding_attention"):
        hybrid.HybridConfig(40, HIDDEN, ("sliding_attention",))
    with pytest.raises(ValueError, match="mamba2 config required by the 'mamba2' layers"):
        hybrid.HybridConfig(40, HIDDEN, ("mamba2",))
    with pytest.raises(ValueError, match=r"layer_kinds\[0\] must be one of"):
        hybrid.HybridConfig(40, HIDDEN, ("rnn",))
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=4"):
        hybrid.HybridConfig(40, HIDDEN, ("attention",), num_kv_heads=3)
    with pytest.raises(ValueError, match="mamba.hidden_size=8 must equal hidden_size=16"):
        hybrid.HybridConfig(40, HIDDEN, ("mamba",), mamba=mamba.MambaConfig(8, 16))
    other = HybridCache.init_cache(CONFIGS["mixed"].cache_metadata(BATCH, LONGEST))
    tokens = jnp.zeros((BATCH, 2), jnp.int32)
    with pytest.raises(ValueError, match="the cache's layer kinds"):
        hybrid.hybrid_forward_cached(params, config, tokens, other)
    with pytest.raises(TypeError, match="tokens must be an int array"):
        hybrid.hybrid_forward(params, config, jnp.zeros((1, 2)))
    with pytest.raises(TypeError, match="runtime must be HybridMetadata"):
        cache = HybridCache.init_cache(config.cache_metadata(BATCH, LONGEST))
        hybrid.hybrid_forward_cached(params, config, tokens, cache, runtime={})
