"""Row operations, the same on every cache family: a beam-search reorder and a sequence
prefilled on its own joining a decode batch (contiguous cache), the same moves on a paged cache
through its host page tables (``PagedRows``), and what a family that cannot do an operation says.
"""

import jax.numpy as jnp
import numpy as np

from jaxkv import UnsupportedOperationError
from jaxkv.caches import (
    PagedCache,
    PagedCacheMetadata,
    TransformerCache,
    TransformerCacheMetadata,
    TransformerRuntimeMetadata,
)
from jaxkv.engine.step_inputs import paged_runtime
from jaxkv.pages import PagedRows, PageManager

rng = np.random.default_rng(0)


def keys(batch, tokens):
    return jnp.asarray(rng.standard_normal((batch, tokens, 2, 16)), jnp.float32)


# A batch of 3 rows of different lengths.
metadata = TransformerCacheMetadata.create(3, 64, 1, num_kv_heads=2, head_dim=16)
cache = TransformerCache.init_cache(metadata)
k = keys(3, 5)
_, view = cache[0].concatenate_to_cache(k, k, TransformerRuntimeMetadata.create([5, 3, 4]))
cache = cache.replace_view(0, view)
print("lengths:", cache[0].lengths)

# Beam search keeps beams 0, 0 and 2: row b becomes row indices[b] (duplicates allowed).
beams = cache.reorder(jnp.array([0, 0, 2]))
print("after reorder [0, 0, 2]:", beams[0].lengths)

# A sequence prefilled in a one-row cache joins the batch in slot 1.
single = TransformerCache.init_cache(metadata.replace(batch_size=1))
k = keys(1, 7)
_, view = single[0].concatenate_to_cache(k, k)
batch = beams.insert(single.replace_view(0, view), 1)
print("after insert into slot 1:", batch[0].lengths)
print("rolled back to [2, 7, 1]:", batch.truncate(jnp.array([2, 7, 1]))[0].lengths)

# The same on a paged cache: the pools have no rows, the page manager's tables do.
paged_metadata = PagedCacheMetadata.create(1, 16, 4, 2, 16, batch_size=4, max_pages_per_seq=8)
paged = PagedCache.init_cache(paged_metadata)
manager = PageManager(16, 4, 4, 8, token_buckets=(16,))
manager.add_sequence("a", [1, 2, 3, 4, 5, 6])
step = manager.schedule([("a", 6)])
k = jnp.asarray(rng.standard_normal((16, 2, 16)), jnp.float32)
_, view = paged[0].concatenate_to_cache(k, k, paged_runtime(step))
paged = paged.replace_view(0, view)
manager.commit_step(step)
rows = PagedRows(manager, ["a"]).repeat(3)  # 3 samples of one prompt: forks share its pages
print("paged rows:", rows.seq_ids, "pages in use:", manager.num_used_pages)

# A ring cannot roll back: the slots before its window already hold newer tokens.
ring = TransformerCache.init_cache(metadata.replace(sliding_window=8))
try:
    ring.truncate(jnp.array([0, 0, 0]))
except UnsupportedOperationError as error:
    print("ring:", error)
