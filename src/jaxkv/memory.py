"""KV-cache memory of a model per cache type and storage codec, as printed by ``jaxkv info``:
for a Llama-architecture model, contiguous against paged; for Gemma 3, its sliding-window rings
and global layers against a cache that kept every layer global."""

from __future__ import annotations

import jax.numpy as jnp

from jaxkv._sizes import ceil_div
from jaxkv.caches import PagedCacheMetadata, TransformerCacheMetadata
from jaxkv.models.config import LlamaConfig
from jaxkv.models.gemma3 import GLOBAL, Gemma3Config
from jaxkv.quantization import CODECS


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def _storages() -> list[tuple[str, dict]]:
    """``(label, metadata keyword arguments)`` of every storage ``jaxkv info`` lists: float32 and
    bfloat16 floats, then each quantised codec (its bytes do not depend on the float dtype)."""
    storages = [(jnp.dtype(d).name, {"dtype": d}) for d in (jnp.float32, jnp.bfloat16)]
    storages += [(codec, {"kv_quantization": codec}) for codec in CODECS if codec != "none"]
    return storages


def kv_memory_rows(config: LlamaConfig, length: int, page_size: int = 16) -> list[tuple]:
    """``(cache type, bytes per token, bytes per sequence of length)`` rows, scales included for
    the quantised codecs (int4 with its default group size)."""
    rows = []
    for label, kwargs in _storages():
        metadata = TransformerCacheMetadata.create(
            1, length, config.num_layers, config.num_kv_heads, config.head_dim, **kwargs
        )
        paged = PagedCacheMetadata.create(
            config.num_layers,
            ceil_div(length, page_size),
            page_size,
            config.num_kv_heads,
            config.head_dim,
            1,
            ceil_div(length, page_size),
            **kwargs,
        )
        per_token = metadata.bytes_per_token()
        rows.append((f"contiguous {label}", per_token, metadata.bytes_per_sequence(length)))
        rows.append((f"paged {label}", paged.bytes_per_token(), paged.bytes_per_sequence(length)))
    return rows


def kv_memory_table(config: LlamaConfig, length: int, page_size: int = 16) -> str:
    """A plain-text table of ``kv_memory_rows``, with each row's size relative to bfloat16."""
    rows = kv_memory_rows(config, length, page_size)
    bfloat16 = dict((name, per_token) for name, per_token, _ in rows)["contiguous bfloat16"]
    lines = [f"  {'cache':<24} {'bytes/token':>12} {'per sequence':>16} {'vs bf16':>8}"]
    for name, per_token, per_sequence in rows:
        ratio = f"{per_token / bfloat16:.3f}x"
        lines.append(f"  {name:<24} {per_token:>12,} {_mib(per_sequence):>16} {ratio:>8}")
    return "\n".join(lines)


GEMMA3_LENGTHS = (8192, 32768)
"""Sequence lengths ``jaxkv info`` always sizes a Gemma 3 cache for (besides the one asked)."""


def gemma3_memory_rows(config: Gemma3Config, lengths: tuple[int, ...]) -> list[tuple]:
    """``(storage, [(window bytes, all-global bytes) per length])`` rows: one sequence's cache
    bytes with the sliding layers on rings of ``sliding_window`` slots, against the same stack
    with every layer global, for each storage (scales included for the quantised codecs)."""
    all_global = config.replace(layer_kinds=(GLOBAL,) * config.num_layers)
    rows = []
    for label, kwargs in _storages():
        sizes = []
        for length in lengths:
            ringed = config.cache_metadata(1, length, **kwargs).bytes_per_sequence(length)
            flat = all_global.cache_metadata(1, length, **kwargs).bytes_per_sequence(length)
            sizes.append((ringed, flat))
        rows.append((label, sizes))
    return rows


def gemma3_memory_table(config: Gemma3Config, length: int) -> str:
    """A plain-text table of ``gemma3_memory_rows`` at ``length`` and at ``GEMMA3_LENGTHS``
    (those within the context): one sequence's bytes with rings and with every layer global."""
    context = config.max_position_embeddings
    lengths = tuple(sorted({length, *(n for n in GEMMA3_LENGTHS if n <= context)}))
    rows = gemma3_memory_rows(config, lengths)
    lines = [f"  {'tokens':>8} {'storage':<10} {'with rings':>14} {'all global':>14} {'ratio':>7}"]
    for index, count in enumerate(lengths):
        for label, sizes in rows:
            ringed, flat = sizes[index]
            lines.append(
                f"  {count:>8,} {label:<10} {_mib(ringed):>14} {_mib(flat):>14} "
                f"{ringed / flat:>6.2f}x"
            )
    return "\n".join(lines)
