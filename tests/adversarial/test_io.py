"""Hostile and careless input to every public entry point of `jaxkv.io`.

Each probe asserts the promised behaviour: either a clear error (`GGUFError`,
`TokenizerError`, `TypeError` or `ValueError` whose message names the argument
or metadata key, the value and what was expected), or correct output. Nothing
may crash with another exception type, hang, or load silently wrong data.

The GGUF files are tiny and written byte by byte here, so a probe controls every
field (duplicate keys, absurd dimensions, wrong value types) the `gguf`
package's writer would refuse to produce.
"""

from __future__ import annotations

import dataclasses
import pathlib
import struct
import time

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxkv.io import (
    GGUFError,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    config_from_metadata,
    load_gguf,
    read_gguf_metadata,
)
from jaxkv.io.gguf import default_model_path

# -- a byte-level GGUF writer ---------------------------------------------------------------------

U8, I32, U32, F32, BOOL, STRING, ARRAY, U64, F64 = 0, 5, 4, 6, 7, 8, 9, 10, 12
F32_TENSOR, F16_TENSOR, Q8_0_TENSOR = 0, 1, 8


def _string(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _value(kind: int, value: object) -> bytes:
    """Type code and payload of one metadata value (an array is ``(item_kind, items)``)."""
    formats = {U8: "<B", I32: "<i", U32: "<I", F32: "<f", BOOL: "<?", U64: "<Q", F64: "<d"}
    if kind == STRING:
        return struct.pack("<I", STRING) + _string(value)  # type: ignore[arg-type]
    if kind == ARRAY:
        item_kind, items = value  # type: ignore[misc]
        body = b"".join(_value(item_kind, item)[4:] for item in items)
        return struct.pack("<IIQ", ARRAY, item_kind, len(items)) + body
    return struct.pack("<I", kind) + struct.pack(formats[kind], value)


@dataclasses.dataclass
class Tensor:
    name: str
    ne: tuple[int, ...]  # GGUF order: row length first
    ggml_type: int
    data: bytes


def _gguf(
    fields: list[tuple[str, int, object]], tensors: list[Tensor], alignment: int = 32
) -> bytes:
    """A GGUF v3 file with these metadata entries (in order, duplicates allowed) and tensors."""
    header, body = _gguf_parts(fields, tensors, alignment)
    return header + body


def _gguf_parts(
    fields: list[tuple[str, int, object]], tensors: list[Tensor], alignment: int = 32
) -> tuple[bytes, bytes]:
    """(header with its padding, tensor data) of `_gguf`."""
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(fields))
    for key, kind, value in fields:
        header += _string(key) + _value(kind, value)
    offsets, offset = [], 0
    for tensor in tensors:
        offsets.append(offset)
        offset += -(-len(tensor.data) // alignment) * alignment
    for tensor, relative in zip(tensors, offsets, strict=True):
        header += _string(tensor.name) + struct.pack("<I", len(tensor.ne))
        header += b"".join(struct.pack("<Q", d) for d in tensor.ne)
        header += struct.pack("<IQ", tensor.ggml_type, relative)
    header += b"\0" * (-len(header) % alignment)
    body = b""
    for tensor in tensors:
        body += tensor.data + b"\0" * (-len(tensor.data) % alignment)
    return header, body


VOCAB, HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM = 16, 32, 32, 2, 1, 16  # Q8_0 needs rows of 32


def _model_fields(**changes: tuple[int, object] | None) -> list[tuple[str, int, object]]:
    """Metadata of a 1-layer Llama; ``changes`` maps a key (dots as __) to (kind, value) or None."""
    fields = {
        "general.architecture": (STRING, "llama"),
        "llama.block_count": (U32, 1),
        "llama.context_length": (U32, 64),
        "llama.embedding_length": (U32, HIDDEN),
        "llama.feed_forward_length": (U32, FFN),
        "llama.attention.head_count": (U32, HEADS),
        "llama.attention.head_count_kv": (U32, KV_HEADS),
        "llama.rope.freq_base": (F32, 10000.0),
        "llama.attention.layer_norm_rms_epsilon": (F32, 1e-5),
        "tokenizer.ggml.bos_token_id": (U32, 1),
        "tokenizer.ggml.eos_token_id": (U32, 2),
    }
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    return [(key, kind, value) for key, (kind, value) in fields.items()]


def _model_tensors(seed: int = 0, **overrides: np.ndarray) -> list[Tensor]:
    """F32 tensors of the 1-layer model (``overrides``: name with dots as __ -> array)."""
    rng = np.random.default_rng(seed)
    shapes = {
        "token_embd.weight": (VOCAB, HIDDEN),
        "output_norm.weight": (HIDDEN,),
        "blk.0.attn_norm.weight": (HIDDEN,),
        "blk.0.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_output.weight": (HIDDEN, HEADS * HEAD_DIM),
        "blk.0.ffn_norm.weight": (HIDDEN,),
        "blk.0.ffn_gate.weight": (FFN, HIDDEN),
        "blk.0.ffn_up.weight": (FFN, HIDDEN),
        "blk.0.ffn_down.weight": (HIDDEN, FFN),
    }
    overrides = {name.replace("__", "."): array for name, array in overrides.items()}
    tensors = []
    for name, shape in shapes.items():
        array = overrides.get(name)
        if array is None:
            array = rng.standard_normal(shape).astype(np.float32)
        types = {np.float32: F32_TENSOR, np.float16: F16_TENSOR, np.uint8: Q8_0_TENSOR}
        ggml_type = types[array.dtype.type]  # uint8: raw Q8_0 blocks of the logical shape
        tensors.append(Tensor(name, tuple(reversed(shape)), ggml_type, array.tobytes()))
    return tensors


def _ident(value: object) -> str:
    """A test id that is the same in every pytest-xdist worker (no addresses)."""
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, np.ndarray | jnp.ndarray):
        return f"{type(value).__name__}{list(value.shape)}"
    text = repr(value)
    return type(value).__name__ if " at 0x" in text else text[:40]


