"""Checks that need 8 devices: run by ``test_multidevice.py`` in a process of its own, started
with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (JAX reads the flag once, when it
starts, so these cannot share a process with the single-device tests).

Every cache family, written by a jitted ``concatenate_to_cache`` and then changed by a row
operation, on meshes of 1x8, 2x4 and 8x1 (data x tensor) gives what one device gives and keeps
every array where ``cache_shardings`` declares it; the Llama model with sharded weights and a
sharded contiguous or paged cache gives the single-device logits, and its compiled decode step
gathers no cache array.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from jaxkv import sharding
from jaxkv.caches import (
    HybridCache,
    HybridRuntimeMetadata,
    LinearAttentionCacheMetadata,
    Mamba2CacheMetadata,
    MambaCacheMetadata,
    PagedCache,
    PagedCacheMetadata,
    RecurrentCache,
    RecurrentRuntimeMetadata,
    TransformerCache,
    TransformerCacheMetadata,
    TransformerRuntimeMetadata,
)
from jaxkv.engine.step_inputs import paged_runtime
from jaxkv.models import hybrid, mamba, mamba2
from jaxkv.models import linear_attention as linear
from jaxkv.models.config import LlamaConfig
from jaxkv.models.llama import forward, params_to_device
from jaxkv.pages import PageManager

ATOL = 1e-5
BATCH, HEADS, DIM = 8, 8, 4  # every size that is split divides 8
MESHES = {"1x8": (1, 8), "2x4": (2, 4), "8x1": (8, 1)}
FAST_COMPILE = {"xla_backend_optimization_level": 0}

assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"


def make_mesh(shape: tuple[int, int]) -> jax.sharding.Mesh:
    return jax.make_mesh(shape, ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)


def normal(seed: int, *shape: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# --------------------------------------------------------------------------------------------
# One jitted write and one row operation per family
# --------------------------------------------------------------------------------------------

RAGGED = np.array([3, 1, 2, 3, 0, 2, 1, 3], np.int32)  # real new tokens per row (T = 3)


def _attention_write(cache, key, value, runtime):
    views = []
    for view in cache:
        _, view = view.concatenate_to_cache(key, value, runtime)
        views.append(view)
    return cache.with_views(views)


def _contiguous(**options):
    metadata = TransformerCacheMetadata.create(BATCH, 8, 1, HEADS, DIM, **options)
    cache = TransformerCache.init_cache(metadata)
    # Two writes of 3 tokens (the first ragged), so a ring of 4 wraps.
    key, value = normal(1, BATCH, 3, HEADS, DIM), normal(2, BATCH, 3, HEADS, DIM)
    runtime = TransformerRuntimeMetadata.create(RAGGED)

    def write(cache):
        cache = _attention_write(cache, key, value, runtime)
        return _attention_write(cache, value, key, None)

    return cache, write


def _recurrent(metadata, state_shape, conv_dim=None):
    cache = RecurrentCache.init_cache(metadata)
    runtime = RecurrentRuntimeMetadata.create(RAGGED)
    state = normal(3, *state_shape)
    conv_input = None if conv_dim is None else normal(4, BATCH, 3, conv_dim)

    def write(cache):
        views = []
        for view in cache:
            step = view.read(runtime, 3, conv_input)
            _, view = view.concatenate_to_cache(step, step.state * 0.5 + state)
            views.append(view)
        return cache.with_views(views)

    return cache, write


def _paged():
    metadata = PagedCacheMetadata.create(1, 8, 2, HEADS, DIM, BATCH, 2)
    manager = PageManager(8, 2, BATCH, 2, enable_prefix_caching=False, token_buckets=(8,))
    for seq, length in enumerate((3, 1, 2)):
        manager.add_sequence(seq, list(range(1, length + 1)))
    step = manager.schedule([(0, 3), (1, 1), (2, 2)])
    runtime = paged_runtime(step)
    tokens = runtime.slot_mapping.shape[0]
    key, value = normal(5, tokens, HEADS, DIM), normal(6, tokens, HEADS, DIM)
    return PagedCache.init_cache(metadata), lambda cache: _attention_write(
        cache, key, value, runtime
    )


HYBRID_CONFIG = hybrid.HybridConfig(
    vocab_size=32,
    hidden_size=16,
    layer_kinds=("attention", "mamba2", "mamba", "linear_attention", "sliding_attention"),
    mlp_size=16,
    num_heads=HEADS,
    num_kv_heads=HEADS,
    head_dim=2,
    sliding_window=2,
    mamba=mamba.MambaConfig(16, 8, state_size=4, conv_kernel=3),
    mamba2=mamba2.Mamba2Config(16, 8, 2, state_size=4, n_groups=1, conv_kernel=3, block_size=4),
    linear_attention=linear.LinearAttentionConfig(16, 8, 2, 2, block_size=4),
    attention_block_size=4,
)


# The model check runs the kinds whose weights are split (attention, linear attention) and one
# whose mixer is replicated over a channel-split state (Mamba); the cache check runs them all.
HYBRID_MODEL = dataclasses.replace(
    HYBRID_CONFIG, layer_kinds=("attention", "mamba", "linear_attention")
)


def _hybrid():
    """Every view of a hybrid cache written like its family's own cache above."""
    cache = HybridCache.init_cache(HYBRID_CONFIG.cache_metadata(BATCH, 8))
    runtime = HybridRuntimeMetadata.create(RAGGED)
    kv = normal(9, BATCH, 3, HEADS, HYBRID_CONFIG.head_dim)
    conv = {
        kind: normal(10, BATCH, 3, view.metadata.conv_dim)
        for kind, view in zip(HYBRID_CONFIG.layer_kinds, cache, strict=True)
        if kind in ("mamba", "mamba2")
    }

    def write(cache):
        views = []
        for kind, view in zip(HYBRID_CONFIG.layer_kinds, cache, strict=True):
            part = runtime.for_kind(kind)
            if kind in ("attention", "sliding_attention"):
                _, view = view.concatenate_to_cache(kv, kv * 2.0, part)
            else:
                step = view.read(part, 3, conv.get(kind))
                _, view = view.concatenate_to_cache(step, step.state + 1.0)
            views.append(view)
        return cache.with_views(views)

    return cache, write


