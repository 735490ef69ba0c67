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


class UsageError(ValueError):
    """A usage error found after parsing, before anything is loaded (e.g. a ``--mesh`` whose
    size is not the number of devices): the command exits with status 2."""


MESH_AXES = ("data", "tensor")
"""The axes ``--mesh`` may name: rows split over ``data``, heads over ``tensor``."""


def parse_mesh_spec(text: str) -> tuple[tuple[str, int], ...]:
    """``"data=2,tensor=4"`` as ``(("data", 2), ("tensor", 4))``: each axis of ``MESH_AXES`` at
    most once, with a positive integer size.

    Raises:
        ValueError: a malformed entry, an unknown or repeated axis, a size that is not a
            positive integer.
    """
    example = "e.g. 'data=2,tensor=4'"
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"expected name=size,... ({example}), got {text!r:.40}")
    axes: dict[str, int] = {}
    for entry in text.split(","):
        name, equals, size = (part.strip() for part in entry.partition("="))
        if not equals or not name:
            raise ValueError(
                f"expected name=size entries separated by commas ({example}), got "
                f"{entry.strip()!r:.40} in {text!r:.60}"
            )
        if name not in MESH_AXES:
            raise ValueError(f"unknown mesh axis {name!r:.40}; expected one of {MESH_AXES}")
        if name in axes:
            raise ValueError(f"mesh axis {name!r} is given twice in {text!r:.60}")
        if not size.isdigit() or not 1 <= int(size) <= MAX_SIZE:
            raise ValueError(f"mesh axis {name!r} needs a positive integer size, got {size!r:.40}")
        axes[name] = int(size)
    return tuple(axes.items())


def mesh_spec(text: str) -> tuple[tuple[str, int], ...]:
    """An argparse ``type=`` for ``--mesh`` (``parse_mesh_spec``)."""
    try:
        return parse_mesh_spec(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_mesh_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--mesh`` and ``--mesh-indivisible`` (run on a device mesh)."""
    parser.add_argument(
        "--mesh",
        type=mesh_spec,
        default=None,
        metavar="NAME=SIZE,...",
        help="run on a device mesh, e.g. data=2,tensor=4 (rows over data, heads over tensor; "
        "the sizes multiply to the number of devices; default: one device)",
    )
    parser.add_argument(
        "--mesh-indivisible",
        default="error",
        choices=("error", "replicate"),
        help="with --mesh, a size that does not divide over its axis (SmolLM2's 3 KV heads on "
        "tensor=4): refuse it, or hold it whole on every device",
    )


def speculative_usage_error(args: argparse.Namespace) -> str | None:
    """The usage error of ``--speculative`` with ``--draft-model``, or None."""
    if args.draft_model is not None and args.speculative != "draft":
        return "argument --draft-model: expected --speculative draft"
    if args.speculative == "draft" and args.draft_model is None:
        return "argument --speculative: 'draft' expects --draft-model FILE"
    return None


def add_process_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--coordinator``, ``--num-processes`` and ``--process-id``: one process of a job whose
    ``--mesh`` spans several hosts (``jax.distributed.initialize``)."""
    parser.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="with --mesh over several hosts: the address of process 0, the same in every "
        "process (each runs the same command with its own --process-id)",
    )
    parser.add_argument(
        "--num-processes", type=integer(1, 65536), default=1, help="processes in the job"
    )
    parser.add_argument(
        "--process-id", type=integer(0, 65535), default=0, help="this process, from 0"
    )


def process_usage_error(args: argparse.Namespace) -> str | None:
    """The usage error of the process arguments, or None."""
    if args.coordinator is None:
        if args.num_processes != 1 or args.process_id != 0:
            return "argument --num-processes/--process-id: expected --coordinator HOST:PORT"
        return None
    if args.mesh is None:
        return "argument --coordinator: expected --mesh (the mesh spans every process's devices)"
    if args.num_processes < 2:
        return "argument --coordinator: expected --num-processes of at least 2"
    if args.process_id >= args.num_processes:
        return (
            f"argument --process-id: expected an id in [0, {args.num_processes}), got "
            f"{args.process_id}"
        )
    return None
