"""A functional Llama decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU, tied embeddings)
written against the cache API.

The model knows nothing of a cache's internals: each layer asks its view for the positions of the
new tokens (``view.query_positions``), writes keys/values with ``view.concatenate_to_cache`` and
reads them back with ``jaxkv.ops.attention``. The same code therefore runs a contiguous cache
(tokens ``[batch, T]``, ``TransformerMetadata``) and a paged cache (packed tokens ``[num_tokens]``,
``PagedRuntimeMetadata``). ``forward_uncached`` is an independent dense implementation used as
the reference for cached decoding.

Shapes: ``B`` batch, ``T`` new tokens, ``H`` query heads, ``K`` KV heads, ``D`` head dim.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.abstracts import BaseCache
from jaxkv.models.config import LlamaConfig
from jaxkv.ops import attention

Params = dict[str, Any]


def params_to_device(params: Params, dtype: Any = jnp.float32, *, consume: bool = False) -> Params:
    """Params from ``jaxkv.io.gguf.load_gguf`` (NumPy, or JAX with ``device=True``) -> JAX
    arrays of ``dtype``.

    Norm weights stay float32. Matrices keep the loader's ``x @ W`` orientation, ``[in_features,
    out_features]``: for the few-row products of decoding XLA's CPU matmul runs that layout
    faster (at batch 8 the layer matmuls take about a fifth less time than with ``[out, in]``, and
    batch 1 is the same). Per layer, the query/key/value projections are fused into one ``wqkv:
    [hidden, (heads + 2 * kv_heads) * head_dim]`` and gate/up into ``w_gate_up: [hidden, 2 *
    intermediate]``: one wide matmul reads the weights in a single pass, which matters in
    memory-bound decoding. The LM head is ``[hidden, vocab]`` (``lm_head``); with tied embeddings
    the token embedding is looked up from that same matrix, so the weights are stored once. The
    layer list stays a list of dicts.

    With ``consume=True`` the entries of ``params["layers"]`` are set to None as each layer is
    converted, so a loader's unfused arrays are freed one layer at a time instead of all being
    held until the end (peak memory of loading: the weights plus one layer, not twice them).
    """

    def put(array: np.ndarray | None, target: Any = dtype) -> jax.Array | None:
        return None if array is None else jnp.asarray(array, dtype=target)

    layers = []
    for index, layer in enumerate(params["layers"]):
        if consume:
            params["layers"][index] = None  # its arrays are freed once fused
        fused = _fused_layer(layer, jnp.dtype(dtype))
        layers.append({key: fused[key] for key in LAYER_KEYS})  # jit returns keys sorted
    tied = params["lm_head"] is None
    return {
        "embed": None if tied else put(params["embed"]),
        "final_norm": put(params["final_norm"], jnp.float32),
        "lm_head": put(params["embed"]).T if tied else put(params["lm_head"]),
        "layers": layers,
    }


LAYER_KEYS = ("attn_norm", "wqkv", "wo", "mlp_norm", "w_gate_up", "w_down")
"""The entries of one layer of device params, in the order the layer uses them."""


@functools.partial(jax.jit, static_argnums=1)
def _fused_layer(layer: dict[str, Any], dtype: Any) -> dict[str, jax.Array]:
    """One loader layer -> its device layout (see ``params_to_device``), in one dispatch:
    every layer shares the compiled kernel."""

    def fused(*keys: str) -> jax.Array:
        """``[in, out_i]`` matrices -> one ``[in, sum(out_i)]`` matrix."""
        return jnp.concatenate([jnp.asarray(layer[key], dtype) for key in keys], axis=1)

    return {
        "attn_norm": jnp.asarray(layer["attn_norm"], jnp.float32),
        "wqkv": fused("wq", "wk", "wv"),
        "wo": jnp.asarray(layer["wo"], dtype),
        "mlp_norm": jnp.asarray(layer["mlp_norm"], jnp.float32),
        "w_gate_up": fused("w_gate", "w_up"),
        "w_down": jnp.asarray(layer["w_down"], dtype),
    }


def linear(x: jax.Array, weight: jax.Array) -> jax.Array:
    """``x: [..., in] @ weight`` for ``weight: [in, out]`` -> ``[..., out]``."""
    return x @ weight.astype(x.dtype)


def embed_tokens(params: Params, token_ids: jax.Array) -> jax.Array:
    """``token_ids: [...]`` -> ``[..., hidden]`` rows of the embedding (or the tied LM head)."""
    if params["embed"] is not None:
        return params["embed"][token_ids]
    return jnp.moveaxis(jnp.take(params["lm_head"], token_ids, axis=1), 0, -1)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``x: [..., hidden]`` normalised by its root mean square (in float32), times ``weight``."""
    x32 = x.astype(jnp.float32)
    scale = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * scale * weight).astype(x.dtype)


