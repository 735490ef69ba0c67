"""The device dequantiser against ``gguf.quants.dequantize``: bit-identical values for every
type it decodes, on random bytes (scales of every float16 value, NaN and inf included) and on
the k-quant tensors of the bundled Gemma 3 checkpoint, and clear errors for what it cannot
decode."""

from __future__ import annotations

import mmap

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxkv.io import dequantize as dq
from jaxkv.io.gguf import _dequantize_tensor, read_gguf_metadata
from jaxkv.io.gguf_gemma3 import gemma3_model_path

TYPES = {
    "F32": dq.F32,
    "F16": dq.F16,
    "BF16": dq.BF16,
    "Q4_0": dq.Q4_0,
    "Q4_1": dq.Q4_1,
    "Q5_0": dq.Q5_0,
    "Q5_1": dq.Q5_1,
    "Q8_0": dq.Q8_0,
    "Q4_K": dq.Q4_K,
    "Q5_K": dq.Q5_K,
    "Q6_K": dq.Q6_K,
}
# Last axes are multiples of 256, whole blocks for every type (k-quants included).
SHAPES = [(1, 256), (3, 512), (2, 3, 256)]


def _reference(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    row_bytes = raw.size // int(np.prod(shape[:-1]))
    with np.errstate(all="ignore"):
        values = gguf.quants.dequantize(
            raw.reshape(*shape[:-1], row_bytes), gguf.GGMLQuantizationType(ggml_type)
        )
    return np.asarray(values, np.float32).reshape(shape)


def _assert_bit_identical(ours: np.ndarray, reference: np.ndarray) -> None:
    """Same shape, dtype and NaN positions, and the same float32 bits everywhere else (so
    ``-0.0`` and ``0.0`` differ)."""
    assert ours.shape == reference.shape and ours.dtype == reference.dtype == np.float32
    nan = np.isnan(reference)
    np.testing.assert_array_equal(np.isnan(ours), nan)
    np.testing.assert_array_equal(ours.view(np.uint32)[~nan], reference.view(np.uint32)[~nan])


@pytest.mark.parametrize("name", sorted(TYPES))
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from(SHAPES))
def test_bit_identical_to_gguf(name, seed, shape):
    ggml_type = TYPES[name]
    raw = np.random.default_rng(seed).integers(0, 256, dq.nbytes(ggml_type, shape), np.uint8)
    ours = np.asarray(dq.dequantize(raw, ggml_type, shape))
    _assert_bit_identical(ours, _reference(raw, ggml_type, shape))


@pytest.fixture(scope="module")
def checkpoint():
    path = gemma3_model_path()
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        yield read_gguf_metadata(path), buffer


@pytest.mark.parametrize(
    ("name", "type_name"),
    [("blk.0.attn_output.weight", "Q4_K"), ("blk.0.ffn_down.weight", "Q6_K")],
)
def test_checkpoint_k_quants_decode_on_device(checkpoint, monkeypatch, name, type_name):
    meta, buffer = checkpoint
    info = meta.tensors[name]
    assert info.type_name == type_name and dq.supported(info.ggml_type)
    raw = np.frombuffer(buffer[info.offset : info.offset + info.nbytes], dtype=np.uint8)
    reference = _reference(raw, info.ggml_type, info.shape)
    assert np.isfinite(reference).all() and np.abs(reference).max() > 0
    _assert_bit_identical(np.asarray(dq.dequantize(raw, info.ggml_type, info.shape)), reference)

    # The loaders' device path decodes these types without gguf.quants.
    def host_decode(*args, **kwargs):
        raise AssertionError(f"{type_name} went through gguf.quants on the host")

    monkeypatch.setattr(gguf.quants, "dequantize", host_decode)
    checks: list = []
    values = _dequantize_tensor(buffer, meta, name, device=True, checks=checks)
    _assert_bit_identical(np.asarray(values), reference)
    assert [n for n, _ in checks] == [name] and bool(checks[0][1])


def test_refusals():
    assert not dq.supported(10)  # Q2_K: left to gguf.quants
    with pytest.raises(ValueError, match="GGML type 10 has no device kernel"):
        dq.dequantize(np.zeros(84, np.uint8), 10, (1, 256))
    with pytest.raises(ValueError, match=r"shape \(2, 48\) must end in a multiple of 32"):
        dq.dequantize(np.zeros(54, np.uint8), dq.Q8_0, (2, 48))
    with pytest.raises(ValueError, match=r"shape \(2, 128\) must end in a multiple of 256"):
        dq.dequantize(np.zeros(144, np.uint8), dq.Q4_K, (2, 128))
    with pytest.raises(ValueError, match="raw must be 68 uint8 bytes for type 8"):
        dq.dequantize(np.zeros(67, np.uint8), dq.Q8_0, (2, 32))
    with pytest.raises(ValueError, match="raw must be 420 uint8 bytes for type 14"):
        dq.dequantize(np.zeros(419, np.uint8), dq.Q6_K, (1, 512))
    with pytest.raises(ValueError, match="got int32 of size 17"):
        dq.dequantize(np.zeros(17, np.int32), dq.Q8_0, (2, 32))
