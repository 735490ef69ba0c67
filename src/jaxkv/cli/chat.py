"""``jaxkv chat``: an interactive conversation whose KV cache is kept across turns.

A message that cannot be sent (too long for the cache, not valid UTF-8) prints its one-line
error and leaves the conversation as it was; the session goes on.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from jaxkv._arguments import integer
from jaxkv.cli import _common

MIN_LENGTH = 16  # ChatSession's smallest cache


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = _common.add_parser(
        subparsers, "chat", help="an interactive conversation (cache kept across turns)"
    )
    parser.add_argument("--system", default=None, type=_common.utf8, help="system message")
    parser.add_argument(
        "--max-length",
        type=integer(MIN_LENGTH),
        default=4096,
        help="cache capacity in tokens",
    )
    _common.add_model_arguments(parser)
    _common.add_sampling_arguments(parser, 256)
    _common.add_common_arguments(parser)
    return parser


def usage_error(args: argparse.Namespace) -> str | None:
    """A usage error that involves two arguments, or None."""
    if args.max_new_tokens >= args.max_length:
        return (
            f"argument --max-new-tokens: expected fewer than --max-length={args.max_length} "
            f"tokens (the cache must also hold the conversation), got {args.max_new_tokens}"
        )
    return None


def _tolerant_stdin() -> Any:
    """``sys.stdin``, set so that bytes that are not UTF-8 do not raise inside ``readline``.

    They arrive as lone surrogates, which the tokenizer then refuses with a clear error.
    """
    stdin = sys.stdin
    reconfigure = getattr(stdin, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors="surrogateescape")
        except (ValueError, OSError):  # e.g. an already-closed or non-text stream
            pass
    return stdin


def run(args: argparse.Namespace) -> int:
    import jaxkv.engine

    model = _common.load(args)
    sampling = jaxkv.engine.SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    session = jaxkv.engine.ChatSession(
        model, system=args.system, max_length=args.max_length, sampling=sampling
    )
    session.warmup(_common.progress(args))
    stdin = _tolerant_stdin()
    print("jaxkv chat: type a message; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line or not line.strip():
            return 0

        def stream(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        steps_before = session.engine.stats().num_steps
        try:
            session.send(line.rstrip("\n"), max_new_tokens=args.max_new_tokens, on_text=stream)
        except ValueError as error:
            # Refused before anything was prefilled (too long, not UTF-8): the conversation
            # and its cache are untouched, so the session goes on. A failure after the engine
            # ran a step would leave them out of step: that one ends the session.
            if session.engine.stats().num_steps != steps_before:
                raise
            _common.report(
                "chat", error, args.debug, " (message not sent; the conversation is kept)"
            )
            continue
        sys.stdout.write("\n")
        print(
            f"[prefilled {session.last_prefill_tokens} new tokens; "
            f"{len(session.cached_ids)} in cache]",
            file=sys.stderr,
        )
