"""A loaded checkpoint: its config, its parameters on the device and its tokenizer."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from jaxkv import _validation as v
from jaxkv.models.config import LlamaConfig
from jaxkv.models.llama import Params, params_to_device


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded checkpoint: config, device params and tokenizer."""

    config: LlamaConfig
    params: Params
    tokenizer: Any
    path: str
    dtype: np.dtype

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
        config, params = load_gguf(resolved, dtype=np.float32)
        tokenizer = Tokenizer.from_gguf(resolved)
        return cls(config, params_to_device(params, dtype), tokenizer, str(resolved), dtype)

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
