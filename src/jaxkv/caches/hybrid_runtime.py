"""Runtime metadata of one forward pass through a hybrid stack: ``HybridRuntimeMetadata`` for the
contiguous attention backend (one ragged ``[batch, T]`` layout for every layer) and
``HybridPagedRuntimeMetadata`` for the paged one (the step's packed token axis for attention
layers, the ``[batch, T]`` slot layout for recurrent layers, and the map between the two).

Both hand each layer its part (``for_kind``) and move activations into and out of the layout
attention layers use (``attention_inputs`` / ``attention_outputs``: the identity for the
contiguous backend), so a model runs either backend with the same code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv import _validation as v
from jaxkv.abstracts import BaseRunTimeMetadata, pytree_dataclass
from jaxkv.caches.layer_kinds import runtime_part
from jaxkv.caches.paged import PagedRuntimeMetadata
from jaxkv.caches.recurrent import RecurrentRuntimeMetadata
from jaxkv.caches.transformer import TransformerRuntimeMetadata


@pytree_dataclass
class HybridRuntimeMetadata(BaseRunTimeMetadata):
    """Runtime metadata of one forward pass through a hybrid stack with the ``"contiguous"``
    attention backend.

    Attributes:
        attention: what attention views take (``TransformerRuntimeMetadata``; ``None``: all
            tokens real).
        recurrent: what recurrent views take (``RecurrentRuntimeMetadata``; ``None``: all real).
    """

    attention: TransformerRuntimeMetadata | None = None
    recurrent: RecurrentRuntimeMetadata | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.attention is not None and not isinstance(
            self.attention, TransformerRuntimeMetadata
        ):
            raise TypeError(
                f"{owner}: attention must be TransformerMetadata, "
                f"got {type(self.attention).__name__}"
            )
        if self.recurrent is not None and not isinstance(self.recurrent, RecurrentRuntimeMetadata):
            raise TypeError(
                f"{owner}: recurrent must be RecurrentMetadata, got {type(self.recurrent).__name__}"
            )

    @classmethod
    def create(cls, new_lengths: Any = None, padding_side: str = "right") -> HybridRuntimeMetadata:
        """Both parts from the same per-row real token counts (``[batch]`` ints, or ``None``:
        every token real) and padding side."""
        if new_lengths is None:
            return cls(
                attention=TransformerRuntimeMetadata.create(None, padding_side),
                recurrent=RecurrentRuntimeMetadata.create(None, padding_side),
            )
        recurrent = RecurrentRuntimeMetadata.create(new_lengths, padding_side)
        attention = TransformerRuntimeMetadata.create(recurrent.new_lengths, padding_side)
        return cls(attention=attention, recurrent=recurrent)

    def for_kind(self, kind: str) -> TransformerRuntimeMetadata | RecurrentRuntimeMetadata | None:
        """The part a layer of ``kind`` takes (``None`` for ``"none"``)."""
        return runtime_part(self, "HybridMetadata.for_kind", kind)

    def attention_inputs(self, hidden: jax.Array) -> jax.Array:
        """``hidden`` unchanged: contiguous attention reads the ``[batch, T]`` layout."""
        return hidden

    def attention_outputs(self, out: jax.Array) -> jax.Array:
        """``out`` unchanged."""
        return out


HybridMetadata = HybridRuntimeMetadata
"""Former name of ``HybridRuntimeMetadata``."""


def _check_token_index(
    owner: str, token_index: np.ndarray, new_lengths: np.ndarray, padding_side: str, num_tokens: int
) -> None:
    """Host check that ``token_index`` is a valid ``[batch, T]`` layout (see
    ``HybridPagedMetadata``) agreeing with ``new_lengths``."""
    batch, width = token_index.shape
    counts = np.sum(token_index >= 0, axis=1)
    if not np.array_equal(counts, new_lengths):
        raise ValueError(
            f"{owner}: recurrent.new_lengths {new_lengths.tolist()} must count the real "
            f"(>= 0) entries of token_index per row, got {counts.tolist()}"
        )
    if token_index.size and (token_index.min() < -1 or token_index.max() >= num_tokens):
        raise ValueError(
            f"{owner}: token_index must hold packed indices in [0, {num_tokens}) or -1, got "
            f"values in [{token_index.min()}, {token_index.max()}]"
        )
    slot = np.arange(width)[None, :]
    lead = width - counts[:, None] if padding_side == "left" else np.zeros((batch, 1), np.int64)
    real = (slot >= lead) & (slot < lead + counts[:, None])
    first = np.where(
        counts > 0, token_index[np.arange(batch), np.minimum(lead[:, 0], width - 1)], 0
    )
    expected = np.where(real, first[:, None] + slot - lead, -1)
    if not np.array_equal(token_index, expected):
        raise ValueError(
            f"{owner}: each row of token_index must be one run of consecutive packed indices "
            f"padded on the {padding_side} with -1, got {token_index.tolist()}"
        )
    used = token_index[token_index >= 0]
    if np.unique(used).size != used.size:
        raise ValueError(f"{owner}: token_index names a packed token twice: {token_index.tolist()}")


_SHARED_LAYOUT = ("context_lens", "query_start_loc", "num_seqs", "positions", "logits_indices")
"""Arrays the two page tables' runtimes of one step must agree on (one token layout)."""


