"""The ``jaxkv bench`` subcommand: draw a seeded workload, run it on the in-process engine (or a
server with ``--url``; beside HF transformers with ``--hf-python``), print the table, and
optionally write the JSON report and a PNG.

``add_parser(subparsers)`` adds the subcommand to the ``jaxkv`` parser; ``run(args)`` runs it
and returns the exit status. ``main(argv)`` is the same as a stand-alone command.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from jaxkv._arguments import MAX_SIZE, integer
from jaxkv.bench.report import format_table, plot, report_dict, summarize, write_json
from jaxkv.bench.runner import (
    ProgressBar,
    RunResult,
    run_engine,
    run_hf,
    run_server,
    warm_run,
)
from jaxkv.bench.workload import Workload, WorkloadSpec, make_workload, tokenizer_token_ids

_MAX_SEED = 2**32 - 1
_CODECS = ("none", "int8", "int4", "fp8")


def _length_range(minimum: int) -> Callable[[str], tuple[int, int]]:
    """An argparse ``type=`` for ``MIN:MAX`` (or one number N for ``N:N``), ``minimum <= MIN
    <= MAX``."""

    def parse(text: str) -> tuple[int, int]:
        low_text, colon, high_text = text.partition(":")
        try:
            low = int(low_text)
            high = int(high_text) if colon else low
        except ValueError:
            low = high = None
        if low is None or high is None or not minimum <= low <= high <= MAX_SIZE:
            raise argparse.ArgumentTypeError(
                f"expected MIN:MAX with {minimum} <= MIN <= MAX, got {text!r:.40}"
            )
        return low, high

    return parse


def _rate(text: str) -> float:
    """An argparse ``type=`` for requests/s: a finite number > 0, or ``inf``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'inf', got {text!r:.40}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to ``subparsers`` (what ``add_subparsers`` returned)."""
    bench = subparsers.add_parser(
        "bench",
        help="serving benchmark: a seeded workload through the engine, a server or HF",
        description="Run a reproducible serving workload and print throughput and latency.",
    )
    workload = bench.add_argument_group("workload")
    workload.add_argument("--num-requests", type=integer(1), default=64)
    workload.add_argument(
        "--prompt-len",
        type=_length_range(0),
        default=(32, 1024),
        metavar="MIN:MAX",
        help="tokens of each prompt after the shared prefix, uniform (default 32:1024)",
    )
    workload.add_argument(
        "--output-len",
        type=_length_range(1),
        default=(16, 256),
        metavar="MIN:MAX",
        help="tokens each request generates (EOS ignored), uniform (default 16:256)",
    )
    workload.add_argument(
        "--shared-prefix",
        type=integer(0),
        default=0,
        metavar="TOKENS",
        help="one random prefix of this many tokens starts every prompt (default 0)",
    )
    workload.add_argument(
        "--request-rate",
        type=_rate,
        default=math.inf,
        help="mean requests/s of Poisson arrivals (default inf: all at once)",
    )
    workload.add_argument("--seed", type=integer(0, _MAX_SEED), default=0)

    model = bench.add_argument_group("model and engine")
    model.add_argument(
        "--model",
        default=None,
        help="a Llama GGUF file (default: bundled SmolLM2-135M-Instruct); with --url it gives "
        "the vocabulary prompts are drawn from and should be the server's model",
    )
    model.add_argument("--tiny", action="store_true", help="a tiny random model (for smoke tests)")
    model.add_argument("--max-num-seqs", type=integer(1), default=None)
    model.add_argument("--max-num-batched-tokens", type=integer(16), default=None)
    model.add_argument("--page-size", type=integer(1), default=None)
    model.add_argument("--num-pages", type=integer(1), default=None)
    model.add_argument("--kv-quantization", choices=_CODECS, default="none")
    model.add_argument("--no-prefix-caching", action="store_true")

    where = bench.add_argument_group("backends and output")
    where.add_argument(
        "--url", default=None, help="run against a server (e.g. http://127.0.0.1:8000)"
    )
    where.add_argument(
        "--hf-python",
        default=None,
        metavar="PATH",
        help="also run the workload through HF transformers in this interpreter (one with "
        "torch, transformers, accelerate and gguf)",
    )
    where.add_argument("--json", default=None, metavar="FILE", help="write the full report")
    where.add_argument("--plot", default=None, metavar="FILE.png", help="write a PNG")
    where.add_argument("--quiet", action="store_true", help="no progress on stderr")
    where.add_argument("--debug", action="store_true", help="on an error, print the traceback")
    return bench


def usage_error(args: argparse.Namespace) -> str | None:
    """A usage error between arguments, or ``None`` (checked before anything is loaded)."""
    if args.hf_python is not None:
        if args.tiny:
            return "argument --hf-python: HF needs a GGUF checkpoint, not --tiny"
        if not (os.path.isfile(args.hf_python) and os.access(args.hf_python, os.X_OK)):
            return f"argument --hf-python: {args.hf_python!r} is not an executable file"
    if args.url is not None and not args.url.startswith(("http://", "https://")):
        return f"argument --url: expected http://HOST:PORT, got {args.url!r:.60}"
    if args.url is not None and args.tiny:
        return "argument --url: --tiny only applies to the in-process engine"
    if args.plot is not None and not args.plot.lower().endswith(".png"):
        return f"argument --plot: expected a .png file name, got {args.plot!r:.60}"
    return None


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
    return WorkloadSpec(
        num_requests=args.num_requests,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        shared_prefix=args.shared_prefix,
        request_rate=args.request_rate,
        seed=args.seed,
    )


def engine_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """The ``CacheConfig`` and ``SchedulerConfig`` the options ask for (unset: defaults)."""
    from jaxkv.engine import CacheConfig, SchedulerConfig

    cache: dict[str, Any] = {
        "kind": "paged",
        "kv_quantization": args.kv_quantization,
        "enable_prefix_caching": not args.no_prefix_caching,
    }
    if args.page_size is not None:
        cache["page_size"] = args.page_size
    if args.num_pages is not None:
        cache["num_pages"] = args.num_pages
    scheduler: dict[str, Any] = {}
    if args.max_num_seqs is not None:
        scheduler["max_num_seqs"] = args.max_num_seqs
    if args.max_num_batched_tokens is not None:
        scheduler["max_num_batched_tokens"] = args.max_num_batched_tokens
    return CacheConfig(**cache), SchedulerConfig(**scheduler)


def load_model(args: argparse.Namespace) -> Any:
    from jaxkv.engine import Model

    return Model.tiny() if args.tiny else Model.load(args.model)


def gguf_path(args: argparse.Namespace) -> str:
    from jaxkv.io.gguf import default_model_path

    return str(default_model_path() if args.model is None else args.model)


def build_engine(model: Any, args: argparse.Namespace) -> Any:
    """An engine for ``model`` with the configs the options ask for (not yet warmed up)."""
    from jaxkv.engine import Engine

    cache_config, scheduler_config = engine_configs(args)
    return Engine(model, cache_config, scheduler_config)


def warm_up(engine: Any, quiet: bool) -> float:
    """Compile every step shape of ``engine`` and run a few untimed requests (``warm_run``);
    progress on stderr unless ``quiet``; the seconds it took."""
    started = time.perf_counter()
    engine.warmup(progress=None if quiet else _warmup_progress)
    warm_run(engine)
    seconds = time.perf_counter() - started
    if not quiet:
        _warmup_progress(f"compiled every step shape in {seconds:.1f} s")
        sys.stderr.write("\n")
    return seconds


def _warmup_progress(message: str) -> None:
    """``Engine.warmup``'s progress, rewritten in place on stderr."""
    sys.stderr.write(f"\r{message:<60.60}")
    sys.stderr.flush()


