"""The ``jaxkv`` command: exit codes, one-line errors, argument checks before any model is
loaded, and the missing `model` extra (``jaxkv chat`` has its own tests: tests/test_chat.py).

The bundled model is loaded once per module; ``Model.load`` is then patched to hand it out, so
each command runs in-process in a fraction of a second.
"""

from __future__ import annotations

import sys

import pytest

from jaxkv import cli


def run(capsys, *argv: str) -> tuple[int, str, list[str]]:
    """(exit status, stdout, stderr lines) of ``jaxkv *argv``."""
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err.splitlines()


def test_info(capsys):
    status, out, err = run(capsys, "info", "--max-length", "1024", "--page-size", "32")
    assert (status, err) == (0, [])
    assert "num_layers: 30" in out
    assert "sequence of 1024 tokens, page size 32" in out
    assert "paged int4" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["info", "--page-size", "0"], "argument --page-size: expected an integer in [1, "),
        (["info", "--max-length", "0"], "argument --max-length: expected an integer in [1, "),
        (["chat", "--max-length", "0"], "argument --max-length: expected an integer in [16, "),
        (["generate", "--max-new-tokens", "-5"], "argument --max-new-tokens: expected an integer"),
        (["generate", "--top-p", "2"], "argument --top-p: expected a finite number > 0 and <= 1"),
        (["chat", "--temperature", "-1"], "argument --temperature: expected a finite number >= 0"),
        (["generate", "--top-k", "0"], "argument --top-k: expected an integer in [1, "),
    ],
)
def test_usage_errors_exit_2_before_loading(capsys, no_loading, argv, message):
    status, out, err = run(capsys, *argv)
    assert status == 2
    assert out == ""
    assert len(err) == 1, err
    assert err[0].startswith(f"jaxkv {argv[0]}: error: {message}")
    assert f"got '{argv[-1]}'" in err[0]


@pytest.mark.parametrize("command", ["info", "generate", "chat"])
def test_runtime_errors_exit_1_with_one_line(capsys, tmp_path, command):
    not_a_model = tmp_path / "notes.gguf"
    not_a_model.write_text("hello")
    status, out, err = run(capsys, command, "--model", str(not_a_model))
    assert status == 1
    assert err == [
        f"jaxkv {command}: error: {not_a_model}: not a GGUF file (expected magic "
        "b'GGUF', got b'hell')"
    ]


def test_prompt_too_long_for_the_context(capsys, cached_model):
    status, _, err = run(capsys, "generate", "--max-new-tokens", "9000")
    assert status == 1
    assert len(err) == 1 and "exceeds the model's context of 8192" in err[0]


def test_debug_shows_the_traceback(capsys, tmp_path):
    status, _, err = run(capsys, "info", "--debug", "--model", str(tmp_path / "absent.gguf"))
    assert status == 1
    assert err[0] == "Traceback (most recent call last):"
    assert err[-1].startswith("jaxkv.io.gguf.GGUFError: ") and "no such GGUF file" in err[-1]


@pytest.mark.parametrize(
    ("modules", "argv", "package"),
    [
        (["gguf"], ["info"], "gguf"),
        (["tokenizers"], ["generate", "--max-new-tokens", "1"], "tokenizers"),
    ],
)
def test_missing_model_extra(capsys, monkeypatch, modules, argv, package):
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import <name>` fail
    status, _, err = run(capsys, *argv)
    assert status == 1
    assert err == [
        f"jaxkv {argv[0]}: error: the Python package {package!r} is not installed (it is needed "
        f"to {cli._MODEL_EXTRA[package]}); install the model extra: pip install 'jaxkv[model]'"
    ]
