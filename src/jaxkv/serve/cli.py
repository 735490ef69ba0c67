"""``jaxkv serve``: the OpenAI-compatible HTTP server on uvicorn.

``add_parser(subparsers)`` adds the subcommand to the ``jaxkv`` parser; ``run(args)`` serves
until interrupted. The engine settings are checked and the port is bound before the model is
loaded and compiled, so a bad option or a busy port fails at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
from typing import Any

from jaxkv._arguments import (
    UsageError,
    add_mesh_arguments,
    add_speculative_arguments,
    integer,
    speculative_usage_error,
)

API_KEY_ENV = "JAXKV_API_KEY"
"""Environment variable read for the API key when ``--api-key`` is not given."""

_MAX_PORT = 65535
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to ``subparsers`` (from ``add_subparsers``); returns it."""
    parser = subparsers.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (completions, chat, /metrics)",
        description="Serve a model over the OpenAI HTTP API, with continuous batching.",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="a GGUF file (Llama or Gemma 3 architecture), or 'smollm2' / 'gemma3' for a "
        "bundled model (default: smollm2, SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--served-model-name",
        default=None,
        help="the name clients pass as `model` (default: the model file's name)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    parser.add_argument("--port", type=integer(0, _MAX_PORT), default=8000)
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer <key>' (default: ${API_KEY_ENV}, if set)",
    )
    engine = parser.add_argument_group("engine")
    engine.add_argument(
        "--cache",
        default="auto",
        choices=("auto", "paged", "contiguous"),
        help="KV cache layout: a shared page pool (prefix caching, preemption), one row per "
        "sequence, or auto: paged when the model runs on pages (Llama), else contiguous",
    )
    engine.add_argument("--max-num-seqs", type=integer(1, 1024), default=8)
    engine.add_argument("--max-num-batched-tokens", type=integer(16, 65536), default=256)
    engine.add_argument("--page-size", type=integer(1, 4096), default=16)
    engine.add_argument(
        "--num-pages", type=integer(1), default=None, help="default: sized to the memory"
    )
    engine.add_argument(
        "--kv-quantization",
        default="none",
        help="KV storage codec of jaxkv.quantization (default: none, full precision)",
    )
    engine.add_argument(
        "--max-model-len", type=integer(2), default=None, help="default: the model's context"
    )
    engine.add_argument(
        "--max-waiting",
        type=integer(1),
        default=1024,
        help="requests that may wait for admission; more get 429",
    )
    add_prefix_dir_arguments(engine)
    add_speculative_arguments(engine)
    add_mesh_arguments(engine)
    parser.add_argument(
        "--debug", action="store_true", help="on an error, print the full traceback"
    )
    return parser


def add_prefix_dir_arguments(group: Any) -> None:
    """``--prefix-cache-dir DIR`` and ``--prefix-cache-dir-max-mb N``."""
    group.add_argument(
        "--prefix-cache-dir",
        default=None,
        metavar="DIR",
        help="spill prefix-cache pages evicted from the pool to DIR and load them back on a "
        "miss; a restart on the same DIR reuses them (paged cache)",
    )
    group.add_argument(
        "--prefix-cache-dir-max-mb",
        type=integer(1),
        default=4096,
        metavar="N",
        help="most MiB of pages kept in --prefix-cache-dir (least recently used removed first)",
    )


def _configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """The engine's CacheConfig and SchedulerConfig (ValueError for a bad combination or an
    unknown codec)."""
    from jaxkv.engine import CacheConfig, SchedulerConfig

    cache = CacheConfig(
        kind="contiguous" if args.cache == "contiguous" else "paged",
        page_size=args.page_size,
        num_pages=args.num_pages,
        kv_quantization=args.kv_quantization,
        prefix_cache_dir=args.prefix_cache_dir,
        prefix_cache_dir_max_bytes=args.prefix_cache_dir_max_mb << 20,
    )
    scheduler = SchedulerConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        max_waiting=args.max_waiting,
    )
    speculation = speculative_usage_error(args)
    if speculation is not None:
        raise ValueError(speculation)
    width = args.num_draft + 1
    if args.speculative != "none" and args.max_num_seqs * width > args.max_num_batched_tokens:
        raise ValueError(
            f"--speculative: a verification step of --max-num-seqs {args.max_num_seqs} rows of "
            f"--num-draft + 1 = {width} tokens exceeds --max-num-batched-tokens "
            f"{args.max_num_batched_tokens}; raise it or draft fewer"
        )
    return cache, scheduler


