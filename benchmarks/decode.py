"""Prefill and decode speed of jaxkv against HF transformers on the same GGUF checkpoint.

One run of this script measures, on this machine and with the same float32 weights
(SmolLM2-135M-Instruct by default):

- prefill time of a 128-token prompt (the first generated token included) and decode tokens/s
  for 128 new tokens, at batch 1 and batch 8, greedy, EOS ignored so every row produces all
  its tokens, for jaxkv's contiguous and paged caches and HF transformers' ``DynamicCache``
  and ``StaticCache`` (torch limited to 2 threads); median of ``--repeats`` runs after one
  untimed warm-up run (8 new tokens), with jaxkv's ahead-of-time compilation excluded;
- peak resident memory of each implementation: each runs in its own process (this script
  started again with ``--worker NAME``, answering with one JSON line), so ``ru_maxrss`` is its
  own; it includes loading the checkpoint;
- the machine's memory bandwidth over a 1 GiB float32 array (the fastest of NumPy sums on one
  thread and on one thread per core and a BLAS matrix-vector product, median of several runs),
  and each decode step's time against the bandwidth bound
  ``(weight bytes read per step + live KV bytes per step) / bandwidth``;
  ``% of bound = bound time / measured step time``.

The prompts are windows of the token ids of ``tests/data/perplexity_text.txt`` stored in
``tests/data/reference.json`` (row ``i`` starts at token ``64 * i``), so every implementation
gets exactly the same ids without tokenizing. The "same as HF" column counts the leading
generated tokens that equal HF ``DynamicCache``'s (the worst row).

HF workers need torch and transformers, which jaxkv does not: they run under ``--hf-python``
(default: this interpreter when it can import both). Install them into the project
environment with ``.venv/bin/pip install -e '.[reference]'``, or point ``--hf-python`` at
another environment that has them.

Run: ``.venv/bin/python benchmarks/decode.py [--hf-python PATH] [--repeats 5] [--quick]
[--png decode.png]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import time
import traceback
from typing import Any

from _common import (
    current_rss_mib,
    format_table,
    median_seconds,
    peak_rss_mib,
    run_json_worker,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
REFERENCE_JSON = ROOT / "tests" / "data" / "reference.json"
PROMPT_TOKENS = 128
NEW_TOKENS = 128
QUICK_NEW_TOKENS = 32
# The untimed warm-up run generates only this many tokens: enough to run the prefill and decode
# paths once (jaxkv compiles the same shapes: its cache capacity rounds up to 256 either way).
WARMUP_TOKENS = 8
BATCHES = (1, 8)
PROMPT_STRIDE = 64
TORCH_THREADS = 2
BYTES_PER_VALUE = 4  # float32 weights, activations and KV
RESULT_PREFIX = "DECODE-BENCH-RESULT "
INSTALL_HINT = (
    "torch/transformers not importable; install them with "
    "`.venv/bin/pip install -e '.[reference]'` or pass --hf-python PATH"
)

IMPLEMENTATIONS = {
    # worker name: (table label, library)
    "jaxkv-contiguous": ("jaxkv contiguous", "jaxkv"),
    "jaxkv-paged": ("jaxkv paged", "jaxkv"),
    "hf-dynamic": ("HF DynamicCache", "hf"),
    "hf-static": ("HF StaticCache", "hf"),
}
TOKEN_REFERENCE = "hf-dynamic"
# Decode speed targets: jaxkv tokens/s over HF's best at each batch size.
DECODE_TARGETS = {1: 2.0, 8: 2.5}
MATMUL_REPEATS = 20


# --------------------------------------------------------------------------------------------
# Workers: one implementation per process; read a JSON spec on stdin, print one JSON line.
# --------------------------------------------------------------------------------------------


def _error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text.splitlines()[0][:200]


def _check_tokens(rows: list[list[int]], new_tokens: int) -> None:
    counts = [len(row) for row in rows]
    if any(count != new_tokens for count in counts):
        raise RuntimeError(f"expected {new_tokens} generated tokens per row, got {counts}")


def _jaxkv_runs(spec: dict[str, Any], cache_kind: str) -> dict[str, Any]:
    import inspect

    import jax

    from jaxkv.engine import Model, generate

    if "ignore_eos" not in inspect.signature(generate).parameters:
        raise RuntimeError("jaxkv generate() has no ignore_eos keyword; cannot force all tokens")
    start = time.perf_counter()
    model = Model.load(spec["gguf"], dtype="float32")
    info = {"load_s": time.perf_counter() - start, "versions": f"jax {jax.__version__}"}
    new_tokens = spec["new_tokens"]

    def one_batch(prompts: list[list[int]]) -> dict[str, Any]:
        runs, compile_s = [], 0.0
        for attempt in range(1 + spec["repeats"]):
            count = WARMUP_TOKENS if attempt == 0 else new_tokens
            result = generate(
                model, prompts, max_new_tokens=count, cache=cache_kind, ignore_eos=True
            )
            rows = [g.token_ids for g in result.generations]
            _check_tokens(rows, count)
            compile_s += result.compile_seconds
            if attempt == 0:  # warm-up
                continue
            runs.append(
                {
                    "prefill_s": result.prefill_seconds,
                    "decode_s": result.decode_seconds,
                    "decode_steps": result.decode_steps,
                    "tokens": rows,
                }
            )
        matmuls_s = _jaxkv_matmuls_seconds(model, len(prompts), MATMUL_REPEATS)
        return {"runs": runs, "compile_s": compile_s, "matmuls_s": matmuls_s}

    return {**info, "batches": _per_batch(spec, one_batch)}


def _jaxkv_matmuls_seconds(model, batch: int, repeats: int) -> float:
    """Median seconds of the weight matmuls of one decode step alone, as jaxkv runs them: every
    layer's fused QKV, output, fused gate/up and down projections, then the LM head, for
    ``batch`` rows of one token (residual adds chain the layers; no norm, RoPE or attention)."""
    import jax
    import jax.numpy as jnp

    from jaxkv.models.llama import linear

    def matmuls(params, x):
        for layer in params["layers"]:
            qkv = linear(x, layer["wqkv"])
            x = x + linear(qkv[:, : layer["wo"].shape[0]], layer["wo"])
            gate, up = jnp.split(linear(x, layer["w_gate_up"]), 2, axis=-1)
            x = x + linear(gate * up, layer["w_down"])
        return x @ params["lm_head"]

    x = jnp.full((batch, model.config.hidden_size), 0.01, jnp.float32)
    step = jax.jit(matmuls).lower(model.params, x).compile()
    return median_seconds(lambda: step(model.params, x).block_until_ready(), repeats)


def _hf_runs(spec: dict[str, Any], cache_kind: str) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["torch_threads"])
    transformers.logging.set_verbosity_error()
    path = pathlib.Path(spec["gguf"])
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    model.eval()
    info = {
        "load_s": time.perf_counter() - start,
        "versions": f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, attention "
        f"{model.config._attn_implementation}",
    }
    eos = model.generation_config.eos_token_id
    pad_token_id = eos[0] if isinstance(eos, list) else eos
    new_tokens = spec["new_tokens"]
    # Every forward call is stamped: the prefill ends where the second call (the first decode
    # step) starts, which is after the first token has been chosen.
    stamps: list[float] = []
    model.register_forward_pre_hook(lambda module, args: stamps.append(time.perf_counter()))
    options: dict[str, Any] = {"cache_implementation": "static"} if cache_kind == "static" else {}

    def one_batch(prompts: list[list[int]]) -> dict[str, Any]:
        input_ids = torch.tensor(prompts, dtype=torch.long)
        runs = []
        for attempt in range(1 + spec["repeats"]):
            count = WARMUP_TOKENS if attempt == 0 else new_tokens
            stamps.clear()
            with torch.inference_mode():
                start = time.perf_counter()
                output = model.generate(
                    input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    do_sample=False,
                    max_new_tokens=count,
                    min_new_tokens=count,
                    pad_token_id=pad_token_id,
                    **options,
                )
                end = time.perf_counter()
            rows = output[:, input_ids.shape[1] :].tolist()
            _check_tokens(rows, count)
            if len(stamps) < 2:
                raise RuntimeError(f"expected >= 2 forward calls, saw {len(stamps)}")
            if attempt == 0:  # warm-up
                continue
            runs.append(
                {
                    "prefill_s": stamps[1] - start,
                    "decode_s": end - stamps[1],
                    "decode_steps": len(stamps) - 1,
                    "tokens": rows,
                }
            )
        matmuls_s = _torch_matmuls_seconds(model, len(prompts), MATMUL_REPEATS)
        return {"runs": runs, "compile_s": 0.0, "matmuls_s": matmuls_s}

    return {**info, "batches": _per_batch(spec, one_batch)}


def _torch_matmuls_seconds(model, batch: int, repeats: int) -> float:
    """Median seconds of the weight matmuls of one decode step alone, as HF runs them (its own
    ``nn.Linear`` modules: q, k, v, o, gate, up, down, then the LM head), for ``batch`` rows of
    one token; the counterpart of ``_jaxkv_matmuls_seconds``."""
    import torch

    def matmuls(x):
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            q = attn.q_proj(x)
            attn.k_proj(x)
            attn.v_proj(x)
            x = x + attn.o_proj(q)
            x = x + mlp.down_proj(mlp.gate_proj(x) * mlp.up_proj(x))
        return model.lm_head(x)

    x = torch.full((batch, model.config.hidden_size), 0.01, dtype=torch.float32)
    with torch.inference_mode():
        return median_seconds(lambda: matmuls(x), repeats)


def _per_batch(spec: dict[str, Any], one_batch) -> dict[str, Any]:
    """Run ``one_batch`` for every batch size; a failure becomes that batch's ``error``."""
    results = {}
    for batch, prompts in spec["prompts"].items():
        try:
            results[batch] = one_batch(prompts)
        except Exception as error:  # reported in the table as n/a
            traceback.print_exc(file=sys.stderr)
            results[batch] = {"error": _error_text(error)}
    return results


