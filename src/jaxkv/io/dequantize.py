"""GGUF tensors decoded on the device: the stored bytes go to the device as they are (a 4-bit
tensor is an eighth of its float32 size) and one compiled kernel per type and shape unpacks
them, in the same arithmetic as ``gguf.quants.dequantize`` (the results are bit-identical), so
loading a checkpoint costs a copy of its file rather than NumPy passes over every float.

``dequantize(raw, ggml_type, shape)`` handles the float types (F32, F16, BF16) and the 32-value
block quantisations (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0); ``supported(ggml_type)`` says which. Other
types are left to ``gguf.quants`` by the caller.

Block layouts (little-endian; ``d``, ``m`` are float16 scale and minimum, 32 values a block):

* Q8_0: ``d``, 32 int8 ``q``; value ``d * q``.
* Q4_0: ``d``, 16 bytes of nibbles (value ``j`` in the low nibble of byte ``j``, value
  ``j + 16`` in its high nibble); value ``d * (q - 8)``.
* Q4_1: ``d``, ``m``, nibbles as Q4_0; value ``d * q + m``.
* Q5_0: ``d``, a uint32 of fifth bits (bit ``j`` for value ``j``), nibbles as Q4_0; value
  ``d * (q - 16)``.
* Q5_1: ``d``, ``m``, fifth bits and nibbles as Q5_0; value ``d * q + m``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, BF16 = 0, 1, 2, 3, 6, 7, 8, 30
_BLOCK = 32
# Bytes of one 32-value block, per block type.
_BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q5_0: 22, Q5_1: 24, Q8_0: 34}
_FLOAT_BYTES = {F32: 4, F16: 2, BF16: 2}


def supported(ggml_type: int) -> bool:
    """Whether ``dequantize`` decodes this GGML type on the device."""
    return ggml_type in _BLOCK_BYTES or ggml_type in _FLOAT_BYTES


def nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    """Stored bytes of a tensor of this (supported) type and shape."""
    count = math.prod(shape)
    if ggml_type in _FLOAT_BYTES:
        return count * _FLOAT_BYTES[ggml_type]
    return count // _BLOCK * _BLOCK_BYTES[ggml_type]


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> jax.Array:
    """The float32 values of one stored tensor, decoded on the default device.

    Args:
        raw: the tensor's bytes, uint8, ``nbytes(ggml_type, shape)`` of them (a view of the
            file is fine: they are copied to the device once).
        ggml_type: a type ``supported`` names.
        shape: the tensor's shape in NumPy order (the last axis varies fastest).

    Returns:
        float32 ``shape``.

    Raises:
        ValueError: an unsupported type, a shape whose last axis does not hold whole blocks,
            or ``raw`` of the wrong size or dtype.
    """
    shape = tuple(int(n) for n in shape)
    if not supported(ggml_type):
        raise ValueError(f"dequantize: GGML type {ggml_type} has no device kernel")
    if ggml_type in _BLOCK_BYTES and (not shape or shape[-1] % _BLOCK):
        raise ValueError(
            f"dequantize: shape {shape} must end in a multiple of {_BLOCK} for type {ggml_type}"
        )
    expected = nbytes(ggml_type, shape)
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.size != expected:
        raise ValueError(
            f"dequantize: raw must be {expected} uint8 bytes for type {ggml_type} and shape "
            f"{shape}, got {getattr(raw, 'dtype', type(raw).__name__)} of size "
            f"{getattr(raw, 'size', '?')}"
        )
    if ggml_type in _FLOAT_BYTES:
        width = _FLOAT_BYTES[ggml_type]
        words = raw.reshape(-1, width)
    else:
        words = raw.reshape(-1, _BLOCK_BYTES[ggml_type])
    return _kernel(ggml_type, shape)(jnp.asarray(words))


def _half(low: jax.Array, high: jax.Array) -> jax.Array:
    """Two bytes (little-endian) -> their float16 value as float32."""
    bits = low.astype(jnp.uint16) | (high.astype(jnp.uint16) << 8)
    return jax.lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.float32)


def _nibbles(packed: jax.Array) -> jax.Array:
    """``[blocks, 16]`` bytes -> ``[blocks, 32]`` values: low nibbles, then high nibbles."""
    return jnp.concatenate([packed & 0x0F, packed >> 4], axis=1)


def _fifth_bits(qh: jax.Array) -> jax.Array:
    """``[blocks, 4]`` bytes of a little-endian uint32 -> ``[blocks, 32]`` bits shifted to 16."""
    word = (
        qh[:, 0].astype(jnp.uint32)
        | (qh[:, 1].astype(jnp.uint32) << 8)
        | (qh[:, 2].astype(jnp.uint32) << 16)
        | (qh[:, 3].astype(jnp.uint32) << 24)
    )
    bits = (word[:, None] >> jnp.arange(_BLOCK, dtype=jnp.uint32)) & 1
    return (bits << 4).astype(jnp.uint8)


@functools.cache
def _kernel(ggml_type: int, shape: tuple[int, ...]):
    def decode(words: jax.Array) -> jax.Array:
        if ggml_type == F32:
            bits = sum(words[:, i].astype(jnp.uint32) << (8 * i) for i in range(4))
            values = jax.lax.bitcast_convert_type(bits, jnp.float32)
        elif ggml_type == F16:
            values = _half(words[:, 0], words[:, 1])
        elif ggml_type == BF16:
            bits = (words[:, 0].astype(jnp.uint32) << 16) | (words[:, 1].astype(jnp.uint32) << 24)
            values = jax.lax.bitcast_convert_type(bits, jnp.float32)
        elif ggml_type == Q8_0:
            d = _half(words[:, 0], words[:, 1])
            q = jax.lax.bitcast_convert_type(words[:, 2:], jnp.int8).astype(jnp.float32)
            values = q * d[:, None]
        elif ggml_type == Q4_0:
            d = _half(words[:, 0], words[:, 1])
            q = _nibbles(words[:, 2:]).astype(jnp.int8) - jnp.int8(8)
            values = d[:, None] * q.astype(jnp.float32)
        elif ggml_type == Q4_1:
            d, m = _half(words[:, 0], words[:, 1]), _half(words[:, 2], words[:, 3])
            q = _nibbles(words[:, 4:]).astype(jnp.float32)
            values = d[:, None] * q + m[:, None]
        elif ggml_type == Q5_0:
            d = _half(words[:, 0], words[:, 1])
            q = (_nibbles(words[:, 6:]) | _fifth_bits(words[:, 2:6])).astype(jnp.int8)
            values = d[:, None] * (q - jnp.int8(16)).astype(jnp.float32)
        else:  # Q5_1
            d, m = _half(words[:, 0], words[:, 1]), _half(words[:, 2], words[:, 3])
            q = (_nibbles(words[:, 8:]) | _fifth_bits(words[:, 4:8])).astype(jnp.float32)
            values = d[:, None] * q + m[:, None]
        return values.reshape(shape)

    return jax.jit(decode)
