"""Long-context prefill and decode of jaxkv against HF transformers, where the KV cache is the cost.

One run of this script measures, on this machine and with the same float32 weights
(SmolLM2-135M-Instruct by default), for each case ``BATCH x PROMPT`` (default ``8x2048`` and
``1x8192``):

- HF transformers' ``DynamicCache`` with its default attention (SDPA), torch limited to 2
  threads, under ``torch.inference_mode``: one forward of the whole prompt with ``use_cache=True``
  (``logits_to_keep=1``, as ``generate`` does) and its argmax, then ``--steps`` decode steps, each
  ``model(input_ids=next[:, None], past_key_values=cache, use_cache=True)`` and its argmax;
- jaxkv with a contiguous ``TransformerCache`` (float32, int8 and int4 KV) and with a paged cache
  (float32 KV, ``--page-size``-token pages, default 16, each sequence's pages contiguous in
  the pool): the same loop, a
  jitted step of ``jaxkv.models.llama.forward`` with the cache donated and the argmax inside;
  the prompt is prefilled in calls of ``--prefill-chunk`` tokens per row (default 256, as a
  serving engine chunks it, so peak memory does not grow with the prompt; 0 for one call;
  paged calls pack ``BATCH * chunk`` tokens), and every decode step's
  ``PagedRuntimeMetadata`` is built before the timed loop (positions are known in advance; only
  the fed-back token ids change). The cache holds the prompt plus the steps, rounded up to a
  multiple of 256 tokens. Every shape is compiled ahead of time (``lower(...).compile()``),
  outside the timed region;
- prefill seconds (one run, every chunk, the first token's argmax included) and the decode step
  time: the median over ``--steps`` steps of ``--repeats`` runs (each run rewinds the cache to
  the prompt and decodes again from the first token); decode tokens/s = batch / median step.
  Greedy argmax
  feeds back the next token on every side; a NaN or infinite logit is an error;
- peak resident memory of each implementation in each case: each implementation runs in its
  own process (this script started again with ``--worker NAME``, answering with one JSON line),
  which resets its high-water mark before each case (``/proc/self/clear_refs``), so a case's
  peak is its own: the loaded model plus that case's cache, compilation and steps (where the
  reset is unavailable, the process's ``ru_maxrss``, loading included);
- the bandwidth bound of a decode step: ``(weight bytes + mean live KV bytes read per step) /
  measured memory bandwidth`` (the bandwidth measurement of ``benchmarks/decode.py``), KV bytes
  per token of each storage codec from ``TransformerCacheMetadata.bytes_per_token`` (scales
  included); ``% of bound = bound time / measured step time``;
- how many of the first 8 greedy tokens of each jaxkv implementation equal HF's (the worst row);
- that decode cost stays flat in capacity (skipped by ``--quick``): jaxkv contiguous and paged
  decode after the same 1 x 2,048-token prompt in caches of 2,304 and 32,768 tokens, the two
  caches' runs taking turns; the larger cache's median step should be within 10% of the smaller
  one's.

At ``1x8192`` the decode steps run at positions 8,192 and on, past SmolLM2's 8,192-token
context: both sides apply RoPE there alike (speed is unaffected, and the first generated token
comes from the prompt's last position).

The prompts are random token ids (``numpy.random.default_rng(0)``, ids in ``[100, vocab - 100)``),
made once by the driver and passed to every worker, so both sides read the same ids. Under each
table the targets for that case are checked (met / not met).

``--png FILE`` also runs a sweep: decode tokens/s against context length (512 ... 8,192 tokens
at batch ``--sweep-batch``, default 1) for jaxkv contiguous and HF. The cache of one process
grows by prefilling the next chunk of the prompt after it is rewound to the previous context,
so each context's decode steps start right after exactly that many prompt tokens.

HF workers need torch and transformers, which jaxkv does not: they run under ``--hf-python``
(default: this interpreter when it can import both); ``--only jaxkv`` skips them.

Run: ``.venv/bin/python benchmarks/long_context.py [--hf-python PATH] [--cases 8x2048,1x8192]
[--steps 32] [--repeats 3] [--prefill-chunk 256] [--page-size 16] [--png plot.png]
[--sweep-batch 1] [--only jaxkv] [--quick]``
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import statistics
import sys
import time
import traceback
from typing import Any

from _common import (
    current_rss_mib,
    format_table,
    peak_rss_mib,
    peak_rss_since_reset_mib,
    reset_peak_rss,
    run_json_worker,
)
from decode import (
    TORCH_THREADS,
    _error_text,
    leading_agreement,
    measure_bandwidth,
    resolve_hf_python,
    step_bytes,
)

RESULT_PREFIX = "LONG-CONTEXT-RESULT "
DEFAULT_CASES = "8x2048,1x8192"
QUICK_CASES = "2x512,1x1024"
DEFAULT_STEPS, QUICK_STEPS = 32, 8
DEFAULT_REPEATS, QUICK_REPEATS = 3, 2
DEFAULT_PREFILL_CHUNK = 256
SWEEP_CONTEXTS = (512, 1024, 2048, 4096, 8192)
QUICK_SWEEP_CONTEXTS = (256, 512, 1024)
CAPACITY_MULTIPLE = 256
PAGE_SIZE = 16
COMPARE_TOKENS = 8
PROMPT_SEED = 0
TOKEN_MARGIN = 100  # prompt ids avoid the first and last 100 ids of the vocabulary

IMPLEMENTATIONS = {
    # worker name: (table label, library, cache layout, KV storage codec)
    "hf-dynamic": ("HF DynamicCache (SDPA)", "hf", "dynamic", "none"),
    "jaxkv-contiguous": ("jaxkv contiguous float32", "jaxkv", "contiguous", "none"),
    "jaxkv-paged": ("jaxkv paged float32", "jaxkv", "paged", "none"),
    "jaxkv-int8": ("jaxkv contiguous int8", "jaxkv", "contiguous", "int8"),
    "jaxkv-int4": ("jaxkv contiguous int4", "jaxkv", "contiguous", "int4"),
}
REFERENCE = "hf-dynamic"
SWEEP_IMPLEMENTATIONS = ("jaxkv-contiguous", "hf-dynamic")
# Decode cost flat in capacity: the same live tokens in a small and a large cache.
CAPACITY_CHECK_PROMPT = 2048
CAPACITY_CHECK_CAPACITIES = (2304, 32768)
CAPACITY_CHECK_IMPLEMENTATIONS = ("jaxkv-contiguous", "jaxkv-paged")
CAPACITY_CHECK_LIMIT = 1.10  # the large cache's step within 10% of the small one's

# Long-context targets, per case: (what, implementation, quantity, comparison, ratio to HF).
# Speeds are jaxkv / HF (> 1 is faster); peak RSS is jaxkv / HF (< 1 is smaller).
TARGETS = {
    "8x2048": [
        ("decode, float32 KV", "jaxkv-contiguous", "decode", ">=", 1.4),
        ("decode, float32 KV (paged)", "jaxkv-paged", "decode", ">=", 1.4),
        ("decode, int8 KV", "jaxkv-int8", "decode", ">=", 1.8),
        ("prefill", "jaxkv-contiguous", "prefill", ">=", 1.0),
        ("prefill (paged)", "jaxkv-paged", "prefill", ">=", 1.0),
        ("peak RSS", "jaxkv-contiguous", "rss", "<=", 1.0),
        ("peak RSS (paged)", "jaxkv-paged", "rss", "<=", 1.0),
        ("peak RSS, int8 KV", "jaxkv-int8", "rss", "<=", 0.7),
    ],
    "1x8192": [
        ("decode, float32 KV", "jaxkv-contiguous", "decode", ">=", 1.5),
        ("decode, float32 KV (paged)", "jaxkv-paged", "decode", ">=", 1.5),
    ],
}


# --------------------------------------------------------------------------------------------
# Workers: one implementation per process; read a JSON spec on stdin, print one JSON line.
#
# Every worker answers the same two kinds of spec through a *runner*, an object with
#   prefill(ids [B, T] host ints, start) -> (seconds, first tokens [B])   (compiles first)
#   prepare_decode(positions)                                             (untimed set-up)
#   decode(tokens [B], position) -> next tokens [B]                       (blocks until done)
#   rewind(length)                                                        (drop tokens >= length)
#   tokens_to_list(tokens) -> [B] Python ints
# --------------------------------------------------------------------------------------------


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _decode_runs(runner, first, start: int, steps: int, repeats: int) -> dict[str, Any]:
    """``repeats`` runs of ``steps`` timed greedy decode steps from ``first`` (the token after
    ``start`` prompt tokens), the cache rewound to ``start`` tokens before each run after the
    first. Returns every step's seconds and the first run's tokens, ``[B][1 + steps]``."""
    positions = [start + i for i in range(steps)]
    runner.prepare_decode(positions)
    step_s: list[float] = []
    columns = [first]  # [1 + steps] device or torch arrays [B], made lists at the end
    for attempt in range(repeats):
        if attempt:
            runner.rewind(start)
        seconds, tokens = _decode_run(runner, first, positions)
        step_s += seconds
        if attempt == 0:
            columns += tokens
    rows = [list(row) for row in zip(*map(runner.tokens_to_list, columns), strict=True)]
    return {"step_s": step_s, "tokens": rows}


def _decode_run(runner, first, positions: list[int]) -> tuple[list[float], list[Any]]:
    """One run of timed greedy decode steps at ``positions`` from ``first``: each step's
    seconds and the tokens it gave (device or torch arrays ``[B]``)."""
    step_s, columns, tokens = [], [], first
    for position in positions:
        begin = time.perf_counter()
        tokens = runner.decode(tokens, position)
        step_s.append(time.perf_counter() - begin)
        columns.append(tokens)
    return step_s, columns


def _run_cases(runner_for, spec: dict[str, Any]) -> dict[str, Any]:
    """Each case: prefill the prompt, then the decode runs; a failure becomes its ``error``."""
    import gc

    results = {}
    for case in spec["cases"]:
        gc.collect()  # the last case's cache is gone before this case's peak starts
        per_case = reset_peak_rss()
        try:
            prompt = case["prompt"]
            runner = runner_for(len(prompt), case["capacity"])
            chunk = spec.get("prefill_chunk") if isinstance(runner, _JaxkvRunner) else None
            prefill_s, first = _prefill(runner, prompt, chunk)
            runs = _decode_runs(runner, first, len(prompt[0]), spec["steps"], spec["repeats"])
            results[case["name"]] = {
                "prefill_s": prefill_s,
                "compile_s": getattr(runner, "compile_s", 0.0),
                "peak_rss_mib": peak_rss_since_reset_mib() if per_case else None,
                **runs,
            }
            del runner  # free this case's cache before the next one is allocated
        except Exception as error:  # reported in the table as n/a
            traceback.print_exc(file=sys.stderr)
            results[case["name"]] = {"error": _error_text(error)}
    return results


def _prefill(runner, prompt: list[list[int]], chunk: int | None):
    """``(seconds, first tokens)`` of prefilling ``prompt`` in calls of at most ``chunk`` tokens
    per row (None: one call), each chunk's step reading the cache the earlier ones wrote."""
    length = len(prompt[0])
    chunk = length if not chunk else chunk
    seconds, done, first = 0.0, 0, None
    while done < length:
        count = min(chunk, length - done)
        part_s, first = runner.prefill([row[done : done + count] for row in prompt], done)
        seconds += part_s
        done += count
    return seconds, first


