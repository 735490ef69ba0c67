"""Checkpoint and tokenizer readers (GGUF files to NumPy weights, the GGUF tokenizer) and cache
files on disk (``save_cache`` / ``load_cache``, fingerprinted safetensors files)."""

from jaxkv.errors import (
    CacheFileCorruptedError,
    CacheFileError,
    CacheFileVersionError,
    CacheTargetMismatchError,
    FingerprintMismatchError,
)
from jaxkv.io.cache_store import (
    CACHE_LAYOUT_VERSION,
    CacheFileInfo,
    CacheFingerprint,
    LoadedCache,
    hash_model_file,
    hash_text,
    hash_tokens,
    load_cache,
    read_cache_info,
    save_cache,
    tokenizer_identity,
)
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
    "CACHE_LAYOUT_VERSION",
    "CacheFileCorruptedError",
    "CacheFileError",
    "CacheFileInfo",
    "CacheFileVersionError",
    "CacheFingerprint",
    "CacheTargetMismatchError",
    "FingerprintMismatchError",
    "LoadedCache",
    "GGUFError",
    "GGUFMetadata",
    "GGUFTensorInfo",
    "StreamDecoder",
    "Tokenizer",
    "TokenizerError",
    "config_from_metadata",
    "default_model_path",
    "hash_model_file",
    "hash_text",
    "hash_tokens",
    "load_cache",
    "load_gguf",
    "read_cache_info",
    "read_gguf_metadata",
    "save_cache",
    "tokenizer_identity",
]
