"""The ``jaxkv`` command: ``generate`` text, ``chat`` interactively, print model ``info``,
``serve`` an OpenAI-compatible HTTP API, or ``bench`` a serving workload.

Every failure prints one line, ``jaxkv <command>: error: <message>``, on stderr, and no
traceback (``--debug`` prints the traceback instead):

* usage errors (an unknown option, ``--page-size 0``, ``--top-p 2``, a prompt that is not valid
  UTF-8 ...) are caught while parsing, before any model is loaded, and exit with status 2;
* runtime errors (an unreadable model, a prompt too long for the context, a missing optional
  package ...) exit with status 1.

In ``chat``, a message that cannot be sent (too long for the cache, not valid UTF-8) prints its
one-line error and leaves the conversation as it was; the session goes on.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from jaxkv._arguments import integer, real

DEFAULT_PROMPT = "Write a haiku about caches."
_MAX_SEED = 2**32 - 1  # JAX's PRNG keys are built from 32-bit seeds
_CHAT_MIN_LENGTH = 16  # ChatSession's smallest cache
_EXIT_USAGE = 2
_EXIT_RUNTIME = 1
_EXIT_INTERRUPTED = 130

# Packages of the `model` extra, with what each one is needed for.
_MODEL_EXTRA = {
    "gguf": "read GGUF checkpoints",
    "tokenizers": "tokenize text",
    "jinja2": "render chat templates",
}
# Errors whose message says everything; any other type is named in the one-line report.
_PLAIN_ERRORS = (ValueError, TypeError, OSError, OverflowError)


class _Parser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose usage errors are one line: ``<prog>: error: <message>``."""

    def error(self, message: str) -> NoReturn:
        self.exit(_EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# -- argument types: each checks its range, so a bad value is a usage error -------------------


def _utf8(text: str) -> str:
    """An argparse ``type=`` for text: refuses what ``sys.argv`` made of non-UTF-8 bytes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise argparse.ArgumentTypeError(
            f"expected valid UTF-8 text, got an undecodable byte at position {err.start} of "
            f"{text!r:.80}"
        ) from None
    return text


def _stop_string(text: str) -> str:
    if not _utf8(text):
        raise argparse.ArgumentTypeError("expected a non-empty stop string, got ''")
    return text


# -- the parser ---------------------------------------------------------------------------------


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug", action="store_true", help="on an error, print the full traceback"
    )


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="a Llama GGUF file (default: bundled SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))


def _add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=integer(1), default=max_new_tokens)
    parser.add_argument("--temperature", type=real(0.0), default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=integer(1), default=None)
    parser.add_argument(
        "--top-p", type=real(0.0, 1.0, include_minimum=False), default=1.0, help="in (0, 1]"
    )
    parser.add_argument("--seed", type=integer(0, _MAX_SEED), default=0)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jaxkv", description="Run a Llama-family GGUF model through jaxkv caches."
    )
    from jaxkv import __version__

    parser.add_argument("--version", action="version", version=f"jaxkv {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="continue a prompt, streaming the text")
    gen.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, type=_utf8)
    gen.add_argument("--cache", default="contiguous", choices=("contiguous", "paged"))
    gen.add_argument(
        "--kv-quantization",
        default="none",
        choices=("none", "int8", "int4", "fp8"),
        help="storage codec of the KV cache",
    )
    gen.add_argument(
        "--stop", action="append", default=[], type=_stop_string, help="stop string (repeatable)"
    )
    gen.add_argument(
        "--raw", action="store_true", help="do not wrap the prompt in the chat template"
    )
    _add_model_arguments(gen)
    _add_sampling_arguments(gen, 128)
    _add_common_arguments(gen)

    chat = commands.add_parser("chat", help="an interactive conversation (cache kept across turns)")
    chat.add_argument("--system", default=None, type=_utf8, help="system message")
    chat.add_argument(
        "--max-length",
        type=integer(_CHAT_MIN_LENGTH),
        default=4096,
        help="cache capacity in tokens",
    )
    _add_model_arguments(chat)
    _add_sampling_arguments(chat, 256)
    _add_common_arguments(chat)

    info = commands.add_parser("info", help="model config and KV-cache memory per cache type")
    info.add_argument("--model", default=None)
    info.add_argument(
        "--max-length",
        type=integer(1),
        default=None,
        help="sequence length to size for",
    )
    info.add_argument("--page-size", type=integer(1), default=16)
    _add_common_arguments(info)

    from jaxkv.bench import cli as bench_cli
    from jaxkv.serve import cli as serve_cli

    serve_cli.add_parser(commands)  # each adds its own --debug
    bench_cli.add_parser(commands)
    return parser


def _combination_error(args: argparse.Namespace) -> str | None:
    """A usage error that involves two arguments, or None."""
    if args.command == "chat" and args.max_new_tokens >= args.max_length:
        return (
            f"argument --max-new-tokens: expected fewer than --max-length={args.max_length} "
            f"tokens (the cache must also hold the conversation), got {args.max_new_tokens}"
        )
    return None


# -- reporting errors ---------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _describe(error: BaseException) -> str:
    """The one-line message for ``error``."""
    if isinstance(error, ImportError):
        package = (error.name or "").partition(".")[0]
        if package in _MODEL_EXTRA:
            return (
                f"the Python package {package!r} is not installed (it is needed to "
                f"{_MODEL_EXTRA[package]}); install the model extra: pip install 'jaxkv[model]'"
            )
    message = _one_line(str(error))
    if isinstance(error, _PLAIN_ERRORS) and message:
        return message
    detail = f": {message}" if message else ""
    return f"{type(error).__name__}{detail} (rerun with --debug for the traceback)"


def _report(command: str, error: BaseException, debug: bool, suffix: str = "") -> None:
    if debug:
        traceback.print_exception(error)
    else:
        print(f"jaxkv {command}: error: {_describe(error)}{suffix}", file=sys.stderr)


# -- the commands -------------------------------------------------------------------------------


def _status(line: str) -> None:
    """A line of progress (loading, compiling) on stderr when it is a terminal; logs and pipes
    get only results and errors."""
    if sys.stderr.isatty():
        print(f"jaxkv: {line}", file=sys.stderr, flush=True)


def _load(args: argparse.Namespace) -> Any:
    from jaxkv.engine import Model

    _status(f"loading {args.model or 'the bundled SmolLM2-135M-Instruct'}")
    return Model.load(args.model, dtype=args.dtype)


def _generate(args: argparse.Namespace) -> int:
    from jaxkv.engine import generate

    model = _load(args)
    prompt = args.prompt
    if not args.raw and model.tokenizer.chat_template:
        # The user's text is encoded as text: it cannot forge the template's special tokens.
        prompt = model.tokenizer.encode_chat([{"role": "user", "content": prompt}])

    def stream(_row: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = generate(
        model,
        [prompt],
        on_progress=_status,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        cache=args.cache,
        on_text=stream,
        kv_quantization=args.kv_quantization,
    )
    sys.stdout.write("\n")
    codec = "" if args.kv_quantization == "none" else f", {args.kv_quantization} KV"
    print(f"[{args.cache} cache{codec}] {result.summary()}", file=sys.stderr)
    return 0


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


def _chat(args: argparse.Namespace) -> int:
    from jaxkv.engine import ChatSession, SamplingParams

    model = _load(args)
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    session = ChatSession(model, system=args.system, max_length=args.max_length, sampling=sampling)
    session.warmup(_status)
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
            _report("chat", error, args.debug, " (message not sent; the conversation is kept)")
            continue
        sys.stdout.write("\n")
        print(
            f"[prefilled {session.last_prefill_tokens} new tokens; "
            f"{len(session.cached_ids)} in cache]",
            file=sys.stderr,
        )


def _info(args: argparse.Namespace) -> int:
    from jaxkv.io.gguf import config_from_metadata, default_model_path, read_gguf_metadata
    from jaxkv.memory import kv_memory_table

    path = default_model_path() if args.model is None else args.model
    config = config_from_metadata(read_gguf_metadata(path))
    print(f"model: {path}")
    for key, value in config.to_dict().items():
        print(f"  {key}: {value}")
    length = args.max_length or config.max_position_embeddings
    print(f"\nKV cache memory (sequence of {length} tokens, page size {args.page_size}):")
    print(kv_memory_table(config, length, args.page_size))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from jaxkv.serve import cli as serve_cli

    return serve_cli.run(args)


def _bench(args: argparse.Namespace) -> int:
    from jaxkv.bench import cli as bench_cli

    return bench_cli.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``jaxkv`` command.

    Args:
      argv: the arguments after the program name; None reads ``sys.argv[1:]``.

    Returns:
      the exit status: 0 on success, 2 for a usage error (nothing was loaded), 1 for a runtime
      error, 130 when interrupted. Errors print one line on stderr (``--debug``: a traceback).

    Raises:
      TypeError: ``argv`` is not a sequence of str.
    """
    if argv is not None and (
        isinstance(argv, str | bytes)
        or not isinstance(argv, Sequence)
        or not all(isinstance(arg, str) for arg in argv)
    ):
        raise TypeError(f"argv must be a sequence of str or None, got {argv!r:.80}")
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # a usage error (status 2) or --help (status 0)
        return exit_.code if isinstance(exit_.code, int) else _EXIT_USAGE
    combination = _combination_error(args)
    if combination is not None:
        print(f"jaxkv {args.command}: error: {combination}", file=sys.stderr)
        return _EXIT_USAGE
    handlers = {
        "generate": _generate,
        "chat": _chat,
        "info": _info,
        "serve": _serve,
        "bench": _bench,
    }
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print(f"\njaxkv {args.command}: interrupted", file=sys.stderr)
        return _EXIT_INTERRUPTED
    except Exception as error:
        _report(args.command, error, args.debug)
        return _EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
