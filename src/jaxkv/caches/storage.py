"""How caches hold float keys and values in memory.

XLA's CPU backend has no native 16-bit-float scatter: it widens the whole buffer to float32 and
back, so writing one token into a bfloat16 cache would cost O(capacity). Stored as ``uint16``
words of the same bits, the same scatter is done in place. Every cache therefore keeps 16-bit
floats as unsigned words and bit-casts them back (free) when they are read, block by block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_WORDS = {2: np.dtype(np.uint16), 1: np.dtype(np.uint8)}


def storage_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a cache allocates for values of ``dtype``."""
    dtype = np.dtype(dtype)
    return _WORDS.get(dtype.itemsize, dtype) if dtype.itemsize < 4 else dtype


def stored_as(dtype: np.dtype) -> np.dtype | None:
    """``dtype`` when it is held as raw words (for ``KVSegment.stored_as``), else ``None``."""
    dtype = np.dtype(dtype)
    return dtype if storage_dtype(dtype) != dtype else None


def encode(values: jax.Array, dtype: np.dtype) -> jax.Array:
    """Cast ``values`` to ``dtype`` and return them in storage form."""
    values = values.astype(dtype)
    store = storage_dtype(dtype)
    return values if store == np.dtype(dtype) else lax.bitcast_convert_type(values, store)


def decode(stored: jax.Array, dtype: np.dtype) -> jax.Array:
    """Storage form -> values of ``dtype`` (a bit cast; no arithmetic)."""
    if stored.dtype == np.dtype(dtype):
        return stored
    return lax.bitcast_convert_type(stored, jnp.dtype(dtype))
