"""KV storage codecs against an independent NumPy reference: stored bits, round-trip error bounds
(property tests), int4's rotation, saturation, per-token independence, byte counts and
validation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from jaxkv import quantization
from jaxkv.caches import PagedCacheMetadata, TransformerCacheMetadata
from jaxkv.quantization import KVCodec

SHAPE = (3, 2, 16)  # [tokens, heads, head_dim]
QMAX = {"int8": 127, "int4": 7, "fp8": 448}
CODECS = (KVCodec("int8"), KVCodec("int4", 8), KVCodec("int4", 16), KVCodec("fp8"))


def _channel_order(block, codec: KVCodec):
    """A block as ``decode_block`` returns it (int4: the even channels, then the odd ones) in
    the stored vector's channel order."""
    if codec.name != "int4":
        return block
    half = block.shape[-1] // 2
    return jnp.stack([block[..., :half], block[..., half:]], axis=-1).reshape(block.shape)


@functools.cache
def _round_trip(codec: KVCodec):
    """Jitted ``x -> (words, scales, decoded block, decoded)`` for one codec: the block as
    attention reads it (rotated for int4), in the stored channel order, and the values in the
    original basis."""

    def run(x):
        words, scales = codec.encode(x)
        block = _channel_order(codec.decode_block(words, scales), codec)
        return words, scales, block, codec.decode(words, scales)

    return jax.jit(run)


def _reference_rotation(head_dim: int) -> np.ndarray:
    """int4's rotation built another way: ``H[i, j] = (-1)**popcount(i & j) / sqrt(n)`` on each
    diagonal block of ``n`` = the largest power of two dividing ``head_dim``."""
    n = head_dim & -head_dim
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    parity = np.vectorize(lambda a: bin(a).count("1") % 2)(i & j)
    block = np.where(parity, -1.0, 1.0) / np.sqrt(n)
    rotation = np.zeros((head_dim, head_dim))
    for start in range(0, head_dim, n):
        rotation[start : start + n, start : start + n] = block
    return rotation


def _stored_basis(x: np.ndarray, codec: KVCodec) -> np.ndarray:
    """What the codec quantises: ``x``, or ``x R`` for int4 (float32)."""
    if not codec.rotated:
        return x
    return (x.astype(np.float64) @ _reference_rotation(x.shape[-1])).astype(np.float32)


def _reference_scales(x: np.ndarray, codec: KVCodec) -> np.ndarray:
    """float16 scales ``[..., groups]``: ``max|x| / qmax`` rounded up to a float16, saturating."""
    groups = codec.num_groups(x.shape[-1])
    amax = np.abs(x.reshape(*x.shape[:-1], groups, -1)).max(-1)
    wanted = np.minimum(amax / np.float32(QMAX[codec.name]), np.float32(65504))
    scale = wanted.astype(np.float16)
    low = scale.astype(np.float32) < wanted
    scale[low] = np.nextafter(scale[low], np.float16(np.inf))
    return scale


def _reference_encode(x: np.ndarray, codec: KVCodec) -> tuple[np.ndarray, np.ndarray]:
    """An independent NumPy encoder: ``(words, float16 scales)``."""
    scale = _reference_scales(x, codec)
    groups = scale.shape[-1]
    grouped = x.reshape(*x.shape[:-1], groups, -1)
    divisor = np.where(scale > 0, scale.astype(np.float32), np.float32(1))[..., None]
    scaled = (grouped / divisor).reshape(x.shape)
    qmax = QMAX[codec.name]
    if codec.name == "fp8":
        words = np.clip(scaled, -qmax, qmax).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    else:
        codes = np.clip(np.round(scaled), -qmax, qmax).astype(np.int32)
        if codec.name == "int8":
            words = codes.astype(np.int8)
        else:
            words = ((codes[..., 0::2] + 8) | ((codes[..., 1::2] + 8) << 4)).astype(np.uint8)
    return words, scale


def _fp8_half_spacing(y: np.ndarray) -> np.ndarray:
    """Half the gap between neighbouring float8_e4m3fn values around ``|y|`` (subnormals below
    2**-6 are spaced 2**-9 apart; in ``[2**e, 2**(e+1))`` the gap is ``2**(e-3)``)."""
    magnitude = np.abs(y)
    exponent = np.floor(np.log2(np.maximum(magnitude, 2.0**-6)))
    return 0.5 * np.where(magnitude < 2.0**-6, 2.0**-9, 2.0 ** (exponent - 3))


