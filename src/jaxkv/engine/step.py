"""One jitted model step (a forward over the step's new tokens with the cache donated, logits at
one index per row) and its ahead-of-time compiled forms, shared by every engine.

Compiling ahead of time (``lower(...).compile()``) keeps compile time out of every measured step
and lets the engine count and time its compiled shapes."""

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


def _signature(step: Any, config: Any, args: tuple[Any, ...]) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(args[1:])  # params are the same for a model
    shapes = tuple((leaf.shape, leaf.dtype) for leaf in leaves)
    return (step, config, id(args[0]), treedef, shapes)


def compiled_forward(config: Any, *args: Any, step: Any = forward_step) -> tuple[Any, float]:
    """``step`` (``forward_step``, ``gemma3_step`` or ``hybrid_step``) compiled ahead of time
    for these argument shapes, and the seconds spent compiling (0.0 when an earlier call
    already compiled it)."""
    signature = _signature(step, config, args)
    if signature in _COMPILED:
        return _COMPILED[signature], 0.0
    start = time.perf_counter()
    compiled = step.lower(*args, config=config).compile()
    if len(_COMPILED) >= _LIMIT:
        _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[signature] = compiled
    return compiled, time.perf_counter() - start