def _run_sweep(runner_for, spec: dict[str, Any]) -> dict[str, Any]:
    """Decode speed after each context of ``spec["sweep"]``: prefill up to the context (from
    the previous one), decode, rewind to the context, go on to the next one."""
    sweep = spec["sweep"]
    prompt, contexts = sweep["prompt"], sweep["contexts"]
    runner = runner_for(len(prompt), sweep["capacity"])
    results, done = {}, 0
    for context in contexts:
        try:
            chunk = [row[done:context] for row in prompt]
            _, first = runner.prefill(chunk, done)
            runs = _decode_runs(runner, first, context, spec["steps"], spec["repeats"])
            runner.rewind(context)
            done = context
            results[str(context)] = {"step_s": runs["step_s"]}
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            results[str(context)] = {"error": _error_text(error)}
            break
    return results


def _run_capacity_check(runner_for, spec: dict[str, Any]) -> dict[str, Any]:
    """Decode steps after the same prompt in caches of each capacity of
    ``spec["capacity_check"]``: the step should cost what the live tokens cost, not the
    capacity. Every cache is filled first and their decode runs then take turns (a run on each
    cache per repeat), so a slow spell of a shared machine falls on all of them alike."""
    check = spec["capacity_check"]
    prompt = check["prompt"]
    start, steps = len(prompt[0]), spec["steps"]
    positions = [start + i for i in range(steps)]
    results: dict[str, Any] = {}
    ready = {}  # capacity -> (runner, first tokens)
    for capacity in check["capacities"]:
        try:
            runner = runner_for(len(prompt), capacity)
            _, first = _prefill(runner, prompt, spec.get("prefill_chunk"))
            runner.prepare_decode(positions)
            ready[capacity] = (runner, first)
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            results[str(capacity)] = {"error": _error_text(error)}
    step_s: dict[int, list[float]] = {capacity: [] for capacity in ready}
    for attempt in range(spec["repeats"] + 1):  # the first run of each cache warms it up
        for capacity, (runner, first) in list(ready.items()):
            try:
                if attempt:
                    runner.rewind(start)
                seconds, _ = _decode_run(runner, first, positions)
                if attempt:
                    step_s[capacity] += seconds
            except Exception as error:
                traceback.print_exc(file=sys.stderr)
                results[str(capacity)] = {"error": _error_text(error)}
                del ready[capacity]
    for capacity in ready:
        results[str(capacity)] = {"step_s": step_s[capacity]}
    return results


