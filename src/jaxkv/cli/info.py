"""``jaxkv info``: a model's config and the KV-cache memory of a sequence per cache layout."""

from __future__ import annotations

import argparse
from typing import Any

from jaxkv._arguments import integer
from jaxkv.cli import _common


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = _common.add_parser(
        subparsers, "info", help="model config and KV-cache memory per cache type"
    )
    parser.add_argument(
        "--model", default=None, help="a GGUF file (default: bundled SmolLM2-135M-Instruct)"
    )
    parser.add_argument(
        "--max-length",
        type=integer(1),
        default=None,
        help="sequence length to size for (default: the model's context)",
    )
    parser.add_argument("--page-size", type=integer(1), default=16, help="tokens per page")
    _common.add_common_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
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
