"""GGUF tensors decoded on the device: the stored bytes go to the device as they are (a 4-bit
tensor is an eighth of its float32 size) and one compiled kernel per type and shape unpacks
them, in the same arithmetic as ``gguf.quants.dequantize`` (the results are bit-identical), so
loading a checkpoint costs a copy of its file rather than NumPy passes over every float.

``dequantize(raw, ggml_type, shape)`` handles the float types (F32, F16, BF16), the 32-value
block quantisations (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the 256-value k-quants (Q4_K, Q5_K,
Q6_K); ``supported(ggml_type)`` says which. Other types are left to ``gguf.quants`` by the
caller. A loader that decodes many tensors at once (a whole layer in one kernel) traces
``decoder(ggml_type, shape)`` on ``stored_words(raw, ggml_type, shape)`` itself.

Block layouts (little-endian; ``d``, ``m`` are float16 scale and minimum, 32 values a block):

* Q8_0: ``d``, 32 int8 ``q``; value ``d * q``.
* Q4_0: ``d``, 16 bytes of nibbles (value ``j`` in the low nibble of byte ``j``, value
  ``j + 16`` in its high nibble); value ``d * (q - 8)``.
* Q4_1: ``d``, ``m``, nibbles as Q4_0; value ``d * q + m``.
* Q5_0: ``d``, a uint32 of fifth bits (bit ``j`` for value ``j``), nibbles as Q4_0; value
  ``d * (q - 16)``.
* Q5_1: ``d``, ``m``, fifth bits and nibbles as Q5_0; value ``d * q + m``.

The k-quants hold 256 values a block in sub-blocks that each carry a small integer scale; the
float32 product of ``d`` and that scale is formed first, as ``gguf.quants`` does, and only then
applied to the quants (rounding once more), so the results stay bit-identical:

* Q4_K: ``d``, ``dmin``, 12 bytes of 6-bit scales ``sc`` and minima ``mn`` for 8 sub-blocks of
  32 (bytes 0-3 hold the low 6 bits of ``sc[0:4]``, bytes 4-7 those of ``mn[0:4]``, and their
  top 2 bits hold the high bits of ``sc[4:8]``, ``mn[4:8]``, whose low 4 bits are the low and
  the high nibbles of bytes 8-11), 128 bytes of nibbles in four runs of 32 bytes (run ``r``
  holds sub-block ``2r`` in its low nibbles, ``2r + 1`` in its high ones); value
  ``(d * sc) * q - dmin * mn``.
* Q5_K: ``d``, ``dmin``, scales as Q4_K, 32 bytes of fifth bits (bit ``j`` of byte ``i`` for
  value ``i`` of sub-block ``j``), nibbles as Q4_K; value as Q4_K with 5-bit ``q``.
* Q6_K: 128 bytes of low nibbles, 64 bytes of high bit pairs, 16 int8 scales ``sc`` (one per
  16 values), ``d`` last. Each half of 128 values takes 64 nibble bytes (values ``i`` and
  ``i + 64`` in the low and high nibble of byte ``i``) and 32 bit-pair bytes (bits ``2t..2t+1``
  of byte ``i`` for value ``32t + i``); value ``(d * sc) * (q - 32)``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, BF16 = 0, 1, 2, 3, 6, 7, 8, 30
Q4_K, Q5_K, Q6_K = 12, 13, 14
# (values, bytes) of one block, per block type.
_BLOCKS = {
    Q4_0: (32, 18),
    Q4_1: (32, 20),
    Q5_0: (32, 22),
    Q5_1: (32, 24),
    Q8_0: (32, 34),
    Q4_K: (256, 144),
    Q5_K: (256, 176),
    Q6_K: (256, 210),
}
_FLOAT_BYTES = {F32: 4, F16: 2, BF16: 2}


def supported(ggml_type: int) -> bool:
    """Whether ``dequantize`` decodes this GGML type on the device."""
    return ggml_type in _BLOCKS or ggml_type in _FLOAT_BYTES


def nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    """Stored bytes of a tensor of this (supported) type and shape."""
    count = math.prod(shape)
    if ggml_type in _FLOAT_BYTES:
        return count * _FLOAT_BYTES[ggml_type]
    values, block_bytes = _BLOCKS[ggml_type]
    return count // values * block_bytes


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
    return _kernel(ggml_type, shape)(jnp.asarray(stored_words(raw, ggml_type, shape)))


def stored_words(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """``raw`` checked and viewed as what ``decoder(ggml_type, shape)`` takes: ``[blocks,
    block bytes]`` uint8 (``[values, value bytes]`` for a float type). Raises ``ValueError``
    as ``dequantize`` does."""
    shape = tuple(int(n) for n in shape)
    if not supported(ggml_type):
        raise ValueError(f"dequantize: GGML type {ggml_type} has no device kernel")
    if ggml_type in _BLOCKS and (not shape or shape[-1] % _BLOCKS[ggml_type][0]):
        raise ValueError(
            f"dequantize: shape {shape} must end in a multiple of {_BLOCKS[ggml_type][0]} for "
            f"type {ggml_type}"
        )
    expected = nbytes(ggml_type, shape)
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.size != expected:
        raise ValueError(
            f"dequantize: raw must be {expected} uint8 bytes for type {ggml_type} and shape "
            f"{shape}, got {getattr(raw, 'dtype', type(raw).__name__)} of size "
            f"{getattr(raw, 'size', '?')}"
        )
    if ggml_type in _FLOAT_BYTES:
        return raw.reshape(-1, _FLOAT_BYTES[ggml_type])
    return raw.reshape(-1, _BLOCKS[ggml_type][1])


def _half(low: jax.Array, high: jax.Array) -> jax.Array:
    """Two bytes (little-endian) -> their float16 value as float32."""
    bits = low.astype(jnp.uint16) | (high.astype(jnp.uint16) << 8)
    return jax.lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.float32)


def _nibbles(packed: jax.Array) -> jax.Array:
    """``[..., n]`` bytes -> ``[..., 2n]`` values: low nibbles, then high nibbles."""
    return jnp.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def _fifth_bits(qh: jax.Array) -> jax.Array:
    """``[blocks, 4]`` bytes of a little-endian uint32 -> ``[blocks, 32]`` bits shifted to 16."""
    word = (
        qh[:, 0].astype(jnp.uint32)
        | (qh[:, 1].astype(jnp.uint32) << 8)
        | (qh[:, 2].astype(jnp.uint32) << 16)
        | (qh[:, 3].astype(jnp.uint32) << 24)
    )
    bits = (word[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return (bits << 4).astype(jnp.uint8)


def _k_scales(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``[blocks, 12]`` bytes of Q4_K/Q5_K -> ``[blocks, 8]`` float32 scales and minima."""
    packed = packed.reshape(-1, 3, 4)
    low_sc, low_mn, nibbles = packed[:, 0], packed[:, 1], packed[:, 2]
    sc = jnp.concatenate([low_sc & 0x3F, (nibbles & 0x0F) | ((low_sc >> 2) & 0x30)], axis=1)
    mn = jnp.concatenate([low_mn & 0x3F, (nibbles >> 4) | ((low_mn >> 2) & 0x30)], axis=1)
    return sc.astype(jnp.float32), mn.astype(jnp.float32)