def _write(path: pathlib.Path, data: bytes) -> pathlib.Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def model_file(tmp_path) -> pathlib.Path:
    return _write(tmp_path / "tiny.gguf", _gguf(_model_fields(), _model_tensors()))


BYTE_ALPHABET = [
    *(chr(b) for b in range(ord("!"), ord("~") + 1)),
    *(chr(b) for b in range(0xA1, 0xAD)),
    *(chr(b) for b in range(0xAE, 0x100)),
    *(chr(256 + i) for i in range(68)),
]  # GPT-2's 256 byte characters, in no particular order
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
N_TOKENS = len(SPECIALS) + len(BYTE_ALPHABET) + 2  # and the merged "he", "hel"
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer_fields(**changes: tuple[int, object] | None) -> list[tuple[str, int, object]]:
    """Metadata of a byte-level BPE tokenizer: 3 control tokens, 256 bytes, 2 merges."""
    tokens = [*SPECIALS, *BYTE_ALPHABET, "he", "hel"]
    fields = {
        "general.architecture": (STRING, "llama"),
        "tokenizer.ggml.model": (STRING, "gpt2"),
        "tokenizer.ggml.pre": (STRING, "default"),
        "tokenizer.ggml.tokens": (ARRAY, (STRING, tokens)),
        "tokenizer.ggml.token_type": (ARRAY, (I32, [3, 3, 3] + [1] * (len(tokens) - 3))),
        "tokenizer.ggml.merges": (ARRAY, (STRING, ["h e", "he l"])),
        "tokenizer.ggml.bos_token_id": (U32, 1),
        "tokenizer.ggml.eos_token_id": (U32, 2),
        "tokenizer.ggml.padding_token_id": (U32, 0),
        "tokenizer.ggml.add_bos_token": (BOOL, False),
        "tokenizer.chat_template": (STRING, TEMPLATE),
    }
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    return [(key, kind, value) for key, (kind, value) in fields.items()]


@pytest.fixture
def tokenizer_file(tmp_path) -> pathlib.Path:
    return _write(tmp_path / "tok.gguf", _gguf(_tokenizer_fields(), []))


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tok.gguf"
    return Tokenizer.from_gguf(_write(path, _gguf(_tokenizer_fields(), [])))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """The bundled model's tokenizer (read once)."""
    return Tokenizer.from_gguf(default_model_path())


# -- the writer itself is sound -------------------------------------------------------------------


def test_tiny_files_load(model_file, tokenizer_file):
    config, params = load_gguf(model_file)
    assert (config.num_layers, config.hidden_size, config.vocab_size) == (1, HIDDEN, VOCAB)
    assert params["layers"][0]["w_down"].shape == (FFN, HIDDEN)
    tokenizer = Tokenizer.from_gguf(tokenizer_file)
    assert tokenizer.encode("hello") == [tokenizer.token_to_id(t) for t in ("hel", "l", "o")]
    assert tokenizer.decode(tokenizer.encode("hello <|im_end|>")) == "hello <|im_end|>"
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]).endswith(
        "assistant\n"
    )


# -- load_gguf / read_gguf_metadata: the path argument --------------------------------------------

PATH_TYPE_PROBES = [123, True, 1.5, b"/tmp/model.gguf", ["model.gguf"], object()]


@pytest.mark.parametrize("reader", [load_gguf, read_gguf_metadata, Tokenizer.from_gguf])
@pytest.mark.parametrize("path", PATH_TYPE_PROBES, ids=_ident)
def test_path_of_wrong_type(reader, path):
    with pytest.raises(TypeError, match=r"path must be a str or os.PathLike, got \w+"):
        reader(path)


@pytest.mark.parametrize("reader", [load_gguf, read_gguf_metadata, Tokenizer.from_gguf])
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "expected a GGUF file, got a directory"),  # "" is the current directory
        ("absent.gguf", "no such GGUF file"),
        ("dir", "expected a GGUF file, got a directory"),
        ("nul\0byte.gguf", "no such GGUF file|cannot be a GGUF file"),
        ("x" * 5000 + ".gguf", "cannot be a GGUF file: .*File name too long"),
        ("empty.gguf", "not a GGUF file"),
        ("text.gguf", r"not a GGUF file \(expected magic b'GGUF', got b'hell'\)"),
    ],
)
def test_path_that_is_no_gguf_file(reader, tmp_path, monkeypatch, name, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dir").mkdir()
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "text.gguf").write_text("hello, I am not a model")
    with pytest.raises(GGUFError, match=message):
        reader(name)


def test_unreadable_file(model_file, monkeypatch):
    # chmod 0 proves nothing where the tests run as root (which reads any file), so the denial
    # comes from open() itself, for this file only.
    real_open = open

    def denying_open(path, *args, **kwargs):
        if str(path) == str(model_file):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", denying_open)
    with pytest.raises(GGUFError, match="cannot open the GGUF file.*Permission denied"):
        read_gguf_metadata(model_file)


