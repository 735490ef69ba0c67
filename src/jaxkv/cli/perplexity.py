"""``jaxkv perplexity FILE``: the perplexity of a UTF-8 text under the model, by sliding windows
(``jaxkv.engine.perplexity``), for one KV cache codec or several side by side.

The result lines go to stdout, one per codec; a progress bar goes to stderr when it is a terminal
(and ``--quiet`` is not given).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Callable
from typing import Any

from jaxkv._arguments import integer
from jaxkv.cli import _common

CODECS = ("none", "int8", "int4", "fp8")  # jaxkv.quantization.CODECS, without importing JAX
BAR_WIDTH = 30


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = _common.add_parser(
        subparsers,
        "perplexity",
        help="perplexity of a text file (sliding windows), per KV cache codec",
        description=(
            "Perplexity of FILE under the model, as in Hugging Face's perplexity guide: windows "
            "of --window tokens every --stride tokens, each scoring the tokens no earlier window "
            "scored, with the tokens before them as context. Prints one line per codec."
        ),
    )
    parser.add_argument("file", metavar="FILE", help="a UTF-8 text file, or - for standard input")
    parser.add_argument(
        "--window",
        type=integer(2),
        default=None,
        help="tokens per window (default: 1024, or the model's context if shorter)",
    )
    parser.add_argument(
        "--stride",
        type=integer(1),
        default=None,
        help="tokens between window starts, at most --window (default: half the window)",
    )
    parser.add_argument(
        "--kv-quantization",
        type=_codec_list,
        action="append",
        default=None,
        metavar="CODEC[,CODEC...]",
        help=(
            f"storage codec of the KV cache, one of {', '.join(CODECS)}; repeat the option or "
            "give a comma list (none,int8,int4) to compare codecs in one run: one line each, "
            "with the change against the first (default: none)"
        ),
    )
    _common.add_model_arguments(parser)
    _common.add_common_arguments(parser)
    return parser


def _codec_list(text: str) -> list[str]:
    """An argparse ``type=``: a comma-separated list of codec names."""
    names = [name.strip() for name in text.split(",")]
    if any(name not in CODECS for name in names):
        raise argparse.ArgumentTypeError(
            f"expected one or more of {', '.join(CODECS)} separated by commas, got {text!r:.80}"
        )
    return names


def usage_error(args: argparse.Namespace) -> str | None:
    """A usage error that involves two arguments, or None."""
    if args.window is not None and args.stride is not None and args.stride > args.window:
        return (
            f"argument --stride: expected at most --window={args.window} tokens, got {args.stride}"
        )
    return None


def codecs(args: argparse.Namespace) -> list[str]:
    """The codecs to run, in the order given, each once (``["none"]`` unless told)."""
    given = [name for group in args.kv_quantization or [["none"]] for name in group]
    return list(dict.fromkeys(given))


def read_text(path: str) -> str:
    """The text of ``path`` (``-``: standard input), decoded as UTF-8.

    Raises:
        OSError: the file cannot be read (missing, a directory, no permission).
        ValueError: it is not UTF-8, or it is empty.
    """
    name = "standard input" if path == "-" else path
    try:
        if path == "-":
            stdin = getattr(sys.stdin, "buffer", sys.stdin)
            data = stdin.read()
        else:
            data = pathlib.Path(path).read_bytes()
    except OSError as err:
        raise OSError(f"cannot read {name}: {err.strerror or err}") from None
    if isinstance(data, str):  # a text stream without a binary buffer
        data = data.encode("utf-8", errors="surrogateescape")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{name} is not UTF-8 text: byte 0x{data[err.start]:02x} at offset {err.start} "
            "cannot be decoded"
        ) from None
    if not text:
        raise ValueError(f"{name} is empty: expected a text of at least 2 tokens")
    return text


def progress_bar(args: argparse.Namespace, label: str) -> Callable[[int, int], None] | None:
    """An ``on_progress(done, total)`` redrawing ``jaxkv: perplexity [####    ] 3/8 windows``
    in place on stderr, or None where ``_common.progress`` shows nothing (not a terminal,
    ``--quiet``)."""
    if _common.progress(args) is None:
        return None

    def show(done: int, total: int) -> None:
        filled = BAR_WIDTH * done // max(total, 1)
        bar = "#" * filled + " " * (BAR_WIDTH - filled)
        end = "\n" if done >= total else ""
        line = f"\rjaxkv: perplexity{label} [{bar}] {done:,}/{total:,} windows"
        print(line, end=end, file=sys.stderr, flush=True)

    return show


def run(args: argparse.Namespace) -> int:
    from jaxkv.engine import perplexity

    combination = usage_error(args)
    if combination is not None:
        raise ValueError(combination)
    text = read_text(args.file)  # before loading: a bad file costs nothing
    names = codecs(args)
    model = _common.load(args)
    first = None
    compile_seconds = 0.0
    for codec in names:
        label = f" (kv {codec})" if len(names) > 1 else ""
        result = perplexity(
            model,
            text,
            window=args.window,
            stride=args.stride,
            kv_quantization=codec,
            on_progress=progress_bar(args, label),
        )
        compile_seconds += result.compile_seconds
        line = result.summary()
        if first is None:
            first = result
        else:
            change = result.perplexity / first.perplexity - 1
            line += f" ({change:+.2%} vs {first.kv_quantization})"
        print(line, flush=True)
    load_seconds = getattr(args, "load_seconds", None)
    loaded = "" if load_seconds is None else f"load {load_seconds:.1f} s, "
    _common.note(args, f"[{loaded}compile {compile_seconds:.1f} s]")
    return 0
