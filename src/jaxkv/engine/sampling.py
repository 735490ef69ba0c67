"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxkv import _validation as v


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token.

    Attributes:
        temperature: 0 for greedy decoding, else logits are divided by it before sampling.
        top_k: keep only the ``top_k`` most likely tokens (``None``: all).
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``
            (nucleus sampling; 1.0: all).
        seed: PRNG seed of the sampler.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        owner = "SamplingParams"
        if not isinstance(self.temperature, int | float) or isinstance(self.temperature, bool):
            raise TypeError(f"{owner}: temperature must be a number, got {self.temperature!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"{owner}: temperature must be >= 0, got {self.temperature}")
        v.require_optional_int(owner, "top_k", self.top_k, minimum=1)
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise ValueError(f"{owner}: top_p must lie in (0, 1], got {self.top_p!r}")
        v.require_int(owner, "seed", self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: jax.Array, key: jax.Array, params: SamplingParams) -> jax.Array:
    """Pick one token per row.

    Only ``params.greedy`` shapes the computation; temperature, top-k and top-p enter as traced
    values, so one compiled step serves every sampling setting.

    Args:
        logits: ``[batch, vocab]`` float32.
        key: a PRNG key (unused when greedy).
        params: the sampling settings.

    Returns:
        ``[batch]`` int32 token ids.
    """
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    vocab = logits.shape[-1]
    top_k = jnp.asarray(vocab if params.top_k is None else min(params.top_k, vocab), jnp.int32)
    temperature = jnp.float32(params.temperature)
    return sample_dynamic(logits, key, temperature, top_k, jnp.float32(params.top_p))


def sample_dynamic(
    logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
    """Temperature / top-k / top-p sampling with the settings as (traced) scalars.

    ``logits: [batch, vocab]`` -> ``[batch]`` int32; ``top_k`` counts tokens (vocab = off).
    """
    # Shift by the row's maximum first: with a tiny temperature, logits / temperature would
    # overflow to inf and the softmax to NaN; shifted, the best token stays at 0 and the others
    # go to -inf at worst, so the result tends to greedy as the temperature goes to 0.
    # XLA flushes subnormal floats to zero, so a temperature below the smallest normal float32
    # would divide by zero: clamp it there (it samples the best token either way).
    temperature = jnp.maximum(temperature, jnp.finfo(jnp.float32).tiny)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    logits = (logits - peak) / temperature
    order = jnp.argsort(-logits, axis=-1)
    ranked = jnp.take_along_axis(logits, order, axis=-1)  # descending
    probs = jax.nn.softmax(ranked, axis=-1)
    # Keep rank r if r < top_k and the mass before it is still below top_p (rank 0 always).
    before = jnp.cumsum(probs, axis=-1) - probs
    ranks = jnp.arange(logits.shape[-1])
    keep = (ranks < top_k) & (before < top_p)
    choice = jax.random.categorical(key, jnp.where(keep, ranked, -jnp.inf), axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
