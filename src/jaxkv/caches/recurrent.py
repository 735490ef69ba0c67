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

Every view speaks the state-view protocol (``jaxkv.abstracts.StateCacheView``). A layer runs
``T >= 1`` new tokens per row in two calls::

    step = view.read(runtime, T, conv_input)     # conv_input only for Mamba / Mamba2
    ... outputs and each row's state after its last real token, from step ...
    step, view = view.concatenate_to_cache(step, state)

``read`` writes nothing and returns a ``RecurrentStep``: the state to start from, which tokens
are real, their positions and (conv families) the conv window over the previous inputs and the
new ones, together with the conv state after them. ``concatenate_to_cache`` stores that conv
state and the given ``state`` for rows with at least one real token and advances the lengths;
nothing is computed twice. ``RecurrentRuntimeMetadata`` says how many of the ``T`` tokens of each
row are real and on which side the padding is; a padding token never changes a row's state, and
a row with no real token keeps its state exactly.

Rows: every row operation of ``jaxkv.abstracts.RowOperations`` works on views and caches
(``jaxkv.caches.rows.RowView``). ``truncate`` / ``rollback`` need ``rollback_depth=D > 0`` in the
metadata: a row keeps one state, not one per token, so by default an earlier length cannot be
restored. With ``D`` the view also keeps a ring of per-token checkpoints per row --
``state_checkpoints: [batch, D, *state]`` (slot ``p % D`` holds the state *before* the token at
position ``p``, i.e. the state at length ``p``) and for Mamba/Mamba2 ``conv_checkpoints:
[batch, D, conv_dim, K - 1]`` alike -- so a row can go back to any length in
``[rollback_floor, lengths]`` (``rollback_floor >= lengths - D``; it never moves down, since a
truncate does not bring back checkpoints that later writes overwrote). The layer hands the cache
the state after every token (``concatenate_to_cache(step, state, token_states)``); the conv
checkpoints come from the step's conv window. Outside the range ``truncate`` raises
``ValueError`` eagerly; under ``jax.jit`` the row keeps its state and its ``rollback_refused``
flag turns ``True`` (``overflow_rows``/``check_overflow``). Cost: ``D`` copies of a row's states
per layer (``D * state_bytes_per_sequence()`` per sequence, in ``bytes_per_sequence`` and
``bytes_total``) plus 5 bytes per row and layer; with ``D = 0`` none of these arrays exists.

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
    BaseCacheMetadata,
    StateCacheView,
    pytree_dataclass,
    static_field,
)
from jaxkv.caches.rows import (
    LayerCache,
    RaggedRuntimeMetadata,
    RowView,
    check_ragged_runtime,
    rollback_targets,
    token_layout,
    truncate_lengths,
)

# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------


class _StateMetadata(BaseCacheMetadata):
    """What the three recurrent metadata classes share: a constant state per row."""

    @classmethod
    def fill_defaults(cls, fields: dict[str, Any]) -> dict[str, Any]:
        if "dtype" in fields:
            fields["dtype"] = v.require_float_dtype(cls.__name__, "dtype", fields["dtype"])
        return fields

    def _validate_common(self, int_fields: Sequence[str]) -> None:
        owner = type(self).__name__
        for name in ("batch_size", "num_layers", *int_fields):
            v.require_size(owner, name, getattr(self, name))
        v.require_int(owner, "rollback_depth", self.rollback_depth, minimum=0)
        if self.rollback_depth > _MAX_ROLLBACK_DEPTH:
            raise ValueError(
                f"{owner}: rollback_depth must be <= {_MAX_ROLLBACK_DEPTH} (checkpoints are "
                f"kept per token), got {self.rollback_depth}"
            )
        if not isinstance(self.dtype, np.dtype):
            raise TypeError(f"{owner}: dtype must be a numpy dtype, got {self.dtype!r}")
        v.require_float_dtype(owner, "dtype", self.dtype)

    def _state_elements_per_layer(self) -> int:
        raise NotImplementedError

    def state_bytes_per_sequence(self) -> int:
        """Bytes one sequence's states take across all layers (independent of its length)."""
        return self.num_layers * self._state_elements_per_layer() * self.dtype.itemsize

    def checkpoint_bytes_per_sequence(self) -> int:
        """Bytes of one sequence's ``rollback_depth`` state checkpoints across all layers
        (``0`` without rollback)."""
        return self.rollback_depth * self.state_bytes_per_sequence()

    def bytes_per_token(self) -> int:
        """``0``: the state (and its ``rollback_depth`` checkpoints) does not grow with the
        sequence."""
        return 0

    def bytes_per_sequence(self, length: int) -> int:
        """Bytes of one sequence's states whatever its ``length``: the
        ``state_bytes_per_sequence`` plus the ``checkpoint_bytes_per_sequence``."""
        v.require_int(f"{type(self).__name__}.bytes_per_sequence", "length", length, minimum=0)
        return self.state_bytes_per_sequence() + self.checkpoint_bytes_per_sequence()

    def bytes_total(self) -> int:
        """Bytes the whole cache allocates (states, checkpoints, the per-row lengths and, with
        ``rollback_depth``, the per-row floors and flags)."""
        bookkeeping = 4 + (4 + 1 if self.rollback_depth else 0)
        return self.batch_size * (
            self.state_bytes_per_sequence()
            + self.checkpoint_bytes_per_sequence()
            + bookkeeping * self.num_layers
        )


