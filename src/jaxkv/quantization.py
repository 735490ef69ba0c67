"""KV storage codecs: how a cache holds keys and values in memory, and reads them back.

Every cache family and both attention kernels go through a *storage codec*: ``encode`` on write,
``decode_block`` on read (block by block, inside attention), ``allocate`` for empty storage. There
are two kinds:

* ``RawCodec(dtype)`` -- unquantised floats of the cache dtype. XLA's CPU backend has no native
  16-bit-float scatter: it widens the whole buffer to float32 and back, so writing one token into
  a bfloat16 cache would cost O(capacity). Held as ``uint16`` words of the same bits, the same
  scatter is done in place, and reading bit-casts the words back (free). That choice lives here
  and nowhere else.
* ``KVCodec(name, group_size)`` -- quantised storage (int8, int4, fp8): each token's keys (or
  values) are quantised on write and dequantised one block at a time on read, so a
  full-precision copy of the cache never exists.

``storage_codec(kv_quantization, group_size, dtype)`` gives the codec of a cache's settings;
``make_codec`` the quantising one only (``None`` when unquantised).

=========  ==============================================  ==========================
codec      stored words per head of ``D`` channels          scales per token per head
=========  ==============================================  ==========================
``none``   ``D`` floats of the cache dtype (no scales)      none
``int8``   ``D`` ``int8``, symmetric in ``[-127, 127]``    1
``int4``   ``D / 2`` ``uint8``, two per byte, rotated      ``D / group_size``
``fp8``    ``D`` ``uint8`` words of ``float8_e4m3fn``       1
=========  ==============================================  ==========================

Scales are float16 held as ``uint16`` words (like 16-bit float caches, see
``jaxkv.caches.storage``), so every stored array is made of 1- or 2-byte integer words that XLA's
CPU backend scatters in place. A group's scale is ``max|x| / qmax`` (``qmax`` = 127, 7 or 448),
rounded *up* to the next float16 so that ``x / scale`` never leaves the code's range; the
element error is then at most half a quantisation step (``scale / 2`` for int8 and int4, half an
e4m3 spacing times ``scale`` for fp8). Scales saturate at float16's largest finite value, 65504:
only magnitudes beyond ``qmax * 65504`` (about 8.3e6 for int8; for int4, whose rotation can
gather a vector's length into one channel, ``7 * 65504 / sqrt(block)``) are clipped. NaN inputs
are not handled (they poison their group).

Each token is quantised on its own (its scales depend on nothing but its own channels), so
writing the same keys and values in one chunk or one token at a time stores the same bits, and a
teacher-forced forward reads what step-by-step decoding would. (In a model the keys themselves
may differ in the last float32 bit between a long batch and a single token, and a value on a
rounding boundary then gets the neighbouring code.)

int4 packing: channel ``2i`` goes to the low nibble and ``2i + 1`` to the high nibble of byte
``i``, each as ``q + 8`` with ``q`` in ``[-7, 7]``.

int4 rotation: keys and values have a few outlier channels, and with 15 levels per group the
outliers' scale rounds the other channels to nothing. int4 therefore stores each head vector
rotated by a fixed orthonormal Hadamard matrix ``R`` (block-diagonal, blocks of the largest
power of two dividing the head dim; ``R`` is symmetric and its own inverse), which spreads an
outlier over all channels before quantising. Attention never un-rotates the cache: since
``q . k = (q R) . (k R)`` and ``sum p v = (sum p (v R)) R``, the kernels rotate the queries once
(``to_attention_basis``), read the rotated blocks (``decode_block``) and rotate the output back
(``from_attention_basis``) -- ``head_dim**2`` multiply-adds per query, nothing per cached token.
A block is read with its even channels before its odd ones (the low nibbles, then the high ones:
no interleaving shuffle per cached token), so the attention basis is ``R P`` with ``P`` that
permutation, folded into the same query matrix. ``decode`` returns the original basis, for
inspection.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

CODECS = ("none", "int8", "int4", "fp8")
"""Names accepted as ``kv_quantization``."""

DEFAULT_INT4_GROUP_SIZE = 64
"""int4 channels per scale unless given (or the head dim when that is smaller)."""

_FLOAT16_MAX = 65504.0
_QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}
_WORD_DTYPES = {"int8": np.dtype(np.int8), "int4": np.dtype(np.uint8), "fp8": np.dtype(np.uint8)}
SCALE_DTYPE = np.dtype(np.uint16)
"""Storage dtype of scales: float16 values as ``uint16`` words."""


@dataclasses.dataclass(frozen=True)
class KVCodec:
    """A quantised storage format (static and hashable, so jitted code specialises on it).

    Attributes:
        name: ``"int8"``, ``"int4"`` or ``"fp8"``.
        group_size: channels that share one scale; ``None`` means the whole head (one scale per
            token per head), which is what int8 and fp8 use.
    """

    name: str
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.name not in _QMAX:
            raise ValueError(
                f"KVCodec: name must be one of {tuple(_QMAX)}, got {self.name!r} "
                f"(use None for unquantised storage)"
            )
        if self.group_size is not None and (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or self.group_size < 1
        ):
            raise ValueError(
                f"KVCodec: group_size must be an int >= 1 or None, got {self.group_size!r}"
            )

    has_scales = True
    """Quantised words come with per-token scales."""

    @property
    def rotated(self) -> bool:
        """Whether head vectors are stored Hadamard-rotated (int4)."""
        return self.name == "int4"

    @property
    def word_dtype(self) -> np.dtype:
        """Dtype of the stored words: ``int8`` for int8, ``uint8`` for int4 and fp8."""
        return _WORD_DTYPES[self.name]

    def stored_dim(self, head_dim: int) -> int:
        """Words stored per head for ``head_dim`` channels (``head_dim / 2`` for int4)."""
        return head_dim // 2 if self.name == "int4" else head_dim

    def head_dim(self, stored_dim: int) -> int:
        """Channels per head held in ``stored_dim`` words (inverse of ``stored_dim``)."""
        return stored_dim * 2 if self.name == "int4" else stored_dim

    def num_groups(self, head_dim: int) -> int:
        """Scales per token per head."""
        return 1 if self.group_size is None else head_dim // self.group_size

    def bytes_per_head(self, head_dim: int) -> int:
        """Bytes one token occupies in one head: words plus float16 scales."""
        return self.stored_dim(head_dim) + SCALE_DTYPE.itemsize * self.num_groups(head_dim)

    def allocate(self, lead: tuple[int, ...], head_dim: int) -> tuple[jax.Array, jax.Array]:
        """Zeroed storage for ``[*lead, head_dim]`` values: ``words: [*lead,
        stored_dim(head_dim)]`` in ``word_dtype`` and ``scales: [*lead, num_groups(head_dim)]``
        uint16."""
        words = jnp.zeros((*lead, self.stored_dim(head_dim)), self.word_dtype)
        return words, jnp.zeros((*lead, self.num_groups(head_dim)), SCALE_DTYPE)

    def encode(self, values: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Quantise ``values: [..., head_dim]`` (any float dtype).

        Returns:
            ``words: [..., stored_dim(head_dim)]`` in ``word_dtype`` and
            ``scales: [..., num_groups(head_dim)]`` uint16 (float16 bits).
        """
        head_dim = values.shape[-1]
        lead = values.shape[:-1]
        groups = self.num_groups(head_dim)
        if self.rotated:
            rotation = jnp.asarray(_rotation(head_dim))
            values = jnp.matmul(
                values.astype(jnp.float32), rotation, precision=lax.Precision.HIGHEST
            )
        grouped = values.reshape(*lead, groups, head_dim // groups)
        qmax = _QMAX[self.name]
        amax = jnp.max(jnp.abs(grouped), axis=-1)  # [..., groups]
        scale16 = _float16_at_least(jnp.minimum(amax / qmax, _FLOAT16_MAX))
        scale = scale16.astype(jnp.float32)
        # An all-zero group has scale 0; divide by 1 instead (its values are 0 either way).
        scaled = grouped / jnp.where(scale > 0, scale, 1.0)[..., None]
        if self.name == "fp8":
            # float8_e4m3fn has no infinity: a value past 448 would become NaN, so clip first.
            fp8 = jnp.clip(scaled, -qmax, qmax).astype(jnp.float8_e4m3fn)
            words = lax.bitcast_convert_type(fp8, jnp.uint8)
        else:
            codes = jnp.clip(jnp.round(scaled), -qmax, qmax).astype(jnp.int32)
            if self.name == "int8":
                words = codes.astype(jnp.int8)
            else:
                nibbles = (codes + 8).reshape(*lead, head_dim // 2, 2)
                words = (nibbles[..., 0] | (nibbles[..., 1] << 4)).astype(jnp.uint8)
        words = words.reshape(*lead, self.stored_dim(head_dim))
        return words, lax.bitcast_convert_type(scale16, jnp.uint16)

    def decode(self, words: jax.Array, scales: jax.Array) -> jax.Array:
        """Dequantise ``words: [..., stored_dim]`` with ``scales: [..., num_groups]`` (uint16
        float16 bits) to ``[..., head_dim]`` float32 in the original basis (for inspection)."""
        return self.from_attention_basis(self.decode_block(words, scales))

    def to_attention_basis(self, x: jax.Array) -> jax.Array:
        """``x: [..., head_dim]`` (queries) in the basis ``decode_block`` reads stored vectors
        in: ``x R P`` for int4 (rotated, then the even channels before the odd ones: ``P`` is
        the permutation ``_split_order``), else ``x`` unchanged."""
        if not self.rotated:
            return x
        basis = jnp.asarray(_attention_basis(x.shape[-1]))
        return jnp.matmul(x.astype(jnp.float32), basis, precision=lax.Precision.HIGHEST)

    def from_attention_basis(self, x: jax.Array) -> jax.Array:
        """Inverse of ``to_attention_basis`` (``R P`` is orthonormal, so its inverse is its
        transpose): attention outputs back to the original basis."""
        if not self.rotated:
            return x
        basis = jnp.asarray(_attention_basis(x.shape[-1]).T)
        return jnp.matmul(x.astype(jnp.float32), basis, precision=lax.Precision.HIGHEST)

    def decode_block(self, words: jax.Array, scales: jax.Array) -> jax.Array:
        """Dequantise one block as attention reads it: like ``decode`` but left in the
        attention basis (see ``to_attention_basis``). ``[..., head_dim]`` float32: the
        ``decode_parts`` side by side."""
        parts = self.decode_parts(words, scales)
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)

    def decode_parts(self, words: jax.Array, scales: jax.Array) -> tuple[jax.Array, ...]:
        """``decode_block`` as the channel runs the kernels read separately: one
        ``[..., head_dim]`` float32 array, or for int4 two ``[..., head_dim / 2]`` ones.

        A byte of int4 holds channels ``2i`` (low nibble) and ``2i + 1`` (high nibble).
        Interleaving them back, or even joining the halves, is a shuffle of every cached value
        that XLA's CPU backend runs slowly; a kernel instead takes the low nibbles (the even
        channels) and the high nibbles (the odd ones) as two parts and attends each with its
        half of the query (``split_query``). The nibbles are split in float arithmetic, which
        vectorises better there than integer shifts."""
        scale = lax.bitcast_convert_type(scales, jnp.float16).astype(jnp.float32)
        if self.name == "fp8":
            codes = lax.bitcast_convert_type(words, jnp.float8_e4m3fn).astype(jnp.float32)
        elif self.name == "int8":
            codes = words.astype(jnp.float32)
        else:
            # Channel group g holds the bytes g * size / 2 .. (g + 1) * size / 2 - 1, so each
            # half keeps the group layout.
            byte = words.astype(jnp.float32)
            high = jnp.floor(byte * (1.0 / 16.0))
            low = byte - 16.0 * high
            return _scaled(low - 8.0, scale), _scaled(high - 8.0, scale)
        return (_scaled(codes, scale),)

    def split_query(self, q: jax.Array) -> tuple[jax.Array, ...]:
        """``q: [..., head_dim]`` in the attention basis as the channel runs of
        ``decode_parts``."""
        if self.name != "int4":
            return (q,)
        half = q.shape[-1] // 2
        return q[..., :half], q[..., half:]


_WORDS = {2: np.dtype(np.uint16), 1: np.dtype(np.uint8)}


@dataclasses.dataclass(frozen=True)
class RawCodec:
    """Unquantised storage: floats of ``dtype``, 16-bit ones held as unsigned words of the same
    bits so that XLA's CPU backend scatters into them in place (see the module docstring).

    Static and hashable like ``KVCodec``, with the same methods; it keeps no scales (``None``
    wherever a ``KVCodec`` has them).

    Attributes:
        dtype: the float dtype of the values (float32, bfloat16 or float16).
    """

    dtype: np.dtype

    name = "none"
    has_scales = False
    rotated = False

    def __post_init__(self) -> None:
        try:
            dtype = np.dtype(self.dtype)
        except TypeError:
            raise TypeError(f"RawCodec: dtype must be a float dtype, got {self.dtype!r}") from None
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"RawCodec: dtype must be a float dtype, got {dtype.name}")
        object.__setattr__(self, "dtype", dtype)

    @property
    def word_dtype(self) -> np.dtype:
        """Dtype of the stored words: ``uint16`` for 16-bit floats, else ``dtype`` itself."""
        return (
            _WORDS.get(self.dtype.itemsize, self.dtype) if self.dtype.itemsize < 4 else self.dtype
        )

    def stored_dim(self, head_dim: int) -> int:
        """Words stored per head: one per channel."""
        return head_dim

    def head_dim(self, stored_dim: int) -> int:
        """Channels per head held in ``stored_dim`` words."""
        return stored_dim

    def num_groups(self, head_dim: int) -> int:
        """Scales per token per head: none."""
        return 0

    def bytes_per_head(self, head_dim: int) -> int:
        """Bytes one token occupies in one head."""
        return head_dim * self.dtype.itemsize

    def allocate(self, lead: tuple[int, ...], head_dim: int) -> tuple[jax.Array, None]:
        """Zeroed ``[*lead, head_dim]`` words, and no scales."""
        return jnp.zeros((*lead, head_dim), self.word_dtype), None

    def encode(self, values: jax.Array) -> tuple[jax.Array, None]:
        """``values: [..., head_dim]`` (any float dtype) cast to ``dtype``, as stored words."""
        values = values.astype(self.dtype)
        if self.word_dtype == self.dtype:
            return values, None
        return lax.bitcast_convert_type(values, self.word_dtype), None

    def decode_block(self, words: jax.Array, scales: None = None) -> jax.Array:
        """Stored words -> float32 values (a bit cast, then a widening)."""
        if words.dtype != self.dtype:
            words = lax.bitcast_convert_type(words, jnp.dtype(self.dtype))
        return words.astype(jnp.float32)

    def decode_parts(self, words: jax.Array, scales: None = None) -> tuple[jax.Array]:
        """``(decode_block(words),)``: raw storage is read in one channel run."""
        return (self.decode_block(words, scales),)

    def split_query(self, q: jax.Array) -> tuple[jax.Array]:
        """``(q,)``: one channel run (see ``KVCodec.split_query``)."""
        return (q,)

    def decode(self, words: jax.Array, scales: None = None) -> jax.Array:
        """Stored words -> float32 values (the same as ``decode_block``: there is no basis)."""
        return self.decode_block(words, scales)

    def to_attention_basis(self, x: jax.Array) -> jax.Array:
        """``x`` unchanged: raw storage is not rotated."""
        return x

    def from_attention_basis(self, x: jax.Array) -> jax.Array:
        """``x`` unchanged."""
        return x


