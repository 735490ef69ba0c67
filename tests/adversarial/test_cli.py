"""Hostile and careless use of the ``jaxkv`` command.

Every probe asserts the promise: a bad argument is a usage error (exit status 2) reported in
one line that names the argument, the value and what was expected, before any model is read;
a failure at run time exits with status 1 and one line; nothing prints a traceback unless
``--debug`` asks for one; and a chat message that cannot be sent leaves the conversation as it
was.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
import sys

import numpy as np
import pytest

from jaxkv import cli
from jaxkv.engine import ChatSession, Model, SamplingParams
from jaxkv.io import Tokenizer, default_model_path, read_gguf_metadata


def run(capsys, *argv: str) -> tuple[int, str, list[str]]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err.splitlines()


# -- usage errors: status 2, one line, nothing loaded ---------------------------------------------

BIG = str(2**31)
USAGE_PROBES = [
    # (argv, what the one line must contain after "<prog>: error: ")
    (["info", "--page-size", "0"], "argument --page-size: expected an integer in [1, 2147483647]"),
    (["info", "--page-size", "-1"], "argument --page-size: expected an integer in [1, "),
    (["info", "--page-size", "abc"], "argument --page-size: expected an integer in [1, "),
    (["info", "--page-size", "1.5"], "argument --page-size: expected an integer in [1, "),
    (["info", "--page-size", BIG], "argument --page-size: expected an integer in [1, "),
    (["info", "--max-length", "0"], "argument --max-length: expected an integer in [1, "),
    (["info", "--max-length", "-5"], "argument --max-length: expected an integer in [1, "),
    (["info", "--max-length", "1" + "0" * 30], "argument --max-length: expected an integer"),
    (["info", "--max-length", "9" * 5000], "argument --max-length: expected an integer"),
    (["generate", "--max-new-tokens", "0"], "argument --max-new-tokens: expected an integer"),
    (["generate", "--max-new-tokens", "-1"], "argument --max-new-tokens: expected an integer"),
    (["generate", "--max-new-tokens", "1e3"], "argument --max-new-tokens: expected an integer"),
    (["generate", "--max-new-tokens", BIG], "argument --max-new-tokens: expected an integer"),
    (["generate", "--temperature", "-1"], "argument --temperature: expected a finite number >= 0"),
    (["generate", "--temperature", "nan"], "argument --temperature: expected a finite number"),
    (["generate", "--temperature", "inf"], "argument --temperature: expected a finite number"),
    (["generate", "--temperature", "hot"], "argument --temperature: expected a finite number"),
    (["generate", "--top-p", "0"], "argument --top-p: expected a finite number > 0 and <= 1"),
    (["generate", "--top-p", "2"], "argument --top-p: expected a finite number > 0 and <= 1"),
    (["generate", "--top-p", "nan"], "argument --top-p: expected a finite number > 0 and <= 1"),
    (["generate", "--top-p", "-0.5"], "argument --top-p: expected a finite number > 0 and <= 1"),
    (["generate", "--top-k", "0"], "argument --top-k: expected an integer in [1, "),
    (["generate", "--top-k", "-3"], "argument --top-k: expected an integer in [1, "),
    (["generate", "--top-k", "2.5"], "argument --top-k: expected an integer in [1, "),
    (["generate", "--seed", "-1"], "argument --seed: expected an integer in [0, 4294967295]"),
    (["generate", "--seed", str(2**40)], "argument --seed: expected an integer in [0, "),
    (["generate", "--stop", ""], "argument --stop: expected a non-empty stop string, got ''"),
    (["generate", "--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (["generate", "--cache", "bogus"], "argument --cache: invalid choice: 'bogus'"),
    (["generate", "--kv-quantization", "int2"], "argument --kv-quantization: invalid choice"),
    (["generate", "caf\udce9"], "argument prompt: expected valid UTF-8 text, got an undecodable"),
    (["generate", "--stop", "\udcff"], "argument --stop: expected valid UTF-8 text"),
    (["chat", "--system", "\udcff"], "argument --system: expected valid UTF-8 text"),
    (["chat", "--max-length", "0"], "argument --max-length: expected an integer in [16, "),
    (["chat", "--max-length", "8"], "argument --max-length: expected an integer in [16, "),
    (
        ["chat", "--max-length", "64", "--max-new-tokens", "64"],
        "argument --max-new-tokens: expected fewer than --max-length=64 tokens",
    ),
    (["chat", "--max-new-tokens", "0"], "argument --max-new-tokens: expected an integer"),
    (["chat", "--top-p", "1.5"], "argument --top-p: expected a finite number > 0 and <= 1"),
    ([], "the following arguments are required: command"),
    (["bogus"], "argument command: invalid choice: 'bogus'"),
    (["info", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["generate", "--max-new-tokens"], "argument --max-new-tokens: expected one argument"),
]


@pytest.mark.parametrize(
    ("argv", "message"), USAGE_PROBES, ids=[" ".join(a)[:48] for a, _ in USAGE_PROBES]
)
def test_usage_error(capsys, no_loading, argv, message):
    status, out, err = run(capsys, *argv)
    assert status == 2
    assert out == ""
    assert len(err) == 1, err
    prog = (
        "jaxkv" if not argv or argv[0] == "bogus" or "--bogus-flag" in argv else f"jaxkv {argv[0]}"
    )
    assert err[0].startswith(f"{prog}: error: {message}"), err[0]


@pytest.mark.parametrize("argv", ["info", b"info", ["info", 1], [None], 42], ids=repr)
def test_main_argv_of_wrong_type(argv):
    with pytest.raises(TypeError, match="argv must be a sequence of str or None, got"):
        cli.main(argv)


@pytest.mark.parametrize("argv", [["--help"], ["info", "--help"], ["chat", "-h"]])
def test_help_exits_0(capsys, no_loading, argv):
    status, out, err = run(capsys, *argv)
    assert (status, err) == (0, [])
    assert out.startswith("usage: jaxkv")


# -- runtime errors: status 1, one line ---------------------------------------------------------


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    """A copy of the bundled model whose final norm holds two NaNs."""
    source = default_model_path()
    norm = read_gguf_metadata(source).tensors["output_norm.weight"]
    path = tmp_path_factory.mktemp("nan") / "nan.gguf"
    shutil.copyfile(source, path)
    with open(path, "r+b") as file:
        file.seek(norm.offset + 4 * 10)
        file.write(np.array([np.nan, np.nan], np.float32).tobytes())
    return path


@pytest.mark.parametrize("command", ["info", "generate", "chat"])
@pytest.mark.parametrize("kind", ["directory", "empty", "truncated"])
def test_bad_model_file(capsys, tmp_path, command, kind):
    path = tmp_path / "model.gguf"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(default_model_path().read_bytes()[:5000])
    status, out, err = run(capsys, command, "--model", str(path))
    assert status == 1
    assert len(err) == 1, err
    assert err[0].startswith(f"jaxkv {command}: error: {path}: ")
    assert {"directory": "got a directory", "empty": "not a GGUF file", "truncated": "truncated"}[
        kind
    ] in err[0]


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_model_with_nan_weights(capsys, nan_model, command):
    status, _, err = run(capsys, command, "--model", str(nan_model))
    assert status == 1
    assert err == [
        f"jaxkv {command}: error: {nan_model}: tensor 'output_norm.weight' (F32, shape (576,)) "
        "decodes to 2 non-finite value(s) (NaN or inf) out of 576; expected finite weights (the "
        "file is corrupt)"
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--raw", ""], "generate: prompts[0] is empty"),
        (["generate", "--max-new-tokens", str(2**31 - 1)], "exceeds the model's context of 8192"),
    ],
)
def test_runtime_error_after_loading(capsys, cached_model, argv, message):
    status, _, err = run(capsys, *argv)
    assert status == 1
    assert len(err) == 1 and message in err[0], err


def _failing_load(error: BaseException):
    def load(cls, path=None, dtype="float32"):
        raise error

    return classmethod(load)


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (RuntimeError("device lost"), "RuntimeError: device lost (rerun with --debug for the"),
        (KeyError("params"), "KeyError: 'params' (rerun with --debug for the traceback)"),
        (ValueError("first\n  second\n"), "first second"),
        (MemoryError(), "MemoryError (rerun with --debug for the traceback)"),
        (ModuleNotFoundError("no jinja2", name="jinja2.sandbox"), "package 'jinja2' is not"),
        (ModuleNotFoundError("no numpy", name="numpy"), "no numpy"),
    ],
    ids=["RuntimeError", "KeyError", "multi-line", "MemoryError", "jinja2", "other module"],
)
def test_unexpected_errors_are_one_line(capsys, monkeypatch, error, line):
    monkeypatch.setattr(Model, "load", _failing_load(error))
    status, _, err = run(capsys, "generate")
    assert status == 1
    assert len(err) == 1 and err[0].startswith("jaxkv generate: error: ") and line in err[0], err


def test_interrupt_exits_130_without_traceback(capsys, monkeypatch):
    monkeypatch.setattr(Model, "load", _failing_load(KeyboardInterrupt()))
    status, _, err = run(capsys, "chat")
    assert status == 130
    assert err == ["", "jaxkv chat: interrupted"]


@pytest.mark.parametrize("command", ["info", "generate", "chat"])
def test_debug_on_every_command(capsys, tmp_path, command):
    status, _, err = run(capsys, command, "--debug", "--model", str(tmp_path / "absent.gguf"))
    assert status == 1
    assert err[0] == "Traceback (most recent call last):"
    assert err[-1].endswith("absent.gguf: no such GGUF file")


def test_missing_jinja2(capsys, monkeypatch, cli_model):
    fresh = Tokenizer.from_metadata(read_gguf_metadata(default_model_path()))  # nothing compiled
    unprepared = dataclasses.replace(cli_model, tokenizer=fresh)
    monkeypatch.setattr(Model, "load", classmethod(lambda cls, path=None, dtype=None: unprepared))
    for name in ("jinja2", "jinja2.ext", "jinja2.sandbox"):
        monkeypatch.setitem(sys.modules, name, None)
    status, _, err = run(capsys, "generate", "--max-new-tokens", "1")
    assert status == 1
    assert err == [
        "jaxkv generate: error: the Python package 'jinja2' is not installed (it is needed to "
        "render chat templates); install the model extra: pip install 'jaxkv[model]'"
    ]


# -- chat: a message that cannot be sent leaves the conversation as it was ------------------------


CHAT = ["chat", "--max-length", "64", "--max-new-tokens", "4"]


@pytest.mark.parametrize(
    ("typed", "errors"),
    [
        (b"word " * 100 + b"\n", ["would pass the cache's max_length=64"]),
        (b"\xff\xfe\n", ["position 0 holds the lone surrogate U+DCFF (the undecodable input byte"]),
        (b"ok \xc3\n\xe2\x82\n", ["position 3 holds", "position 0 holds"]),  # cut-off characters
        (
            b"word " * 100 + b"\n" + b"\x80\n" + b"word " * 200 + b"\n",
            ["max_length", "0x80", "max_"],
        ),
        (b"   \nnever read\n", []),  # a blank line ends the session
    ],
    ids=["too long", "not UTF-8", "cut UTF-8", "three bad in a row", "blank line"],
)
@pytest.mark.parametrize("system", [None, "Be brief."])
def test_chat_messages_that_cannot_be_sent(
    capsys, monkeypatch, cached_model, sessions, typed, errors, system
):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(typed), encoding="utf-8"))
    argv = CHAT if system is None else [*CHAT, "--system", system]
    status, out, err = run(capsys, *argv)
    assert (status, out) == (0, "")
    reported = [line for line in err if "error:" in line]
    assert len(reported) == len(errors), err
    for line, part in zip(reported, errors, strict=True):
        assert part in line and line.endswith("(message not sent; the conversation is kept)")
    (session,) = sessions
    assert session.messages == ([] if system is None else [{"role": "system", "content": system}])
    assert session.cached_ids == []


def test_chat_failure_after_a_step_ran_ends_the_session(capsys, monkeypatch, cached_model):
    """Then the cache and the conversation may disagree: going on could corrupt later turns."""

    def send(self, text, **kwargs):
        self.engine.add_request([1, 2, 3], SamplingParams(max_tokens=1))
        self.engine.step()  # the cache moved on
        raise ValueError("the step failed halfway")

    monkeypatch.setattr(ChatSession, "send", send)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nagain\n"))
    status, _, err = run(capsys, *CHAT)
    assert status == 1
    assert err[-1].endswith("jaxkv chat: error: the step failed halfway")