def _k_quant(words: jax.Array, q: jax.Array) -> jax.Array:
    """Q4_K/Q5_K values from ``[blocks, bytes]`` words and their ``[blocks, 8, 32]`` quants."""
    d, dmin = _half(words[:, 0], words[:, 1]), _half(words[:, 2], words[:, 3])
    sc, mn = _k_scales(words[:, 4:16])
    scale = (d[:, None] * sc)[:, :, None]  # [blocks, 8, 1]
    minimum = (dmin[:, None] * mn)[:, :, None]
    return scale * q.astype(jnp.float32) - minimum


@functools.cache
def _kernel(ggml_type: int, shape: tuple[int, ...]):
    return jax.jit(decoder(ggml_type, shape))


def decoder(ggml_type: int, shape: tuple[int, ...]):
    """The traceable function ``words -> float32 shape`` that ``dequantize`` compiles, for a
    caller that decodes several tensors in one kernel (``words`` as ``stored_words`` gives
    them). ``ggml_type`` must be ``supported``."""

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
        elif ggml_type == Q5_1:
            d, m = _half(words[:, 0], words[:, 1]), _half(words[:, 2], words[:, 3])
            q = (_nibbles(words[:, 8:]) | _fifth_bits(words[:, 4:8])).astype(jnp.float32)
            values = d[:, None] * q + m[:, None]
        elif ggml_type == Q4_K:
            # [blocks, 4 runs, 32 bytes] -> [blocks, 8 sub-blocks, 32]
            q = _nibbles(words[:, 16:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
            values = _k_quant(words, q)
        elif ggml_type == Q5_K:
            q = _nibbles(words[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
            # bit j of qh[:, i] is the fifth bit of value i of sub-block j
            qh = words[:, 16:48, None] >> jnp.arange(8, dtype=jnp.uint8)  # [blocks, 32, 8]
            q = q | ((jnp.swapaxes(qh, 1, 2) & 1) << 4)
            values = _k_quant(words, q)
        else:  # Q6_K
            low = _nibbles(words[:, :128].reshape(-1, 2, 64))  # [blocks, 2 halves, 128]
            pairs = words[:, 128:192].reshape(-1, 2, 32)
            high = jnp.concatenate([(pairs >> shift) & 0x03 for shift in (0, 2, 4, 6)], axis=-1)
            q = (low | (high << 4)).astype(jnp.int8) - jnp.int8(32)
            sc = jax.lax.bitcast_convert_type(words[:, 192:208], jnp.int8).astype(jnp.float32)
            d = _half(words[:, 208], words[:, 209])
            scale = (d[:, None] * sc)[:, :, None]  # [blocks, 16, 1]
            values = scale * q.reshape(-1, 16, 16).astype(jnp.float32)
        return values.reshape(shape)

    return decode