# name -> (build() -> (empty cache, write), row operation)
FAMILIES = {
    "contiguous": (lambda: _contiguous(), lambda c: c.truncate(jnp.asarray(RAGGED + 1))),
    "ring": (lambda: _contiguous(sliding_window=4), lambda c: c.reset_rows([1, 5])),
    "int8": (
        lambda: _contiguous(kv_quantization="int8"),
        lambda c: c.reorder(jnp.asarray([7, 6, 5, 4, 3, 2, 1, 1])),
    ),
    "paged": (_paged, lambda c: c.copy_pages(jnp.asarray([[0, 7]], jnp.int32)).reset_rows([0])),
    "mamba": (
        lambda: _recurrent(
            MambaCacheMetadata.create(BATCH, 1, 8, state_size=4, conv_kernel=3), (BATCH, 8, 4), 8
        ),
        lambda c: c.reset_rows([2, 3]),
    ),
    "mamba2": (
        lambda: _recurrent(
            Mamba2CacheMetadata.create(BATCH, 1, HEADS, 2, 4, 1, 3), (BATCH, HEADS, 2, 4), 24
        ),
        lambda c: c.reorder(jnp.asarray([1, 0, 3, 2, 5, 4, 7, 6])),
    ),
    "linear_attention": (
        lambda: _recurrent(
            LinearAttentionCacheMetadata.create(BATCH, 1, HEADS, DIM), (BATCH, HEADS, DIM, DIM)
        ),
        lambda c: c.reset_rows([0, 7]),
    ),
    "hybrid": (_hybrid, lambda c: c.reorder(jnp.asarray([0, 0, 2, 3, 4, 5, 6, 1]))),
}