@pytest.mark.parametrize(
    "dtype", [np.int8, "float8", None, True, np.float64, "float32 ", object(), [np.float32]]
)
def test_load_gguf_bad_dtype(model_file, dtype):
    with pytest.raises(ValueError, match=r"dtype must be one of float32, float16, bfloat16, got"):
        load_gguf(model_file, dtype=dtype)


# -- corrupt or hostile headers -------------------------------------------------------------------

HEADER_PROBES = {
    # name: (metadata changes, message of the expected GGUFError)
    "alignment not a power of two": ({"general__alignment": (U32, 24)}, "power of two, got int 24"),
    "alignment zero": ({"general__alignment": (U32, 0)}, "power of two, got int 0"),
    "alignment a string": ({"general__alignment": (STRING, "32")}, "power of two, got str '32'"),
    "alignment a bool": ({"general__alignment": (BOOL, True)}, "power of two, got bool True"),
    "alignment a float": ({"general__alignment": (F32, 32.0)}, "power of two, got float 32.0"),
    "block_count a bool": (
        {"llama__block_count": (BOOL, True)},
        "'llama.block_count' should be an integer, got bool True",
    ),
    "head_count a float": (
        {"llama__attention__head_count": (F32, 2.0)},
        "'llama.attention.head_count' should be an integer, got float 2.0",
    ),
    "head_count an array": (
        {"llama__attention__head_count": (ARRAY, (U32, [2]))},
        "'llama.attention.head_count' should be an integer, got ndarray",
    ),
    "head_count a string": (
        {"llama__attention__head_count": (STRING, "2")},
        "'llama.attention.head_count' should be an integer, got str '2'",
    ),
    "head_count zero": ({"llama__attention__head_count": (U32, 0)}, "head_count must be positive"),
    "kv heads negative": (
        {"llama__attention__head_count_kv": (I32, -1)},
        "num_kv_heads must be a positive int, got -1",
    ),
    "kv heads not dividing heads": (
        {"llama__attention__head_count_kv": (U32, 3)},
        "num_heads must be a multiple of num_kv_heads",
    ),
    "embedding length zero": ({"llama__embedding_length": (U32, 0)}, "embedding_length=0"),
    "embedding length huge": (
        {"llama__embedding_length": (U64, 2**62)},
        r"'token_embd.weight' has shape \(16, 32\), expected",
    ),
    "rope base NaN": (
        {"llama__rope__freq_base": (F32, float("nan"))},
        "rope_theta must be a finite",
    ),
    "rope base inf": (
        {"llama__rope__freq_base": (F64, float("inf"))},
        "rope_theta must be a finite",
    ),
    "rope base negative": ({"llama__rope__freq_base": (F32, -1.0)}, "rope_theta must be a finite"),
    "rope base a bool": (
        {"llama__rope__freq_base": (BOOL, True)},
        "'llama.rope.freq_base' should be a number, got bool True",
    ),
    "rms eps zero": (
        {"llama__attention__layer_norm_rms_epsilon": (F32, 0.0)},
        "rms_norm_eps must be a finite positive",
    ),
    "rms eps missing": (
        {"llama__attention__layer_norm_rms_epsilon": None},
        "'llama.attention.layer_norm_rms_epsilon' is missing",
    ),
    "linear rope factor NaN": (
        {
            "llama__rope__scaling__type": (STRING, "linear"),
            "llama__rope__scaling__factor": (F32, float("nan")),
        },
        "rope_scaling_factor must be a finite positive",
    ),
    "rope scaling type an int": (
        {"llama__rope__scaling__type": (U32, 1)},
        "'llama.rope.scaling.type' should be a string, got int 1",
    ),
    "eos id a string": (
        {"tokenizer__ggml__eos_token_id": (STRING, "2")},
        "'tokenizer.ggml.eos_token_id' should be an integer, got str '2'",
    ),
    "eos id out of range": (
        {"tokenizer__ggml__eos_token_id": (U32, VOCAB)},
        r"eos_token_ids must be in \[0, vocab_size=16\)",
    ),
    "eot id a bool": (
        {"tokenizer__ggml__eot_token_id": (BOOL, True)},
        "'tokenizer.ggml.eot_token_id' should be an integer, got bool True",
    ),
    "pad id a string": (
        {"tokenizer__ggml__padding_token_id": (STRING, "pad")},
        "'tokenizer.ggml.padding_token_id' should be an integer, got str 'pad'",
    ),
    "pad id a float": (
        {"tokenizer__ggml__padding_token_id": (F32, 1.5)},
        "'tokenizer.ggml.padding_token_id' should be an integer, got float 1.5",
    ),
    "pad id negative": (
        {"tokenizer__ggml__padding_token_id": (I32, -1)},
        r"pad_token_id must be in \[0, vocab_size=16\)",
    ),
    "vocab size disagrees": ({"llama__vocab_size": (U32, 17)}, r"expected \(vocab_size=17"),
    "not llama": ({"general__architecture": (STRING, "mamba")}, "unsupported architecture 'mamba'"),
    "architecture an int": ({"general__architecture": (U32, 7)}, "unsupported architecture ''"),
    "too many layers": ({"llama__block_count": (U32, 2)}, r"missing tensor\(s\) 'blk.1.attn_norm"),
}