StorageCodec = KVCodec | RawCodec
"""What a cache stores its keys and values with: one of the two codec kinds."""


def _scaled(codes: jax.Array, scale: jax.Array) -> jax.Array:
    """``codes: [..., n]`` times ``scale: [..., groups]``, each scale over ``n / groups``
    consecutive channels."""
    groups = scale.shape[-1]
    if groups == 1:
        return codes * scale
    lead, n = codes.shape[:-1], codes.shape[-1]
    return (codes.reshape(*lead, groups, n // groups) * scale[..., None]).reshape(*lead, n)


def _split_order(head_dim: int) -> np.ndarray:
    """The channel order int4 blocks are read in: even channels, then odd ones."""
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


@functools.cache
def _attention_basis(head_dim: int) -> np.ndarray:
    """``R P``: int4's rotation with its columns in ``_split_order`` (float32)."""
    return np.ascontiguousarray(_rotation(head_dim)[:, _split_order(head_dim)])


@functools.cache
def _rotation(head_dim: int) -> np.ndarray:
    """``[head_dim, head_dim]`` float32 orthonormal, symmetric block-diagonal Hadamard matrix
    (Sylvester construction; blocks of the largest power of two dividing ``head_dim``)."""
    block = head_dim & -head_dim
    hadamard = np.ones((1, 1))
    while hadamard.shape[0] < block:
        hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
    hadamard /= np.sqrt(block)
    return np.kron(np.eye(head_dim // block), hadamard).astype(np.float32)


def _float16_at_least(x: jax.Array) -> jax.Array:
    """The smallest float16 ``>= x`` for finite ``x >= 0`` in float16 range (float16 result)."""
    rounded = x.astype(jnp.float16)
    below = rounded.astype(jnp.float32) < x
    bits = lax.bitcast_convert_type(rounded, jnp.uint16)
    # For positive floats the next representable value is the next integer bit pattern.
    return lax.bitcast_convert_type(bits + below.astype(jnp.uint16), jnp.float16)


def resolve_group_size(
    owner: str, kv_quantization: Any, group_size: Any, head_dims: tuple[tuple[str, int], ...]
) -> int | None:
    """Validate a cache's codec settings and return its group size.

    Args:
        owner: who asks (for error messages).
        kv_quantization: one of ``CODECS``.
        group_size: ``quantization_group_size``; int4 only, ``None`` for the default
            (``min(DEFAULT_INT4_GROUP_SIZE, smallest head dim)``).
        head_dims: ``(field name, head dim)`` of keys and values.

    Returns:
        The group size to store: an int for int4, ``None`` otherwise.

    Raises:
        ValueError/TypeError naming ``kv_quantization`` or ``quantization_group_size``.
    """
    if not isinstance(kv_quantization, str) or kv_quantization not in CODECS:
        raise ValueError(
            f"{owner}: kv_quantization must be one of {CODECS}, got {kv_quantization!r}"
        )
    if kv_quantization != "int4":
        if group_size is not None:
            raise ValueError(
                f"{owner}: quantization_group_size applies to kv_quantization='int4' only "
                f"({kv_quantization!r} keeps one scale per token per head), got {group_size!r}"
            )
        return None
    for name, dim in head_dims:
        if dim % 2:
            raise ValueError(
                f"{owner}: kv_quantization='int4' packs two channels per byte, so {name} must be "
                f"even, got {dim}"
            )
    if group_size is None:
        return min(DEFAULT_INT4_GROUP_SIZE, *(dim for _, dim in head_dims))
    if isinstance(group_size, bool) or not isinstance(group_size, int | np.integer):
        raise TypeError(
            f"{owner}: quantization_group_size must be an int or None, got "
            f"{type(group_size).__name__} {group_size!r}"
        )
    if group_size < 1:
        raise ValueError(f"{owner}: quantization_group_size must be >= 1, got {group_size}")
    for name, dim in head_dims:
        if dim % group_size:
            raise ValueError(
                f"{owner}: quantization_group_size={group_size} must divide {name}={dim}"
            )
    return int(group_size)


def make_codec(kv_quantization: str, group_size: int | None) -> KVCodec | None:
    """The quantising ``KVCodec`` of validated settings, or ``None`` for ``"none"``."""
    if kv_quantization == "none":
        return None
    return KVCodec(kv_quantization, group_size if kv_quantization == "int4" else None)


def storage_codec(kv_quantization: str, group_size: int | None, dtype: Any) -> StorageCodec:
    """The storage codec of validated settings: ``RawCodec(dtype)`` for ``"none"``, else the
    ``KVCodec`` (whose reads are float32 whatever ``dtype``)."""
    return make_codec(kv_quantization, group_size) or RawCodec(np.dtype(dtype))


def read_block(words: jax.Array, scales: jax.Array | None, codec: StorageCodec) -> jax.Array:
    """One block of stored keys or values as float32 -- the read path of every attention kernel.

    Args:
        words: ``[..., stored_dim]`` as the cache stores them.
        scales: ``[..., num_groups]`` uint16 float16 bits with a quantising codec, else ``None``.
        codec: the cache's storage codec.

    Returns:
        ``[..., head_dim]`` float32, in the codec's attention basis (see
        ``KVCodec.to_attention_basis``: queries must be rotated the same way).
    """
    return codec.decode_block(words, scales)


def to_attention_basis(x: jax.Array, codec: StorageCodec | None) -> jax.Array:
    """Queries ``[..., head_dim]`` in the basis ``read_block`` returns keys in (unchanged unless
    the codec rotates)."""
    return x if codec is None else codec.to_attention_basis(x)


def from_attention_basis(x: jax.Array, codec: StorageCodec | None) -> jax.Array:
    """Attention outputs ``[..., value_dim]`` from the values' basis back to the original one."""
    return x if codec is None else codec.from_attention_basis(x)
