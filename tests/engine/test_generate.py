"""``jaxkv.generate``, ``ChatSession`` and the ``jaxkv`` command on the bundled SmolLM2."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxkv
from jaxkv import cli
from jaxkv.engine import ChatSession, Model, SamplingParams, generate, sample

DATA = pathlib.Path(__file__).parents[1] / "data"


@pytest.fixture(scope="module")
def model() -> Model:
    return Model.load()


@pytest.fixture(scope="module")
def reference():
    return json.loads((DATA / "reference.json").read_text())


def test_lazy_top_level_exports():
    assert jaxkv.generate is generate and jaxkv.Model is Model
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = jaxkv.nope


@pytest.mark.parametrize("cache", ["contiguous", "paged"])
def test_greedy_batch_matches_reference_and_streams(model, reference, cache):
    prompts = [p["prompt_ids"] for p in reference["prompts"]]
    streamed = {row: "" for row in range(len(prompts))}

    def on_text(row, text):
        streamed[row] += text

    result = generate(model, prompts, max_new_tokens=24, cache=cache, on_text=on_text)
    for row, (generation, prompt) in enumerate(
        zip(result.generations, reference["prompts"], strict=True)
    ):
        want = prompt["generated_ids"]
        eos = prompt["first_eos_step"]
        if eos is not None and eos < 24:
            assert generation.finish_reason == "eos"
            assert generation.token_ids == want[:eos]
        else:
            assert generation.finish_reason == "length"
            assert generation.token_ids == want[:24]
        assert streamed[row] == generation.text
        assert generation.text == model.tokenizer.decode(generation.token_ids)
    assert result.prompt_tokens == sum(len(p) for p in prompts)
    assert result.decode_tokens_per_second > 0
    assert "generated tokens" in result.summary()


def test_stop_strings_cut_the_text(model):
    result = generate(model, ["The capital of France is"], max_new_tokens=20, stop=["."])
    generation = result.generations[0]
    assert generation.finish_reason == "stop"
    assert generation.text == " Paris"


def test_sampling_is_seeded_and_top_k_one_is_greedy(model):
    prompt = ["Once upon a time"]
    first = generate(model, prompt, max_new_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    again = generate(model, prompt, max_new_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    assert first.generations[0].token_ids == again.generations[0].token_ids
    greedy = generate(model, prompt, max_new_tokens=8)
    top1 = generate(model, prompt, max_new_tokens=8, temperature=1.5, top_k=1, seed=3)
    assert top1.generations[0].token_ids == greedy.generations[0].token_ids


def test_sample_respects_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
    keys = jax.random.key(0)
    top2 = np.asarray(sample(logits, keys, SamplingParams(temperature=1.0, top_k=2)))
    assert set(top2.tolist()) == {0, 1}
    nucleus = np.asarray(sample(logits, keys, SamplingParams(temperature=1.0, top_p=0.75)))
    assert set(nucleus.tolist()) == {0, 1}
    counts = np.bincount(nucleus, minlength=4) / len(nucleus)
    np.testing.assert_allclose(counts[:2], [0.5 / 0.8, 0.3 / 0.8], atol=0.04)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(prompts="just a string"), "prompts must be a non-empty list"),
        (dict(prompts=[[]]), r"prompts\[0\] is empty"),
        (dict(prompts=[[1, 10**9]]), r"prompts\[0\] has token ids outside \[0, 49152\)"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
        (dict(cache="ring"), r"cache must be one of \('contiguous', 'paged'\), got 'ring'"),
        (dict(stop="."), "stop must be a list of non-empty strings"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must lie in \(0, 1\]"),
        (dict(max_new_tokens=9000), "exceeds the model's context of 8192"),
    ],
)
def test_generate_validates_arguments(model, kwargs, message):
    arguments = dict(prompts=["hi"], max_new_tokens=4)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        generate(model, arguments.pop("prompts"), **arguments)


def test_chat_reuses_the_cache_across_turns(model):
    session = ChatSession(model, max_length=256)
    first = session.send("What is the capital of France?", max_new_tokens=12)
    assert first
    cached = len(session.cached_ids)
    second = session.send("And of Italy?", max_new_tokens=12)
    # Only the new turn (plus the template tokens closing the previous reply) was prefilled.
    assert session.last_prefill_tokens < 30 < cached
    # The reply equals a from-scratch run over the same rendered conversation.
    prompt = model.tokenizer.apply_chat_template(session.messages[:-1], add_generation_prompt=True)
    fresh = generate(model, [prompt], max_new_tokens=12)
    assert second == fresh.generations[0].text


def test_cli_info_and_generate(capsys):
    assert cli.main(["info", "--max-length", "1024"]) == 0
    out = capsys.readouterr().out
    assert "num_layers: 30" in out and "contiguous float32" in out and "46,080" in out
    code = cli.main(["generate", "The capital of France is", "--raw", "--max-new-tokens", "3"])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out.startswith(" Paris")
    assert "prompt eval time =" in captured.err and "/     5 tokens" in captured.err
    assert "/     3 tokens" in captured.err.splitlines()[-1]  # total time


def test_cli_reports_bad_input(capsys, tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    # A runtime error (the file is not a GGUF) exits 1; a usage error exits 2, before loading.
    assert cli.main(["info", "--model", str(bogus)]) == 1
    assert "error" in capsys.readouterr().err
    assert cli.main(["generate", "hi", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens: expected an integer in [1," in capsys.readouterr().err


def test_quantized_kv_generation_stays_close_to_full_precision(model, capsys):
    prompt = ["The capital of France is"]
    full = generate(model, prompt, max_new_tokens=6)
    int8 = generate(model, prompt, max_new_tokens=6, kv_quantization="int8", cache="paged")
    assert int8.generations[0].token_ids == full.generations[0].token_ids
    with pytest.raises(ValueError, match="kv_quantization must be one of"):
        generate(model, prompt, max_new_tokens=2, kv_quantization="int3")
    arguments = ["generate", "Hi", "--raw", "--max-new-tokens", "2", "--kv-quantization", "fp8"]
    code = cli.main(arguments)
    assert code == 0 and "fp8 KV" in capsys.readouterr().err


def test_lazy_compilation_gives_the_same_tokens(model):
    prompts = ["The capital of France is", "Water boils at"]
    warmed = generate(model, prompts, max_new_tokens=4, cache="paged", page_size=8)
    # pages of 4 tokens: step shapes no earlier test compiled, compiled inside the loop
    lazy = generate(model, prompts, max_new_tokens=4, cache="paged", page_size=4, warmup=False)
    assert [g.token_ids for g in lazy.generations] == [g.token_ids for g in warmed.generations]
    assert lazy.compile_seconds > 0 and lazy.prefill_seconds > 0 and lazy.decode_seconds > 0
