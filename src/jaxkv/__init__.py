"""jaxkv: key/value and recurrent-state caches for LLM inference in JAX.

The public contract is the four abstractions (``BaseCacheMetadata``, ``BaseRunTimeMetadata``,
``BaseCacheView``, ``BaseCache``) and the PyTree helpers ``pytree_dataclass``/``static_field``;
concrete caches live in ``jaxkv.caches``, the operations that read them in ``jaxkv.ops``.
"""

from jaxkv.abstracts import (
    BaseCache,
    BaseCacheMetadata,
    BaseCacheView,
    BaseRunTimeMetadata,
    Serializable,
    pytree_dataclass,
    static_field,
)
from jaxkv.errors import CacheOverflowError

__version__ = "0.1.0"

__all__ = [
    "BaseCache",
    "BaseCacheMetadata",
    "BaseCacheView",
    "BaseRunTimeMetadata",
    "CacheOverflowError",
    "Serializable",
    "pytree_dataclass",
    "static_field",
]
