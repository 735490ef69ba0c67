"""One jitted model step (a forward over the step's new tokens with the cache donated, logits at
one index per row) and its ahead-of-time compiled forms, shared by every engine.

Compiling ahead of time (``lower(...).compile()``) keeps compile time out of every measured step
and lets the engine count and time its compiled shapes. On a device mesh the step is compiled
with the cache's own shardings as the output cache's (``keep_cache_sharding``), so a step never
leaves the cache gathered or resharded."""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp

from jaxkv.models.gemma3 import gemma3_forward
from jaxkv.models.hybrid import hybrid_forward_cached
from jaxkv.models.llama import forward


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def forward_step(params, cache, token_ids, runtime, logits_indices, *, config):
    """``(logits [rows, vocab] float32, cache)``: the forward over the new tokens, with logits
    at ``logits_indices`` only (one per row; ``[rows, K]`` indices give ``[rows, K, vocab]``,
    packed ``[S]`` indices ``[S, vocab]``)."""
    return forward(params, config, token_ids, cache, runtime, logits_indices=logits_indices)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def hybrid_step(params, cache, token_ids, runtime, logits_indices, *, config):
    """``forward_step`` for a hybrid stack: ``token_ids [rows, T]``, ``logits_indices [rows]``
    the column of each row's last new token (or ``[rows, K]``: ``K`` columns per row)."""
    logits, cache = hybrid_forward_cached(params, config, token_ids, cache, runtime)
    if logits_indices.ndim == 2:
        picked = jnp.take_along_axis(logits, logits_indices[:, :, None], axis=1)
    else:
        picked = jnp.take_along_axis(logits, logits_indices[:, None, None], axis=1)[:, 0]
    return picked.astype(jnp.float32), cache


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def gemma3_step(params, cache, token_ids, runtime, logits_indices, *, config):
    """``forward_step`` for Gemma 3: ``token_ids [rows, T]``, ``logits_indices [rows]``;
    activations in the dtype of the weights."""
    return gemma3_forward(
        params,
        config,
        token_ids,
        cache,
        runtime,
        logits_indices=logits_indices,
        compute_dtype=params["embed"].dtype,
    )


_COMPILED: dict[Any, Any] = {}
_LIMIT = 64


def _signature(step: Any, config: Any, args: tuple[Any, ...], keep: bool) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(args[1:])  # params are the same for a model
    shapes = tuple((leaf.shape, leaf.dtype) for leaf in leaves)
    if keep:  # the same shapes on another mesh (or split otherwise) compile anew
        shapes += tuple(leaf.sharding for leaf in leaves)
    return (step, config, id(args[0]), treedef, shapes, keep)


def _keeping_cache_sharding(step: Any, cache: Any) -> Any:
    """``step`` jitted again (same static and donated arguments) with its output cache placed
    as ``cache`` is."""
    shardings = jax.tree_util.tree_map(lambda leaf: leaf.sharding, cache)
    return jax.jit(
        step.__wrapped__,
        static_argnames=("config",),
        donate_argnames=("cache",),
        out_shardings=(None, shardings),
    )


def compiled_forward(
    config: Any, *args: Any, step: Any = forward_step, keep_cache_sharding: bool = False
) -> tuple[Any, float]:
    """``step`` (``forward_step``, ``gemma3_step`` or ``hybrid_step``) compiled ahead of time
    for these arguments ``(params, cache, token_ids, runtime, logits_indices)``, and the seconds
    spent compiling (0.0 when an earlier call already compiled it). With
    ``keep_cache_sharding``, the output cache's shardings are the input cache's (a cache placed
    on a mesh stays where it is; the logits' placement is left to XLA)."""
    signature = _signature(step, config, args, keep_cache_sharding)
    if signature in _COMPILED:
        return _COMPILED[signature], 0.0
    start = time.perf_counter()
    if keep_cache_sharding:
        step = _keeping_cache_sharding(step, args[1])
    compiled = step.lower(*args, config=config).compile()
    if len(_COMPILED) >= _LIMIT:
        _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[signature] = compiled
    return compiled, time.perf_counter() - start
