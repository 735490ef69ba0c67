"""Gemma 3 270M: decode speed at 1k and 4k tokens of context against HF transformers on the same
GGUF, load time, and the KV bytes of one sequence at 8k and 32k tokens with the sliding-window
layers on rings against a cache that keeps every layer global.

Both sides run float32 weights and greedy decoding of one sequence after a seeded random prompt:
jaxkv through ``generate`` (sliding layers on rings, global layers contiguous; compile time left
out of its decode time), HF through ``model(...)`` + argmax in a loop with its own cache and
SDPA attention on the same number of threads. Each side runs in its own process, one after the
other; the figure is the median of ``--repeats`` runs.

    .venv/bin/python benchmarks/gemma3.py --hf-python /tmp/hfenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import format_table, peak_rss_mib, run_json_worker  # noqa: E402

_PREFIX = "RESULT "
_LOW_ID, _HIGH_ID = 1000, 200_000  # plain word pieces, no control tokens


def _prompt(length: int, seed: int) -> list[int]:
    import random

    generator = random.Random(seed)
    return [2] + [generator.randrange(_LOW_ID, _HIGH_ID) for _ in range(length - 1)]


def _jaxkv_worker(spec: dict[str, Any]) -> dict[str, Any]:
    from jaxkv.engine import Model, generate

    start = time.perf_counter()
    model = Model.load("gemma3")
    load_seconds = time.perf_counter() - start
    results: dict[str, Any] = {"load_seconds": load_seconds}
    for codec in spec["codecs"]:
        for context in spec["contexts"]:
            prompt = _prompt(context, seed=context)
            rates = []
            for _ in range(spec["repeats"] + 1):  # the first run compiles
                run = generate(
                    model,
                    [prompt],
                    max_new_tokens=spec["steps"] + 1,
                    ignore_eos=True,
                    kv_quantization=codec,
                )
                rates.append(run.decode_steps / run.decode_seconds)
            results[f"{codec}/{context}"] = statistics.median(rates[1:])
    results["peak_rss_mib"] = peak_rss_mib()
    return results


def _hf_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    path = spec["gguf"]
    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path),
        gguf_file=os.path.basename(path),
        dtype=torch.float32,
        attn_implementation="sdpa",
    ).eval()
    load_seconds = time.perf_counter() - start
    results: dict[str, Any] = {"load_seconds": load_seconds}
    with torch.inference_mode():
        for context in spec["contexts"]:
            prompt = torch.tensor([_prompt(context, seed=context)])
            rates = []
            for _ in range(spec["repeats"] + 1):
                out = model(prompt, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                begin = time.perf_counter()
                for _ in range(spec["steps"]):
                    out = model(token, past_key_values=cache, use_cache=True)
                    cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                rates.append(spec["steps"] / (time.perf_counter() - begin))
            results[f"hf/{context}"] = statistics.median(rates[1:])
    results["peak_rss_mib"] = peak_rss_mib()
    return results


def _worker(name: str) -> None:
    spec = json.loads(sys.stdin.read())
    result = _jaxkv_worker(spec) if name == "jaxkv" else _hf_worker(spec)
    print(_PREFIX + json.dumps(result), flush=True)


def _kv_table() -> str:
    from jaxkv.io.gguf import read_gguf_metadata
    from jaxkv.io.gguf_gemma3 import gemma3_config_from_metadata, gemma3_model_path
    from jaxkv.memory import gemma3_memory_table

    config = gemma3_config_from_metadata(read_gguf_metadata(gemma3_model_path()))
    return gemma3_memory_table(config, 8192)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-python", default=None, help="a Python with torch + transformers")
    parser.add_argument("--contexts", default="1024,4096", help="prompt lengths (tokens)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="HF's torch threads")
    parser.add_argument("--codecs", default="none,int8", help="jaxkv KV codecs")
    parser.add_argument("--worker", choices=("jaxkv", "hf"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    from jaxkv.io.gguf_gemma3 import gemma3_model_path

    spec = {
        "gguf": str(gemma3_model_path()),
        "contexts": [int(n) for n in args.contexts.split(",")],
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "codecs": args.codecs.split(","),
    }
    here = os.path.abspath(__file__)
    jaxkv = run_json_worker(
        [sys.executable, here, "--worker", "jaxkv"], spec, 3600, _PREFIX, "jaxkv"
    )
    hf: dict[str, Any] = {}
    if args.hf_python:
        command = [args.hf_python, here, "--worker", "hf"]
        hf = run_json_worker(command, spec, 3600, _PREFIX, "HF transformers")
    for side, result in (("jaxkv", jaxkv), ("HF", hf)):
        if "error" in result:
            print(f"{side} failed: {result['error']}", file=sys.stderr)
    rows = []
    for context in spec["contexts"]:
        peer = hf.get(f"hf/{context}")
        rows.append(
            [f"decode tok/s at {context:,} context", "-" if peer is None else f"{peer:.1f}"]
            + [
                f"{jaxkv[key]:.1f}" + ("" if peer is None else f" ({jaxkv[key] / peer:.2f}x)")
                if (key := f"{codec}/{context}") in jaxkv
                else "-"
                for codec in spec["codecs"]
            ]
        )
    rows.append(
        ["load seconds", f"{hf['load_seconds']:.1f}" if "load_seconds" in hf else "-"]
        + [f"{jaxkv['load_seconds']:.1f}" if "load_seconds" in jaxkv else "-"]
        + [""] * (len(spec["codecs"]) - 1)
    )
    rows.append(
        ["peak RSS MiB", f"{hf['peak_rss_mib']:.0f}" if "peak_rss_mib" in hf else "-"]
        + [f"{jaxkv['peak_rss_mib']:.0f}" if "peak_rss_mib" in jaxkv else "-"]
        + [""] * (len(spec["codecs"]) - 1)
    )
    headers = ["Gemma 3 270M, batch 1", "HF transformers"] + [
        f"jaxkv kv={codec}" for codec in spec["codecs"]
    ]
    print(format_table(headers, rows))
    print("\nKV cache of one sequence (rings in the sliding-window layers vs all layers global):")
    print(_kv_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
