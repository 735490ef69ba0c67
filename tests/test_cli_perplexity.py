"""``jaxkv perplexity FILE``: the result line, codecs compared in one run, standard input, the
progress bar on a terminal, and the one-line errors (exit 1 for a file that cannot be read,
exit 2 for bad arguments, before any model is loaded).

The command runs in-process through ``jaxkv.cli.main``; ``Model.load`` hands out
``Model.tiny()`` (real tokenizer, random weights), so each run takes a fraction of a second.
"""

from __future__ import annotations

import io
import re
import sys

import pytest

from jaxkv import cli, quantization
from jaxkv.cli import perplexity as perplexity_cli
from jaxkv.engine import Model, perplexity

TEXT = (
    "The cache keeps the keys and values of every token it has seen, so that each new token "
    "attends to them without running the whole sequence again. "
) * 4
LINE = re.compile(
    r"perplexity (?P<value>[\d.]+) over (?P<tokens>[\d,]+) tokens "
    r"\((?P<windows>\d+) windows of (?P<window>[\d,]+), stride (?P<stride>[\d,]+); "
    r"kv (?P<codec>\w+)\) in [\d.]+ s(?P<change> \([+-]\d+\.\d\d% vs none\))?"
)


@pytest.fixture(scope="module")
def tiny() -> Model:
    return Model.tiny()


@pytest.fixture
def tiny_model(monkeypatch, tiny) -> Model:
    """``Model.load`` returns the tiny model."""
    monkeypatch.setattr(Model, "load", classmethod(lambda cls, path=None, dtype="float32": tiny))
    return tiny


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def jaxkv_perplexity(capsys, *argv: str) -> tuple[int, str, list[str]]:
    """(exit status, stdout, stderr lines) of ``jaxkv perplexity *argv``."""
    status = cli.main(["perplexity", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err.splitlines()


def test_result_line(capsys, tiny_model, text_file):
    status, out, err = jaxkv_perplexity(
        capsys, str(text_file), "--window", "32", "--stride", "16", "--quiet"
    )
    assert (status, err) == (0, [])
    lines = out.splitlines()
    assert len(lines) == 1
    match = LINE.fullmatch(lines[0])
    assert match, lines[0]
    want = perplexity(tiny_model, TEXT, window=32, stride=16)
    assert float(match["value"]) == pytest.approx(want.perplexity, rel=1e-3)
    assert int(match["tokens"].replace(",", "")) == want.num_tokens
    assert (int(match["windows"]), match["window"], match["stride"]) == (
        want.num_windows,
        "32",
        "16",
    )
    assert (match["codec"], match["change"]) == ("none", None)


def test_codecs_compared_in_one_run(capsys, tiny_model, text_file):
    status, out, err = jaxkv_perplexity(
        capsys,
        str(text_file),
        "--window",
        "32",
        "--kv-quantization",
        "none,int8",
        "--kv-quantization",
        "int4",
        "--kv-quantization",
        "int8",
    )
    assert status == 0
    matches = [LINE.fullmatch(line) for line in out.splitlines()]
    assert all(matches), out
    assert [m["codec"] for m in matches] == ["none", "int8", "int4"]  # each once, in order
    assert matches[0]["change"] is None and matches[1]["change"] and matches[2]["change"]
    assert len(err) == 1 and re.fullmatch(r"\[load [\d.]+ s, compile [\d.]+ s\]", err[0]), err


def test_standard_input(capsys, monkeypatch, tiny_model):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(TEXT.encode("utf-8"))))
    status, out, _ = jaxkv_perplexity(capsys, "-", "--window", "32", "--stride", "16", "--quiet")
    assert status == 0
    want = perplexity(tiny_model, TEXT, window=32, stride=16)
    assert float(LINE.fullmatch(out.strip())["value"]) == pytest.approx(want.perplexity, rel=1e-3)


def test_progress_bar_on_a_terminal(capsys, monkeypatch, tiny_model, text_file):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    status, out, _ = jaxkv_perplexity(capsys, str(text_file), "--window", "32", "--stride", "16")
    assert status == 0
    windows = int(LINE.fullmatch(out.strip())["windows"])
    shown = terminal.getvalue()
    assert f"\rjaxkv: perplexity [{' ' * 30}] 0/{windows} windows" in shown
    assert f"\rjaxkv: perplexity [{'#' * 30}] {windows}/{windows} windows\n" in shown


def test_unreadable_files_exit_1_with_one_line(capsys, no_loading, tmp_path):
    missing = tmp_path / "missing.txt"
    status, out, err = jaxkv_perplexity(capsys, str(missing))
    assert (status, out) == (1, "")
    assert err == [f"jaxkv perplexity: error: cannot read {missing}: No such file or directory"]

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait".encode("latin-1"))
    status, out, err = jaxkv_perplexity(capsys, str(latin1))
    assert (status, out) == (1, "")
    assert err == [
        f"jaxkv perplexity: error: {latin1} is not UTF-8 text: byte 0xe9 at offset 3 cannot be "
        "decoded"
    ]

    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    status, _, err = jaxkv_perplexity(capsys, str(empty))
    assert status == 1 and len(err) == 1 and f"{empty} is empty" in err[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--window", "1"], "argument --window: expected an integer in [2, "),
        (["--window", "many"], "argument --window: expected an integer in [2, "),
        (["--stride", "0"], "argument --stride: expected an integer in [1, "),
        (["--kv-quantization", "int8,int9"], "argument --kv-quantization: expected one or more"),
        (["--window", "8", "--stride", "9"], "argument --stride: expected at most --window=8"),
    ],
)
def test_bad_arguments_exit_2_before_loading(capsys, no_loading, text_file, argv, message):
    status, out, err = jaxkv_perplexity(capsys, str(text_file), *argv)
    assert (status, out) == (2, "")
    assert len(err) == 1, err
    assert err[0].startswith(f"jaxkv perplexity: error: {message}"), err[0]


def test_help_and_codecs(capsys):
    assert perplexity_cli.CODECS == quantization.CODECS
    status, out, _ = jaxkv_perplexity(capsys, "--help")
    assert status == 0
    assert "comma list" in " ".join(out.split())
