"""Gemma 3 270M through jaxkv's hybrid cache (sliding-window layers on rings of 512 slots, global
layers contiguous) against HF transformers' outputs in tests/data/gemma3_reference.json
(regenerate with scripts/make_gemma3_reference.py), and the long prompt (1,516 tokens: the rings
wrap twice) prefilled in one call, in chunks of 100, in chunks crossing the window boundary and
token by token: the same logits.

Every contiguous run is batch 1 with one cache geometry, so the module compiles four step shapes
for it (the whole long prompt, a chunk of 100, a chunk of 512 and one token), plus two for the
paged backend (sliding layers on their own windowed pool), two for it with int8 KV and one for
the int8 contiguous cache."""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.caches.hybrid import HybridCache, HybridRuntimeMetadata
from jaxkv.engine.step_inputs import hybrid_page_managers, hybrid_paged_runtime
from jaxkv.io.gguf_gemma3 import load_gemma3_gguf
from jaxkv.models.gemma3 import (
    GLOBAL,
    SLIDING,
    gemma3_forward,
    gemma3_forward_uncached,
    gemma3_params_to_device,
)
from jaxkv.pages import PageManager

DATA = pathlib.Path(__file__).parents[1] / "data"
ATOL = 2e-3  # against HF, float32
CHUNK_ATOL = 1e-3  # one jaxkv prefill against another
MAX_LENGTH = 1600  # >= the long prompt plus its generation
CHUNK = 100
WIDE = 512
# Chunks of the long prompt crossing the window boundary (512) and its double (1024); the
# rest goes in one token at a time.
WINDOW_CHUNKS = (500, 30, 512, 258)


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads((DATA / "gemma3_reference.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def model():
    config, params = load_gemma3_gguf(device=True)
    return config, gemma3_params_to_device(params)


@functools.partial(jax.jit, static_argnames="config", donate_argnames="cache")
def _step(params, cache, tokens, runtime, logits_indices, *, config):
    return gemma3_forward(params, config, tokens, cache, runtime, logits_indices=logits_indices)


class Runner:
    """One batch-1 sequence through a fresh cache, fed in chunks of any size."""

    def __init__(self, model, kv_quantization="none"):
        self.config, self.params = model
        metadata = self.config.cache_metadata(1, MAX_LENGTH, kv_quantization=kv_quantization)
        self.cache = HybridCache.init_cache(metadata)
        self.length = 0

    def feed(self, tokens, width=None, positions=None):
        """Write ``tokens`` (padded to ``width`` columns); logits ``[vocab]`` of the last one,
        or ``[len(positions), vocab]`` at these absolute positions of the chunk."""
        count = len(tokens)
        width = width or count
        padded = np.zeros((1, width), np.int32)
        padded[0, :count] = tokens
        if positions is None:
            indices = np.array([count - 1], np.int32)
        else:
            indices = np.array([[p - self.length for p in positions]], np.int32)
        runtime = HybridRuntimeMetadata.create(np.array([count], np.int32))
        logits, self.cache = _step(
            self.params,
            self.cache,
            jnp.asarray(padded),
            runtime,
            jnp.asarray(indices),
            config=self.config,
        )
        self.length += count
        return np.asarray(logits[0])

    def greedy(self, first_logits, steps):
        """``steps`` greedy tokens from ``first_logits``: (tokens, logits [steps, vocab])."""
        logits, tokens, all_logits = first_logits, [], []
        for _ in range(steps):
            all_logits.append(logits)
            tokens.append(int(np.argmax(logits)))
            logits = self.feed([tokens[-1]])
        return tokens, np.stack(all_logits)


def _prompt(reference, name):
    return next(p for p in reference["prompts"] if p["name"] == name)


def _check_top(logits, top, atol=ATOL, what=""):
    got = np.asarray(logits)[top["ids"]]
    np.testing.assert_allclose(got, top["values"], atol=atol, rtol=0, err_msg=what)


def _chunks(tokens, sizes, rest):
    """Split ``tokens`` into ``sizes`` then pieces of ``rest`` (the last may be shorter)."""
    out, start = [], 0
    for size in sizes:
        out.append(tokens[start : start + size])
        start += size
    while start < len(tokens):
        out.append(tokens[start : start + rest])
        start += rest
    return out


def _check_positions(logits_at, prompt, what):
    """Compare jaxkv logits ``{position: [vocab]}`` with HF's top-k where HF stored them."""
    checked = 0
    for entry in prompt["positions"]:
        if entry["position"] in logits_at:
            _check_top(logits_at[entry["position"]], entry, what=f"{what} @ {entry['position']}")
            checked += 1
    return checked


@pytest.fixture(scope="module")
def long_one_call(model, reference):
    """The long prompt in one call: logits at every position any other test compares."""
    prompt = _prompt(reference, "long")
    ids = prompt["prompt_ids"]
    positions = sorted(
        {e["position"] for e in prompt["positions"]}
        | {end - 1 for end in range(CHUNK, len(ids), CHUNK)}
        | {int(end) - 1 for end in np.cumsum(WINDOW_CHUNKS)}
        | set(range(len(ids) - 32, len(ids)))
    )
    runner = Runner(model)
    logits = runner.feed(ids, positions=positions)
    return runner, dict(zip(positions, logits, strict=True))


def test_reference_prompts(reference):
    names = [p["name"] for p in reference["prompts"]]
    assert names == ["short", "long", "code"]
    long = _prompt(reference, "long")
    assert long["num_prompt_tokens"] >= 1400  # the 512-slot rings wrap twice
    assert all(
        p["prompt_ids"][0] == reference["special_tokens"]["bos_id"] for p in reference["prompts"]
    )


def test_cache_has_rings_for_sliding_layers_and_contiguous_global_layers(model):
    config, _ = model
    metadata = config.cache_metadata(1, MAX_LENGTH)
    assert metadata.layer_kinds == config.layer_kinds
    assert metadata.sliding_attention.is_ring and metadata.sliding_attention.num_slots == 512
    assert not metadata.attention.is_ring and metadata.attention.num_slots == MAX_LENGTH
    assert config.layer_kinds.count(GLOBAL) == 3 and config.layer_kinds.count(SLIDING) == 15


def test_long_prompt_matches_hf_in_one_call_and_greedy(long_one_call, reference):
    prompt = _prompt(reference, "long")
    runner, logits_at = long_one_call
    last = logits_at[len(prompt["prompt_ids"]) - 1]
    _check_top(last, prompt["last_prompt_top"], what="last prompt position")
    np.testing.assert_allclose(
        last[reference["sampled_ids"]], prompt["last_prompt_sampled"], atol=ATOL, rtol=0
    )
    # Positions around the window boundary and past both wraps of the rings.
    assert _check_positions(logits_at, prompt, "one call") == len(prompt["positions"])
    tokens, step_logits = runner.greedy(last, len(prompt["generated_ids"]))
    assert tokens == prompt["generated_ids"]
    for step, top in enumerate(prompt["steps"]):
        _check_top(step_logits[step], top, what=f"decode step {step}")


@pytest.mark.parametrize("name", ["short", "code"])
def test_short_prompts_match_hf_greedy(model, reference, name):
    prompt = _prompt(reference, name)
    ids = prompt["prompt_ids"]
    assert len(ids) <= CHUNK
    runner = Runner(model)
    last = runner.feed(ids, width=CHUNK)
    _check_top(last, prompt["last_prompt_top"], what="last prompt position")
    np.testing.assert_allclose(
        last[reference["sampled_ids"]], prompt["last_prompt_sampled"], atol=ATOL, rtol=0
    )
    tokens, step_logits = runner.greedy(last, len(prompt["generated_ids"]))
    assert tokens == prompt["generated_ids"]
    for step, top in enumerate(prompt["steps"]):
        _check_top(step_logits[step], top, what=f"decode step {step}")


def test_long_prompt_in_chunks_of_100(model, long_one_call, reference):
    prompt = _prompt(reference, "long")
    _, one_call = long_one_call
    runner = Runner(model)
    logits_at = {}
    for chunk in _chunks(prompt["prompt_ids"], (), CHUNK):
        last = runner.length + len(chunk) - 1
        logits_at[last] = runner.feed(chunk, width=CHUNK)
    for position, logits in logits_at.items():
        np.testing.assert_allclose(
            logits, one_call[position], atol=CHUNK_ATOL, rtol=0, err_msg=str(position)
        )
    assert _check_positions(logits_at, prompt, "chunks of 100") >= 1


def test_long_prompt_in_chunks_across_the_window_then_token_by_token(
    model, long_one_call, reference
):
    """500 + 30 + 512 + 258 tokens (crossing positions 512 and 1024), then the rest one token
    at a time from position 1300: the same logits as the one-call prefill and HF."""
    prompt = _prompt(reference, "long")
    ids = prompt["prompt_ids"]
    _, one_call = long_one_call
    runner = Runner(model)
    logits_at = {}
    for size in WINDOW_CHUNKS:
        last = runner.length + size - 1
        logits_at[last] = runner.feed(ids[runner.length : last + 1], width=WIDE)
    while runner.length < len(ids):
        position = runner.length
        logits = runner.feed([ids[position]])
        if position in one_call or any(e["position"] == position for e in prompt["positions"]):
            logits_at[position] = logits
    compared = 0
    for position, logits in logits_at.items():
        if position in one_call:
            np.testing.assert_allclose(
                logits, one_call[position], atol=CHUNK_ATOL, rtol=0, err_msg=str(position)
            )
            compared += 1
    assert compared >= 30
    assert _check_positions(logits_at, prompt, "window chunks + tokens") >= 4
    _check_top(logits_at[len(ids) - 1], prompt["last_prompt_top"], what="last prompt position")


def test_int8_kv_cache_on_both_kinds_of_layer(model, long_one_call, reference):
    ids = _prompt(reference, "long")["prompt_ids"]
    _, one_call = long_one_call
    runner = Runner(model, kv_quantization="int8")
    metadata = runner.cache.metadata
    assert metadata.sliding_attention.kv_quantization == "int8"
    assert metadata.attention.kv_quantization == "int8"
    for size in WINDOW_CHUNKS[:3]:
        logits = runner.feed(ids[runner.length : runner.length + size], width=WIDE)
    want = one_call[sum(WINDOW_CHUNKS[:3]) - 1]
    assert np.argmax(logits) == np.argmax(want)
    assert np.max(np.abs(logits - want)) < 0.5
    assert not np.array_equal(logits, want)  # the keys and values really were quantised


def test_uncached_reference_forward_matches_hf(model, reference):
    config, params = model
    prompt = _prompt(reference, "short")
    forward = jax.jit(gemma3_forward_uncached, static_argnums=1)
    logits = forward(params, config, jnp.asarray([prompt["prompt_ids"]], jnp.int32))
    _check_top(np.asarray(logits[0, -1]), prompt["last_prompt_top"], what="uncached")


PAGED_DECODE_STEPS = 8
PAGE_SIZE = 16
WINDOW_MARGIN = 16


class PagedRunner:
    """One batch-1 sequence on the paged backend: global layers on a pool of every page,
    sliding layers on their own windowed pool (the pages before the window go back)."""

    def __init__(self, model, kv_quantization="none"):
        self.config, self.params = model
        self.metadata = self.config.cache_metadata(
            1,
            MAX_LENGTH,
            attention_backend="paged",
            page_size=PAGE_SIZE,
            kv_quantization=kv_quantization,
            max_chunk_tokens=WIDE,
            window_margin=WINDOW_MARGIN,
        )
        self.cache = HybridCache.init_cache(self.metadata)
        self.pages = hybrid_page_managers(
            self.metadata, window_margin=WINDOW_MARGIN, token_buckets=(8, WIDE)
        )

    def run(self, count, width):
        """Schedule the next ``count`` tokens of sequence 0 on both pools; logits of the last."""
        step = self.pages.schedule([(0, count)])
        runtime = hybrid_paged_runtime(step, width=width)
        logits, self.cache = _step(
            self.params,
            self.cache,
            runtime.batch_token_ids(),
            runtime,
            jnp.asarray([count - 1], jnp.int32),
            config=self.config,
        )
        self.pages.commit_step(step)
        return np.asarray(logits[0])

    def greedy(self, logits, steps):
        tokens, all_logits = [], []
        for _ in range(steps):
            tokens.append(int(np.argmax(logits)))
            self.pages.append_tokens(0, [tokens[-1]])
            logits = self.run(1, 1)
            all_logits.append(logits)
        return tokens, all_logits


def test_paged_backend_long_prompt_matches_hf(model, reference):
    """Sliding layers on their own small, windowed pool, global layers on a pool of every page:
    the long prompt in chunks crossing the window boundary (500 + 30 + 512 + 258 + 216), then
    greedy decoding; the same logits as HF while the sliding pool gives its old pages back."""
    config, _ = model
    prompt = _prompt(reference, "long")
    ids = prompt["prompt_ids"]
    runner = PagedRunner(model)
    metadata, pages = runner.metadata, runner.pages
    assert metadata.sliding_attention.sliding_window == config.sliding_window == 512
    # ceil((W + chunk + margin) / page_size) + 1 pages for one row, against every page.
    bound = -(-(512 + WIDE + WINDOW_MARGIN) // PAGE_SIZE) + 1
    assert metadata.sliding_attention.num_pages == bound == 66
    assert metadata.attention.num_pages == MAX_LENGTH // PAGE_SIZE == 100
    pages.add_sequence(0, ids)

    logits_at, done = {}, 0
    for chunk in _chunks(ids, WINDOW_CHUNKS, WIDE):
        done += len(chunk)
        logits_at[done - 1] = runner.run(len(chunk), WIDE)
        held = [page for page in pages.sliding.get_sequence(0).page_ids if page != -1]
        assert len(held) <= bound
    assert _check_positions(logits_at, prompt, "paged chunks across the window") >= 1
    logits = logits_at[len(ids) - 1]
    _check_top(logits, prompt["last_prompt_top"], what="paged last prompt position")

    # The pages before num_computed - W - margin went back to the sliding pool.
    table = pages.sliding.get_sequence(0).page_ids
    released = (len(ids) - 512 - WINDOW_MARGIN) // PAGE_SIZE
    assert len(ids) >= 1400 and table[:released] == (-1,) * released
    assert pages.sliding.num_free_pages == bound - (len(table) - released)
    assert len(pages.full.get_sequence(0).page_ids) == len(table) == -(-len(ids) // PAGE_SIZE)
    assert pages.full.num_free_pages == 100 - len(table)
    pages.check_invariants()

    tokens, step_logits = runner.greedy(logits, PAGED_DECODE_STEPS)
    assert tokens == prompt["generated_ids"][:PAGED_DECODE_STEPS]
    for step in range(PAGED_DECODE_STEPS):
        _check_top(step_logits[step], prompt["steps"][step + 1], what=f"paged decode {step + 1}")
    # A rollback past the margin is refused and changes neither pool; within it, it works.
    floor = pages.min_truncate_length(0)
    computed = len(ids) + PAGED_DECODE_STEPS
    assert computed - WINDOW_MARGIN >= floor > 0
    before = pages.snapshot()
    with pytest.raises(ValueError, match=f"expected num_tokens >= {floor}"):
        pages.truncate(0, floor - 1)
    assert pages.snapshot() == before
    pages.truncate(0, computed - WINDOW_MARGIN)
    pages.free(0)
    assert pages.sliding.num_free_pages == bound and pages.full.num_free_pages == 100


def test_int8_kv_on_the_windowed_paged_backend_decodes_like_float32(model, reference):
    prompt = _prompt(reference, "short")
    ids = prompt["prompt_ids"]
    tokens = {}
    for codec in ("none", "int8"):
        runner = PagedRunner(model, kv_quantization=codec)
        assert runner.metadata.sliding_attention.kv_quantization == codec
        runner.pages.add_sequence(0, ids)
        tokens[codec], _ = runner.greedy(runner.run(len(ids), WIDE), PAGED_DECODE_STEPS)
    assert tokens["int8"] == tokens["none"] == prompt["generated_ids"][:PAGED_DECODE_STEPS]


def test_paged_cache_metadata_sizes_the_sliding_pool(model):
    config, params = model
    metadata = config.cache_metadata(1, 32_768, attention_backend="paged", page_size=16)
    assert metadata.attention.num_pages == 2048
    assert metadata.sliding_attention.num_pages == -(-(512 + 512) // 16) + 1 == 65
    assert metadata.sliding_attention.max_pages_per_seq == 2048
    wide = config.cache_metadata(
        4, 32_768, attention_backend="paged", max_chunk_tokens=1024, window_margin=32
    )
    assert wide.sliding_attention.num_pages == 4 * (-(-(512 + 1024 + 32) // 16) + 1)
    one_table = config.cache_metadata(1, 64, attention_backend="paged", sliding_num_pages=4)
    assert one_table.sliding_attention.num_pages == 4 == one_table.attention.num_pages
    with pytest.raises(
        ValueError, match="sliding_num_pages=4 applies to attention_backend='paged'"
    ):
        config.cache_metadata(1, 64, sliding_num_pages=4)
    with pytest.raises(ValueError, match="window_margin must be >= 0, got -1"):
        config.cache_metadata(1, 64, attention_backend="paged", window_margin=-1)
    # A one-table runtime cannot drive a sliding pool of its own.
    small = config.cache_metadata(1, 2048, attention_backend="paged")
    assert (small.attention.num_pages, small.sliding_attention.num_pages) == (128, 65)
    cache = HybridCache.init_cache(small)
    manager = PageManager(**small.paged_geometry(), enable_prefix_caching=False)
    manager.add_sequence(0, [2, 3])
    runtime = hybrid_paged_runtime(manager.schedule([(0, 2)]))
    with pytest.raises(ValueError, match="sliding layers have their own pool"):
        gemma3_forward(params, config, runtime.batch_token_ids(), cache, runtime)


def test_forward_validates_its_arguments(model):
    config, params = model
    cache = HybridCache.init_cache(config.cache_metadata(1, 64))
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(TypeError, match="cache must be a HybridCache"):
        gemma3_forward(params, config, tokens, cache.views)
    with pytest.raises(TypeError, match="token_ids must be an int array"):
        gemma3_forward(params, config, tokens.astype(jnp.float32), cache)
    with pytest.raises(ValueError, match="batch_size=1"):
        gemma3_forward(params, config, jnp.zeros((2, 4), jnp.int32), cache)
    with pytest.raises(ValueError, match="layer kinds"):
        other = config.replace(layer_kinds=(SLIDING,) * config.num_layers)
        gemma3_forward(params, other, tokens, cache)
    with pytest.raises(ValueError, match="logits_indices"):
        gemma3_forward(params, config, tokens, cache, logits_indices=jnp.zeros((2,), jnp.int32))
    with pytest.raises(TypeError, match="runtime must be HybridRuntimeMetadata"):
        gemma3_forward(params, config, tokens, cache, runtime=object())
