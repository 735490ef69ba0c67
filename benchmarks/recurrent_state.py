"""State bytes per sequence of recurrent caches (Mamba, Mamba2, lightning attention) next to the
key/value cache of transformers of the same width, at 1k and 32k tokens.

A recurrent layer keeps a fixed-size state whatever the sequence length; a KV cache grows by
``2 * kv_heads * head_dim`` values per token and layer. Every figure is the size of the arrays
the cache really allocates for one sequence (``jax.eval_shape`` of ``init_cache`` with
``batch_size=1``: shapes only, nothing is allocated), per-row bookkeeping excluded.

Configurations (public model cards):

* Mamba-130m: d_model 768, 24 layers, d_inner 1536, d_state 16, d_conv 4.
* Mamba-370m: d_model 1024, 48 layers, d_inner 2048, d_state 16, d_conv 4.
* Mamba2-370m: d_model 1024, 48 layers, 32 heads x 64, d_state 128, 1 group, d_conv 4.
* Mamba2-2.7b: d_model 2560, 64 layers, 80 heads x 64, d_state 128, 1 group, d_conv 4.
* Lightning-1k: 24 layers of linear attention, 16 heads, key/value dim 64 (d_model 1024).
* KV caches: Pythia-160m-like (d_model 768: 12 layers, 12 heads x 64), Pythia-410m-like
  (d_model 1024: 24 layers, 16 heads x 64), Llama-3.2-1B-like (d_model 2048: 16 layers, 8 KV
  heads x 64), Llama-3-8B-like (d_model 4096: 32 layers, 8 KV heads x 128).

Run: ``python benchmarks/recurrent_state.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkv.caches.recurrent import (
    LinearAttentionCacheMetadata,
    Mamba2CacheMetadata,
    MambaCacheMetadata,
    RecurrentCache,
)
from jaxkv.caches.transformer import TransformerCache, TransformerCacheMetadata

LENGTHS = (1024, 32768)


def _allocated(init, metadata) -> int:
    """Bytes of the float arrays ``init(metadata)`` allocates (lengths/flags excluded)."""
    shapes = jax.eval_shape(lambda: init(metadata))
    return sum(
        leaf.size * leaf.dtype.itemsize
        for leaf in jax.tree_util.tree_leaves(shapes)
        if jnp.issubdtype(leaf.dtype, jnp.floating) or leaf.dtype == jnp.uint16
    )


def _recurrent_rows(dtype):
    models = [
        ("Mamba-130m", 768, MambaCacheMetadata.create(1, 24, 1536, 16, 4, dtype=dtype)),
        ("Mamba-370m", 1024, MambaCacheMetadata.create(1, 48, 2048, 16, 4, dtype=dtype)),
        ("Mamba2-370m", 1024, Mamba2CacheMetadata.create(1, 48, 32, 64, 128, 1, 4, dtype=dtype)),
        ("Mamba2-2.7b", 2560, Mamba2CacheMetadata.create(1, 64, 80, 64, 128, 1, 4, dtype=dtype)),
        ("Lightning-1k", 1024, LinearAttentionCacheMetadata.create(1, 24, 16, 64, dtype=dtype)),
    ]
    for name, width, metadata in models:
        size = _allocated(RecurrentCache.init_cache, metadata)
        assert size == metadata.state_bytes_per_sequence()
        yield name, width, type(metadata).__name__.removesuffix("CacheMetadata"), [size, size]


def _kv_rows(dtype):
    models = [
        ("Pythia-160m-like", 768, 12, 12, 64),
        ("Pythia-410m-like", 1024, 24, 16, 64),
        ("Llama-3.2-1B-like", 2048, 16, 8, 64),
        ("Llama-3-8B-like", 4096, 32, 8, 128),
    ]
    for name, width, layers, kv_heads, head_dim in models:
        sizes = []
        for length in LENGTHS:
            metadata = TransformerCacheMetadata.create(
                1, length, layers, kv_heads, head_dim, dtype=dtype
            )
            sizes.append(_allocated(TransformerCache.init_cache, metadata))
            assert sizes[-1] == length * metadata.bytes_per_token()
        yield name, width, "KV cache", sizes


def _mib(size: int) -> str:
    return f"{size / 2**20:10.2f}"


def main() -> None:
    header = f"{'model':<20} {'d_model':>7} {'cache':<16} {'dtype':<9}"
    header += "".join(f" {f'MiB @ {n // 1024}k':>10}" for n in LENGTHS)
    print("Cache bytes per sequence (all layers), batch of 1")
    print(header)
    print("-" * len(header))
    for dtype in (jnp.float32, jnp.bfloat16):
        rows = list(_recurrent_rows(dtype)) + list(_kv_rows(dtype))
        for name, width, kind, sizes in sorted(
            rows, key=lambda row: (row[1], row[2] == "KV cache")
        ):
            cells = "".join(f" {_mib(size)}" for size in sizes)
            print(f"{name:<20} {width:>7} {kind:<16} {jnp.dtype(dtype).name:<9}{cells}")
        print()
    print("Recurrent states are the same at every length; KV caches grow linearly with it.")


if __name__ == "__main__":
    main()
