"""One jitted model step (forward + sampling, the cache donated) and its ahead-of-time compiled
forms, shared by every generation runner."""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp

from jaxkv.engine.sampling import SamplingParams, sample_dynamic
from jaxkv.models.config import LlamaConfig
from jaxkv.models.llama import forward


@functools.partial(jax.jit, static_argnames=("config", "greedy"), donate_argnames=("cache",))
def model_step(params, cache, token_ids, runtime, logits_indices, key, sampling, *, config, greedy):
    """One jitted forward + sampling step: ``(next_tokens [rows], logits [rows, vocab], cache)``.

    ``sampling`` is ``(temperature, top_k, top_p)`` as arrays (ignored when ``greedy``)."""
    logits, cache = forward(
        params, config, token_ids, cache, runtime, logits_indices=logits_indices
    )
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits, cache
    temperature, top_k, top_p = sampling
    return sample_dynamic(logits, key, temperature, top_k, top_p), logits, cache


def sampling_arrays(sampling: SamplingParams, vocab_size: int) -> tuple[jax.Array, ...]:
    """``(temperature, top_k, top_p)`` as arrays for ``model_step``."""
    top_k = vocab_size if sampling.top_k is None else min(sampling.top_k, vocab_size)
    temperature = sampling.temperature if sampling.temperature > 0 else 1.0
    return (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(sampling.top_p))


_COMPILED: dict[Any, Any] = {}


def compiled_step(config: LlamaConfig, greedy: bool, *args: Any) -> tuple[Any, float]:
    """``model_step`` compiled ahead of time for these argument shapes, and the seconds spent
    compiling (0.0 when an earlier call already compiled it). Timings of generation then measure
    running, not compiling."""
    leaves, treedef = jax.tree_util.tree_flatten(args[1:])  # params are the same for a model
    signature = (
        config,
        greedy,
        id(args[0]),
        treedef,
        tuple((leaf.shape, leaf.dtype) for leaf in leaves),
    )
    if signature in _COMPILED:
        return _COMPILED[signature], 0.0
    start = time.perf_counter()
    compiled = model_step.lower(*args, config=config, greedy=greedy).compile()
    if len(_COMPILED) > 32:
        _COMPILED.clear()
    _COMPILED[signature] = compiled
    return compiled, time.perf_counter() - start