def run_worker(name: str) -> None:
    """Worker entry point: spec JSON on stdin, ``RESULT_PREFIX`` + result JSON on stdout."""
    spec = json.loads(sys.stdin.read())
    try:
        if name.startswith("jaxkv-"):
            result = _jaxkv_runs(spec, name.removeprefix("jaxkv-"))
        else:
            result = _hf_runs(spec, name.removeprefix("hf-"))
    except Exception as error:
        traceback.print_exc(file=sys.stderr)
        result = {"error": _error_text(error)}
    result["peak_rss_mib"] = peak_rss_mib()
    result["end_rss_mib"] = current_rss_mib()
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------------------------


def measure_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Read bandwidth in bytes/s over a ``gib`` GiB float32 array, median of ``repeats``, three
    ways: a NumPy sum on one thread, sums of per-core chunks on one thread per core (NumPy
    reductions release the GIL), and a BLAS matrix-vector product (the shape of a decode step's
    weight reads). The driver takes the fastest as the machine's bandwidth."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    columns = 4096
    values = np.ones((int(gib * 2**30) // 4 // columns, columns), np.float32)  # pages touched
    vector = np.ones((columns,), np.float32)
    threads = os.cpu_count() or 1
    chunks = np.array_split(values, threads)
    result = {}
    with ThreadPoolExecutor(threads) as pool:
        for label, run in (
            ("sum 1 thread", lambda: float(values.sum())),
            (f"sum {threads} threads", lambda: sum(pool.map(np.sum, chunks))),
            ("BLAS matvec", lambda: values @ vector),
        ):
            run()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            result[label] = values.nbytes / statistics.median(times)
    return result


def step_bytes(config, batch: int, new_tokens: int) -> tuple[int, int]:
    """``(weight bytes, mean live KV bytes)`` one decode step must read, float32.

    Weights: every layer's projections and norms, the final norm, the LM head (the embedding
    when tied) and ``batch`` embedding rows. KV: the step producing token ``t`` (2..new_tokens)
    attends over ``PROMPT_TOKENS + t - 1`` keys per row, averaged over the steps.
    """
    hidden, heads, kv_heads = config.hidden_size, config.num_heads, config.num_kv_heads
    head_dim, ffn = config.head_dim, config.intermediate_size
    per_layer = (
        2 * hidden
        + hidden * heads * head_dim
        + 2 * hidden * kv_heads * head_dim
        + heads * head_dim * hidden
        + 3 * hidden * ffn
    )
    values = config.num_layers * per_layer + hidden + config.vocab_size * hidden + batch * hidden
    mean_live = PROMPT_TOKENS + statistics.mean(range(1, new_tokens))
    kv_per_token = config.num_layers * 2 * kv_heads * head_dim
    return values * BYTES_PER_VALUE, int(batch * mean_live * kv_per_token * BYTES_PER_VALUE)


def load_prompts() -> dict[str, list[list[int]]]:
    """``{"1": [ids], "8": [ids x 8]}``: 128-token windows of the perplexity text's ids."""
    ids = json.loads(REFERENCE_JSON.read_text(encoding="utf-8"))["perplexity"]["ids"]
    needed = PROMPT_STRIDE * (max(BATCHES) - 1) + PROMPT_TOKENS
    if len(ids) < needed:
        raise ValueError(f"{REFERENCE_JSON} holds {len(ids)} perplexity ids, need {needed}")
    return {
        str(batch): [
            ids[PROMPT_STRIDE * row : PROMPT_STRIDE * row + PROMPT_TOKENS] for row in range(batch)
        ]
        for batch in BATCHES
    }


def resolve_hf_python(requested: str | None) -> tuple[str | None, str]:
    """The interpreter for HF workers, or ``None`` and why not."""
    if requested is not None:
        path = pathlib.Path(requested)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise SystemExit(f"--hf-python: {requested!r} is not an executable file")
        return str(path), ""
    if all(importlib.util.find_spec(name) for name in ("torch", "transformers")):
        return sys.executable, ""
    return None, INSTALL_HINT


def launch_worker(python: str, name: str, spec: dict[str, Any], timeout: float) -> dict:
    """Run one worker process; a crash or a missing result becomes ``{"error": ...}``."""
    command = [python, str(pathlib.Path(__file__).resolve()), "--worker", name]
    return run_json_worker(command, spec, timeout, RESULT_PREFIX, f"{name}: {python}")


def summarise(batch_result: dict[str, Any], batch: int) -> dict[str, Any]:
    """Medians over runs: prefill seconds, decode step seconds, decode tokens/s, spread."""
    runs = batch_result["runs"]
    step_s = [r["decode_s"] / r["decode_steps"] for r in runs]
    tokens_per_s = [batch * (len(r["tokens"][0]) - 1) / r["decode_s"] for r in runs]
    median_step = statistics.median(step_s)
    return {
        "prefill_s": statistics.median(r["prefill_s"] for r in runs),
        "step_s": median_step,
        "tokens_per_s": statistics.median(tokens_per_s),
        "spread": (max(step_s) - min(step_s)) / median_step,
        "steps": runs[0]["decode_steps"],
        "tokens": runs[0]["tokens"],
        "matmuls_s": batch_result.get("matmuls_s"),
    }


def leading_agreement(rows: list[list[int]], reference: list[list[int]]) -> int:
    """Fewest leading tokens any row shares with the reference row."""
    shared = []
    for row, ref in zip(rows, reference, strict=True):
        count = 0
        for a, b in zip(row, ref, strict=False):
            if a != b:
                break
            count += 1
        shared.append(count)
    return min(shared)


def build_table(
    results: dict[str, dict], config, bandwidth: float, new_tokens: int
) -> tuple[list[str], list[list[object]], dict]:
    headers = [
        "implementation",
        "batch",
        "prefill ms",
        "decode tok/s",
        "ms/step",
        "spread",
        "bound ms",
        "% of bound",
        "prefill vs HF",
        "decode vs HF",
        "peak RSS MiB",
        "same as HF",
    ]
    rows: list[list[object]] = []
    summaries: dict = {}
    for batch in BATCHES:
        key = str(batch)
        weights, kv = step_bytes(config, batch, new_tokens)
        bound_s = (weights + kv) / bandwidth
        for name in IMPLEMENTATIONS:
            result = results[name]
            batch_result = result.get("batches", {}).get(key)
            if batch_result is None or "error" in batch_result:
                error = (batch_result or {}).get("error") or result.get("error", "not run")
                summaries[(name, batch)] = {"error": error}
            else:
                summaries[(name, batch)] = summarise(batch_result, batch)
        hf = [
            summaries[(n, batch)]
            for n, (_, lib) in IMPLEMENTATIONS.items()
            if lib == "hf" and "error" not in summaries[(n, batch)]
        ]
        best_prefill = min((s["prefill_s"] for s in hf), default=None)
        best_rate = max((s["tokens_per_s"] for s in hf), default=None)
        reference = summaries[(TOKEN_REFERENCE, batch)]
        for name, (label, _) in IMPLEMENTATIONS.items():
            s = summaries[(name, batch)]
            rss = results[name].get("peak_rss_mib")
            rss_text = f"{rss:.0f}" if rss is not None else "n/a"
            if "error" in s:
                rows.append([label, batch, f"n/a (error: {s['error']})"] + [""] * 8 + [rss_text])
                continue
            same = (
                f"{leading_agreement(s['tokens'], reference['tokens'])}/{new_tokens}"
                if "error" not in reference
                else "n/a"
            )
            rows.append(
                [
                    label,
                    batch,
                    f"{s['prefill_s'] * 1e3:.1f}",
                    f"{s['tokens_per_s']:.1f}",
                    f"{s['step_s'] * 1e3:.2f}",
                    f"{s['spread']:.0%}",
                    f"{bound_s * 1e3:.2f}",
                    f"{bound_s / s['step_s']:.0%}",
                    f"{best_prefill / s['prefill_s']:.2f}x" if best_prefill else "n/a",
                    f"{s['tokens_per_s'] / best_rate:.2f}x" if best_rate else "n/a",
                    rss_text,
                    same,
                ]
            )
    return headers, rows, summaries


def matmul_table(summaries: dict) -> tuple[list[str], list[list[object]]]:
    """Per batch: the weight matmuls of one decode step alone (jaxkv on XLA, HF on torch), next
    to jaxkv's whole step and the step time the decode target asks for."""
    headers = [
        "batch",
        "jaxkv matmuls ms",
        "torch matmuls ms",
        "jaxkv step ms",
        "HF best step ms",
        "target",
        "target step ms",
    ]
    rows: list[list[object]] = []

    def cell(seconds: float | None) -> str:
        return "n/a" if seconds is None else f"{seconds * 1e3:.2f}"

    for batch in BATCHES:
        ours = summaries[("jaxkv-contiguous", batch)]
        hf = [
            summaries[(n, batch)]
            for n, (_, lib) in IMPLEMENTATIONS.items()
            if lib == "hf" and "error" not in summaries[(n, batch)]
        ]
        best = max(hf, key=lambda s: s["tokens_per_s"], default=None)
        torch_matmuls = next((s["matmuls_s"] for s in hf if s.get("matmuls_s")), None)
        ratio = DECODE_TARGETS[batch]
        rows.append(
            [
                batch,
                cell(ours.get("matmuls_s")),
                cell(torch_matmuls),
                cell(ours.get("step_s")),
                cell(best["step_s"] if best else None),
                f"{ratio:g}x HF",
                cell(best["step_s"] / ratio if best else None),
            ]
        )
    return headers, rows


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    """Rows whose third cell is an error message span the remaining columns."""
    normal = [r for r in rows if not str(r[2]).startswith("n/a (error")]
    table = format_table(headers, normal or [[""] * len(headers)]).splitlines()
    widths = [len(cell) for cell in table[1].split("  ")]
    out = table[:2]
    normal_lines = iter(table[2:])
    for row in rows:
        if str(row[2]).startswith("n/a (error"):
            lead = f"{str(row[0]).ljust(widths[0])}  {str(row[1]).rjust(widths[1])}  "
            out.append(lead + str(row[2]))
        else:
            out.append(next(normal_lines))
    print("\n".join(out))


def save_png(path: str, summaries: dict) -> None:
    """Decode tokens/s and prefill ms per implementation and batch size, as grouped bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--png {path}: matplotlib is not installed, no figure written")
        return
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(IMPLEMENTATIONS)
    for index, (name, (label, _)) in enumerate(IMPLEMENTATIONS.items()):
        xs = [b + (index - (len(IMPLEMENTATIONS) - 1) / 2) * width for b in range(len(BATCHES))]
        rates, prefills = [], []
        for batch in BATCHES:
            s = summaries[(name, batch)]
            rates.append(0.0 if "error" in s else s["tokens_per_s"])
            prefills.append(0.0 if "error" in s else s["prefill_s"] * 1e3)
        axes[0].bar(xs, rates, width, label=label)
        axes[1].bar(xs, prefills, width, label=label)
    for axis, title in zip(
        axes,
        (
            "decode tokens/s (higher is better)",
            f"prefill of {PROMPT_TOKENS} tokens, ms (lower is better)",
        ),
        strict=True,
    ):
        axis.set_xticks(range(len(BATCHES)), [f"batch {b}" for b in BATCHES])
        axis.set_title(title)
    axes[0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs per implementation and batch (default 5; --quick: 3)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_NEW_TOKENS} new tokens and 3 runs: a fast smoke run",
    )
    parser.add_argument(
        "--hf-python", default=None, help="interpreter with torch + transformers for the HF workers"
    )
    parser.add_argument(
        "--gguf", default=None, help="GGUF checkpoint (default: jaxkv's bundled SmolLM2)"
    )
    parser.add_argument(
        "--only", default=None, help="comma-separated subset of " + ", ".join(IMPLEMENTATIONS)
    )
    parser.add_argument("--png", default=None, help="also save a bar chart (needs matplotlib)")
    parser.add_argument(
        "--worker-timeout", type=float, default=1800.0, help="seconds before a worker is abandoned"
    )
    parser.add_argument("--worker", choices=tuple(IMPLEMENTATIONS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.worker_timeout <= 0:
        parser.error(f"--worker-timeout must be > 0, got {args.worker_timeout}")
    if args.only is not None:
        unknown = sorted(set(args.only.split(",")) - set(IMPLEMENTATIONS))
        if unknown:
            parser.error(f"--only: unknown {unknown}; choose from {list(IMPLEMENTATIONS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker)
        return
    from jaxkv.io.gguf import config_from_metadata, default_model_path, read_gguf_metadata

    repeats = args.repeats or (3 if args.quick else 5)
    new_tokens = QUICK_NEW_TOKENS if args.quick else NEW_TOKENS
    gguf = pathlib.Path(args.gguf).resolve() if args.gguf else default_model_path()
    config = config_from_metadata(read_gguf_metadata(gguf))
    hf_python, hf_missing = resolve_hf_python(args.hf_python)
    selected = args.only.split(",") if args.only else list(IMPLEMENTATIONS)
    spec = {
        "gguf": str(gguf),
        "prompts": load_prompts(),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "torch_threads": TORCH_THREADS,
    }
    started = time.perf_counter()
    print("measuring memory bandwidth ...", file=sys.stderr)
    bandwidths = measure_bandwidth()
    bandwidth = max(bandwidths.values())

    results: dict[str, dict] = {}
    for name, (_, library) in IMPLEMENTATIONS.items():
        if name not in selected:
            results[name] = {"error": "not selected (--only)"}
        elif library == "hf" and hf_python is None:
            results[name] = {"error": hf_missing}
        else:
            python = hf_python if library == "hf" else sys.executable
            results[name] = launch_worker(python, name, spec, args.worker_timeout)

    headers, rows, summaries = build_table(results, config, bandwidth, new_tokens)
    weights_b, _ = step_bytes(config, 1, new_tokens)
    print(
        f"\nDecode benchmark: {gguf.name}, float32, prompt {PROMPT_TOKENS} tokens, "
        f"{new_tokens} new tokens (greedy, EOS ignored), median of {repeats} runs "
        f"after a short warm-up; {os.cpu_count()} CPUs"
    )
    print(
        "memory bandwidth (1 GiB float32): "
        + ", ".join(f"{label} {bw / 1e9:.1f} GB/s" for label, bw in bandwidths.items())
        + f"; bound uses {bandwidth / 1e9:.1f} GB/s"
    )
    kv_lines = []
    for batch in BATCHES:
        _, kv = step_bytes(config, batch, new_tokens)
        kv_lines.append(f"batch {batch}: {kv / 2**20:.1f} MiB")
    print(
        f"bytes per decode step: weights {weights_b / 2**20:.1f} MiB + mean live KV ("
        + ", ".join(kv_lines)
        + ")"
    )
    print()
    print_table(headers, rows)
    print(
        "\nprefill: prompt forward + first token; decode tok/s: tokens after the first / decode "
        "time, all rows;\nspread: (max - min) / median of the step time over runs; bound ms: "
        "bytes per step / bandwidth;\nvs HF: speed relative to the faster HF cache at that "
        "batch (> 1 = faster); same as HF: leading\ntokens equal to HF DynamicCache's (worst "
        "row); peak RSS includes loading the checkpoint."
    )
    print(
        "\nWeight matmuls alone, one decode step (every layer's projections, then the LM head; "
        f"median of {MATMUL_REPEATS}):"
    )
    print(format_table(*matmul_table(summaries)))
    print(
        "target step ms: the step time that meets the decode target (HF's best step / target); "
        "a matmul\ntime above it means the weight matmuls alone, on that library's kernels, "
        "miss the target."
    )
    for name, (label, _) in IMPLEMENTATIONS.items():
        result = results[name]
        if "load_s" not in result:
            continue
        compile_s = sum(b.get("compile_s", 0.0) for b in result.get("batches", {}).values())
        end_rss = result.get("end_rss_mib")
        print(
            f"  {label}: {result['versions']}; load {result['load_s']:.1f} s"
            + (f", AOT compile {compile_s:.1f} s (excluded)" if compile_s else "")
            + (f", RSS at exit {end_rss:.0f} MiB" if end_rss is not None else "")
        )
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    if args.png:
        save_png(args.png, summaries)


if __name__ == "__main__":
    main()
