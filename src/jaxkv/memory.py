"""KV-cache memory of a model per cache type and storage codec, as printed by ``jaxkv info``:
for a Llama-architecture model, contiguous against paged; for Gemma 3, its sliding-window rings
and global layers against a cache that kept every layer global; on a device mesh, what each
device holds (``kv_mesh_table``)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxkv import sharding
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


def sizing_mesh(axes: tuple[tuple[str, int], ...]) -> Mesh:
    """A mesh of ``axes`` (``(("data", 2), ("tensor", 4))``) for sizing only: every position
    holds this machine's first device, so caches can be sized for a mesh larger than the
    machine (``jaxkv.sharding`` reads only the mesh's shape); never run anything on it."""
    names = tuple(name for name, _ in axes)
    shape = tuple(size for _, size in axes)
    devices = np.full(shape, jax.devices()[0], dtype=object)
    return Mesh(devices, names, axis_types=(AxisType.Auto,) * len(names))


def _split_note(metadata: Any, mesh: Mesh) -> list[str]:
    """What of ``metadata``'s cache does not divide over ``mesh`` (held whole on every device
    under ``indivisible="replicate"``), one line each, or nothing."""
    try:
        sharding.per_device_cache_bytes(metadata, mesh)
    except ValueError as err:
        message = str(err).split(": ", 1)[-1].split("; pass", 1)[0]
        return [message]
    return []


def kv_mesh_rows(
    config: LlamaConfig, length: int, num_seqs: int, mesh: Mesh, page_size: int = 16
) -> tuple[list[tuple[str, int, int]], int, int, list[str]]:
    """KV-cache bytes of ``num_seqs`` sequences of ``length`` tokens on ``mesh``, in all and on
    each device, as ``jaxkv.sharding`` lays them out (``DEFAULT_RULES``; a size that does not
    divide is replicated, as ``indivisible="replicate"`` does).

    Returns:
        ``(rows, page_bytes, page_bytes_per_device, notes)``: rows ``(cache type, total bytes,
        bytes per device)`` per storage for a contiguous cache of ``num_seqs`` rows and a paged
        pool holding them all; one page's bytes in all and per device (a pool's default size
        divides the memory budget by the latter); the sizes that do not divide.
    """
    rows = []
    notes: list[str] = []
    pages = ceil_div(length, page_size)
    page_bytes = page_bytes_device = 0
    for label, kwargs in _storages():
        contiguous = TransformerCacheMetadata.create(
            num_seqs, length, config.num_layers, config.num_kv_heads, config.head_dim, **kwargs
        )
        paged = PagedCacheMetadata.create(
            config.num_layers,
            pages * num_seqs,
            page_size,
            config.num_kv_heads,
            config.head_dim,
            num_seqs,
            pages,
            **kwargs,
        )
        for kind, metadata in (("contiguous", contiguous), ("paged", paged)):
            per_device = sharding.per_device_cache_bytes(metadata, mesh, indivisible="replicate")
            rows.append((f"{kind} {label}", metadata.bytes_total(), per_device))
            notes += [note for note in _split_note(metadata, mesh) if note not in notes]
        if label == "float32":
            page_bytes = paged.bytes_per_page()
            page_bytes_device = ceil_div(
                sharding.per_device_cache_bytes(paged, mesh, indivisible="replicate"),
                paged.num_pages,
            )
    return rows, page_bytes, page_bytes_device, notes


def kv_mesh_table(
    config: LlamaConfig, length: int, num_seqs: int, mesh: Mesh, page_size: int = 16
) -> str:
    """A plain-text table of ``kv_mesh_rows``."""
    rows, page_bytes, page_device, notes = kv_mesh_rows(config, length, num_seqs, mesh, page_size)
    lines = [f"  {'cache':<24} {'in all':>16} {'per device':>16} {'share':>7}"]
    for name, total, per_device in rows:
        lines.append(
            f"  {name:<24} {_mib(total):>16} {_mib(per_device):>16} {per_device / total:>7.3f}"
        )
    lines.append(
        f"  one float32 page: {page_bytes:,} bytes in all, {page_device:,} per device (the "
        f"default pool divides its memory budget by the latter)"
    )
    for note in notes:
        lines.append(f"  held whole on every device (--mesh-indivisible replicate): {note}")
    return "\n".join(lines)
