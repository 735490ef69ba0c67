"""What the ``jaxkv`` subcommands share: the parser class whose usage errors are one line, the
argument types and groups (model, sampling, cache), progress on stderr, loading the model, and
the one-line report of an error."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from jaxkv._arguments import integer, real

EXIT_USAGE = 2
EXIT_RUNTIME = 1
EXIT_INTERRUPTED = 130
MAX_SEED = 2**32 - 1  # JAX's PRNG keys are built from 32-bit seeds

MODEL_EXTRA = {
    "gguf": "read GGUF checkpoints",
    "tokenizers": "tokenize text",
    "jinja2": "render chat templates",
}
"""Packages of the `model` extra, with what each one is needed for."""

# Errors whose message says everything; any other type is named in the one-line report.
_PLAIN_ERRORS = (ValueError, TypeError, OSError, OverflowError)
# dtypes that run far slower than float32 on a backend (no native arithmetic for them there).
_SLOW_DTYPES = {"cpu": {"bfloat16": "about 8x slower than float32"}}


class Parser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose usage errors are one line: ``<prog>: error: <message>``,
    and whose help shows each option's default."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to the help of every option that has a default worth naming."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default == []
            or default == argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        return f"{text} (default: {default})" if text else f"default: {default}"


def add_parser(subparsers: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand parser of our class (one-line errors, defaults in the help)."""
    return subparsers.add_parser(name, formatter_class=_HelpFormatter, **kwargs)


# -- argument types ---------------------------------------------------------------------------


def utf8(text: str) -> str:
    """An argparse ``type=`` for text: refuses what ``sys.argv`` made of non-UTF-8 bytes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise argparse.ArgumentTypeError(
            f"expected valid UTF-8 text, got an undecodable byte at position {err.start} of "
            f"{text!r:.80}"
        ) from None
    return text


def stop_string(text: str) -> str:
    if not utf8(text):
        raise argparse.ArgumentTypeError("expected a non-empty stop string, got ''")
    return text


# -- argument groups --------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quiet", action="store_true", help="no progress or timing lines on stderr"
    )
    parser.add_argument(
        "--debug", action="store_true", help="on an error, print the full traceback"
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="a GGUF file (Llama or Gemma 3 architecture), or 'smollm2' / 'gemma3' for a "
        "bundled model (default: smollm2, SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="weight and activation dtype",
    )


def add_cache_arguments(parser: argparse.ArgumentParser, default: str = "contiguous") -> None:
    parser.add_argument(
        "--cache",
        default=default,
        choices=("contiguous", "paged"),
        help="KV cache layout: one row per sequence, or a shared page pool",
    )
    parser.add_argument(
        "--kv-quantization",
        default="none",
        choices=("none", "int8", "int4", "fp8"),
        help="storage codec of the KV cache",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument(
        "--max-new-tokens", type=integer(1), default=max_new_tokens, help="most tokens to generate"
    )
    parser.add_argument(
        "--temperature", type=real(0.0), default=0.0, help="0 = greedy (default: 0)"
    )
    parser.add_argument(
        "--top-k", type=integer(1), default=None, help="sample from the k likeliest tokens only"
    )
    parser.add_argument(
        "--top-p",
        type=real(0.0, 1.0, include_minimum=False),
        default=1.0,
        help="nucleus sampling: the smallest set of tokens with this much probability, in (0, 1]",
    )
    parser.add_argument(
        "--seed", type=integer(0, MAX_SEED), default=0, help="random seed of the sampler"
    )


# -- progress and loading ---------------------------------------------------------------------


def progress(args: argparse.Namespace) -> Callable[[str], None] | None:
    """A callback printing a line of progress (loading, compiling) on stderr, or None: only when
    stderr is a terminal and ``--quiet`` is not given, so logs and pipes get results only."""
    if getattr(args, "quiet", False) or not sys.stderr.isatty():
        return None

    def show(line: str) -> None:
        print(f"jaxkv: {line}", file=sys.stderr, flush=True)

    return show


def status(args: argparse.Namespace, line: str) -> None:
    show = progress(args)
    if show is not None:
        show(line)


def note(args: argparse.Namespace, line: str) -> None:
    """A line on stderr that is part of the command's report (timings, notices): printed
    unless ``--quiet``, terminal or not."""
    if not getattr(args, "quiet", False):
        print(line, file=sys.stderr, flush=True)


def slow_dtype_warning(dtype: str, backend: str) -> str | None:
    """The warning for a dtype known to be slow on ``backend`` (``jax.default_backend()``)."""
    slow = _SLOW_DTYPES.get(backend, {}).get(dtype)
    if slow is None:
        return None
    return (
        f"jaxkv: warning: --dtype {dtype} has no native arithmetic on the {backend} backend "
        f"and decodes {slow}; use --dtype float32 for speed"
    )


def load(args: argparse.Namespace) -> Any:
    """The model ``--model``/``--dtype`` name, with a line of progress and any dtype warning."""
    import time

    import jax

    from jaxkv.engine import Model

    warning = slow_dtype_warning(args.dtype, jax.default_backend())
    if warning is not None:
        note(args, warning)
    from jaxkv.engine.model import MODEL_ALIASES

    name = args.model or "smollm2"
    status(args, f"loading {MODEL_ALIASES.get(name, name)}")
    start = time.perf_counter()
    model = Model.load(args.model, dtype=args.dtype)
    args.load_seconds = time.perf_counter() - start
    return model


# -- reporting errors -------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def describe(error: BaseException) -> str:
    """The one-line message for ``error``."""
    if isinstance(error, ImportError):
        package = (error.name or "").partition(".")[0]
        if package in MODEL_EXTRA:
            return (
                f"the Python package {package!r} is not installed (it is needed to "
                f"{MODEL_EXTRA[package]}); install the model extra: pip install 'jaxkv[model]'"
            )
    message = _one_line(str(error))
    if isinstance(error, _PLAIN_ERRORS) and message:
        return message
    detail = f": {message}" if message else ""
    return f"{type(error).__name__}{detail} (rerun with --debug for the traceback)"


def report(command: str, error: BaseException, debug: bool, suffix: str = "") -> None:
    if debug:
        traceback.print_exception(error)
    else:
        print(f"jaxkv {command}: error: {describe(error)}{suffix}", file=sys.stderr)
