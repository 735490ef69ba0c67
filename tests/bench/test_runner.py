"""The runners: a tiny in-process engine end to end, a server faked with ``httpx.MockTransport``,
the HF worker protocol with a stand-in interpreter, and the progress bar."""

from __future__ import annotations

import ast
import io
import json
import pathlib
import stat
import sys
import textwrap

import httpx
import pytest

from jaxkv.bench import hf
from jaxkv.bench.runner import (
    HF_PROGRESS_PREFIX,
    ProgressBar,
    measure_prefix_ttft,
    parse_prometheus,
    run_engine,
    run_hf,
    run_server,
    warm_run,
)
from jaxkv.bench.workload import Workload, WorkloadSpec, make_workload, tokenizer_token_ids


@pytest.fixture(scope="module")
def engine():
    from jaxkv.engine import CacheConfig, Engine, Model, SchedulerConfig

    engine = Engine(Model.tiny(), CacheConfig(page_size=16), SchedulerConfig(max_num_seqs=4))
    engine.warmup()
    warm_run(engine)
    return engine


@pytest.fixture(scope="module")
def token_ids(engine):
    return tokenizer_token_ids(engine.model.tokenizer)


def test_engine_run_produces_every_token_of_every_request(engine, token_ids):
    spec = WorkloadSpec(num_requests=6, prompt_len=(8, 40), output_len=(4, 12), seed=5)
    workload = make_workload(spec, token_ids)
    seen = []
    result = run_engine(engine, workload, progress=lambda done, total: seen.append(done))
    assert [r.index for r in result.records] == list(range(6))
    for request, record in zip(workload.requests, result.records, strict=True):
        assert record.error is None
        assert record.num_generated == record.output_len == request.output_len
        assert len(record.token_times) == request.output_len
        assert record.token_times == sorted(record.token_times)
        assert 0 <= record.arrival <= record.first_token <= record.finished <= result.wall_seconds
        assert record.prompt_len == request.prompt_len
    assert seen[0] == 0 and seen[-1] == 6
    assert result.stats["compiled_during_run"] == 0  # warmup compiled every shape
    assert result.stats["preemptions"] == 0
    assert 0 < result.stats["peak_kv_pages"] <= result.stats["num_pages"]
    assert result.stats["prefix_query_tokens"] == workload.num_prompt_tokens


def test_engine_run_honours_arrival_times(engine, token_ids):
    spec = WorkloadSpec(
        num_requests=3, prompt_len=(4, 8), output_len=(2, 3), request_rate=40.0, seed=1
    )
    workload = make_workload(spec, token_ids)
    result = run_engine(engine, workload, cache_salt="arrivals")
    for request, record in zip(workload.requests, result.records, strict=True):
        assert record.arrival == pytest.approx(request.arrival)
        assert record.first_token > request.arrival
    assert result.wall_seconds >= workload.requests[-1].arrival


def test_shared_prefix_hits_the_prefix_cache(engine, token_ids):
    spec = WorkloadSpec(num_requests=4, prompt_len=(4, 8), output_len=(2, 2), shared_prefix=32)
    first = run_engine(engine, make_workload(spec, token_ids), cache_salt="prefix")
    second = run_engine(engine, make_workload(spec, token_ids), cache_salt="prefix")
    assert second.stats["prefix_hit_rate"] > first.stats["prefix_hit_rate"]
    assert all(r.num_cached_tokens >= 32 for r in second.records)


def test_prefix_probe_cold_then_hit(engine, token_ids):
    probe = measure_prefix_ttft(
        engine, token_ids, prefix_len=32, suffix_len=8, output_len=2, repeats=2
    )
    assert len(probe.cold) == len(probe.hit) == 2
    assert all(t > 0 for t in probe.cold + probe.hit)
    assert probe.hit_cached_tokens == [32, 32]


# -- a fake server ----------------------------------------------------------------------------