@pytest.mark.parametrize(("changes", "message"), HEADER_PROBES.values(), ids=HEADER_PROBES.keys())
def test_hostile_metadata(tmp_path, changes, message):
    path = _write(tmp_path / "bad.gguf", _gguf(_model_fields(**changes), _model_tensors()))
    with pytest.raises(GGUFError, match=message) as info:
        load_gguf(path)
    assert str(path) in str(info.value)
    # config_from_metadata reports the same for what it checks (not the tensor table)
    try:
        config_from_metadata(read_gguf_metadata(path))
    except GGUFError as err:
        assert str(path) in str(err)


def test_absurd_block_count_is_refused_at_once(tmp_path):
    """Listing a million layers' tensor names would take seconds and a gigabyte first."""
    for count in (10**6, 2**32 - 1):
        fields = _model_fields(llama__block_count=(U32, count))
        path = _write(tmp_path / "layers.gguf", _gguf(fields, _model_tensors()))
        started = time.perf_counter()
        with pytest.raises(GGUFError, match=r"missing tensor\(s\) 'blk.1.attn_norm.weight'"):
            load_gguf(path)
        assert time.perf_counter() - started < 1.0


def test_duplicate_metadata_key(tmp_path):
    fields = [*_model_fields(), ("llama.block_count", U32, 2)]  # a second, different value
    path = _write(tmp_path / "dup.gguf", _gguf(fields, _model_tensors()))
    with pytest.raises(GGUFError, match="metadata key 'llama.block_count' appears twice"):
        read_gguf_metadata(path)


def test_duplicate_tensor(tmp_path):
    tensors = _model_tensors()
    path = _write(tmp_path / "dup.gguf", _gguf(_model_fields(), [*tensors, tensors[0]]))
    with pytest.raises(GGUFError, match="tensor 'token_embd.weight' appears twice"):
        read_gguf_metadata(path)


def test_deeply_nested_array(tmp_path):
    """Arrays of arrays 5000 deep would overflow the stack of a recursive reader."""
    depth = 5000
    value = struct.pack("<I", ARRAY) + struct.pack("<IQ", ARRAY, 1) * depth
    value += struct.pack("<IQ", U8, 0)
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _string("nested") + value
    path = _write(tmp_path / "nested.gguf", header)
    with pytest.raises(GGUFError, match="'nested' nests arrays more than 8 deep"):
        read_gguf_metadata(path)


@pytest.mark.parametrize(
    ("ne", "message"),
    [
        ((2**40, 2**40), "truncated or corrupt"),  # 2**80 elements: overflows int64
        ((2**63, 2), "truncated or corrupt"),
        ((2**64 - 1,), "truncated or corrupt"),
        ((0, VOCAB), r"has shape \(16, 0\), expected \(vocab_size=16"),
        ((HIDDEN,) * 9, "implausible rank 9"),
    ],
)
def test_absurd_tensor_dimensions(tmp_path, ne, message):
    tensors = _model_tensors()
    tensors[0] = dataclasses.replace(tensors[0], ne=ne)
    path = _write(tmp_path / "dims.gguf", _gguf(_model_fields(), tensors))
    with pytest.raises(GGUFError, match=message):
        load_gguf(path)


@pytest.mark.parametrize(
    ("ggml_type", "message"),
    [(9999, r"unsupported type unknown\(9999\)"), (28, "unsupported type F64")],
)
def test_unknown_tensor_type(tmp_path, ggml_type, message):
    tensors = _model_tensors()
    tensors[1] = dataclasses.replace(tensors[1], ggml_type=ggml_type)
    path = _write(tmp_path / "type.gguf", _gguf(_model_fields(), tensors))
    with pytest.raises(GGUFError, match=message):
        load_gguf(path)


def test_invalid_utf8_names(tmp_path):
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _string(b"bad\xffkey") + _value(U32, 1)
    path = _write(tmp_path / "key.gguf", header)
    with pytest.raises(GGUFError, match="metadata key #0 is not valid UTF-8"):
        read_gguf_metadata(path)


@pytest.mark.parametrize(
    ("field", "value"),
    [("tensor count", 2**63), ("metadata count", 2**64 - 1)],
)
def test_absurd_counts(tmp_path, field, value):
    counts = {"tensor count": 0, "metadata count": 0}
    counts[field] = value
    header = b"GGUF" + struct.pack("<IQQ", 3, counts["tensor count"], counts["metadata count"])
    path = _write(tmp_path / "counts.gguf", header + b"\0" * 64)
    with pytest.raises(GGUFError, match="truncated or corrupt GGUF file: header claims"):
        read_gguf_metadata(path)


@pytest.mark.parametrize("meta", [None, {}, "model.gguf", 3], ids=_ident)
def test_config_from_metadata_wrong_type(meta):
    with pytest.raises(TypeError, match=r"meta must be a GGUFMetadata, got \w+"):
        config_from_metadata(meta)
    with pytest.raises(TypeError, match=r"meta must be a GGUFMetadata, got \w+"):
        Tokenizer.from_metadata(meta)


def test_config_from_metadata_numpy_bool_is_no_int(model_file):
    meta = read_gguf_metadata(model_file)
    fields = {**meta.fields, "llama.block_count": np.array(True)}
    with pytest.raises(GGUFError, match="'llama.block_count' should be an integer, got bool"):
        config_from_metadata(dataclasses.replace(meta, fields=fields))


