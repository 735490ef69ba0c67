"""The ``jaxkv`` command: ``generate`` text, ``chat`` interactively, or print model ``info``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DEFAULT_PROMPT = "Write a haiku about caches."


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="a Llama GGUF file (default: bundled SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))


def _add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxkv", description="Run a Llama-family GGUF model through jaxkv caches."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="continue a prompt, streaming the text")
    gen.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    gen.add_argument("--cache", default="contiguous", choices=("contiguous", "paged"))
    gen.add_argument(
        "--kv-quantization",
        default="none",
        choices=("none", "int8", "int4", "fp8"),
        help="storage codec of the KV cache",
    )
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument(
        "--raw", action="store_true", help="do not wrap the prompt in the chat template"
    )
    _add_model_arguments(gen)
    _add_sampling_arguments(gen, 128)

    chat = commands.add_parser("chat", help="an interactive conversation (cache kept across turns)")
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument("--max-length", type=int, default=4096, help="cache capacity in tokens")
    _add_model_arguments(chat)
    _add_sampling_arguments(chat, 256)

    info = commands.add_parser("info", help="model config and KV-cache memory per cache type")
    info.add_argument("--model", default=None)
    info.add_argument("--max-length", type=int, default=None, help="sequence length to size for")
    info.add_argument("--page-size", type=int, default=16)
    return parser


def _generate(args: argparse.Namespace) -> int:
    from jaxkv.engine import Model, generate

    model = Model.load(args.model, dtype=args.dtype)
    prompt = args.prompt
    if not args.raw and model.tokenizer.chat_template:
        prompt = model.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True
        )

    def stream(_row: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = generate(
        model,
        [prompt],
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


def _chat(args: argparse.Namespace) -> int:
    from jaxkv.engine import ChatSession, Model, SamplingParams

    model = Model.load(args.model, dtype=args.dtype)
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    session = ChatSession(model, system=args.system, max_length=args.max_length, sampling=sampling)
    print("jaxkv chat: type a message; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0

        def stream(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        session.send(line.rstrip("\n"), max_new_tokens=args.max_new_tokens, on_text=stream)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"generate": _generate, "chat": _chat, "info": _info}
    try:
        return handlers[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, OverflowError) as error:
        print(f"jaxkv {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
