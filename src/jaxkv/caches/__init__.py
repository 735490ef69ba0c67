"""Concrete caches, one module per family: each defines its metadata, view, cache and runtime
metadata on the base classes of ``jaxkv.abstracts``."""

from jaxkv.caches.paged import (
    PagedCache,
    PagedCacheMetadata,
    PagedCacheView,
    PagedRuntimeMetadata,
)
from jaxkv.caches.transformer import (
    TransformerCache,
    TransformerCacheMetadata,
    TransformerCacheView,
    TransformerMetadata,
)

__all__ = [
    "PagedCache",
    "PagedCacheMetadata",
    "PagedCacheView",
    "PagedRuntimeMetadata",
    "TransformerCache",
    "TransformerCacheMetadata",
    "TransformerCacheView",
    "TransformerMetadata",
]