def _assert_placed(cache, mesh, context=""):
    """Every array of ``cache`` has exactly its declared sharding."""
    expected = sharding.cache_shardings(cache, mesh)
    arrays = jax.tree_util.tree_leaves_with_path(cache)
    declared = jax.tree_util.tree_leaves(expected)
    assert len(arrays) == len(declared)
    for (path, array), want in zip(arrays, declared, strict=True):
        assert array.sharding.is_equivalent_to(want, array.ndim), (
            f"{context} {jax.tree_util.keystr(path)}: {array.sharding} is not {want}"
        )


def _assert_equal(got, want, context=""):
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want), strict=True
    ):
        np.testing.assert_allclose(
            np.asarray(a),
            np.asarray(b),
            atol=ATOL,
            rtol=0,
            err_msg=f"{context} {jax.tree_util.keystr(path)}",
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_on_every_mesh_equals_one_device_and_stays_placed(family):
    build, row_operation = FAMILIES[family]
    empty, write = build()

    def step(cache, mesh=None):
        written = write(cache)
        changed = row_operation(written)
        if mesh is not None:
            written = sharding.constrain_cache(written, mesh)
            changed = sharding.constrain_cache(changed, mesh)
        return written, changed

    want_written, want_changed = jax.jit(step, compiler_options=FAST_COMPILE)(empty)
    for name, shape in MESHES.items():
        mesh = make_mesh(shape)
        placed = sharding.shard_cache(empty, mesh)
        _assert_placed(placed, mesh, f"{name} placed:")
        run = jax.jit(functools.partial(step, mesh=mesh), compiler_options=FAST_COMPILE)
        written, changed = run(placed)
        for label, got, want in (
            ("write", written, want_written),
            ("row operation", changed, want_changed),
        ):
            _assert_placed(got, mesh, f"{name} after the {label}:")
            _assert_equal(got, want, f"{name} after the {label}:")


def test_hybrid_model_on_a_2x4_mesh_equals_one_device():
    """The hybrid stack with sharded weights (attention, linear attention and MLPs split over
    tensor) and a sharded cache: one ragged chunk, then a reset row."""
    mesh = make_mesh((2, 4))
    init = jax.jit(hybrid.init_hybrid, static_argnums=1, compiler_options=FAST_COMPILE)
    params = init(jax.random.PRNGKey(3), HYBRID_MODEL)
    empty = HybridCache.init_cache(HYBRID_MODEL.cache_metadata(BATCH, 8))
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, 32, (BATCH, 3)), jnp.int32)
    runtime = HybridRuntimeMetadata.create(RAGGED)

    def step(params, cache, mesh=None):
        logits, cache = hybrid.hybrid_forward_cached(params, HYBRID_MODEL, tokens, cache, runtime)
        cache = cache.reset_rows([2])
        if mesh is not None:
            cache = sharding.constrain_cache(cache, mesh)
        return logits, cache

    want, want_cache = jax.jit(step, compiler_options=FAST_COMPILE)(params, empty)
    placed_params = sharding.shard_params(params, mesh, config=HYBRID_MODEL)
    mixer = placed_params["layers"][2]["mixer"]  # linear attention
    assert mixer["q_proj"].sharding.spec == PartitionSpec(None, "tensor")
    run = jax.jit(functools.partial(step, mesh=mesh), compiler_options=FAST_COMPILE)
    args = (placed_params, sharding.shard_cache(empty, mesh))
    compiled = run.lower(*args).compile()
    got, got_cache = compiled(*args)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    _assert_placed(got_cache, mesh)
    _assert_equal(got_cache, want_cache)
    total, cache_sized, largest = count_all_gathers(compiled.as_text(), got_cache)
    print(f"hybrid step: {total} all-gathers, {cache_sized} of a cache array's shape")
    assert cache_sized == 0


