"""A reference linear / lightning attention layer with random weights, written against
``jaxkv.caches.recurrent.LinearAttentionCacheView``, and the decayed linear recurrence it shares
with Mamba2's SSD.

Per head ``h`` with feature map ``phi`` (identity or ``elu + 1``) and optional decay ``lam[h]``::

    S_t = lam[h] * S_{t-1} + phi(k_t)^T v_t          # [key_dim, value_dim]
    o_t = phi(q_t) S_t                               # [value_dim]
    out = out_proj(rms_norm(o))                      # per-head RMSNorm (optional)

``linear_attention_forward`` runs whole sequences from a zero state (a ``lax.scan`` over time);
``linear_attention_cached`` runs a chunk of ``T >= 1`` tokens per row through a cache view with
the block-parallel ("lightning") form: inside a block of ``block_size`` tokens a masked,
decay-weighted ``q k^T`` product, across blocks the carried state.

The recurrence is written once for any per-token, per-head log-decay ``a_t <= 0``
(``S_t = exp(a_t) S_{t-1} + k_t^T v_t``): linear attention uses ``a_t = log lam[h]``, Mamba2 uses
``a_t = dt_t * A[h]``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxkv import _validation as v
from jaxkv._sizes import ceil_div
from jaxkv.caches.recurrent import (
    LinearAttentionCacheMetadata,
    LinearAttentionCacheView,
    RecurrentRuntimeMetadata,
)
from jaxkv.models.mamba import centered, check_hidden, check_layer_view, dense_init, draw_uniform

FEATURE_MAPS = ("identity", "elu_plus_one")


def rms_norm(x: jax.Array, weight: jax.Array, eps: float = 1e-6) -> jax.Array:
    """RMSNorm over the last axis: ``x / rms(x) * weight`` (computed in float32)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * weight).astype(x.dtype)


# --------------------------------------------------------------------------------------------
# The decayed linear recurrence, two ways
# --------------------------------------------------------------------------------------------


def scan_recurrence(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_decay: jax.Array,
    state: jax.Array,
    mask: jax.Array,
    *,
    token_states: bool = False,
) -> tuple[jax.Array, ...]:
    """``S_t = exp(a_t) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``, one token at a time.

    Args:
        q, k: ``[batch, T, heads, key_dim]``; v: ``[batch, T, heads, value_dim]``.
        log_decay: ``[batch, T, heads]`` (``a_t <= 0``).
        state: ``[batch, heads, key_dim, value_dim]``.
        mask: ``[batch, T]`` bool; the state stays put where ``False``.
        token_states: also return the state after every token (for a cache that keeps
            rollback checkpoints).

    Returns:
        ``o: [batch, T, heads, value_dim]`` and the final state; with ``token_states`` also
        ``[batch, T, heads, key_dim, value_dim]``, the state after each token.
    """

    def step(s, inputs):
        q_t, k_t, v_t, a_t, real = inputs
        advanced = jnp.exp(a_t)[..., None, None] * s + jnp.einsum("bhk,bhv->bhkv", k_t, v_t)
        s = jnp.where(real[:, None, None, None], advanced, s)
        o_t = jnp.einsum("bhk,bhkv->bhv", q_t, s)
        return s, (o_t, s) if token_states else o_t

    time_major = [jnp.swapaxes(t, 0, 1) for t in (q, k, v, log_decay, mask)]
    state, outputs = lax.scan(step, state, time_major)
    if not token_states:
        return jnp.swapaxes(outputs, 0, 1), state
    out, states = outputs
    return jnp.swapaxes(out, 0, 1), state, jnp.swapaxes(states, 0, 1)


def _segment_sums(a: jax.Array) -> jax.Array:
    """``[..., Q]`` -> ``[..., Q, Q]``: entry ``(t, s)`` is ``sum(a[s+1 : t+1])`` for ``s <= t``,
    ``-inf`` above the diagonal (summed by masked cumsum, not by differences, for accuracy)."""
    size = a.shape[-1]
    repeated = jnp.broadcast_to(a[..., :, None], a.shape + (size,))  # [..., r, s] = a[r]
    strictly_below = jnp.tril(jnp.ones((size, size), jnp.bool_), -1)
    sums = jnp.cumsum(jnp.where(strictly_below, repeated, 0.0), axis=-2)
    return jnp.where(jnp.tril(jnp.ones((size, size), jnp.bool_)), sums, -jnp.inf)


