"""Quantised KV storage on SmolLM2: memory, decode speed and accuracy per codec.

For each storage (bfloat16 and float32 floats, then the int8, int4 and fp8 codecs) one table row:

* bytes per token (all 30 layers, scales included) and its ratio to bfloat16;
* the most tokens a fixed 1 GiB KV budget holds;
* decode tokens/s at batch 1 and batch 8: a jitted, donated one-token step of the model through
  a contiguous cache of 640 slots, timed over real decode steps after a 357-token prefill;
* perplexity of tests/data/perplexity_text.txt (``jaxkv.engine.perplexity``; its default window
  holds the whole text, so one teacher-forced forward) and its change against the float32 cache;
* greedy top-1 agreement over 256 decode steps: the 256 steps after the prefill are run one token
  at a time, fed the text's tokens, and each step's argmax is compared with the float32 cache's;
* ``tf max|dlogit|``: largest difference between those step-by-step logits and the teacher-forced
  forward's at the same positions. Each token is quantised on its own, so the two paths store the
  same codes for the same keys; but the model's projections of a long batch and of one token round
  differently in float32, and a value on a rounding boundary then takes the neighbouring code, so
  the gap is about one quantisation step rather than float noise. ``tf agree`` is the argmax
  agreement of the two paths.

Also prints the cost of one donated 1-token write into an int8 cache at capacities 1k/8k/32k
(in place: it should not grow with the capacity).

Run: ``.venv/bin/python benchmarks/quantized.py [--batch8-steps 32]``
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from _common import format_table, median_seconds

from jaxkv.caches import TransformerCache, TransformerCacheMetadata, TransformerRuntimeMetadata
from jaxkv.engine import Model, perplexity
from jaxkv.models.llama import forward

DATA = pathlib.Path(__file__).parents[1] / "tests" / "data"
CAPACITY = 640
DECODE_STEPS = 256
BUDGET = 2**30
STORAGES = {
    "float32": {"dtype": jnp.float32},
    "bfloat16": {"dtype": jnp.bfloat16},
    "int8": {"kv_quantization": "int8"},
    "int4": {"kv_quantization": "int4"},
    "fp8": {"kv_quantization": "fp8"},
}


@functools.partial(jax.jit, static_argnames="config")
def _forced_logits(params, cache, tokens, *, config):
    """Teacher-forced forward of ``tokens: [1, T]``: the logits of the last ``DECODE_STEPS``
    positions before the end ``[DECODE_STEPS, vocab]``."""
    logits, _ = forward(params, config, tokens, cache)
    return logits[0, -DECODE_STEPS - 1 : -1]


@functools.partial(jax.jit, static_argnames="config", donate_argnames="cache")
def _step(params, cache, tokens, *, config):
    """Write ``tokens: [B, T]`` and return the last position's logits ``[B, vocab]``."""
    logits, cache = forward(params, config, tokens, cache)
    return logits[:, -1], cache


def _metadata(model: Model, batch: int, storage: dict) -> TransformerCacheMetadata:
    config = model.config
    return TransformerCacheMetadata.create(
        batch, CAPACITY, config.num_layers, config.num_kv_heads, config.head_dim, **storage
    )


def _decode(model: Model, storage: dict, ids: list[int], batch: int, steps: int):
    """Prefill all but the last ``DECODE_STEPS + 1`` text tokens, then ``steps`` one-token steps
    fed the text. Returns (per-step logits of row 0 ``[steps, vocab]``, seconds of the steps)."""
    config = model.config
    prefill_len = len(ids) - DECODE_STEPS - 1
    cache = TransformerCache.init_cache(_metadata(model, batch, storage))
    prompt = jnp.asarray([ids[:prefill_len]] * batch, jnp.int32)
    logits, cache = _step(model.params, cache, prompt, config=config)
    # Compile the one-token step outside the timed loop.
    one = jnp.zeros((batch, 1), jnp.int32)
    compiled = _step.lower(model.params, cache, one, config=config).compile()
    rows = []
    start = time.perf_counter()
    for i in range(steps):
        token = jnp.full((batch, 1), ids[prefill_len + i], jnp.int32)
        logits, cache = compiled(model.params, cache, token)
        rows.append(logits[0])
    jax.block_until_ready(rows)
    seconds = time.perf_counter() - start
    return np.asarray(jnp.stack(rows)), seconds


