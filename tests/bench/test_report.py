"""Report maths on hand-built runs: percentiles, throughputs and latencies, the table, the JSON
schema and the plot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxkv.bench.report import (
    REPORT_SCHEMA,
    format_table,
    median_run,
    percentile,
    plot,
    report_dict,
    summarize,
    throughput_timeline,
    write_json,
)
from jaxkv.bench.runner import RequestRecord, RunResult
from jaxkv.bench.workload import Workload


@pytest.mark.parametrize("q", [0, 10, 50, 90, 99, 100])
@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0], list(range(17))])
def test_percentile_matches_numpy_linear(values, q):
    assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_percentile_known_values_and_bounds():
    assert percentile([10, 20, 30, 40], 50) == 25
    assert percentile([10, 20, 30, 40], 90) == pytest.approx(37)
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="q"):
        percentile([1.0], 101)


def _record(index, arrival, token_times, prompt_len=10, output_len=None):
    return RequestRecord(
        index=index,
        prompt_len=prompt_len,
        output_len=len(token_times) if output_len is None else output_len,
        num_generated=len(token_times),
        arrival=arrival,
        first_token=token_times[0],
        finished=token_times[-1],
        token_times=list(token_times),
    )


def _run(label="jaxkv", scale=1.0):
    records = [
        _record(0, 0.0, [scale * t for t in (0.5, 0.6, 0.8, 1.0)]),
        _record(1, 0.5, [scale * t for t in (1.0, 1.5, 2.0)], prompt_len=20),
    ]
    stats = {"peak_kv_pages": 7, "prefix_hit_rate": 0.25, "preemptions": 1}
    return RunResult(label, label, records, 2.0 * scale, stats)


def test_summary_of_a_known_run():
    summary = summarize(_run())
    assert summary["completed"] == 2 and summary["failed"] == 0 and summary["short"] == 0
    assert summary["output_tokens"] == 7
    assert summary["request_throughput"] == pytest.approx(1.0)  # 2 requests / 2 s
    assert summary["output_throughput"] == pytest.approx(3.5)
    assert summary["total_token_throughput"] == pytest.approx((7 + 30) / 2)
    # TTFTs 0.5 and 0.5; ITLs 0.1, 0.2, 0.2, 0.5, 0.5; E2E 1.0 and 1.5.
    assert summary["ttft"]["p50"] == pytest.approx(0.5)
    assert summary["itl"]["p50"] == pytest.approx(0.2)
    assert summary["itl"]["p90"] == pytest.approx(np.percentile([0.1, 0.2, 0.2, 0.5, 0.5], 90))
    assert summary["e2e"]["p50"] == pytest.approx(1.25)
    assert summary["tpot"]["mean"] == pytest.approx((0.5 / 3 + 1.0 / 2) / 2)
    assert summary["peak_kv_pages"] == 7 and summary["preemptions"] == 1


def test_failed_and_short_requests_are_counted_apart():
    run = _run()
    run.records.append(RequestRecord(2, 5, 3, error="HTTP 500"))
    run.records[0].output_len = 9
    summary = summarize(run)
    assert summary["failed"] == 1 and summary["completed"] == 2 and summary["short"] == 1


def test_table_has_every_metric_and_the_ratio():
    fast, slow = summarize(_run("jaxkv")), summarize(_run("hf", scale=2.0))
    table = format_table({"jaxkv": fast, "hf": slow}, ("jaxkv", "hf"))
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "jaxkv", "hf", "jaxkv", "/", "hf"]
    for label in (
        "requests/s",
        "output tokens/s",
        "total tokens/s",
        "TTFT p50 (ms)",
        "TTFT p90 (ms)",
        "TTFT p99 (ms)",
        "ITL p50 (ms)",
        "ITL p90 (ms)",
        "ITL p99 (ms)",
        "E2E p50 (s)",
        "E2E p99 (s)",
        "peak KV pages",
        "prefix hit rate",
        "preemptions",
        "wall time (s)",
    ):
        assert any(line.startswith(label) for line in lines), label
    throughput = next(line for line in lines if line.startswith("output tokens/s"))
    assert throughput.split()[-3:] == ["3.5", "1.8", "2.00x"]
    ttft = next(line for line in lines if line.startswith("TTFT p50"))
    assert ttft.split()[-3:] == ["500.0", "1250.0", "0.40x"]  # arrivals stay put


def test_unknown_counters_print_as_dashes():
    run = _run("hf")
    run.stats = {}
    table = format_table({"hf": summarize(run)})
    assert next(line for line in table.splitlines() if line.startswith("preemptions")).endswith("-")


def test_json_report_schema(tmp_path):
    workload = Workload.from_prompts([[1] * 10, [2] * 20], [4, 3], arrivals=[0.0, 0.5])
    report = report_dict([_run("jaxkv"), _run("hf", 2.0)], workload, {"model": "m"})
    path = tmp_path / "report.json"
    write_json(path, report)
    data = json.loads(path.read_text())
    assert data["schema"] == REPORT_SCHEMA
    assert set(data) == {
        "schema",
        "workload",
        "num_requests",
        "prompt_tokens",
        "output_tokens",
        "config",
        "runs",
        "ratios",
    }
    assert data["num_requests"] == 2 and data["prompt_tokens"] == 30
    run = data["runs"][0]
    assert set(run) == {"backend", "label", "wall_seconds", "stats", "info", "summary", "requests"}
    assert set(run["requests"][0]) == {
        "index",
        "prompt_len",
        "output_len",
        "num_generated",
        "arrival",
        "first_token",
        "finished",
        "token_times",
        "num_cached_tokens",
        "error",
    }
    assert run["summary"]["ttft"]["p50"] == pytest.approx(0.5)
    assert data["ratios"]["jaxkv / hf"]["output_throughput"] == pytest.approx(2.0)


def test_throughput_timeline_counts_every_token():
    centres, rates = throughput_timeline(_run(), bins=4)
    width = 0.5
    assert centres == pytest.approx([0.25, 0.75, 1.25, 1.75])
    assert sum(rate * width for rate in rates) == pytest.approx(7)


def test_median_run_picks_the_middle_throughput():
    runs = [_run("a", 1.0), _run("b", 3.0), _run("c", 2.0)]
    assert median_run(runs).label == "c"


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "bench.png"
    plot([_run("jaxkv"), _run("hf", 2.0)], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
