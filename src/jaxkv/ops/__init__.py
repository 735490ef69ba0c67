"""Operations that read caches: attention of new queries over cached keys and values."""

from jaxkv.ops.attention import CachedKV, KVSegment, attention

__all__ = ["CachedKV", "KVSegment", "attention"]