def _error_bound(x: np.ndarray, codec: KVCodec, scale: np.ndarray) -> np.ndarray:
    """Per-element bound on ``|decode(encode(x)) - x|`` given the stored scales."""
    groups = scale.shape[-1]
    step = np.repeat(scale.astype(np.float64), x.shape[-1] // groups, axis=-1)
    if codec.name == "fp8":
        y = x / np.where(step > 0, step, 1)
        half_step = step * _fp8_half_spacing(y)
    else:
        half_step = step / 2
    # The decode multiplies in float32: allow its rounding.
    return half_step + 2e-7 * np.abs(x.astype(np.float64)) + 1e-30


magnitudes = st.sampled_from([0.0, 1e-7, 1e-4, 1.0, 3.0, 1e3, 6e4, 1e6])
values = arrays(np.float32, SHAPE, elements=st.floats(-1.0, 1.0, width=32, allow_subnormal=False))


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: f"{c.name}-{c.group_size}")
@settings(max_examples=40, deadline=None)
@given(unit=values, magnitude=magnitudes)
@example(unit=np.zeros(SHAPE, np.float32), magnitude=1.0)
@example(unit=np.full(SHAPE, -1.0, np.float32), magnitude=1e6)
# Scales in float16's subnormal range, where one rounding is a whole step (found by hypothesis).
@example(
    unit=np.where(np.arange(16) % 8 == 0, 0.5, 1.0).astype(np.float32) * np.ones(SHAPE, np.float32),
    magnitude=1e-7,
)
def test_round_trip_matches_reference_and_error_is_within_half_a_step(codec, unit, magnitude):
    # Within the codec's range (scales saturate at float16's 65504; see the saturation test).
    # The rotation can gather a vector's length into one channel: sqrt(head_dim) x larger.
    growth = np.sqrt(SHAPE[-1]) if codec.rotated else 1.0
    magnitude = min(magnitude, QMAX[codec.name] * 65504.0 / growth)
    x = (unit * np.float32(magnitude)).astype(np.float32)
    # XLA's CPU backend flushes float32 subnormals to zero; keep inputs (and their rotations)
    # clear of that range so that the reference sees the same numbers.
    x[np.abs(x) < 1e-30] = 0.0
    words, scales, block, decoded = (np.asarray(a) for a in _round_trip(codec)(jnp.asarray(x)))
    stored = _stored_basis(x, codec)
    ref_words, ref_scales = _reference_encode(stored, codec)
    assert words.dtype == codec.word_dtype and scales.dtype == np.uint16
    assert words.shape == (*SHAPE[:-1], codec.stored_dim(SHAPE[-1]))
    if codec.rotated:
        # x R is computed in float32 by the codec: a scale or code may differ by one rounding,
        # which for a tiny scale is one float16 subnormal step (2**-24).
        np.testing.assert_allclose(
            scales.view(np.float16).astype(np.float32),
            ref_scales.astype(np.float32),
            rtol=1e-3,
            atol=2.0**-24,
        )
    else:
        np.testing.assert_array_equal(scales, ref_scales.view(np.uint16))
        np.testing.assert_array_equal(words, ref_words)
    # Per element, the error of what attention reads is at most half a quantisation step.
    scale = scales.view(np.float16)
    error = np.abs(block.astype(np.float64) - stored)
    assert np.all(error <= _error_bound(stored, codec, scale) + 1e-6 * np.abs(x).max())
    # The scale is the smallest float16 covering the group's range.
    amax = np.abs(stored.reshape(*SHAPE[:-1], scale.shape[-1], -1)).max(-1)
    assert np.all(scale.astype(np.float32) * QMAX[codec.name] >= amax * (1 - 1e-6))
    # The rotation is orthonormal: in the original basis the error has the same length.
    lengths = np.linalg.norm(decoded.astype(np.float64) - x, axis=-1)
    assert np.all(lengths <= np.linalg.norm(error, axis=-1) * (1 + 1e-5) + 1e-6 * np.abs(x).max())


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: f"{c.name}-{c.group_size}")
def test_zeros_and_exact_codes_round_trip_exactly(codec):
    x = np.zeros(SHAPE, np.float32)
    x[0, 0, :4] = [QMAX[codec.name], -QMAX[codec.name], 1.0, 0.0]  # scale exactly 1
    if codec.rotated:  # make the *stored* vector hold those exact codes
        x = _stored_basis(x, codec)
    block, decoded = (np.asarray(a) for a in _round_trip(codec)(jnp.asarray(x))[2:])
    np.testing.assert_allclose(decoded, x, atol=1e-5)
    assert not np.any(block[1:])  # zero tokens stay exactly zero


