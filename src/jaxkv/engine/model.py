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
