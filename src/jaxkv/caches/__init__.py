"""Concrete caches, one module per family: each defines its metadata, view, cache and runtime
metadata on the base classes and protocols of ``jaxkv.abstracts``.

=====================  =======================================  ==============================
family                 metadata / view / cache                  runtime metadata
=====================  =======================================  ==============================
contiguous, ring       ``TransformerCache*``                    ``TransformerRuntimeMetadata``
paged                  ``PagedCache*``                          ``PagedRuntimeMetadata``
Mamba, Mamba2, linear  ``Mamba*``, ``Mamba2*``,                 ``RecurrentRuntimeMetadata``
                       ``LinearAttention*``, ``RecurrentCache``
hybrid                 ``HybridCache*``                         ``HybridRuntimeMetadata``,
                                                                ``HybridPagedRuntimeMetadata``
=====================  =======================================  ==============================
"""

from jaxkv.caches.hybrid import (
    HybridCache,
    HybridCacheMetadata,
    HybridMetadata,
    HybridPagedMetadata,
    HybridPagedRuntimeMetadata,
    HybridRuntimeMetadata,
    LayerKind,
)
from jaxkv.caches.paged import (
    PagedCache,
    PagedCacheMetadata,
    PagedCacheView,
    PagedRuntimeMetadata,
)
from jaxkv.caches.recurrent import (
    LinearAttentionCacheMetadata,
    LinearAttentionCacheView,
    Mamba2CacheMetadata,
    Mamba2CacheView,
    MambaCacheMetadata,
    MambaCacheView,
    RecurrentCache,
    RecurrentMetadata,
    RecurrentRuntimeMetadata,
    RecurrentStep,
)
from jaxkv.caches.rows import RaggedRuntimeMetadata
from jaxkv.caches.transformer import (
    TransformerCache,
    TransformerCacheMetadata,
    TransformerCacheView,
    TransformerMetadata,
    TransformerRuntimeMetadata,
)

__all__ = [
    "HybridCache",
    "HybridCacheMetadata",
    "HybridMetadata",
    "HybridPagedMetadata",
    "HybridPagedRuntimeMetadata",
    "HybridRuntimeMetadata",
    "LayerKind",
    "LinearAttentionCacheMetadata",
    "LinearAttentionCacheView",
    "Mamba2CacheMetadata",
    "Mamba2CacheView",
    "MambaCacheMetadata",
    "MambaCacheView",
    "PagedCache",
    "PagedCacheMetadata",
    "PagedCacheView",
    "PagedRuntimeMetadata",
    "RaggedRuntimeMetadata",
    "RecurrentCache",
    "RecurrentMetadata",
    "RecurrentRuntimeMetadata",
    "RecurrentStep",
    "TransformerCache",
    "TransformerCacheMetadata",
    "TransformerCacheView",
    "TransformerMetadata",
    "TransformerRuntimeMetadata",
]
