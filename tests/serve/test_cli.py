"""``jaxkv serve``'s subcommand: its options and defaults, usage errors, failures before any model
is loaded (bad settings, a busy port), and a real run over the tiny model."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading

import httpx
import pytest
import uvicorn

from jaxkv.engine import Model
from jaxkv.serve import cli


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jaxkv")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["serve", *argv])


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(Model, "load", classmethod(refuse))


def test_defaults(monkeypatch):
    monkeypatch.delenv(cli.API_KEY_ENV, raising=False)
    args = _parse()
    assert (args.host, args.port, args.model, args.api_key) == ("127.0.0.1", 8000, None, None)
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.page_size) == (8, 256, 16)
    assert (args.num_pages, args.kv_quantization, args.max_model_len) == (None, "none", None)
    assert (args.max_waiting, args.dtype) == (1024, "float32")
    assert (args.prefix_cache_dir, args.prefix_cache_dir_max_mb) == (None, 4096)


def test_options():
    args = _parse(
        "--host", "0.0.0.0", "--port", "9000", "--api-key", "k", "--max-num-seqs", "4",
        "--max-num-batched-tokens", "64", "--page-size", "32", "--num-pages", "100",
        "--kv-quantization", "int8", "--max-model-len", "1024", "--max-waiting", "5",
        "--dtype", "bfloat16", "--model", "m.gguf",
    )  # fmt: skip
    assert (args.host, args.port, args.api_key, args.model) == ("0.0.0.0", 9000, "k", "m.gguf")
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.page_size) == (4, 64, 32)
    assert (args.num_pages, args.kv_quantization, args.max_model_len) == (100, "int8", 1024)
    assert (args.max_waiting, args.dtype) == (5, "bfloat16")


@pytest.mark.parametrize(
    "argv",
    [
        ("--port", "70000"),
        ("--port", "http"),
        ("--max-num-seqs", "0"),
        ("--page-size", "-1"),
        ("--max-num-batched-tokens", "8"),
        ("--dtype", "float64"),
    ],
)
def test_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parse(*argv)
    assert exit_.value.code == 2
    message = capsys.readouterr().err.splitlines()[-1]
    assert message.startswith("jaxkv serve: error: argument --")
    assert "expected" in message or "invalid choice" in message


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (("--kv-quantization", "int3"), "kv_quantization"),
        (("--max-num-seqs", "64", "--max-num-batched-tokens", "32"), "max_num_batched_tokens"),
        (("--speculative", "draft"), "--draft-model"),
        (("--draft-model", "d.gguf"), "--speculative draft"),
        (("--speculative", "ngram", "--num-draft", "8", "--max-num-seqs", "32"), "--num-draft"),
    ],
)
def test_bad_settings_fail_before_loading(no_loading, argv, words):
    with pytest.raises(ValueError, match=words):
        cli.run(_parse(*argv))


def test_a_busy_port_fails_before_loading(no_loading):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            cli.run(_parse("--port", str(port)))


def test_importing_the_subcommand_loads_no_server_package():
    """``jaxkv`` imports the subcommand at start; the server's packages load only in ``run``."""
    server = "{'fastapi', 'uvicorn', 'prometheus_client', 'pydantic'}"
    code = f"import sys, jaxkv.serve.cli; print(sorted({server} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_run_serves_the_api(kit, monkeypatch):
    argv = (
        "--port", "0", "--api-key", "secret", "--max-num-seqs", "2",
        "--max-num-batched-tokens", "32", "--max-model-len", "128",
    )  # fmt: skip

    def work(base):
        assert httpx.get(f"{base}/health").status_code == 200
        headers = {"Authorization": "Bearer secret"}
        models = httpx.get(f"{base}/v1/models", headers=headers).json()
        assert models["data"][0]["id"] == "tiny-random"
        assert models["data"][0]["max_model_len"] == 128
        body = {"prompt": "hi", "max_tokens": 3, "temperature": 0}
        result = httpx.post(f"{base}/v1/completions", json=body, headers=headers).json()
        assert result["usage"]["completion_tokens"] >= 1

    _serve_once(kit, monkeypatch, argv, work)


def _serve_once(kit, monkeypatch, argv, work):
    """Run ``jaxkv serve argv`` in a thread, call ``work(base_url)``, stop it; its result."""
    monkeypatch.setattr(
        Model, "load", classmethod(lambda cls, path=None, dtype="float32": kit.model)
    )
    servers: list[uvicorn.Server] = []

    class Recorded(uvicorn.Server):
        def __init__(self, config):
            super().__init__(config)
            servers.append(self)

    monkeypatch.setattr(uvicorn, "Server", Recorded)
    status = []
    thread = threading.Thread(target=lambda: status.append(cli.run(_parse(*argv))), daemon=True)
    thread.start()
    assert kit.wait_until(lambda: servers and servers[0].started, timeout=60)
    server = servers[0]
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        result = work(f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(30)
    assert status == [0]
    return result


def test_a_restarted_server_serves_prefixes_from_its_prefix_cache_dir(kit, monkeypatch, tmp_path):
    directory = tmp_path / "prefixes"
    argv = (
        "--port", "0", "--max-num-seqs", "2", "--max-num-batched-tokens", "32",
        "--max-model-len", "128", "--prefix-cache-dir", str(directory),
        "--prefix-cache-dir-max-mb", "16",
    )  # fmt: skip
    prompt = "The quick brown fox jumps over the lazy dog. " * 4  # > 2 pages of 16 tokens

    def complete(base: str) -> tuple[dict, str]:
        body = {"prompt": prompt, "max_tokens": 3, "temperature": 0}
        result = httpx.post(f"{base}/v1/completions", json=body).json()
        return result, httpx.get(f"{base}/metrics").text

    cold, metrics = _serve_once(kit, monkeypatch, argv, complete)
    assert kit.metric(metrics, "jaxkv_prefix_cache_disk_hits_total") == 0
    files = [name for name in os.listdir(directory) if name.endswith(".jkv")]
    assert len(files) == 1  # the prompt's chain of pages, written when the server stopped
    pages = (directory / files[0].replace(".jkv", ".pages")).read_text().split()
    assert len(pages) >= 2
    warm, metrics = _serve_once(kit, monkeypatch, argv, complete)
    assert kit.metric(metrics, "jaxkv_prefix_cache_disk_hits_total") >= 32
    assert kit.metric(metrics, "jaxkv_prefix_cache_dir_files") == len(files)
    assert warm["choices"][0]["text"] == cold["choices"][0]["text"]


def test_a_speculative_server_answers_what_a_plain_one_does(kit, monkeypatch):
    """``--speculative ngram``: the same greedy completion, and verification steps counted on
    ``/metrics``."""
    body = {"prompt": "one two three one two three one two", "max_tokens": 16, "temperature": 0}
    argv = ("--port", "0", "--max-num-seqs", "2", "--max-num-batched-tokens", "32")

    def complete(base):
        text = httpx.post(f"{base}/v1/completions", json=body).json()["choices"][0]["text"]
        return text, httpx.get(f"{base}/metrics").text

    plain, _ = _serve_once(kit, monkeypatch, argv, complete)
    fast, metrics = _serve_once(
        kit, monkeypatch, (*argv, "--speculative", "ngram", "--num-draft", "3"), complete
    )
    assert fast == plain
    steps = [line for line in metrics.splitlines() if line.startswith("jaxkv_spec_verify_steps")]
    assert steps and float(steps[0].split()[-1]) > 0, steps
