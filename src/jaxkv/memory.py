"""KV-cache memory of a model for each cache type, as printed by ``jaxkv info``."""

from __future__ import annotations

import jax.numpy as jnp

from jaxkv.caches import TransformerCacheMetadata
from jaxkv.models.config import LlamaConfig


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def kv_memory_rows(config: LlamaConfig, length: int, page_size: int = 16) -> list[tuple]:
    """``(cache type, bytes per token, bytes per sequence of length)`` rows."""
    rows = []
    for dtype in (jnp.float32, jnp.bfloat16):
        metadata = TransformerCacheMetadata.create(
            1, length, config.num_layers, config.num_kv_heads, config.head_dim, dtype=dtype
        )
        per_token = metadata.bytes_per_token()
        name = jnp.dtype(dtype).name
        rows.append((f"contiguous {name}", per_token, per_token * length))
        pages = -(-length // page_size)
        rows.append((f"paged {name}", per_token, pages * page_size * per_token))
    return rows


def kv_memory_table(config: LlamaConfig, length: int, page_size: int = 16) -> str:
    """A plain-text table of ``kv_memory_rows``."""
    lines = [f"  {'cache':<24} {'bytes/token':>12} {'per sequence':>16}"]
    for name, per_token, per_sequence in kv_memory_rows(config, length, page_size):
        lines.append(f"  {name:<24} {per_token:>12,} {_mib(per_sequence):>16}")
    return "\n".join(lines)