class _JaxkvRunner:
    """A jaxkv cache of ``batch`` rows of ``capacity`` tokens, driven one greedy step at a time.

    ``layout`` is ``"contiguous"`` (``TransformerCache``; ``token_ids: [B, T]``, the cache keeps
    each row's length) or ``"paged"`` (``PagedCache`` of ``batch * capacity / page_size`` pages,
    row ``b`` owning pages ``b * P .. (b + 1) * P - 1``; ``token_ids: [B * T]`` packed, row-major,
    with a ``PagedRuntimeMetadata`` per call).
    """

    def __init__(
        self, model, batch: int, capacity: int, layout: str, codec: str, page_size: int = PAGE_SIZE
    ):
        import jax
        import jax.numpy as jnp
        import numpy as np

        from jaxkv.caches import (
            PagedCache,
            PagedCacheMetadata,
            TransformerCache,
            TransformerCacheMetadata,
        )

        self.jax, self.jnp, self.np = jax, jnp, np
        self.model, self.batch, self.layout = model, batch, layout
        c = model.config
        self.page_size = page_size
        if layout == "paged":
            pages_per_seq = capacity // page_size
            metadata = PagedCacheMetadata.create(
                c.num_layers,
                batch * pages_per_seq,
                page_size,
                c.num_kv_heads,
                c.head_dim,
                batch,
                pages_per_seq,
                kv_quantization=codec,
            )
            self.cache = PagedCache.init_cache(metadata)
            self.page_tables = np.arange(batch * pages_per_seq, dtype=np.int64).reshape(
                batch, pages_per_seq
            )
        else:
            metadata = TransformerCacheMetadata.create(
                batch, capacity, c.num_layers, c.num_kv_heads, c.head_dim, kv_quantization=codec
            )
            self.cache = TransformerCache.init_cache(metadata)
        self.metadata = metadata
        self.greedy_step, self.truncate = _jitted_functions()
        self.compile_s = 0.0
        self._compiled: dict[Any, Any] = {}
        self._decode_runtimes: dict[int, Any] = {}  # position -> PagedRuntimeMetadata
        self._decode_step = self._decode_indices = None  # set by prefill

    # -- step inputs --------------------------------------------------------------------------

    def _paged_runtime(self, start: int, count: int):
        """The ``PagedRuntimeMetadata`` of every row taking the tokens at ``start .. start +
        count - 1``."""
        from jaxkv.caches import PagedRuntimeMetadata

        np, batch = self.np, self.batch
        positions = np.tile(np.arange(start, start + count), batch)  # [B * T] packed, row-major
        rows = np.repeat(np.arange(batch), count)
        page_size = self.page_size
        pages = self.page_tables[rows, positions // page_size]
        return PagedRuntimeMetadata.create(
            num_pages=self.metadata.num_pages,
            page_size=page_size,
            max_query_len=count,
            page_tables=self.page_tables,
            context_lens=np.full((batch,), start + count),
            query_start_loc=np.arange(batch + 1) * count,
            num_seqs=np.asarray(batch),
            slot_mapping=pages * page_size + positions % page_size,
            positions=positions,
            token_ids=np.zeros((batch * count,), np.int64),  # the step reads its token_ids arg
            copy_ops=np.full((batch, 2), -1),
            logits_indices=np.arange(batch) * count + count - 1,
        )

    def _inputs(self, tokens, start: int, count: int):
        """``(token_ids, runtime, logits_indices)`` of a call adding ``count`` tokens per row;
        ``tokens: [B, count]``."""
        jnp = self.jnp
        if self.layout == "paged":
            runtime = self._decode_runtimes.get(start) if count == 1 else None
            if runtime is None:
                runtime = self._paged_runtime(start, count)
            return jnp.reshape(tokens, (-1,)), runtime, runtime.logits_indices
        return tokens, None, jnp.full((self.batch,), count - 1, jnp.int32)

    def _compiled_step(self, args):
        jax = self.jax
        leaves, treedef = jax.tree_util.tree_flatten(args[1:])
        key = (treedef, tuple((leaf.shape, leaf.dtype) for leaf in leaves))
        if key not in self._compiled:
            begin = time.perf_counter()
            self._compiled[key] = self.greedy_step.lower(*args, config=self.model.config).compile()
            self.compile_s += time.perf_counter() - begin
        return self._compiled[key]

    # -- the runner interface -----------------------------------------------------------------

    def prefill(self, prompt: list[list[int]], start: int):
        tokens = self.jnp.asarray(self.np.asarray(prompt, self.np.int32))  # [B, T]
        count = tokens.shape[1]
        token_ids, runtime, logits_indices = self._inputs(tokens, start, count)
        args = (self.model.params, self.cache, token_ids, runtime, logits_indices)
        compiled = self._compiled_step(args)
        # The one-token step too (one compiled function serves every position), so the decode
        # loop never compiles; it is called with the same indices every step.
        decode_inputs = self._inputs(tokens[:, :1], start + count, 1)
        self._decode_step = self._compiled_step((self.model.params, self.cache, *decode_inputs))
        self._decode_indices = decode_inputs[2]
        begin = time.perf_counter()
        first, finite, self.cache = compiled(*args)
        first.block_until_ready()
        seconds = time.perf_counter() - begin
        _require_finite(bool(finite), "prefill")
        return seconds, first

    def prepare_decode(self, positions: list[int]) -> None:
        if self.layout == "paged":
            for position in positions:
                if position not in self._decode_runtimes:
                    self._decode_runtimes[position] = self._paged_runtime(position, 1)

    def decode(self, tokens, position: int):
        """``tokens``: what the last call returned (``[B, 1]`` contiguous, ``[B]`` paged)."""
        if self.layout == "paged":
            if position not in self._decode_runtimes:
                self.prepare_decode([position])
            runtime = self._decode_runtimes[position]
            indices = runtime.logits_indices
        else:
            runtime, indices = None, self._decode_indices
        next_tokens, finite, self.cache = self._decode_step(
            self.model.params, self.cache, tokens, runtime, indices
        )
        if not bool(finite):  # blocks until the step is done
            _require_finite(False, f"decode at position {position}")
        return next_tokens

    def rewind(self, length: int) -> None:
        if self.layout == "contiguous":
            lengths = self.jnp.full((self.batch,), length, self.jnp.int32)
            self.cache = self.truncate(self.cache, lengths)
        # Paged: the next steps' slots and context lengths come from their positions, so the
        # tokens past ``length`` are simply overwritten.

    def tokens_to_list(self, tokens) -> list[int]:
        return [int(token) for token in self.np.asarray(tokens).reshape(-1)]


def _require_finite(finite: bool, where: str) -> None:
    if not finite:
        raise RuntimeError(f"non-finite logits (NaN or inf) in the {where}")


@functools.cache
def _jitted_functions():
    """``(greedy_step, truncate)``, jitted with the cache donated. Made on first use: the
    module is also imported by HF workers, which have no JAX."""
    import jax
    import jax.numpy as jnp

    from jaxkv.models.llama import forward

    @functools.partial(jax.jit, static_argnames="config", donate_argnames="cache")
    def greedy_step(params, cache, token_ids, runtime, logits_indices, *, config):
        """``(next tokens, all logits finite [] bool, cache)`` after writing ``token_ids``:
        ``[B, T]`` contiguous (next tokens ``[B, 1]`` int32), ``[num_tokens]`` packed for a
        paged cache (next tokens ``[B]``)."""
        logits, cache = forward(
            params, config, token_ids, cache, runtime, logits_indices=logits_indices
        )  # logits: [rows, vocab] float32
        next_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [rows]
        if token_ids.ndim == 2:  # contiguous: shaped as the next step's token_ids, [B, 1]
            next_tokens = next_tokens[:, None]
        return next_tokens, jnp.isfinite(logits).all(), cache

    @functools.partial(jax.jit, donate_argnums=0)
    def truncate(cache, lengths):
        """``cache`` with row ``b`` cut back to ``lengths[b]`` tokens (``lengths: [B]`` int32)."""
        return cache.truncate(lengths)

    return greedy_step, truncate


def _jaxkv_worker(spec: dict[str, Any], name: str) -> dict[str, Any]:
    import jax

    from jaxkv.engine import Model

    _, _, layout, codec = IMPLEMENTATIONS[name]
    begin = time.perf_counter()
    model = Model.load(spec["gguf"], dtype="float32")
    info = {"load_s": time.perf_counter() - begin, "versions": f"jax {jax.__version__}"}

    def runner_for(batch: int, capacity: int) -> _JaxkvRunner:
        page_size = spec.get("page_size", PAGE_SIZE)
        return _JaxkvRunner(model, batch, capacity, layout, codec, page_size)

    if "sweep" in spec:
        return {**info, "sweep": _run_sweep(runner_for, spec)}
    if "capacity_check" in spec:
        return {**info, "capacity_check": _run_capacity_check(runner_for, spec)}
    return {**info, "cases": _run_cases(runner_for, spec)}


class _HFRunner:
    """HF transformers' ``DynamicCache`` (made by the first forward), driven one step at a time."""

    def __init__(self, model, torch):
        self.model, self.torch = model, torch
        self.cache = None

    def _forward(self, input_ids):
        output = self.model(
            input_ids=input_ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1
        )
        self.cache = output.past_key_values
        logits = output.logits[:, -1]  # [B, vocab]
        if not bool(self.torch.isfinite(logits).all()):
            raise RuntimeError("non-finite logits (NaN or inf)")
        return logits.argmax(-1)

    def prefill(self, prompt: list[list[int]], start: int):
        if start != (self.cache.get_seq_length() if self.cache is not None else 0):
            raise RuntimeError(f"prefill from {start}: the cache holds other tokens")
        input_ids = self.torch.tensor(prompt, dtype=self.torch.long)
        with self.torch.inference_mode():
            begin = time.perf_counter()
            first = self._forward(input_ids)
            seconds = time.perf_counter() - begin
        return seconds, first

    def prepare_decode(self, positions: list[int]) -> None:
        pass

    def decode(self, tokens, position: int):
        with self.torch.inference_mode():
            return self._forward(tokens[:, None])

    def rewind(self, length: int) -> None:
        # ``crop(-n)`` drops the last ``n`` tokens (transformers 5 refuses a positive length).
        extra = self.cache.get_seq_length() - length
        if extra:
            self.cache.crop(-extra)

    def tokens_to_list(self, tokens) -> list[int]:
        return [int(token) for token in tokens.tolist()]


def _hf_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["torch_threads"])
    transformers.logging.set_verbosity_error()
    path = pathlib.Path(spec["gguf"])
    begin = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    model.eval()
    info = {
        "load_s": time.perf_counter() - begin,
        "versions": f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, attention "
        f"{model.config._attn_implementation}",
    }
    # One small untimed prefill and step, so one-time kernel set-up is not charged to a case
    # (jaxkv's compilation is excluded likewise).
    warm = _HFRunner(model, torch)
    _, first = warm.prefill([[TOKEN_MARGIN] * 16], 0)
    warm.decode(first, 16)
    del warm

    def runner_for(batch: int, capacity: int) -> _HFRunner:
        return _HFRunner(model, torch)

    if "sweep" in spec:
        return {**info, "sweep": _run_sweep(runner_for, spec)}
    if "capacity_check" in spec:
        return {**info, "capacity_check": _run_capacity_check(runner_for, spec)}
    return {**info, "cases": _run_cases(runner_for, spec)}


