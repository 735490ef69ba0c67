"""The rules, the declarations and the argument checks of ``jaxkv.sharding`` on a one-device mesh
(the 8-device behaviour is checked by ``test_multidevice.py``)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

import jaxkv.abstracts
import jaxkv.caches
from jaxkv import sharding
from jaxkv.abstracts import BaseCacheView
from jaxkv.caches import (
    HybridCache,
    LinearAttentionCacheMetadata,
    Mamba2CacheMetadata,
    MambaCacheMetadata,
    PagedCache,
    PagedCacheMetadata,
    RecurrentCache,
    TransformerCache,
    TransformerCacheMetadata,
)
from jaxkv.models import hybrid, mamba
from jaxkv.models.config import LlamaConfig
from jaxkv.models.llama import forward, params_to_device

MESH = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "tensor"))

METADATA = {
    "contiguous": TransformerCacheMetadata.create(2, 8, 2, 2, 4),
    "ring": TransformerCacheMetadata.create(2, 8, 1, 2, 4, sliding_window=4),
    "int8": TransformerCacheMetadata.create(2, 8, 1, 2, 4, kv_quantization="int8"),
    "int4": TransformerCacheMetadata.create(2, 8, 1, 2, 4, kv_quantization="int4"),
    "paged": PagedCacheMetadata.create(2, 6, 2, 2, 4, 2, 3),
    "paged_fp8": PagedCacheMetadata.create(1, 6, 2, 2, 4, 2, 3, kv_quantization="fp8"),
    "mamba": MambaCacheMetadata.create(2, 1, 8, state_size=4, conv_kernel=3),
    "mamba2": Mamba2CacheMetadata.create(2, 1, 4, 2, 4, 1, 3),
    "linear_attention": LinearAttentionCacheMetadata.create(2, 2, 4, 4),
}
CACHE_TYPES = {
    TransformerCacheMetadata: TransformerCache,
    PagedCacheMetadata: PagedCache,
    MambaCacheMetadata: RecurrentCache,
    Mamba2CacheMetadata: RecurrentCache,
    LinearAttentionCacheMetadata: RecurrentCache,
}
HYBRID = hybrid.HybridConfig(
    vocab_size=16,
    hidden_size=8,
    layer_kinds=("attention", "mamba", "none"),
    mlp_size=8,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
    mamba=mamba.MambaConfig(8, 8, state_size=2, conv_kernel=2),
)


def _cache(name):
    metadata = METADATA[name]
    return CACHE_TYPES[type(metadata)].init_cache(metadata)


def _caches():
    caches = {name: _cache(name) for name in METADATA}
    caches["hybrid"] = HybridCache.init_cache(HYBRID.cache_metadata(2, 8))
    caches["hybrid_paged"] = HybridCache.init_cache(
        HYBRID.cache_metadata(2, 8, attention_backend="paged", page_size=4)
    )
    return caches


# --------------------------------------------------------------------------------------------
# Declarations
# --------------------------------------------------------------------------------------------


def test_every_view_class_and_every_array_field_has_logical_axes():
    view_classes = [
        value
        for value in vars(jaxkv.caches).values()
        if isinstance(value, type) and issubclass(value, BaseCacheView)
    ]
    assert len(view_classes) == 5
    for cls in view_classes:
        assert cls in sharding.VIEW_AXES, cls.__name__
        arrays = {
            f.name for f in dataclasses.fields(cls) if not f.metadata.get("jaxkv_static", False)
        }
        assert arrays == set(sharding.VIEW_AXES[cls]), cls.__name__
        for axes in sharding.VIEW_AXES[cls].values():
            assert set(axes) - {None} <= set(sharding.LOGICAL_AXES)


def test_declared_axes_fit_the_real_arrays_of_every_family():
    for name, cache in _caches().items():
        shardings = sharding.cache_shardings(cache, MESH)  # raises if an axis count is off
        leaves = jax.tree_util.tree_leaves(cache)
        assert len(jax.tree_util.tree_leaves(shardings)) == len(leaves), name
        assert type(shardings) is type(cache)


def test_keys_rows_and_pools_get_the_declared_specs():
    mesh = MESH
    keys = sharding.cache_shardings(_cache("int8"), mesh)[0]
    assert keys.keys.spec == PartitionSpec("data", None, "tensor")
    assert keys.key_scales.spec == PartitionSpec("data", None, "tensor")
    assert keys.lengths.spec == keys.overflow.spec == PartitionSpec("data")
    pool = sharding.cache_shardings(_cache("paged"), mesh)[1]
    assert pool.key_pages.spec == PartitionSpec(None, "tensor")  # pages replicated
    state = sharding.cache_shardings(_cache("mamba2"), mesh)[0]
    assert state.conv_state.spec == PartitionSpec("data", "tensor")
    assert state.ssm_state.spec == PartitionSpec("data", "tensor")
    linear = sharding.cache_shardings(_cache("linear_attention"), mesh)[1]
    assert linear.state.spec == PartitionSpec("data", "tensor")


def test_rules_change_the_specs_and_absent_standard_axes_count_as_one():
    rules = {**sharding.DEFAULT_RULES, "sequence": "tensor", "kv_heads": None}
    view = sharding.cache_shardings(_cache("contiguous"), MESH, rules)[0]
    assert view.keys.spec == PartitionSpec("data", "tensor")
    data_only = Mesh(np.array(jax.devices()[:1]), ("data",))
    view = sharding.cache_shardings(_cache("contiguous"), data_only)[0]
    assert view.keys.spec == PartitionSpec("data")  # "tensor" is absent: size 1
    rows = Mesh(np.array(jax.devices()[:1]), ("rows",))
    view = sharding.cache_shardings(_cache("contiguous"), rows, {"batch": "rows"})[0]
    assert view.keys.spec == PartitionSpec("rows")


def test_a_single_view_gets_its_shardings_too():
    view = _cache("ring")[0]
    shardings = sharding.cache_shardings(view, MESH)
    assert shardings.positions.spec == PartitionSpec("data")


# --------------------------------------------------------------------------------------------
# Placement and sizes on one device
# --------------------------------------------------------------------------------------------


def test_shard_cache_keeps_every_value_and_places_every_array():
    for name, cache in _caches().items():
        placed = sharding.shard_cache(cache, MESH)
        for before, after in zip(
            jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(placed), strict=True
        ):
            assert isinstance(after.sharding, NamedSharding), name
            np.testing.assert_array_equal(np.asarray(before), np.asarray(after))


def test_init_sharded_cache_builds_the_empty_cache_in_place():
    for name, metadata in METADATA.items():
        built = sharding.init_sharded_cache(metadata, MESH)
        want = CACHE_TYPES[type(metadata)].init_cache(metadata)
        assert type(built) is type(want)
        for got, expected in zip(
            jax.tree_util.tree_leaves(built), jax.tree_util.tree_leaves(want), strict=True
        ):
            assert isinstance(got.sharding, NamedSharding) and got.dtype == expected.dtype, name
            np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_constrain_cache_inside_jit_keeps_the_sharding():
    cache = sharding.shard_cache(_cache("contiguous"), MESH)
    key = jnp.ones((2, 1, 2, 4), jnp.float32)

    @jax.jit
    def write(cache):
        views = [view.concatenate_to_cache(key, key)[1] for view in cache]
        return sharding.constrain_cache(cache.with_views(views), MESH)

    written = write(cache)
    expected = sharding.cache_shardings(written, MESH)
    for leaf, want in zip(
        jax.tree_util.tree_leaves(written), jax.tree_util.tree_leaves(expected), strict=True
    ):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
    assert np.asarray(written[0].lengths).tolist() == [1, 1]


def test_per_device_bytes_on_one_device_are_the_whole_cache():
    hybrids = {
        "hybrid": HYBRID.cache_metadata(2, 8),
        "hybrid_paged": HYBRID.cache_metadata(2, 8, attention_backend="paged", page_size=4),
    }
    for name, metadata in {**METADATA, **hybrids}.items():
        assert sharding.per_device_cache_bytes(metadata, MESH) == metadata.bytes_total(), name
    cache = _cache("ring")
    assert sharding.per_device_cache_bytes(cache, MESH) == METADATA["ring"].bytes_total()


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rules, error, match",
    [
        ({"rows": "data"}, ValueError, r"unknown logical axes \['rows'\]"),
        ({"batch": "tensr"}, ValueError, r"rules\['batch'\] names mesh axis 'tensr'"),
        ({"batch": ("data", "data")}, ValueError, r"rules\['batch'\] repeats a mesh axis"),
        ({"batch": 3}, TypeError, r"rules\['batch'\] must be a mesh axis name"),
        ({"batch": ()}, TypeError, r"rules\['batch'\] must be a mesh axis name"),
        ({"batch": ("data", 1)}, TypeError, r"rules\['batch'\] must name mesh axes by str"),
        ([("batch", "data")], TypeError, r"rules must be a mapping"),
        (
            {"batch": "tensor", "kv_heads": "tensor"},
            ValueError,
            r"keys: logical axes 'batch' and 'kv_heads' both map to mesh axis 'tensor'",
        ),
    ],
)
def test_bad_rules_are_refused_with_the_argument_named(rules, error, match):
    with pytest.raises(error, match=match):
        sharding.cache_shardings(_cache("contiguous"), MESH, rules)


def test_bad_meshes_policies_and_caches_are_refused():
    cache = _cache("contiguous")
    with pytest.raises(ValueError, match=r"indivisible must be one of \('error', 'replicate'\)"):
        sharding.shard_cache(cache, MESH, indivisible="drop")
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh, got tuple"):
        sharding.cache_shardings(cache, (1, 1))
    explicit = jax.make_mesh((1, 1), ("data", "tensor"), axis_types=(AxisType.Explicit,) * 2)
    with pytest.raises(ValueError, match=r"mesh axes \['data', 'tensor'\] are not AxisType.Auto"):
        sharding.cache_shardings(cache, explicit)
    with pytest.raises(TypeError, match="cache must be a jaxkv cache .* got dict"):
        sharding.cache_shardings({"keys": jnp.zeros(3)}, MESH)

    @jaxkv.abstracts.pytree_dataclass
    class OddMetadata(jaxkv.abstracts.BaseCacheMetadata):
        rows: int

        @classmethod
        def create(cls, rows):
            return cls(rows=rows)

    with pytest.raises(TypeError, match="metadata must be one of .* got OddMetadata"):
        sharding.per_device_cache_bytes(OddMetadata.create(2), MESH)


def test_an_undeclared_view_class_is_refused_by_name():
    @jaxkv.abstracts.pytree_dataclass
    class OddView(BaseCacheView):
        rows: jax.Array

        @classmethod
        def init(cls, metadata, *args, **kwargs):
            raise NotImplementedError

        def concatenate_to_cache(self, *args, **kwargs):
            raise NotImplementedError

    with pytest.raises(TypeError, match="no logical axes are declared for view class OddView"):
        sharding.cache_shardings(OddView(rows=jnp.zeros(2)), MESH)


def test_logical_spec_splits_flattened_heads_in_whole_heads():
    spec = sharding.logical_spec("w", (8, 12), ("embed", "heads"), MESH, units=(1, 4))
    assert spec == PartitionSpec(None, "tensor")
    with pytest.raises(ValueError, match=r"w: its logical axes \('batch',\) name 1 dimensions"):
        sharding.logical_spec("w", (8, 12), ("batch",), MESH)


# --------------------------------------------------------------------------------------------
# Model weights
# --------------------------------------------------------------------------------------------

LLAMA = LlamaConfig(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=24,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=4,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=32,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_ids=(2,),
)


def _llama_params():
    c = LLAMA
    rng = np.random.default_rng(0)

    def dense(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    layer = lambda: {  # noqa: E731
        "attn_norm": np.ones(c.hidden_size, np.float32),
        "wq": dense(c.hidden_size, q),
        "wk": dense(c.hidden_size, kv),
        "wv": dense(c.hidden_size, kv),
        "wo": dense(q, c.hidden_size),
        "mlp_norm": np.ones(c.hidden_size, np.float32),
        "w_gate": dense(c.hidden_size, c.intermediate_size),
        "w_up": dense(c.hidden_size, c.intermediate_size),
        "w_down": dense(c.intermediate_size, c.hidden_size),
    }
    return params_to_device(
        {
            "embed": dense(c.vocab_size, c.hidden_size),
            "lm_head": dense(c.hidden_size, c.vocab_size),
            "final_norm": np.ones(c.hidden_size, np.float32),
            "layers": [layer() for _ in range(c.num_layers)],
        }
    )


def test_the_tensor_parallel_layout_runs_the_same_llama_forward():
    fused = _llama_params()
    split = sharding.tensor_parallel_layout(fused, LLAMA)
    assert set(split["layers"][0]) == {
        "attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down",
    }  # fmt: skip
    assert split["layers"][0]["wk"].shape == (16, 8)
    metadata = TransformerCacheMetadata.create(2, 8, 2, 2, 4)
    tokens = jnp.asarray([[3, 4, 5], [6, 7, 8]], jnp.int32)
    run = jax.jit(
        lambda p, c: forward(p, LLAMA, tokens, c),
        compiler_options={"xla_backend_optimization_level": 0},
    )
    want, _ = run(fused, TransformerCache.init_cache(metadata))
    got, _ = run(split, TransformerCache.init_cache(metadata))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_param_shardings_split_heads_and_the_mlp_and_replicate_the_rest():
    params = sharding.shard_params(_llama_params(), MESH, config=LLAMA)
    layer = params["layers"][0]
    assert layer["wq"].sharding.spec == PartitionSpec(None, "tensor")
    assert layer["wk"].sharding.spec == PartitionSpec(None, "tensor")
    assert layer["wo"].sharding.spec == PartitionSpec("tensor")
    assert layer["w_gate"].sharding.spec == PartitionSpec(None, "tensor")
    assert layer["w_down"].sharding.spec == PartitionSpec("tensor")
    assert layer["attn_norm"].sharding.spec == PartitionSpec()
    assert params["lm_head"].sharding.spec == PartitionSpec()
    fused = sharding.param_shardings(_llama_params(), MESH, config=LLAMA)
    assert fused["layers"][0]["wqkv"].spec == PartitionSpec()  # fused: see the module docstring
    vocab = sharding.param_shardings(
        _llama_params(), MESH, {**sharding.DEFAULT_RULES, "vocab": "tensor"}, config=LLAMA
    )
    assert vocab["lm_head"].spec == PartitionSpec(None, "tensor")


def test_hybrid_params_split_attention_and_mlp_and_replicate_mamba():
    params = jax.eval_shape(lambda: hybrid.init_hybrid(jax.random.PRNGKey(0), HYBRID))
    shardings = sharding.param_shardings(params, MESH, config=HYBRID)
    attention, recurrent = shardings["layers"][0], shardings["layers"][1]
    assert attention["mixer"]["q_proj"].spec == PartitionSpec(None, "tensor")
    assert attention["mixer"]["out_proj"].spec == PartitionSpec("tensor")
    assert attention["up"].spec == PartitionSpec(None, "tensor")
    assert all(s.spec == PartitionSpec() for s in jax.tree_util.tree_leaves(recurrent["mixer"]))
    assert "mixer" not in shardings["layers"][2]


def test_bad_params_and_configs_are_refused():
    params = _llama_params()
    with pytest.raises(TypeError, match="config must have an int head_dim"):
        sharding.param_shardings(params, MESH, config=object())
    odd = {**params, "layers": [{**params["layers"][0], "bias": jnp.zeros(3)}]}
    with pytest.raises(ValueError, match=r"params\['layers'\]\[0\]\['bias'\] has no declared"):
        sharding.param_shardings(odd, MESH, config=LLAMA)
    with pytest.raises(TypeError, match="params must be a dict with 'layers'"):
        sharding.param_shardings([1, 2], MESH, config=LLAMA)
    with pytest.raises(ValueError, match="config has 3 layer kinds but params hold 2 layers"):
        sharding.param_shardings(params, MESH, config=HYBRID)
    narrow = dataclasses.replace(LLAMA, num_kv_heads=4)
    with pytest.raises(ValueError, match=r"'wqkv'\] has 32 columns; expected .* = 48"):
        sharding.tensor_parallel_layout(params, narrow)
