"""A reference Mamba2 (SSD) mixer with random weights, written against
``jaxkv.caches.recurrent.Mamba2CacheView``.

Per token, with ``H`` heads of ``P`` channels, ``G`` groups sharing ``B``/``C`` and a scalar
``A[h] = -exp(A_log[h])`` per head::

    z, xBC, dt = in_proj(u)                    # [H*P], [H*P + 2*G*N], [H]
    x, B, C    = split(silu(causal_depthwise_conv(xBC)))
    dt         = softplus(dt + dt_bias)        # [H]
    h[h]       = exp(dt[h] * A[h]) * h[h] + dt[h] * x[h]^T B[g(h)]     # [P, N]
    y[h]       = h[h] C[g(h)] + D[h] * x[h]
    out        = out_proj(rms_norm(y * silu(z)))   (gated RMSNorm; or y * silu(z) without it)

This is the decayed linear recurrence of ``jaxkv.models.linear_attention`` with ``q = C``,
``k = B``, ``v = dt * x`` and log-decay ``dt * A``: ``mamba2_forward`` runs it token by token
(``lax.scan``) from a zero state; ``mamba2_cached`` runs a chunk of ``T >= 1`` tokens through a
cache view with the block-parallel SSD form.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxkv import _validation as v
from jaxkv.caches.recurrent import Mamba2CacheMetadata, Mamba2CacheView, RecurrentRuntimeMetadata
from jaxkv.models.linear_attention import chunked_recurrence, rms_norm, scan_recurrence
from jaxkv.models.mamba import (
    causal_conv,
    centered,
    check_hidden,
    check_layer_view,
    dense_init,
    draw_uniform,
    dt_bias_init,
    windowed_conv,
)


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
    """Sizes of one Mamba2 mixer.

    Attributes:
        hidden_size: width of the residual stream.
        num_heads, head_dim: SSM heads and channels per head (``d_inner = num_heads * head_dim``).
        state_size: SSM state per channel (``N``).
        n_groups: groups sharing ``B``/``C``; divides ``num_heads``.
        conv_kernel: width ``K`` of the causal conv over ``x``, ``B`` and ``C`` (>= 2).
        gated_norm: gated RMSNorm (``rms_norm(y * silu(z))``) before ``out_proj``.
        norm_eps: epsilon of that norm.
        block_size: tokens per block of the cached (SSD) form.
    """

    hidden_size: int
    num_heads: int
    head_dim: int
    state_size: int = 16
    n_groups: int = 1
    conv_kernel: int = 4
    gated_norm: bool = True
    norm_eps: float = 1e-5
    block_size: int = 64

    def __post_init__(self) -> None:
        owner = "Mamba2Config"
        for name in ("hidden_size", "num_heads", "head_dim", "state_size", "n_groups"):
            v.require_int(owner, name, getattr(self, name), minimum=1)
        v.require_int(owner, "conv_kernel", self.conv_kernel, minimum=2)
        v.require_int(owner, "block_size", self.block_size, minimum=1)
        if self.num_heads % self.n_groups:
            raise ValueError(
                f"{owner}: n_groups={self.n_groups} must divide num_heads={self.num_heads}"
            )
        if not isinstance(self.norm_eps, float) or not self.norm_eps > 0:
            raise ValueError(f"{owner}: norm_eps must be a float > 0, got {self.norm_eps!r}")

    @property
    def d_inner(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.state_size

    def cache_metadata(
        self,
        batch_size: int,
        num_layers: int = 1,
        *,
        dtype: Any = jnp.float32,
        rollback_depth: int = 0,
    ) -> Mamba2CacheMetadata:
        """The cache metadata matching this mixer (``rollback_depth``: tokens a row can roll
        back, see ``jaxkv.caches.recurrent``)."""
        return Mamba2CacheMetadata.create(
            batch_size,
            num_layers,
            self.num_heads,
            self.head_dim,
            self.state_size,
            self.n_groups,
            self.conv_kernel,
            dtype=dtype,
            rollback_depth=rollback_depth,
        )


def init_mamba2(key: jax.Array, config: Mamba2Config) -> dict[str, jax.Array]:
    """Random float32 weights of one Mamba2 mixer.

    Returns a dict: ``in_proj [hidden, 2 * d_inner + 2 * G * N + H]``, ``conv_weight
    [conv_dim, K]``, ``conv_bias [conv_dim]``, ``dt_bias [H]``, ``A_log [H]``, ``D [H]``,
    ``norm_weight [d_inner]``, ``out_proj [d_inner, hidden]``.
    """
    if not isinstance(config, Mamba2Config):
        raise TypeError(f"init_mamba2: config must be Mamba2Config, got {type(config).__name__}")
    c = config
    projected = 2 * c.d_inner + 2 * c.n_groups * c.state_size + c.num_heads
    u = draw_uniform(
        key,
        {
            "in_proj": (c.hidden_size, projected),
            "conv_weight": (c.conv_dim, c.conv_kernel),
            "conv_bias": (c.conv_dim,),
            "dt_bias": (c.num_heads,),
            "A": (c.num_heads,),
            "D": (c.num_heads,),
            "norm_weight": (c.d_inner,),
            "out_proj": (c.d_inner, c.hidden_size),
        },
    )
    return {
        "in_proj": dense_init(u["in_proj"]),
        "conv_weight": centered(u["conv_weight"], 1.0 / c.conv_kernel),
        "conv_bias": centered(u["conv_bias"], 0.1),
        "dt_bias": dt_bias_init(u["dt_bias"]),
        "A_log": jnp.log(1.0 + 15.0 * u["A"]),  # A in [-16, -1)
        "D": 1.0 + centered(u["D"], 0.1),
        "norm_weight": 1.0 + centered(u["norm_weight"], 0.1),
        "out_proj": dense_init(u["out_proj"]) * math.sqrt(0.5),
    }


def _split_projection(params, config, hidden):
    """-> ``z [batch, T, d_inner]``, ``xbc [batch, T, conv_dim]``, ``dt [batch, T, H]``."""
    c = config
    projected = hidden @ params["in_proj"]
    return jnp.split(projected, [c.d_inner, c.d_inner + c.conv_dim], axis=-1)


def _recurrence_inputs(params, config, xbc, dt):
    """Conv output (after silu) and raw ``dt`` -> ``q, k, v, log_decay, x`` of the recurrence
    (``q = C``, ``k = B`` per head, ``v = dt * x``, ``log_decay = dt * A``)."""
    c = config
    batch, length, _ = xbc.shape
    x, b, cc = jnp.split(xbc, [c.d_inner, c.d_inner + c.n_groups * c.state_size], axis=-1)
    x = x.reshape(batch, length, c.num_heads, c.head_dim)
    heads_per_group = c.num_heads // c.n_groups
    b = jnp.repeat(b.reshape(batch, length, c.n_groups, c.state_size), heads_per_group, axis=2)
    cc = jnp.repeat(cc.reshape(batch, length, c.n_groups, c.state_size), heads_per_group, axis=2)
    dt = jax.nn.softplus(dt + params["dt_bias"])  # [batch, T, H]
    log_decay = dt * -jnp.exp(params["A_log"])
    return cc, b, dt[..., None] * x, log_decay, x


def _output(params, config, y, x, z):
    """``y: [batch, T, H, P]`` (the recurrence's output) -> ``[batch, T, hidden]``."""
    batch, length = y.shape[:2]
    y = y + params["D"][:, None] * x
    y = y.reshape(batch, length, config.d_inner) * jax.nn.silu(z)
    if config.gated_norm:
        y = rms_norm(y, params["norm_weight"], config.norm_eps)
    return y @ params["out_proj"]


def mamba2_forward(
    params: dict[str, jax.Array], config: Mamba2Config, hidden: jax.Array
) -> jax.Array:
    """Whole sequences from a zero state, no cache.

    Args:
        hidden: ``[batch, L, hidden_size]`` float32, every token real.

    Returns:
        ``[batch, L, hidden_size]``.
    """
    check_hidden("mamba2_forward", hidden, config.hidden_size)
    batch, length, _ = hidden.shape
    c = config
    z, xbc, dt = _split_projection(params, c, hidden)
    xbc = jax.nn.silu(causal_conv(xbc, params["conv_weight"], params["conv_bias"]))
    q, k, v_, log_decay, x = _recurrence_inputs(params, c, xbc, dt)
    state = jnp.zeros((batch, c.num_heads, c.state_size, c.head_dim), jnp.float32)
    y, _ = scan_recurrence(q, k, v_, log_decay, state, jnp.ones((batch, length), jnp.bool_))
    return _output(params, c, y, x, z)


def mamba2_cached(
    params: dict[str, jax.Array],
    config: Mamba2Config,
    hidden: jax.Array,
    view: Mamba2CacheView,
    runtime: RecurrentRuntimeMetadata | None = None,
) -> tuple[jax.Array, Mamba2CacheView]:
    """A chunk of ``T >= 1`` tokens per row through ``view`` (block-parallel SSD form).

    Args:
        hidden: ``[batch, T, hidden_size]``; padding tokens (per ``runtime``) may hold anything.
        view: this layer's ``Mamba2CacheView`` (its metadata must match ``config``).
        runtime: which tokens are real (default: all).

    Returns:
        ``(out, new_view)``: ``out: [batch, T, hidden_size]`` (zeros at padding tokens). With the
        view's ``rollback_depth > 0`` the layer runs the token-by-token scan instead, to hand
        the cache the state after every token (its rollback checkpoints).
    """
    owner = "mamba2_cached"
    check_hidden(owner, hidden, config.hidden_size)
    check_layer_view(owner, view, config.cache_metadata(view.metadata.batch_size))
    c = config
    z, xbc_in, dt = _split_projection(params, c, hidden)
    step = view.read(runtime, hidden.shape[1], xbc_in)
    xbc = jax.nn.silu(windowed_conv(step.conv_window, params["conv_weight"], params["conv_bias"]))
    q, k, v_, log_decay, x = _recurrence_inputs(params, c, xbc, dt)
    # The cache holds the state as [H, P, N]; the recurrence as [H, N (key), P (value)].
    state = jnp.swapaxes(step.state, -1, -2)
    if view.metadata.rollback_depth:
        y, state, token_states = scan_recurrence(
            q, k, v_, log_decay, state, step.token_mask, token_states=True
        )
        step, view = view.concatenate_to_cache(
            step, jnp.swapaxes(state, -1, -2), jnp.swapaxes(token_states, -1, -2)
        )
    else:
        y, state = chunked_recurrence(q, k, v_, log_decay, state, step.token_mask, c.block_size)
        step, view = view.concatenate_to_cache(step, jnp.swapaxes(state, -1, -2))
    out = _output(params, c, y, x, z)
    return jnp.where(step.token_mask[..., None], out, 0), view
