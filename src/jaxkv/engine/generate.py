"""Text generation on the engine: ``generate(model, prompts, ...)`` for a batch of prompts
(``jaxkv.engine.chat.ChatSession`` holds a conversation). Both run ``jaxkv.engine.Engine``, the
one generation loop of jaxkv.

``generate`` sizes an engine to its prompts (one row per prompt, a pool or rows that hold every
prompt with its new tokens, every prompt prefilled in the first step) and warms it up before
timing anything. With ``mesh=...`` the engine runs on that device mesh (see
``jaxkv.engine.engine``), with as many rows as the prompts rounded up to the ``"data"`` axis.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import numpy as np

from jaxkv import _validation as v
from jaxkv._sizes import ceil_div, next_power_of_two, round_up_bucket
from jaxkv.engine.engine import Engine
from jaxkv.engine.model import Model
from jaxkv.engine.outputs import Generation, GenerationResult
from jaxkv.engine.placement import mesh_size
from jaxkv.engine.prefix_store import PrefixFile
from jaxkv.engine.requests import CacheConfig, SchedulerConfig
from jaxkv.engine.sampling import SamplingParams
from jaxkv.engine.speculative import SpeculativeConfig
from jaxkv.errors import CacheFileError
from jaxkv.quantization import CODECS

CacheKind = Literal["contiguous", "paged"]
CACHE_KINDS = ("contiguous", "paged")
TextCallback = Callable[[int, str], None]
"""``on_text(row, new_text)``: called as each row's text grows."""

_MAX_PREFILL_TOKENS = 4096
"""Most prompt tokens ``generate`` prefills in one step (longer batches go in chunks)."""
_LONG_PREFILL = 1024
"""Prompt tokens from which ``generate`` says it is prefilling (about a second of work)."""


