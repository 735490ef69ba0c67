"""Generation over a paged KV cache: the host ``PageManager`` schedules each step, the device
runs the model over the packed tokens of every scheduled sequence.

One prefill step packs every prompt (after prefix-cache hits) into one ragged batch; each decode
step packs one token per live sequence. Token counts are padded to the manager's buckets, so the
jitted step compiles once per bucket.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from jaxkv._sizes import ceil_div, next_power_of_two
from jaxkv.caches.paged import PagedCache, PagedCacheMetadata
from jaxkv.engine.model import Model
from jaxkv.engine.outputs import GenerationResult, RowProgress
from jaxkv.engine.sampling import SamplingParams
from jaxkv.engine.step import compiled_step, sampling_arrays
from jaxkv.engine.step_inputs import paged_runtime
from jaxkv.pages import PageManager


class PagedRunner:
    """Runs a batch of rows through a ``PagedCache`` driven by a ``PageManager``."""

    def __init__(
        self,
        model: Model,
        sampling: SamplingParams,
        *,
        page_size: int = 16,
        kv_quantization: str = "none",
        **_: Any,
    ):
        self.model = model
        self.sampling = sampling
        self.page_size = page_size
        self.kv_quantization = kv_quantization

    def _pool(self, rows: list[RowProgress], max_new_tokens: int) -> tuple[PageManager, PagedCache]:
        config, page_size = self.model.config, self.page_size
        totals = [len(r.prompt_ids) + max_new_tokens for r in rows]
        max_pages_per_seq = ceil_div(max(totals), page_size)
        # Every sequence's worst case, plus one page per sequence for copy-on-write.
        num_pages = sum(ceil_div(t, page_size) for t in totals) + len(rows)
        # A decode step packs at most one token per row: no padding beyond the batch, since the
        # matmuls of a step cost what its padded token count costs.
        decode_bucket = len(rows)
        prefill_bucket = next_power_of_two(sum(len(r.prompt_ids) for r in rows), 16)
        manager = PageManager(
            num_pages,
            page_size,
            len(rows),
            max_pages_per_seq,
            token_buckets=sorted({decode_bucket, max(prefill_bucket, decode_bucket)}),
        )
        metadata = PagedCacheMetadata.create(
            config.num_layers,
            num_pages,
            page_size,
            config.num_kv_heads,
            config.head_dim,
            len(rows),
            max_pages_per_seq,
            dtype=self.model.dtype,
            kv_quantization=self.kv_quantization,
        )
        return manager, PagedCache.init_cache(metadata)

    def run(self, rows: list[RowProgress], max_new_tokens: int) -> GenerationResult:
        model, config = self.model, self.model.config
        manager, cache = self._pool(rows, max_new_tokens)
        for index, row in enumerate(rows):
            manager.add_sequence(index, row.prompt_ids)
        knobs = sampling_arrays(self.sampling, config.vocab_size)
        greedy = self.sampling.greedy
        key = subkey = jax.random.key(self.sampling.seed)
        compile_seconds = 0.0

        keep_logits = rows[0].logits is not None

        def run_step(batch: list[tuple[int, int]]) -> list[tuple[int, int]]:
            """Schedule, run and commit one step; ``(row, sampled token)`` per sequence."""
            nonlocal cache, key, subkey, compile_seconds
            step = manager.schedule(batch)
            runtime = paged_runtime(step)  # the step applies its copy-on-write copies itself
            if not greedy:  # greedy steps ignore the key: skip a dispatch per step
                key, subkey = jax.random.split(key)
            args = (
                model.params,
                cache,
                runtime.token_ids,
                runtime,
                runtime.logits_indices,
                subkey,
                knobs,
            )
            compiled, seconds = compiled_step(config, greedy, *args)
            compile_seconds += seconds
            tokens, logits, cache = compiled(*args)
            manager.commit_step(step)
            tokens = np.asarray(tokens)[: step.num_seqs]
            if keep_logits:
                for position, seq_id in enumerate(step.seq_ids):
                    rows[seq_id].record(logits[position])
            return list(zip(step.seq_ids, tokens.tolist(), strict=True))

        # Compile the decode shape too before timing anything.
        start = time.perf_counter()
        sampled = run_step(
            [
                (i, len(r.prompt_ids) - manager.get_sequence(i).num_computed)
                for i, r in enumerate(rows)
            ]
        )
        prefill_seconds = time.perf_counter() - start - compile_seconds
        for index, token in sampled:
            rows[index].push(token, max_new_tokens)
            manager.append_tokens(index, [token])

        decode_seconds, steps = 0.0, 0
        while any(r.active for r in rows):
            before = compile_seconds
            start = time.perf_counter()
            sampled = run_step([(i, 1) for i, r in enumerate(rows) if r.active])
            decode_seconds += time.perf_counter() - start - (compile_seconds - before)
            steps += 1
            for index, token in sampled:
                rows[index].push(token, max_new_tokens)
                if rows[index].active:
                    manager.append_tokens(index, [token])
                else:
                    manager.free(index)
        for index in range(len(rows)):
            if index in manager:
                manager.free(index)
        return GenerationResult(
            [r.result() for r in rows], prefill_seconds, decode_seconds, steps, compile_seconds
        )


__all__ = ["PagedRunner"]
