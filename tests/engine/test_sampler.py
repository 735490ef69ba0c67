"""The batched device sampler: its filtered distributions equal the exact (fully sorted) ones
on both of its paths, per-row settings, penalties and the PRNG streams."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.engine import sampler

VOCAB = 40
DRAWS = 20000


def reference(logits, temperature, top_k, top_p, min_p):
    """The filtered distribution by the definition: sort everything, cut, renormalise."""
    scaled = (logits - logits.max()) / temperature
    probs = np.exp(scaled) / np.exp(scaled).sum()
    order = np.argsort(-probs, kind="stable")
    ranked = probs[order]
    before = np.cumsum(ranked) - ranked
    keep = (np.arange(len(probs)) < top_k) & (before < top_p) & (ranked >= min_p * ranked[0])
    keep[0] = True
    out = np.zeros_like(probs)
    out[order[keep]] = ranked[keep]
    return out / out.sum()


def empirical(logits, temperature, top_k, top_p, min_p, seed=0):
    rows = np.broadcast_to(logits, (DRAWS, len(logits)))
    keys = jax.random.split(jax.random.key(seed), DRAWS)

    def full(x, dtype):
        return jnp.full((DRAWS,), x, dtype)

    tokens = sampler.filtered_sample(
        jnp.asarray(rows, jnp.float32),
        keys,
        full(temperature, jnp.float32),
        full(top_k, jnp.int32),
        full(top_p, jnp.float32),
        full(min_p, jnp.float32),
    )
    return np.bincount(np.asarray(tokens), minlength=len(logits)) / DRAWS


@pytest.mark.parametrize("candidates", [8, 256], ids=["search-path", "candidate-path"])
@pytest.mark.parametrize(
    "settings",
    [
        (1.0, VOCAB, 1.0, 0.0),  # no filter: the full distribution
        (0.7, 5, 1.0, 0.0),
        (1.3, VOCAB, 0.8, 0.0),
        (1.0, VOCAB, 1.0, 0.05),
        (2.0, 30, 0.95, 0.01),
    ],
)
def test_filtered_sampling_draws_the_exact_filtered_distribution(monkeypatch, candidates, settings):
    # With 8 candidates the filters reach past them and the threshold search runs.
    monkeypatch.setattr(sampler, "CANDIDATES", candidates)
    logits = np.random.default_rng(3).normal(0, 1.5, VOCAB).astype(np.float32)
    want = reference(logits, *settings)
    got = empirical(logits, *settings)
    assert np.all(got[want == 0] == 0), "a filtered-out token was drawn"
    assert 0.5 * np.abs(got - want).sum() < 0.03


def test_greedy_rows_and_sampled_rows_share_one_call():
    logits = jnp.asarray(np.random.default_rng(4).normal(size=(3, VOCAB)), jnp.float32)
    keys = jax.random.split(jax.random.key(0), 3)
    tokens = sampler.filtered_sample(
        logits,
        keys,
        jnp.asarray([0.0, 1.0, 0.0]),
        jnp.asarray([VOCAB, 1, VOCAB]),
        jnp.ones(3),
        jnp.zeros(3),
    )
    best = np.argmax(np.asarray(logits), axis=-1)
    np.testing.assert_array_equal(np.asarray(tokens), best)  # top_k=1 is greedy too


def test_row_keys_depend_on_seed_choice_and_counter_only():
    a = sampler.row_keys(jnp.asarray([1, 1, 2]), jnp.asarray([0, 1, 0]), jnp.asarray([5, 5, 5]))
    b = sampler.row_keys(jnp.asarray([2, 1]), jnp.asarray([0, 0]), jnp.asarray([5, 5]))
    data = np.asarray(jax.random.key_data(a))
    other = np.asarray(jax.random.key_data(b))
    np.testing.assert_array_equal(data[0], other[1])
    np.testing.assert_array_equal(data[2], other[0])
    assert not np.array_equal(data[0], data[1])


def test_penalties_follow_their_definitions():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(2, VOCAB)).astype(np.float32)
    seen = rng.random((2, VOCAB)) < 0.3
    counts = rng.integers(0, 3, (2, VOCAB)).astype(np.int32)
    repetition, presence, frequency = np.array([1.3, 1.0]), np.array([0.5, 0.0]), np.array([0.2, 1])
    got = sampler.apply_penalties(
        jnp.asarray(logits),
        jnp.asarray(seen),
        jnp.asarray(counts),
        jnp.asarray(repetition, jnp.float32),
        jnp.asarray(presence, jnp.float32),
        jnp.asarray(frequency, jnp.float32),
    )
    want = logits.copy()
    for row in range(2):
        r = repetition[row]
        hit = seen[row]
        want[row, hit] = np.where(logits[row, hit] > 0, logits[row, hit] / r, logits[row, hit] * r)
        want[row] -= frequency[row] * counts[row] + presence[row] * (counts[row] > 0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