def run_worker(name: str) -> None:
    """Worker entry point: spec JSON on stdin, ``RESULT_PREFIX`` + result JSON on stdout."""
    import json

    spec = json.loads(sys.stdin.read())
    try:
        if IMPLEMENTATIONS[name][1] == "jaxkv":
            result = _jaxkv_worker(spec, name)
        else:
            result = _hf_worker(spec)
    except Exception as error:
        traceback.print_exc(file=sys.stderr)
        result = {"error": _error_text(error)}
    result["peak_rss_mib"] = peak_rss_mib()
    result["end_rss_mib"] = current_rss_mib()
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------------------------


def parse_cases(text: str) -> list[tuple[int, int]]:
    """``"8x2048,1x8192"`` -> ``[(8, 2048), (1, 8192)]`` (batch, prompt tokens)."""
    cases = []
    for item in text.split(","):
        batch, sep, prompt = item.strip().partition("x")
        if not (sep and batch.isdigit() and prompt.isdigit()) or min(int(batch), int(prompt)) < 1:
            raise ValueError(
                f"--cases: expected BATCHxPROMPT items like 8x2048 (both >= 1), got {item!r}"
            )
        cases.append((int(batch), int(prompt)))
    return cases


def random_prompt(batch: int, length: int, vocab_size: int) -> list[list[int]]:
    """``[batch][length]`` token ids from ``default_rng(PROMPT_SEED)`` in the vocabulary minus
    ``TOKEN_MARGIN`` ids at either end."""
    import numpy as np

    rng = np.random.default_rng(PROMPT_SEED)
    ids = rng.integers(TOKEN_MARGIN, vocab_size - TOKEN_MARGIN, size=(batch, length))
    return ids.tolist()


