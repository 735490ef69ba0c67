"""``jaxkv generate``: prompts from arguments, a file or stdin, ``--json`` records, the timing
summary, ``--quiet``, defaults in ``--help`` and the slow-dtype warning.

The bundled model is loaded once (``cached_model``); each distinct batch compiles its steps.
"""

from __future__ import annotations

import io
import json
import sys

import pytest

from jaxkv import cli
from jaxkv.cli import _common
from jaxkv.engine import generate


def run(capsys, *argv: str) -> tuple[int, str, list[str]]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err.splitlines()


def _stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


PROMPTS = ["The capital of France is", "One, two, three,", "Water boils at"]


def test_json_records_from_a_batch_on_stdin(capsys, monkeypatch, cached_model):
    _stdin(monkeypatch, ("\n".join(PROMPTS) + "\n\n").encode())
    status, out, err = run(
        capsys, "generate", "--file", "-", "--batch", "--json", "--raw", "--max-new-tokens", "5"
    )
    assert status == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert [r["prompt"] for r in records] == PROMPTS
    expected = generate(cached_model, PROMPTS, max_new_tokens=5)
    for record, generation in zip(records, expected.generations, strict=True):
        assert record["token_ids"] == generation.token_ids
        assert record["text"] == generation.text
        assert record["finish_reason"] == generation.finish_reason
        assert record["prompt_tokens"] == len(generation.prompt_ids)
        assert 0 < record["time_to_first_token_s"] <= record["total_s"]
    # the llama.cpp-style summary on stderr
    summary = "\n".join(err)
    for label in ("load time", "compile time", "prompt eval time", "time to first token"):
        assert label in summary
    assert "tokens per second" in summary


def test_more_prompts_than_parallel_rows_wait_their_turn(capsys, cached_model):
    status, out, err = run(
        capsys, "generate", *PROMPTS, "--raw", "--max-new-tokens", "4", "--parallel", "2"
    )
    assert status == 0, err
    headers = [line for line in out.splitlines() if line.startswith("### ")]
    assert headers == [f"### {i + 1}/3: {p}" for i, p in enumerate(PROMPTS)]
    prompt_eval = next(line for line in err if "prompt eval time" in line)
    first_two = sum(len(cached_model.tokenizer.encode(p)) for p in PROMPTS[:2])
    assert f"/ {first_two:5d} tokens" in prompt_eval  # the first batch: two prompts


def test_quiet_prints_only_the_text(capsys, tmp_path, cached_model):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The capital of France is\n")
    status, out, err = run(
        capsys, "generate", "--file", str(prompt), "--raw", "--max-new-tokens", "3", "--quiet"
    )
    assert (status, err) == (0, [])
    expected = generate(cached_model, ["The capital of France is"], max_new_tokens=3)
    assert out == expected.generations[0].text + "\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch"], "argument --batch: expected --file FILE"),
        (["hello", "--file", "x.txt"], "argument --file: expected either prompt arguments"),
        (["--parallel", "0"], "argument --parallel: expected an integer in [1, 256]"),
    ],
)
def test_usage_errors(capsys, no_loading, argv, message):
    status, out, err = run(capsys, "generate", *argv)
    assert (status, out) == (2, "")
    assert len(err) == 1 and err[0].startswith(f"jaxkv generate: error: {message}"), err


def test_unreadable_prompt_files_are_one_line_errors(capsys, tmp_path, no_loading):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    cases = {
        str(latin1): "expected UTF-8 text, got the byte 0xE9 at offset 3",
        str(empty): "expected at least one prompt, got no text",
        str(tmp_path / "absent.txt"): "No such file or directory",
    }
    for path, message in cases.items():
        status, out, err = run(capsys, "generate", "--file", path, "--batch")
        assert (status, out) == (1, "")
        assert len(err) == 1 and err[0].startswith("jaxkv generate: error: "), err
        assert message in err[0]


def test_help_shows_defaults(capsys):
    status, out, _ = run(capsys, "generate", "--help")
    assert status == 0
    flat = " ".join(out.split())
    assert "most tokens to generate (default: 128)" in flat
    assert "random seed of the sampler (default: 0)" in flat
    assert "(default: contiguous)" in flat
    assert "--raw do not wrap the prompt in the chat template (default" not in flat


def test_bfloat16_on_cpu_warns(capsys, cached_model):
    assert _common.slow_dtype_warning("float32", "cpu") is None
    assert _common.slow_dtype_warning("bfloat16", "gpu") is None
    status, _, err = run(
        capsys, "generate", "Hi", "--raw", "--max-new-tokens", "2", "--dtype", "bfloat16"
    )
    assert status == 0
    assert err[0].startswith("jaxkv: warning: --dtype bfloat16 has no native arithmetic")


@pytest.mark.parametrize("cache", ["contiguous", "paged"])
def test_prompt_cache_reuses_the_saved_prompt_and_falls_back_on_a_damaged_file(
    capsys, tmp_path, cached_model, cache
):
    prompt = "Name three colours of the rainbow, then stop."
    path = tmp_path / "prompt.jkv"
    argv = ["generate", prompt, "--max-new-tokens", "4", "--cache", cache]
    argv += ["--prompt-cache", str(path)]
    status, cold, err = run(capsys, *argv[:-2])
    assert status == 0, err
    status, first, err = run(capsys, *argv)
    assert status == 0 and path.exists(), err
    assert any("prompt cache" in line and " 0 of " in line for line in err), err
    status, warm, err = run(capsys, *argv)
    assert status == 0, err
    loaded = next(line for line in err if line.startswith("jaxkv: prompt cache"))
    assert " 0 of " not in loaded and "prompt tokens loaded" in loaded
    assert cold == first == warm
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    status, fallback, err = run(capsys, *argv)
    assert status == 0 and fallback == cold
    warning = next(line for line in err if "warning" in line)
    assert warning.startswith(f"jaxkv generate: warning: prompt cache '{path}' not used")
    assert "truncated" in warning or "not a complete" in warning
