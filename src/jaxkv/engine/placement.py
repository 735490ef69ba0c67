"""Where an engine's arrays live on a device mesh: its weights, its cache, the host inputs of a
step, and the jitted functions that keep each cache array where ``jaxkv.sharding`` declares it.

``Placement(mesh, rules, indivisible)`` is what ``Engine(..., mesh=...)`` hands its backend. The
weights are placed with ``jaxkv.sharding.shard_params`` (Llama and hybrid stacks: tensor
parallel over ``"tensor"``; Gemma 3, whose weights ``PARAM_AXES`` does not declare, replicated),
the cache is built directly in its shards, and every jitted function that returns a cache (the
step, and the contiguous backend's row resets, copies and truncations) is compiled with
``out_shardings`` equal to the shardings of the cache it was given, so no step leaves the cache
gathered or resharded. Token ids and runtime metadata are small and replicated on every device.

``make_mesh`` turns ``"data=2,tensor=4"`` into an ``AxisType.Auto`` mesh over
``jax.devices()`` (every process's devices, after ``initialize_processes``, i.e.
``jax.distributed.initialize``). On a mesh that spans several processes every process runs the
same engine on the same requests, step for step; ``fetch`` brings a result (sampled tokens,
log-probabilities, logits) to the host whichever devices hold it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxkv import _arguments, sharding
from jaxkv.models.gemma3 import Gemma3Config

MESH_AXES = _arguments.MESH_AXES
"""The mesh axes ``make_mesh`` builds (those ``sharding.DEFAULT_RULES`` names)."""


def make_mesh(axes: str | tuple[tuple[str, int], ...], devices: Any = None) -> Mesh:
    """An ``AxisType.Auto`` mesh of ``axes`` over ``devices`` (default ``jax.devices()``: all
    of them, on every host).

    Args:
        axes: ``"data=2,tensor=4"`` (names from ``MESH_AXES``), or its parsed form
            ``(("data", 2), ("tensor", 4))``.
        devices: the devices, as many as the sizes' product.

    Raises:
        ValueError: a bad spec, or sizes whose product is not the number of devices.
    """
    if isinstance(axes, str):
        axes = _arguments.parse_mesh_spec(axes)
    devices = jax.devices() if devices is None else list(devices)
    names = tuple(name for name, _ in axes)
    shape = tuple(size for _, size in axes)
    if math.prod(shape) != len(devices):
        described = ",".join(f"{name}={size}" for name, size in axes)
        raise ValueError(
            f"mesh {described} spans {math.prod(shape)} devices, but {len(devices)} are "
            f"available ({jax.default_backend()}); expected axis sizes whose product is "
            f"{len(devices)}"
        )
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def initialize_processes(coordinator: str, num_processes: int, process_id: int) -> None:
    """Join a job of ``num_processes`` processes (``jax.distributed.initialize``), before any
    JAX computation: afterwards ``jax.devices()`` lists every process's devices. On CPUs the
    processes' collectives go over gloo (TCP).

    Args:
        coordinator: ``host:port`` of process 0, the same for every process.
        num_processes: processes in the job (one per host, usually).
        process_id: this process, in ``[0, num_processes)``.
    """
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must lie in [0, num_processes={num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


def fetch(array: jax.Array) -> np.ndarray:
    """``array`` as a NumPy array on this host: read directly when this process holds all of
    it (one process, or a replicated result), gathered from every process otherwise."""
    if array.is_fully_addressable:
        return np.asarray(array)
    if array.sharding.is_fully_replicated:
        return np.asarray(array.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def command_mesh(axes: tuple[tuple[str, int], ...] | None) -> Mesh | None:
    """The mesh of a command's ``--mesh`` (``None``: no mesh).

    Raises:
        UsageError: sizes whose product is not the number of devices.
    """
    if axes is None:
        return None
    try:
        return make_mesh(axes)
    except ValueError as err:
        raise _arguments.UsageError(f"argument --mesh: {err}") from None


def mesh_size(mesh: Mesh, axis: str) -> int:
    """The size of ``axis`` in ``mesh`` (1 when the mesh lacks it)."""
    return int(mesh.shape.get(axis, 1))


def with_hint(message: str) -> str:
    """``message``, and the command-line flag to pass when it asks for
    ``indivisible='replicate'``."""
    if "indivisible='replicate'" in message:
        return f"{message} (on the command line: --mesh-indivisible replicate)"
    return message


def _on_mesh(what: str, build: Callable[[], Any]) -> Any:
    """``build()``, its ``ValueError`` prefixed with ``what`` and hinted (``with_hint``)."""
    try:
        return build()
    except ValueError as err:
        raise ValueError(with_hint(f"Engine: {what} on the mesh: {err}")) from None


_PLACED: dict[Any, tuple[Any, Any]] = {}
_PLACED_LIMIT = 2


def _shardings_of(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda leaf: leaf.sharding, tree)


class Placement:
    """An engine's mesh, rules and indivisible policy (see the module docstring).

    Args:
        mesh: an ``AxisType.Auto`` mesh.
        rules: logical axis -> mesh axis (``sharding.DEFAULT_RULES``).
        indivisible: ``"error"`` or ``"replicate"`` (``sharding.INDIVISIBLE_POLICIES``).

    Raises:
        TypeError, ValueError: a mesh that is not an ``AxisType.Auto`` ``Mesh``, bad rules or
            a bad policy (as ``sharding.cache_shardings``).
    """

    def __init__(
        self,
        mesh: Mesh,
        rules: Mapping[str, Any] = sharding.DEFAULT_RULES,
        indivisible: str = "error",
    ):
        # The spec of a scalar checks the mesh (AxisType.Auto), the rules and the policy.
        sharding.logical_spec("mesh", (), (), mesh, rules, indivisible=indivisible)
        self.mesh = mesh
        self.rules = rules
        self.indivisible = indivisible
        self._jitted: dict[Any, Any] = {}

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def place_params(self, params: Any, config: Any) -> Any:
        """``params`` on the mesh: split for tensor parallelism when ``sharding.PARAM_AXES``
        declares the model's weights (Llama, hybrid stacks), else replicated (Gemma 3).

        The placed weights of the latest few ``(params, mesh, rules, policy)`` are kept, so
        engines built one after another (``generate`` builds one per call) share them, and
        with them their compiled steps."""
        key = (id(params), self.mesh, tuple(sorted(self.rules.items())), self.indivisible)
        if key in _PLACED:
            return _PLACED[key][1]
        if isinstance(config, Gemma3Config):
            placed = jax.device_put(params, self.replicated)
        else:
            placed = _on_mesh(
                "the weights",
                lambda: sharding.shard_params(
                    params, self.mesh, self.rules, config=config, indivisible=self.indivisible
                ),
            )
        if len(_PLACED) >= _PLACED_LIMIT:
            _PLACED.pop(next(iter(_PLACED)))
        _PLACED[key] = (params, placed)  # holding params keeps its id from being reused
        return placed

    def build_cache(self, build: Callable[[], Any]) -> Any:
        """The cache ``build()`` returns, built directly in its shards (nothing is built whole
        on one device)."""
        shapes = jax.eval_shape(build)
        shardings = _on_mesh("the cache", lambda: self.cache_shardings(shapes))
        return jax.jit(build, out_shardings=shardings)()

    def cache_shardings(self, cache: Any) -> Any:
        """``sharding.cache_shardings`` of ``cache`` under this placement."""
        return sharding.cache_shardings(cache, self.mesh, self.rules, indivisible=self.indivisible)

    def per_device_bytes(self, cache_or_metadata: Any) -> int:
        """``sharding.per_device_cache_bytes`` under this placement."""
        return _on_mesh(
            "the cache",
            lambda: sharding.per_device_cache_bytes(
                cache_or_metadata, self.mesh, self.rules, indivisible=self.indivisible
            ),
        )

    def host(self, tree: Any) -> Any:
        """Host inputs (token ids, runtime metadata, logits indices) replicated on the mesh."""
        return jax.device_put(tree, self.replicated)

    def keeping(self, function: Callable[..., Any], cache: Any, *args: Any) -> Any:
        """``function(cache, *args)`` (a cache in, a cache out, e.g. ``cache.reset_rows``),
        jitted with the cache donated and its output placed as ``cache`` is."""
        shardings = _shardings_of(cache)
        leaves, treedef = jax.tree_util.tree_flatten(shardings)
        key = (function, treedef, tuple(leaves))
        jitted = self._jitted.get(key)
        if jitted is None:
            jitted = jax.jit(function, donate_argnums=0, out_shardings=shardings)
            self._jitted[key] = jitted
        return jitted(cache, *args)


__all__ = [
    "MESH_AXES",
    "Placement",
    "command_mesh",
    "fetch",
    "initialize_processes",
    "make_mesh",
    "mesh_size",
    "with_hint",
]