def kv_bytes_per_token(config) -> dict[str, int]:
    """KV bytes per token (all layers, scales included) of each codec the table uses."""
    from jaxkv.caches import TransformerCacheMetadata

    return {
        codec: TransformerCacheMetadata.create(
            1,
            CAPACITY_MULTIPLE,
            config.num_layers,
            config.num_kv_heads,
            config.head_dim,
            kv_quantization=codec,
        ).bytes_per_token()
        for codec in {spec[3] for spec in IMPLEMENTATIONS.values()}
    }


def weight_bytes(config, batch: int) -> int:
    """Float32 weight bytes one decode step reads (``decode.step_bytes``; its KV part, for
    decode.py's short prompt, is not used here)."""
    return step_bytes(config, batch, 2)[0]


def summarise(case_result: dict[str, Any], batch: int) -> dict[str, Any]:
    step_s = statistics.median(case_result["step_s"])
    return {
        "prefill_s": case_result["prefill_s"],
        "step_s": step_s,
        "tokens_per_s": batch / step_s,
        "tokens": case_result["tokens"],
    }


def _ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}x" if value and reference else "n/a"


def build_case_table(
    results: dict[str, dict],
    case: dict[str, Any],
    bound_s: dict[str, float],
) -> tuple[list[str], list[list[object]], dict[str, dict]]:
    """Rows of one case; ``bound_s`` is each implementation's bandwidth-bound step seconds."""
    headers = [
        "implementation",
        "decode tok/s",
        "vs HF",
        "prefill s",
        "vs HF",
        "peak RSS GiB",
        "ms/step",
        "bound ms",
        "% of bound",
        f"first {COMPARE_TOKENS} = HF",
    ]
    name, batch = case["name"], case["batch"]
    summaries: dict[str, dict] = {}
    for impl in IMPLEMENTATIONS:
        case_result = results[impl].get("cases", {}).get(name)
        if case_result is None or "error" in case_result:
            error = (case_result or {}).get("error") or results[impl].get("error", "not run")
            summaries[impl] = {"error": error}
        else:
            summaries[impl] = summarise(case_result, batch)
        # The case's own peak where the worker could measure one, else the process's.
        peak = (case_result or {}).get("peak_rss_mib") or results[impl].get("peak_rss_mib")
        summaries[impl]["rss_gib"] = (peak or 0) / 2**10 or None
    hf = summaries[REFERENCE]
    hf_ok = "error" not in hf
    compared = min(COMPARE_TOKENS, case["steps"] + 1)
    rows: list[list[object]] = []
    for impl, (label, library, _, _) in IMPLEMENTATIONS.items():
        s = summaries[impl]
        if "error" in s:
            rows.append([label, f"n/a ({s['error']})"] + [""] * (len(headers) - 2))
            continue
        rss = f"{s['rss_gib']:.2f}" if s["rss_gib"] else "n/a"
        if library != "hf":
            rss += f" ({_ratio(s['rss_gib'], hf['rss_gib'] if hf_ok else None)})"
        same = "reference" if library == "hf" else "n/a"
        if library != "hf" and hf_ok:
            ours = [row[:compared] for row in s["tokens"]]
            theirs = [row[:compared] for row in hf["tokens"]]
            same = f"{leading_agreement(ours, theirs)}/{compared}"
        rows.append(
            [
                label,
                f"{s['tokens_per_s']:.1f}",
                _ratio(s["tokens_per_s"], hf["tokens_per_s"]) if hf_ok else "n/a",
                f"{s['prefill_s']:.2f}",
                _ratio(hf["prefill_s"], s["prefill_s"]) if hf_ok else "n/a",
                rss,
                f"{s['step_s'] * 1e3:.1f}",
                f"{bound_s[impl] * 1e3:.1f}",
                f"{bound_s[impl] / s['step_s']:.0%}",
                same,
            ]
        )
    return headers, rows, summaries


