"""How caches hold float keys and values in memory.

XLA's CPU backend has no native 16-bit-float scatter: it widens the whole buffer to float32 and
back, so writing one token into a bfloat16 cache would cost O(capacity). Stored as ``uint16``
words of the same bits, the same scatter is done in place. Every cache therefore keeps 16-bit
floats as unsigned words and bit-casts them back (free) when they are read, block by block.

Quantised caches (``jaxkv.quantization``) keep to the same rule: their codes and float16 scales
are stored as 1- and 2-byte integer words, so their writes are in place too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxkv import quantization
from jaxkv.quantization import KVCodec

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


# Codec-aware forms shared by every cache family. Unquantised storage has no scales (``None``);
# a ``jaxkv.quantization.KVCodec`` stores its words plus float16 scales as ``uint16`` words.


def allocate(
    lead: tuple[int, ...], head_dim: int, dtype: np.dtype, codec: KVCodec | None
) -> tuple[jax.Array, jax.Array | None]:
    """Zeroed storage for ``[*lead, head_dim]`` values: ``(words, scales)``.

    ``words`` is ``[*lead, head_dim]`` in ``storage_dtype(dtype)`` unquantised, else
    ``[*lead, codec.stored_dim(head_dim)]`` in ``codec.word_dtype``; ``scales`` is ``None`` or
    ``[*lead, codec.num_groups(head_dim)]`` uint16.
    """
    if codec is None:
        return jnp.zeros((*lead, head_dim), storage_dtype(dtype)), None
    words = jnp.zeros((*lead, codec.stored_dim(head_dim)), codec.word_dtype)
    return words, jnp.zeros((*lead, codec.num_groups(head_dim)), quantization.SCALE_DTYPE)


def encode_values(
    values: jax.Array, dtype: np.dtype, codec: KVCodec | None
) -> tuple[jax.Array, jax.Array | None]:
    """``values: [..., head_dim]`` (any float) in storage form: ``(words, scales)`` as
    ``allocate`` lays them out (``scales`` is ``None`` unquantised)."""
    if codec is None:
        return encode(values, dtype), None
    return codec.encode(values)


def decode_values(
    words: jax.Array, scales: jax.Array | None, dtype: np.dtype, codec: KVCodec | None
) -> jax.Array:
    """Storage form -> ``[..., head_dim]`` values of ``dtype``. With a codec this dequantises
    everything it is given: for inspection, never on the attention path."""
    if codec is None:
        return decode(words, dtype)
    return codec.decode(words, scales).astype(dtype)