# -- non-finite weights ---------------------------------------------------------------------------


def _q8_0_blocks(values: np.ndarray, scale: float) -> np.ndarray:
    """Raw Q8_0 bytes [rows, blocks * 34] with every block's scale set to ``scale``."""
    raw = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
    blocks = raw.reshape(values.shape[0], -1, 34).copy()
    blocks[..., :2] = np.frombuffer(np.float16(scale).tobytes(), np.uint8)
    return blocks.reshape(values.shape[0], -1)


@pytest.mark.parametrize(
    ("name", "array", "count"),
    [
        ("blk.0.ffn_up.weight", np.full((FFN, HIDDEN), np.nan, np.float32), FFN * HIDDEN),
        ("output_norm.weight", np.array([1.0] * (HIDDEN - 1) + [np.inf], np.float32), 1),
        ("blk.0.attn_q.weight", np.where(np.eye(HIDDEN), -np.inf, 0).astype(np.float16), HIDDEN),
        (
            "token_embd.weight",
            _q8_0_blocks(np.ones((VOCAB, HIDDEN), np.float32), np.inf),
            VOCAB * HIDDEN,
        ),
    ],
    ids=["nan-f32", "inf-f32", "inf-f16", "inf-scale-q8_0"],
)
def test_non_finite_weights_are_refused(tmp_path, name, array, count):
    tensors = _model_tensors(**{name.replace(".", "__"): array})
    path = _write(tmp_path / "nan.gguf", _gguf(_model_fields(), tensors))
    with pytest.raises(GGUFError, match=rf"tensor '{name}' .* {count} non-finite value\(s\)"):
        load_gguf(path)


def test_float16_overflow_is_refused(tmp_path):
    big = np.full(HIDDEN, 1e6, np.float32)  # finite in float32, inf in float16
    path = _write(
        tmp_path / "big.gguf", _gguf(_model_fields(), _model_tensors(output_norm__weight=big))
    )
    assert np.isfinite(load_gguf(path)[1]["final_norm"]).all()
    with pytest.raises(GGUFError, match=f"'output_norm.weight' has {HIDDEN} value.*dtype=float16"):
        load_gguf(path, dtype=np.float16)


# -- truncated and bit-flipped files --------------------------------------------------------------


def _assert_sound(config, params) -> None:
    """A load that succeeded: every array finite, every shape what the config says."""
    hidden, vocab, ffn = config.hidden_size, config.vocab_size, config.intermediate_size
    q_dim, kv_dim = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    assert params["embed"].shape == (vocab, hidden)
    assert params["final_norm"].shape == (hidden,)
    assert params["lm_head"] is None or params["lm_head"].shape == (hidden, vocab)
    assert len(params["layers"]) == config.num_layers
    expected = {
        "attn_norm": (hidden,),
        "wq": (hidden, q_dim),
        "wk": (hidden, kv_dim),
        "wv": (hidden, kv_dim),
        "wo": (q_dim, hidden),
        "mlp_norm": (hidden,),
        "w_gate": (hidden, ffn),
        "w_up": (hidden, ffn),
        "w_down": (ffn, hidden),
    }
    arrays = [params["embed"], params["final_norm"]]
    for layer in params["layers"]:
        assert {name: array.shape for name, array in layer.items()} == expected
        arrays.extend(layer.values())
    assert all(np.isfinite(array).all() for array in arrays)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("fuzz")


MODEL_HEADER, MODEL_DATA = _gguf_parts(
    _model_fields(),
    _model_tensors(
        token_embd__weight=_q8_0_blocks(np.ones((VOCAB, HIDDEN), np.float32), 0.5),
        blk__0__ffn_up__weight=np.ones((FFN, HIDDEN), np.float16),
    ),
)
MODEL_BYTES = MODEL_HEADER + MODEL_DATA


def _flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    raw = bytearray(data)
    for position, mask in flips:
        raw[position % len(raw)] ^= mask
    return bytes(raw)


def _load_flipped(path: pathlib.Path, data: bytes) -> None:
    _write(path, data)
    try:
        config, params = load_gguf(path)
    except GGUFError as err:
        assert str(path) in str(err)
    else:
        _assert_sound(config, params)


FLIP = st.tuples(st.integers(0, 2**31), st.integers(1, 255))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(MODEL_HEADER) - 1), st.integers(1, 255)), max_size=3))
def test_bit_flips_in_the_header(fuzz_dir, flips):
    _load_flipped(fuzz_dir / "header.gguf", _flip(MODEL_BYTES, flips))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FLIP, min_size=1, max_size=8))
def test_bit_flips_anywhere(fuzz_dir, flips):
    _load_flipped(fuzz_dir / "anywhere.gguf", _flip(MODEL_BYTES, flips))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, len(MODEL_BYTES) - 1))
def test_truncated_anywhere(fuzz_dir, cut):
    path = _write(fuzz_dir / "cut.gguf", MODEL_BYTES[:cut])
    with pytest.raises(GGUFError, match="truncated or corrupt|not a GGUF file"):
        load_gguf(path)