def _check_prompts(model: Model, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(
            f"generate: prompts must be a non-empty list of strings or token-id lists, "
            f"got {prompts!r}"
        )
    encoded = []
    for index, prompt in enumerate(prompts):
        ids = model.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError(f"generate: prompts[{index}] is empty")
        bad = [
            t for t in ids if not isinstance(t, int | np.integer) or not 0 <= t < model.vocab_size
        ]
        if bad:
            raise ValueError(
                f"generate: prompts[{index}] has token ids outside [0, "
                f"{model.vocab_size}): {bad[:5]}"
            )
        encoded.append([int(t) for t in ids])
    return encoded


def generate_engine(
    model: Model,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    cache: CacheKind = "contiguous",
    page_size: int = 16,
    kv_quantization: str = "none",
    max_batch: int | None = None,
    speculative: SpeculativeConfig | None = None,
    mesh: Any = None,
    indivisible: str = "error",
) -> Engine:
    """An engine sized for these prompts: one row each (at most ``max_batch``; the others wait
    for a free row), room for every running prompt with ``max_new_tokens`` more, every running
    prompt prefilled in the first step (up to ``_MAX_PREFILL_TOKENS`` tokens). Capacities are
    rounded up to shape buckets (four per doubling: at most a quarter of padding) so that runs
    of similar sizes share compiled steps. On a ``mesh``, contiguous rows are rounded up to a
    multiple of its ``"data"`` axis (the spare rows stay empty)."""
    rows = len(prompt_ids) if max_batch is None else min(len(prompt_ids), max_batch)
    # Size for the largest prompts that can run together.
    running = sorted(prompt_ids, key=len, reverse=True)[:rows]
    if mesh is not None and cache == "contiguous":
        rows = ceil_div(rows, mesh_size(mesh, "data")) * mesh_size(mesh, "data")
    longest = max(len(p) for p in prompt_ids)
    max_model_len = min(round_up_bucket(longest + max_new_tokens, 256), model.context_length)
    if cache == "contiguous":
        width = round_up_bucket(longest, 16)
        budget = rows * min(width, _MAX_PREFILL_TOKENS)
    else:
        budget = next_power_of_two(sum(len(p) for p in running), 16)
        budget = max(min(budget, _MAX_PREFILL_TOKENS), next_power_of_two(rows, 16))
    if speculative is not None:  # a verification step computes every row's drafts at once
        budget = max(budget, next_power_of_two(rows * speculative.verify_width, 16))
    pages = sum(ceil_div(len(p) + max_new_tokens, page_size) + 1 for p in running)
    return Engine(
        model,
        CacheConfig(
            kind=cache,
            page_size=page_size,
            num_pages=max(pages, ceil_div(max_model_len, page_size)),
            kv_quantization=kv_quantization,
        ),
        SchedulerConfig(
            max_num_seqs=rows,
            max_num_batched_tokens=budget,
            max_prefill_seqs=rows,
            max_model_len=max_model_len,
            max_waiting=max(len(prompt_ids), 1),
            prefill_buckets=(budget,),
        ),
        speculative=speculative,
        mesh=mesh,
        indivisible=indivisible,
    )


def generate(
    model: Model,
    prompts: Sequence[str | Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int = 0,
    stop: Sequence[str] = (),
    cache: CacheKind = "contiguous",
    on_text: TextCallback | None = None,
    page_size: int = 16,
    ignore_eos: bool = False,
    output_logits: bool = False,
    kv_quantization: str = "none",
    on_progress: Callable[[str], None] | None = None,
    max_batch: int | None = None,
    warmup: bool = True,
    speculative: SpeculativeConfig | None = None,
    prompt_cache: str | os.PathLike[str] | None = None,
    mesh: Any = None,
    indivisible: str = "error",
) -> GenerationResult:
    """Generate continuations of a batch of prompts.

    Args:
        model: from ``Model.load``.
        prompts: strings (tokenized without BOS, as the checkpoint says) or token-id lists;
            lengths may differ.
        max_new_tokens: most tokens generated per prompt.
        temperature, top_k, top_p, seed: sampling (``temperature=0``: greedy). Prompt ``i``
            draws from seed ``seed + i``.
        stop: strings that end a row's generation (excluded from its text).
        cache: ``"contiguous"`` (one row per prompt) or ``"paged"`` (a shared page pool).
        on_text: streaming callback ``on_text(row, new_text)``.
        page_size: tokens per page of the paged cache.
        ignore_eos: keep generating past EOS tokens (benchmarks use this to produce exactly
            ``max_new_tokens`` tokens).
        output_logits: keep each step's logits in ``Generation.logits``.
        kv_quantization: KV storage codec, one of ``jaxkv.quantization.CODECS``.
        on_progress: called with a line of status while the steps compile, and before a long
            prefill.
        max_batch: most prompts generated at once (None: all of them); the others wait for a
            free row, as in a server.
        warmup: compile every step shape before the first step (True), or each when it is
            first used, so the first token comes sooner (the decode step compiles after it).
            The prefill and decode times exclude compiling either way; the per-prompt
            ``time_to_first_token`` is the wall time and includes it.
        speculative: speculative decoding (``jaxkv.engine.SpeculativeConfig``); the output is
            the output without it (token for token), the decode steps fewer when the drafts
            are good.
        prompt_cache: a prompt cache file (llama.cpp's ``--prompt-cache``), for one prompt:
            if it exists and was saved for this model, tokenizer, chat template, cache layout,
            dtype, codec and page size, the prompt's longest saved prefix (paged: in whole
            pages) is reused and only the rest is prefilled; afterwards the prompt's cache
            (paged: its full pages) is saved to it (atomically). A file that cannot be used
            (damaged, truncated, another model...) gives a ``PromptCacheWarning`` naming it
            and the reason, and the prompt is prefilled from scratch; the output is the same
            either way.
        mesh: run on this device mesh (a ``jax.sharding.Mesh`` of ``AxisType.Auto`` axes
            ``"data"``/``"tensor"``; ``None``: one device); the output is the same.
        indivisible: with ``mesh``, ``"error"`` (default) refuses a size that does not divide
            over its mesh axes (SmolLM2's 3 KV heads on ``tensor=4``), ``"replicate"`` holds
            it whole on every device (see ``Engine``).

    Returns:
        A ``GenerationResult`` with one ``Generation`` per prompt and timings (compilation
        excluded, and counted in ``compile_seconds``).
    """
    v.require_int("generate", "max_new_tokens", max_new_tokens, minimum=1)
    v.require_choice("generate", "cache", cache, CACHE_KINDS)
    v.require_choice("generate", "kv_quantization", kv_quantization, CODECS)
    v.require_int("generate", "page_size", page_size, minimum=1)
    if max_batch is not None:
        v.require_int("generate", "max_batch", max_batch, minimum=1)
    if isinstance(stop, str) or not isinstance(stop, Iterable):
        raise ValueError(f"generate: stop must be a list of non-empty strings, got {stop!r}")
    stop = tuple(stop)  # a generator is read once, here
    if any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"generate: stop must be a list of non-empty strings, got {stop!r}")
    v.require_int("generate", "seed", seed)
    SamplingParams(temperature, top_k, top_p, seed)  # validates the sampling values
    prompt_ids = _check_prompts(model, prompts)
    if prompt_cache is not None:
        if len(prompt_ids) != 1:
            raise ValueError(
                f"generate: prompt_cache holds one prompt, got {len(prompt_ids)} prompts"
            )
        prompt_cache = os.fspath(prompt_cache)
    longest = max(len(p) for p in prompt_ids) + max_new_tokens
    if longest > model.context_length:
        raise ValueError(
            f"generate: prompt + max_new_tokens = {longest} tokens exceeds the model's context "
            f"of {model.context_length}"
        )
    engine = generate_engine(
        model,
        prompt_ids,
        max_new_tokens,
        cache=cache,
        page_size=page_size,
        kv_quantization=kv_quantization,
        max_batch=max_batch,
        speculative=speculative,
        mesh=mesh,
        indivisible=indivisible,
    )
    if warmup:
        engine.warmup(on_progress)
    elif on_progress is not None:
        on_progress("compiling each step shape when it is first used")
    cache_start = time.perf_counter()
    loaded = (
        None if prompt_cache is None else load_prompt_cache(engine, prompt_cache, prompt_ids[0])
    )
    cached_tokens = 0 if loaded is None else loaded.cached_tokens
    cache_seconds = time.perf_counter() - cache_start
    prompt_tokens = sum(len(p) for p in prompt_ids) - cached_tokens
    if on_progress is not None and prompt_tokens >= _LONG_PREFILL:
        on_progress(f"prefilling {prompt_tokens:,} prompt tokens")
    settings = [
        SamplingParams(
            temperature,
            top_k,
            top_p,
            (seed + index) % 2**31,
            max_tokens=max_new_tokens,
            stop=stop,
            ignore_eos=ignore_eos,
        )
        for index in range(len(prompt_ids))
    ]
    ids = [
        engine.add_request(p, s, output_logits=output_logits)
        for p, s in zip(prompt_ids, settings, strict=True)
    ]
    row_of = {request_id: row for row, request_id in enumerate(ids)}
    first_batch = min(engine.scheduler_config.max_num_seqs, len(prompt_ids))
    finals: dict[str, object] = {}
    first_tokens: set[str] = set()
    start = time.perf_counter()
    compiled_before = engine.compile_seconds  # compiling in the loop is not generation time
    prefill_seconds = None
    steps_before_decode = 0
    while engine.has_unfinished():
        outputs = engine.step()
        for output in outputs:
            choice = output.outputs[0]
            if on_text is not None and choice.new_text:
                on_text(row_of[output.request_id], choice.new_text)
            if choice.token_ids or choice.finished:
                first_tokens.add(output.request_id)
            if output.finished:
                finals[output.request_id] = output
        if prefill_seconds is None and len(first_tokens) >= first_batch:
            compiling = engine.compile_seconds - compiled_before
            prefill_seconds = time.perf_counter() - start - compiling
            steps_before_decode = engine.stats().num_steps
    total = time.perf_counter() - start - (engine.compile_seconds - compiled_before)
    prefill_seconds = total if prefill_seconds is None else prefill_seconds
    generations = []
    for request_id in ids:
        output = finals[request_id]
        choice = output.outputs[0]
        logits = None if output.logits is None else output.logits[0]
        metrics = output.metrics
        generations.append(
            Generation(
                list(output.prompt_token_ids),
                list(choice.token_ids),
                choice.text,
                choice.finish_reason,
                logits,
                _since(start, metrics.first_token_time),
                _since(start, metrics.finished_time),
            )
        )
    steps = engine.stats().num_steps - steps_before_decode
    if prompt_cache is not None:
        cached_tokens = finals[ids[0]].num_cached_tokens
        cache_start = time.perf_counter()
        save_prompt_cache(engine, prompt_cache, prompt_ids[0], loaded)
        cache_seconds += time.perf_counter() - cache_start
    return GenerationResult(
        generations,
        prefill_seconds,
        total - prefill_seconds,
        steps,
        engine.compile_seconds,
        sum(len(p) for p in prompt_ids[:first_batch]) - cached_tokens,
        cached_tokens,
        cache_seconds,
        engine_stats=engine.stats(),
    )


class PromptCacheWarning(UserWarning):
    """A prompt cache file could not be used or written; the run went on without it."""


def load_prompt_cache(engine: Engine, path: str, prompt_ids: Sequence[int]) -> PrefixFile | None:
    """``engine.load_prefix(path, prompt_ids)``, or ``None`` (with a ``PromptCacheWarning``
    unless there is no file yet) when the file cannot be used."""
    try:
        return engine.load_prefix(path, prompt_ids)
    except FileNotFoundError:
        return None
    except (CacheFileError, OSError) as error:
        warnings.warn(
            PromptCacheWarning(
                f"prompt cache {path!r} not used, prefilling the whole prompt: {error}"
            ),
            stacklevel=3,
        )
        return None


def save_prompt_cache(
    engine: Engine, path: str, prompt_ids: Sequence[int], loaded: PrefixFile | None
) -> PrefixFile | None:
    """Save the prompt's full pages to ``path`` (``engine.save_prefix``), unless the file it
    was loaded from holds exactly them already; ``None`` (with a ``PromptCacheWarning``) when
    the file cannot be written."""
    full = len(prompt_ids)
    if engine.cache_config.kind == "paged":
        full = full // engine.cache_config.page_size * engine.cache_config.page_size
    if loaded is not None and loaded.saved_tokens == loaded.cached_tokens == full:
        return loaded
    try:
        return engine.save_prefix(path, prompt_ids)
    except OSError as error:
        warnings.warn(PromptCacheWarning(f"prompt cache {path!r} not saved: {error}"), stacklevel=3)
        return None


def _since(start: float, moment: float | None) -> float | None:
    return None if moment is None else moment - start
