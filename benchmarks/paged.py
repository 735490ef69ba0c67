"""Paged KV cache: memory held, prefix sharing, and decode attention cost against the contiguous
cache.

Prints three tables:
1. memory -- 64 sequences with lengths drawn from 16..2048 (fixed seed): pages a real
   ``PageManager`` holds for them vs a contiguous cache sized for the longest;
2. prefix sharing -- 32 requests sharing a 1,024-token prefix: pages held with and without prefix
   caching, and the fraction of prefill tokens the prefix cache skips;
3. one decode step (write one token per sequence, then attention; jitted, cache donated), paged vs
   ``TransformerCache`` + ``jaxkv.ops.attention`` at equal live lengths, with the page table sized
   just for the live length ("small") and for 8,192 tokens ("large"). Median of ``--repeats``
   timed runs after a warm-up, the three variants timed in turn.

Run: ``.venv/bin/python benchmarks/paged.py [--repeats 9]``
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from transformer_cache import contiguous_decode_step

from jaxkv.caches import (
    PagedCacheMetadata,
    PagedCacheView,
    PagedRuntimeMetadata,
)
from jaxkv.ops import attention
from jaxkv.pages import PageManager

KV_HEADS, Q_HEADS, HEAD_DIM, LAYERS, PAGE_SIZE = 8, 32, 128, 32, 16
DTYPE = jnp.bfloat16
LARGE_CONTEXT = 8192


def _interleaved_medians(fns, repeats: int) -> list[float]:
    """Median seconds of each function, timed in turn round after round so that a slow spell of
    the machine hits every variant alike."""
    for fn in fns:
        fn()  # compile + warm up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def _bytes_per_token() -> int:
    return LAYERS * 2 * KV_HEADS * HEAD_DIM * np.dtype(DTYPE).itemsize


def _manager(num_pages: int, max_pages: int, seqs: int, prefix: bool) -> PageManager:
    return PageManager(
        num_pages,
        PAGE_SIZE,
        seqs,
        max_pages,
        enable_prefix_caching=prefix,
        hash_key=b"bench",
        token_buckets=(4096,),
    )


def memory_table() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(16, 2049, size=64)
    max_pages = -(-2048 // PAGE_SIZE)
    manager = _manager(64 * max_pages, max_pages, 64, prefix=False)
    for i, length in enumerate(lengths):
        manager.add_sequence(i, rng.integers(0, 32000, size=int(length)).tolist())
        manager.commit_step(manager.schedule([(i, int(length))]))
    held = manager.num_used_pages
    tokens = int(lengths.sum())
    contiguous_tokens = 64 * int(lengths.max())
    per_token = _bytes_per_token()
    print(
        f"\n(1) memory: 64 sequences, lengths 16..2048 (seed 0), page_size={PAGE_SIZE}, "
        f"{LAYERS} layers x {KV_HEADS} kv heads x {HEAD_DIM} bf16"
    )
    print(f"{'':>28} {'tokens':>9} {'MiB':>9}")
    print(f"{'live tokens':>28} {tokens:>9} {tokens * per_token / 2**20:>9.1f}")
    print(
        f"{'paged (' + str(held) + ' pages)':>28} {held * PAGE_SIZE:>9} "
        f"{held * PAGE_SIZE * per_token / 2**20:>9.1f}"
    )
    print(
        f"{'contiguous [64, ' + str(int(lengths.max())) + ']':>28} {contiguous_tokens:>9} "
        f"{contiguous_tokens * per_token / 2**20:>9.1f}"
    )
    waste = (held * PAGE_SIZE - tokens) / 64 / PAGE_SIZE
    print(f"paged waste: {waste:.2f} page per sequence (< 1 by construction)")


def prefix_table() -> None:
    rng = np.random.default_rng(1)
    shared = rng.integers(0, 32000, size=1024).tolist()
    suffixes = [rng.integers(0, 32000, size=int(n)).tolist() for n in rng.integers(16, 257, 32)]
    print("\n(2) prefix sharing: 32 requests = 1,024 shared tokens + 16..256 own tokens")
    print(f"{'':>18} {'pages held':>11} {'prefill tokens':>15} {'skipped':>8}")
    for prefix in (False, True):
        manager = _manager(32 * 96, 96, 32, prefix=prefix)
        total, computed = 0, 0
        for i, suffix in enumerate(suffixes):
            prompt = shared + suffix
            hit = manager.add_sequence(i, prompt)
            todo = len(prompt) - hit
            manager.commit_step(manager.schedule([(i, todo)]))
            total += len(prompt)
            computed += todo
        name = "with sharing" if prefix else "without sharing"
        print(
            f"{name:>18} {manager.num_used_pages:>11} {computed:>15} {1 - computed / total:>8.1%}"
        )


def _contiguous_decode(batch: int, live: int):
    """A function running one contiguous-cache decode step at ``live`` tokens (same shapes)."""
    return contiguous_decode_step(batch, live, live)


def _paged_decode(batch: int, live: int, max_context: int):
    """A function running one paged decode step at ``live`` tokens per sequence, with a page
    table sized for ``max_context`` tokens."""
    max_pages = -(-max_context // PAGE_SIZE)
    live_pages = -(-live // PAGE_SIZE)
    num_pages = max(batch * live_pages, max_pages)
    metadata = PagedCacheMetadata.create(
        1, num_pages, PAGE_SIZE, KV_HEADS, HEAD_DIM, batch, max_pages, dtype=DTYPE
    )
    view = PagedCacheView.init(metadata, 0)
    words = jax.random.bits(jax.random.key(0), view.key_pages.shape, jnp.uint16) & 0x3FFF
    view = dataclasses.replace(view, key_pages=words, value_pages=jnp.copy(words))
    # Sequence i holds pages i, i + batch, i + 2 * batch, ...: interleaved, not contiguous.
    tables = np.full((batch, max_pages), -1, np.int32)
    tables[:, :live_pages] = np.arange(live_pages)[None, :] * batch + np.arange(batch)[:, None]
    last = live - 1
    slots = tables[:, last // PAGE_SIZE] * PAGE_SIZE + last % PAGE_SIZE
    runtime = PagedRuntimeMetadata(
        page_tables=jnp.asarray(tables),
        context_lens=jnp.full((batch,), live, jnp.int32),
        query_start_loc=jnp.arange(batch + 1, dtype=jnp.int32),
        num_seqs=jnp.asarray(batch, jnp.int32),
        slot_mapping=jnp.asarray(slots, jnp.int32),
        positions=jnp.full((batch,), last, jnp.int32),
        token_ids=jnp.zeros((batch,), jnp.int32),
        copy_ops=jnp.full((batch, 2), -1, jnp.int32),
        logits_indices=jnp.arange(batch, dtype=jnp.int32),
        num_pages=num_pages,
        page_size=PAGE_SIZE,
        max_query_len=1,  # a decode step: one new token per sequence
    )
    query = jax.random.normal(jax.random.key(1), (batch, Q_HEADS, HEAD_DIM), jnp.float32)
    token = jnp.ones((batch, KV_HEADS, HEAD_DIM), DTYPE)

    def decode(view, runtime, query, token):
        kv, view = view.concatenate_to_cache(token, token, runtime)
        return attention(query, kv), view

    step = jax.jit(decode, donate_argnums=0)
    state = {"view": view}

    def run():
        out, state["view"] = step(state["view"], runtime, query, token)
        out.block_until_ready()

    return run


def decode_table(repeats: int) -> None:
    print(
        f"\n(3) one decode step (1 layer, {Q_HEADS} query / {KV_HEADS} kv heads, head_dim "
        f"{HEAD_DIM}, bf16 storage, page_size {PAGE_SIZE}); median of {repeats} runs, us"
    )
    header = (
        f"{'batch':>5} {'live':>6} {'contiguous':>11} {'paged small':>12} "
        f"{'paged large':>12} {'small/contig':>13} {'large/small':>12}"
    )
    print(header)
    for batch in (1, 8):
        for live in (512, 2048):
            contiguous, small, large = _interleaved_medians(
                [
                    _contiguous_decode(batch, live),
                    _paged_decode(batch, live, live),
                    _paged_decode(batch, live, LARGE_CONTEXT),
                ],
                repeats,
            )
            print(
                f"{batch:>5} {live:>6} {contiguous * 1e6:>11.0f} {small * 1e6:>12.0f} "
                f"{large * 1e6:>12.0f} {small / contiguous:>12.2f}x {large / small:>11.2f}x"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--only", choices=("memory", "prefix", "decode"), default=None)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    if args.only in (None, "memory"):
        memory_table()
    if args.only in (None, "prefix"):
        prefix_table()
    if args.only in (None, "decode"):
        decode_table(max(5, args.repeats))


if __name__ == "__main__":
    main()
