"""One jitted model step (a forward over the step's new tokens with the cache donated, logits at
one index per row) and its ahead-of-time compiled forms, shared by every engine.

Compiling ahead of time (``lower(...).compile()``) keeps compile time out of every measured step
and lets the engine count and time its compiled shapes."""

from __future__ import annotations

import functools
import time
from typing import Any

import jax

from jaxkv.models.config import LlamaConfig
from jaxkv.models.llama import forward


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def forward_step(params, cache, token_ids, runtime, logits_indices, *, config):
    """``(logits [rows, vocab] float32, cache)``: the forward over the new tokens, with logits
    at ``logits_indices`` only (one per row)."""
    return forward(params, config, token_ids, cache, runtime, logits_indices=logits_indices)


_COMPILED: dict[Any, Any] = {}
_LIMIT = 64


def _signature(config: Any, args: tuple[Any, ...]) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(args[1:])  # params are the same for a model
    return (config, id(args[0]), treedef, tuple((leaf.shape, leaf.dtype) for leaf in leaves))


def compiled_forward(config: LlamaConfig, *args: Any) -> tuple[Any, float]:
    """``forward_step`` compiled ahead of time for these argument shapes, and the seconds spent
    compiling (0.0 when an earlier call already compiled it)."""
    signature = _signature(config, args)
    if signature in _COMPILED:
        return _COMPILED[signature], 0.0
    start = time.perf_counter()
    compiled = forward_step.lower(*args, config=config).compile()
    if len(_COMPILED) >= _LIMIT:
        _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[signature] = compiled
    return compiled, time.perf_counter() - start