# --------------------------------------------------------------------------------------------
# Indivisible dimensions
# --------------------------------------------------------------------------------------------


def test_three_kv_heads_on_four_devices_fail_or_replicate_explicitly():
    mesh = make_mesh((2, 4))
    metadata = TransformerCacheMetadata.create(BATCH, 8, 1, 3, DIM)
    cache = TransformerCache.init_cache(metadata)
    with pytest.raises(ValueError, match=r"keys: logical axis 'kv_heads' has size 3.*size 4"):
        sharding.shard_cache(cache, mesh)
    placed = sharding.shard_cache(cache, mesh, indivisible="replicate")
    assert placed[0].keys.sharding.spec == PartitionSpec("data")  # heads replicated
    key = normal(8, BATCH, 2, 3, DIM)

    def write(cache, mesh=None):
        cache = _attention_write(cache, key, key, None)
        if mesh is not None:
            cache = sharding.constrain_cache(cache, mesh, indivisible="replicate")
        return cache

    want = jax.jit(write)(cache)
    got = jax.jit(functools.partial(write, mesh=mesh))(placed)
    _assert_equal(got, want)
    assert got[0].keys.sharding.is_equivalent_to(
        jax.sharding.NamedSharding(mesh, PartitionSpec("data", None, None, None)), 4
    )


# --------------------------------------------------------------------------------------------
# The Llama model
# --------------------------------------------------------------------------------------------

LLAMA = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=8,
    num_kv_heads=4,
    head_dim=8,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_ids=(2,),
)


@functools.cache
def _llama_params(config=LLAMA):
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    rng = np.random.default_rng(11)

    def dense(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(c.hidden_size)).astype(np.float32)

    layers = [
        {
            "attn_norm": norm(),
            "wq": dense(c.hidden_size, q),
            "wk": dense(c.hidden_size, kv),
            "wv": dense(c.hidden_size, kv),
            "wo": dense(q, c.hidden_size),
            "mlp_norm": norm(),
            "w_gate": dense(c.hidden_size, c.intermediate_size),
            "w_up": dense(c.hidden_size, c.intermediate_size),
            "w_down": dense(c.intermediate_size, c.hidden_size),
        }
        for _ in range(c.num_layers)
    ]
    raw = {
        "embed": dense(c.vocab_size, c.hidden_size),
        "lm_head": None,
        "final_norm": norm(),
        "layers": layers,
    }
    return params_to_device(raw)


def _llama_step(params, cache, tokens, runtime, logits_indices, mesh=None):
    logits, cache = forward(params, LLAMA, tokens, cache, runtime, logits_indices=logits_indices)
    if mesh is not None:
        cache = sharding.constrain_cache(cache, mesh)
    return logits, cache


def _contiguous_llama_steps():
    """(empty cache, [(tokens, runtime, logits_indices)]): a ragged prefill, one decode step."""
    metadata = TransformerCacheMetadata.create(2, 8, LLAMA.num_layers, LLAMA.num_kv_heads, 8)
    prompts = jnp.asarray([[5, 9, 12, 3], [7, 30, 0, 0]], jnp.int32)
    lengths = jnp.asarray([4, 2], jnp.int32)
    steps = [
        (prompts, TransformerRuntimeMetadata.create(lengths), lengths - 1),
        (jnp.asarray([[17], [41]], jnp.int32), None, jnp.zeros((2,), jnp.int32)),
    ]
    return TransformerCache.init_cache(metadata), steps


def _paged_llama_steps():
    metadata = PagedCacheMetadata.create(LLAMA.num_layers, 8, 4, LLAMA.num_kv_heads, 8, 2, 2)
    manager = PageManager(8, 4, 2, 2, enable_prefix_caching=False, token_buckets=(8,))
    manager.add_sequence("a", [5, 9, 12, 3, 8])
    manager.add_sequence("b", [7, 30])
    steps = []
    for batch in ([("a", 5), ("b", 2)], [("a", 1), ("b", 1)]):
        step = manager.schedule(batch)
        runtime = paged_runtime(step, num_tokens=8)
        steps.append((runtime.token_ids, runtime, runtime.logits_indices))
        manager.commit_step(step)
        manager.append_tokens("a", [17])
        manager.append_tokens("b", [41])
    return PagedCache.init_cache(metadata), steps


