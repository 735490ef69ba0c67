"""What every key/value cache family (contiguous, ring, paged) shares: the storage settings of
its metadata (dtype, codec), their defaults and validation, bytes per token, and reading the
stored keys and values back as floats.

The metadata of a KV family has ``num_layers``, ``num_kv_heads``, ``head_dim``, ``value_dim``,
``value_heads`` (a field or a property), ``dtype``, ``kv_quantization`` and
``quantization_group_size``; mixing in ``KVStorageMetadata`` gives it ``codec`` / ``storage``,
``bytes_per_token`` and the shared ``fill_defaults`` / ``validate`` steps.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxkv import _validation as v
from jaxkv import quantization


class KVStorageMetadata:
    """Storage settings of a KV cache's metadata (a mixin of ``BaseCacheMetadata`` classes)."""

    HEAD_FIELDS: tuple[str, ...] = ("num_kv_heads", "head_dim", "value_dim")

    @staticmethod
    def fill_kv_defaults(owner: str, fields: dict[str, Any]) -> dict[str, Any]:
        """``dtype`` as a NumPy dtype, ``value_dim`` defaulting to ``head_dim``, and int4's
        default ``quantization_group_size`` (``min(64, head_dim, value_dim)``)."""
        if "dtype" in fields:
            fields["dtype"] = v.require_float_dtype(owner, "dtype", fields["dtype"])
        if fields.get("value_dim") is None and "head_dim" in fields:
            fields["value_dim"] = fields["head_dim"]
        if (
            fields.get("kv_quantization") == "int4"
            and fields.get("quantization_group_size") is None
        ):
            dims = [fields.get("head_dim"), fields.get("value_dim")]
            if all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
                fields["quantization_group_size"] = min(quantization.DEFAULT_INT4_GROUP_SIZE, *dims)
        return fields

    def validate_kv(self) -> None:
        """Check the head sizes, the dtype and the codec settings."""
        owner = type(self).__name__
        for name in self.HEAD_FIELDS:
            v.require_size(owner, name, getattr(self, name))
        if not isinstance(self.dtype, np.dtype):
            raise TypeError(f"{owner}: dtype must be a numpy dtype, got {self.dtype!r}")
        v.require_float_dtype(owner, "dtype", self.dtype)
        group_size = quantization.resolve_group_size(
            owner,
            self.kv_quantization,
            self.quantization_group_size,
            (("head_dim", self.head_dim), ("value_dim", self.value_dim)),
        )
        if group_size != self.quantization_group_size:
            raise ValueError(
                f"{owner}: kv_quantization='int4' needs quantization_group_size (create fills "
                f"the default {group_size}), got {self.quantization_group_size!r}"
            )

    @property
    def codec(self) -> quantization.KVCodec | None:
        """The quantising codec, or ``None`` when unquantised."""
        return quantization.make_codec(self.kv_quantization, self.quantization_group_size)

    @property
    def storage(self) -> quantization.StorageCodec:
        """The storage codec every read and write goes through (``RawCodec(dtype)`` when
        unquantised)."""
        return quantization.storage_codec(
            self.kv_quantization, self.quantization_group_size, self.dtype
        )

    @property
    def key_heads(self) -> int:
        """Former name of ``num_kv_heads``."""
        return self.num_kv_heads

    @property
    def key_dim(self) -> int:
        """Former name of ``head_dim``."""
        return self.head_dim

    def bytes_per_token(self) -> int:
        """Bytes of keys and values one token occupies across all layers (scales included)."""
        storage = self.storage
        per_layer = self.num_kv_heads * storage.bytes_per_head(
            self.head_dim
        ) + self.value_heads * storage.bytes_per_head(self.value_dim)
        return self.num_layers * per_layer


def decode_states(
    words: jax.Array, scales: jax.Array | None, metadata: KVStorageMetadata
) -> jax.Array:
    """Stored keys or values as ``metadata.dtype`` floats (a quantised cache is dequantised
    whole: for inspection; attention reads block by block)."""
    return metadata.storage.decode(words, scales).astype(metadata.dtype)
