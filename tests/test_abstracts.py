"""The four base classes: abstract methods, PyTree behaviour, serialisation round trips, and a
cache written by an extension author against the public API alone."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxkv
from jaxkv import (
    BaseCache,
    BaseCacheMetadata,
    BaseCacheView,
    BaseRunTimeMetadata,
    pytree_dataclass,
    static_field,
)

# ------------------------------------------------------------------------------------------
# Abstract methods are enforced
# ------------------------------------------------------------------------------------------


def test_metadata_without_create_cannot_be_instantiated():
    @pytree_dataclass
    class NoCreate(BaseCacheMetadata):
        size: int = 1

    with pytest.raises(TypeError, match="create"):
        NoCreate()


def test_view_without_init_or_concatenate_cannot_be_instantiated():
    class NoInit(BaseCacheView):
        def concatenate_to_cache(self, *args, **kwargs):
            return None

    class NoConcatenate(BaseCacheView):
        @classmethod
        def init(cls, metadata, *args, **kwargs):
            return cls()

    with pytest.raises(TypeError, match="init"):
        NoInit()
    with pytest.raises(TypeError, match="concatenate_to_cache"):
        NoConcatenate()


def test_cache_without_init_cache_or_init_empty_cannot_be_instantiated():
    class NoInitCache(BaseCache):
        @classmethod
        def init_empty(cls, *args, **kwargs):
            return cls()

    class NoInitEmpty(BaseCache):
        @classmethod
        def init_cache(cls, metadata, *args, **kwargs):
            return cls()

    with pytest.raises(TypeError, match="init_cache"):
        NoInitCache()
    with pytest.raises(TypeError, match="init_empty"):
        NoInitEmpty()


def test_runtime_metadata_is_concrete():
    @pytree_dataclass
    class Empty(BaseRunTimeMetadata):
        pass

    assert Empty().to_dict() == {}


# ------------------------------------------------------------------------------------------
# Serialisation
# ------------------------------------------------------------------------------------------


@pytree_dataclass
class InnerMetadata(BaseCacheMetadata):
    name: str
    scale: float

    @classmethod
    def create(cls, name: str = "inner", scale: float = 0.5) -> InnerMetadata:
        return cls(name=name, scale=scale)

    def validate(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"InnerMetadata: scale must be > 0, got {self.scale}")


@pytree_dataclass
class RichMetadata(BaseCacheMetadata):
    count: int
    ratio: float
    flag: bool
    label: str
    nothing: None
    shape: tuple[int, ...]
    dtype: np.dtype
    inner: InnerMetadata
    window: int | None = None

    @classmethod
    def create(cls, **kwargs: Any) -> RichMetadata:
        return cls(**kwargs)

    def validate(self) -> None:
        if self.count < 0:
            raise ValueError(f"RichMetadata: count must be >= 0, got {self.count}")


@pytree_dataclass
class StepInfo(BaseRunTimeMetadata):
    positions: jax.Array
    table: jax.Array
    weights: jax.Array | None
    num_seqs: int = static_field(0)
    mode: str = static_field("decode")


def _rich(**overrides) -> RichMetadata:
    fields = dict(
        count=3,
        ratio=0.1 + 0.2,  # a float whose repr needs all 17 digits
        flag=True,
        label="ünïcode ✓",
        nothing=None,
        shape=(2, 3, 4),
        dtype=np.dtype(jnp.bfloat16),
        inner=InnerMetadata.create("k", 1e-300),
        window=None,
    )
    fields.update(overrides)
    return RichMetadata.create(**fields)


def _step() -> StepInfo:
    return StepInfo(
        positions=jnp.arange(5, dtype=jnp.int32) - 1,
        table=jnp.asarray([[1.5, -2.25], [3.0, np.inf]], jnp.bfloat16),
        weights=jnp.asarray(np.random.default_rng(0).standard_normal((2, 3)), jnp.float32),
        num_seqs=2,
        mode="prefill",
    )


def _assert_same_step(a: StepInfo, b: StepInfo) -> None:
    for name in ("positions", "table", "weights"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert (a.num_seqs, a.mode) == (b.num_seqs, b.mode)


def test_metadata_round_trips_are_exact():
    metadata = _rich()
    for restored in (
        RichMetadata.from_dict(metadata.to_dict()),
        RichMetadata.from_json(metadata.to_json()),
        RichMetadata.from_json(metadata.to_json(indent=2)),
    ):
        assert restored == metadata
        assert type(restored.shape) is tuple and restored.ratio == 0.1 + 0.2
        assert restored.dtype == np.dtype(jnp.bfloat16)
        assert restored.inner.scale == 1e-300
    assert hash(RichMetadata.from_json(metadata.to_json())) == hash(metadata)
    assert isinstance(metadata.to_dict()["inner"], dict)


def test_runtime_metadata_round_trips_arrays_exactly():
    step = _step()
    _assert_same_step(StepInfo.from_dict(step.to_dict()), step)
    _assert_same_step(StepInfo.from_json(step.to_json()), step)
    scalar = step.replace(weights=jnp.asarray(3.5, jnp.bfloat16))
    assert StepInfo.from_json(scalar.to_json()).weights.shape == ()
    empty = step.replace(weights=None)
    assert StepInfo.from_json(empty.to_json()).weights is None


def test_from_dict_rejects_unknown_missing_and_mistyped_fields():
    data = _rich().to_dict()
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['extra'\]"):
        RichMetadata.from_dict({**data, "extra": 1})
    partial = dict(data)
    del partial["label"]
    with pytest.raises(ValueError, match=r"missing required field\(s\) \['label'\]"):
        RichMetadata.from_dict(partial)
    with pytest.raises(TypeError, match="field 'count' expects int, got str"):
        RichMetadata.from_dict({**data, "count": "3"})
    with pytest.raises(TypeError, match="field 'flag' expects bool"):
        RichMetadata.from_dict({**data, "flag": 1})
    with pytest.raises(TypeError, match="field 'shape'"):
        RichMetadata.from_dict({**data, "shape": (2, "x")})
    with pytest.raises(TypeError, match="field 'dtype'"):
        RichMetadata.from_dict({**data, "dtype": "float32"})
    with pytest.raises(ValueError, match="scale must be > 0"):
        RichMetadata.from_dict({**data, "inner": {"name": "k", "scale": -1.0}})
    with pytest.raises(TypeError, match="expects a dict"):
        RichMetadata.from_dict([1, 2])
    with pytest.raises(ValueError, match="invalid JSON"):
        RichMetadata.from_json("{not json")
    with pytest.raises(ValueError, match="unknown field"):
        StepInfo.from_json('{"positions": [1], "bogus": 2}')


def test_replace_validates_and_rejects_unknown_fields():
    metadata = _rich()
    assert metadata.replace(count=7).count == 7
    with pytest.raises(ValueError, match="count must be >= 0, got -1"):
        metadata.replace(count=-1)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['cnt'\]"):
        metadata.replace(cnt=1)
    step = _step().replace(num_seqs=5)
    assert step.num_seqs == 5
    with pytest.raises(ValueError, match="unknown field"):
        _step().replace(nope=1)


def test_metadata_fields_are_all_static_and_hashable():
    metadata = _rich()
    assert jax.tree_util.tree_leaves(metadata) == []
    assert jax.tree_util.tree_structure(metadata) == jax.tree_util.tree_structure(_rich())
    assert metadata == _rich() and metadata != _rich(count=4)
    with pytest.raises(AttributeError):
        metadata.count = 5


def test_runtime_metadata_arrays_are_leaves_and_sizes_static():
    step = _step()
    leaves, treedef = jax.tree_util.tree_flatten(step)
    assert len(leaves) == 3
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    _assert_same_step(rebuilt, step)
    traces = []

    @jax.jit
    def f(info: StepInfo):
        traces.append(info.num_seqs)
        return info.positions * info.num_seqs

    np.testing.assert_array_equal(np.asarray(f(step)), np.asarray(step.positions) * 2)
    f(step.replace(positions=step.positions + 1))
    assert traces == [2]
    f(step.replace(num_seqs=3))
    assert traces == [2, 3]


def test_static_field_and_decorator_errors():
    with pytest.raises(TypeError, match="expects a class"):
        pytree_dataclass(lambda: None)


# ------------------------------------------------------------------------------------------
# An extension author's cache, written against the public base classes only
# ------------------------------------------------------------------------------------------


@pytree_dataclass
class RunningSumMetadata(jaxkv.BaseCacheMetadata):
    """Keeps a running sum of all values written, per row: a toy recurrent cache."""

    batch_size: int
    width: int
    num_layers: int

    @classmethod
    def create(cls, batch_size: int, width: int, num_layers: int) -> RunningSumMetadata:
        return cls(batch_size=batch_size, width=width, num_layers=num_layers)

    def validate(self) -> None:
        for name in ("batch_size", "width", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"RunningSumMetadata: {name} must be >= 1")


@pytree_dataclass
class RunningSumView(jaxkv.BaseCacheView):
    total: jax.Array
    count: jax.Array
    metadata: RunningSumMetadata = static_field()
    layer_index: int | None = static_field(None)

    @classmethod
    def init(cls, metadata: RunningSumMetadata, layer_index: int | None = None) -> RunningSumView:
        return cls(
            total=jnp.zeros((metadata.batch_size, metadata.width)),
            count=jnp.zeros((metadata.batch_size,), jnp.int32),
            metadata=metadata,
            layer_index=layer_index,
        )

    def concatenate_to_cache(self, values: jax.Array):
        total = self.total + values.sum(axis=1)
        view = RunningSumView(total, self.count + values.shape[1], self.metadata, self.layer_index)
        return total / view.count[:, None], view


@pytree_dataclass
class RunningSumCache(jaxkv.BaseCache):
    views: tuple[RunningSumView | None, ...]

    @classmethod
    def init_cache(cls, metadata: RunningSumMetadata) -> RunningSumCache:
        return cls(tuple(RunningSumView.init(metadata, i) for i in range(metadata.num_layers)))

    @classmethod
    def init_empty(cls, num_layers: int) -> RunningSumCache:
        return cls((None,) * num_layers)


def test_user_defined_cache_works_under_jit_with_donation():
    metadata = RunningSumMetadata.create(batch_size=2, width=3, num_layers=2)
    cache = RunningSumCache.init_cache(metadata)

    @jax.jit
    def step(cache: RunningSumCache, values: jax.Array):
        means = []
        for index, view in enumerate(cache):
            mean, view = view.concatenate_to_cache(values * (index + 1))
            means.append(mean)
            cache = cache.replace_view(index, view)
        return means, cache

    donated = jax.jit(step.__wrapped__, donate_argnums=0)
    values = jnp.ones((2, 4, 3))
    means, cache = donated(cache, values)
    means, cache = donated(cache, 3 * values)
    np.testing.assert_allclose(np.asarray(means[0]), 2.0)
    np.testing.assert_allclose(np.asarray(means[1]), 4.0)
    assert len(cache) == 2 and cache[1].layer_index == 1
    assert list(RunningSumCache.init_empty(3)) == [None] * 3
    restored = RunningSumMetadata.from_json(metadata.to_json())
    assert restored == metadata
    with pytest.raises(ValueError, match="width must be >= 1"):
        metadata.replace(width=0)


# ------------------------------------------------------------------------------------------
# Seed details: scalar *types* in metadata, item assignment
# ------------------------------------------------------------------------------------------


@pytree_dataclass
class _ScalarTypeMetadata(BaseCacheMetadata):
    """Metadata in the style of EasyDeL configs: dtypes held as scalar types."""

    dtype: Any = jnp.bfloat16
    param_dtype: Any = np.float32
    kinds: tuple = (jnp.float16, np.int8)

    @classmethod
    def create(cls, **kwargs):
        return cls(**kwargs)


def test_scalar_types_round_trip_exactly_through_json():
    metadata = _ScalarTypeMetadata.create()
    restored = _ScalarTypeMetadata.from_json(metadata.to_json())
    assert restored.dtype is jnp.bfloat16
    assert restored.param_dtype is np.float32
    assert restored.kinds[0] is jnp.float16 and restored.kinds[1] is np.int8
    assert restored == metadata and hash(restored) == hash(metadata)
    assert _ScalarTypeMetadata.from_dict(metadata.to_dict()) == metadata
    float8 = _ScalarTypeMetadata.create(dtype=jnp.float8_e4m3fn, param_dtype=jnp.int4)
    assert _ScalarTypeMetadata.from_json(float8.to_json()) == float8
    with pytest.raises(ValueError, match="unknown jax.numpy scalar type 'nonsense'"):
        _ScalarTypeMetadata.from_json(
            '{"dtype": {"__scalar_type__": {"module": "jax.numpy", "name": "nonsense"}}}'
        )


def test_item_assignment_points_to_replace_view():
    from jaxkv.caches import TransformerCache, TransformerCacheMetadata

    cache = TransformerCache.init_cache(TransformerCacheMetadata.create(1, 4, 2, 1, 2))
    with pytest.raises(TypeError, match=r"cache = cache.replace_view\(0, view\)"):
        cache[0] = cache[1]
    assert cache.replace_view(0, cache[1])[0] is cache[1]
