"""SmolLM2 through jaxkv caches against HF transformers' outputs stored in tests/data
(regenerate with scripts/make_reference.py), and cached decoding against an uncached forward."""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.caches import TransformerCache, TransformerCacheMetadata, TransformerMetadata
from jaxkv.engine import Model, generate
from jaxkv.models.llama import forward, forward_uncached

DATA = pathlib.Path(__file__).parents[1] / "data"
STEPS = 40


@pytest.fixture(scope="module")
def model() -> Model:
    return Model.load()


@pytest.fixture(scope="module")
def reference():
    meta = json.loads((DATA / "reference.json").read_text())
    arrays = np.load(DATA / "reference.npz")
    return meta, arrays


@functools.partial(jax.jit, static_argnames="config", donate_argnames="cache")
def _step(params, cache, tokens, runtime, logits_indices, *, config):
    return forward(params, config, tokens, cache, runtime, logits_indices=logits_indices)


def _greedy_contiguous(model: Model, prompts: list[list[int]], steps: int):
    """Ragged batch, greedy: (per-step logits [steps, B, vocab], tokens [B, steps])."""
    config = model.config
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = int(-(-lengths.max() // 64) * 64)
    metadata = TransformerCacheMetadata.create(
        len(prompts), width + steps, config.num_layers, config.num_kv_heads, config.head_dim
    )
    cache = TransformerCache.init_cache(metadata)
    tokens = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    logits, cache = _step(
        model.params,
        cache,
        jnp.asarray(tokens),
        TransformerMetadata.create(lengths),
        jnp.asarray(lengths - 1),
        config=config,
    )
    all_logits, generated = [], []
    zeros = jnp.zeros((len(prompts),), jnp.int32)
    for _ in range(steps):
        logits = np.asarray(logits)
        all_logits.append(logits)
        next_tokens = logits.argmax(-1).astype(np.int32)
        generated.append(next_tokens)
        logits, cache = _step(
            model.params,
            cache,
            jnp.asarray(next_tokens[:, None]),
            TransformerMetadata.create(),
            zeros,
            config=config,
        )
    return np.stack(all_logits), np.stack(generated, axis=1)


@pytest.fixture(scope="module")
def contiguous_run(model, reference):
    meta, _ = reference
    prompts = [p["prompt_ids"] for p in meta["prompts"]]
    return _greedy_contiguous(model, prompts, STEPS)


def test_reference_covers_three_prompts_of_the_required_kinds(reference):
    meta, _ = reference
    names = [p["name"] for p in meta["prompts"]]
    assert names == ["short", "long", "chat"]
    assert len(meta["prompts"][1]["prompt_ids"]) >= 250
    assert meta["prompts"][2]["prompt_ids"][0] == meta["special_tokens"]["bos_id"]


def test_last_prompt_logits_match_reference(contiguous_run, reference):
    meta, arrays = reference
    logits, _ = contiguous_run
    for row, prompt in enumerate(meta["prompts"]):
        want = arrays[f"{prompt['name']}/last_prompt_logits"]
        np.testing.assert_allclose(logits[0, row], want, atol=1e-3, rtol=0)


def test_greedy_tokens_match_reference_for_40_steps(contiguous_run, reference):
    meta, _ = reference
    _, generated = contiguous_run
    for row, prompt in enumerate(meta["prompts"]):
        assert generated[row].tolist() == prompt["generated_ids"], prompt["name"]


def test_top_k_logits_match_reference_at_every_step(contiguous_run, reference):
    meta, arrays = reference
    logits, _ = contiguous_run
    for row, prompt in enumerate(meta["prompts"]):
        ids = arrays[f"{prompt['name']}/topk_ids"]
        values = arrays[f"{prompt['name']}/topk_values"]
        got = np.take_along_axis(logits[:, row], ids, axis=-1)
        np.testing.assert_allclose(got, values, atol=2e-3, rtol=0)


def test_cached_decode_equals_uncached_forward_on_ragged_batch(model):
    prompts = [[504, 3575, 282, 4649, 314], [1, 9690, 198], [28, 29, 30, 31, 32, 33, 34, 35, 36]]
    steps = 6
    logits, generated = _greedy_contiguous(model, prompts, steps)
    full = [p + generated[row].tolist() for row, p in enumerate(prompts)]
    lengths = np.array([len(f) for f in full], np.int32)
    tokens = np.zeros((len(full), lengths.max()), np.int32)
    for row, seq in enumerate(full):
        tokens[row, : len(seq)] = seq
    reference = np.asarray(
        jax.jit(forward_uncached, static_argnums=1)(
            model.params, model.config, jnp.asarray(tokens), jnp.asarray(lengths)
        )
    )
    for row, prompt in enumerate(prompts):
        for step in range(steps):
            position = len(prompt) - 1 + step
            np.testing.assert_allclose(
                logits[step, row], reference[row, position], atol=1e-3, rtol=0
            )


@pytest.fixture(scope="module")
def paged_run(model, reference):
    """The three reference prompts as one ragged batch through the paged engine, greedy."""
    meta, _ = reference
    prompts = [p["prompt_ids"] for p in meta["prompts"]]
    return generate(
        model, prompts, max_new_tokens=STEPS, cache="paged", ignore_eos=True, output_logits=True
    )


def test_paged_cache_matches_reference_logits_and_tokens(paged_run, reference):
    meta, arrays = reference
    for generation, prompt in zip(paged_run.generations, meta["prompts"], strict=True):
        name = prompt["name"]
        assert generation.token_ids == prompt["generated_ids"], name
        np.testing.assert_allclose(
            generation.logits[0], arrays[f"{name}/last_prompt_logits"], atol=1e-3, rtol=0
        )
        got = np.take_along_axis(generation.logits, arrays[f"{name}/topk_ids"], axis=-1)
        np.testing.assert_allclose(got, arrays[f"{name}/topk_values"], atol=2e-3, rtol=0)


def test_paged_and_contiguous_agree(paged_run, contiguous_run):
    logits, _ = contiguous_run
    for row, generation in enumerate(paged_run.generations):
        np.testing.assert_allclose(generation.logits, logits[:, row], atol=1e-4, rtol=0)
