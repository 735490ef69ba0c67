"""``jaxkv info``: a model's config and the KV-cache memory of a sequence per cache layout; with
``--mesh``, what each device of that mesh holds of a batch of sequences (sized from the shapes
alone: the mesh need not exist on this machine)."""

from __future__ import annotations

import argparse
from typing import Any

from jaxkv._arguments import integer, mesh_spec
from jaxkv.cli import _common


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = _common.add_parser(
        subparsers, "info", help="model config and KV-cache memory per cache type"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="a GGUF file, or 'smollm2' / 'gemma3' for a bundled model (default: smollm2)",
    )
    parser.add_argument(
        "--max-length",
        type=integer(1),
        default=None,
        help="sequence length to size for (default: the model's context)",
    )
    parser.add_argument("--page-size", type=integer(1), default=16, help="tokens per page")
    parser.add_argument(
        "--mesh",
        type=mesh_spec,
        default=None,
        metavar="NAME=SIZE,...",
        help="also size the cache per device of this mesh, e.g. data=2,tensor=4",
    )
    parser.add_argument(
        "--num-seqs",
        type=integer(1, 1024),
        default=8,
        help="with --mesh: sequences (cache rows) to size for",
    )
    _common.add_common_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from jaxkv.engine.model import resolve_model_path
    from jaxkv.io.gguf import config_from_metadata, read_gguf_metadata

    path = resolve_model_path(args.model)
    metadata = read_gguf_metadata(path)
    print(f"model: {path}")
    if metadata.architecture == "gemma3":
        return _gemma3(args, metadata)
    from jaxkv.memory import kv_memory_table

    config = config_from_metadata(metadata)
    for key, value in config.to_dict().items():
        print(f"  {key}: {value}")
    length = args.max_length or config.max_position_embeddings
    print(f"\nKV cache memory (sequence of {length} tokens, page size {args.page_size}):")
    print(kv_memory_table(config, length, args.page_size))
    if args.mesh is not None:
        from jaxkv.memory import kv_mesh_table, sizing_mesh

        mesh = sizing_mesh(args.mesh)
        shape = ", ".join(f"{name}={size}" for name, size in args.mesh)
        print(
            f"\nKV cache memory on a mesh of {shape} ({args.num_seqs} sequences of {length} "
            f"tokens; rows over data, KV heads over tensor, page pools replicated over data):"
        )
        print(kv_mesh_table(config, length, args.num_seqs, mesh, args.page_size))
    return 0


def _gemma3(args: argparse.Namespace, metadata: Any) -> int:
    import dataclasses

    from jaxkv.io.gguf_gemma3 import gemma3_config_from_metadata
    from jaxkv.memory import gemma3_memory_table

    config = gemma3_config_from_metadata(metadata)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name == "layer_kinds":
            sliding = config.num_layers - len(config.global_layers)
            value = f"{sliding} sliding-window, global: {list(config.global_layers)}"
        print(f"  {field.name}: {value}")
    length = args.max_length or config.max_position_embeddings
    print(
        f"\nKV cache memory of one sequence (sliding-window layers on rings of "
        f"{config.sliding_window} slots, against a cache with every layer global):"
    )
    print(gemma3_memory_table(config, length))
    return 0
