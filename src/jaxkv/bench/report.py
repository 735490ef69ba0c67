"""What a benchmark run amounts to: the metrics of a ``RunResult`` (``summarize``), a table of
one or more backends side by side (``format_table``), the JSON report (``report_dict`` /
``write_json``) and a PNG of throughput over time and the latency distributions (``plot``).

Metrics (latencies in milliseconds in tables, seconds in JSON):

* wall time: from the start of the run (the first arrival) to the last token of any request;
* requests/s, output tokens/s, total tokens/s: completed requests, generated tokens, and prompt
  plus generated tokens of completed requests, over the wall time;
* TTFT: first token - arrival, per request (queueing and prefill included);
* ITL: gaps between consecutive tokens of one request, pooled over all requests;
* TPOT: per request (last - first token) / (tokens - 1), the mean over requests;
* E2E: last token - arrival, per request;
* peak KV pages, prefix hit rate, preemptions: the backend's counters over the run.

Percentiles interpolate linearly between order statistics (NumPy's default ``"linear"``).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from jaxkv.bench.runner import RunResult
from jaxkv.bench.workload import Workload

REPORT_SCHEMA = "jaxkv.bench.report/1"
PERCENTILES = (50, 90, 99)


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (``0 <= q <= 100``) of ``values``, linearly interpolated between
    the two nearest order statistics; ``None`` for no values."""
    ordered = sorted(values)
    if not 0 <= q <= 100:
        raise ValueError(f"percentile: q must lie in [0, 100], got {q}")
    if not ordered:
        return None
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _distribution(values: Sequence[float]) -> dict[str, float | None]:
    summary: dict[str, float | None] = {f"p{q}": percentile(values, q) for q in PERCENTILES}
    summary["mean"] = statistics.fmean(values) if values else None
    summary["max"] = max(values) if values else None
    return summary


def summarize(result: RunResult) -> dict[str, Any]:
    """The metrics of one run (see the module docstring); times in seconds."""
    done = [r for r in result.records if r.error is None and r.finished is not None]
    wall = result.wall_seconds
    output_tokens = sum(r.num_generated for r in done)
    prompt_tokens = sum(r.prompt_len for r in done)

    def rate(count: float) -> float | None:
        return count / wall if wall > 0 else None

    tpots = [r.tpot for r in done if r.tpot is not None]
    return {
        "num_requests": len(result.records),
        "completed": len(done),
        "failed": len(result.records) - len(done),
        "short": sum(1 for r in done if r.num_generated != r.output_len),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "wall_seconds": wall,
        "request_throughput": rate(len(done)),
        "output_throughput": rate(output_tokens),
        "total_token_throughput": rate(output_tokens + prompt_tokens),
        "ttft": _distribution([r.ttft for r in done if r.ttft is not None]),
        "itl": _distribution([gap for r in done for gap in r.itls]),
        "tpot": _distribution(tpots),
        "e2e": _distribution([r.e2e for r in done if r.e2e is not None]),
        "peak_kv_pages": result.stats.get("peak_kv_pages"),
        "prefix_hit_rate": result.stats.get("prefix_hit_rate"),
        "preemptions": result.stats.get("preemptions"),
    }


