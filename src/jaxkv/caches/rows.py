"""The per-row layout of a ragged batch: which of the ``T`` new tokens of each row are real.

Every cache family that keeps per-row state (contiguous, ring, recurrent) takes its new tokens as
``[batch, T, ...]`` with padding on the right or on the left of each row; ``RaggedRows`` says how
many are real, ``token_layout`` turns that into ranks and absolute positions, and ``row_mask``
turns a user's row selection into a mask.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv import _validation as v
from jaxkv.abstracts import BaseRunTimeMetadata, pytree_dataclass, static_field

PaddingSide = Literal["right", "left"]
PADDING_SIDES = ("right", "left")


@pytree_dataclass
class RaggedRows(BaseRunTimeMetadata):
    """Runtime metadata of ``T`` new tokens per row, some of them padding.

    Attributes:
        new_lengths: ``[batch]`` int32, real new tokens in each row; ``None`` means all ``T`` are
            real. A row with 0 real tokens keeps its state exactly.
        padding_side: ``"right"`` (real tokens first) or ``"left"`` (real tokens last).
    """

    new_lengths: jax.Array | None = None
    padding_side: str = static_field("right")

    def __post_init__(self) -> None:
        v.require_choice(type(self).__name__, "padding_side", self.padding_side, PADDING_SIDES)

    @classmethod
    def create(cls, new_lengths: Any = None, padding_side: PaddingSide = "right"):
        """Runtime metadata from per-row real token counts (``None``: every token is real)."""
        if new_lengths is not None:
            new_lengths = jnp.asarray(new_lengths)
            if not jnp.issubdtype(new_lengths.dtype, jnp.integer) or new_lengths.ndim != 1:
                raise ValueError(
                    f"{cls.__name__}.create: new_lengths must be a [batch] int array, got "
                    f"shape {new_lengths.shape} dtype {new_lengths.dtype}"
                )
            new_lengths = new_lengths.astype(jnp.int32)
        return cls(new_lengths=new_lengths, padding_side=padding_side)


def token_layout(
    lengths: jax.Array, runtime: RaggedRows | None, new_tokens: int
) -> tuple[jax.Array, jax.Array]:
    """Where each of ``new_tokens`` written per row lands.

    Args:
        lengths: ``[batch]`` int32 tokens already seen per row.
        runtime: says which tokens are real (``None``: all of them).
        new_tokens: ``T``.

    Returns:
        ``index: [batch, T]`` int32, the token's rank among the row's real new tokens, and
        ``positions: [batch, T]`` int32 absolute positions, ``-1`` for padding.
    """
    batch = lengths.shape[0]
    steps = jnp.arange(new_tokens, dtype=jnp.int32)[None, :]
    if runtime is None or runtime.new_lengths is None:
        counts = jnp.full((batch,), new_tokens, jnp.int32)
        padding_side = "right"
    else:
        counts = runtime.new_lengths.astype(jnp.int32)
        padding_side = runtime.padding_side
    index = steps if padding_side == "right" else steps - (new_tokens - counts)[:, None]
    index = jnp.broadcast_to(index, (batch, new_tokens))
    real = (index >= 0) & (index < counts[:, None])
    positions = jnp.where(real, lengths[:, None] + index, -1)
    return index, positions


def row_mask(owner: str, rows: Any, batch_size: int) -> jax.Array:
    """``[batch]`` bool mask from a bool mask or a list of row ids (validated when concrete)."""
    array = jnp.asarray(rows)
    if array.dtype == jnp.bool_:
        v.check_array(owner, "rows", array, (batch_size,))
        return array
    if not jnp.issubdtype(array.dtype, jnp.integer) or array.ndim != 1:
        raise TypeError(
            f"{owner}: rows must be a [batch] bool mask or a list of row ids, got {rows!r}"
        )
    if not v.is_traced(array) and array.size and (array.min() < 0 or array.max() >= batch_size):
        raise ValueError(f"{owner}: row ids must lie in [0, {batch_size}), got {np.asarray(array)}")
    return jnp.zeros((batch_size,), jnp.bool_).at[array].set(True, mode="drop")
