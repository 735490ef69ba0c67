"""What an engine runs: a loaded Llama checkpoint (``Model``: config, device parameters,
tokenizer) or a hybrid stack of attention and recurrent layers (``HybridModel``).

Both tell the engine the same few things: their vocabulary, context and EOS ids, the jitted
step that runs them, and the row cache and runtime metadata of that step
(``contiguous_cache``, ``rows_runtime``). Only ``Model`` runs on a paged pool
(``supports_paged``).
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
from jaxkv.engine.step import forward_step, hybrid_step
from jaxkv.models.config import LlamaConfig
from jaxkv.models.hybrid import HybridConfig, init_hybrid
from jaxkv.models.llama import Params, params_to_device


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded checkpoint: config, device params and tokenizer."""

    config: LlamaConfig
    params: Params
    tokenizer: Any
    path: str
    dtype: np.dtype

    step_function = staticmethod(forward_step)
    supports_paged = True

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.eos_token_ids) | frozenset(self.config.eos_token_ids)

    def contiguous_cache(self, rows: int, max_length: int, kv_quantization: str = "none"):
        """A ``TransformerCache`` of ``rows`` rows of ``max_length`` tokens."""
        c = self.config
        metadata = TransformerCacheMetadata.create(
            rows,
            max_length,
            c.num_layers,
            c.num_kv_heads,
            c.head_dim,
            dtype=self.dtype,
            kv_quantization=kv_quantization,
        )
        return TransformerCache.init_cache(metadata)

    @staticmethod
    def rows_runtime(counts: Any) -> TransformerRuntimeMetadata:
        """The runtime of a step where row ``r`` takes ``counts[r]`` new tokens."""
        return TransformerRuntimeMetadata.create(counts)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, dtype: Any = "float32") -> Model:
        """Load a Llama-architecture GGUF (default: the bundled SmolLM2-135M-Instruct).

        Args:
            path: a GGUF file, or ``None`` for the default model.
            dtype: weight and activation dtype, ``"float32"`` or ``"bfloat16"``.
        """
        from jaxkv.io.gguf import default_model_path, load_gguf
        from jaxkv.io.tokenizer import Tokenizer

        resolved = default_model_path() if path is None else path
        dtype = v.require_float_dtype("Model.load", "dtype", dtype)
        enable_compilation_cache()
        config, params = load_gguf(resolved, dtype=np.float32, device=True)
        tokenizer = Tokenizer.from_gguf(resolved)
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
    supports_paged = False

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.eos_token_ids)

    def contiguous_cache(self, rows: int, max_length: int, kv_quantization: str = "none"):
        """A ``HybridCache`` of ``rows`` rows (attention layers hold ``max_length`` tokens)."""
        if kv_quantization != "none":
            raise ValueError(
                f"HybridModel: kv_quantization={kv_quantization!r} is not available for hybrid "
                "stacks; expected 'none'"
            )
        return HybridCache.init_cache(self.config.cache_metadata(rows, max_length))

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