def _fake_server(tokens_per_chunk: int = 1, status: int = 200):
    """A MockTransport speaking /v1/models, /metrics and streamed /v1/completions; the bodies
    it was sent."""
    bodies = []
    counters = {"query": 0, "hits": 0}

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "smol"}]})
        if request.url.path == "/metrics":
            text = (
                "# HELP jaxkv_prefix_query_tokens_total prompt tokens looked up\n"
                "# TYPE jaxkv_prefix_query_tokens_total counter\n"
                f"jaxkv_prefix_query_tokens_total {counters['query']}\n"
                f"jaxkv_prefix_hit_tokens_total {counters['hits']}\n"
                'jaxkv_num_preemptions_total{model="smol"} 0\n'
                "jaxkv_num_pages_used 12\n"
                "jaxkv_num_pages 100\n"
            )
            return httpx.Response(200, text=text)
        body = json.loads(request.content)
        bodies.append(body)
        if status != 200:
            return httpx.Response(status, json={"error": {"message": "bad prompt"}})
        counters["query"] += len(body["prompt"])
        counters["hits"] += 2
        n = body["max_tokens"]
        pieces = [
            list(range(i, min(i + tokens_per_chunk, n))) for i in range(0, n, tokens_per_chunk)
        ]
        events = [
            {"choices": [{"index": 0, "text": "x" * len(p), "finish_reason": None}]} for p in pieces
        ]
        events.append({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
        events.append(
            {
                "choices": [],
                "usage": {
                    "prompt_tokens": len(body["prompt"]),
                    "completion_tokens": n,
                    "prompt_tokens_details": {"cached_tokens": 2},
                },
            }
        )
        sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handle), bodies


WORKLOAD = Workload.from_prompts([[5, 6, 7], [8, 9]], [4, 3], arrivals=[0.0, 0.01])


def test_server_run_counts_one_chunk_per_token():
    transport, bodies = _fake_server()
    result = run_server("http://bench.test/", WORKLOAD, transport=transport)
    assert result.backend == "server" and result.info["model"] == "smol"
    assert result.info["token_timing"] == "tokens"
    assert [r.num_generated for r in result.records] == [4, 3]
    assert [len(r.token_times) for r in result.records] == [4, 3]
    assert [r.num_cached_tokens for r in result.records] == [2, 2]
    assert all(r.error is None and r.first_token >= r.arrival for r in result.records)
    body = next(b for b in bodies if b["prompt"] == [5, 6, 7])
    assert body["stream"] is True and body["ignore_eos"] is True and body["max_tokens"] == 4
    assert body["model"] == "smol" and body["stream_options"] == {"include_usage": True}
    assert result.stats["prefix_query_tokens"] == 5 and result.stats["prefix_hit_tokens"] == 4
    assert result.stats["preemptions"] == 0 and result.stats["num_pages"] == 100
    assert result.stats["peak_kv_pages"] == 12


def test_server_run_sends_a_cache_salt_only_when_asked():
    transport, bodies = _fake_server()
    run_server("http://bench.test", WORKLOAD, transport=transport, cache_salt="run-7")
    assert {b["cache_salt"] for b in bodies} == {"run-7"}
    bodies.clear()
    run_server("http://bench.test", WORKLOAD, transport=transport)
    assert not any("cache_salt" in b for b in bodies)


def test_server_run_with_chunks_of_several_tokens():
    transport, _ = _fake_server(tokens_per_chunk=2)
    result = run_server("http://bench.test", WORKLOAD, transport=transport)
    assert [r.num_generated for r in result.records] == [4, 3]  # from usage
    assert [len(r.token_times) for r in result.records] == [2, 2]  # chunks
    assert result.info["token_timing"] == "chunks"


def test_server_errors_fail_the_request_not_the_run():
    transport, _ = _fake_server(status=400)
    result = run_server("http://bench.test", WORKLOAD, transport=transport)
    assert all(r.error.startswith("HTTP 400") for r in result.records)


def test_parse_prometheus():
    samples = parse_prometheus('# a comment\nfoo_total 3\nbar{x="1"} 2.5\nbad line here\n')
    assert samples == {"foo_total": 3.0, 'bar{x="1"}': 2.5}


# -- the HF worker ----------------------------------------------------------------------------


def test_hf_worker_needs_nothing_but_the_standard_library_to_import():
    tree = ast.parse(pathlib.Path(hf.__file__).read_text())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            top_level.add((node.module or "").split(".")[0])
    assert top_level <= set(sys.stdlib_module_names) | {"__future__"}
    everywhere = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    } | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name and name.startswith("jaxkv") for name in everywhere)
    assert hf.PROGRESS_PREFIX == HF_PROGRESS_PREFIX


def _fake_python(folder: pathlib.Path, body: str) -> pathlib.Path:
    """An executable standing in for the HF interpreter: it gets ``hf.py`` and its options."""
    path = folder / "fake-python"
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_run_hf_speaks_the_worker_protocol(tmp_path):
    python = _fake_python(
        tmp_path,
        f"""
        import json, sys
        args = dict(zip(sys.argv[2::2], sys.argv[3::2]))
        assert sys.argv[1].endswith("hf.py") and args["--batch-size"] == "8"
        requests = json.load(open(args["--workload"]))["requests"]
        print("some transformers warning")
        print("{HF_PROGRESS_PREFIX} 1 2", file=sys.stderr, flush=True)
        records = [
            dict(index=r["index"], prompt_len=len(r["prompt_token_ids"]),
                 output_len=r["output_len"], num_generated=r["output_len"],
                 arrival=r["arrival"], first_token=1.0, finished=2.0,
                 token_times=[1.0 + i / r["output_len"] for i in range(r["output_len"])],
                 num_cached_tokens=None, error=None)
            for r in requests
        ]
        json.dump(dict(backend="hf", wall_seconds=2.0, records=records, info=dict(threads=2)),
                  open(args["--out"], "w"))
        """,
    )
    seen, log = [], io.StringIO()
    result = run_hf(
        python, tmp_path / "model.gguf", WORKLOAD, progress=lambda d, t: seen.append(d), log=log
    )
    assert result.backend == "hf" and result.wall_seconds == 2.0
    assert [r.num_generated for r in result.records] == [4, 3]
    assert result.info == {"threads": 2}
    assert seen == [0, 1] and "some transformers warning" in log.getvalue()


def test_run_hf_reports_a_failed_worker(tmp_path):
    python = _fake_python(tmp_path, "import sys\nprint('No module named torch')\nsys.exit(3)\n")
    with pytest.raises(RuntimeError, match="status 3(.|\n)*No module named torch"):
        run_hf(python, tmp_path / "model.gguf", WORKLOAD)


# -- progress -----------------------------------------------------------------------------------


def test_progress_bar_rewrites_one_line():
    stream = io.StringIO()
    bar = ProgressBar("jaxkv", stream=stream)
    bar(0, 3)
    bar(3, 3)
    text = stream.getvalue()
    assert text.startswith("\rjaxkv [") and "0/3 requests" in text and "3/3 requests" in text
    assert text.endswith("\n") and text.count("\n") == 1
    quiet = io.StringIO()
    ProgressBar("x", stream=quiet, enabled=False)(1, 1)
    assert quiet.getvalue() == ""