def _cache_shapes(cache) -> set[tuple[int, ...]]:
    return {tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(cache) if leaf.ndim > 1}


ALL_GATHER = re.compile(r"=\s*(\(?[^=]*?)\s+all-gather(?:-start)?\(")
SHAPE = re.compile(r"\w+\[([\d,]*)\]")


def count_all_gathers(hlo: str, cache) -> tuple[int, int, int]:
    """``(all-gathers in hlo, those whose result has the full shape of a cache array, the most
    elements any of them gathers)``."""
    shapes = _cache_shapes(cache)
    total = cache_sized = largest = 0
    for match in ALL_GATHER.finditer(hlo):
        total += 1
        results = {
            tuple(int(d) for d in dims.split(",") if d) for dims in SHAPE.findall(match.group(1))
        }
        cache_sized += bool(results & shapes)
        largest = max([largest, *(int(np.prod(shape)) for shape in results)])
    return total, cache_sized, largest


@pytest.mark.parametrize("backend", ["contiguous", "paged"])
def test_llama_on_a_2x4_mesh_equals_one_device_and_gathers_no_cache(backend):
    mesh = make_mesh((2, 4))
    params = _llama_params()
    empty, steps = _contiguous_llama_steps() if backend == "contiguous" else _paged_llama_steps()
    reference_step = jax.jit(_llama_step, compiler_options=FAST_COMPILE)
    sharded_params = sharding.shard_params(params, mesh, config=LLAMA)
    assert "wqkv" not in sharded_params["layers"][0]
    assert sharded_params["layers"][0]["wq"].sharding.spec == PartitionSpec(None, "tensor")
    assert sharded_params["layers"][0]["wo"].sharding.spec == PartitionSpec("tensor")
    sharded_step = jax.jit(
        functools.partial(_llama_step, mesh=mesh), donate_argnums=1, compiler_options=FAST_COMPILE
    )
    want_cache, got_cache = empty, sharding.shard_cache(empty, mesh)
    for tokens, runtime, logits_indices in steps:
        want, want_cache = reference_step(params, want_cache, tokens, runtime, logits_indices)
        args = (sharded_params, got_cache, tokens, runtime, logits_indices)
        compiled = sharded_step.lower(*args).compile()
        got, got_cache = compiled(*args)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
        _assert_placed(got_cache, mesh)
        _assert_equal(got_cache, want_cache)
    # The last step is a decode step (one token per sequence).
    total, cache_sized, largest = count_all_gathers(compiled.as_text(), got_cache)
    print(
        f"{backend} decode step: {total} all-gathers, {cache_sized} of a cache array's shape, "
        f"the largest of {largest} elements"
    )
    assert cache_sized == 0
    # Whatever is gathered (the new tokens' keys and values, at most) is smaller than what one
    # device holds of any cache array: no block of the cache is gathered either.
    shards = [
        int(np.prod(leaf.sharding.shard_shape(leaf.shape)))
        for leaf in jax.tree_util.tree_leaves(got_cache)
        if leaf.ndim == 4
    ]
    assert largest < min(shards)


