"""Gemma 3 270M through the engine and everything on it: ``Model.load("gemma3")``, greedy
batched generation against HF transformers' tokens (sliding-window layers on rings, global
layers contiguous), perplexity against the dense uncached forward, the int8 KV codec, the paged
backend's refusal, ``jaxkv generate --model gemma3``, ``jaxkv info --model gemma3`` and
``jaxkv serve --model gemma3`` answering the official ``openai`` client over a localhost socket.

The reference tokens are tests/data/gemma3_reference.json (scripts/make_gemma3_reference.py:
HF greedy on the same GGUF, EOS not stopping generation). The model is loaded once.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv import cli
from jaxkv.engine import (
    CacheConfig,
    Engine,
    Gemma3Model,
    Model,
    SchedulerConfig,
    SpeculativeConfig,
    generate,
    perplexity,
)
from jaxkv.memory import gemma3_memory_rows
from jaxkv.models.gemma3 import gemma3_forward_uncached

DATA = pathlib.Path(__file__).parents[1] / "data"
REFERENCE = json.loads((DATA / "gemma3_reference.json").read_text())
PROMPTS = {prompt["name"]: prompt for prompt in REFERENCE["prompts"]}
STEPS = 32


@pytest.fixture(scope="module")
def gemma() -> Gemma3Model:
    return Model.load("gemma3")


def test_load_dispatches_on_the_architecture(gemma):
    assert isinstance(gemma, Gemma3Model)
    assert gemma.config.num_layers == 18 and gemma.config.sliding_window == 512
    assert gemma.vocab_size == 262_144 and gemma.context_length == 32_768
    assert gemma.config.eos_token_id in gemma.eos_token_ids


def test_batched_greedy_generation_matches_hf(gemma):
    """Three prompts of 6, 65 and 1,516 tokens in one batch: the long one wraps its rings
    twice during the prefill and the others decode beside it."""
    names = ("short", "code", "long")
    result = generate(
        gemma,
        [PROMPTS[name]["prompt_ids"] for name in names],
        max_new_tokens=STEPS,
        ignore_eos=True,
    )
    for name, generation in zip(names, result.generations, strict=True):
        assert generation.token_ids == PROMPTS[name]["generated_ids"][:STEPS], name
        assert generation.finish_reason == "length"


def test_speculative_greedy_generation_matches_hf(gemma):
    """Prompt lookup on rings with spare slots: rejected drafts are forgotten by the sliding
    layers' rings (the long prompt's rings have wrapped) and the global layers alike, and the
    tokens stay HF's."""
    names = ("code", "long")
    result = generate(
        gemma,
        [PROMPTS[name]["prompt_ids"] for name in names],
        max_new_tokens=STEPS,
        ignore_eos=True,
        speculative=SpeculativeConfig(num_draft_tokens=4),
    )
    for name, generation in zip(names, result.generations, strict=True):
        assert generation.token_ids == PROMPTS[name]["generated_ids"][:STEPS], name
    stats = result.engine_stats
    assert stats.num_verify_steps > 0
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens


def test_int8_kv_agrees_with_greedy_on_the_code_prompt(gemma):
    """int8 keys and values keep the code prompt's greedy tokens (its logits are far from
    ties; the short prompt's first near-tie comes at step 11)."""
    prompt = PROMPTS["code"]
    result = generate(
        gemma, [prompt["prompt_ids"]], max_new_tokens=16, kv_quantization="int8", ignore_eos=True
    )
    assert result.generations[0].token_ids == prompt["generated_ids"][:16]