class _ConvStateMetadata(_StateMetadata):
    """Mamba and Mamba2: a conv window of ``conv_kernel - 1`` inputs over ``conv_dim`` channels
    plus an SSM state of ``d_inner * state_size`` per row."""

    @property
    def conv_state_shape(self) -> tuple[int, int, int]:
        """``(batch, conv_dim, conv_kernel - 1)``."""
        return (self.batch_size, self.conv_dim, self.conv_kernel - 1)

    def _state_elements_per_layer(self) -> int:
        return self.conv_dim * (self.conv_kernel - 1) + self.d_inner * self.state_size


_MAX_ROLLBACK_DEPTH = 2**16
"""Most tokens a recurrent row can roll back (each one keeps a copy of the row's states)."""


def _check_conv_kernel(owner: str, conv_kernel: Any) -> None:
    v.require_int(owner, "conv_kernel", conv_kernel, minimum=2)


@pytree_dataclass
class MambaCacheMetadata(_ConvStateMetadata):
    """Static configuration of a Mamba (selective-scan) state cache.

    Attributes:
        batch_size: rows of the cache.
        num_layers: layers (views) in the cache.
        d_inner: channels of the conv and of the SSM (the mixer's expanded width).
        state_size: SSM state per channel (``N``).
        conv_kernel: width ``K`` of the causal depthwise conv (>= 2); ``K - 1`` inputs are kept.
        dtype: storage dtype of both states (float32 by default).
        rollback_depth: how many of its last tokens a row can forget (``truncate`` /
            ``rollback``); that many checkpoints of both states are kept per row. ``0`` (the
            default) keeps none.
    """

    batch_size: int
    num_layers: int
    d_inner: int
    state_size: int
    conv_kernel: int
    dtype: np.dtype = np.dtype(np.float32)
    rollback_depth: int = 0

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
        rollback_depth: int = 0,
    ) -> MambaCacheMetadata:
        """Validated metadata; raises ``ValueError``/``TypeError`` naming the field."""
        return cls._construct(
            dict(
                batch_size=batch_size,
                num_layers=num_layers,
                d_inner=d_inner,
                state_size=state_size,
                conv_kernel=conv_kernel,
                dtype=dtype,
                rollback_depth=rollback_depth,
            )
        )

    def validate(self) -> None:
        self._validate_common(("d_inner", "state_size"))
        _check_conv_kernel(type(self).__name__, self.conv_kernel)

    @property
    def conv_dim(self) -> int:
        """Channels of the conv state."""
        return self.d_inner

    @property
    def ssm_state_shape(self) -> tuple[int, int, int]:
        """``(batch, d_inner, state_size)``."""
        return (self.batch_size, self.d_inner, self.state_size)


