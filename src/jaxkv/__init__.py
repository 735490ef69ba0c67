"""jaxkv: key/value and recurrent-state caches for LLM inference in JAX.

The public contract is the four abstractions (``BaseCacheMetadata``, ``BaseRunTimeMetadata``,
``BaseCacheView``, ``BaseCache``), the protocols every family speaks (``AttentionCacheView``,
``StateCacheView``, ``RowOperations``) and the PyTree helpers ``pytree_dataclass``/``static_field``;
concrete caches live in ``jaxkv.caches``, the operations that read them in ``jaxkv.ops``, the host
page bookkeeping in ``jaxkv.pages``. ``Model``, ``generate`` and ``ChatSession`` (text generation
with a real checkpoint) load on first use, since they need the ``model`` extra.
"""

from jaxkv.abstracts import (
    AttentionCacheView,
    BaseCache,
    BaseCacheMetadata,
    BaseCacheView,
    BaseRunTimeMetadata,
    RowOperations,
    Serializable,
    StateCacheView,
    pytree_dataclass,
    static_field,
)
from jaxkv.errors import CacheOverflowError, UnsupportedOperationError

__version__ = "0.1.0"

_LAZY = {"generate": "jaxkv.engine", "Model": "jaxkv.engine", "ChatSession": "jaxkv.engine"}


def __getattr__(name: str):
    # The engine needs the model extras (gguf, tokenizers); load it only when asked for.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxkv' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AttentionCacheView",
    "BaseCache",
    "BaseCacheMetadata",
    "BaseCacheView",
    "BaseRunTimeMetadata",
    "CacheOverflowError",
    "ChatSession",
    "Model",
    "RowOperations",
    "Serializable",
    "StateCacheView",
    "UnsupportedOperationError",
    "generate",
    "pytree_dataclass",
    "static_field",
]