TOKENIZER_BYTES = _gguf(_tokenizer_fields(), [])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FLIP, min_size=1, max_size=4), st.text(max_size=20))
def test_bit_flips_in_a_tokenizer(fuzz_dir, flips, text):
    path = _write(fuzz_dir / "tok.gguf", _flip(TOKENIZER_BYTES, flips))
    try:
        tokenizer = Tokenizer.from_gguf(path)
    except (GGUFError, TokenizerError) as err:
        assert str(path) in str(err)
        return
    text = text.encode("utf-8", "replace").decode("utf-8")  # drop lone surrogates
    ids = tokenizer.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
    assert isinstance(tokenizer.decode(ids), str)
    try:
        assert isinstance(tokenizer.apply_chat_template([{"role": "user", "content": text}]), str)
    except TokenizerError as err:  # a corrupted template may not compile or render
        assert "chat template" in str(err)


# -- Tokenizer.from_gguf / from_metadata: malformed tokenizer metadata ----------------------------

TOKENIZER_PROBES = {
    "no tokenizer": ({"tokenizer__ggml__model": None}, "tokenizer.ggml.model is None"),
    "model an int": ({"tokenizer__ggml__model": (U32, 2)}, "tokenizer.ggml.model is 2"),
    "bos id a string": (
        {"tokenizer__ggml__bos_token_id": (STRING, "1")},
        "'tokenizer.ggml.bos_token_id' must be an integer token id, got str '1'",
    ),
    "bos id a bool": (
        {"tokenizer__ggml__bos_token_id": (BOOL, True)},
        "'tokenizer.ggml.bos_token_id' must be an integer token id, got bool True",
    ),
    "bos id a float": (
        {"tokenizer__ggml__bos_token_id": (F32, 1.5)},
        "'tokenizer.ggml.bos_token_id' must be an integer token id, got float 1.5",
    ),
    "bos id negative": (
        {"tokenizer__ggml__bos_token_id": (I32, -1)},
        rf"bos_token_id must be in \[0, {N_TOKENS}\), got -1",
    ),
    "eot id an array": (
        {"tokenizer__ggml__eot_token_id": (ARRAY, (U32, [2]))},
        "'tokenizer.ggml.eot_token_id' must be an integer token id, got ndarray",
    ),
    "eom id huge": (
        {"tokenizer__ggml__eom_token_id": (U64, 2**64 - 1)},
        rf"extra_eos_token_ids must be in \[0, {N_TOKENS}\)",
    ),
    "add_bos a string": (
        {"tokenizer__ggml__add_bos_token": (STRING, "false")},
        "add_bos .*must be a bool, got str 'false'",
    ),
    "add_bos an int": (
        {"tokenizer__ggml__add_bos_token": (U8, 1)},
        "add_bos .*must be a bool, got int 1",
    ),
    "token types strings": (
        {"tokenizer__ggml__token_type": (ARRAY, (STRING, ["1"] * N_TOKENS))},
        r"token_types\[0\] must be an int, got str '1'",
    ),
    "token types too few": (
        {"tokenizer__ggml__token_type": (ARRAY, (I32, [1]))},
        "token_types must have one entry per token",
    ),
    "token types a string": (
        {"tokenizer__ggml__token_type": (STRING, "normal")},
        "token_types must be a sequence of ints, got str",
    ),
    "tokens numbers": (
        {"tokenizer__ggml__tokens": (ARRAY, (U32, list(range(N_TOKENS))))},
        "tokens must be a non-empty sequence of str",
    ),
    "tokens nested arrays": (
        {"tokenizer__ggml__tokens": (ARRAY, (ARRAY, [(STRING, ["a"])] * N_TOKENS))},
        r"tokens\[0\] must be a str, got list",
    ),
    "tokens empty": ({"tokenizer__ggml__tokens": (ARRAY, (STRING, []))}, "non-empty sequence"),
    "tokens duplicated": (
        {
            "tokenizer__ggml__tokens": (ARRAY, (STRING, [*SPECIALS, *BYTE_ALPHABET, "he", "he"])),
            "tokenizer__ggml__merges": (ARRAY, (STRING, ["h e"])),
        },
        "duplicate tokens",
    ),
    "merges numbers": (
        {"tokenizer__ggml__merges": (ARRAY, (U32, [1, 2]))},
        "merges must be a sequence of str, got ndarray",
    ),
    "merges nested": (
        {"tokenizer__ggml__merges": (ARRAY, (ARRAY, [(STRING, ["h", "e"])]))},
        "merge #0 must be a str 'left right', got list",
    ),
    "merge of unknown tokens": (
        {"tokenizer__ggml__merges": (ARRAY, (STRING, ["h e", "x y"]))},
        "tokens and merges do not form a BPE vocabulary: .*out of vocabulary",
    ),
    "merge without a space": (
        {"tokenizer__ggml__merges": (ARRAY, (STRING, ["he"]))},
        "merge #0 must be 'left right', got 'he'",
    ),
    "pre an array": (
        {"tokenizer__ggml__pre": (ARRAY, (U8, [1, 2]))},
        r"pre_tokenizer \(tokenizer.ggml.pre\) must be a str or None, got ndarray",
    ),
    "pre unknown": ({"tokenizer__ggml__pre": (STRING, "mystery")}, "pre_tokenizer 'mystery'"),
    "template an int": (
        {"tokenizer__chat_template": (U32, 5)},
        r"chat_template \(tokenizer.chat_template\) must be a str or None, got int 5",
    ),
    "template a list": (
        {"tokenizer__chat_template": (ARRAY, (STRING, [TEMPLATE]))},
        "chat_template .*must be a str or None, got list",
    ),
}