def median_run(results: Sequence[RunResult]) -> RunResult:
    """The run with the median output tokens/s (the lower middle one of an even count)."""
    if not results:
        raise ValueError("median_run: no runs")
    ranked = sorted(results, key=lambda r: summarize(r)["output_throughput"] or 0.0)
    return ranked[(len(ranked) - 1) // 2]


# (row label, how to read it from a summary, format, unit scale)
_ROWS: tuple[tuple[str, tuple[str, ...], str, float], ...] = (
    ("requests/s", ("request_throughput",), "{:.2f}", 1.0),
    ("output tokens/s", ("output_throughput",), "{:.1f}", 1.0),
    ("total tokens/s", ("total_token_throughput",), "{:.1f}", 1.0),
    ("TTFT p50 (ms)", ("ttft", "p50"), "{:.1f}", 1e3),
    ("TTFT p90 (ms)", ("ttft", "p90"), "{:.1f}", 1e3),
    ("TTFT p99 (ms)", ("ttft", "p99"), "{:.1f}", 1e3),
    ("ITL p50 (ms)", ("itl", "p50"), "{:.1f}", 1e3),
    ("ITL p90 (ms)", ("itl", "p90"), "{:.1f}", 1e3),
    ("ITL p99 (ms)", ("itl", "p99"), "{:.1f}", 1e3),
    ("TPOT mean (ms)", ("tpot", "mean"), "{:.1f}", 1e3),
    ("E2E p50 (s)", ("e2e", "p50"), "{:.2f}", 1.0),
    ("E2E p99 (s)", ("e2e", "p99"), "{:.2f}", 1.0),
    ("peak KV pages", ("peak_kv_pages",), "{:d}", 1.0),
    ("prefix hit rate", ("prefix_hit_rate",), "{:.1%}", 1.0),
    ("preemptions", ("preemptions",), "{:d}", 1.0),
    ("completed", ("completed",), "{:d}", 1.0),
    ("wall time (s)", ("wall_seconds",), "{:.2f}", 1.0),
)


def _lookup(summary: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = summary
    for key in path:
        value = None if value is None else value.get(key)
    return value


def _cell(value: Any, fmt: str, scale: float) -> str:
    if value is None:
        return "-"
    if fmt == "{:d}":
        return fmt.format(int(value))
    return fmt.format(value * scale)


def format_table(summaries: dict[str, dict[str, Any]], ratio: tuple[str, str] | None = None) -> str:
    """A plain-text table: one row per metric, one column per run (label -> ``summarize``
    output), and with ``ratio=(a, b)`` a last column ``a / b`` of the numeric rows."""
    headers = ["metric", *summaries]
    if ratio is not None:
        headers.append(f"{ratio[0]} / {ratio[1]}")
    rows = []
    for label, path, fmt, scale in _ROWS:
        values = [_lookup(s, path) for s in summaries.values()]
        row = [label, *(_cell(v, fmt, scale) for v in values)]
        if ratio is not None:
            a, b = (_lookup(summaries[name], path) for name in ratio)
            numeric = fmt != "{:d}" or path == ("peak_kv_pages",)
            row.append(f"{a / b:.2f}x" if numeric and a is not None and b else "-")
        rows.append(row)
    return plain_table(headers, rows)


def plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """First column left-aligned, the others right-aligned, a rule under the headers."""
    cells = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        rest = [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        return "  ".join([row[0].ljust(widths[0]), *rest]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def report_dict(
    results: Sequence[RunResult], workload: Workload, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON report::

    {"schema": "jaxkv.bench.report/1",
     "workload": WorkloadSpec.to_dict() or null, "num_requests", "prompt_tokens",
     "output_tokens", "config": {...},
     "runs": [{"backend", "label", "wall_seconds", "stats", "info",
               "summary": summarize(run), "requests": [RequestRecord.to_dict(), ...]}],
     "ratios": {"<a> / <b>": {"output_throughput": .., "ttft_p50": .., ...}}}
    """
    runs = []
    for result in results:
        runs.append({**result.to_dict(), "summary": summarize(result)})
    ratios = {}
    if len(runs) >= 2:
        first, second = runs[0]["summary"], runs[1]["summary"]
        keys = {
            "request_throughput": ("request_throughput",),
            "output_throughput": ("output_throughput",),
            "total_token_throughput": ("total_token_throughput",),
            "ttft_p50": ("ttft", "p50"),
            "itl_p50": ("itl", "p50"),
            "e2e_p50": ("e2e", "p50"),
        }
        pairs = {key: (_lookup(first, p), _lookup(second, p)) for key, p in keys.items()}
        ratios[f"{runs[0]['label']} / {runs[1]['label']}"] = {
            key: (a / b if a is not None and b else None) for key, (a, b) in pairs.items()
        }
    return {
        "schema": REPORT_SCHEMA,
        "workload": None if workload.spec is None else workload.spec.to_dict(),
        "num_requests": len(workload),
        "prompt_tokens": workload.num_prompt_tokens,
        "output_tokens": workload.num_output_tokens,
        "config": config or {},
        "runs": runs,
        "ratios": ratios,
    }


def write_json(path: str | os.PathLike[str], report: dict[str, Any]) -> None:
    """Write ``report`` (a ``report_dict``) as indented JSON."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1, allow_nan=False, default=_jsonable)
        handle.write("\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # NumPy scalars
        return value.item()
    raise TypeError(f"write_json: cannot write {type(value).__name__} {value!r:.80}")


def throughput_timeline(result: RunResult, bins: int = 40) -> tuple[list[float], list[float]]:
    """Output tokens/s over the run: ``(bin centres in s, tokens/s per bin)``, ``bins`` equal
    bins from 0 to the wall time."""
    times = [t for r in result.records if r.error is None for t in r.token_times]
    end = max(result.wall_seconds, max(times, default=0.0))
    if end <= 0 or not times:
        return [], []
    width = end / bins
    counts = [0] * bins
    for t in times:
        counts[min(int(t / width), bins - 1)] += 1
    return [width * (i + 0.5) for i in range(bins)], [c / width for c in counts]


def plot(results: Sequence[RunResult], path: str | os.PathLike[str]) -> None:
    """A PNG of three panels, every run overlaid: output tokens/s over time, and the empirical
    distributions (CDFs) of TTFT and of inter-token latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (timeline, ttft, itl) = plt.subplots(1, 3, figsize=(15, 4.2))
    for result in results:
        centres, rates = throughput_timeline(result)
        timeline.plot(centres, rates, label=result.label)
        done = [r for r in result.records if r.error is None]
        _cdf(ttft, [r.ttft * 1e3 for r in done if r.ttft is not None], result.label)
        _cdf(itl, [gap * 1e3 for r in done for gap in r.itls], result.label)
    timeline.set(title="throughput over time", xlabel="time (s)", ylabel="output tokens/s")
    ttft.set(title="time to first token", xlabel="TTFT (ms)", ylabel="fraction of requests")
    itl.set(title="inter-token latency", xlabel="ITL (ms)", ylabel="fraction of tokens")
    for axis in (timeline, ttft, itl):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _cdf(axis: Any, values: list[float], label: str) -> None:
    ordered = sorted(values)
    if ordered:
        fractions = [(i + 1) / len(ordered) for i in range(len(ordered))]
        axis.step(ordered, fractions, where="post", label=label)