def check_fits(workload: Workload, max_len: int, where: str) -> None:
    """``ValueError`` unless every request's prompt + output fits ``max_len`` tokens."""
    longest = max(r.prompt_len + r.output_len for r in workload.requests)
    if longest > max_len:
        raise ValueError(
            f"the workload's longest request needs {longest} tokens (prompt + output), but "
            f"{where} holds at most {max_len}; shorten --prompt-len/--output-len/--shared-prefix"
        )


def run(args: argparse.Namespace) -> int:
    """Run ``jaxkv bench`` with parsed ``args``; the exit status (2: a usage error)."""
    problem = usage_error(args)
    if problem is not None:
        print(f"jaxkv bench: error: {problem}", file=sys.stderr)
        return 2
    quiet = args.quiet
    spec = workload_spec(args)
    results: list[RunResult] = []
    config: dict[str, Any] = {}
    if args.url is not None:
        from jaxkv.io.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_gguf(gguf_path(args))
        workload = make_workload(spec, tokenizer_token_ids(tokenizer))
        config["url"] = args.url
        bar = ProgressBar("server", enabled=not quiet)
        results.append(run_server(args.url, workload, progress=bar))
        bar.close()
    else:
        model = load_model(args)
        workload = make_workload(spec, tokenizer_token_ids(model.tokenizer))
        engine = build_engine(model, args)
        check_fits(workload, engine.max_model_len, "the engine's max_model_len")
        config["warmup_seconds"] = warm_up(engine, quiet)
        config["model"] = model.path
        config["cache"] = dataclasses.asdict(engine.cache_config)
        config["scheduler"] = dataclasses.asdict(engine.scheduler_config)
        bar = ProgressBar("jaxkv", enabled=not quiet)
        results.append(run_engine(engine, workload, progress=bar))
        bar.close()
        del engine  # free the KV pool before HF runs
    if args.hf_python is not None:
        bar = ProgressBar("hf   ", enabled=not quiet)
        results.append(run_hf(args.hf_python, gguf_path(args), workload, progress=bar))
        bar.close()

    summaries = {result.label: summarize(result) for result in results}
    labels = list(summaries)
    ratio = (labels[0], labels[1]) if len(labels) == 2 else None
    print(describe_workload(workload))
    print(format_table(summaries, ratio))
    for result, summary in zip(results, summaries.values(), strict=True):
        for line in run_warnings(result, summary):
            print(f"warning: {line}", file=sys.stderr)
    if args.json is not None:
        config["spec"] = spec.to_dict()
        write_json(args.json, report_dict(results, workload, config))
        print(f"wrote {args.json}")
    if args.plot is not None:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