@pytest.mark.parametrize("codec", CODECS[:2] + CODECS[3:], ids=lambda c: c.name)
def test_magnitudes_past_the_float16_scale_range_saturate(codec):
    x = np.zeros(SHAPE, np.float32)
    x[..., 0] = 1e9
    x[..., 1] = -1e9
    x = _stored_basis(x, codec)  # int4: the rotation is its own inverse, so x R is as above
    block, decoded = (np.asarray(a) for a in _round_trip(codec)(jnp.asarray(x))[2:])
    limit = QMAX[codec.name] * 65504.0
    expected = np.broadcast_to(np.float32([limit, -limit]), (*SHAPE[:-1], 2))
    np.testing.assert_allclose(block[..., :2], expected, rtol=1e-6)
    assert np.isfinite(decoded).all()


def test_int4_packs_even_channels_in_the_low_nibble_of_the_rotated_vector():
    codec = KVCodec("int4", 4)
    codes = np.array([[[4, -7, 0, 7, 1, 2, 3, 7]]], np.float32)  # scales 1 and 1
    x = _stored_basis(codes, codec)  # R is its own inverse: x R = codes
    words, scales, block, decoded = (np.asarray(a) for a in _round_trip(codec)(jnp.asarray(x)))
    expected = [(-7 + 8) << 4 | (4 + 8), (7 + 8) << 4 | 8, (2 + 8) << 4 | 9, (7 + 8) << 4 | 11]
    assert words.tolist() == [[expected]]
    np.testing.assert_allclose(block, codes, atol=1e-6)
    np.testing.assert_allclose(decoded, x, atol=1e-6)
    # Attention reads the low nibbles, then the high ones, and queries are permuted to match.
    read = codec.decode_parts(jnp.asarray(words), jnp.asarray(scales))
    np.testing.assert_allclose(np.concatenate(read, -1), codes[..., [0, 2, 4, 6, 1, 3, 5, 7]])
    q = np.arange(8, dtype=np.float32)[None, None]
    q_parts = codec.split_query(codec.to_attention_basis(jnp.asarray(q)))
    logit = sum(np.sum(np.asarray(a) * np.asarray(b)) for a, b in zip(q_parts, read, strict=True))
    np.testing.assert_allclose(logit, np.sum(q * decoded), rtol=1e-5)


