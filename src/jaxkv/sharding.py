"""Sharding over a device mesh: the logical axes of every cache array and model weight, the rules
that map them to mesh axes, and the ``NamedSharding``\\ s, placement, constraints and per-device
sizes that follow.

Partitioning is JAX's own SPMD: a cache (or a weight) is placed with ``jax.device_put`` under a
``jax.sharding.NamedSharding``, a jitted step keeps it there with
``jax.lax.with_sharding_constraint``, and XLA partitions the computation. Nothing here moves data
by hand, so a step runs the same on one device, on 8 simulated CPU devices or on a multi-host mesh.

Three steps, as in MaxText:

1. *Logical axes*, declared once per view class in ``VIEW_AXES`` (field name -> one name per
   dimension, ``None`` for a dimension that is never split). Contiguous and ring keys/values are
   ``[batch, slots, kv_heads, head_dim]`` -> ``("batch", "sequence", "kv_heads", "head_dim")``;
   their quantisation scales ``[batch, slots, kv_heads, groups]`` follow them, minus the channel
   dimension; paged pools ``[pages, kv_heads, page_size, head_dim]`` ->
   ``("pages", "kv_heads", None, "head_dim")``; recurrent states ``("batch", "heads" or
   "channels", ...)``; every per-row ``lengths`` / ``overflow`` ``("batch",)``.
2. *Rules*: logical axis -> mesh axis (or a tuple of mesh axes, or ``None``: replicated).
   ``DEFAULT_RULES`` split rows over ``"data"`` and heads, channels and the MLP width over
   ``"tensor"``; the rest is replicated. The standard axes ``"data"`` and ``"tensor"`` may be
   absent from a mesh (they count as size 1, so the default rules fit a 1-D mesh too); any other
   mesh axis a rule names must exist, so that a misspelt axis fails instead of silently
   replicating.
3. *Shardings*: ``cache_shardings`` gives a PyTree of ``NamedSharding`` shaped like the cache,
   ``shard_cache`` places a cache (``init_sharded_cache`` builds an empty one in its shards),
   ``constrain_cache`` pins one inside ``jax.jit`` (call it on
   the new cache after ``concatenate_to_cache`` or a row operation, so a step never leaves the
   cache gathered or resharded), ``per_device_cache_bytes`` says what each device holds.
   ``param_shardings`` / ``shard_params`` do the same for the Llama and hybrid reference models.

A step on a mesh (``AxisType.Auto`` axes: the caches' scatters rely on XLA propagating the
partitioning, so meshes with explicit axis types are refused)::

    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    params = shard_params(params, mesh, config=config)
    cache = init_sharded_cache(metadata, mesh)

    @functools.partial(jax.jit, donate_argnums=1)
    def step(params, cache, tokens):
        logits, cache = llama.forward(params, config, tokens, cache)
        return logits, constrain_cache(cache, mesh)

Why a registry here and not a class attribute on each view: partitioning is one concept, and
keeping every declaration next to the rules lets a reader see the whole layout of a mesh in one
file; the caches stay free of any notion of devices (``jaxkv.caches`` needs no edit), and a test
checks that every array field of every view class is declared, so a new field cannot go
unplaced. A view class not listed (a subclass of a listed one inherits its entry) is refused with
a ``TypeError`` naming it.

Paged pools are replicated over ``"data"`` (``pages -> None``). Page ids are global: the host's
``jaxkv.pages.PageManager`` hands any free page of the pool to any sequence, and every row's page
table may point anywhere in it. Splitting the pool over ``"data"`` would need each data shard to
own a range of page ids and the manager to allocate a sequence's pages inside its shard's range
(one manager per shard, rows pinned to shards); without that, attention of a row would gather
pages from every shard. So the pool is split only over heads (``kv_heads -> "tensor"``), which
needs no change on the host, and each device holds the whole pool of its heads.

A dimension that does not divide over its mesh axes (SmolLM2's 3 KV heads on a tensor axis of
4) raises a ``ValueError`` naming the array, the logical axis, the size and the mesh axes' size,
unless ``indivisible="replicate"`` is passed, which replicates that dimension (an explicit,
documented fallback: correct, but every device then holds the whole dimension). The same holds
for rows: after ``select``, ``repeat`` or ``extract`` a batch that no longer divides over
``"data"`` needs ``indivisible="replicate"`` (or other rules).

Model weights. Tensor parallelism splits each attention projection by whole heads (the query,
key and value columns, the output projection's rows) and the MLP's inner width (gate/up columns,
down rows), so attention and the MLP run locally on each device's heads and channels and only the
two residual additions of a block reduce over ``"tensor"``. ``jaxkv.models.llama`` fuses
``wq|wk|wv`` into one ``wqkv`` and ``w_gate|w_up`` into ``w_gate_up``; a contiguous split of
those columns would give one device only query heads and another only values (or only gates), so
``shard_params`` first restores one matrix per projection (``tensor_parallel_layout``), which
``jaxkv.models.llama.forward`` accepts as well. Norms and embeddings are replicated
(``embed`` and ``vocab`` map to ``None``; a rule ``vocab -> "tensor"`` splits the embedding
and the LM head by vocabulary, under the same ``indivisible`` policy). The hybrid model's Mamba
and Mamba2 mixers are replicated: their input projections fuse ``x|z`` (and ``B|C|dt``) the
same way; its attention, linear-attention and MLP weights are split like Llama's.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxkv.abstracts import BaseCache, BaseCacheMetadata, BaseCacheView
from jaxkv.caches.hybrid import HybridCache, HybridCacheMetadata
from jaxkv.caches.paged import PagedCache, PagedCacheMetadata, PagedCacheView
from jaxkv.caches.recurrent import (
    LinearAttentionCacheMetadata,
    LinearAttentionCacheView,
    Mamba2CacheMetadata,
    Mamba2CacheView,
    MambaCacheMetadata,
    MambaCacheView,
    RecurrentCache,
)
from jaxkv.caches.transformer import (
    TransformerCache,
    TransformerCacheMetadata,
    TransformerCacheView,
)

__all__ = [
    "DEFAULT_RULES",
    "INDIVISIBLE_POLICIES",
    "LOGICAL_AXES",
    "PARAM_AXES",
    "STANDARD_MESH_AXES",
    "VIEW_AXES",
    "cache_shardings",
    "constrain_cache",
    "init_sharded_cache",
    "logical_spec",
    "param_shardings",
    "per_device_cache_bytes",
    "shard_cache",
    "shard_params",
    "tensor_parallel_layout",
]

LogicalAxes = tuple[str | None, ...]
Rules = Mapping[str, str | tuple[str, ...] | None]

LOGICAL_AXES: tuple[str, ...] = (
    "batch",
    "sequence",
    "kv_heads",
    "heads",
    "head_dim",
    "channels",
    "state",
    "pages",
    "embed",
    "mlp",
    "vocab",
)
"""Every logical axis a rule may name."""

DEFAULT_RULES: Rules = types.MappingProxyType(
    {
        "batch": "data",
        "sequence": None,
        "kv_heads": "tensor",
        "heads": "tensor",
        "head_dim": None,
        "channels": "tensor",
        "state": None,
        "pages": None,
        "embed": None,
        "mlp": "tensor",
        "vocab": None,
    }
)
"""Rows over ``"data"``; heads, channels and the MLP width over ``"tensor"``; paged pools,
sequence slots, head dims, the residual width and the vocabulary replicated. Rules passed instead
replace these whole: a logical axis they do not name is replicated
(``{**DEFAULT_RULES, "vocab": "tensor"}`` changes one)."""

STANDARD_MESH_AXES: tuple[str, ...] = ("data", "tensor")
"""Mesh axes a rule may name although the mesh lacks them (they count as size 1)."""

INDIVISIBLE_POLICIES: tuple[str, ...] = ("error", "replicate")
"""What to do with a dimension that does not divide over its mesh axes."""

_ROWS: LogicalAxes = ("batch",)
_ROW_KV: LogicalAxes = ("batch", "sequence", "kv_heads", "head_dim")
_ROW_KV_SCALES: LogicalAxes = ("batch", "sequence", "kv_heads", None)
_POOL: LogicalAxes = ("pages", "kv_heads", None, "head_dim")
_POOL_SCALES: LogicalAxes = ("pages", "kv_heads", None, None)

VIEW_AXES: Mapping[type, Mapping[str, LogicalAxes]] = types.MappingProxyType(
    {
        TransformerCacheView: types.MappingProxyType(
            {
                "keys": _ROW_KV,  # [batch, slots, kv_heads, stored head_dim]
                "values": _ROW_KV,  # [batch, slots, value_heads, stored value_dim]
                "key_scales": _ROW_KV_SCALES,  # [batch, slots, kv_heads, groups]
                "value_scales": _ROW_KV_SCALES,
                "lengths": _ROWS,
                "positions": ("batch", "sequence"),  # [batch, slots] (rings only)
                "overflow": _ROWS,
                "rollback_floor": _ROWS,  # rings with rollback_depth only
                "rollback_refused": _ROWS,
            }
        ),
        PagedCacheView: types.MappingProxyType(
            {
                "key_pages": _POOL,  # [num_pages, kv_heads, page_size, stored head_dim]
                "value_pages": _POOL,
                "key_scales": _POOL_SCALES,  # [num_pages, kv_heads, page_size, groups]
                "value_scales": _POOL_SCALES,
            }
        ),
        MambaCacheView: types.MappingProxyType(
            {
                "conv_state": ("batch", "channels", None),  # [batch, d_inner, K - 1]
                "ssm_state": ("batch", "channels", "state"),  # [batch, d_inner, N]
                "lengths": _ROWS,
                # With rollback_depth D: [batch, D, *state] checkpoints follow their states.
                "conv_checkpoints": ("batch", None, "channels", None),
                "state_checkpoints": ("batch", None, "channels", "state"),
                "rollback_floor": _ROWS,
                "rollback_refused": _ROWS,
            }
        ),
        Mamba2CacheView: types.MappingProxyType(
            {
                "conv_state": ("batch", "channels", None),  # [batch, d_inner + 2GN, K - 1]
                "ssm_state": ("batch", "heads", None, "state"),  # [batch, H, P, N]
                "lengths": _ROWS,
                "conv_checkpoints": ("batch", None, "channels", None),
                "state_checkpoints": ("batch", None, "heads", None, "state"),
                "rollback_floor": _ROWS,
                "rollback_refused": _ROWS,
            }
        ),
        LinearAttentionCacheView: types.MappingProxyType(
            {
                "state": ("batch", "heads", None, None),  # [batch, H, key_dim, value_dim]
                "lengths": _ROWS,
                "state_checkpoints": ("batch", None, "heads", None, None),
                "rollback_floor": _ROWS,
                "rollback_refused": _ROWS,
            }
        ),
    }
)
"""Logical axes of every array field of every view class, one name (or ``None``) per dimension."""

_CACHE_TYPES: Mapping[type, type] = types.MappingProxyType(
    {
        TransformerCacheMetadata: TransformerCache,
        PagedCacheMetadata: PagedCache,
        MambaCacheMetadata: RecurrentCache,
        Mamba2CacheMetadata: RecurrentCache,
        LinearAttentionCacheMetadata: RecurrentCache,
        HybridCacheMetadata: HybridCache,
    }
)
"""The cache class each metadata class builds (for sizing a cache from its metadata alone)."""


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def _check_mesh(owner: str, mesh: Any) -> Mesh:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{owner}: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    explicit = [
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind != AxisType.Auto
    ]
    if explicit:
        raise ValueError(
            f"{owner}: mesh axes {explicit} are not AxisType.Auto (got axis types "
            f"{tuple(mesh.axis_types)}); expected a mesh whose partitioning XLA propagates, e.g. "
            f"jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))"
        )
    return mesh


def _check_indivisible(owner: str, indivisible: Any) -> str:
    if indivisible not in INDIVISIBLE_POLICIES:
        raise ValueError(
            f"{owner}: indivisible must be one of {INDIVISIBLE_POLICIES}, got {indivisible!r}"
        )
    return indivisible


def _check_rules(owner: str, rules: Any, mesh: Mesh) -> dict[str, tuple[str, ...]]:
    """``rules`` as ``{logical axis: mesh axes present in the mesh}`` (every logical axis)."""
    if not isinstance(rules, Mapping):
        raise TypeError(
            f"{owner}: rules must be a mapping of logical axis -> mesh axis, got "
            f"{type(rules).__name__}"
        )
    unknown = sorted(str(name) for name in rules if name not in LOGICAL_AXES)
    if unknown:
        raise ValueError(
            f"{owner}: rules name unknown logical axes {unknown}; expected some of {LOGICAL_AXES}"
        )
    resolved = {}
    for name in LOGICAL_AXES:
        target = rules.get(name)
        if target is None:
            axes: tuple[Any, ...] = ()
        elif isinstance(target, str):
            axes = (target,)
        elif isinstance(target, tuple) and target:
            axes = target
        else:
            raise TypeError(
                f"{owner}: rules[{name!r}] must be a mesh axis name, a non-empty tuple of them "
                f"or None, got {target!r}"
            )
        for axis in axes:
            if not isinstance(axis, str):
                raise TypeError(
                    f"{owner}: rules[{name!r}] must name mesh axes by str, got {target!r}"
                )
            if axis not in mesh.axis_names and axis not in STANDARD_MESH_AXES:
                raise ValueError(
                    f"{owner}: rules[{name!r}] names mesh axis {axis!r}, which the mesh (axes "
                    f"{tuple(mesh.axis_names)}) lacks; expected one of its axes (only the "
                    f"standard axes {STANDARD_MESH_AXES} may be absent, as size 1)"
                )
        if len(set(axes)) != len(axes):
            raise ValueError(f"{owner}: rules[{name!r}] repeats a mesh axis: {target!r}")
        resolved[name] = tuple(axis for axis in axes if axis in mesh.axis_names)
    return resolved


def logical_spec(
    name: str,
    shape: tuple[int, ...],
    axes: LogicalAxes,
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    *,
    indivisible: str = "error",
    units: tuple[int, ...] | None = None,
) -> PartitionSpec:
    """The ``PartitionSpec`` of one array from its logical axes.

    Args:
        name: what the array is, for error messages (e.g. ``"views[0].keys"``).
        shape: the array's shape.
        axes: one logical axis (or ``None``) per dimension.
        mesh, rules, indivisible: as for ``cache_shardings``.
        units: per dimension, how many elements make one indivisible unit (a head's width for a
            flattened ``heads * head_dim`` dimension; default 1): a dimension is split only in
            whole units.

    Raises:
        ValueError: ``axes`` that do not fit ``shape``; a dimension whose units do not divide
            over its mesh axes (with ``indivisible="error"``); one mesh axis used by two
            dimensions of the array.
    """
    owner = "logical_spec"
    _check_mesh(owner, mesh)
    resolved = _check_rules(owner, rules, mesh)
    indivisible = _check_indivisible(owner, indivisible)
    return _spec(name, tuple(shape), axes, resolved, mesh, indivisible, units)


def _spec(
    name: str,
    shape: tuple[int, ...],
    axes: LogicalAxes,
    rules: dict[str, tuple[str, ...]],
    mesh: Mesh,
    indivisible: str,
    units: tuple[int, ...] | None = None,
) -> PartitionSpec:
    if len(axes) != len(shape):
        raise ValueError(
            f"{name}: its logical axes {axes} name {len(axes)} dimensions, but the array has "
            f"shape {shape}"
        )
    units = (1,) * len(shape) if units is None else units
    entries: list[Any] = []
    used: dict[str, str] = {}
    for size, axis, unit in zip(shape, axes, units, strict=True):
        mesh_axes = () if axis is None else rules[axis]
        if not mesh_axes:
            entries.append(None)
            continue
        count = math.prod(mesh.shape[a] for a in mesh_axes)
        pieces = size // unit
        if pieces * unit != size or pieces % count:
            if indivisible == "error":
                what = f"{pieces} (in units of {unit} elements)" if unit != 1 else f"{size}"
                raise ValueError(
                    f"{name}: logical axis {axis!r} has size {what}, which does not divide over "
                    f"mesh axes {mesh_axes} of size {count}; pass indivisible='replicate' to "
                    f"replicate this dimension instead"
                )
            entries.append(None)
            continue
        for mesh_axis in mesh_axes:
            if mesh_axis in used:
                raise ValueError(
                    f"{name}: logical axes {used[mesh_axis]!r} and {axis!r} both map to mesh axis "
                    f"{mesh_axis!r}; an array can be split over a mesh axis only once (change "
                    f"the rules)"
                )
            used[mesh_axis] = axis
        entries.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


# --------------------------------------------------------------------------------------------
# Caches
# --------------------------------------------------------------------------------------------


def _declared_axes(view: BaseCacheView) -> Mapping[str, LogicalAxes]:
    for cls in type(view).__mro__:
        if cls in VIEW_AXES:
            return VIEW_AXES[cls]
    known = ", ".join(cls.__name__ for cls in VIEW_AXES)
    raise TypeError(
        f"no logical axes are declared for view class {type(view).__name__}; expected one of "
        f"{known} (or a subclass)"
    )


def _map_view(view: BaseCacheView, layer: Any, fn: Callable[[str, Any, LogicalAxes], Any]) -> Any:
    declared = _declared_axes(view)

    def leaf(path: tuple[Any, ...], array: Any) -> Any:
        field = path[0].name
        name = f"layer {layer} {type(view).__name__}.{field}"
        if field not in declared:
            raise TypeError(f"{name}: no logical axes are declared for this field")
        return fn(name, array, declared[field])

    return jax.tree_util.tree_map_with_path(leaf, view)


def _map_cache(owner: str, cache: Any, fn: Callable[[str, Any, LogicalAxes], Any]) -> Any:
    """``cache`` (a ``BaseCache`` or one view) with every array leaf replaced by ``fn(name,
    array, logical axes)``; ``None`` views and fields stay ``None``."""
    if isinstance(cache, BaseCacheView):
        return _map_view(cache, getattr(cache, "layer_index", None), fn)
    if not isinstance(cache, BaseCache):
        raise TypeError(
            f"{owner}: cache must be a jaxkv cache (BaseCache) or view (BaseCacheView), got "
            f"{type(cache).__name__}"
        )
    return cache.with_views(
        None if view is None else _map_view(view, layer, fn)
        for layer, view in enumerate(cache.views)
    )


def cache_shardings(
    cache: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES, *, indivisible: str = "error"
) -> Any:
    """The ``NamedSharding`` of every array of ``cache``, as a PyTree shaped like it.

    Args:
        cache: any jaxkv cache or view (its leaves may be arrays, tracers or
            ``jax.ShapeDtypeStruct``: only shapes are read).
        mesh: the device mesh.
        rules: logical axis -> mesh axis (``DEFAULT_RULES``).
        indivisible: ``"error"`` (default) or ``"replicate"``: what a dimension that does not
            divide over its mesh axes gets.

    Returns:
        An object of the cache's type whose array leaves are ``NamedSharding``\\ s (usable as
        ``jax.device_put``'s target, ``jax.jit``'s ``in_shardings``/``out_shardings`` or
        ``with_sharding_constraint``'s shardings).

    Raises:
        TypeError: not a cache, a mesh that is not a ``Mesh``, or a view class or field with no
            declared logical axes.
        ValueError: unknown logical axes or mesh axes in ``rules``, a bad ``indivisible``, or a
            dimension that does not divide (see ``logical_spec``).
    """
    owner = "cache_shardings"
    mesh = _check_mesh(owner, mesh)
    resolved = _check_rules(owner, rules, mesh)
    indivisible = _check_indivisible(owner, indivisible)

    def sharding(name: str, array: Any, axes: LogicalAxes) -> NamedSharding:
        return NamedSharding(
            mesh, _spec(name, tuple(array.shape), axes, resolved, mesh, indivisible)
        )

    return _map_cache(owner, cache, sharding)


def shard_cache(
    cache: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES, *, indivisible: str = "error"
) -> Any:
    """``cache`` placed on ``mesh`` under ``cache_shardings`` (``jax.device_put``; a new cache,
    the old one is untouched). Same arguments and errors as ``cache_shardings``."""
    return jax.device_put(cache, cache_shardings(cache, mesh, rules, indivisible=indivisible))


def constrain_cache(
    cache: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES, *, indivisible: str = "error"
) -> Any:
    """``cache`` with ``jax.lax.with_sharding_constraint`` on every array: inside ``jax.jit``,
    call it on the cache a write (``concatenate_to_cache``) or a row operation returns, so the
    step's output stays where ``cache_shardings`` puts it instead of wherever XLA's propagation
    lands. Same arguments and errors as ``cache_shardings``."""
    return jax.lax.with_sharding_constraint(
        cache, cache_shardings(cache, mesh, rules, indivisible=indivisible)
    )


def _abstract_cache(owner: str, metadata: BaseCacheMetadata) -> tuple[Callable[[], Any], Any]:
    """``(build, shapes)``: a function building an empty cache for ``metadata`` and the cache's
    ``jax.ShapeDtypeStruct`` leaves (nothing is allocated)."""
    cache_type = _CACHE_TYPES.get(type(metadata))
    if cache_type is None:
        known = ", ".join(t.__name__ for t in _CACHE_TYPES)
        raise TypeError(f"{owner}: metadata must be one of {known}, got {type(metadata).__name__}")

    def build() -> Any:
        return cache_type.init_cache(metadata)

    return build, jax.eval_shape(build)


def init_sharded_cache(
    metadata: BaseCacheMetadata,
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    *,
    indivisible: str = "error",
) -> Any:
    """An empty cache for ``metadata`` built directly in its shards: each device allocates only
    its part (``shard_cache(Cache.init_cache(metadata), mesh)`` would first build the whole
    cache on one device). Same ``mesh``, ``rules`` and ``indivisible`` as ``cache_shardings``.

    Raises:
        TypeError: ``metadata`` of no cache family (contiguous/ring, paged, recurrent, hybrid).
    """
    build, shapes = _abstract_cache("init_sharded_cache", metadata)
    shardings = cache_shardings(shapes, mesh, rules, indivisible=indivisible)
    return jax.jit(build, out_shardings=shardings)()


def per_device_cache_bytes(
    cache_or_metadata: Any,
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    *,
    indivisible: str = "error",
) -> int:
    """Bytes of cache arrays each device holds under ``cache_shardings``.

    Args:
        cache_or_metadata: a cache or view (arrays or ``jax.ShapeDtypeStruct`` leaves), or the
            metadata of a contiguous/ring, paged, recurrent or hybrid cache (sized without
            allocating anything).
        mesh, rules, indivisible: as for ``cache_shardings``.

    Returns:
        The sum over arrays of ``prod(NamedSharding.shard_shape(shape)) * itemsize``: every
        shard of a ``NamedSharding`` has that shape, so each device holds this many bytes
        (replicated arrays count whole on every device).
    """
    cache = cache_or_metadata
    if isinstance(cache, BaseCacheMetadata):
        cache = _abstract_cache("per_device_cache_bytes", cache)[1]
    shardings = cache_shardings(cache, mesh, rules, indivisible=indivisible)
    leaves = jax.tree_util.tree_leaves(cache)
    sharding_leaves = jax.tree_util.tree_leaves(shardings)
    return sum(
        math.prod(sharding.shard_shape(tuple(leaf.shape))) * np.dtype(leaf.dtype).itemsize
        for leaf, sharding in zip(leaves, sharding_leaves, strict=True)
    )


# --------------------------------------------------------------------------------------------
# Model weights
# --------------------------------------------------------------------------------------------

_NORM: LogicalAxes = ("embed",)
_HEAD_UNIT = "head_dim"

PARAM_AXES: Mapping[str, Mapping[str, tuple[LogicalAxes, str | None]]] = types.MappingProxyType(
    {
        # The whole model (both reference models).
        "model": types.MappingProxyType(
            {
                "embed": (("vocab", "embed"), None),  # [vocab, hidden]
                "lm_head": (("embed", "vocab"), None),  # [hidden, vocab]
                "final_norm": (_NORM, None),
            }
        ),
        # One Llama layer (jaxkv.models.llama.params_to_device, or tensor_parallel_layout).
        "llama_layer": types.MappingProxyType(
            {
                "attn_norm": (_NORM, None),
                "mlp_norm": (_NORM, None),
                "wq": (("embed", "heads"), _HEAD_UNIT),  # [hidden, H * D]
                "wk": (("embed", "kv_heads"), _HEAD_UNIT),  # [hidden, K * D]
                "wv": (("embed", "kv_heads"), _HEAD_UNIT),
                "wo": (("heads", "embed"), _HEAD_UNIT),  # [H * D, hidden]
                "wqkv": (("embed", None), None),  # fused q|k|v: see the module docstring
                "w_gate": (("embed", "mlp"), None),  # [hidden, intermediate]
                "w_up": (("embed", "mlp"), None),
                "w_gate_up": (("embed", None), None),  # fused gate|up
                "w_down": (("mlp", "embed"), None),  # [intermediate, hidden]
            }
        ),
        # One hybrid layer (jaxkv.models.hybrid.init_hybrid) and its mixers.
        "hybrid_layer": types.MappingProxyType(
            {
                "mixer_norm": (_NORM, None),
                "mlp_norm": (_NORM, None),
                "gate": (("embed", "mlp"), None),
                "up": (("embed", "mlp"), None),
                "down": (("mlp", "embed"), None),
            }
        ),
        "attention_mixer": types.MappingProxyType(
            {
                "q_proj": (("embed", "heads"), _HEAD_UNIT),
                "k_proj": (("embed", "kv_heads"), _HEAD_UNIT),
                "v_proj": (("embed", "kv_heads"), _HEAD_UNIT),
                "out_proj": (("heads", "embed"), _HEAD_UNIT),
            }
        ),
        "linear_attention_mixer": types.MappingProxyType(
            {
                "q_proj": (("embed", "heads"), "key_dim"),  # [hidden, H * key_dim]
                "k_proj": (("embed", "heads"), "key_dim"),
                "v_proj": (("embed", "heads"), "value_dim"),  # [hidden, H * value_dim]
                "norm_weight": ((None,), None),  # [value_dim], shared by the heads
                "out_proj": (("heads", "embed"), "value_dim"),
            }
        ),
    }
)
"""Logical axes of the reference models' weights, by group and name: ``(axes, unit)``, where
``unit`` names the config attribute giving one head's width in a flattened ``heads * width``
dimension (split only in whole heads). Mamba and Mamba2 mixers are replicated."""

_RECURRENT_MIXERS = ("mamba", "mamba2")


def _config_int(owner: str, config: Any, name: str) -> int:
    value = getattr(config, name, None)
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"{owner}: config must have an int {name} (a LlamaConfig or HybridConfig), got "
            f"{type(config).__name__} with {name}={value!r}"
        )
    return int(value)


def _map_params(
    owner: str, params: Any, config: Any, fn: Callable[[str, Any, LogicalAxes, tuple], Any]
) -> Any:
    """``params`` with every array replaced by ``fn(name, array, axes, units)``."""
    if not isinstance(params, Mapping) or "layers" not in params:
        raise TypeError(
            f"{owner}: params must be a dict with 'layers' (jaxkv.models.llama.params_to_device "
            f"or jaxkv.models.hybrid.init_hybrid), got {type(params).__name__}"
        )
    head_dim = _config_int(owner, config, "head_dim")
    kinds = getattr(config, "layer_kinds", None)
    if kinds is not None and len(kinds) != len(params["layers"]):
        raise ValueError(
            f"{owner}: config has {len(kinds)} layer kinds but params hold "
            f"{len(params['layers'])} layers"
        )

    def group(prefix: str, arrays: Any, table: str, widths: Mapping[str, int]) -> dict:
        if not isinstance(arrays, Mapping):
            raise TypeError(f"{owner}: {prefix} must be a dict, got {type(arrays).__name__}")
        out = {}
        for name, array in arrays.items():
            where = f"{prefix}[{name!r}]"
            if array is None:
                out[name] = None
                continue
            if name not in PARAM_AXES[table]:
                raise ValueError(
                    f"{owner}: {where} has no declared logical axes; expected one of "
                    f"{sorted(PARAM_AXES[table])}"
                )
            axes, unit = PARAM_AXES[table][name]
            width = 1 if unit is None else widths[unit]
            units = tuple(width if axis in ("heads", "kv_heads") else 1 for axis in axes)
            out[name] = fn(where, array, axes, units)
        return out

    top = {name: value for name, value in params.items() if name != "layers"}
    result = group("params", top, "model", {})
    layers = []
    for index, layer in enumerate(params["layers"]):
        prefix = f"params['layers'][{index}]"
        if kinds is None:
            layers.append(group(prefix, layer, "llama_layer", {_HEAD_UNIT: head_dim}))
            continue
        kind = kinds[index]
        own = {name: value for name, value in layer.items() if name != "mixer"}
        converted = group(prefix, own, "hybrid_layer", {})
        if "mixer" in layer:
            mixer = layer["mixer"]
            where = f"{prefix}['mixer']"
            if kind in _RECURRENT_MIXERS:
                converted["mixer"] = jax.tree_util.tree_map_with_path(
                    lambda path, a, where=where: fn(
                        where + jax.tree_util.keystr(path), a, (None,) * a.ndim, (1,) * a.ndim
                    ),
                    mixer,
                )
            elif kind == "linear_attention":
                sub = config.linear_attention
                widths = {"key_dim": sub.key_dim, "value_dim": sub.value_dim}
                converted["mixer"] = group(where, mixer, "linear_attention_mixer", widths)
            else:
                converted["mixer"] = group(where, mixer, "attention_mixer", {_HEAD_UNIT: head_dim})
        layers.append(converted)
    result["layers"] = layers
    return result


def tensor_parallel_layout(params: Any, config: Any) -> Any:
    """Llama params with the fused projections split back into one matrix each: ``wqkv`` into
    ``wq: [hidden, H * D]``, ``wk``/``wv: [hidden, K * D]`` and ``w_gate_up`` into ``w_gate``/
    ``w_up: [hidden, intermediate]`` (same dtypes). ``jaxkv.models.llama.forward`` runs either
    layout; this one splits over ``"tensor"`` in whole heads (see the module docstring). Params
    without fused projections (the hybrid model's) are returned as they are."""
    owner = "tensor_parallel_layout"
    if not isinstance(params, Mapping) or "layers" not in params:
        raise TypeError(
            f"{owner}: params must be a dict with 'layers', got {type(params).__name__}"
        )
    heads = _config_int(owner, config, "num_heads")
    kv_heads = _config_int(owner, config, "num_kv_heads")
    head_dim = _config_int(owner, config, "head_dim")
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    layers = []
    for index, layer in enumerate(params["layers"]):
        split = {}  # the split matrices take the fused one's place
        for name, weight in layer.items():
            if name == "wqkv":
                if weight.shape[-1] != q_width + 2 * kv_width:
                    raise ValueError(
                        f"{owner}: params['layers'][{index}]['wqkv'] has {weight.shape[-1]} "
                        f"columns; expected (num_heads + 2 * num_kv_heads) * head_dim = "
                        f"{q_width + 2 * kv_width}"
                    )
                split["wq"] = weight[:, :q_width]
                split["wk"] = weight[:, q_width : q_width + kv_width]
                split["wv"] = weight[:, q_width + kv_width :]
            elif name == "w_gate_up":
                split["w_gate"], split["w_up"] = jnp.split(weight, 2, axis=-1)
            else:
                split[name] = weight
        layers.append(split)
    return {**params, "layers": layers}


def param_shardings(
    params: Any,
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    *,
    config: Any,
    indivisible: str = "error",
) -> Any:
    """The ``NamedSharding`` of every weight of a reference model, as a PyTree shaped like
    ``params`` (``None`` entries stay ``None``).

    Args:
        params: Llama params (``jaxkv.models.llama.params_to_device``, fused or in
            ``tensor_parallel_layout``) or hybrid params (``jaxkv.models.hybrid.init_hybrid``).
        mesh, rules, indivisible: as for ``cache_shardings``.
        config: the model's ``LlamaConfig`` or ``HybridConfig`` (head counts and widths: a
            flattened ``heads * head_dim`` dimension is split only in whole heads).

    Raises:
        TypeError/ValueError: as ``cache_shardings``, and a weight with no declared logical axes
            (``PARAM_AXES``) or a config without the head sizes.
    """
    owner = "param_shardings"
    mesh = _check_mesh(owner, mesh)
    resolved = _check_rules(owner, rules, mesh)
    indivisible = _check_indivisible(owner, indivisible)

    def sharding(name: str, array: Any, axes: LogicalAxes, units: tuple) -> NamedSharding:
        spec = _spec(name, tuple(array.shape), axes, resolved, mesh, indivisible, units)
        return NamedSharding(mesh, spec)

    return _map_params(owner, params, config, sharding)


def shard_params(
    params: Any,
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    *,
    config: Any,
    indivisible: str = "error",
) -> Any:
    """Weights placed on ``mesh`` for tensor parallelism: Llama params are first put in
    ``tensor_parallel_layout`` (fused projections split back per projection), then every weight
    goes where ``param_shardings`` says (``jax.device_put``). Same arguments and errors as
    ``param_shardings``."""
    params = tensor_parallel_layout(params, config)
    shardings = param_shardings(params, mesh, rules, config=config, indivisible=indivisible)
    return jax.device_put(params, shardings)
