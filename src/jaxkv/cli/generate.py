"""``jaxkv generate``: continue one prompt or a batch of them.

Prompts come from the arguments (each one a prompt), or from ``--file FILE`` (``-`` is stdin):
the whole file is one prompt, or with ``--batch`` each non-empty line is one. One prompt
streams its text as it is generated; several are generated together (``--parallel`` at a
time) and printed in order. ``--json`` prints one JSON object per prompt instead. A timing
summary in the manner of llama.cpp's (load, compile, prompt and decode rates, time to first
token) follows on stderr unless ``--quiet``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

from jaxkv._arguments import (
    add_mesh_arguments,
    add_process_arguments,
    add_speculative_arguments,
    integer,
    process_usage_error,
    speculative_usage_error,
)
from jaxkv.cli import _common

DEFAULT_PROMPT = "Write a haiku about caches."


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = _common.add_parser(
        subparsers,
        "generate",
        help="continue a prompt (or a batch of prompts), streaming the text",
        description=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "prompt",
        nargs="*",
        type=_common.utf8,
        help=f"prompts, each one generated for (default: {DEFAULT_PROMPT!r})",
    )
    parser.add_argument(
        "--file",
        default=None,
        help="read the prompt from this UTF-8 file ('-': standard input)",
    )
    parser.add_argument(
        "--batch", action="store_true", help="with --file: each non-empty line is a prompt"
    )
    parser.add_argument(
        "--parallel",
        type=integer(1, 256),
        default=8,
        help="most prompts generated at once; the others wait for a free row",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per prompt (text, token ids, finish reason, timings)",
    )
    _common.add_cache_arguments(parser)
    add_prompt_cache_argument(parser)
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
    add_speculative_arguments(parser)
    add_mesh_arguments(parser)
    add_process_arguments(parser)
    _common.add_sampling_arguments(parser, 128)
    _common.add_common_arguments(parser)
    return parser


def add_prompt_cache_argument(parser: argparse.ArgumentParser) -> None:
    """``--prompt-cache FILE``."""
    parser.add_argument(
        "--prompt-cache",
        default=None,
        metavar="FILE",
        help="reuse the longest prefix of the prompt saved in FILE (if FILE was saved for this "
        "model, tokenizer, --cache and --kv-quantization) and save the prompt's cache to FILE "
        "afterwards",
    )


def usage_error(args: argparse.Namespace) -> str | None:
    """A usage error that involves two arguments, or None."""
    if args.file is not None and args.prompt:
        return "argument --file: expected either prompt arguments or --file, not both"
    if args.batch and args.file is None:
        return "argument --batch: expected --file FILE (or --file - for standard input)"
    return speculative_usage_error(args) or process_usage_error(args)


def _read(path: str) -> str:
    """The UTF-8 text of ``path`` (``-``: standard input)."""
    if path == "-":
        data = sys.stdin.buffer.read()
        name = "standard input"
    else:
        with open(path, "rb") as file:
            data = file.read()
        name = repr(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"--file {name}: expected UTF-8 text, got the byte 0x{data[err.start]:02X} at "
            f"offset {err.start}"
        ) from None


def prompts_of(args: argparse.Namespace) -> list[str]:
    """The prompts the arguments name.

    Raises:
        OSError: ``--file`` cannot be read.
        ValueError: it is not UTF-8, or holds no prompt.
    """
    if args.file is None:
        return list(args.prompt) or [DEFAULT_PROMPT]
    text = _read(args.file)
    if args.batch:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        prompts = [text.strip()] if text.strip() else []
    if not prompts:
        source = "standard input" if args.file == "-" else repr(args.file)
        raise ValueError(f"--file {source}: expected at least one prompt, got no text")
    return prompts


def run(args: argparse.Namespace) -> int:
    from jaxkv.engine import PromptCacheWarning, speculative_config
    from jaxkv.engine.placement import command_mesh, initialize_processes

    prompts = prompts_of(args)
    if args.prompt_cache is not None and len(prompts) != 1:
        raise ValueError(
            f"--prompt-cache: the prompt cache holds one prompt, got {len(prompts)} prompts"
        )
    if args.coordinator is not None:  # before anything touches a device
        initialize_processes(args.coordinator, args.num_processes, args.process_id)
    mesh = command_mesh(args.mesh)  # a mesh that does not fit the devices: before loading
    model = _common.load(args)
    speculative = speculative_config(
        args.speculative, args.num_draft, args.draft_model, dtype=args.dtype
    )
    inputs: list[Any] = prompts
    if not args.raw and model.tokenizer.chat_template:
        # The user's text is encoded as text: it cannot forge the template's special tokens.
        inputs = [model.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts]
    streaming = len(prompts) == 1 and not args.json

    def stream(_row: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    with warnings.catch_warnings():
        warnings.simplefilter("always", PromptCacheWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            if issubclass(category, PromptCacheWarning):  # a plain line, as it happens
                print(f"jaxkv generate: warning: {message}", file=sys.stderr, flush=True)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        result = _generate(args, model, inputs, stream if streaming else None, speculative, mesh)
    if streaming:
        sys.stdout.write("\n")
    elif args.json:
        for index, (prompt, generation) in enumerate(zip(prompts, result.generations, strict=True)):
            print(json.dumps(_record(index, prompt, generation), ensure_ascii=False))
    else:
        for index, (prompt, generation) in enumerate(zip(prompts, result.generations, strict=True)):
            print(f"### {index + 1}/{len(prompts)}: {_one_line(prompt, 60)}")
            print(generation.text)
    sys.stdout.flush()
    codec = "" if args.kv_quantization == "none" else f", {args.kv_quantization} KV"
    where = "" if mesh is None else f", mesh {_mesh_name(mesh)}"
    plural = "s" if len(prompts) > 1 else ""
    _common.note(args, f"jaxkv: {args.cache} cache{codec}{where}, {len(prompts)} prompt{plural}")
    if args.prompt_cache is not None:
        _common.note(
            args,
            f"jaxkv: prompt cache {args.prompt_cache}: {result.cached_tokens} of "
            f"{result.prompt_tokens} prompt tokens loaded, "
            f"{1000.0 * result.prompt_cache_seconds:.2f} ms loading and saving",
        )
    for line in timing_summary(result, getattr(args, "load_seconds", None)):
        _common.note(args, line)
    if speculative is not None:
        _common.note(args, speculation_summary(args.speculative, result.engine_stats))
    return 0


def _mesh_name(mesh: Any) -> str:
    return "x".join(f"{name}={size}" for name, size in mesh.shape.items())


def speculation_summary(method: str, stats: Any) -> str:
    """One line on how well the drafts did."""
    drafts = stats.num_draft_tokens
    share = f" ({100.0 * stats.draft_acceptance_rate:.0f}%)" if drafts else ""
    return (
        f"jaxkv:  speculative {method} = {stats.num_accepted_tokens} of {drafts} drafts "
        f"accepted{share} in {stats.num_verify_steps} verification steps, "
        f"{stats.tokens_per_verification:.2f} tokens per sequence per verification"
    )


def _generate(
    args: argparse.Namespace,
    model: Any,
    inputs: list[Any],
    on_text: Any,
    speculative: Any,
    mesh: Any,
) -> Any:
    from jaxkv.engine import generate

    return generate(
        model,
        inputs,
        on_progress=_common.progress(args),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        cache=args.cache,
        on_text=on_text,
        kv_quantization=args.kv_quantization,
        max_batch=args.parallel,
        warmup=False,  # the first token before the decode step is compiled
        prompt_cache=args.prompt_cache,
        speculative=speculative,
        mesh=mesh,
        indivisible=args.mesh_indivisible,
    )


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _record(index: int, prompt: str, generation: Any) -> dict[str, Any]:
    return {
        "index": index,
        "prompt": prompt,
        "text": generation.text,
        "prompt_tokens": len(generation.prompt_ids),
        "token_ids": generation.token_ids,
        "finish_reason": generation.finish_reason,
        "time_to_first_token_s": _rounded(generation.time_to_first_token),
        "total_s": _rounded(generation.seconds),
    }


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 6)


def timing_summary(result: Any, load_seconds: float | None) -> list[str]:
    """llama.cpp-style timing lines for a ``GenerationResult``."""

    def rate(milliseconds: float, count: int, unit: str) -> str:
        per = milliseconds / count if count else 0.0
        per_second = 1000.0 * count / milliseconds if milliseconds > 0 else 0.0
        return (
            f"{milliseconds:10.2f} ms / {count:5d} {unit:<6} ({per:8.2f} ms per token, "
            f"{per_second:8.2f} tokens per second)"
        )

    prefill_ms = 1000.0 * result.prefill_seconds
    decode_ms = 1000.0 * result.decode_seconds
    prefill_tokens = (
        result.prompt_tokens if result.prefill_tokens is None else result.prefill_tokens
    )
    produced = round(result.decode_tokens_per_second * result.decode_seconds)
    lines = []
    if load_seconds is not None:
        lines.append(f"jaxkv:        load time = {1000.0 * load_seconds:10.2f} ms")
    lines += [
        f"jaxkv:     compile time = {1000.0 * result.compile_seconds:10.2f} ms",
        f"jaxkv: prompt eval time = {rate(prefill_ms, prefill_tokens, 'tokens')}",
        f"jaxkv:        eval time = {rate(decode_ms, produced, 'tokens')} "
        f"in {result.decode_steps} steps",
        f"jaxkv: time to first token = {1000.0 * result.time_to_first_token:10.2f} ms",
        f"jaxkv:       total time = {1000.0 * result.total_seconds:10.2f} ms / "
        f"{result.generated_tokens:5d} tokens",
    ]
    return lines
