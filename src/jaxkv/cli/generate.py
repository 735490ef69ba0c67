"""``jaxkv generate``: continue a prompt, streaming the text."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from jaxkv.cli import _common

DEFAULT_PROMPT = "Write a haiku about caches."


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = _common.add_parser(
        subparsers, "generate", help="continue a prompt, streaming the text"
    )
    parser.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, type=_common.utf8)
    _common.add_cache_arguments(parser)
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        type=_common.stop_string,
        help="stop string (repeatable)",
    )
    parser.add_argument(
        "--raw", action="store_true", help="do not wrap the prompt in the chat template"
    )
    _common.add_model_arguments(parser)
    _common.add_sampling_arguments(parser, 128)
    _common.add_common_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from jaxkv.engine import generate

    model = _common.load(args)
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
        on_progress=_common.progress(args),
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
    _common.note(args, f"[{args.cache} cache{codec}] {result.summary()}")
    return 0
