"""Hyper-parameters of a Llama-family decoder, as read from a checkpoint.

`LlamaConfig` is immutable and hashable, so a jitted forward pass can take it
as a static argument. Every field is checked when the object is built; a bad
value raises `ValueError` (or `TypeError` for a wrong type) naming the field,
the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

_ROPE_SCALING_TYPES = ("linear",)


@dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama-family decoder-only transformer.

    Attributes:
      vocab_size: rows of the token embedding (and columns of the LM head).
      hidden_size: width of the residual stream.
      intermediate_size: width of the gated MLP (SwiGLU).
      num_layers: number of decoder blocks.
      num_heads: query heads per layer.
      num_kv_heads: key/value heads per layer; divides `num_heads` (grouped-query attention).
      head_dim: width of one attention head (query, key and value alike).
      rope_theta: RoPE base frequency.
      rms_norm_eps: epsilon added to the mean square in RMSNorm.
      max_position_embeddings: context length the model was trained for.
      tie_word_embeddings: True when the LM head is the transposed token embedding.
      bos_token_id: id of the beginning-of-sequence token.
      eos_token_ids: ids that end generation; the first is the checkpoint's own EOS id.
      pad_token_id: id used for padding, or None.
      rope_scaling_type: None (plain RoPE) or "linear" (positions divided by
        `rope_scaling_factor`, as in position interpolation).
      rope_scaling_factor: 1.0 unless `rope_scaling_type` is set.
      name: free-form model name from the checkpoint ("" when absent).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None = None
    rope_scaling_type: str | None = None
    rope_scaling_factor: float = 1.0
    name: str = ""

    def __post_init__(self) -> None:
        for field in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            _check_positive_int(field, getattr(self, field))
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads must be a multiple of num_kv_heads, got num_heads={self.num_heads} "
                f"and num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        for field in ("rope_theta", "rms_norm_eps", "rope_scaling_factor"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{field} must be a float, got {type(value).__name__} {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{field} must be a finite positive number, got {value!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise TypeError(
                f"tie_word_embeddings must be a bool, got {type(self.tie_word_embeddings).__name__}"
            )
        self._check_token_id("bos_token_id", self.bos_token_id)
        if not isinstance(self.eos_token_ids, tuple) or not self.eos_token_ids:
            raise ValueError(
                f"eos_token_ids must be a non-empty tuple of ints, got {self.eos_token_ids!r}"
            )
        for token_id in self.eos_token_ids:
            self._check_token_id("eos_token_ids", token_id)
        if self.pad_token_id is not None:
            self._check_token_id("pad_token_id", self.pad_token_id)
        if self.rope_scaling_type is not None and self.rope_scaling_type not in _ROPE_SCALING_TYPES:
            raise ValueError(
                f"rope_scaling_type must be None or one of {_ROPE_SCALING_TYPES}, "
                f"got {self.rope_scaling_type!r}"
            )
        if self.rope_scaling_type is None and self.rope_scaling_factor != 1.0:
            raise ValueError(
                "rope_scaling_factor must be 1.0 when rope_scaling_type is None, "
                f"got {self.rope_scaling_factor!r}"
            )
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {type(self.name).__name__}")

    def _check_token_id(self, field: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{field} must hold ints, got {type(value).__name__} {value!r}")
        if not 0 <= value < self.vocab_size:
            raise ValueError(f"{field} must be in [0, vocab_size={self.vocab_size}), got {value}")

    @property
    def eos_token_id(self) -> int:
        """The checkpoint's own end-of-sequence id (first of `eos_token_ids`)."""
        return self.eos_token_ids[0]

    @property
    def num_query_groups(self) -> int:
        """How many query heads share one key/value head."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> LlamaConfig:
        """Return a copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python view of every field (tuples become lists), JSON-serialisable."""
        out = dataclasses.asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LlamaConfig:
        """Inverse of `to_dict`; unknown or missing fields raise `TypeError`/`ValueError`."""
        if not isinstance(values, dict):
            raise TypeError(f"values must be a dict, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown LlamaConfig field(s): {unknown}")
        kwargs = dict(values)
        if "eos_token_ids" in kwargs and isinstance(kwargs["eos_token_ids"], list):
            kwargs["eos_token_ids"] = tuple(kwargs["eos_token_ids"])
        return cls(**kwargs)


def _check_positive_int(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{field} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{field} must be a positive int, got {value}")