def rope_frequencies(config: LlamaConfig) -> jax.Array:
    """``[head_dim // 2]`` inverse frequencies ``theta ** (-2j / head_dim)``."""
    exponents = jnp.arange(0, config.head_dim, 2, dtype=jnp.float32) / config.head_dim
    return 1.0 / (config.rope_theta**exponents)


def rope_tables(positions: jax.Array, config: LlamaConfig) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)``, each ``[..., 1, head_dim // 2]``, of the RoPE angles at ``positions: [...]``.

    A forward computes them once; every layer and both of query and key reuse them.
    """
    positions = positions.astype(jnp.float32)
    if config.rope_scaling_type == "linear":
        positions = positions / config.rope_scaling_factor
    angles = positions[..., None] * rope_frequencies(config)  # [..., D/2]
    return jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]


def apply_rope(x: jax.Array, tables: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate ``x: [..., heads, head_dim]`` by the angles of ``tables = rope_tables(positions)``
    (rotate-half convention).

    Padding positions (``-1``) are rotated like any other; their outputs are never used.
    """
    cos, sin = tables
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    first, second = x32[..., :half], x32[..., half:]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


def _mlp(x: jax.Array, layer: Params) -> jax.Array:
    if "w_gate_up" in layer:
        gate, up = jnp.split(linear(x, layer["w_gate_up"]), 2, axis=-1)
    else:  # one matrix each (jaxkv.sharding.tensor_parallel_layout)
        gate, up = linear(x, layer["w_gate"]), linear(x, layer["w_up"])
    return linear(jax.nn.silu(gate) * up, layer["w_down"])


def _project_qkv(x: jax.Array, layer: Params, config: LlamaConfig):
    """``x: [..., hidden]`` -> q ``[..., H, D]``, k and v ``[..., K, D]``, from the fused
    ``wqkv`` or from ``wq``/``wk``/``wv`` (``jaxkv.sharding.tensor_parallel_layout``, which
    splits over a mesh in whole heads)."""
    lead = x.shape[:-1]
    q_shape = (*lead, config.num_heads, config.head_dim)
    kv_shape = (*lead, config.num_kv_heads, config.head_dim)
    if "wqkv" not in layer:
        q = linear(x, layer["wq"]).reshape(q_shape)
        return q, linear(x, layer["wk"]).reshape(kv_shape), linear(x, layer["wv"]).reshape(kv_shape)
    fused = linear(x, layer["wqkv"])
    q_width = config.num_heads * config.head_dim
    kv_width = config.num_kv_heads * config.head_dim
    q = fused[..., :q_width].reshape(q_shape)
    k = fused[..., q_width : q_width + kv_width].reshape(kv_shape)
    v = fused[..., q_width + kv_width :].reshape(kv_shape)
    return q, k, v


def lm_head(params: Params, config: LlamaConfig, hidden: jax.Array) -> jax.Array:
    """``hidden: [..., hidden_size]`` (after the final norm) -> float32 logits ``[..., vocab]``."""
    return (hidden @ params["lm_head"].astype(hidden.dtype)).astype(jnp.float32)


def forward(
    params: Params,
    config: LlamaConfig,
    token_ids: jax.Array,
    cache: BaseCache,
    runtime: Any = None,
    *,
    logits_indices: jax.Array | None = None,
    compute_dtype: Any = jnp.float32,
) -> tuple[jax.Array, BaseCache]:
    """Run new tokens through the model, writing their keys/values into ``cache``.

    Args:
        params: from ``params_to_device``.
        config: the model's ``LlamaConfig`` (static under jit).
        token_ids: ``[B, T]`` int32 for a contiguous cache, ``[num_tokens]`` for a paged cache.
        cache: a cache with one attention view per layer.
        runtime: the cache family's runtime metadata (which tokens are real, page tables ...).
        logits_indices: if given, logits are computed only at these indices of the token axis:
            ``[B]`` (one per row) or ``[B, K]`` (``K`` per row, e.g. to verify draft tokens) for
            ``[B, T]`` tokens, ``[S]`` for packed tokens. Otherwise at every token.
        compute_dtype: dtype of activations and matmuls.

    Returns:
        ``(logits, new_cache)``: float32 logits ``[B, T, vocab]`` / ``[num_tokens, vocab]``, or
        ``[B, vocab]`` / ``[B, K, vocab]`` / ``[S, vocab]`` with ``logits_indices``.
    """
    if len(cache) != config.num_layers:
        raise ValueError(
            f"forward: cache has {len(cache)} views but the model has {config.num_layers} layers"
        )
    new_tokens = token_ids.shape[-1]
    rope = rope_tables(cache[0].query_positions(runtime, new_tokens), config)
    x = embed_tokens(params, token_ids).astype(compute_dtype)
    views = []
    for layer, view in zip(params["layers"], cache, strict=True):
        h = rms_norm(x, layer["attn_norm"], config.rms_norm_eps)
        q, k, v = _project_qkv(h, layer, config)
        q = apply_rope(q, rope)
        k = apply_rope(k, rope)
        kv, view = view.concatenate_to_cache(k, v, runtime)
        views.append(view)
        out = attention(q, kv)
        x = x + linear(out.reshape(*out.shape[:-2], -1), layer["wo"])
        x = x + _mlp(rms_norm(x, layer["mlp_norm"], config.rms_norm_eps), layer)
    if logits_indices is not None:
        if token_ids.ndim == 2 and logits_indices.ndim == 2:
            x = jnp.take_along_axis(x, logits_indices[:, :, None], axis=1)
        elif token_ids.ndim == 2:
            x = jnp.take_along_axis(x, logits_indices[:, None, None], axis=1)[:, 0]
        else:
            x = x[logits_indices]
    x = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    return lm_head(params, config, x), cache.with_views(views)


def forward_uncached(
    params: Params,
    config: LlamaConfig,
    token_ids: jax.Array,
    lengths: jax.Array | None = None,
) -> jax.Array:
    """Reference forward over whole right-padded sequences with dense causal attention, no cache.

    Args:
        token_ids: ``[B, L]`` int32.
        lengths: ``[B]`` real tokens per row (default ``L``); logits past a row's length are junk.

    Returns:
        float32 logits ``[B, L, vocab]``.
    """
    batch, length = token_ids.shape
    if lengths is None:
        lengths = jnp.full((batch,), length, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    real = positions < lengths[:, None]
    visible = (positions[:, None, :] <= positions[:, :, None]) & real[:, None, :]  # [B, Lq, Lk]
    groups = config.num_query_groups
    rope = rope_tables(positions, config)
    x = embed_tokens(params, token_ids).astype(jnp.float32)
    for layer in params["layers"]:
        h = rms_norm(x, layer["attn_norm"], config.rms_norm_eps)
        q, k, v = _project_qkv(h, layer, config)
        q = apply_rope(q, rope)
        k = apply_rope(k, rope)
        k = jnp.repeat(k, groups, axis=2)
        v = jnp.repeat(v, groups, axis=2)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(config.head_dim)
        logits = jnp.where(visible[:, None], logits, -jnp.inf)
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, -1)
        x = x + linear(out, layer["wo"])
        x = x + _mlp(rms_norm(x, layer["mlp_norm"], config.rms_norm_eps), layer)
    x = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    return lm_head(params, config, x)