def chunked_recurrence(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_decay: jax.Array,
    state: jax.Array,
    mask: jax.Array,
    block_size: int,
) -> tuple[jax.Array, jax.Array]:
    """The same recurrence as ``scan_recurrence``, block-parallel (lightning attention / SSD).

    Padding tokens (``mask`` ``False``) get ``a = 0`` and ``k = 0``, so they are the identity
    anywhere in the sequence; ``T`` is padded up to a multiple of the block. Same arguments and
    results as ``scan_recurrence``; ``block_size``: tokens per block (static).
    """
    batch, new_tokens, heads, key_dim = k.shape
    block = max(1, min(block_size, new_tokens))
    num_blocks = ceil_div(new_tokens, block)
    pad = num_blocks * block - new_tokens
    real = mask[..., None]
    k = jnp.where(real[..., None], k, 0)
    log_decay = jnp.where(real, log_decay, 0.0)

    def blocks(x):  # [batch, T, ...] -> [num_blocks, batch, block, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.swapaxes(x.reshape((batch, num_blocks, block) + x.shape[2:]), 0, 1)

    def body(s, inputs):
        q_b, k_b, v_b, a_b = inputs  # [batch, block, heads, dim], a_b [batch, block, heads]
        a_b = jnp.swapaxes(a_b, 1, 2)  # [batch, heads, block]
        decay = jnp.exp(_segment_sums(a_b))  # [batch, heads, t, s]
        from_start = jnp.exp(jnp.cumsum(a_b, axis=-1))  # [batch, heads, t]
        scores = jnp.einsum("bthk,bshk->bhts", q_b, k_b) * decay
        out = jnp.einsum("bhts,bshv->bthv", scores, v_b)
        out += jnp.einsum("bthk,bhkv,bht->bthv", q_b, s, from_start)
        to_end = decay[..., -1, :]  # [batch, heads, s]
        s = from_start[..., -1, None, None] * s + jnp.einsum(
            "bhs,bshk,bshv->bhkv", to_end, k_b, v_b
        )
        return s, out

    state, out = lax.scan(body, state, [blocks(x) for x in (q, k, v, log_decay)])
    out = jnp.swapaxes(out, 0, 1).reshape((batch, num_blocks * block) + out.shape[3:])
    return out[:, :new_tokens], state


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------


def lightning_decay(num_heads: int) -> tuple[float, ...]:
    """Per-head decay factors ``exp(-slope)`` with ALiBi-style geometric slopes
    ``2 ** (-8 (h + 1) / num_heads)`` (the lightning attention choice)."""
    v.require_int("lightning_decay", "num_heads", num_heads, minimum=1)
    return tuple(math.exp(-(2.0 ** (-8.0 * (h + 1) / num_heads))) for h in range(num_heads))


@dataclasses.dataclass(frozen=True)
class LinearAttentionConfig:
    """Sizes of one linear-attention layer.

    Attributes:
        hidden_size: width of the residual stream.
        num_heads, key_dim, value_dim: heads and per-head widths.
        feature_map: ``"identity"`` (plain) or ``"elu_plus_one"`` applied to queries and keys.
        decay: ``None`` or one factor per head in ``(0, 1]`` (see ``lightning_decay``).
        output_norm: per-head RMSNorm of the attention output before ``out_proj``.
        block_size: tokens per block of the cached (block-parallel) form.
    """

    hidden_size: int
    num_heads: int
    key_dim: int
    value_dim: int
    feature_map: str = "identity"
    decay: tuple[float, ...] | None = None
    output_norm: bool = True
    block_size: int = 64

    def __post_init__(self) -> None:
        owner = "LinearAttentionConfig"
        for name in ("hidden_size", "num_heads", "key_dim", "value_dim", "block_size"):
            v.require_int(owner, name, getattr(self, name), minimum=1)
        v.require_choice(owner, "feature_map", self.feature_map, FEATURE_MAPS)
        # The cache metadata checks the decay factors; build it once to validate them here.
        object.__setattr__(self, "decay", self.cache_metadata(1).decay)

    def cache_metadata(
        self,
        batch_size: int,
        num_layers: int = 1,
        *,
        dtype: Any = jnp.float32,
        rollback_depth: int = 0,
    ) -> LinearAttentionCacheMetadata:
        """The cache metadata matching this layer (``rollback_depth``: tokens a row can roll
        back, see ``jaxkv.caches.recurrent``)."""
        return LinearAttentionCacheMetadata.create(
            batch_size,
            num_layers,
            self.num_heads,
            self.key_dim,
            self.value_dim,
            decay=self.decay,
            dtype=dtype,
            rollback_depth=rollback_depth,
        )