def test_perplexity_equals_the_dense_forward(gemma):
    """One window holding the whole text: the NLL through the ring + global cache equals the
    NLL of the uncached forward with dense windowed attention."""
    ids = np.asarray(PROMPTS["code"]["prompt_ids"], np.int32)
    result = perplexity(gemma, ids)
    logits = np.asarray(gemma3_forward_uncached(gemma.params, gemma.config, jnp.asarray(ids)[None]))
    logits = logits[0, :-1].astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=-1)) + logits.max(axis=-1)
    expected = log_z - logits[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(result.token_nll, expected, atol=2e-3)
    assert result.num_scored_tokens == len(ids) - 1


def test_the_paged_backend_refuses_with_the_reason(gemma):
    with pytest.raises(ValueError, match="sliding-window layers keep rings.*contiguous"):
        Engine(gemma, CacheConfig(kind="paged"), SchedulerConfig(max_model_len=256))


def test_ring_memory_against_all_global():
    """Per sequence, 15 of the 18 layers hold 512 slots: at 8k and 32k tokens the cache is
    (3 * L + 15 * 512) / (18 * L) of an all-global one."""
    from jaxkv.io.gguf import read_gguf_metadata
    from jaxkv.io.gguf_gemma3 import gemma3_config_from_metadata, gemma3_model_path

    config = gemma3_config_from_metadata(read_gguf_metadata(gemma3_model_path()))
    rows = dict(gemma3_memory_rows(config, (8192, 32768)))
    for (ringed, flat), length in zip(rows["float32"], (8192, 32768), strict=True):
        per_layer_token = 2 * config.num_kv_heads * config.head_dim * 4
        assert flat == 18 * length * per_layer_token
        assert ringed == (3 * length + 15 * 512) * per_layer_token
    assert rows["int8"][1][0] < rows["float32"][1][0] / 3.9


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_info_shows_what_the_rings_save(capsys):
    status, out, err = _run(capsys, "info", "--model", "gemma3", "--max-length", "2048")
    assert status == 0, err
    assert "layer_kinds: 15 sliding-window, global: [5, 11, 17]" in out
    lines = [line.split() for line in out.splitlines()]
    at_32k = next(line for line in lines if line[:2] == ["32,768", "float32"])
    assert at_32k[-1] == "0.18x"  # (3 * 32768 + 15 * 512) / (18 * 32768)
    assert any(line[:2] == ["2,048", "int8"] for line in lines)


def test_generate_command_runs_gemma(capsys, monkeypatch, gemma):
    monkeypatch.setattr(Model, "load", classmethod(lambda cls, path=None, dtype="float32": gemma))
    prompt = PROMPTS["short"]
    status, out, err = _run(
        capsys, "generate", "--model", "gemma3", prompt["text"], "--max-new-tokens", "12",
        "--json", "--quiet",
    )  # fmt: skip
    assert status == 0, err
    record = json.loads(out)
    assert record["token_ids"] == prompt["generated_ids"][:12]  # no EOS among them


def test_serve_answers_the_openai_client(gemma, monkeypatch):
    """``jaxkv serve --model gemma3`` picks the contiguous cache itself and answers a
    completion request over a real socket with HF's greedy tokens."""
    import openai
    import uvicorn

    from jaxkv.serve import cli as serve_cli

    monkeypatch.setattr(Model, "load", classmethod(lambda cls, path=None, dtype="float32": gemma))
    servers: list[uvicorn.Server] = []

    class Recorded(uvicorn.Server):
        def __init__(self, config):
            super().__init__(config)
            servers.append(self)

    monkeypatch.setattr(uvicorn, "Server", Recorded)
    parser = argparse.ArgumentParser(prog="jaxkv")
    serve_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["serve", "--model", "gemma3", "--port", "0", "--max-num-seqs", "2",
         "--max-num-batched-tokens", "64", "--max-model-len", "256"]
    )  # fmt: skip
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(serve_cli.run(args)), daemon=True)
    thread.start()
    try:
        start = time.monotonic()
        while not (servers and servers[0].started):
            assert thread.is_alive() and time.monotonic() - start < 120, "the server did not start"
            time.sleep(0.05)
        port = servers[0].servers[0].sockets[0].getsockname()[1]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        prompt = PROMPTS["short"]
        completion = client.completions.create(
            model=client.models.list().data[0].id,
            prompt=prompt["text"],
            max_tokens=8,
            temperature=0,
        )
        assert completion.choices[0].text == gemma.tokenizer.decode(prompt["generated_ids"][:8])
        assert completion.usage.prompt_tokens == prompt["num_prompt_tokens"]
    finally:
        if servers:
            servers[0].should_exit = True
        thread.join(30)
    assert status == [0]