@pytree_dataclass
class Mamba2CacheMetadata(_ConvStateMetadata):
    """Static configuration of a Mamba2 (SSD) state cache.

    Attributes:
        batch_size, num_layers: as for ``MambaCacheMetadata``.
        num_heads: SSM heads; ``d_inner = num_heads * head_dim``.
        head_dim: channels per head (``P``).
        state_size: SSM state per channel (``N``).
        n_groups: groups sharing ``B``/``C`` (divides ``num_heads``).
        conv_kernel: width ``K`` of the conv over ``x``, ``B`` and ``C`` (>= 2).
        dtype: storage dtype of both states (float32 by default).
        rollback_depth: as for ``MambaCacheMetadata``.
    """

    batch_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    state_size: int
    n_groups: int
    conv_kernel: int
    dtype: np.dtype = np.dtype(np.float32)
    rollback_depth: int = 0

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
        rollback_depth: int = 0,
    ) -> Mamba2CacheMetadata:
        """Validated metadata; raises ``ValueError``/``TypeError`` naming the field."""
        return cls._construct(
            dict(
                batch_size=batch_size,
                num_layers=num_layers,
                num_heads=num_heads,
                head_dim=head_dim,
                state_size=state_size,
                n_groups=n_groups,
                conv_kernel=conv_kernel,
                dtype=dtype,
                rollback_depth=rollback_depth,
            )
        )

    def validate(self) -> None:
        owner = type(self).__name__
        self._validate_common(("num_heads", "head_dim", "state_size", "n_groups"))
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
    def ssm_state_shape(self) -> tuple[int, int, int, int]:
        """``(batch, num_heads, head_dim, state_size)``."""
        return (self.batch_size, self.num_heads, self.head_dim, self.state_size)


