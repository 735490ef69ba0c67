"""One vocabulary for every family: the same names for rows, heads, sizes and runtime metadata,
``dtype`` keyword-only, every family exported, the view protocols implemented, and
``validate()`` only validating."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxkv
import jaxkv.caches as caches
from jaxkv.abstracts import AttentionCacheView, RowOperations, StateCacheView


def _every_metadata(dtype=jnp.float32):
    return {
        "contiguous": caches.TransformerCacheMetadata.create(2, 64, 3, 2, 8, dtype=dtype),
        "ring": caches.TransformerCacheMetadata.create(
            2, 64, 3, 2, 8, sliding_window=16, dtype=dtype
        ),
        "paged": caches.PagedCacheMetadata.create(3, 32, 16, 2, 8, 2, 4, dtype=dtype),
        "mamba": caches.MambaCacheMetadata.create(2, 3, 12, dtype=dtype),
        "mamba2": caches.Mamba2CacheMetadata.create(2, 3, 2, 4, dtype=dtype),
        "linear": caches.LinearAttentionCacheMetadata.create(2, 3, 2, 4, dtype=dtype),
        "hybrid": caches.HybridCacheMetadata.create(
            ("attention", "sliding_attention", "mamba"),
            batch_size=2,
            attention=dict(max_length=64, num_kv_heads=2, head_dim=8, dtype=dtype),
            sliding_attention=dict(
                max_length=64, num_kv_heads=2, head_dim=8, sliding_window=16, dtype=dtype
            ),
            mamba=dict(d_inner=12, dtype=dtype),
        ),
    }


def _cache(metadata):
    if isinstance(metadata, caches.HybridCacheMetadata):
        return caches.HybridCache.init_cache(metadata)
    if isinstance(metadata, caches.PagedCacheMetadata):
        return caches.PagedCache.init_cache(metadata)
    if isinstance(metadata, caches.TransformerCacheMetadata):
        return caches.TransformerCache.init_cache(metadata)
    return caches.RecurrentCache.init_cache(metadata)


@pytest.mark.parametrize("name", list(_every_metadata()))
def test_every_metadata_answers_the_size_questions(name):
    metadata = _every_metadata()[name]
    allocated = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(_cache(metadata)))
    assert metadata.bytes_total() == allocated
    per_token = metadata.bytes_per_token()
    if name in ("contiguous", "ring", "paged"):
        assert metadata.bytes_per_sequence(0) == 0
    if name in ("contiguous", "paged"):
        assert metadata.bytes_per_sequence(32) == 32 * per_token
    if name == "paged":
        assert metadata.bytes_per_sequence(17) == 32 * per_token  # two whole pages
    if name == "ring":
        assert metadata.bytes_per_sequence(60) == metadata.bytes_per_sequence(16) == 16 * per_token
    if name in ("mamba", "mamba2", "linear"):
        assert per_token == 0
        assert metadata.bytes_per_sequence(1) == metadata.bytes_per_sequence(10_000) > 0
    if name == "hybrid":
        parts = metadata.kind_metadata().values()
        assert metadata.bytes_per_sequence(60) == sum(m.bytes_per_sequence(60) for m in parts)
        assert metadata.bytes_per_sequence(0) == metadata.mamba.state_bytes_per_sequence()
    with pytest.raises(ValueError, match="length must be >= 0, got -1"):
        metadata.bytes_per_sequence(-1)
    assert metadata.batch_size == 2


def test_dtype_is_keyword_only_everywhere():
    creators = [
        caches.TransformerCacheMetadata.create,
        caches.PagedCacheMetadata.create,
        caches.PagedCacheMetadata.from_memory_budget,
        caches.MambaCacheMetadata.create,
        caches.Mamba2CacheMetadata.create,
        caches.LinearAttentionCacheMetadata.create,
    ]
    for create in creators:
        parameter = inspect.signature(create).parameters["dtype"]
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, create.__qualname__
    with pytest.raises(TypeError):
        caches.PagedCacheMetadata.create(1, 8, 4, 1, 4, 1, 2, jnp.bfloat16)


def test_one_head_vocabulary_and_one_name_for_rows():
    contiguous = caches.TransformerCacheMetadata.create(2, 8, 1, num_kv_heads=3, head_dim=8)
    paged = caches.PagedCacheMetadata.create(1, 8, 4, num_kv_heads=3, head_dim=8, batch_size=2,
                                             max_pages_per_seq=2)  # fmt: skip
    for metadata in (contiguous, paged):
        assert (metadata.num_kv_heads, metadata.head_dim, metadata.value_dim) == (3, 8, 8)
        assert metadata.batch_size == 2
        assert (metadata.key_heads, metadata.key_dim) == (3, 8)  # the former names, read-only
    assert paged.max_num_seqs == 2
    assert caches.PagedCacheMetadata.create(1, 8, 4, 3, 8, max_num_seqs=2, max_pages_per_seq=2) == (
        paged
    )
    with pytest.raises(ValueError, match="batch_size=2 conflicts with max_num_seqs=3"):
        caches.PagedCacheMetadata.create(1, 8, 4, 3, 8, 2, 2, max_num_seqs=3)
    legacy = contiguous.to_dict()
    legacy["key_heads"], legacy["key_dim"] = legacy.pop("num_kv_heads"), legacy.pop("head_dim")
    assert caches.TransformerCacheMetadata.from_dict(legacy) == contiguous


def test_runtime_metadata_are_named_runtime_metadata_with_the_old_names_as_aliases():
    assert caches.TransformerMetadata is caches.TransformerRuntimeMetadata
    assert caches.RecurrentMetadata is caches.RecurrentRuntimeMetadata
    assert caches.HybridMetadata is caches.HybridRuntimeMetadata
    assert caches.HybridPagedMetadata is caches.HybridPagedRuntimeMetadata
    for name in caches.__all__:
        if name.endswith("RuntimeMetadata"):
            assert issubclass(getattr(caches, name), jaxkv.BaseRunTimeMetadata)


def test_every_family_is_exported_and_speaks_the_protocols():
    attention_views = (caches.TransformerCacheView, caches.PagedCacheView)
    state_views = (caches.MambaCacheView, caches.Mamba2CacheView, caches.LinearAttentionCacheView)
    for view in attention_views:
        assert issubclass(view, AttentionCacheView) and issubclass(view, RowOperations)
    for view in state_views:
        assert issubclass(view, StateCacheView) and issubclass(view, RowOperations)
    for cache in (caches.TransformerCache, caches.PagedCache, caches.RecurrentCache):
        assert issubclass(cache, RowOperations)
    assert issubclass(caches.HybridCache, RowOperations)
    for metadata in _every_metadata().values():
        assert type(metadata).__name__ in caches.__all__


def test_the_package_lists_model_generate_and_chat():
    for name in ("Model", "generate", "ChatSession"):
        assert name in jaxkv.__all__
        assert getattr(jaxkv, name) is getattr(jaxkv.engine, name)


def test_validate_only_validates_and_create_fills_the_defaults():
    fields = dict(batch_size=1, max_length=8, num_layers=1, num_kv_heads=1, head_dim=8)
    with pytest.raises(ValueError, match="needs quantization_group_size"):
        caches.TransformerCacheMetadata(
            **fields, value_dim=8, value_heads=1, kv_quantization="int4"
        )
    with pytest.raises(TypeError, match="dtype must be a numpy dtype"):
        caches.TransformerCacheMetadata(**fields, value_dim=8, value_heads=1, dtype=jnp.bfloat16)
    created = caches.TransformerCacheMetadata.create(**fields, kv_quantization="int4")
    assert created.quantization_group_size == 8 and created.value_heads == 1
    # replace and from_dict go through the same defaults as create.
    assert created.replace(dtype=jnp.bfloat16).dtype == np.dtype(jnp.bfloat16)
    plain = caches.TransformerCacheMetadata.create(**fields)
    assert plain.replace(kv_quantization="int4").quantization_group_size == 8