def test_int4_rotation_spreads_an_outlier_channel():
    """One huge channel no longer flattens the others to zero."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 1, 64)).astype(np.float32)
    x[..., 5] = 60.0
    codec = KVCodec("int4", 64)
    decoded = np.asarray(_round_trip(codec)(jnp.asarray(x))[3])
    error = np.abs(decoded - x)[..., np.arange(64) != 5]
    plain_step = 60.0 / 7  # unrotated, every small channel would round to 0 (error ~ |x|)
    assert error.mean() < 0.2 * plain_step
    assert np.mean(np.abs(x[..., np.arange(64) != 5])) > 0.5  # which would be a larger error


def test_queries_rotated_like_keys_keep_dot_products():
    codec = KVCodec("int4", 8)
    rng = np.random.default_rng(5)
    q, k = (jnp.asarray(rng.standard_normal((3, 16)), jnp.float32) for _ in range(2))
    rotated = jnp.sum(codec.to_attention_basis(q) * codec.to_attention_basis(k), -1)
    np.testing.assert_allclose(rotated, jnp.sum(q * k, -1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        codec.from_attention_basis(codec.to_attention_basis(q)), q, atol=1e-6
    )
    assert quantization.to_attention_basis(q, KVCodec("int8")) is q
    assert quantization.to_attention_basis(q, None) is q


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: f"{c.name}-{c.group_size}")
def test_each_token_is_quantised_on_its_own(codec):
    """Encoding a sequence at once or token by token stores the same bits (what makes a
    teacher-forced forward equal to step-by-step decoding)."""
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    x[1] *= 1e3  # a loud token must not change its neighbours' scales
    words, scales = codec.encode(jnp.asarray(x))
    assert np.asarray(scales)[1].min() > np.asarray(scales)[0].max()
    for t in range(SHAPE[0]):
        one_words, one_scales = codec.encode(jnp.asarray(x[t : t + 1]))
        np.testing.assert_array_equal(np.asarray(words[t : t + 1]), np.asarray(one_words))
        np.testing.assert_array_equal(np.asarray(scales[t : t + 1]), np.asarray(one_scales))


def test_read_block_without_codec_bit_casts_stored_words():
    x = jnp.asarray([[1.5, -2.25]], jnp.bfloat16)
    words = jax.lax.bitcast_convert_type(x, jnp.uint16)
    out = quantization.read_block(words, None, quantization.RawCodec(jnp.bfloat16))
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), [[1.5, -2.25]])


def test_bytes_per_token_for_smollm2_shape_meet_the_targets():
    """3 kv heads x 64 dims x 30 layers, against bfloat16 storage, for both cache families."""
    targets = {"int8": 0.53, "int4": 0.28, "fp8": 0.53}
    for family in ("contiguous", "paged"):
        per_token = functools.partial(_bytes_per_token, family)
        bfloat16 = per_token(dtype=jnp.bfloat16)
        assert bfloat16 == 30 * 3 * 2 * 64 * 2
        assert per_token(kv_quantization="int8") == 30 * 3 * 2 * (64 + 2)
        assert per_token(kv_quantization="fp8") == 30 * 3 * 2 * (64 + 2)
        assert per_token(kv_quantization="int4") == 30 * 3 * 2 * (32 + 2)
        grouped = per_token(kv_quantization="int4", quantization_group_size=16)
        assert grouped == 30 * 3 * 2 * (32 + 4 * 2)
        for codec, ratio in targets.items():
            assert per_token(kv_quantization=codec) <= ratio * bfloat16, codec
        # The float dtype does not change a quantised cache's size.
        with_bfloat16 = per_token(kv_quantization="int8", dtype=jnp.bfloat16)
        assert with_bfloat16 == per_token(kv_quantization="int8")


def _bytes_per_token(family, **kwargs):
    """``bytes_per_token`` of a SmolLM2-shaped cache (3 kv heads x 64 dims x 30 layers)."""
    if family == "contiguous":
        metadata = TransformerCacheMetadata.create(1, 128, 30, 3, 64, **kwargs)
    else:
        metadata = PagedCacheMetadata.create(30, 8, 16, 3, 64, 1, 8, **kwargs)
    return metadata.bytes_per_token()


def test_codec_and_group_size_validation_names_the_field():
    dims = (("key_dim", 64), ("value_dim", 32))
    resolve = functools.partial(quantization.resolve_group_size, "owner")
    assert resolve("int4", None, dims) == 32
    assert resolve("int4", 16, dims) == 16
    assert resolve("int8", None, dims) is None
    with pytest.raises(ValueError, match=r"owner: kv_quantization must be one of .*'int3'"):
        resolve("int3", None, dims)
    with pytest.raises(ValueError, match="kv_quantization must be one of"):
        resolve(None, None, dims)
    with pytest.raises(ValueError, match="quantization_group_size=24 must divide key_dim=64"):
        resolve("int4", 24, dims)
    with pytest.raises(ValueError, match="quantization_group_size must be >= 1, got 0"):
        resolve("int4", 0, dims)
    with pytest.raises(TypeError, match="quantization_group_size must be an int or None"):
        resolve("int4", 8.0, dims)
    with pytest.raises(ValueError, match="value_dim must be even, got 7"):
        resolve("int4", None, (("key_dim", 8), ("value_dim", 7)))
    with pytest.raises(ValueError, match="applies to kv_quantization='int4' only"):
        resolve("int8", 16, dims)
    with pytest.raises(ValueError, match="KVCodec: name must be one of"):
        KVCodec("none")
    with pytest.raises(ValueError, match="KVCodec: group_size must be"):
        KVCodec("int4", 0)
    assert quantization.make_codec("none", None) is None
    assert quantization.make_codec("int4", 8) == KVCodec("int4", 8)