def _check_same_layout(owner: str, attention: PagedRuntimeMetadata, sliding: Any) -> None:
    """``sliding`` is a ``PagedRuntimeMetadata`` of the same packed tokens as ``attention``
    (shapes always; values when concrete)."""
    if not isinstance(sliding, PagedRuntimeMetadata):
        raise TypeError(
            f"{owner}: sliding_attention must be None or PagedRuntimeMetadata, "
            f"got {type(sliding).__name__}"
        )
    if sliding.max_query_len != attention.max_query_len or (
        sliding.prefill_rows != attention.prefill_rows
    ):
        raise ValueError(
            f"{owner}: sliding_attention has max_query_len={sliding.max_query_len}, "
            f"prefill_rows={sliding.prefill_rows}; expected attention's {attention.max_query_len}, "
            f"{attention.prefill_rows}"
        )
    for name in (*_SHARED_LAYOUT, "slot_mapping", "token_ids", "page_tables", "copy_ops"):
        mine, theirs = getattr(attention, name), getattr(sliding, name)
        if mine.shape != theirs.shape:
            raise ValueError(
                f"{owner}: sliding_attention.{name} has shape {theirs.shape}; expected "
                f"attention.{name}'s {mine.shape} (both parts describe one step)"
            )
    for name in (*_SHARED_LAYOUT, "token_ids"):
        mine, theirs = getattr(attention, name), getattr(sliding, name)
        if not v.is_traced(mine, theirs) and not np.array_equal(
            np.asarray(mine), np.asarray(theirs)
        ):
            raise ValueError(
                f"{owner}: sliding_attention.{name} {np.asarray(theirs).tolist()} differs from "
                f"attention.{name} {np.asarray(mine).tolist()}; both parts must describe the "
                f"same scheduled tokens"
            )


