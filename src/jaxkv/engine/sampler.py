"""The batched device sampler: every row of a step with its own settings.

The model step hands over ``logits: [rows, vocab]``; ``sample_rows`` turns them into one token per
row, each row with its own temperature, top-k, top-p, min-p, penalties and PRNG stream. It is
jitted apart from the model, so its few variants (with or without penalties, log-probabilities,
sampled rows) compile in a second instead of once per model shape.

No full sort of the vocabulary on the common path: ``lax.top_k`` takes the ``CANDIDATES`` most
likely tokens, and the filters run on those with the probabilities of the full distribution. The
result is exact whenever the filters keep fewer tokens than that (top-k <= ``CANDIDATES``, or a
top-p / min-p cut inside the candidates); a row with no filter samples the full distribution
directly; only a row whose filters reach past the candidates takes the slower exact path (a
threshold search over the whole vocabulary, still no sort), through a ``lax.cond`` that costs
nothing when no row needs it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

CANDIDATES = 256
"""Tokens ``lax.top_k`` keeps before the exact filters run."""


def row_keys(seeds: jax.Array, choices: jax.Array, counters: jax.Array) -> jax.Array:
    """One PRNG key per row from ``(seed, choice index, tokens drawn so far)``, all ``[rows]``
    int32: a seeded request draws the same tokens whatever batch it runs in."""

    def key(seed, choice, counter):
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), choice), counter)

    return jax.vmap(key)(seeds, choices, counters)


def apply_penalties(
    logits: jax.Array,
    seen: jax.Array,
    counts: jax.Array,
    repetition: jax.Array,
    presence: jax.Array,
    frequency: jax.Array,
) -> jax.Array:
    """Repetition (HF's rule, over prompt and output: ``seen [rows, vocab]`` bool), presence and
    frequency penalties (OpenAI's rule, over the output: ``counts [rows, vocab]`` int32)."""
    rep = repetition[:, None]
    penalised = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(seen, penalised, logits)
    counts = counts.astype(jnp.float32)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def _keep(probs: jax.Array, ranks: jax.Array, top_k, top_p, min_p) -> jax.Array:
    """Which ranked tokens (``probs`` descending, of the full distribution) the filters keep;
    rank 0 always."""
    before = jnp.cumsum(probs, axis=-1) - probs
    return (
        (ranks < top_k[:, None])
        & (before < top_p[:, None])
        & (probs >= min_p[:, None] * probs[:, :1])
    ) | (ranks == 0)


def _kept(log_probs: jax.Array, top_k, top_p, min_p) -> jax.Array:
    """``[rows, vocab]`` bool: the tokens the filters keep, found without sorting.

    Every filter keeps the tokens at or above a probability threshold: top-k the ``k``-th
    largest, top-p the smallest ``p_i`` whose mass of strictly likelier tokens is below
    ``top_p``, min-p ``min_p * max``. Both searched thresholds are found at once by bisection
    on the bits of a non-negative float32 (ordered like the floats), 32 halvings of a pass
    over the vocabulary. Tokens tied at the cut are kept together.
    """
    probs = jnp.exp(log_probs)
    peak = jnp.max(probs, axis=-1)

    def halve(_, bounds):
        low, high = bounds
        middle = low + (high - low) // 2
        cut = lax.bitcast_convert_type(middle, jnp.float32)[:, None]
        above = probs > cut
        mass = jnp.sum(jnp.where(above, probs, 0.0), axis=-1)
        fits = (mass < top_p) & (jnp.sum(above, axis=-1) < top_k)
        return jnp.where(fits, low, middle + 1), jnp.where(fits, middle, high)

    low = jnp.zeros(peak.shape, jnp.int32)
    high = lax.bitcast_convert_type(peak, jnp.int32)
    _, high = lax.fori_loop(0, 32, halve, (low, high))
    cut = jnp.maximum(lax.bitcast_convert_type(high, jnp.float32), min_p * peak)[:, None]
    return (probs >= cut) | (probs >= peak[:, None])


def _draw(keys: jax.Array, logits: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.categorical)(keys, logits)


def filtered_sample(
    logits: jax.Array,
    keys: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array,
) -> jax.Array:
    """One token per row of ``logits: [rows, vocab]``; every setting is ``[rows]``
    (``temperature`` 0: greedy; ``top_k`` >= vocab, ``top_p`` 1 and ``min_p`` 0: off)."""
    rows, vocab = logits.shape
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # Shift by the row's maximum first: with a tiny temperature, logits / temperature would
    # overflow to inf; shifted, the best token stays at 0 and the others go to -inf at worst.
    # XLA flushes subnormals to zero: a temperature below the smallest normal float32 would
    # divide by zero, so clamp it there (it samples the best token either way).
    safe_t = jnp.maximum(temperature, jnp.finfo(jnp.float32).tiny)[:, None]
    scaled = (logits - jnp.max(logits, axis=-1, keepdims=True)) / safe_t
    log_norm = jax.nn.logsumexp(scaled, axis=-1, keepdims=True)
    width = min(CANDIDATES, vocab)
    values, indices = lax.top_k(scaled, width)
    ranks = jnp.arange(width)[None, :]
    keep = _keep(jnp.exp(values - log_norm), ranks, top_k, top_p, min_p)
    unfiltered = (top_k >= vocab) & (top_p >= 1.0) & (min_p <= 0.0)
    # The candidates hold every kept token unless the last candidate is kept too (the filters
    # are monotone in rank) and top-k reaches past them.
    covered = (top_k <= width) | ~keep[:, -1]
    choice = jnp.take_along_axis(
        indices, _draw(keys, jnp.where(keep, values, -jnp.inf))[:, None], 1
    )
    fast = jnp.where(unfiltered, _draw(keys, scaled), choice[:, 0])
    needs_search = jnp.any(~covered & ~unfiltered & (temperature > 0))

    def threshold_path() -> jax.Array:
        exact = _draw(
            keys, jnp.where(_kept(scaled - log_norm, top_k, top_p, min_p), scaled, -jnp.inf)
        )
        return jnp.where(covered | unfiltered, fast, exact)

    sampled = lax.cond(needs_search, threshold_path, lambda: fast).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


@functools.partial(jax.jit, static_argnames=("penalties", "num_logprobs", "any_sampled"))
def sample_rows(
    logits,
    knobs,
    history,
    *,
    penalties: bool,
    num_logprobs: int | None,
    any_sampled: bool,
):
    """Tokens (``[rows]`` int32) and, with ``num_logprobs``, ``(chosen, top_ids, top_logprobs)``.

    ``knobs``: dict of ``[rows]`` arrays ``temperature, top_k, top_p, min_p, repetition,
    presence, frequency`` (float32 / int32) and ``seed, choice, counter`` (int32);
    ``history``: ``(seen, counts)`` ``[rows, vocab]`` when ``penalties``, else ``None``.
    """
    raw = logits.astype(jnp.float32)
    logits = raw
    if penalties:
        seen, counts = history
        logits = apply_penalties(
            logits, seen, counts, knobs["repetition"], knobs["presence"], knobs["frequency"]
        )
    if any_sampled:
        keys = row_keys(knobs["seed"], knobs["choice"], knobs["counter"])
        tokens = filtered_sample(
            logits, keys, knobs["temperature"], knobs["top_k"], knobs["top_p"], knobs["min_p"]
        )
    else:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if num_logprobs is None:
        return tokens, None
    logprobs = jax.nn.log_softmax(raw, axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top_values, top_ids = lax.top_k(logprobs, max(num_logprobs, 1))
    return tokens, (chosen, top_ids.astype(jnp.int32), top_values)


__all__ = [
    "CANDIDATES",
    "apply_penalties",
    "filtered_sample",
    "row_keys",
    "sample_rows",
]
