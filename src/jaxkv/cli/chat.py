"""``jaxkv chat``: an interactive conversation whose KV cache is kept across turns.

On a terminal the line is read with ``readline`` (line editing, and a history of this session's
lines); otherwise stdin is read a line at a time. Stdout carries the replies only: the prompt,
notices, errors and what the slash commands show go to stderr.

* Ctrl-C during a reply stops it (the text so far stays in the conversation); at the prompt it
  clears the line, and a second one at an empty prompt ends the session, as Ctrl-D or an empty
  line do (exit status 0).
* Lines that start with ``/`` are commands (``/help`` lists them), never sent to the model;
  ``//`` sends the line with one slash removed.
* When the conversation outgrows ``--max-length``, the oldest turns are dropped (the system
  prompt stays), with a notice.
* A message that cannot be sent (too long for the cache even alone, not valid UTF-8) prints its
  one-line error and leaves the conversation as it was; the session goes on.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from jaxkv._arguments import integer
from jaxkv.cli import _common

MIN_LENGTH = 16  # ChatSession's smallest cache

COMMANDS = {
    "/reset": "forget the conversation (the system prompt stays)",
    "/system [TEXT]": "set or replace the system prompt; alone, show it",
    "/save FILE": "write the conversation and its settings to FILE as JSON",
    "/load FILE": "replace the conversation with one /save wrote",
    "/stats": "turns, cache use, and the last reply's prefill and speed",
    "/help": "this list",
    "//TEXT": "send /TEXT to the model (a message that starts with a slash)",
}
"""The slash commands with their help, as ``/help`` lists them."""

_NAMES = tuple(usage.split()[0] for usage in COMMANDS if not usage.startswith("//"))

DESCRIPTION = (
    "Talk to the model. Lines starting with / are commands (/help lists them). Ctrl-C stops a "
    "reply; at the prompt it clears the line, twice ends. Ctrl-D or an empty line ends. With "
    "--cache paged the cached pages of earlier turns are reused, so each turn prefills only "
    "itself; --cache contiguous has no prefix reuse: every turn prefills the whole "
    "conversation again (same greedy replies, slower turns)."
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``chat`` subcommand to ``subparsers`` (from ``add_subparsers``); its parser."""
    parser = _common.add_parser(
        subparsers,
        "chat",
        help="an interactive conversation (cache kept across turns)",
        description=DESCRIPTION,
    )
    parser.add_argument("--system", default=None, type=_common.utf8, help="system message")
    parser.add_argument(
        "--max-length",
        type=integer(MIN_LENGTH),
        default=4096,
        help="cache capacity in tokens; the oldest turns are dropped past it",
    )
    _common.add_model_arguments(parser)
    _common.add_cache_arguments(parser, default="paged")
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


class _LineReader:
    """The user's lines: through ``readline`` when stdin and stderr are terminals, else plain
    lines of stdin with the prompt on stderr.

    ``input()`` edits the line with readline only when it reads the terminal and writes to
    one on fd 1, and it writes the prompt and the echo of the typed line there. So while it
    reads, fd 1 points at stderr's terminal: the prompt never enters stdout, even when stdout
    is a pipe or a file.
    """

    def __init__(self) -> None:
        self.stdin = _tolerant_stdin()
        self.readline: Any = None
        try:
            interactive = (
                self.stdin.isatty()
                and sys.stderr.isatty()
                and (self.stdin.fileno(), sys.stdout.fileno()) == (0, 1)
            )
            self._terminal = sys.stderr.fileno()
        except (AttributeError, ValueError, OSError):  # streams replaced, e.g. under a test
            interactive = False
        if interactive:
            try:
                import readline  # noqa: F401  (importing it gives input() line editing)
            except ImportError:
                pass
            else:
                self.readline = readline

    def read(self, prompt: str) -> str:
        """The next line, without its newline.

        Raises:
            EOFError: at the end of input (Ctrl-D).
            KeyboardInterrupt: Ctrl-C while waiting.
        """
        if self.readline is None:
            print(prompt, end="", file=sys.stderr, flush=True)
            line = self.stdin.readline()
            if not line:
                raise EOFError
            return line.rstrip("\n")
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(self._terminal, 1)
        try:
            return input(prompt)
        finally:
            os.dup2(saved, 1)
            os.close(saved)

    def typed(self) -> str:
        """What stood on the line when the last ``read`` was interrupted ('' when unknown)."""
        return "" if self.readline is None else self.readline.get_line_buffer()