@pytest.mark.parametrize(
    ("changes", "message"), TOKENIZER_PROBES.values(), ids=TOKENIZER_PROBES.keys()
)
def test_hostile_tokenizer_metadata(tmp_path, changes, message):
    path = _write(tmp_path / "tok.gguf", _gguf(_tokenizer_fields(**changes), []))
    with pytest.raises(TokenizerError, match=message) as info:
        Tokenizer.from_gguf(path)
    assert str(path) in str(info.value)


# -- Tokenizer.encode -----------------------------------------------------------------------------


class Text(str):
    pass


@pytest.mark.parametrize(
    "text",
    [None, 42, 4.2, b"hello", bytearray(b"hello"), ["hello"], ("h", "i"), object()],
    ids=_ident,
)
def test_encode_not_a_str(tokenizer, text):
    with pytest.raises(TypeError, match=rf"text must be a str, got {type(text).__name__}"):
        tokenizer.encode(text)


@pytest.mark.parametrize(
    ("text", "position", "detail"),
    [
        ("ab\udc80c", 2, r"U\+DC80 \(the undecodable input byte 0x80\)"),
        ("\ud800", 0, r"U\+D800$"),
        ("ok \udfff", 3, r"U\+DFFF$"),
        (b"caf\xe9 cr\xe8me".decode("utf-8", "surrogateescape"), 3, "byte 0xE9"),
    ],
)
def test_encode_lone_surrogates(tokenizer, text, position, detail):
    with pytest.raises(
        ValueError, match=rf"text must be valid UTF-8 text, but position {position} .*{detail}"
    ):
        tokenizer.encode(text)


@pytest.mark.parametrize(
    "text", ["", "a\0b\0", "\0" * 10, "x" * 1_000_000, "日本語 " * 10_000, Text("hello")]
)
def test_encode_odd_but_valid_text(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(type(i) is int and 0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("add_bos", [1, 0, "yes", np.True_, []], ids=_ident)
def test_encode_add_bos_not_a_bool(tokenizer, add_bos):
    with pytest.raises(TypeError, match=r"add_bos must be a bool or None, got \w+"):
        tokenizer.encode("hi", add_bos=add_bos)


def test_encode_add_bos_without_bos(tiny_tokenizer):
    tokenizer = Tokenizer(["a", "b"], [])
    with pytest.raises(ValueError, match="add_bos=True but the tokenizer has no bos_token_id"):
        tokenizer.encode("ab", add_bos=True)
    assert tiny_tokenizer.encode("ab", add_bos=True)[0] == 1


# -- Tokenizer.decode and the id helpers ----------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "error", "message"),
    [
        ([-1], ValueError, r"ids\[0\] must be in \[0, 49152\), got -1"),
        ([5, 49152], ValueError, r"ids\[1\] must be in \[0, 49152\), got 49152"),
        ([2**70], ValueError, r"ids\[0\] must be in \[0, 49152\), got 1180591620717411303424"),
        (np.array([-3], np.int64), ValueError, r"ids\[0\] must be in \[0, 49152\), got -3"),
        ([True], TypeError, r"ids\[0\] must be an int, got bool True"),
        ([np.True_], TypeError, r"ids\[0\] must be an int, got bool"),
        ([1.0], TypeError, r"ids\[0\] must be an int, got float 1.0"),
        ([np.float32(1)], TypeError, r"ids\[0\] must be an int, got float32"),
        ([None], TypeError, r"ids\[0\] must be an int, got NoneType"),
        ([[1, 2]], TypeError, r"ids\[0\] must be an int, got list"),
        (np.array([1.0, 2.0]), TypeError, r"ids\[0\] must be an int, got float64"),
        ("123", TypeError, "ids must be a sequence of ints, got str"),
        (b"\x01\x02", TypeError, "ids must be a sequence of ints, got bytes"),
        (bytearray(b"hi"), TypeError, "ids must be a sequence of ints, got bytearray"),
        (memoryview(b"hi"), TypeError, "ids must be a sequence of ints, got memoryview"),
        (None, TypeError, "ids must be a sequence of ints, got NoneType"),
        (7, TypeError, "ids must be a sequence of ints, got int"),
        (np.array([[1, 2], [3, 4]]), ValueError, r"one dimension\), got shape \(2, 2\)"),
        (np.array([[1], [2]]), ValueError, r"one dimension\), got shape \(2, 1\)"),
        (np.array(5), ValueError, r"one dimension\), got shape \(\)"),
    ],
    ids=_ident,
)
def test_decode_hostile_ids(tokenizer, ids, error, message):
    with pytest.raises(error, match=message):
        tokenizer.decode(ids)


@pytest.mark.parametrize(
    "ids",
    [
        [19556, 905],
        (19556, 905),
        (i for i in (19556, 905)),
        np.array([19556, 905], np.uint16),
        np.array([19556, 905], np.int64),
        [np.int32(19556), np.uint64(905)],
        jnp.array([19556, 905]),
        [jnp.int32(19556), 905],
    ],
    ids=["list", "tuple", "generator", "uint16", "int64", "numpy scalars", "jax", "jax scalar"],
)
def test_decode_accepts_any_integer_sequence(tokenizer, ids):
    assert tokenizer.decode(ids) == "Hello world"


@pytest.mark.parametrize("skip", ["no", 1, None, np.True_], ids=_ident)
def test_decode_skip_special_tokens_not_a_bool(tokenizer, skip):
    with pytest.raises(TypeError, match=r"skip_special_tokens must be a bool, got \w+"):
        tokenizer.decode([1, 2], skip_special_tokens=skip)


def test_id_helpers(tokenizer):
    assert tokenizer.id_to_token(np.int64(19556)) == "Hello"
    assert tokenizer.token_bytes(jnp.int32(905)) == b" world"
    with pytest.raises(TypeError, match="token_id must be an int, got bool True"):
        tokenizer.id_to_token(True)
    with pytest.raises(ValueError, match=r"token_id must be in \[0, 49152\), got 49152"):
        tokenizer.token_bytes(49152)
    with pytest.raises(TypeError, match="token must be a str, got NoneType"):
        tokenizer.token_to_id(None)


# -- StreamDecoder.feed ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token", [19556, np.int64(19556), np.uint16(19556), jnp.int32(19556), np.array(19556)]
)
def test_feed_one_integer_of_any_kind(tokenizer, token):
    decoder = tokenizer.stream_decoder()
    assert decoder.feed(token) == "Hello"
    assert decoder.ids == [19556]