def _mesh(args: argparse.Namespace, command_mesh: Any) -> Any:
    """The ``--mesh`` mesh, or None. One process only: an engine's steps must run in lockstep
    in every process of a multi-host mesh, and requests reach only the process that serves
    HTTP (forwarding them to the others is not implemented)."""
    mesh = command_mesh(args.mesh)
    if mesh is not None:
        import jax

        if jax.process_count() > 1:
            raise UsageError(
                f"argument --mesh: this is one of {jax.process_count()} processes; jaxkv serve "
                "runs an engine in one process only (requests are not forwarded to the other "
                "processes of a multi-host mesh)"
            )
    return mesh


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (OSError naming both if it cannot bind)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as error:
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def _model_name(path: str) -> str:
    name = os.path.basename(path)
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


def _say(message: str) -> None:
    print(f"jaxkv serve: {message}", file=sys.stderr, flush=True)


def _persist_prefixes(engine: Any) -> None:
    """Write the prefix cache's pages to ``--prefix-cache-dir`` once the engine has stopped."""
    if engine.cache_config.prefix_cache_dir is not None:
        written = engine.persist_prefix_cache()
        _say(f"wrote {written} prefix-cache page(s) to {engine.cache_config.prefix_cache_dir}")


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted (Ctrl-C or SIGTERM); the exit status.

    Raises:
        ValueError: a bad combination of engine settings; OSError: the address cannot be bound
        or the model cannot be read.
    """
    import uvicorn

    from jaxkv.engine import Engine, Model, speculative_config
    from jaxkv.engine.placement import command_mesh
    from jaxkv.serve.app import create_app
    from jaxkv.serve.async_engine import EngineRunner

    cache_config, scheduler_config = _configs(args)
    mesh = _mesh(args, command_mesh)
    listener = _listen(args.host, args.port)
    try:
        if args.host not in _LOOPBACK_HOSTS and not args.api_key:
            _say(f"warning: listening on {args.host} without --api-key; anyone can reach it")
        model = Model.load(args.model, dtype=args.dtype)
        if args.cache == "auto" and not model.supports_paged:
            _say(f"{type(model).__name__} runs on the contiguous cache ({model.paged_refusal})")
            cache_config = dataclasses.replace(cache_config, kind="contiguous")
        speculative = speculative_config(
            args.speculative, args.num_draft, args.draft_model, dtype=args.dtype
        )
        if speculative is not None:
            _say(f"speculative decoding: {args.speculative}, {args.num_draft} drafts per step")
        engine = Engine(
            model,
            cache_config,
            scheduler_config,
            speculative=speculative,
            mesh=mesh,
            indivisible=args.mesh_indivisible,
        )
        if mesh is not None:
            _say(f"on a mesh of {dict(mesh.shape)} ({mesh.size} devices)")
        seconds = engine.warmup(progress=_say)
        _say(f"compiled in {seconds:.1f} s; max_model_len={engine.max_model_len}")
        name = args.served_model_name or _model_name(model.path)
        app = create_app(EngineRunner(engine), model_name=name, api_key=args.api_key)
        port = listener.getsockname()[1]
        _say(f"serving {name!r} on http://{args.host}:{port}/v1 (metrics at /metrics)")
        config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=10)
        uvicorn.Server(config).run(sockets=[listener])
        _persist_prefixes(engine)
    finally:
        listener.close()
    return 0


__all__ = ["API_KEY_ENV", "add_parser", "run"]
