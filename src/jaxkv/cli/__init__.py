"""The ``jaxkv`` command: ``generate`` text, ``chat`` interactively, print model ``info``,
measure ``perplexity``, ``serve`` an OpenAI-compatible HTTP API, or ``bench`` a serving
workload. Each subcommand is a
module with ``add_parser(subparsers)`` and ``run(args)``; ``_common`` holds what they share.

Every failure prints one line, ``jaxkv <command>: error: <message>``, on stderr, and no
traceback (``--debug`` prints the traceback instead):

* usage errors (an unknown option, ``--page-size 0``, ``--top-p 2``, a prompt that is not valid
  UTF-8 ...) are caught while parsing, before any model is loaded, and exit with status 2;
* a ``--mesh`` that does not match the devices is a usage error too (status 2), found once JAX
  counts the devices, still before any model is loaded;
* runtime errors (an unreadable model, a prompt too long for the context, a missing optional
  package ...) exit with status 1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jaxkv._arguments import UsageError
from jaxkv.cli import _common
from jaxkv.cli import chat as _chat
from jaxkv.cli import generate as _generate
from jaxkv.cli import info as _info
from jaxkv.cli import perplexity as _perplexity

DEFAULT_PROMPT = _generate.DEFAULT_PROMPT
_MODEL_EXTRA = _common.MODEL_EXTRA


def _parser() -> _common.Parser:
    parser = _common.Parser(
        prog="jaxkv", description="Run a Llama-family GGUF model through jaxkv caches."
    )
    from jaxkv import __version__

    parser.add_argument("--version", action="version", version=f"jaxkv {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _generate.add_parser(commands)
    _chat.add_parser(commands)
    _info.add_parser(commands)
    _perplexity.add_parser(commands)

    from jaxkv.bench import cli as bench_cli
    from jaxkv.serve import cli as serve_cli

    serve_cli.add_parser(commands)  # each adds its own --debug
    bench_cli.add_parser(commands)
    return parser


def _serve(args) -> int:
    from jaxkv.serve import cli as serve_cli

    return serve_cli.run(args)


def _bench(args) -> int:
    from jaxkv.bench import cli as bench_cli

    return bench_cli.run(args)


_HANDLERS = {
    "generate": _generate.run,
    "chat": _chat.run,
    "info": _info.run,
    "perplexity": _perplexity.run,
    "serve": _serve,
    "bench": _bench,
}
_USAGE_CHECKS = {
    "chat": _chat.usage_error,
    "generate": _generate.usage_error,
    "perplexity": _perplexity.usage_error,
}


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
        return exit_.code if isinstance(exit_.code, int) else _common.EXIT_USAGE
    check = _USAGE_CHECKS.get(args.command)
    combination = None if check is None else check(args)
    if combination is not None:
        print(f"jaxkv {args.command}: error: {combination}", file=sys.stderr)
        return _common.EXIT_USAGE
    try:
        return _HANDLERS[args.command](args)
    except UsageError as error:
        print(f"jaxkv {args.command}: error: {error}", file=sys.stderr)
        return _common.EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\njaxkv {args.command}: interrupted", file=sys.stderr)
        return _common.EXIT_INTERRUPTED
    except Exception as error:
        _common.report(args.command, error, args.debug)
        return _common.EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
