"""Contiguous KV cache: write cost vs capacity, and decode attention cost vs capacity.

Prints two tables (median of several timed runs after a warm-up):
1. one cache write of 1 token per row, jitted with the cache donated, at capacities 1k/8k/32k
   (an in-place write should cost the same at every capacity);
2. one decode attention step at live length 512 with capacity 512 vs 8192 (cost should follow
   the live length, not the capacity).

Run: ``.venv/bin/python benchmarks/transformer_cache.py [--repeats 9]``
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
from _common import median_seconds

from jaxkv.caches import TransformerCache, TransformerCacheMetadata, TransformerRuntimeMetadata
from jaxkv.ops import attention

BATCH, KV_HEADS, Q_HEADS, HEAD_DIM, LAYERS = 1, 8, 32, 128, 1


def _metadata(capacity: int) -> TransformerCacheMetadata:
    return TransformerCacheMetadata.create(
        BATCH, capacity, LAYERS, KV_HEADS, HEAD_DIM, dtype=jnp.bfloat16
    )


def bench_write(capacity: int, repeats: int) -> float:
    cache = TransformerCache.init_cache(_metadata(capacity))

    @jax.jit
    def fill(cache, key):
        return cache.replace_view(0, cache[0].concatenate_to_cache(key, key)[1])

    @jax.jit
    def reset(cache):
        return cache.reset_rows(jnp.ones((BATCH,), bool))

    def write(cache, key):
        _, view = cache[0].concatenate_to_cache(key, key)
        return cache.replace_view(0, view)

    step = jax.jit(write, donate_argnums=0)
    token = jnp.ones((BATCH, 1, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    # Start half full so the write lands mid-buffer.
    cache = fill(cache, jnp.ones((BATCH, capacity // 2, KV_HEADS, HEAD_DIM), jnp.bfloat16))
    state = {"cache": cache}
    writes = 0

    def run():
        nonlocal writes
        writes += 1
        if writes % 1000 == 0:  # never reach capacity
            state["cache"] = reset(state["cache"])
        state["cache"] = step(state["cache"], token)
        jax.block_until_ready(state["cache"])

    return median_seconds(run, repeats * 20)


def contiguous_decode_step(batch: int, capacity: int, live: int):
    """A function running one real decode step (write 1 token, attend 32 query heads) with the
    view donated; the row length is rewound after each step so every run attends over exactly
    ``live`` keys. ``benchmarks/paged.py`` uses it as its contiguous baseline."""
    metadata = TransformerCacheMetadata.create(
        batch, capacity, LAYERS, KV_HEADS, HEAD_DIM, dtype=jnp.bfloat16
    )
    view = TransformerCache.init_cache(metadata)[0]
    prompt = jax.random.normal(
        jax.random.key(0), (batch, live - 1, KV_HEADS, HEAD_DIM), jnp.bfloat16
    )
    _, view = jax.jit(lambda v, k: v.concatenate_to_cache(k, k))(view, prompt)
    query = jax.random.normal(jax.random.key(1), (batch, 1, Q_HEADS, HEAD_DIM), jnp.float32)
    token = jnp.ones((batch, 1, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    runtime = TransformerRuntimeMetadata.create()

    def decode(view, query, token):
        kv, view = view.concatenate_to_cache(token, token, runtime)
        return attention(query, kv), view

    step = jax.jit(decode, donate_argnums=0)
    rewind = jax.jit(
        lambda view: dataclasses.replace(view, lengths=view.lengths - 1), donate_argnums=0
    )
    state = {"view": view}

    def run():
        out, state["view"] = step(state["view"], query, token)
        out.block_until_ready()
        state["view"] = rewind(state["view"])

    return run


def bench_decode(capacity: int, live: int, repeats: int) -> float:
    """Median seconds of ``contiguous_decode_step`` at batch ``BATCH``."""
    return median_seconds(contiguous_decode_step(BATCH, capacity, live), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; batch={BATCH}, "
        f"kv_heads={KV_HEADS}, q_heads={Q_HEADS}, head_dim={HEAD_DIM}, bfloat16 storage"
    )
    print("\n1-token cache write (jit, donated)")
    print(f"{'capacity':>10} {'median us':>10} {'vs 1k':>7}")
    base = None
    for capacity in (1024, 8192, 32768):
        seconds = bench_write(capacity, args.repeats)
        base = base or seconds
        print(f"{capacity:>10} {seconds * 1e6:>10.1f} {seconds / base:>6.2f}x")

    print("\nDecode attention step at live length 512")
    print(f"{'capacity':>10} {'median us':>10} {'vs 512':>7}")
    base = None
    for capacity in (512, 8192):
        seconds = bench_decode(capacity, 512, args.repeats * 5)
        base = base or seconds
        print(f"{capacity:>10} {seconds * 1e6:>10.1f} {seconds / base:>6.2f}x")


if __name__ == "__main__":
    main()