def print_capacity_check(results: dict[str, dict]) -> None:
    """The capacity table: median decode step per capacity and the largest against the
    smallest, with the target line."""
    capacities = [str(c) for c in CAPACITY_CHECK_CAPACITIES]
    print(
        f"\nDecode step at 1 x {CAPACITY_CHECK_PROMPT:,} live tokens against cache capacity "
        f"(target: the {int(capacities[-1]):,}-slot cache within "
        f"{CAPACITY_CHECK_LIMIT - 1:.0%} of the {int(capacities[0]):,}-slot one):"
    )
    rows = []
    for name, result in results.items():
        check = result.get("capacity_check", {})
        medians = {
            c: statistics.median(check[c]["step_s"]) * 1e3 if "step_s" in check.get(c, {}) else None
            for c in capacities
        }
        small, large = medians[capacities[0]], medians[capacities[-1]]
        ratio = large / small if small and large else None
        verdict = (
            "n/a" if ratio is None else ("met" if ratio <= CAPACITY_CHECK_LIMIT else "NOT met")
        )
        rows.append(
            [IMPLEMENTATIONS[name][0]]
            + [f"{m:.2f}" if m is not None else "n/a" for m in medians.values()]
            + [f"{ratio:.3f}x" if ratio is not None else result.get("error", "n/a"), verdict]
        )
    headers = ["implementation", *(f"ms/step @ {int(c):,}" for c in capacities), "ratio", "target"]
    print_rows(headers, rows)


def print_rows(headers: list[str], rows: list[list[object]]) -> None:
    """A table whose error rows (second cell ``n/a (...)``) span the columns after the label."""
    normal = [row for row in rows if not str(row[1]).startswith("n/a (")]
    table = format_table(headers, normal or [[""] * len(headers)]).splitlines()
    width = len(table[1].split("  ")[0])
    out, lines = table[:2], iter(table[2:])
    for row in rows:
        if str(row[1]).startswith("n/a ("):
            out.append(f"{str(row[0]).ljust(width)}  {row[1]}")
        else:
            out.append(next(lines))
    print("\n".join(out))


def target_lines(name: str, summaries: dict[str, dict]) -> list[str]:
    """One ``met`` / ``not met`` line per target of the case (none for other cases)."""
    targets = TARGETS.get(name)
    if not targets:
        return [f"targets: none for {name} (they are set for {' and '.join(TARGETS)})"]
    hf = summaries[REFERENCE]
    lines = []
    for what, impl, quantity, comparison, wanted in targets:
        ours = summaries[impl]
        if "error" in hf or "error" in ours or (quantity == "rss" and not ours["rss_gib"]):
            verdict, measured = "not checked", "n/a"
        else:
            if quantity == "decode":
                ratio = ours["tokens_per_s"] / hf["tokens_per_s"]
            elif quantity == "prefill":
                ratio = hf["prefill_s"] / ours["prefill_s"]
            else:
                ratio = ours["rss_gib"] / hf["rss_gib"]
            met = ratio >= wanted if comparison == ">=" else ratio <= wanted
            verdict, measured = ("met" if met else "NOT MET"), f"{ratio:.2f}x"
        lines.append(
            f"  {what:<28} {comparison} {wanted:.1f}x HF: {measured:>6}  "
            f"{verdict:<11}  ({IMPLEMENTATIONS[impl][0]})"
        )
    return ["targets:", *lines]


