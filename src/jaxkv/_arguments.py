"""Argparse ``type=`` functions shared by the ``jaxkv`` subcommands: each checks its range, so
a bad value is a usage error caught while parsing, before anything is loaded."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

MAX_SIZE = 2**31 - 1
"""Lengths, counts and page sizes are int32 on the device."""


def integer(minimum: int, maximum: int = MAX_SIZE) -> Callable[[str], int]:
    """An argparse ``type=`` parsing an int in ``[minimum, maximum]``."""
    expected = f"an integer in [{minimum}, {maximum}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:  # not a number, or thousands of digits
            value = None
        if value is None or not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r:.40}")
        return value

    return parse


def real(
    minimum: float, maximum: float | None = None, *, include_minimum: bool = True
) -> Callable[[str], float]:
    """An argparse ``type=`` parsing a finite float >= ``minimum`` (or >) and <= ``maximum``."""
    low = f">= {minimum:g}" if include_minimum else f"> {minimum:g}"
    expected = f"a finite number {low}" + ("" if maximum is None else f" and <= {maximum:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r:.40}") from None
        if (
            not math.isfinite(value)
            or value < minimum
            or (value == minimum and not include_minimum)
            or (maximum is not None and value > maximum)
        ):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r:.40}")
        return value

    return parse


def add_speculative_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--speculative``, ``--num-draft`` and ``--draft-model`` (speculative decoding)."""
    parser.add_argument(
        "--speculative",
        default="none",
        choices=("none", "ngram", "draft"),
        help="speculative decoding: ngram (prompt lookup: drafts copied from the prompt and "
        "output so far) or draft (a smaller model on the same tokenizer, --draft-model); the "
        "output is unchanged, the decode faster when drafts are accepted",
    )
    parser.add_argument(
        "--num-draft",
        type=integer(1, 32),
        default=4,
        help="draft tokens proposed per sequence and step (with --speculative)",
    )
    parser.add_argument(
        "--draft-model",
        default=None,
        help="with --speculative draft: a GGUF file or a bundled model name",
    )