@pytree_dataclass
class LinearAttentionCacheMetadata(_StateMetadata):
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
        rollback_depth: how many of its last tokens a row can forget (``truncate`` /
            ``rollback``); that many checkpoints of the state are kept per row. ``0`` (the
            default) keeps none.
    """

    batch_size: int
    num_layers: int
    num_heads: int
    key_dim: int
    value_dim: int
    decay: tuple[float, ...] | None = None
    dtype: np.dtype = np.dtype(np.float32)
    rollback_depth: int = 0

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
        rollback_depth: int = 0,
    ) -> LinearAttentionCacheMetadata:
        """Validated metadata (``value_dim`` defaults to ``key_dim``; ``decay`` may be any
        sequence or 1-D array of floats). Raises ``ValueError``/``TypeError`` naming the field."""
        owner = "LinearAttentionCacheMetadata.create"
        if decay is not None:
            array = np.asarray(decay)
            if array.ndim != 1 or not np.issubdtype(array.dtype, np.number):
                raise TypeError(f"{owner}: decay must be a sequence of floats, got {decay!r}")
            decay = tuple(float(x) for x in array)
        return cls._construct(
            dict(
                batch_size=batch_size,
                num_layers=num_layers,
                num_heads=num_heads,
                key_dim=key_dim,
                value_dim=key_dim if value_dim is None else value_dim,
                decay=decay,
                dtype=dtype,
                rollback_depth=rollback_depth,
            )
        )

    def validate(self) -> None:
        owner = type(self).__name__
        self._validate_common(("num_heads", "key_dim", "value_dim"))
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

    def _state_elements_per_layer(self) -> int:
        return self.num_heads * self.key_dim * self.value_dim


RecurrentCacheMetadata = MambaCacheMetadata | Mamba2CacheMetadata | LinearAttentionCacheMetadata


# --------------------------------------------------------------------------------------------
# Runtime metadata and what a layer reads
# --------------------------------------------------------------------------------------------


@pytree_dataclass
class RecurrentRuntimeMetadata(RaggedRuntimeMetadata):
    """Runtime metadata of one step of ``T`` tokens through a recurrent cache: which tokens of
    each row are real (see ``jaxkv.caches.rows.RaggedRuntimeMetadata``); a row with 0 keeps its
    state."""


RecurrentMetadata = RecurrentRuntimeMetadata
"""Former name of ``RecurrentRuntimeMetadata``."""


@pytree_dataclass
class RecurrentStep:
    """What a recurrent layer needs to run ``T`` new tokens per row from the cached state, and
    what the view will store once the layer gives it the new state.

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
        conv_state: Mamba/Mamba2 only (else ``None``): ``[batch, conv_dim, K - 1]`` in the
            cache's dtype, the conv state after this step's real inputs (what
            ``concatenate_to_cache`` stores).
    """

    state: jax.Array
    token_mask: jax.Array
    positions: jax.Array
    conv_window: jax.Array | None = None
    conv_state: jax.Array | None = None

    @property
    def counts(self) -> jax.Array:
        """``[batch]`` int32 real tokens per row."""
        return jnp.sum(self.token_mask, axis=1, dtype=jnp.int32)


def _check_float(owner: str, name: str, array: Any) -> None:
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(f"{owner}: {name} must be a float array, got {array.dtype}")


def _layout(
    lengths: jax.Array, runtime: RecurrentRuntimeMetadata | None, new_tokens: int
) -> tuple[jax.Array, jax.Array]:
    """``(token_mask [batch, T], positions [batch, T])`` of one step."""
    _, positions = token_layout(lengths, runtime, new_tokens)
    return positions >= 0, positions


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


class _StateView(RowView, StateCacheView):
    """What every recurrent view shares: the step checks, the write (with its rollback
    checkpoints), ``truncate`` and the row operations."""

    _metadata_type: ClassVar[type] = BaseCacheMetadata  # pinned by each family
    _state_field: ClassVar[str] = "state"
    _conv: ClassVar[bool] = False

    def _state_shape(self) -> tuple[int, ...]:
        return self.metadata.state_shape

    def _empty_fields(self) -> dict[str, Any]:
        fields = {
            self._state_field: 0,
            "lengths": 0,
            "rollback_floor": 0,
            "rollback_refused": False,
        }
        if self._conv:
            fields["conv_state"] = 0
        return fields

    @classmethod
    def _rollback_arrays(cls, metadata: Any, state_shape: tuple[int, ...]) -> dict[str, Any]:
        """The checkpoint fields of an empty view: arrays with ``rollback_depth``, else ``None``
        (no cost)."""
        depth = metadata.rollback_depth
        if not depth:
            fields = {"state_checkpoints": None, "rollback_floor": None, "rollback_refused": None}
            if cls._conv:
                fields["conv_checkpoints"] = None
            return fields
        batch = metadata.batch_size
        fields = {
            "state_checkpoints": jnp.zeros((batch, depth, *state_shape[1:]), metadata.dtype),
            "rollback_floor": jnp.zeros((batch,), jnp.int32),
            "rollback_refused": jnp.zeros((batch,), jnp.bool_),
        }
        if cls._conv:
            conv = metadata.conv_state_shape
            fields["conv_checkpoints"] = jnp.zeros((batch, depth, *conv[1:]), metadata.dtype)
        return fields

    @classmethod
    def _check_init(cls, metadata: Any, layer_index: int | None) -> None:
        if not isinstance(metadata, cls._metadata_type):
            raise TypeError(
                f"{cls.__name__}.init: metadata must be {cls._metadata_type.__name__}, "
                f"got {type(metadata).__name__}"
            )
        v.require_optional_int(f"{cls.__name__}.init", "layer_index", layer_index, minimum=0)

    def _check_read(self, owner: str, runtime: Any, num_tokens: Any, conv_input: Any) -> int:
        m = self.metadata
        if self._conv:
            if conv_input is None:
                raise TypeError(f"{owner}: conv_input is required (the new conv inputs)")
            v.check_array(owner, "conv_input", conv_input, (m.batch_size, None, m.conv_dim))
            _check_float(owner, "conv_input", conv_input)
            if conv_input.shape[1] < 1:
                raise ValueError(f"{owner}: conv_input must hold at least one new token, got T=0")
            if num_tokens is None:
                num_tokens = conv_input.shape[1]
            if conv_input.shape[1] != num_tokens:
                raise ValueError(
                    f"{owner}: conv_input holds {conv_input.shape[1]} tokens per row but "
                    f"num_tokens={num_tokens}"
                )
        elif conv_input is not None:
            raise TypeError(
                f"{owner}: {type(self).__name__} has no conv state: conv_input must "
                f"be None, got {type(conv_input).__name__}"
            )
        v.require_int(owner, "num_tokens", num_tokens, minimum=1)
        check_ragged_runtime(owner, runtime, RecurrentRuntimeMetadata, m.batch_size, num_tokens)
        return num_tokens

    def read(
        self,
        runtime: RecurrentRuntimeMetadata | None = None,
        num_tokens: int | None = None,
        conv_input: jax.Array | None = None,
    ) -> RecurrentStep:
        """What the layer needs to run ``num_tokens`` (``T``) new tokens per row; nothing is
        written.

        Args:
            runtime: which of the ``T`` tokens per row are real (``None``: all).
            num_tokens: ``T`` (taken from ``conv_input`` when omitted).
            conv_input: Mamba/Mamba2: ``[batch, T, conv_dim]``, the new inputs of the causal conv
                (any float); linear attention: ``None``.

        Returns:
            A ``RecurrentStep`` (the state to start from in float32, ``token_mask``,
            ``positions``; conv families also ``conv_window`` and the ``conv_state`` to store).
        """
        owner = self._owner("read")
        num_tokens = self._check_read(owner, runtime, num_tokens, conv_input)
        mask, positions = _layout(self.lengths, runtime, num_tokens)
        state = getattr(self, self._state_field).astype(jnp.float32)
        if not self._conv:
            return RecurrentStep(state, mask, positions)
        side = "right" if runtime is None else runtime.padding_side
        counts = jnp.sum(mask, axis=1, dtype=jnp.int32)
        window, conv_state = shift_conv_window(self.conv_state, conv_input, counts, side)
        return RecurrentStep(state, mask, positions, window, conv_state)

    def concatenate_to_cache(
        self, step: RecurrentStep, state: jax.Array, token_states: jax.Array | None = None
    ) -> tuple[RecurrentStep, Any]:
        """Store one step of ``T`` tokens per row.

        Args:
            step: what ``read`` returned for this step (its ``conv_state`` is stored as is).
            state: the state after each row's last real token, in the shape of the view's state
                field, any float dtype (cast to ``metadata.dtype``). Rows with no real token keep
                their cached state whatever is passed here.
            token_states: with ``rollback_depth > 0`` (required then; ignored otherwise): the
                state after *each* of the ``T`` tokens, ``[batch, T, *state shape without the
                batch]``, any float dtype; entries at padding tokens are ignored. The view keeps
                the states before each row's last ``rollback_depth`` real tokens as
                checkpoints (and, for Mamba/Mamba2, the conv states from the step's window).

        Returns:
            ``(step, new_view)``: the same ``step``, and the view holding the new states and
            ``lengths + real tokens``. ``self`` is unchanged.

        Raises:
            ValueError/TypeError: a step or state whose shape or dtype does not fit the view, or
                ``token_states`` missing with ``rollback_depth > 0``.
        """
        m = self.metadata
        owner = self._owner("concatenate_to_cache")
        if not isinstance(step, RecurrentStep):
            raise TypeError(
                f"{owner}: step must be the RecurrentStep that read() returned, "
                f"got {type(step).__name__}"
            )
        v.check_array(owner, "step.token_mask", step.token_mask, (m.batch_size, None))
        v.check_array(owner, self._state_field, state, self._state_shape())
        _check_float(owner, self._state_field, state)
        moved = step.counts > 0
        cached = getattr(self, self._state_field)
        new_lengths = self.lengths + step.counts
        fields = {
            self._state_field: jnp.where(
                moved.reshape((-1,) + (1,) * (cached.ndim - 1)), state.astype(m.dtype), cached
            ),
            "lengths": new_lengths,
        }
        if self._conv:
            if step.conv_state is None:
                raise ValueError(f"{owner}: step has no conv_state; pass what read() returned")
            v.check_array(owner, "step.conv_state", step.conv_state, m.conv_state_shape)
            fields["conv_state"] = step.conv_state.astype(m.dtype)
        if m.rollback_depth:
            fields.update(self._checkpoint(owner, step, token_states, new_lengths))
        return step, self._with_rows(fields, m.batch_size)

    def _checkpoint(
        self,
        owner: str,
        step: RecurrentStep,
        token_states: Any,
        new_lengths: jax.Array,
    ) -> dict[str, jax.Array]:
        """The checkpoint fields after a step: the state (and conv state) *before* each of a
        row's last ``rollback_depth`` real tokens, at slot ``position % rollback_depth`` (only
        those ``rollback_depth`` are gathered: the cost does not grow with ``T``)."""
        m = self.metadata
        depth = m.rollback_depth
        new_tokens = step.token_mask.shape[1]
        if token_states is None:
            raise ValueError(
                f"{owner}: rollback_depth={depth} keeps per-token checkpoints, so token_states "
                f"(the state after each of the T tokens, [batch, T, ...]) is required"
            )
        shape = self._state_shape()
        v.check_array(owner, "token_states", token_states, (shape[0], new_tokens, *shape[1:]))
        _check_float(owner, "token_states", token_states)
        cached = getattr(self, self._state_field)
        real = step.token_mask
        counts = step.counts
        # A row's real tokens are contiguous from its first one (either padding side). The
        # last `depth` of them have ranks counts - depth + j (j < depth; negative: none).
        first = jnp.argmax(real, axis=1).astype(jnp.int32)  # [batch]
        rank = counts[:, None] - depth + jnp.arange(depth, dtype=jnp.int32)[None, :]
        token = first[:, None] + rank  # [batch, depth] index into the T tokens
        # The state before a token: the cached one before a row's first real token, else the
        # state after the token before it.
        previous = jnp.clip(token - 1, 0, new_tokens - 1)
        after_previous = jnp.take_along_axis(
            token_states, previous.reshape(previous.shape + (1,) * (cached.ndim - 1)), axis=1
        ).astype(m.dtype)
        at_start = (rank == 0).reshape(rank.shape + (1,) * (cached.ndim - 1))
        before = jnp.where(at_start, cached[:, None], after_previous)  # [batch, depth, ...]
        slots = jnp.where(rank >= 0, (self.lengths[:, None] + rank) % depth, depth)
        rows = jnp.broadcast_to(jnp.arange(m.batch_size)[:, None], slots.shape)
        fields = {
            "state_checkpoints": self.state_checkpoints.at[rows, slots].set(before, mode="drop"),
            # Checkpoints of lengths before new_lengths - depth were overwritten.
            "rollback_floor": jnp.maximum(self.rollback_floor, new_lengths - depth),
        }
        if self._conv:
            # Conv state before a token t: the K - 1 inputs before it, window[t : t + K - 1].
            window = step.conv_window  # [batch, K - 1 + T, conv_dim]
            taps = jnp.arange(m.conv_kernel - 1, dtype=jnp.int32)
            index = jnp.clip(token, 0, new_tokens - 1)[:, :, None] + taps  # [batch, depth, K-1]
            conv_before = jnp.take_along_axis(
                window, index.reshape(m.batch_size, -1)[:, :, None], axis=1
            ).reshape(m.batch_size, depth, m.conv_kernel - 1, -1)
            fields["conv_checkpoints"] = self.conv_checkpoints.at[rows, slots].set(
                jnp.swapaxes(conv_before, -1, -2).astype(m.dtype), mode="drop"
            )
        return fields

    def truncate(self, lengths: Any) -> Any:
        """A view whose rows go back to their first ``lengths[b]`` tokens (``lengths: [batch]``
        ints), restoring the states saved at those lengths.

        Each row takes any length in ``[rollback_floor, current length]`` (``rollback_floor`` is
        at least ``current - rollback_depth``). Under ``jit`` a row given a length out of its
        range keeps its state and its ``rollback_refused`` flag is set.

        Raises:
            UnsupportedOperationError: ``rollback_depth=0`` (no checkpoints are kept).
            ValueError: (eager calls only) a length out of its row's range; nothing changes.
        """
        owner = self._owner("truncate")
        m = self.metadata
        if not m.rollback_depth:
            raise self._unsupported(
                "truncate",
                "a row keeps one recurrent state, not one per token, so the state at an earlier "
                "length is gone; create the cache with rollback_depth=D to keep per-token "
                "checkpoints of the last D tokens (reset_rows empties a row instead)",
            )
        lengths = truncate_lengths(owner, lengths, m.batch_size)
        targets, ok = rollback_targets(
            owner,
            lengths,
            self.rollback_floor,
            self.lengths,
            limit=f" (rollback_depth={m.rollback_depth}: at most that many tokens back, and not "
            f"past the checkpoints later writes overwrote)",
        )
        back = targets != self.lengths
        slots = targets % m.rollback_depth
        rows = jnp.arange(m.batch_size)

        def restore(current: jax.Array, checkpoints: jax.Array) -> jax.Array:
            saved = checkpoints[rows, slots]
            return jnp.where(back.reshape((-1,) + (1,) * (current.ndim - 1)), saved, current)

        fields = {
            self._state_field: restore(getattr(self, self._state_field), self.state_checkpoints),
            "lengths": targets,
            "rollback_refused": self.rollback_refused | ~ok,
        }
        if self._conv:
            fields["conv_state"] = restore(self.conv_state, self.conv_checkpoints)
        return self._with_rows(fields, m.batch_size)

    def _overflow_limit(self) -> str:
        return f"rollback_depth={self.metadata.rollback_depth}"


@pytree_dataclass
class _ConvSSMCacheView(_StateView):
    """A conv window plus an SSM state per row: the shared implementation of the Mamba and
    Mamba2 views (which only pin the metadata type).

    Attributes:
        conv_state: ``[batch, conv_dim, K - 1]`` in ``metadata.dtype``, the last ``K - 1`` real
            conv inputs (oldest first; zeros before the sequence starts).
        ssm_state: ``metadata.ssm_state_shape`` in ``metadata.dtype``.
        lengths: ``[batch]`` int32, tokens seen per row (its sequence offset).
        metadata: the cache's metadata (static).
        layer_index: which layer this view belongs to (static).
        state_checkpoints: with ``rollback_depth = D > 0`` (else ``None``): ``[batch, D,
            *ssm_state.shape[1:]]``, slot ``p % D`` the SSM state at length ``p``.
        conv_checkpoints: likewise ``[batch, D, conv_dim, K - 1]``, the conv states.
        rollback_floor: with ``D > 0``: ``[batch]`` int32, the shortest length each row can
            still be truncated to.
        rollback_refused: with ``D > 0``: ``[batch]`` bool, sticky: a truncate under ``jit``
            went past ``rollback_floor`` and was refused.
    """

    conv_state: jax.Array
    ssm_state: jax.Array
    lengths: jax.Array
    metadata: Any = static_field()
    layer_index: int | None = static_field(None)
    state_checkpoints: jax.Array | None = None
    conv_checkpoints: jax.Array | None = None
    rollback_floor: jax.Array | None = None
    rollback_refused: jax.Array | None = None

    _state_field = "ssm_state"
    _conv = True

    def _state_shape(self) -> tuple[int, ...]:
        return self.metadata.ssm_state_shape

    @classmethod
    def init(cls, metadata: Any, layer_index: int | None = None) -> _ConvSSMCacheView:
        """An empty view (zero states, all rows of length 0) for ``metadata``."""
        cls._check_init(metadata, layer_index)
        m = metadata
        return cls(
            conv_state=jnp.zeros(m.conv_state_shape, m.dtype),
            ssm_state=jnp.zeros(m.ssm_state_shape, m.dtype),
            lengths=jnp.zeros((m.batch_size,), jnp.int32),
            metadata=m,
            layer_index=layer_index,
            **cls._rollback_arrays(m, m.ssm_state_shape),
        )


@pytree_dataclass
class MambaCacheView(_ConvSSMCacheView):
    """One Mamba layer's state: ``conv_state: [batch, d_inner, K - 1]``,
    ``ssm_state: [batch, d_inner, state_size]``, ``lengths: [batch]`` (see
    ``_ConvSSMCacheView`` and ``_StateView`` for ``read``, ``concatenate_to_cache`` and the row
    operations)."""

    metadata: MambaCacheMetadata = static_field()
    _metadata_type = MambaCacheMetadata
    family = "Mamba"


@pytree_dataclass
class Mamba2CacheView(_ConvSSMCacheView):
    """One Mamba2 layer's state: ``conv_state: [batch, d_inner + 2 * n_groups * state_size,
    K - 1]``, ``ssm_state: [batch, num_heads, head_dim, state_size]``, ``lengths: [batch]``
    (see ``_ConvSSMCacheView`` and ``_StateView``)."""

    metadata: Mamba2CacheMetadata = static_field()
    _metadata_type = Mamba2CacheMetadata
    family = "Mamba2"


@pytree_dataclass
class LinearAttentionCacheView(_StateView):
    """One linear-attention layer's state.

    Attributes:
        state: ``[batch, num_heads, key_dim, value_dim]`` in ``metadata.dtype``.
        lengths: ``[batch]`` int32, tokens seen per row.
        metadata: the cache's ``LinearAttentionCacheMetadata`` (static).
        layer_index: which layer this view belongs to (static).
        state_checkpoints: with ``rollback_depth = D > 0`` (else ``None``): ``[batch, D,
            num_heads, key_dim, value_dim]``, slot ``p % D`` the state at length ``p``.
        rollback_floor: with ``D > 0``: ``[batch]`` int32, the shortest length each row can
            still be truncated to.
        rollback_refused: with ``D > 0``: ``[batch]`` bool, sticky: a truncate under ``jit``
            went past ``rollback_floor`` and was refused.
    """

    state: jax.Array
    lengths: jax.Array
    metadata: LinearAttentionCacheMetadata = static_field()
    layer_index: int | None = static_field(None)
    state_checkpoints: jax.Array | None = None
    rollback_floor: jax.Array | None = None
    rollback_refused: jax.Array | None = None

    _metadata_type = LinearAttentionCacheMetadata
    family = "linear-attention"

    @classmethod
    def init(
        cls, metadata: LinearAttentionCacheMetadata, layer_index: int | None = None
    ) -> LinearAttentionCacheView:
        """An empty view (zero state, all rows of length 0) for ``metadata``."""
        cls._check_init(metadata, layer_index)
        return cls(
            state=jnp.zeros(metadata.state_shape, metadata.dtype),
            lengths=jnp.zeros((metadata.batch_size,), jnp.int32),
            metadata=metadata,
            layer_index=layer_index,
            **cls._rollback_arrays(metadata, metadata.state_shape),
        )


RecurrentCacheView = MambaCacheView | Mamba2CacheView | LinearAttentionCacheView

MambaCacheMetadata.view_type = MambaCacheView
Mamba2CacheMetadata.view_type = Mamba2CacheView
LinearAttentionCacheMetadata.view_type = LinearAttentionCacheView

VIEW_TYPES: dict[type, type] = {
    MambaCacheMetadata: MambaCacheView,
    Mamba2CacheMetadata: Mamba2CacheView,
    LinearAttentionCacheMetadata: LinearAttentionCacheView,
}
"""The view class each recurrent metadata class builds (also its ``view_type``)."""


def init_view(metadata: RecurrentCacheMetadata, layer_index: int | None = None) -> Any:
    """An empty view of the family ``metadata`` belongs to."""
    if type(metadata) not in VIEW_TYPES:
        allowed = ", ".join(t.__name__ for t in VIEW_TYPES)
        raise TypeError(
            f"init_view: metadata must be one of {allowed}, got {type(metadata).__name__}"
        )
    return metadata.view_type.init(metadata, layer_index)


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


@pytree_dataclass
class RecurrentCache(LayerCache):
    """A recurrent-state cache: one Mamba, Mamba2 or linear-attention view per layer (the family
    follows the metadata's type)."""

    views: tuple[Any, ...]

    metadata_types = tuple(VIEW_TYPES)
