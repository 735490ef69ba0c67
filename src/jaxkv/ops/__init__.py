"""Operations that read caches: attention of new queries over cached keys and values."""

from jaxkv.ops.attention import CachedKV, KVSegment, attention
from jaxkv.ops.paged_attention import PagedKV, paged_attention

__all__ = ["CachedKV", "KVSegment", "PagedKV", "attention", "paged_attention"]
