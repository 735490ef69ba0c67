"""The device dequantiser against ``gguf.quants.dequantize``: bit-identical values for every
type it decodes, on random bytes (scales of every float16 value, NaN and inf included), and
clear errors for what it cannot decode."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxkv.io import dequantize as dq

TYPES = {
    "F32": dq.F32,
    "F16": dq.F16,
    "BF16": dq.BF16,
    "Q4_0": dq.Q4_0,
    "Q4_1": dq.Q4_1,
    "Q5_0": dq.Q5_0,
    "Q5_1": dq.Q5_1,
    "Q8_0": dq.Q8_0,
}


def _reference(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    row_bytes = raw.size // int(np.prod(shape[:-1]))
    with np.errstate(all="ignore"):
        values = gguf.quants.dequantize(
            raw.reshape(*shape[:-1], row_bytes), gguf.GGMLQuantizationType(ggml_type)
        )
    return np.asarray(values, np.float32).reshape(shape)


@pytest.mark.parametrize("name", sorted(TYPES))
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.sampled_from([1, 3]))
def test_bit_identical_to_gguf(name, seed, rows):
    ggml_type = TYPES[name]
    shape = (rows, 64)
    raw = np.random.default_rng(seed).integers(0, 256, dq.nbytes(ggml_type, shape), np.uint8)
    ours = np.asarray(dq.dequantize(raw, ggml_type, shape))
    np.testing.assert_array_equal(ours, _reference(raw, ggml_type, shape))


def test_refusals():
    assert not dq.supported(12)  # Q4_K: left to gguf.quants
    with pytest.raises(ValueError, match="GGML type 12 has no device kernel"):
        dq.dequantize(np.zeros(144, np.uint8), 12, (1, 256))
    with pytest.raises(ValueError, match=r"shape \(2, 48\) must end in a multiple of 32"):
        dq.dequantize(np.zeros(54, np.uint8), dq.Q8_0, (2, 48))
    with pytest.raises(ValueError, match="raw must be 68 uint8 bytes for type 8"):
        dq.dequantize(np.zeros(67, np.uint8), dq.Q8_0, (2, 32))
    with pytest.raises(ValueError, match="got int32 of size 17"):
        dq.dequantize(np.zeros(17, np.int32), dq.Q8_0, (2, 32))