@pytree_dataclass
class HybridPagedRuntimeMetadata(BaseRunTimeMetadata):
    """Runtime metadata of one step through a hybrid stack with the ``"paged"`` backend.

    With ``S = max_num_seqs`` (= the cache's ``batch_size``), ``N`` the step's padded packed token
    count and ``T`` the per-row width of the batch layout:

    Attributes:
        attention: the step's ``PagedRuntimeMetadata`` (page tables, slot mapping, packed
            ``[N]`` tokens, copy ops ...), what paged attention views take.
        recurrent: ``RecurrentRuntimeMetadata`` of the ``[S, T]`` batch layout: ``new_lengths: [S]``
            int32 real tokens per slot (``0`` for a slot not scheduled this step, whose state
            stays exactly as it was) and the ``padding_side``; what recurrent views take.
        token_index: ``[S, T]`` int32; ``token_index[r, t]`` is the packed index (into
            ``attention``'s ``[N]`` axis) of the token at column ``t`` of slot ``r``, ``-1`` for
            padding. Each slot's real tokens form one run of consecutive packed indices -- its
            scheduled sequence's ``query_start_loc[i] .. query_start_loc[i + 1] - 1`` -- at the
            start (``"right"`` padding) or end (``"left"``) of the row.
        sliding_attention: ``None`` (one page table drives every attention layer), or the
            sliding layers' own ``PagedRuntimeMetadata`` (their windowed page manager's step:
            the same packed tokens, positions and ``query_start_loc`` as ``attention``, its own
            page tables, slot mapping and copy ops), what ``for_kind("sliding_attention")``
            returns.

    The engine builds it from a host step (``jaxkv.engine.step_inputs.hybrid_paged_runtime``);
    see the module docstring for how slots stay stable.
    """

    attention: PagedRuntimeMetadata
    recurrent: RecurrentRuntimeMetadata
    token_index: jax.Array
    sliding_attention: PagedRuntimeMetadata | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if not isinstance(self.attention, PagedRuntimeMetadata):
            raise TypeError(
                f"{owner}: attention must be PagedRuntimeMetadata, "
                f"got {type(self.attention).__name__}"
            )
        if self.sliding_attention is not None:
            _check_same_layout(owner, self.attention, self.sliding_attention)
        if not isinstance(self.recurrent, RecurrentRuntimeMetadata):
            raise TypeError(
                f"{owner}: recurrent must be RecurrentMetadata, got {type(self.recurrent).__name__}"
            )
        if self.recurrent.new_lengths is None:
            raise ValueError(f"{owner}: recurrent.new_lengths must be a [batch] array, got None")
        if not hasattr(self.token_index, "dtype") or not jnp.issubdtype(
            self.token_index.dtype, jnp.integer
        ):
            raise TypeError(
                f"{owner}: token_index must be a [batch, T] int array, "
                f"got {getattr(self.token_index, 'dtype', type(self.token_index).__name__)}"
            )
        seqs = self.attention.page_tables.shape[0]
        v.check_array(owner, "token_index", self.token_index, (seqs, None))
        v.check_array(owner, "recurrent.new_lengths", self.recurrent.new_lengths, (seqs,))
        if self.token_index.shape[1] < 1:
            raise ValueError(f"{owner}: token_index must have T >= 1 columns, got 0")
        if not v.is_traced(self.token_index, self.recurrent.new_lengths):
            _check_token_index(
                owner,
                np.asarray(self.token_index),
                np.asarray(self.recurrent.new_lengths),
                self.recurrent.padding_side,
                self.num_tokens,
            )

    @property
    def num_tokens(self) -> int:
        """``N``, the padded length of the packed token axis."""
        return int(self.attention.slot_mapping.shape[0])

    @property
    def batch_size(self) -> int:
        """``S``, rows (slots) of the batch layout."""
        return int(self.token_index.shape[0])

    @property
    def width(self) -> int:
        """``T``, columns of the batch layout."""
        return int(self.token_index.shape[1])

    def for_kind(self, kind: str) -> PagedRuntimeMetadata | RecurrentRuntimeMetadata | None:
        """The part a layer of ``kind`` takes (``None`` for ``"none"``): sliding layers take
        ``sliding_attention`` when the step has one."""
        part = runtime_part(self, "HybridPagedMetadata.for_kind", kind)
        if kind == "sliding_attention" and self.sliding_attention is not None:
            return self.sliding_attention
        return part

    def slot_offsets(self) -> jax.Array:
        """``[S]`` int32: for each slot with new tokens, the position of its first one (the
        tokens its sequence had computed before this step); ``-1`` for the others."""
        real = self.token_index >= 0
        first = jnp.argmax(real, axis=1)
        packed = jnp.take_along_axis(self.token_index, first[:, None], axis=1)[:, 0]
        positions = self.attention.positions[jnp.maximum(packed, 0)]
        return jnp.where(jnp.any(real, axis=1), positions, -1).astype(jnp.int32)

    def drop_slots(self, slots: jax.Array) -> HybridPagedRuntimeMetadata:
        """The same step with every token of the slots where ``slots: [S]`` bool is true
        dropped: no attention write (``slot_mapping`` ``-1``) and no recurrent token. Jittable;
        constructed without the host checks (which hold for the result by construction)."""
        packed = jnp.where(slots[:, None], self.token_index, -1).reshape(-1)
        num_tokens = self.num_tokens
        dropped = (
            jnp.zeros((num_tokens,), jnp.bool_)
            .at[jnp.where(packed >= 0, packed, num_tokens)]
            .set(True, mode="drop")
        )

        def drop(part: PagedRuntimeMetadata | None) -> PagedRuntimeMetadata | None:
            if part is None:
                return None
            return dataclasses.replace(part, slot_mapping=jnp.where(dropped, -1, part.slot_mapping))

        recurrent = dataclasses.replace(
            self.recurrent, new_lengths=jnp.where(slots, 0, self.recurrent.new_lengths)
        )
        token_index = jnp.where(slots[:, None], -1, self.token_index)
        return dataclasses.replace(
            self,
            attention=drop(self.attention),
            recurrent=recurrent,
            token_index=token_index,
            sliding_attention=drop(self.sliding_attention),
        )

    def attention_inputs(self, hidden: jax.Array) -> jax.Array:
        """``[S, T, ...]`` activations in the layout attention layers write and read: the
        step's packed ``[N, ...]`` axis (``to_packed``)."""
        return self.to_packed(hidden)

    def attention_outputs(self, out: jax.Array) -> jax.Array:
        """Attention outputs ``[N, ...]`` back in the ``[S, T, ...]`` layout (``to_batch``)."""
        return self.to_batch(out)

    def to_packed(self, batched: jax.Array) -> jax.Array:
        """``[S, T, ...]`` -> ``[N, ...]``: each real entry moves to its packed index; packed
        padding gets zeros. Jittable."""
        owner = "HybridPagedMetadata.to_packed"
        v.check_array(
            owner,
            "batched",
            batched,
            (self.batch_size, self.width) + (None,) * (getattr(batched, "ndim", 2) - 2),
        )
        n = self.num_tokens
        target = jnp.where(self.token_index >= 0, self.token_index, n).reshape(-1)
        flat = batched.reshape(-1, *batched.shape[2:])
        packed = jnp.zeros((n, *batched.shape[2:]), batched.dtype)
        return packed.at[target].set(flat, mode="drop")

    def to_batch(self, packed: jax.Array) -> jax.Array:
        """``[N, ...]`` -> ``[S, T, ...]``: each entry reads its packed token; padding entries
        get zeros. Jittable."""
        owner = "HybridPagedMetadata.to_batch"
        v.check_array(
            owner, "packed", packed, (self.num_tokens,) + (None,) * (getattr(packed, "ndim", 1) - 1)
        )
        real = self.token_index >= 0
        gathered = packed[jnp.maximum(self.token_index, 0)]
        mask = real.reshape(real.shape + (1,) * (packed.ndim - 1))
        return jnp.where(mask, gathered, jnp.zeros((), packed.dtype))

    def batch_token_ids(self) -> jax.Array:
        """``[S, T]`` int32 ids of the new tokens in the batch layout (``0`` at padding)."""
        return self.to_batch(self.attention.token_ids.astype(jnp.int32))


HybridPagedMetadata = HybridPagedRuntimeMetadata
"""Former name of ``HybridPagedRuntimeMetadata``."""
