"""``jaxkv bench`` end to end on a tiny model: the table, the JSON report, the PNG, and usage
errors caught before anything loads."""

from __future__ import annotations

import argparse
import json

import pytest

from jaxkv.bench import cli

TINY = [
    "--tiny",
    "--num-requests",
    "6",
    "--prompt-len",
    "8:40",
    "--output-len",
    "4:12",
    "--max-num-seqs",
    "4",
    "--quiet",
]


def test_tiny_run_prints_the_table_and_writes_json_and_png(tmp_path, capsys):
    report, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert cli.main([*TINY, "--json", str(report), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("6 requests, ")
    for label in ("requests/s", "output tokens/s", "TTFT p99 (ms)", "ITL p50 (ms)", "wall time"):
        assert label in out
    data = json.loads(report.read_text())
    assert data["schema"] == "jaxkv.bench.report/1"
    assert data["workload"]["prompt_len"] == [8, 40]
    assert data["config"]["scheduler"]["max_num_seqs"] == 4
    (run,) = data["runs"]
    assert run["backend"] == "jaxkv" and len(run["requests"]) == 6
    for record in run["requests"]:
        assert record["num_generated"] == record["output_len"]
        assert 4 <= record["output_len"] <= 12 and 8 <= record["prompt_len"] <= 40
    assert run["summary"]["completed"] == 6 and run["summary"]["short"] == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "load_model", refuse)


@pytest.mark.parametrize(
    "argv",
    [
        ["--prompt-len", "9:3"],
        ["--prompt-len", "x"],
        ["--output-len", "0:4"],
        ["--request-rate", "0"],
        ["--request-rate", "nan"],
        ["--num-requests", "0"],
        ["--kv-quantization", "int2"],
    ],
)
def test_bad_values_are_usage_errors(argv, no_model, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tiny", "--hf-python", "/bin/sh"], "--tiny"),
        (["--hf-python", "/no/such/python"], "not an executable"),
        (["--url", "localhost:8000"], "http://"),
        (["--plot", "out.jpg"], ".png"),
    ],
)
def test_conflicting_options_fail_before_loading(argv, message, no_model, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_lengths_parse():
    parse = cli._length_range(1)
    assert parse("4:12") == (4, 12) and parse("7") == (7, 7)
    with pytest.raises(argparse.ArgumentTypeError):
        parse("5:")


def test_workload_too_long_for_the_engine(capsys):
    with pytest.raises(ValueError, match="max_model_len"):
        cli.main([*TINY, "--prompt-len", "3000:3000"])


def test_warnings_flag_suspect_runs():
    from jaxkv.bench.report import summarize
    from jaxkv.bench.runner import RequestRecord, RunResult

    records = [
        RequestRecord(0, 4, 3, 2, 0.0, 0.1, 0.2, [0.1, 0.2]),
        RequestRecord(1, 4, 3, error="HTTP 500: boom"),
    ]
    result = RunResult(
        "server", "server", records, 0.2, {"compiled_during_run": 2}, {"token_timing": "chunks"}
    )
    lines = cli.run_warnings(result, summarize(result))
    assert any("1 requests failed" in line and "boom" in line for line in lines)
    assert any("missed their output length" in line for line in lines)
    assert any("2 step shapes were compiled" in line for line in lines)
    assert any("ITL is per chunk" in line for line in lines)


def test_describe_workload():
    from jaxkv.bench.workload import WorkloadSpec, make_workload, sampleable_token_ids

    spec = WorkloadSpec(num_requests=3, prompt_len=(2, 2), output_len=(1, 1), shared_prefix=4)
    text = cli.describe_workload(make_workload(spec, sampleable_token_ids(50)))
    assert text == (
        "3 requests, 18 prompt tokens, 3 output tokens, a 4-token shared prefix, "
        "all arriving at once"
    )