def _write_cost(capacity: int) -> float:
    """Median seconds of one donated 1-token write into a 1-layer int8 SmolLM2-shaped cache."""
    metadata = TransformerCacheMetadata.create(1, capacity, 1, 3, 64, kv_quantization="int8")
    cache = TransformerCache.init_cache(metadata)

    def write(cache, key):
        _, view = cache[0].concatenate_to_cache(key, key, TransformerRuntimeMetadata.create())
        return cache.replace_view(0, view)

    step = jax.jit(write, donate_argnums=0)
    rewind = jax.jit(lambda cache: cache.truncate(jnp.zeros((1,), jnp.int32)), donate_argnums=0)
    key = jnp.ones((1, 1, 3, 64), jnp.float32)
    state = {"cache": step(cache, key), "writes": 0}

    def run():
        state["writes"] += 1
        if state["writes"] % 512 == 0:
            state["cache"] = rewind(state["cache"])
        state["cache"] = step(state["cache"], key)
        jax.block_until_ready(state["cache"])

    return median_seconds(run, 200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch8-steps", type=int, default=32)
    args = parser.parse_args()
    model = Model.load()
    config = model.config
    ids = json.loads((DATA / "reference.json").read_text())["perplexity"]["ids"]
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; SmolLM2-135M float32 weights, "
        f"{config.num_layers} layers x {config.num_kv_heads} kv heads x {config.head_dim} dims; "
        f"text of {len(ids)} tokens, prefill {len(ids) - DECODE_STEPS - 1} + {DECODE_STEPS} "
        f"decode steps; contiguous cache of {CAPACITY} slots"
    )
    tokens = jnp.asarray([ids], jnp.int32)
    results = {}
    for name, storage in STORAGES.items():
        cache = TransformerCache.init_cache(_metadata(model, 1, storage))
        forced = _forced_logits(model.params, cache, tokens, config=config)
        scored = perplexity(
            model,
            ids,
            kv_quantization=storage.get("kv_quantization", "none"),
            kv_dtype=storage.get("dtype"),
        )
        stepped, seconds = _decode(model, storage, ids, 1, DECODE_STEPS)
        _, seconds8 = _decode(model, storage, ids, 8, args.batch8_steps)
        results[name] = {
            "bytes": _metadata(model, 1, storage).bytes_per_token(),
            "perplexity": scored.perplexity,
            "argmax": stepped.argmax(-1),
            "forced_gap": float(np.abs(stepped - np.asarray(forced)).max()),
            "forced_agree": float(np.mean(stepped.argmax(-1) == np.asarray(forced).argmax(-1))),
            "tps1": DECODE_STEPS / seconds,
            "tps8": 8 * args.batch8_steps / seconds8,
        }
        print(f"  {name}: done", flush=True)

    base = results["float32"]
    bfloat16 = results["bfloat16"]["bytes"]
    rows = []
    for name, r in results.items():
        rows.append(
            [
                name,
                f"{r['bytes']:,}",
                f"{r['bytes'] / bfloat16:.3f}x",
                f"{BUDGET // r['bytes']:,}",
                f"{r['tps1']:.1f}",
                f"{r['tps8']:.1f}",
                f"{r['perplexity']:.3f}",
                f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.2f}%",
                f"{100 * np.mean(r['argmax'] == base['argmax']):.1f}%",
                f"{r['forced_gap']:.1e}",
                f"{100 * r['forced_agree']:.1f}%",
            ]
        )
    headers = [
        "storage",
        "bytes/token",
        "vs bf16",
        "tokens in 1 GiB",
        "tok/s b=1",
        "tok/s b=8",
        "perplexity",
        "ppl delta",
        "top-1 agree",
        "tf max|dlogit|",
        "tf agree",
    ]
    print()
    print(format_table(headers, rows))
    print(f"(HF reference perplexity: 27.105; top-1 agreement against float32 over {DECODE_STEPS}")
    print(" decode steps; tf: step-by-step logits vs the teacher-forced forward's)")
    print("\nint8 cache: one donated 1-token write (in place: flat in the capacity)")
    print(format_table(
        ["capacity", "median us"],
        [[c, f"{1e6 * _write_cost(c):.1f}"] for c in (1024, 8192, 32768)],
    ))  # fmt: skip


if __name__ == "__main__":
    main()