def init_linear_attention(key: jax.Array, config: LinearAttentionConfig) -> dict[str, jax.Array]:
    """Random float32 weights: ``q_proj``/``k_proj [hidden, heads * key_dim]``,
    ``v_proj [hidden, heads * value_dim]``, ``norm_weight [value_dim]``,
    ``out_proj [heads * value_dim, hidden]``."""
    if not isinstance(config, LinearAttentionConfig):
        raise TypeError(
            f"init_linear_attention: config must be LinearAttentionConfig, "
            f"got {type(config).__name__}"
        )
    c = config
    u = draw_uniform(
        key,
        {
            "q_proj": (c.hidden_size, c.num_heads * c.key_dim),
            "k_proj": (c.hidden_size, c.num_heads * c.key_dim),
            "v_proj": (c.hidden_size, c.num_heads * c.value_dim),
            "norm_weight": (c.value_dim,),
            "out_proj": (c.num_heads * c.value_dim, c.hidden_size),
        },
    )
    return {
        "q_proj": dense_init(u["q_proj"]),
        "k_proj": dense_init(u["k_proj"]),
        "v_proj": dense_init(u["v_proj"]),
        "norm_weight": 1.0 + centered(u["norm_weight"], 0.1),
        "out_proj": dense_init(u["out_proj"]),
    }


def _project(params, config, hidden):
    """-> ``q, k [batch, T, heads, key_dim]``, ``v [batch, T, heads, value_dim]``,
    ``log_decay [batch, T, heads]``."""
    batch, length, _ = hidden.shape
    c = config
    q = (hidden @ params["q_proj"]).reshape(batch, length, c.num_heads, c.key_dim)
    k = (hidden @ params["k_proj"]).reshape(batch, length, c.num_heads, c.key_dim)
    v_ = (hidden @ params["v_proj"]).reshape(batch, length, c.num_heads, c.value_dim)
    if c.feature_map == "elu_plus_one":
        q, k = jax.nn.elu(q) + 1.0, jax.nn.elu(k) + 1.0
    q = q * c.key_dim**-0.5
    if c.decay is None:
        log_decay = jnp.zeros((batch, length, c.num_heads), jnp.float32)
    else:
        log_decay = jnp.broadcast_to(
            jnp.log(jnp.asarray(c.decay, jnp.float32)), (batch, length, c.num_heads)
        )
    return q, k, v_, log_decay


def _output(params, config, out):
    if config.output_norm:
        out = rms_norm(out, params["norm_weight"])
    batch, length = out.shape[:2]
    return out.reshape(batch, length, -1) @ params["out_proj"]


def linear_attention_forward(
    params: dict[str, jax.Array], config: LinearAttentionConfig, hidden: jax.Array
) -> jax.Array:
    """Whole sequences from a zero state, no cache.

    Args:
        hidden: ``[batch, L, hidden_size]`` float32, every token real.

    Returns:
        ``[batch, L, hidden_size]``.
    """
    check_hidden("linear_attention_forward", hidden, config.hidden_size)
    batch, length, _ = hidden.shape
    q, k, v_, log_decay = _project(params, config, hidden)
    state = jnp.zeros((batch, config.num_heads, config.key_dim, config.value_dim), jnp.float32)
    out, _ = scan_recurrence(q, k, v_, log_decay, state, jnp.ones((batch, length), jnp.bool_))
    return _output(params, config, out)


def linear_attention_cached(
    params: dict[str, jax.Array],
    config: LinearAttentionConfig,
    hidden: jax.Array,
    view: LinearAttentionCacheView,
    runtime: RecurrentRuntimeMetadata | None = None,
) -> tuple[jax.Array, LinearAttentionCacheView]:
    """A chunk of ``T >= 1`` tokens per row through ``view`` (block-parallel form).

    Args:
        hidden: ``[batch, T, hidden_size]``; padding tokens (per ``runtime``) may hold anything.
        view: this layer's ``LinearAttentionCacheView`` (metadata matching ``config``, decay
            included).
        runtime: which tokens are real (default: all).

    Returns:
        ``(out, new_view)``: ``out: [batch, T, hidden_size]`` (zeros at padding tokens). With the
        view's ``rollback_depth > 0`` the layer runs the token-by-token scan instead of the
        block-parallel form, to hand the cache the state after every token (its rollback
        checkpoints): ``T`` sequential steps, fine for the short chunks a verifier rolls back.
    """
    owner = "linear_attention_cached"
    check_hidden(owner, hidden, config.hidden_size)
    expected = config.cache_metadata(view.metadata.batch_size)
    check_layer_view(owner, view, expected)
    step = view.read(runtime, hidden.shape[1])
    q, k, v_, log_decay = _project(params, config, hidden)
    if view.metadata.rollback_depth:
        out, state, token_states = scan_recurrence(
            q, k, v_, log_decay, step.state, step.token_mask, token_states=True
        )
        step, view = view.concatenate_to_cache(step, state, token_states)
    else:
        out, state = chunked_recurrence(
            q, k, v_, log_decay, step.state, step.token_mask, config.block_size
        )
        step, view = view.concatenate_to_cache(step, state)
    out = _output(params, config, out)
    return jnp.where(step.token_mask[..., None], out, 0), view
