"""A short tour of the jaxkv cache API: a ragged batch through a contiguous cache and a
sliding-window ring, checked against dense attention."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.caches import TransformerCache, TransformerCacheMetadata, TransformerRuntimeMetadata
from jaxkv.ops import attention

# 2 rows, up to 64 tokens each, 1 layer, 2 KV heads of dim 16; 4 query heads (grouped-query).
metadata = TransformerCacheMetadata.create(
    batch_size=2, max_length=64, num_layers=1, num_kv_heads=2, head_dim=16
)
cache = TransformerCache.init_cache(metadata)
print("metadata:", metadata.to_json())


@jax.jit
def step(cache, q, k, v, runtime):
    kv, view = cache[0].concatenate_to_cache(k, v, runtime)  # write, get what attention reads
    return attention(q, kv), cache.replace_view(0, view)


rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal((2, 5, h, 16)), jnp.float32) for h in (4, 2, 2))
# Row 0 has a 5-token prompt, row 1 a 3-token prompt (right-padded).
out, cache = step(cache, q, k, v, TransformerRuntimeMetadata.create([5, 3]))
print("lengths after prefill:", cache[0].lengths)
for _ in range(3):  # decode: one token per row
    token = [jnp.asarray(rng.standard_normal((2, 1, h, 16)), jnp.float32) for h in (4, 2, 2)]
    out, cache = step(cache, *token, TransformerRuntimeMetadata.create([1, 1]))
print("lengths after 3 decode steps:", cache[0].lengths, "output", out.shape)

ring = TransformerCacheMetadata.create(1, 1000, 1, 2, 16, sliding_window=8)
view = TransformerCache.init_cache(ring)[0]
kv, view = view.concatenate_to_cache(k[:1], v[:1])
print("sliding window of 8 keeps", view.keys.shape[1], "slots; positions", view.positions[0])
