"""Generation over a contiguous KV cache: one row per prompt, prompts right-padded to a
power-of-two bucket, one jitted prefill and one jitted step per new token (the cache donated)."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv._sizes import next_power_of_two
from jaxkv.caches import TransformerCache, TransformerCacheMetadata, TransformerRuntimeMetadata
from jaxkv.engine.model import Model
from jaxkv.engine.outputs import GenerationResult, RowProgress
from jaxkv.engine.sampling import SamplingParams
from jaxkv.engine.step import compiled_step, sampling_arrays


class ContiguousRunner:
    """Rows of a ``TransformerCache``; prompts right-padded to a power-of-two bucket."""

    def __init__(
        self, model: Model, sampling: SamplingParams, *, kv_quantization: str = "none", **_: Any
    ):
        self.model = model
        self.sampling = sampling
        self.kv_quantization = kv_quantization

    def run(self, rows: list[RowProgress], max_new_tokens: int) -> GenerationResult:
        model, config = self.model, self.model.config
        batch = len(rows)
        lengths = np.array([len(r.prompt_ids) for r in rows], np.int32)
        bucket = next_power_of_two(int(lengths.max()), 16)
        # Power-of-two capacities: runs of similar sizes share one compiled step.
        capacity = next_power_of_two(int(lengths.max()) + max_new_tokens, 256)
        metadata = TransformerCacheMetadata.create(
            batch,
            capacity,
            config.num_layers,
            config.num_kv_heads,
            config.head_dim,
            dtype=model.dtype,
            kv_quantization=self.kv_quantization,
        )
        cache = TransformerCache.init_cache(metadata)
        tokens = np.zeros((batch, bucket), np.int32)
        for i, r in enumerate(rows):
            tokens[i, : lengths[i]] = r.prompt_ids
        key, subkey = jax.random.split(jax.random.key(self.sampling.seed))
        knobs = sampling_arrays(self.sampling, config.vocab_size)
        greedy = self.sampling.greedy
        prefill_args = (
            model.params,
            cache,
            jnp.asarray(tokens),
            TransformerRuntimeMetadata.create(lengths),
            jnp.asarray(lengths - 1),
            subkey,
            knobs,
        )
        prefill, compile_seconds = compiled_step(config, greedy, *prefill_args)
        active = jnp.ones((batch,), jnp.int32)
        zeros = jnp.zeros((batch,), jnp.int32)
        decode, seconds = compiled_step(
            config,
            greedy,
            model.params,
            cache,
            jnp.zeros((batch, 1), jnp.int32),
            TransformerRuntimeMetadata.create(active),
            zeros,
            subkey,
            knobs,
        )
        compile_seconds += seconds

        start = time.perf_counter()
        next_tokens, logits, cache = prefill(*prefill_args)
        next_tokens = np.asarray(next_tokens)
        prefill_seconds = time.perf_counter() - start
        keep_logits = rows[0].logits is not None
        for r, token in zip(rows, next_tokens, strict=True):
            if keep_logits:
                r.record(logits[r.row])
            r.push(int(token), max_new_tokens)

        start = time.perf_counter()
        steps = 0
        while any(r.active for r in rows):
            active = np.array([r.active for r in rows], np.int32)
            if not greedy:  # greedy steps ignore the key: skip a dispatch per step
                key, subkey = jax.random.split(key)
            next_tokens, logits, cache = decode(
                model.params,
                cache,
                jnp.asarray(next_tokens[:, None]),
                TransformerRuntimeMetadata.create(active),
                zeros,
                subkey,
                knobs,
            )
            next_tokens = np.asarray(next_tokens)
            steps += 1
            for r, token in zip(rows, next_tokens, strict=True):
                if r.active:
                    if keep_logits:
                        r.record(logits[r.row])
                    r.push(int(token), max_new_tokens)
        decode_seconds = time.perf_counter() - start
        cache.check_overflow()
        return GenerationResult(
            [r.result() for r in rows], prefill_seconds, decode_seconds, steps, compile_seconds
        )
