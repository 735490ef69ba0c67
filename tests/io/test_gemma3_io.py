"""Gemma 3 270M from its GGUF: the bundled file, the config, the weights and the SentencePiece
tokenizer against HF transformers' reading of the same file (tests/data/gemma3_reference.json,
made by scripts/make_gemma3_reference.py; no torch here)."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from jaxkv.io.gguf import GGUFError, config_from_metadata, read_gguf_metadata
from jaxkv.io.gguf_gemma3 import (
    gemma3_config_from_metadata,
    gemma3_model_path,
    load_gemma3_gguf,
)
from jaxkv.io.tokenizer import Tokenizer, TokenizerError
from jaxkv.models.gemma3 import GLOBAL, SLIDING, Gemma3Config

DATA = pathlib.Path(__file__).parents[1] / "data"


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads((DATA / "gemma3_reference.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def path() -> pathlib.Path:
    return gemma3_model_path()


@pytest.fixture(scope="module")
def meta(path):
    return read_gguf_metadata(path)


@pytest.fixture(scope="module")
def tokenizer(path) -> Tokenizer:
    return Tokenizer.from_gguf(path)


def test_bundled_file_is_the_reference_checkpoint(path, reference):
    assert path.is_file() and path.name == reference["checkpoint"]["file"]
    assert gemma3_model_path() == path  # assembled once per process
    assert read_gguf_metadata(path).architecture == "gemma3"


def test_model_path_rejects_a_bad_directory_argument():
    with pytest.raises(TypeError, match="output_dir"):
        gemma3_model_path(42)


def test_config_matches_hf(meta, reference):
    config = gemma3_config_from_metadata(meta)
    hf = reference["config"]
    assert config.vocab_size == hf["vocab_size"] == 262_144
    assert config.hidden_size == hf["hidden_size"]
    assert config.intermediate_size == hf["intermediate_size"]
    assert config.num_layers == hf["num_hidden_layers"] == 18
    assert (config.num_heads, config.num_kv_heads) == (4, 1)
    assert config.num_heads == hf["num_attention_heads"]
    assert config.num_kv_heads == hf["num_key_value_heads"]
    assert config.head_dim == hf["head_dim"] == 256
    assert config.sliding_window == hf["sliding_window"] == 512
    kinds = {"sliding_attention": SLIDING, "full_attention": GLOBAL}
    assert config.layer_kinds == tuple(kinds[t] for t in hf["layer_types"])
    assert config.global_layers == (5, 11, 17)
    rope = hf["rope_parameters"]
    assert config.rope_theta == rope["full_attention"]["rope_theta"] == 1_000_000.0
    assert config.rope_local_theta == rope["sliding_attention"]["rope_theta"] == 10_000.0
    assert config.rope_scaling_factor == 1.0
    assert config.rms_norm_eps == pytest.approx(hf["rms_norm_eps"])
    assert config.query_pre_attn_scalar == hf["query_pre_attn_scalar"]
    assert config.attn_logit_soft_cap == hf["attn_logit_softcapping"]
    assert config.final_logit_soft_cap == hf["final_logit_softcapping"]
    assert config.max_position_embeddings == hf["max_position_embeddings"]
    assert hf["tie_word_embeddings"] and hf["hidden_activation"] == "gelu_pytorch_tanh"
    assert config.bos_token_id == hf["bos_token_id"]
    assert config.eos_token_id == hf["eos_token_id"]
    assert config.pad_token_id == hf["pad_token_id"]
    assert config.embed_scale == pytest.approx(640**0.5)
    hash(config)  # a static jit argument


def _with_fields(meta, **changes):
    fields = dict(meta.fields)
    for key, value in changes.items():
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    return dataclasses.replace(meta, fields=fields)


def test_unsupported_architecture_is_named(meta):
    with pytest.raises(GGUFError, match=r"unsupported architecture 'mamba'.*\('gemma3',\)"):
        gemma3_config_from_metadata(_with_fields(meta, **{"general.architecture": "mamba"}))
    llama = _with_fields(meta, **{"general.architecture": "llama"})
    with pytest.raises(GGUFError, match="Llama checkpoints are read by jaxkv.io.gguf"):
        gemma3_config_from_metadata(llama)
    # The Llama reader names the Gemma 3 reader.
    with pytest.raises(GGUFError, match=r"'gemma3'.*jaxkv\.io\.gguf_gemma3"):
        config_from_metadata(meta)
    with pytest.raises(TypeError, match="meta must be a GGUFMetadata"):
        gemma3_config_from_metadata("model.gguf")


def test_missing_or_unsupported_hyper_parameters_are_named(meta):
    with pytest.raises(GGUFError, match="'gemma3.attention.sliding_window' is missing"):
        gemma3_config_from_metadata(_with_fields(meta, **{"gemma3.attention.sliding_window": None}))
    with pytest.raises(GGUFError, match="RoPE scaling type 'yarn' is not supported"):
        gemma3_config_from_metadata(_with_fields(meta, **{"gemma3.rope.scaling.type": "yarn"}))
    with pytest.raises(GGUFError, match="partial rotary"):
        gemma3_config_from_metadata(_with_fields(meta, **{"gemma3.rope.dimension_count": 128}))


def test_optional_keys_override_the_defaults(meta):
    config = gemma3_config_from_metadata(
        _with_fields(
            meta,
            **{
                "gemma3.attention.sliding_window_pattern": 3,
                "gemma3.rope.freq_base_swa": 5000.0,
                "gemma3.rope.scaling.type": "linear",
                "gemma3.rope.scaling.factor": 8.0,
                "gemma3.final_logit_softcapping": 30.0,
            },
        )
    )
    assert config.global_layers == (2, 5, 8, 11, 14, 17)
    assert config.rope_local_theta == 5000.0 and config.rope_scaling_factor == 8.0
    assert config.final_logit_soft_cap == 30.0
    flags = np.array([i % 2 == 0 for i in range(18)])  # llama.cpp: true marks a sliding layer
    config = gemma3_config_from_metadata(
        _with_fields(meta, **{"gemma3.attention.sliding_window_pattern": flags})
    )
    assert config.global_layers == tuple(range(1, 18, 2))


def test_config_validation_names_the_field():
    base = dict(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
        sliding_window=3,
        layer_kinds=(SLIDING, GLOBAL),
        bos_token_id=2,
        eos_token_ids=(1,),
    )
    Gemma3Config(**base)
    for change, message in (
        ({"num_kv_heads": 3}, "num_heads must be a multiple of num_kv_heads"),
        ({"head_dim": 3}, "head_dim must be even"),
        ({"sliding_window": 0}, "sliding_window must be a positive int"),
        ({"layer_kinds": (SLIDING,)}, "one entry per layer"),
        ({"layer_kinds": (SLIDING, "mamba")}, r"layer_kinds\[1\]"),
        ({"layer_kinds": [SLIDING, GLOBAL]}, "layer_kinds must be a tuple"),
        ({"rope_theta": -1.0}, "rope_theta must be a finite positive number"),
        ({"final_logit_soft_cap": 0.0}, "final_logit_soft_cap"),
        ({"eos_token_ids": (10,)}, r"eos_token_ids must be in \[0, vocab_size=10\)"),
        ({"bos_token_id": True}, "bos_token_id must hold ints"),
    ):
        with pytest.raises((TypeError, ValueError), match=message):
            Gemma3Config(**{**base, **change})
    assert Gemma3Config.pattern(7, 3) == (SLIDING, SLIDING, GLOBAL) * 2 + (SLIDING,)
    with pytest.raises(ValueError, match="global_every must be a positive int"):
        Gemma3Config.pattern(7, 0)


@pytest.fixture(scope="module")
def host_params(path):
    return load_gemma3_gguf(path)


def test_weights_match_hf_dequantized_weights(host_params, reference):
    config, params = host_params
    want = reference["weight_slices"]
    layer0, last = params["layers"][0], params["layers"][-1]

    def hf_rows(weight):  # ours is [in, out]; HF's [out, in]
        return np.asarray(weight).T[:4, :8]

    for name, ours in (
        ("q_proj", layer0["wq"]),
        ("k_proj", layer0["wk"]),
        ("v_proj", layer0["wv"]),
        ("o_proj", layer0["wo"]),
        ("gate_proj", layer0["w_gate"]),
        ("down_proj", layer0["w_down"]),
    ):
        np.testing.assert_allclose(hf_rows(ours), want["layer0"][name], atol=1e-6, err_msg=name)
    np.testing.assert_allclose(hf_rows(last["w_down"]), want["last_layer"]["down_proj"], atol=1e-6)
    np.testing.assert_allclose(hf_rows(last["wo"]), want["last_layer"]["o_proj"], atol=1e-6)
    np.testing.assert_allclose(layer0["q_norm"][:8], want["layer0"]["q_norm"], atol=1e-6)
    np.testing.assert_allclose(
        layer0["attn_norm"][:8], want["layer0"]["input_layernorm"], atol=1e-6
    )
    np.testing.assert_allclose(
        layer0["post_mlp_norm"][:8], want["layer0"]["post_feedforward_layernorm"], atol=1e-6
    )
    np.testing.assert_allclose(params["final_norm"][:8], want["final_norm"], atol=1e-6)
    np.testing.assert_allclose(
        params["embed"][[0, 1, 2, 1000], :8], want["embed_rows_0_1_2_1000"], atol=1e-6
    )
    assert params["embed"].shape == (config.vocab_size, config.hidden_size)
    assert len(params["layers"]) == config.num_layers
    assert layer0["wq"].shape == (640, 1024) and layer0["wo"].shape == (1024, 640)
    for array in (layer0["wq"], layer0["attn_norm"], params["embed"]):
        assert array.dtype == np.float32 and array.flags.c_contiguous and array.flags.writeable


def test_device_loading_matches_host_loading(path, host_params):
    import jax

    _, host = host_params
    _, device = load_gemma3_gguf(path, device=True)
    for name in ("wq", "wo", "w_down", "q_norm", "post_attn_norm"):  # Q5_0, Q4_K, Q6_K, F32
        for layer in (0, 17):
            got = np.asarray(jax.device_get(device["layers"][layer][name]))
            np.testing.assert_array_equal(got, host["layers"][layer][name], err_msg=name)
    np.testing.assert_array_equal(np.asarray(device["embed"][:64]), host["embed"][:64])


def test_loading_a_llama_file_as_gemma3_names_the_architecture():
    from jaxkv.io.gguf import default_model_path

    with pytest.raises(GGUFError, match="unsupported architecture 'llama'"):
        load_gemma3_gguf(default_model_path())


def test_tokenizer_ids_match_hf(tokenizer, reference):
    assert tokenizer.model == "llama"
    for case in reference["tokenizer_cases"]:
        text = case["text"]
        assert tokenizer.encode(text, add_bos=False) == case["ids"], text
        assert tokenizer.encode(text) == case["ids_with_special"], text
        assert tokenizer.decode(case["ids"]) == case["decoded"], text


def test_prompt_ids_match_hf(tokenizer, reference):
    for prompt in reference["prompts"]:
        assert tokenizer.encode(prompt["text"]) == prompt["prompt_ids"], prompt["name"]
        assert tokenizer.decode(prompt["generated_ids"]) == prompt["generated_text"]


def test_tokenizer_special_tokens_and_bos(tokenizer, reference):
    special = reference["special_tokens"]
    assert tokenizer.bos_token_id == special["bos_id"] == 2
    assert tokenizer.eos_token_id == special["eos_id"] == 1
    assert tokenizer.bos_token == special["bos"] and tokenizer.eos_token == special["eos"]
    assert tokenizer.add_bos
    assert tokenizer.special_tokens["<end_of_turn>"] in tokenizer.eos_token_ids
    assert tokenizer.missing_bytes == frozenset()
    for token_id in (0, 2, 106, 107, 138, 238, 506, 255999, 262143):  # 138: two spaces
        assert tokenizer.token_to_id(tokenizer.id_to_token(token_id)) == token_id
    # Special-token text is one id with encode, characters with encode_text.
    assert tokenizer.encode("<start_of_turn>", add_bos=False) == [105]
    plain = tokenizer.encode_text("<start_of_turn>")
    assert 105 not in plain and tokenizer.decode(plain) == "<start_of_turn>"


def test_byte_fallback_round_trips_any_text(tokenizer):
    text = "\x00\x01 \u0378 \U0010fffd ﷽ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"
    ids = tokenizer.encode(text, add_bos=False)
    assert tokenizer.decode(ids) == text
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.feed(token_id) for token_id in ids]
    assert "".join(pieces) + decoder.flush() == text


def test_no_chat_template_in_this_file(tokenizer, reference):
    assert tokenizer.chat_template is None
    assert not reference["has_chat_template"]
    with pytest.raises(TokenizerError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_sentencepiece_tokenizer_from_raw_data():
    tokens = ["<unk>", "<s>", "▁", "a", "b", "ab", "▁ab", *[f"<0x{b:02X}>" for b in range(256)]]
    types = [3, 3, 1, 1, 1, 1, 1, *[6] * 256]
    tokenizer = Tokenizer(
        tokens, [], types, bos_token_id=1, unk_token_id=0, model="llama", merge_priority="position"
    )
    assert tokenizer.encode("ab ab", add_bos=False) == [5, 6]
    assert tokenizer.encode("é", add_bos=False) == [7 + 0xC3, 7 + 0xA9]  # byte fallback
    assert tokenizer.decode([5, 6, 7 + 0xC3, 7 + 0xA9]) == "ab abé"
    with pytest.raises(TokenizerError, match="scores"):
        Tokenizer(tokens, [], types, model="llama")  # score ranking needs scores
    with pytest.raises(TokenizerError, match="model"):
        Tokenizer(tokens, [], types, model="wordpiece")
    with pytest.raises(TokenizerError, match="merge_priority"):
        Tokenizer(tokens, [], types, model="llama", merge_priority="random")
