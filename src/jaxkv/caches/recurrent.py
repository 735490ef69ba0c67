"""Recurrent-state caches: Mamba and Mamba2 (a causal-conv window plus an SSM state per row) and
linear / lightning attention (one ``key_dim x value_dim`` matrix per head and row).

Unlike a KV cache, these caches have a constant size per sequence: a row holds

* Mamba: ``conv_state: [batch, d_inner, conv_kernel - 1]`` and
  ``ssm_state: [batch, d_inner, state_size]``;
* Mamba2: ``conv_state: [batch, d_inner + 2 * n_groups * state_size, conv_kernel - 1]`` and
  ``ssm_state: [batch, num_heads, head_dim, state_size]``;
* linear attention: ``state: [batch, num_heads, key_dim, value_dim]``;

plus ``lengths: [batch]`` int32, the tokens each row has seen (its sequence offset).

The conv state keeps the last ``conv_kernel - 1`` inputs, not ``conv_kernel``: that is exactly
what the causal convolution of the next token needs (the token's own input arrives with it), so
no column of the state is ever dead.

A layer runs ``T >= 1`` new tokens per row in two steps. It asks the view for a
``RecurrentStep`` (``read``): the conv window over the previous inputs and the new ones, the SSM
state to start from and which tokens are real. It computes its outputs and the final state,
then writes that state with ``concatenate_to_cache``, which also shifts the conv window by the
row's real tokens. ``RecurrentMetadata`` says how many of the ``T`` tokens of each row are real
and on which side the padding is; a padding token never changes a row's state, and a row with
no real token keeps its state exactly. ``reset_rows`` empties rows so a batch slot can take a new
sequence. Both conv-state families share one window shift (``shift_conv_window``) and one view
implementation (``_ConvSSMCacheView``).

States are kept in float32 by default (``dtype`` is configurable: float32, bfloat16, float16).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv import _validation as v
from jaxkv.abstracts import (
    BaseCache,
    BaseCacheMetadata,
    BaseCacheView,
    pytree_dataclass,
    static_field,
)
from jaxkv.caches.rows import RaggedRows, row_mask, token_layout

# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------


def _validate_common(metadata: BaseCacheMetadata, int_fields: Sequence[str]) -> None:
    owner = type(metadata).__name__
    for name in ("batch_size", "num_layers", *int_fields):
        v.require_int(owner, name, getattr(metadata, name), minimum=1)
    if not isinstance(metadata.dtype, np.dtype):
        raise TypeError(f"{owner}: dtype must be a numpy dtype, got {metadata.dtype!r}")
    v.require_float_dtype(owner, "dtype", metadata.dtype)


def _check_conv_kernel(owner: str, conv_kernel: Any) -> None:
    v.require_int(owner, "conv_kernel", conv_kernel, minimum=2)


@pytree_dataclass
class MambaCacheMetadata(BaseCacheMetadata):
    """Static configuration of a Mamba (selective-scan) state cache.

    Attributes:
        batch_size: rows of the cache.
        num_layers: layers (views) in the cache.
        d_inner: channels of the conv and of the SSM (the mixer's expanded width).
        state_size: SSM state per channel (``N``).
        conv_kernel: width ``K`` of the causal depthwise conv (>= 2); ``K - 1`` inputs are kept.
        dtype: storage dtype of both states (float32 by default).
    """

    batch_size: int
    num_layers: int
    d_inner: int
    state_size: int
    conv_kernel: int
    dtype: np.dtype = np.dtype(np.float32)

    @classmethod
    def create(
        cls,
        batch_size: int,
        num_layers: int,
        d_inner: int,
        state_size: int = 16,
        conv_kernel: int = 4,
        *,
        dtype: Any = jnp.float32,
    ) -> MambaCacheMetadata:
        """Validated metadata; raises ``ValueError``/``TypeError`` naming the field."""
        owner = "MambaCacheMetadata.create"
        return cls(
            batch_size=batch_size,
            num_layers=num_layers,
            d_inner=d_inner,
            state_size=state_size,
            conv_kernel=conv_kernel,
            dtype=v.require_float_dtype(owner, "dtype", dtype),
        )

    def validate(self) -> None:
        _validate_common(self, ("d_inner", "state_size"))
        _check_conv_kernel(type(self).__name__, self.conv_kernel)

    @property
    def conv_dim(self) -> int:
        """Channels of the conv state."""
        return self.d_inner

    @property
    def conv_state_shape(self) -> tuple[int, int, int]:
        """``(batch, d_inner, conv_kernel - 1)``."""
        return (self.batch_size, self.conv_dim, self.conv_kernel - 1)

    @property
    def ssm_state_shape(self) -> tuple[int, int, int]:
        """``(batch, d_inner, state_size)``."""
        return (self.batch_size, self.d_inner, self.state_size)

    def state_bytes_per_sequence(self) -> int:
        """Bytes one sequence's states take across all layers (independent of its length)."""
        per_layer = self.conv_dim * (self.conv_kernel - 1) + self.d_inner * self.state_size
        return self.num_layers * per_layer * self.dtype.itemsize

    def bytes_total(self) -> int:
        """Bytes the whole cache allocates (states and the per-row lengths)."""
        return self.batch_size * (self.state_bytes_per_sequence() + 4 * self.num_layers)


@pytree_dataclass
class Mamba2CacheMetadata(BaseCacheMetadata):
    """Static configuration of a Mamba2 (SSD) state cache.

    Attributes:
        batch_size, num_layers: as for ``MambaCacheMetadata``.
        num_heads: SSM heads; ``d_inner = num_heads * head_dim``.
        head_dim: channels per head (``P``).
        state_size: SSM state per channel (``N``).
        n_groups: groups sharing ``B``/``C`` (divides ``num_heads``).
        conv_kernel: width ``K`` of the conv over ``x``, ``B`` and ``C`` (>= 2).
        dtype: storage dtype of both states (float32 by default).
    """

    batch_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    state_size: int
    n_groups: int
    conv_kernel: int
    dtype: np.dtype = np.dtype(np.float32)

    @classmethod
    def create(
        cls,
        batch_size: int,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        state_size: int = 128,
        n_groups: int = 1,
        conv_kernel: int = 4,
        *,
        dtype: Any = jnp.float32,
    ) -> Mamba2CacheMetadata:
        """Validated metadata; raises ``ValueError``/``TypeError`` naming the field."""
        owner = "Mamba2CacheMetadata.create"
        return cls(
            batch_size=batch_size,
            num_layers=num_layers,
            num_heads=num_heads,
            head_dim=head_dim,
            state_size=state_size,
            n_groups=n_groups,
            conv_kernel=conv_kernel,
            dtype=v.require_float_dtype(owner, "dtype", dtype),
        )

    def validate(self) -> None:
        owner = type(self).__name__
        _validate_common(self, ("num_heads", "head_dim", "state_size", "n_groups"))
        _check_conv_kernel(owner, self.conv_kernel)
        if self.num_heads % self.n_groups:
            raise ValueError(
                f"{owner}: n_groups={self.n_groups} must divide num_heads={self.num_heads}"
            )

    @property
    def d_inner(self) -> int:
        """``num_heads * head_dim``."""
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the conv state: ``d_inner + 2 * n_groups * state_size`` (x, B and C)."""
        return self.d_inner + 2 * self.n_groups * self.state_size

    @property
    def conv_state_shape(self) -> tuple[int, int, int]:
        """``(batch, conv_dim, conv_kernel - 1)``."""
        return (self.batch_size, self.conv_dim, self.conv_kernel - 1)

    @property
    def ssm_state_shape(self) -> tuple[int, int, int, int]:
        """``(batch, num_heads, head_dim, state_size)``."""
        return (self.batch_size, self.num_heads, self.head_dim, self.state_size)

    def state_bytes_per_sequence(self) -> int:
        """Bytes one sequence's states take across all layers (independent of its length)."""
        per_layer = self.conv_dim * (self.conv_kernel - 1) + self.d_inner * self.state_size
        return self.num_layers * per_layer * self.dtype.itemsize

    def bytes_total(self) -> int:
        """Bytes the whole cache allocates (states and the per-row lengths)."""
        return self.batch_size * (self.state_bytes_per_sequence() + 4 * self.num_layers)


@pytree_dataclass
class LinearAttentionCacheMetadata(BaseCacheMetadata):
    """Static configuration of a linear / lightning attention state cache.

    The state of head ``h`` follows ``S_t = decay[h] * S_{t-1} + k_t^T v_t`` (``decay`` absent:
    no decay), so one ``[key_dim, value_dim]`` matrix per head summarises the whole prefix.

    Attributes:
        batch_size, num_layers: rows and layers.
        num_heads: heads (one state matrix each).
        key_dim, value_dim: per-head width of (feature-mapped) keys and of values.
        decay: ``None`` or one factor per head in ``(0, 1]`` (lightning attention's
            ``exp(-slope)``), applied to the state once per real token.
        dtype: storage dtype of the state (float32 by default).
    """

    batch_size: int
    num_layers: int
    num_heads: int
    key_dim: int
    value_dim: int
    decay: tuple[float, ...] | None = None
    dtype: np.dtype = np.dtype(np.float32)

    @classmethod
    def create(
        cls,
        batch_size: int,
        num_layers: int,
        num_heads: int,
        key_dim: int,
        value_dim: int | None = None,
        *,
        decay: Any = None,
        dtype: Any = jnp.float32,
    ) -> LinearAttentionCacheMetadata:
        """Validated metadata (``value_dim`` defaults to ``key_dim``; ``decay`` may be any
        sequence or 1-D array of floats). Raises ``ValueError``/``TypeError`` naming the field."""
        owner = "LinearAttentionCacheMetadata.create"
        if decay is not None:
            array = np.asarray(decay)
            if array.ndim != 1 or not np.issubdtype(array.dtype, np.number):
                raise TypeError(f"{owner}: decay must be a sequence of floats, got {decay!r}")
            decay = tuple(float(x) for x in array)
        return cls(
            batch_size=batch_size,
            num_layers=num_layers,
            num_heads=num_heads,
            key_dim=key_dim,
            value_dim=key_dim if value_dim is None else value_dim,
            decay=decay,
            dtype=v.require_float_dtype(owner, "dtype", dtype),
        )

    def validate(self) -> None:
        owner = type(self).__name__
        _validate_common(self, ("num_heads", "key_dim", "value_dim"))
        if self.decay is None:
            return
        if not isinstance(self.decay, tuple) or len(self.decay) != self.num_heads:
            raise ValueError(
                f"{owner}: decay must be a tuple of num_heads={self.num_heads} floats, "
                f"got {self.decay!r}"
            )
        for head, factor in enumerate(self.decay):
            if not isinstance(factor, float) or not 0.0 < factor <= 1.0:
                raise ValueError(
                    f"{owner}: decay[{head}] must be a float in (0, 1], got {factor!r}"
                )

    @property
    def state_shape(self) -> tuple[int, int, int, int]:
        """``(batch, num_heads, key_dim, value_dim)``."""
        return (self.batch_size, self.num_heads, self.key_dim, self.value_dim)

    def decay_factors(self) -> jax.Array | None:
        """``[num_heads]`` float32 decay per head, or ``None``."""
        return None if self.decay is None else jnp.asarray(self.decay, jnp.float32)

    def state_bytes_per_sequence(self) -> int:
        """Bytes one sequence's state takes across all layers (independent of its length)."""
        per_layer = self.num_heads * self.key_dim * self.value_dim
        return self.num_layers * per_layer * self.dtype.itemsize

    def bytes_total(self) -> int:
        """Bytes the whole cache allocates (states and the per-row lengths)."""
        return self.batch_size * (self.state_bytes_per_sequence() + 4 * self.num_layers)


RecurrentCacheMetadata = MambaCacheMetadata | Mamba2CacheMetadata | LinearAttentionCacheMetadata


# --------------------------------------------------------------------------------------------
# Runtime metadata and what a layer reads
# --------------------------------------------------------------------------------------------


@pytree_dataclass
class RecurrentMetadata(RaggedRows):
    """Runtime metadata of one step of ``T`` tokens through a recurrent cache: which tokens of
    each row are real (see ``jaxkv.caches.rows.RaggedRows``); a row with 0 keeps its state."""


@pytree_dataclass
class RecurrentStep:
    """What a recurrent layer needs to run ``T`` new tokens per row from the cached state.

    Attributes:
        state: the state to start from -- ``ssm_state`` for Mamba
            (``[batch, d_inner, state_size]``) and Mamba2
            (``[batch, num_heads, head_dim, state_size]``), ``[batch, num_heads, key_dim,
            value_dim]`` for linear attention -- in float32.
        token_mask: ``[batch, T]`` bool, ``True`` for real tokens. A layer must leave its state
            unchanged on the others.
        positions: ``[batch, T]`` int32 absolute position of each token, ``-1`` for padding.
        conv_window: Mamba/Mamba2 only (else ``None``): ``[batch, K - 1 + T, conv_dim]`` in the
            conv input's dtype. The causal conv output of token ``t`` is
            ``sum_j conv_window[:, t + j] * weight[:, j]`` for ``j < K`` (a *valid* conv over the
            window), correct for every real token whatever the padding side; it is the previous
            ``K - 1`` real inputs followed by the new ones (left padding moves the row's history
            right, next to its first real token; the slots before it are zeros).
    """

    state: jax.Array
    token_mask: jax.Array
    positions: jax.Array
    conv_window: jax.Array | None = None


def _check_runtime(owner: str, runtime: Any, batch_size: int, new_tokens: int) -> None:
    if runtime is not None and not isinstance(runtime, RecurrentMetadata):
        raise TypeError(f"{owner}: runtime must be RecurrentMetadata, got {type(runtime).__name__}")
    if runtime is None or runtime.new_lengths is None:
        return
    v.check_array(owner, "runtime.new_lengths", runtime.new_lengths, (batch_size,))
    if not v.is_traced(runtime.new_lengths):
        counts = np.asarray(runtime.new_lengths)
        if counts.min() < 0 or counts.max() > new_tokens:
            raise ValueError(
                f"{owner}: runtime.new_lengths must lie in [0, {new_tokens}], got {counts}"
            )


def _check_float(owner: str, name: str, array: Any) -> None:
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(f"{owner}: {name} must be a float array, got {array.dtype}")


def _layout(
    lengths: jax.Array, runtime: RecurrentMetadata | None, new_tokens: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(token_mask [batch, T], positions [batch, T], counts [batch])`` of one step."""
    _, positions = token_layout(lengths, runtime, new_tokens)
    mask = positions >= 0
    return mask, positions, jnp.sum(mask, axis=1, dtype=jnp.int32)


def shift_conv_window(
    conv_state: jax.Array,
    conv_input: jax.Array,
    counts: jax.Array,
    padding_side: str,
) -> tuple[jax.Array, jax.Array]:
    """The conv window of ``T`` new inputs and the conv state after them (Mamba and Mamba2).

    Args:
        conv_state: ``[batch, conv_dim, K - 1]``, the last ``K - 1`` real inputs of each row
            (oldest first).
        conv_input: ``[batch, T, conv_dim]`` new inputs, padding included.
        counts: ``[batch]`` int32 real inputs per row among the ``T``.
        padding_side: ``"right"`` or ``"left"``, where the padding of each row sits.

    Returns:
        ``window: [batch, K - 1 + T, conv_dim]`` in ``conv_input.dtype`` (see
        ``RecurrentStep.conv_window``) and ``new_state: [batch, conv_dim, K - 1]`` in
        ``conv_state.dtype``: the last ``K - 1`` real inputs of ``[old state, new inputs]`` (the old
        state itself where a row has no real input). ``T`` may be larger than ``K``.
    """
    history_len = conv_state.shape[-1]
    new_tokens = conv_input.shape[1]
    history = jnp.concatenate(
        [jnp.swapaxes(conv_state, 1, 2).astype(conv_input.dtype), conv_input], axis=1
    )
    # Leading padding of each row: its history must sit right before its first real input.
    lead = (new_tokens - counts if padding_side == "left" else jnp.zeros_like(counts))[:, None]
    slot = jnp.arange(history_len + new_tokens, dtype=jnp.int32)[None, :]
    source = jnp.where(slot < lead + history_len, slot - lead, slot)
    window = jnp.take_along_axis(history, jnp.maximum(source, 0)[:, :, None], axis=1)
    window = jnp.where((slot >= lead)[:, :, None], window, 0)
    # The row's last K - 1 real inputs end where its last real input sits in the window.
    kept = lead + counts[:, None] + jnp.arange(history_len, dtype=jnp.int32)[None, :]
    new_state = jnp.take_along_axis(window, kept[:, :, None], axis=1)
    return window, jnp.swapaxes(new_state, 1, 2).astype(conv_state.dtype)


# --------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------


@pytree_dataclass
class _ConvSSMCacheView(BaseCacheView):
    """A conv window plus an SSM state per row: the shared implementation of the Mamba and
    Mamba2 views (which only pin the metadata type).

    Attributes:
        conv_state: ``[batch, conv_dim, K - 1]`` in ``metadata.dtype``, the last ``K - 1`` real
            conv inputs (oldest first; zeros before the sequence starts).
        ssm_state: ``metadata.ssm_state_shape`` in ``metadata.dtype``.
        lengths: ``[batch]`` int32, tokens seen per row (its sequence offset).
        metadata: the cache's metadata (static).
        layer_index: which layer this view belongs to (static).
    """

    conv_state: jax.Array
    ssm_state: jax.Array
    lengths: jax.Array
    metadata: Any = static_field()
    layer_index: int | None = static_field(None)

    _metadata_type: ClassVar[type] = BaseCacheMetadata  # pinned by each family

    @classmethod
    def init(cls, metadata: Any, layer_index: int | None = None) -> _ConvSSMCacheView:
        """An empty view (zero states, all rows of length 0) for ``metadata``."""
        if not isinstance(metadata, cls._metadata_type):
            raise TypeError(
                f"{cls.__name__}.init: metadata must be {cls._metadata_type.__name__}, "
                f"got {type(metadata).__name__}"
            )
        v.require_optional_int(f"{cls.__name__}.init", "layer_index", layer_index, minimum=0)
        m = metadata
        return cls(
            conv_state=jnp.zeros(m.conv_state_shape, m.dtype),
            ssm_state=jnp.zeros(m.ssm_state_shape, m.dtype),
            lengths=jnp.zeros((m.batch_size,), jnp.int32),
            metadata=m,
            layer_index=layer_index,
        )

    def _owner(self, method: str) -> str:
        return f"{type(self).__name__}.{method} (layer {self.layer_index})"

    def _check_conv_input(self, owner: str, conv_input: Any) -> int:
        m = self.metadata
        v.check_array(owner, "conv_input", conv_input, (m.batch_size, None, m.conv_dim))
        _check_float(owner, "conv_input", conv_input)
        if conv_input.shape[1] < 1:
            raise ValueError(f"{owner}: conv_input must hold at least one new token, got T=0")
        return conv_input.shape[1]

    def read(
        self, conv_input: jax.Array, runtime: RecurrentMetadata | None = None
    ) -> RecurrentStep:
        """What the layer needs to run ``T`` new tokens (nothing is written).

        Args:
            conv_input: ``[batch, T, conv_dim]``, the new inputs of the causal conv (any float).
            runtime: which of the ``T`` tokens per row are real (default: all).

        Returns:
            A ``RecurrentStep`` with ``conv_window``, ``state`` (the SSM state, float32),
            ``token_mask`` and ``positions``.
        """
        owner = self._owner("read")
        new_tokens = self._check_conv_input(owner, conv_input)
        _check_runtime(owner, runtime, self.metadata.batch_size, new_tokens)
        return self._step(conv_input, runtime)[0]

    def _step(
        self, conv_input: jax.Array, runtime: RecurrentMetadata | None
    ) -> tuple[RecurrentStep, jax.Array, jax.Array]:
        mask, positions, counts = _layout(self.lengths, runtime, conv_input.shape[1])
        side = "right" if runtime is None else runtime.padding_side
        window, conv_state = shift_conv_window(self.conv_state, conv_input, counts, side)
        step = RecurrentStep(
            state=self.ssm_state.astype(jnp.float32),
            token_mask=mask,
            positions=positions,
            conv_window=window,
        )
        return step, conv_state, counts

    def concatenate_to_cache(
        self,
        conv_input: jax.Array,
        ssm_state: jax.Array,
        runtime: RecurrentMetadata | None = None,
    ) -> tuple[RecurrentStep, _ConvSSMCacheView]:
        """Write one step of ``T`` tokens per row.

        Args:
            conv_input: ``[batch, T, conv_dim]``, the same conv inputs given to ``read``; the
                conv state moves on by each row's real inputs (``T`` may exceed ``K``).
            ssm_state: ``metadata.ssm_state_shape``, any float dtype (cast to
                ``metadata.dtype``): the SSM state after the row's last real token. Rows with
                no real token keep their cached state whatever is passed here.
            runtime: which of the ``T`` tokens per row are real (default: all).

        Returns:
            ``(step, new_view)``: ``step`` is what ``read`` returns for these inputs (the state
            *before* the write); ``new_view`` holds the new conv and SSM states and
            ``lengths + real tokens``. ``self`` is unchanged.

        Raises:
            ValueError/TypeError: a shape, dtype or count that does not fit the metadata.
        """
        m = self.metadata
        owner = self._owner("concatenate_to_cache")
        new_tokens = self._check_conv_input(owner, conv_input)
        v.check_array(owner, "ssm_state", ssm_state, m.ssm_state_shape)
        _check_float(owner, "ssm_state", ssm_state)
        _check_runtime(owner, runtime, m.batch_size, new_tokens)
        step, conv_state, counts = self._step(conv_input, runtime)
        moved = (counts > 0).reshape((-1,) + (1,) * (ssm_state.ndim - 1))
        new_view = type(self)(
            conv_state=conv_state,
            ssm_state=jnp.where(moved, ssm_state.astype(m.dtype), self.ssm_state),
            lengths=self.lengths + counts,
            metadata=m,
            layer_index=self.layer_index,
        )
        return step, new_view

    def reset_rows(self, rows: Any) -> _ConvSSMCacheView:
        """A view whose selected rows are empty again (zero states, length 0), so a batch slot
        can take a new sequence. ``rows``: ``[batch]`` bool mask or a sequence of row ids."""
        mask = row_mask(self._owner("reset_rows"), rows, self.metadata.batch_size)
        return type(self)(
            conv_state=jnp.where(mask[:, None, None], 0, self.conv_state),
            ssm_state=_zero_rows(self.ssm_state, mask),
            lengths=jnp.where(mask, 0, self.lengths),
            metadata=self.metadata,
            layer_index=self.layer_index,
        )


def _zero_rows(state: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(mask.reshape((-1,) + (1,) * (state.ndim - 1)), 0, state)


@pytree_dataclass
class MambaCacheView(_ConvSSMCacheView):
    """One Mamba layer's state: ``conv_state: [batch, d_inner, K - 1]``,
    ``ssm_state: [batch, d_inner, state_size]``, ``lengths: [batch]`` (see
    ``_ConvSSMCacheView`` for ``read``, ``concatenate_to_cache`` and ``reset_rows``)."""

    metadata: MambaCacheMetadata = static_field()
    _metadata_type = MambaCacheMetadata


@pytree_dataclass
class Mamba2CacheView(_ConvSSMCacheView):
    """One Mamba2 layer's state: ``conv_state: [batch, d_inner + 2 * n_groups * state_size,
    K - 1]``, ``ssm_state: [batch, num_heads, head_dim, state_size]``, ``lengths: [batch]``
    (see ``_ConvSSMCacheView`` for ``read``, ``concatenate_to_cache`` and ``reset_rows``)."""

    metadata: Mamba2CacheMetadata = static_field()
    _metadata_type = Mamba2CacheMetadata


@pytree_dataclass
class LinearAttentionCacheView(BaseCacheView):
    """One linear-attention layer's state.

    Attributes:
        state: ``[batch, num_heads, key_dim, value_dim]`` in ``metadata.dtype``.
        lengths: ``[batch]`` int32, tokens seen per row.
        metadata: the cache's ``LinearAttentionCacheMetadata`` (static).
        layer_index: which layer this view belongs to (static).
    """

    state: jax.Array
    lengths: jax.Array
    metadata: LinearAttentionCacheMetadata = static_field()
    layer_index: int | None = static_field(None)

    @classmethod
    def init(
        cls, metadata: LinearAttentionCacheMetadata, layer_index: int | None = None
    ) -> LinearAttentionCacheView:
        """An empty view (zero state, all rows of length 0) for ``metadata``."""
        if not isinstance(metadata, LinearAttentionCacheMetadata):
            raise TypeError(
                f"LinearAttentionCacheView.init: metadata must be LinearAttentionCacheMetadata, "
                f"got {type(metadata).__name__}"
            )
        v.require_optional_int(
            "LinearAttentionCacheView.init", "layer_index", layer_index, minimum=0
        )
        return cls(
            state=jnp.zeros(metadata.state_shape, metadata.dtype),
            lengths=jnp.zeros((metadata.batch_size,), jnp.int32),
            metadata=metadata,
            layer_index=layer_index,
        )

    def _owner(self, method: str) -> str:
        return f"LinearAttentionCacheView.{method} (layer {self.layer_index})"

    def read(self, new_tokens: int, runtime: RecurrentMetadata | None = None) -> RecurrentStep:
        """What the layer needs to run ``new_tokens`` (``T``) tokens per row: ``state``
        (float32), ``token_mask`` and ``positions``; ``conv_window`` is ``None``."""
        owner = self._owner("read")
        v.require_int(owner, "new_tokens", new_tokens, minimum=1)
        _check_runtime(owner, runtime, self.metadata.batch_size, new_tokens)
        mask, positions, _ = _layout(self.lengths, runtime, new_tokens)
        return RecurrentStep(self.state.astype(jnp.float32), mask, positions)

    def concatenate_to_cache(
        self,
        state: jax.Array,
        new_tokens: int,
        runtime: RecurrentMetadata | None = None,
    ) -> tuple[RecurrentStep, LinearAttentionCacheView]:
        """Write one step of ``new_tokens`` (``T``) tokens per row.

        Args:
            state: ``[batch, num_heads, key_dim, value_dim]``, any float dtype (cast to
                ``metadata.dtype``): the state after the row's last real token. Rows with no
                real token keep their cached state whatever is passed here.
            new_tokens: ``T``, the tokens per row of this step (padding included).
            runtime: which of the ``T`` tokens per row are real (default: all).

        Returns:
            ``(step, new_view)``: ``step`` is what ``read`` returns (the state before the
            write); ``new_view`` holds ``state`` and ``lengths + real tokens``.
        """
        m = self.metadata
        owner = self._owner("concatenate_to_cache")
        v.check_array(owner, "state", state, m.state_shape)
        _check_float(owner, "state", state)
        step = self.read(new_tokens, runtime)
        counts = jnp.sum(step.token_mask, axis=1, dtype=jnp.int32)
        moved = (counts > 0)[:, None, None, None]
        new_view = LinearAttentionCacheView(
            state=jnp.where(moved, state.astype(m.dtype), self.state),
            lengths=self.lengths + counts,
            metadata=m,
            layer_index=self.layer_index,
        )
        return step, new_view

    def reset_rows(self, rows: Any) -> LinearAttentionCacheView:
        """A view whose selected rows are empty again (zero state, length 0)."""
        mask = row_mask(self._owner("reset_rows"), rows, self.metadata.batch_size)
        return LinearAttentionCacheView(
            state=_zero_rows(self.state, mask),
            lengths=jnp.where(mask, 0, self.lengths),
            metadata=self.metadata,
            layer_index=self.layer_index,
        )


RecurrentCacheView = MambaCacheView | Mamba2CacheView | LinearAttentionCacheView

VIEW_TYPES: dict[type, type] = {
    MambaCacheMetadata: MambaCacheView,
    Mamba2CacheMetadata: Mamba2CacheView,
    LinearAttentionCacheMetadata: LinearAttentionCacheView,
}
"""The view class each recurrent metadata class builds."""


def init_view(metadata: RecurrentCacheMetadata, layer_index: int | None = None) -> Any:
    """An empty view of the family ``metadata`` belongs to."""
    view_type = VIEW_TYPES.get(type(metadata))
    if view_type is None:
        allowed = ", ".join(t.__name__ for t in VIEW_TYPES)
        raise TypeError(
            f"init_view: metadata must be one of {allowed}, got {type(metadata).__name__}"
        )
    return view_type.init(metadata, layer_index)


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


@pytree_dataclass
class RecurrentCache(BaseCache):
    """A recurrent-state cache: one Mamba, Mamba2 or linear-attention view per layer (the family
    follows the metadata's type)."""

    views: tuple[Any, ...]

    @classmethod
    def init_cache(cls, metadata: RecurrentCacheMetadata, *, layers: Any = None) -> RecurrentCache:
        """A cache with an empty view for every layer (or only for the layer ids in ``layers``;
        the others are ``None``)."""
        owner = "RecurrentCache.init_cache"
        if type(metadata) not in VIEW_TYPES:
            allowed = ", ".join(t.__name__ for t in VIEW_TYPES)
            raise TypeError(
                f"{owner}: metadata must be one of {allowed}, got {type(metadata).__name__}"
            )
        wanted = v.require_layers(owner, layers, metadata.num_layers)
        return cls(
            views=tuple(
                init_view(metadata, i) if i in wanted else None for i in range(metadata.num_layers)
            )
        )

    @classmethod
    def init_empty(cls, num_layers: int) -> RecurrentCache:
        """A cache of ``num_layers`` ``None`` views."""
        v.require_int("RecurrentCache.init_empty", "num_layers", num_layers, minimum=1)
        return cls(views=(None,) * num_layers)

    def reset_rows(self, rows: Any) -> RecurrentCache:
        """Empty the selected rows in every layer (see the views' ``reset_rows``)."""
        return self.with_views(
            view if view is None else view.reset_rows(rows) for view in self.views
        )
