"""Long prefills through ``jaxkv.ops.attention``: queries in tiles that skip the key blocks
above the diagonal (and before a window) give the dense reference's output, for ragged rows, a
run that starts after a cached prefix, a length that is not a multiple of the tile, a sliding
window, padding queries and the int8 codec."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.caches import TransformerCache, TransformerCacheMetadata, TransformerRuntimeMetadata
from jaxkv.ops import attention
from jaxkv.ops.attention import QUERY_TILE
from jaxkv.ops.reference import naive_attention

HEADS, KV_HEADS, DIM = 4, 2, 16


def _run(prefix, new, window, codec, block_size):
    """Write ``prefix[row]`` tokens, then ``new`` tokens per row (rows past ``lengths`` are
    padding), attend, and return (ours, reference) for the second write."""
    batch = len(prefix)
    rng = np.random.default_rng(7)
    capacity = max(prefix) + new + 8
    options = {} if codec == "none" else {"kv_quantization": codec}
    metadata = TransformerCacheMetadata.create(batch, capacity, 1, KV_HEADS, DIM, **options)
    cache = TransformerCache.init_cache(metadata)
    keys = rng.standard_normal((batch, capacity, KV_HEADS, DIM)).astype(np.float32)
    values = rng.standard_normal((batch, capacity, KV_HEADS, DIM)).astype(np.float32)
    query = rng.standard_normal((batch, new, HEADS, DIM)).astype(np.float32)
    first = max(prefix)
    if first:
        _, view = cache[0].concatenate_to_cache(
            jnp.asarray(keys[:, :first]),
            jnp.asarray(values[:, :first]),
            TransformerRuntimeMetadata.create(list(prefix)),
        )
        cache = cache.replace_view(0, view)
    real = [new, new - 37]  # the second row has 37 padding tokens at its end
    gathered_k = np.stack([keys[r, prefix[r] : prefix[r] + new] for r in range(batch)])
    gathered_v = np.stack([values[r, prefix[r] : prefix[r] + new] for r in range(batch)])

    @jax.jit
    def step(cache, q, k, v):
        kv, _ = cache[0].concatenate_to_cache(k, v, TransformerRuntimeMetadata.create(real))
        return attention(q, kv, sliding_window=window, block_size=block_size), kv

    out, kv = step(cache, jnp.asarray(query), jnp.asarray(gathered_k), jnp.asarray(gathered_v))
    segment = kv.segments[0]
    stored_k = np.asarray(segment.codec.decode_block(segment.keys, segment.key_scales))
    stored_v = np.asarray(segment.codec.decode_block(segment.values, segment.value_scales))
    key_positions = np.where(
        np.arange(capacity)[None, :] < np.asarray(segment.live)[:, None],
        np.arange(capacity)[None, :],
        -1,
    )
    want = naive_attention(
        query,
        stored_k,
        stored_v,
        np.asarray(kv.query_positions),
        key_positions,
        sliding_window=window,
    )
    return np.asarray(out), want


@pytest.mark.parametrize(
    ("prefix", "new", "window", "codec", "block_size"),
    [
        ((0, 0), 3 * QUERY_TILE + 41, None, "none", 128),  # several tiles, a partial last one
        ((100, 7), 2 * QUERY_TILE + 5, None, "none", 256),  # after a cached prefix, ragged
        ((60, 300), 2 * QUERY_TILE + 90, 200, "none", 64),  # a window: early blocks skipped
        ((0, 33), QUERY_TILE + 1, None, "int8", 128),  # a quantised cache
    ],
)
def test_tiled_prefill_equals_dense_attention(prefix, new, window, codec, block_size):
    ours, want = _run(prefix, new, window, codec, block_size)
    np.testing.assert_allclose(ours, want, atol=2e-5, rtol=1e-4)
    # the second row's padding queries give zeros
    assert not np.any(ours[1, new - 37 :])


@pytest.mark.parametrize("codec", ["int4", "fp8"])
def test_tiles_read_the_same_blocks_as_one_pass(monkeypatch, codec):
    """The tiles change which masked blocks are skipped, nothing else: the output of one pass of
    all queries over every live block, up to the rounding of matmuls of another shape (rotated
    int4 included)."""
    case = ((20, 0), 2 * QUERY_TILE + 101, 300, codec, 128)
    tiled, _ = _run(*case)
    module = importlib.import_module("jaxkv.ops.attention")  # the package exports the function
    monkeypatch.setattr(module, "QUERY_TILE", 10**9)
    one_pass, _ = _run(*case)
    np.testing.assert_allclose(tiled, one_pass, rtol=1e-5, atol=1e-6)
