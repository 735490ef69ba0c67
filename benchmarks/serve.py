"""Serving targets of the engine, measured in one run on the bundled SmolLM2-135M-Instruct:

1. a mixed 64-request workload (prompts 32-1024 tokens, outputs 16-256, all arriving at once,
   greedy, EOS ignored): jaxkv engine output tokens/s against HF transformers ``generate`` in
   static batches of 8 (float32, 2 torch threads; needs ``--hf-python``, else that column is
   skipped). Median run of ``--runs`` by output tokens/s (each run on its own cache salt, so no
   run reuses another's prefix cache);
2. a shared 1,024-token prefix: the TTFT of a request that finds the prefix in the prefix cache
   against a cold one, each alone on the engine (cold first, then the hit, with a new prefix
   every repetition); median of ``--prefix-repeats`` repetitions and their ratio;
3. with ``--url`` (a running ``jaxkv serve`` of the same model): one request alone (128-token
   prompt, 128 output tokens), inter-token latency through the server against in-process.

Compilation is excluded (``Engine.warmup``, then a few untimed requests: ``warm_run``).
``--quick`` shrinks every workload for a smoke run; ``--tiny`` uses a tiny random model instead
(the machinery, not the model).

Run: ``.venv/bin/python benchmarks/serve.py [--hf-python PATH] [--url URL] [--runs N]
[--targets 1,2,3] [--quick] [--json FILE] [--plot FILE.png]``
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
from typing import Any

from jaxkv.bench import (
    ProgressBar,
    RunResult,
    WorkloadSpec,
    format_table,
    make_workload,
    measure_prefix_ttft,
    median_run,
    plot,
    report_dict,
    run_engine,
    run_hf,
    run_server,
    summarize,
    tokenizer_token_ids,
    warm_run,
    write_json,
)
from jaxkv.bench.report import plain_table
from jaxkv.bench.workload import Workload

FULL = {
    "mixed": WorkloadSpec(num_requests=64, prompt_len=(32, 1024), output_len=(16, 256)),
    "prefix_len": 1024,
    "prefix_suffix": 32,
    "single_prompt": 128,
    "single_output": 128,
}
QUICK = {
    "mixed": WorkloadSpec(num_requests=8, prompt_len=(16, 128), output_len=(8, 32)),
    "prefix_len": 256,
    "prefix_suffix": 16,
    "single_prompt": 32,
    "single_output": 16,
}


def mixed_workload(
    engine: Any, workload: Workload, args: argparse.Namespace, gguf: str | None
) -> dict[str, Any]:
    runs = []
    for number in range(args.runs):
        bar = ProgressBar(f"(1) jaxkv run {number + 1}/{args.runs}", enabled=not args.quiet)
        runs.append(run_engine(engine, workload, progress=bar, cache_salt=f"run-{number}"))
    jaxkv = median_run(runs)
    results: list[RunResult] = [jaxkv]
    hf = None
    if args.hf_python is not None and gguf is not None:
        bar = ProgressBar("(1) hf", enabled=not args.quiet)
        hf = run_hf(args.hf_python, gguf, workload, progress=bar)
        results.append(hf)
    summaries = {r.label: summarize(r) for r in results}
    ratio = ("jaxkv", "hf") if hf is not None else None
    spec = workload.spec
    print(
        f"\n(1) mixed workload: {len(workload)} requests, prompts {spec.prompt_len[0]}-"
        f"{spec.prompt_len[1]}, outputs {spec.output_len[0]}-{spec.output_len[1]} tokens, all "
        f"at once; jaxkv: median of {args.runs} run(s) by output tokens/s"
        + ("" if hf is None else "; HF: 1 run, static batches of 8")
    )
    print(format_table(summaries, ratio))
    if hf is None:
        reason = "--tiny has no GGUF for HF" if args.tiny else "no --hf-python"
        print(f"HF column skipped ({reason})")
    else:
        speedup = summaries["jaxkv"]["output_throughput"] / summaries["hf"]["output_throughput"]
        print(f"jaxkv output tokens/s = {speedup:.2f}x HF static batching of 8")
    if args.plot is not None:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return {"report": report_dict(results, workload), "all_jaxkv_runs": [r.to_dict() for r in runs]}


def prefix_hit(engine: Any, token_ids: Any, sizes: dict, args: argparse.Namespace) -> dict:
    probe = measure_prefix_ttft(
        engine,
        token_ids,
        prefix_len=sizes["prefix_len"],
        suffix_len=sizes["prefix_suffix"],
        repeats=args.prefix_repeats,
        seed=args.seed + 1000,
    )
    cold, hit = statistics.median(probe.cold), statistics.median(probe.hit)
    print(
        f"\n(2) shared {probe.prefix_len}-token prefix + {probe.suffix_len} own tokens, one "
        f"request alone; median of {args.prefix_repeats} repetitions"
    )
    rows = [
        ["TTFT median (ms)", f"{cold * 1e3:.1f}", f"{hit * 1e3:.1f}", f"{cold / hit:.2f}x"],
        ["TTFT min (ms)", f"{min(probe.cold) * 1e3:.1f}", f"{min(probe.hit) * 1e3:.1f}", ""],
        ["cached prompt tokens", "0", f"{min(probe.hit_cached_tokens)}", ""],
    ]
    print(plain_table(["metric", "cold", "prefix hit", "cold / hit"], rows))
    return {**probe.to_dict(), "cold_median": cold, "hit_median": hit, "ratio": cold / hit}


def single_request(engine: Any, token_ids: Any, sizes: dict, args: argparse.Namespace) -> dict:
    spec = WorkloadSpec(
        num_requests=1,
        prompt_len=(sizes["single_prompt"],) * 2,
        output_len=(sizes["single_output"],) * 2,
        seed=args.seed,
    )
    workload = make_workload(spec, token_ids)
    # A fresh salt per repetition keeps the server's prefix cache (which outlives this script)
    # cold; a server that refuses the `cache_salt` field is asked again without one.
    nonce = secrets.token_hex(4)
    local, remote = [], []
    for number in range(args.single_repeats):
        salt = f"single-{nonce}-{number}"
        local.append(run_engine(engine, workload, cache_salt=salt, label="in-process"))
        result = run_server(args.url, workload, label="server", cache_salt=salt)
        if result.records[0].error is not None:
            print(f"note: the server refused cache_salt ({result.records[0].error[:80]})")
            result = run_server(args.url, workload, label="server")
        remote.append(result)
    results = [median_run(local), median_run(remote)]
    summaries = {r.label: summarize(r) for r in results}
    print(
        f"\n(3) one request alone, {sizes['single_prompt']}-token prompt, "
        f"{sizes['single_output']} output tokens: through {args.url} vs in-process; median of "
        f"{args.single_repeats} run(s)"
    )
    print(format_table(summaries, ("server", "in-process")))
    if remote[0].info.get("token_timing") == "chunks":
        print("note: the server's SSE chunks carried several tokens; its ITL is per chunk")
    return report_dict(results, workload)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-python", default=None, metavar="PATH")
    parser.add_argument("--url", default=None, help="a running `jaxkv serve` for target (3)")
    parser.add_argument("--model", default=None, help="GGUF (default: bundled SmolLM2)")
    parser.add_argument("--tiny", action="store_true", help="tiny random model (smoke run)")
    parser.add_argument("--quick", action="store_true", help="shrink every workload")
    parser.add_argument("--runs", type=int, default=1, help="jaxkv runs of (1) (median)")
    parser.add_argument("--prefix-repeats", type=int, default=5)
    parser.add_argument("--single-repeats", type=int, default=3)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument(
        "--targets", default="1,2,3", help="which targets to run, e.g. 2,3 (default: all)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="FILE")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="plot of (1)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.prefix_repeats = min(args.prefix_repeats, 2)
        args.single_repeats = min(args.single_repeats, 1)
    sizes = QUICK if args.quick else FULL

    from jaxkv.engine import CacheConfig, Engine, Model, SchedulerConfig
    from jaxkv.io.gguf import default_model_path

    model = Model.tiny() if args.tiny else Model.load(args.model)
    gguf = None if args.tiny else str(args.model or default_model_path())
    engine = Engine(model, CacheConfig(), SchedulerConfig(max_num_seqs=args.max_num_seqs))
    seconds = engine.warmup(
        progress=None if args.quiet else lambda m: print(f"\r{m:<60}", end="", file=sys.stderr)
    )
    warm_run(engine)
    print(f"\rcompiled every step shape in {seconds:.1f} s".ljust(61), file=sys.stderr)
    print(
        f"model {model.path}; engine: paged cache, page size {engine.cache_config.page_size}, "
        f"max_num_seqs {args.max_num_seqs}, max_num_batched_tokens "
        f"{engine.scheduler_config.max_num_batched_tokens}, prefix caching on"
    )

    token_ids = tokenizer_token_ids(model.tokenizer)
    spec = sizes["mixed"]
    mixed = make_workload(
        WorkloadSpec(spec.num_requests, spec.prompt_len, spec.output_len, seed=args.seed),
        token_ids,
    )
    targets = {t.strip() for t in args.targets.split(",")}
    report: dict[str, Any] = {"quick": args.quick, "model": model.path}
    if "1" in targets:
        report["mixed"] = mixed_workload(engine, mixed, args, gguf)
    if "2" in targets:
        report["prefix"] = prefix_hit(engine, token_ids, sizes, args)
    if "3" not in targets:
        pass
    elif args.url is not None:
        report["single"] = single_request(engine, token_ids, sizes, args)
    else:
        print("\n(3) skipped (no --url)")
    if args.json is not None:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
