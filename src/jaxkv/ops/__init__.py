"""Operations that read caches: attention of new queries over cached keys and values."""

from jaxkv.kv import CachedKV, KVSegment, PagedKV
from jaxkv.ops.attention import attention
from jaxkv.ops.paged_attention import paged_attention

__all__ = ["CachedKV", "KVSegment", "PagedKV", "attention", "paged_attention"]