def sweep_rates(results: dict[str, dict], batch: int) -> dict[str, dict[int, float | None]]:
    """Decode tokens/s per implementation and context (``None`` where it failed)."""
    rates: dict[str, dict[int, float | None]] = {}
    for impl, result in results.items():
        rates[impl] = {}
        for context, point in result.get("sweep", {}).items():
            ok = "error" not in point
            rates[impl][int(context)] = batch / statistics.median(point["step_s"]) if ok else None
    return rates


def save_png(path: str, rates: dict[str, dict[int, float | None]], batch: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--png {path}: matplotlib is not installed, no figure written")
        return
    figure, axis = plt.subplots(figsize=(7, 4))
    for impl, points in rates.items():
        xs = [context for context, rate in sorted(points.items()) if rate is not None]
        if xs:
            axis.plot(xs, [points[x] for x in xs], marker="o", label=IMPLEMENTATIONS[impl][0])
    axis.set_xscale("log", base=2)
    contexts = sorted({context for points in rates.values() for context in points})
    axis.set_xticks(contexts, [f"{context:,}" for context in contexts])
    axis.set_ylim(bottom=0)
    axis.set_xlabel("context (prompt tokens)")
    axis.set_ylabel("decode tokens/s")
    axis.set_title(f"decode speed against context, batch {batch} (higher is better)")
    axis.legend(fontsize="small")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases",
        default=None,
        help=f"BATCHxPROMPT cases, comma-separated (default {DEFAULT_CASES}; --quick: "
        f"{QUICK_CASES})",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"decode steps per run (default {DEFAULT_STEPS}; --quick: {QUICK_STEPS})",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"decode runs per case; the step median pools them (default {DEFAULT_REPEATS}; "
        f"--quick: {QUICK_REPEATS})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small cases and few steps: a fast smoke run"
    )
    parser.add_argument(
        "--hf-python", default=None, help="interpreter with torch + transformers for the HF worker"
    )
    parser.add_argument(
        "--gguf", default=None, help="GGUF checkpoint (default: jaxkv's bundled SmolLM2)"
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated libraries (jaxkv, hf) or implementations ("
        + ", ".join(IMPLEMENTATIONS)
        + ") to run",
    )
    parser.add_argument(
        "--png",
        default=None,
        help="also run the context sweep and save decode tokens/s against context (matplotlib)",
    )
    parser.add_argument(
        "--sweep-batch", type=int, default=1, help="batch size of the --png sweep (default 1)"
    )
    parser.add_argument(
        "--page-size",
        type=int,
        default=PAGE_SIZE,
        help=f"tokens per page of the jaxkv paged cache (default {PAGE_SIZE}; it must divide "
        f"{CAPACITY_MULTIPLE}, the multiple every cache capacity is rounded up to)",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=DEFAULT_PREFILL_CHUNK,
        help="jaxkv prefills in calls of this many tokens per row, so its peak memory does not "
        f"grow with the prompt (0: one call; default {DEFAULT_PREFILL_CHUNK}); HF prefills in "
        "one call, as its generate() does",
    )
    parser.add_argument(
        "--worker-timeout", type=float, default=1800.0, help="seconds before a worker is abandoned"
    )
    parser.add_argument("--worker", choices=tuple(IMPLEMENTATIONS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prefill_chunk < 0:
        parser.error(f"--prefill-chunk must be >= 0, got {args.prefill_chunk}")
    for option in ("steps", "repeats"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option} must be >= 1, got {value}")
    if args.sweep_batch < 1:
        parser.error(f"--sweep-batch must be >= 1, got {args.sweep_batch}")
    if args.page_size < 1 or CAPACITY_MULTIPLE % args.page_size:
        parser.error(f"--page-size must be a divisor of {CAPACITY_MULTIPLE}, got {args.page_size}")
    if args.worker_timeout <= 0:
        parser.error(f"--worker-timeout must be > 0, got {args.worker_timeout}")
    try:
        args.case_list = parse_cases(args.cases or (QUICK_CASES if args.quick else DEFAULT_CASES))
    except ValueError as error:
        parser.error(str(error))
    if args.only is not None:
        choices = {*IMPLEMENTATIONS, "jaxkv", "hf"}
        unknown = sorted(set(args.only.split(",")) - choices)
        if unknown:
            parser.error(f"--only: unknown {unknown}; choose from {sorted(choices)}")
    return args


def selected_implementations(only: str | None) -> list[str]:
    if only is None:
        return list(IMPLEMENTATIONS)
    wanted = set(only.split(","))
    return [n for n, spec in IMPLEMENTATIONS.items() if n in wanted or spec[1] in wanted]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker)
        return
    from jaxkv.io.gguf import config_from_metadata, default_model_path, read_gguf_metadata

    steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    gguf = pathlib.Path(args.gguf).resolve() if args.gguf else default_model_path()
    config = config_from_metadata(read_gguf_metadata(gguf))
    selected = selected_implementations(args.only)
    hf_python, hf_missing = resolve_hf_python(args.hf_python)
    script = str(pathlib.Path(__file__).resolve())
    cases = [
        {
            "name": f"{batch}x{prompt}",
            "batch": batch,
            "steps": steps,
            "capacity": _round_up(prompt + steps, CAPACITY_MULTIPLE),
            "prompt": random_prompt(batch, prompt, config.vocab_size),
        }
        for batch, prompt in args.case_list
    ]
    common = {
        "gguf": str(gguf),
        "steps": steps,
        "repeats": repeats,
        "torch_threads": TORCH_THREADS,
        "prefill_chunk": args.prefill_chunk,
        "page_size": args.page_size,
    }
    started = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    print("measuring memory bandwidth ...", file=sys.stderr)
    bandwidths = measure_bandwidth()
    bandwidth = max(bandwidths.values())

    def launch(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        library = IMPLEMENTATIONS[name][1]
        if name not in selected:
            return {"error": "skipped by --only"}
        if library == "hf" and hf_python is None:
            return {"error": hf_missing}
        python = hf_python if library == "hf" else sys.executable
        command = [python, script, "--worker", name]
        return run_json_worker(
            command, spec, args.worker_timeout, RESULT_PREFIX, f"{name}: {python}"
        )

    results = {name: launch(name, {**common, "cases": cases}) for name in IMPLEMENTATIONS}
    sweep_results: dict[str, dict] = {}
    if args.png:
        contexts = list(QUICK_SWEEP_CONTEXTS if args.quick else SWEEP_CONTEXTS)
        sweep = {
            "prompt": random_prompt(args.sweep_batch, contexts[-1], config.vocab_size),
            "contexts": contexts,
            "capacity": _round_up(contexts[-1] + steps, CAPACITY_MULTIPLE),
        }
        print(f"context sweep ({contexts}, batch {args.sweep_batch}):", file=sys.stderr)
        sweep_results = {
            name: launch(name, {**common, "sweep": sweep}) for name in SWEEP_IMPLEMENTATIONS
        }

    capacity_results: dict[str, dict] = {}
    if not args.quick:
        check = {
            "prompt": random_prompt(1, CAPACITY_CHECK_PROMPT, config.vocab_size),
            "capacities": list(CAPACITY_CHECK_CAPACITIES),
        }
        print(f"capacity check (1 x {CAPACITY_CHECK_PROMPT:,} live tokens):", file=sys.stderr)
        capacity_results = {
            name: launch(name, {**common, "capacity_check": check})
            for name in CAPACITY_CHECK_IMPLEMENTATIONS
        }

    kv_per_token = kv_bytes_per_token(config)
    print(
        f"\nLong-context benchmark: {gguf.name}, float32 weights; greedy; {steps} decode steps x "
        f"{repeats} run(s) per case (median step); random prompt ids (seed {PROMPT_SEED}); "
        f"paged cache of {args.page_size}-token pages; "
        f"{os.cpu_count()} CPUs, 1-minute load average {load_at_start:.1f} at the start"
    )
    if load_at_start > 0.5 * (os.cpu_count() or 1):
        print(
            "warning: other processes are using the CPUs; every figure is noisy, HF's most "
            "(torch's OpenMP threads\nwait on each other when a core is taken away)"
        )
    print(
        "memory bandwidth (1 GiB float32): "
        + ", ".join(f"{label} {bw / 1e9:.1f} GB/s" for label, bw in bandwidths.items())
        + f"; bound uses {bandwidth / 1e9:.1f} GB/s"
    )
    print(
        "KV bytes per token (30 layers, scales included): "
        + ", ".join(f"{codec} {size:,}" for codec, size in sorted(kv_per_token.items()))
    )
    hf_skipped = REFERENCE not in selected or hf_python is None
    for case in cases:
        batch, prompt = case["batch"], len(case["prompt"][0])
        mean_live = prompt + (steps + 1) / 2  # step i attends over prompt + i + 1 keys
        weights = weight_bytes(config, batch)
        bound_s = {
            impl: (weights + batch * mean_live * kv_per_token[spec[3]]) / bandwidth
            for impl, spec in IMPLEMENTATIONS.items()
        }
        headers, rows, summaries = build_case_table(results, case, bound_s)
        kv_mib = batch * mean_live * kv_per_token["none"] / 2**20
        print(
            f"\nbatch {batch} x {prompt:,} prompt tokens (jaxkv cache capacity "
            f"{case['capacity']:,} tokens per row; per decode step: weights "
            f"{weights / 2**20:.0f} MiB + mean live float32 KV {kv_mib:.0f} MiB)"
        )
        print_rows(headers, rows)
        if hf_skipped:
            print(f"HF not run ({results[REFERENCE]['error']}): its ratio columns are n/a")
        print("\n".join(target_lines(case["name"], summaries)))
    print(
        "\nvs HF: jaxkv / HF decode tokens/s, HF / jaxkv prefill seconds, jaxkv / HF peak RSS "
        "(decode and prefill: > 1 is faster);\nprefill: the prompt's forward + first token, one "
        "run; ms/step: median decode step; bound ms: (weight + mean live KV bytes\nper step) / "
        f"bandwidth; first {COMPARE_TOKENS} = HF: leading greedy tokens equal to HF's (worst "
        "row); peak RSS: the case's (loaded model included)."
    )
    for name, result in results.items():
        if "load_s" not in result:
            continue
        compile_s = sum(c.get("compile_s", 0.0) for c in result.get("cases", {}).values())
        end_rss = result.get("end_rss_mib")
        print(
            f"  {IMPLEMENTATIONS[name][0]}: {result['versions']}; load {result['load_s']:.1f} s"
            + (f", AOT compile {compile_s:.1f} s (excluded)" if compile_s else "")
            + (f", RSS at exit {end_rss:.0f} MiB" if end_rss is not None else "")
            + f", process peak {result.get('peak_rss_mib', 0):.0f} MiB (loading included)"
        )
    if capacity_results:
        print_capacity_check(capacity_results)
    if args.png:
        rates = sweep_rates(sweep_results, args.sweep_batch)
        contexts = sorted({c for points in rates.values() for c in points})
        print(f"\nDecode tokens/s against context (batch {args.sweep_batch}, {steps} steps):")
        table_rows = [
            [IMPLEMENTATIONS[impl][0]]
            + [f"{rate:.1f}" if (rate := rates[impl].get(c)) else "n/a" for c in contexts]
            for impl in rates
        ]
        print(format_table(["implementation", *map(str, contexts)], table_rows))
        for name, result in sweep_results.items():
            if "error" in result:
                print(f"  {IMPLEMENTATIONS[name][0]}: {result['error']}")
        save_png(args.png, rates, args.sweep_batch)
    print(f"total wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
