"""The engine's batched sampler against a full sort of the vocabulary, on one step's logits.

Rows of SmolLM2 logits (8 prompts, the first generated position) and of random normal logits
(a flat distribution, where top-p reaches far past the sampler's candidates), 49,152 tokens
each; median of 30 calls after a warm-up. "full sort" is how sampling worked before: argsort
the whole vocabulary, then cut top-k / top-p.

Run: ``.venv/bin/python benchmarks/sampling.py``
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.engine import Model, generate
from jaxkv.engine.sampler import filtered_sample

ROWS = 8
CALLS = 30
PROMPTS = ["Write a story about a dragon.", "The capital of France is", "def fib(n):", "Hello"]


@jax.jit
def full_sort(logits, key, temperature, top_k, top_p):
    scaled = (logits - jnp.max(logits, -1, keepdims=True)) / temperature
    order = jnp.argsort(-scaled, -1)
    ranked = jnp.take_along_axis(scaled, order, -1)
    probs = jax.nn.softmax(ranked, -1)
    keep = (jnp.arange(logits.shape[-1]) < top_k) & (jnp.cumsum(probs, -1) - probs < top_p)
    choice = jax.random.categorical(key, jnp.where(keep, ranked, -jnp.inf), -1)
    return jnp.take_along_axis(order, choice[:, None], -1)[:, 0]


def median_ms(function, *args) -> float:
    function(*args).block_until_ready()
    times = []
    for _ in range(CALLS):
        start = time.perf_counter()
        function(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def main() -> None:
    model = Model.load()
    result = generate(model, PROMPTS * 2, max_new_tokens=1, output_logits=True)
    real = jnp.asarray(np.stack([g.logits[0] for g in result.generations]), jnp.float32)
    vocab = real.shape[-1]
    flat = jnp.asarray(np.random.default_rng(0).normal(0, 3, (ROWS, vocab)), jnp.float32)
    keys = jax.random.split(jax.random.key(0), ROWS)
    sample = jax.jit(filtered_sample)

    def rows(value, dtype):
        return jnp.full((ROWS,), value, dtype)

    print(
        f"{'logits':<8} {'settings':<28} {'full sort (ms)':>15} {'sampler (ms)':>13} {'ratio':>7}"
    )
    for name, logits in (("SmolLM2", real), ("random", flat)):
        for temperature, top_k, top_p in ((0.8, 40, 0.9), (0.8, None, 0.9), (1.0, None, 0.95)):
            k = vocab if top_k is None else top_k
            before = median_ms(full_sort, logits, keys[0], temperature, k, top_p)
            after = median_ms(
                sample,
                logits,
                keys,
                rows(temperature, jnp.float32),
                rows(k, jnp.int32),
                rows(top_p, jnp.float32),
                rows(0.0, jnp.float32),
            )
            settings = f"T={temperature} top-k={top_k} top-p={top_p}"
            print(
                f"{name:<8} {settings:<28} {before:>15.1f} {after:>13.1f} {before / after:>6.1f}x"
            )


if __name__ == "__main__":
    main()
