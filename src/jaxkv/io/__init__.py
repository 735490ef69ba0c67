"""Checkpoint and tokenizer readers: GGUF files to NumPy weights, and the GGUF tokenizer."""

from jaxkv.io.gguf import (
    GGUFError,
    GGUFMetadata,
    GGUFTensorInfo,
    config_from_metadata,
    default_model_path,
    load_gguf,
    read_gguf_metadata,
)
from jaxkv.io.tokenizer import StreamDecoder, Tokenizer, TokenizerError

__all__ = [
    "GGUFError",
    "GGUFMetadata",
    "GGUFTensorInfo",
    "StreamDecoder",
    "Tokenizer",
    "TokenizerError",
    "config_from_metadata",
    "default_model_path",
    "load_gguf",
    "read_gguf_metadata",
]
