"""A reference Mamba (selective state-space) mixer with random weights, written against
``jaxkv.caches.recurrent.MambaCacheView``.

Per token ``t`` and channel ``d`` of the expanded width ``d_inner``::

    x, z      = in_proj(u)                               # [d_inner] each
    x         = silu(causal_depthwise_conv(x))           # kernel K over the last K inputs
    dt, B, C  = x_proj(x)                                # [dt_rank], [N], [N]
    dt        = softplus(dt_proj(dt) + dt_bias)          # [d_inner]
    h[d, :]   = exp(dt[d] * A[d, :]) * h[d, :] + dt[d] * x[d] * B      # A = -exp(A_log)
    y[d]      = h[d, :] . C + D[d] * x[d]
    out       = out_proj(y * silu(z))

``mamba_forward`` runs whole sequences from a zero state (a ``lax.scan`` over time, the conv
by zero padding); ``mamba_cached`` runs a chunk of ``T >= 1`` tokens per row through a cache view,
taking the conv window and SSM state from it and writing the new ones back. The causal conv
helpers here are shared with ``jaxkv.models.mamba2``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxkv import _validation as v
from jaxkv.caches.recurrent import (
    MambaCacheMetadata,
    MambaCacheView,
    RecurrentRuntimeMetadata,
)


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    """Sizes of one Mamba mixer.

    Attributes:
        hidden_size: width of the residual stream.
        d_inner: expanded width (usually ``2 * hidden_size``).
        state_size: SSM state per channel (``N``).
        conv_kernel: width ``K`` of the causal depthwise conv (>= 2).
        dt_rank: rank of the ``dt`` projection (default ``ceil(hidden_size / 16)``).
    """

    hidden_size: int
    d_inner: int
    state_size: int = 16
    conv_kernel: int = 4
    dt_rank: int | None = None

    def __post_init__(self) -> None:
        for name in ("hidden_size", "d_inner", "state_size"):
            v.require_int("MambaConfig", name, getattr(self, name), minimum=1)
        v.require_int("MambaConfig", "conv_kernel", self.conv_kernel, minimum=2)
        v.require_optional_int("MambaConfig", "dt_rank", self.dt_rank, minimum=1)
        if self.dt_rank is None:
            object.__setattr__(self, "dt_rank", math.ceil(self.hidden_size / 16))

    def cache_metadata(
        self,
        batch_size: int,
        num_layers: int = 1,
        *,
        dtype: Any = jnp.float32,
        rollback_depth: int = 0,
    ) -> MambaCacheMetadata:
        """The cache metadata matching this mixer (``rollback_depth``: tokens a row can roll
        back, see ``jaxkv.caches.recurrent``)."""
        return MambaCacheMetadata.create(
            batch_size,
            num_layers,
            self.d_inner,
            self.state_size,
            self.conv_kernel,
            dtype=dtype,
            rollback_depth=rollback_depth,
        )


def draw_uniform(key: jax.Array, shapes: dict[str, tuple[int, ...]]) -> dict[str, jax.Array]:
    """One float32 array per name, uniform in ``[0, 1)``, all cut from a single random draw (one
    random op compiles far faster on CPU than one per weight)."""
    sizes = [math.prod(shape) for shape in shapes.values()]
    flat = jax.random.uniform(key, (sum(sizes),), jnp.float32)
    pieces = jnp.split(flat, list(itertools.accumulate(sizes))[:-1])
    return {
        name: piece.reshape(shape)
        for (name, shape), piece in zip(shapes.items(), pieces, strict=True)
    }


def centered(uniform: jax.Array, std: float) -> jax.Array:
    """Uniform ``[0, 1)`` values -> zero-mean values of standard deviation ``std``."""
    return (2.0 * uniform - 1.0) * (math.sqrt(3.0) * std)


def dense_init(uniform: jax.Array) -> jax.Array:
    """``[fan_in, fan_out]`` weights of variance ``1 / fan_in`` from uniform ``[0, 1)`` values."""
    return centered(uniform, 1.0 / math.sqrt(uniform.shape[0]))


def dt_bias_init(uniform: jax.Array, low: float = 1e-3, high: float = 1e-1) -> jax.Array:
    """Biases whose softplus is log-uniform in ``[low, high]`` (Mamba's dt init), from uniform
    ``[0, 1)`` values."""
    dt = jnp.exp(math.log(low) + uniform * (math.log(high) - math.log(low)))
    return dt + jnp.log(-jnp.expm1(-dt))  # inverse of softplus


def init_mamba(key: jax.Array, config: MambaConfig) -> dict[str, jax.Array]:
    """Random float32 weights of one Mamba mixer.

    Returns a dict: ``in_proj [hidden, 2 * d_inner]``, ``conv_weight [d_inner, K]``,
    ``conv_bias [d_inner]``, ``x_proj [d_inner, dt_rank + 2 * N]``, ``dt_proj [dt_rank, d_inner]``,
    ``dt_bias [d_inner]``, ``A_log [d_inner, N]``, ``D [d_inner]``, ``out_proj [d_inner, hidden]``.
    """
    if not isinstance(config, MambaConfig):
        raise TypeError(f"init_mamba: config must be MambaConfig, got {type(config).__name__}")
    c = config
    n = c.state_size
    u = draw_uniform(
        key,
        {
            "in_proj": (c.hidden_size, 2 * c.d_inner),
            "conv_weight": (c.d_inner, c.conv_kernel),
            "conv_bias": (c.d_inner,),
            "x_proj": (c.d_inner, c.dt_rank + 2 * n),
            "dt_proj": (c.dt_rank, c.d_inner),
            "dt_bias": (c.d_inner,),
            "out_proj": (c.d_inner, c.hidden_size),
        },
    )
    return {
        "in_proj": dense_init(u["in_proj"]),
        "conv_weight": centered(u["conv_weight"], 1.0 / c.conv_kernel),
        "conv_bias": centered(u["conv_bias"], 0.1),
        "x_proj": dense_init(u["x_proj"]),
        "dt_proj": dense_init(u["dt_proj"]),
        "dt_bias": dt_bias_init(u["dt_bias"]),
        "A_log": jnp.log(jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (c.d_inner, n))),
        "D": jnp.ones((c.d_inner,), jnp.float32),
        "out_proj": dense_init(u["out_proj"]),
    }


# --------------------------------------------------------------------------------------------
# Causal depthwise conv (shared with Mamba2)
# --------------------------------------------------------------------------------------------


def causal_conv(inputs: jax.Array, weight: jax.Array, bias: jax.Array) -> jax.Array:
    """Causal depthwise conv of whole sequences from a zero history.

    Args:
        inputs: ``[batch, L, channels]``.
        weight: ``[channels, K]``; tap ``K - 1`` multiplies the current input.
        bias: ``[channels]``.

    Returns:
        ``[batch, L, channels]``.
    """
    channels, kernel = weight.shape
    padded = jnp.pad(inputs, ((0, 0), (kernel - 1, 0), (0, 0)))
    out = lax.conv_general_dilated(
        padded,
        weight.T[:, None, :].astype(inputs.dtype),  # [K, 1, channels]
        window_strides=(1,),
        padding="VALID",
        dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=channels,
    )
    return out + bias


def windowed_conv(window: jax.Array, weight: jax.Array, bias: jax.Array) -> jax.Array:
    """The same conv over a cache's conv window (``RecurrentStep.conv_window``).

    Args:
        window: ``[batch, K - 1 + T, channels]``.
        weight: ``[channels, K]``; bias: ``[channels]``.

    Returns:
        ``[batch, T, channels]``: output ``t`` is ``sum_j window[:, t + j] * weight[:, j]``.
    """
    kernel = weight.shape[1]
    new_tokens = window.shape[1] - (kernel - 1)
    taps = [window[:, j : j + new_tokens] * weight[:, j] for j in range(kernel)]
    return sum(taps[1:], taps[0]) + bias


# --------------------------------------------------------------------------------------------
# The mixer
# --------------------------------------------------------------------------------------------


def check_hidden(owner: str, hidden: Any, hidden_size: int) -> None:
    v.check_array(owner, "hidden", hidden, (None, None, hidden_size))
    if not jnp.issubdtype(hidden.dtype, jnp.floating):
        raise TypeError(f"{owner}: hidden must be a float array, got {hidden.dtype}")
    if hidden.shape[1] < 1:
        raise ValueError(f"{owner}: hidden must hold at least one token, got T=0")


def selective_scan(
    x: jax.Array,
    dt: jax.Array,
    b: jax.Array,
    c: jax.Array,
    a: jax.Array,
    d: jax.Array,
    state: jax.Array,
    mask: jax.Array,
    *,
    token_states: bool = False,
) -> tuple[jax.Array, ...]:
    """Mamba's selective scan, one token at a time.

    Args:
        x, dt: ``[batch, T, d_inner]``; b, c: ``[batch, T, N]``; a: ``[d_inner, N]`` (negative);
        d: ``[d_inner]``; state: ``[batch, d_inner, N]``; mask: ``[batch, T]`` bool, the state
        stays put where ``False``.
        token_states: also return the state after every token (for a cache that keeps
            rollback checkpoints).

    Returns:
        ``y: [batch, T, d_inner]`` and the final state ``[batch, d_inner, N]``; with
        ``token_states`` also ``[batch, T, d_inner, N]``, the state after each token.
    """

    def step(h, inputs):
        x_t, dt_t, b_t, c_t, real = inputs
        advanced = jnp.exp(dt_t[..., None] * a) * h + (dt_t * x_t)[..., None] * b_t[:, None, :]
        h = jnp.where(real[:, None, None], advanced, h)
        y_t = jnp.einsum("bdn,bn->bd", h, c_t) + d * x_t
        return h, (y_t, h) if token_states else y_t

    time_major = [jnp.swapaxes(t, 0, 1) for t in (x, dt, b, c, mask)]
    state, outputs = lax.scan(step, state, time_major)
    if not token_states:
        return jnp.swapaxes(outputs, 0, 1), state
    y, states = outputs
    return jnp.swapaxes(y, 0, 1), state, jnp.swapaxes(states, 0, 1)


def _mixer_inputs(params: dict[str, jax.Array], config: MambaConfig, hidden: jax.Array):
    projected = hidden @ params["in_proj"]
    return jnp.split(projected, 2, axis=-1)  # x, z: [batch, T, d_inner]


def _ssm(params, config, x, state, mask, token_states=False):
    """``x``: conv output after silu ``[batch, T, d_inner]`` -> ``(y, final state)`` (and the
    per-token states with ``token_states``)."""
    n, rank = config.state_size, config.dt_rank
    dt, b, c = jnp.split(x @ params["x_proj"], [rank, rank + n], axis=-1)
    dt = jax.nn.softplus(dt @ params["dt_proj"] + params["dt_bias"])
    a = -jnp.exp(params["A_log"])
    return selective_scan(x, dt, b, c, a, params["D"], state, mask, token_states=token_states)


def mamba_forward(
    params: dict[str, jax.Array], config: MambaConfig, hidden: jax.Array
) -> jax.Array:
    """Whole sequences from a zero state, no cache.

    Args:
        hidden: ``[batch, L, hidden_size]`` float32, every token real.

    Returns:
        ``[batch, L, hidden_size]``.
    """
    check_hidden("mamba_forward", hidden, config.hidden_size)
    batch, length, _ = hidden.shape
    x, z = _mixer_inputs(params, config, hidden)
    x = jax.nn.silu(causal_conv(x, params["conv_weight"], params["conv_bias"]))
    state = jnp.zeros((batch, config.d_inner, config.state_size), jnp.float32)
    y, _ = _ssm(params, config, x, state, jnp.ones((batch, length), jnp.bool_))
    return (y * jax.nn.silu(z)) @ params["out_proj"]


def mamba_cached(
    params: dict[str, jax.Array],
    config: MambaConfig,
    hidden: jax.Array,
    view: MambaCacheView,
    runtime: RecurrentRuntimeMetadata | None = None,
) -> tuple[jax.Array, MambaCacheView]:
    """A chunk of ``T >= 1`` tokens per row through ``view``.

    Args:
        hidden: ``[batch, T, hidden_size]``; padding tokens (per ``runtime``) may hold anything.
        view: this layer's ``MambaCacheView`` (its metadata must match ``config``).
        runtime: which tokens are real (default: all).

    Returns:
        ``(out, new_view)``: ``out: [batch, T, hidden_size]`` (zeros at padding tokens). With the
        view's ``rollback_depth > 0`` the scan also hands the cache the state after every token
        (its rollback checkpoints).
    """
    owner = "mamba_cached"
    check_hidden(owner, hidden, config.hidden_size)
    check_layer_view(owner, view, config.cache_metadata(view.metadata.batch_size))
    x_in, z = _mixer_inputs(params, config, hidden)
    step = view.read(runtime, hidden.shape[1], x_in)
    x = jax.nn.silu(windowed_conv(step.conv_window, params["conv_weight"], params["conv_bias"]))
    if view.metadata.rollback_depth:
        y, state, token_states = _ssm(params, config, x, step.state, step.token_mask, True)
        step, view = view.concatenate_to_cache(step, state, token_states)
    else:
        y, state = _ssm(params, config, x, step.state, step.token_mask)
        step, view = view.concatenate_to_cache(step, state)
    out = (y * jax.nn.silu(z)) @ params["out_proj"]
    return jnp.where(step.token_mask[..., None], out, 0), view


def check_layer_view(owner: str, view: Any, expected: Any) -> None:
    """``view``'s metadata has the sizes of ``expected`` (any layers, any dtype, any
    ``rollback_depth``): the view is a state view of the layer's family and shape (checked by its
    metadata, not its class)."""
    metadata = getattr(view, "metadata", None)
    if type(metadata) is not type(expected):
        raise TypeError(
            f"{owner}: view must be {expected.view_type.__name__}, got {type(view).__name__}"
        )
    got = metadata.replace(
        num_layers=expected.num_layers,
        dtype=expected.dtype,
        rollback_depth=expected.rollback_depth,
    )
    if got != expected:
        raise ValueError(
            f"{owner}: the view's metadata {view.metadata} does not match the layer's sizes "
            f"{expected}"
        )