def describe_workload(workload: Workload) -> str:
    """One line: requests, token counts, shared prefix, arrivals."""
    spec = workload.spec
    parts = [
        f"{len(workload)} requests",
        f"{workload.num_prompt_tokens} prompt tokens",
        f"{workload.num_output_tokens} output tokens",
    ]
    if spec is not None and spec.shared_prefix:
        parts.append(f"a {spec.shared_prefix}-token shared prefix")
    if spec is not None:
        rate = spec.request_rate
        parts.append("all arriving at once" if math.isinf(rate) else f"Poisson {rate:g} req/s")
    return ", ".join(parts)


def run_warnings(result: RunResult, summary: dict[str, Any]) -> list[str]:
    """What makes a run's numbers suspect."""
    lines = []
    if summary["failed"]:
        errors = {r.error for r in result.records if r.error is not None}
        lines.append(f"{result.label}: {summary['failed']} requests failed: {sorted(errors)[:3]}")
    if summary["short"]:
        lines.append(f"{result.label}: {summary['short']} requests missed their output length")
    if result.stats.get("compiled_during_run"):
        lines.append(
            f"{result.label}: {result.stats['compiled_during_run']} step shapes were compiled "
            "during the timed run (warmup missed them)"
        )
    if result.info.get("token_timing") == "chunks":
        lines.append(f"{result.label}: SSE chunks carried several tokens; ITL is per chunk")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``jaxkv bench`` on its own: parse ``argv`` (after ``bench``) and run."""
    parser = argparse.ArgumentParser(prog="jaxkv")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return run(args)