@pytest.mark.parametrize(
    ("ids", "error", "message"),
    [
        (True, TypeError, "ids must be an int or a sequence of ints, got bool True"),
        (None, TypeError, "ids must be an int or a sequence of ints, got NoneType"),
        (3.0, TypeError, "ids must be an int or a sequence of ints, got float"),
        ("12", TypeError, "ids must be an int or a sequence of ints, got str"),
        (bytearray(b"\x01"), TypeError, "ids must be an int or a sequence of ints, got bytearray"),
        ([5, -1], ValueError, r"ids\[1\] must be in \[0, 49152\), got -1"),
        ([5, 2.0], TypeError, r"ids\[1\] must be an int, got float"),
        (-1, ValueError, r"ids\[0\] must be in \[0, 49152\), got -1"),
        (np.array([[5]]), ValueError, r"shape \(1, 1\)"),
    ],
    ids=_ident,
)
def test_feed_hostile_ids_changes_nothing(tokenizer, ids, error, message):
    decoder = StreamDecoder(tokenizer)
    first, _ = tokenizer.encode(" 😀")
    decoder.feed(first)  # leaves 3 bytes of the emoji pending
    with pytest.raises(error, match=message):
        decoder.feed(ids)
    assert decoder.ids == [first] and decoder.pending_bytes == 3


def test_feed_generator(tokenizer):
    decoder = tokenizer.stream_decoder()
    assert decoder.feed(i for i in tokenizer.encode("Hello world")) == "Hello world"


# -- Tokenizer.apply_chat_template ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "error", "message"),
    [
        ("hello", TypeError, "messages must be a list of dicts, got str"),
        (b"hello", TypeError, "messages must be a list of dicts, got bytes"),
        (None, TypeError, "messages must be a list of dicts, got NoneType"),
        (
            {"role": "user", "content": "hi"},
            TypeError,
            "messages must be a list of dicts, got dict",
        ),
        (
            ({"role": "user", "content": "hi"} for _ in range(1)),
            TypeError,
            "messages must be a list of dicts, got generator",
        ),
        ([None], TypeError, r"messages\[0\] must be a dict, got NoneType"),
        ([("user", "hi")], TypeError, r"messages\[0\] must be a dict, got tuple"),
        ([{"role": "user"}], ValueError, r"messages\[0\]\['content'\] must be a str, got None"),
        ([{"role": 1, "content": "x"}], ValueError, r"messages\[0\]\['role'\] must be a str"),
        ([{"role": "user", "content": b"x"}], ValueError, r"\['content'\] must be a str, got b'x'"),
        (
            [{"role": "user", "content": "fine"}, {"role": "user", "content": "bad \udcff"}],
            ValueError,
            r"messages\[1\]\['content'\] must be valid UTF-8 text, but position 4 .*byte 0xFF",
        ),
        (
            [{"role": "us\ud800er", "content": "x"}],
            ValueError,
            r"messages\[0\]\['role'\] must be valid UTF-8 text, but position 2",
        ),
    ],
    ids=_ident,
)
def test_chat_template_hostile_messages(tokenizer, messages, error, message):
    with pytest.raises(error, match=message):
        tokenizer.apply_chat_template(messages)


@pytest.mark.parametrize("flag", ["yes", 1, None, np.True_], ids=_ident)
def test_chat_template_flag_not_a_bool(tokenizer, flag):
    with pytest.raises(TypeError, match=r"add_generation_prompt must be a bool, got \w+"):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}], flag)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{% for %}", "chat template error: TemplateSyntaxError"),
        ("{{ messages + 1 }}", "chat template error: TypeError"),
        ("{{ 1 // 0 }}", "chat template error: ZeroDivisionError"),
        ("{{ messages[5]['content'] }}", "chat template error: UndefinedError"),
        ("{{ ''.__class__.__mro__ }}", "chat template error: SecurityError"),
        ("{{ raise_exception('no system role') }}", "chat template error: no system role"),
    ],
)
def test_broken_chat_templates(tmp_path, template, message):
    fields = _tokenizer_fields(tokenizer__chat_template=(STRING, template))
    tokenizer = Tokenizer.from_gguf(_write(tmp_path / "tok.gguf", _gguf(fields, [])))
    with pytest.raises(TokenizerError, match=message):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}])


def test_chat_template_long_and_nul_content(tokenizer):
    content = "a\0b " * 50_000
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}])
    assert content in text
    assert tokenizer.decode(tokenizer.encode(text)) == text