def run(args: argparse.Namespace) -> int:
    """Hold the conversation ``args`` (parsed by ``add_parser``'s parser) describe.

    Returns:
        0 when the session ends (Ctrl-D, an empty line, Ctrl-C twice at the prompt).

    Raises:
        the errors of loading the model and of a turn that fails after the engine ran a step
        (``jaxkv.cli.main`` reports them in one line).
    """
    import jaxkv.engine

    model = _common.load(args)
    sampling = jaxkv.engine.SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    session = jaxkv.engine.ChatSession(
        model,
        system=args.system,
        max_length=args.max_length,
        sampling=sampling,
        cache=args.cache,
        kv_quantization=args.kv_quantization,
        drop_old_turns=True,
    )
    session.warmup(_common.progress(args))
    reader = _LineReader()
    _common.note(
        args, "jaxkv chat: type a message (/help for commands); an empty line or Ctrl-D ends."
    )
    interrupted = False  # the previous prompt ended with Ctrl-C
    while True:
        try:
            line = reader.read("> ")
        except EOFError:
            if reader.readline is not None:
                print(file=sys.stderr)  # leave the terminal on a fresh line
            return 0
        except KeyboardInterrupt:
            typed = reader.typed()
            print(file=sys.stderr)
            if interrupted and not typed:
                return 0
            if not typed:
                _common.note(args, "[Ctrl-C again, Ctrl-D or an empty line ends the session]")
            interrupted = True
            continue
        interrupted = False
        if not line.strip():
            return 0
        try:
            if line.startswith("/") and not line.startswith("//"):
                _command(args, session, line)
            else:
                _turn(args, session, line[1:] if line.startswith("//") else line)
        except KeyboardInterrupt:
            # Outside the engine's steps (``send`` holds Ctrl-C back while they run and stops
            # the reply): the conversation and its cache agree, so the session goes on.
            print(file=sys.stderr)


def _turn(args: argparse.Namespace, session: Any, text: str) -> None:
    """Send one message and stream the reply to stdout."""

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    steps_before = session.engine.stats().num_steps
    try:
        session.send(text, max_new_tokens=args.max_new_tokens, on_text=stream)
    except ValueError as error:
        # Refused before anything was prefilled (too long, not UTF-8): the conversation and
        # its cache are untouched, so the session goes on. A failure after the engine ran a
        # step would leave them out of step: that one ends the session.
        if session.engine.stats().num_steps != steps_before:
            raise
        _common.report("chat", error, args.debug, " (message not sent; the conversation is kept)")
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    if session.last_finish_reason == "abort":
        _common.note(args, "[reply stopped]")
    dropped = session.last_dropped_turns
    if dropped:
        turns = "oldest turn" if dropped == 1 else f"{dropped} oldest turns"
        _common.note(args, f"[context full: dropped the {turns}]")
    _common.note(
        args,
        f"[prefilled {session.last_prefill_tokens} new tokens; {len(session.cached_ids)} in cache]",
    )


def _command(args: argparse.Namespace, session: Any, line: str) -> None:
    """Run one slash command; its output goes to stderr."""
    name, _, argument = line.partition(" ")
    argument = argument.strip()
    if name not in _NAMES:
        print(
            f"jaxkv chat: error: unknown command {name!r:.40}; the commands are "
            f"{', '.join(_NAMES)} (start a message with // to send it with a leading /)",
            file=sys.stderr,
        )
        return
    takes = {"/system": "TEXT", "/save": "FILE", "/load": "FILE"}
    if name in ("/save", "/load") and not argument:
        print(f"jaxkv chat: error: {name} needs a file: {name} FILE", file=sys.stderr)
        return
    if name not in takes and argument:
        print(f"jaxkv chat: error: {name} takes no argument, got {argument!r:.40}", file=sys.stderr)
        return
    try:
        if name == "/reset":
            session.reset()
            _common.note(args, "[conversation reset]")
        elif name == "/system" and not argument:
            system = session.system
            print("(no system prompt)" if system is None else system, file=sys.stderr)
        elif name == "/system":
            session.system = argument
            _common.note(args, "[system prompt set]")
        elif name == "/save":
            session.save(argument, settings=_settings(args))
            _common.note(args, f"[saved {_turns(session.turns)} to {argument}]")
        elif name == "/load":
            session.load(argument)
            _common.note(args, f"[loaded {_turns(session.turns)} from {argument}]")
        elif name == "/stats":
            print(_stats(session), file=sys.stderr)
        else:
            width = max(len(usage) for usage in COMMANDS)
            for usage, text in COMMANDS.items():
                print(f"{usage:<{width}}  {text}", file=sys.stderr)
    except (ValueError, TypeError, OSError) as error:
        kept = " (the conversation is kept)" if name == "/load" else ""
        _common.report("chat", error, args.debug, kept)


def _turns(count: int) -> str:
    return "1 turn" if count == 1 else f"{count} turns"


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """What ``/save`` records besides the session's own settings."""
    return {
        "model": args.model or "bundled SmolLM2-135M-Instruct",
        "dtype": args.dtype,
        "max_new_tokens": args.max_new_tokens,
    }


def _stats(session: Any) -> str:
    """The ``/stats`` lines."""
    lines = [
        f"turns: {session.turns}",
        f"cache: {len(session.cached_ids)} of {session.max_length} tokens "
        f"({session.cache_kind}, kv {session.kv_quantization})",
    ]
    if session.last_finish_reason is None:
        lines.append("last reply: none yet")
    else:
        speed = session.last_decode_tokens_per_second
        rate = "" if speed is None else f" at {speed:.1f} tokens/s"
        lines.append(
            f"last reply: prefilled {session.last_prefill_tokens} new tokens, reused "
            f"{session.last_reused_tokens} from the cache; {session.last_reply_tokens} tokens"
            f"{rate} ({session.last_finish_reason})"
        )
    return "\n".join(lines)