def test_per_device_bytes_on_a_2x4_mesh():
    mesh = make_mesh((2, 4))
    layouts = {
        "contiguous": TransformerCacheMetadata.create(BATCH, 8, 1, HEADS, DIM),
        "ring": TransformerCacheMetadata.create(BATCH, 8, 1, HEADS, DIM, sliding_window=4),
        "int8": TransformerCacheMetadata.create(BATCH, 8, 1, HEADS, DIM, kv_quantization="int8"),
        "paged": PagedCacheMetadata.create(1, 8, 2, HEADS, DIM, BATCH, 2),
        "mamba": MambaCacheMetadata.create(BATCH, 1, 8, state_size=4, conv_kernel=3),
        "mamba2": Mamba2CacheMetadata.create(BATCH, 1, HEADS, 2, 4, 1, 3),
        "linear_attention": LinearAttentionCacheMetadata.create(BATCH, 1, HEADS, DIM),
        "hybrid": HYBRID_CONFIG.cache_metadata(BATCH, 8),
    }
    for name, metadata in layouts.items():
        per_device = sharding.per_device_cache_bytes(metadata, mesh)
        total = metadata.bytes_total()
        print(f"{name}: {per_device} bytes per device of {total} in all")
        assert per_device < total
        # Built in its shards, each device holds exactly that many bytes.
        built = sharding.init_sharded_cache(metadata, mesh)
        _assert_placed(built, mesh, name)
        for device in mesh.devices.flat:
            held = sum(
                shard.data.nbytes
                for leaf in jax.tree_util.tree_leaves(built)
                for shard in leaf.addressable_shards
                if shard.device == device
            )
            assert held == per_device, (name, device)
    # Keys and values split 8 ways, lengths and overflow flags 2 ways (over data only).
    contiguous = layouts["contiguous"]
    kv = 2 * BATCH * 8 * HEADS * DIM * 4
    assert sharding.per_device_cache_bytes(contiguous, mesh) == kv // 8 + (4 + 1) * BATCH // 2
    # A paged pool is replicated over data and split over heads only.
    paged = layouts["paged"]
    assert sharding.per_device_cache_bytes(paged, mesh) == paged.bytes_total() // 4


def test_smollm2_head_counts_on_tensor_4_fail_or_replicate_heads_explicitly():
    """9 query heads and 3 KV heads do not divide over 4 devices: refused by name, or, with
    ``indivisible="replicate"``, heads replicated while the MLP and the rows stay split, and the
    forward still gives the single-device logits."""
    mesh = make_mesh((2, 4))
    config = dataclasses.replace(LLAMA, num_heads=9, num_kv_heads=3, num_layers=1)
    params = _llama_params(config)
    with pytest.raises(
        ValueError, match=r"\['wq'\]: logical axis 'heads' has size 9 \(in units of 8"
    ):
        sharding.shard_params(params, mesh, config=config)
    placed = sharding.shard_params(params, mesh, config=config, indivisible="replicate")
    layer = placed["layers"][0]
    assert layer["wq"].sharding.spec == layer["wk"].sharding.spec == PartitionSpec()
    assert layer["w_up"].sharding.spec == PartitionSpec(None, "tensor")
    metadata = TransformerCacheMetadata.create(2, 8, 1, 3, config.head_dim)
    empty = TransformerCache.init_cache(metadata)
    with pytest.raises(
        ValueError, match=r"TransformerCacheView.keys: logical axis 'kv_heads' has size 3"
    ):
        sharding.cache_shardings(empty, mesh)
    cache = sharding.shard_cache(empty, mesh, indivisible="replicate")
    tokens = jnp.asarray([[5, 9, 12], [7, 30, 4]], jnp.int32)

    def step(params, cache, mesh=None):
        logits, cache = forward(params, config, tokens, cache)
        if mesh is not None:
            cache = sharding.constrain_cache(cache, mesh, indivisible="replicate")
        return logits, cache

    want, want_cache = jax.jit(step, compiler_options=FAST_COMPILE)(params, empty)
    run = jax.jit(functools.partial(step, mesh=mesh), compiler_options=FAST_COMPILE)
    got, got_cache = run(placed, cache)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    _assert_equal(got_cache, want_cache)
    assert got_cache[0].keys.sharding.is_equivalent_to(
        jax.sharding.NamedSharding(mesh, PartitionSpec("data")), 4
    )
