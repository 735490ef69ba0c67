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

_LAZY = {"generate": "jaxkv.engine", "Model": "jaxkv.engine", "ChatSession": "jaxkv.engine"}


def __getattr__(name: str):
    # The engine needs the model extras (gguf, tokenizers); load it only when asked for.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxkv' has no attribute {name!r}")


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
