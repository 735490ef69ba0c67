"""A functional Gemma 3 text decoder (sliding-window and global attention layers) written against
the hybrid cache API.

Gemma 3 interleaves two kinds of attention layer: most layers see only the last
``sliding_window`` positions (the current token included: a query at position ``q`` sees keys
``q - W < k <= q``), and every ``global_every``-th layer sees the whole context. Both kinds
are ``jaxkv.caches.hybrid`` layer kinds (``"sliding_attention"`` and ``"attention"``), so one
``HybridCache`` holds the whole stack and one runtime metadata drives a forward pass:

* ``attention_backend="contiguous"``: sliding layers on a ring of ``W`` slots per row, global
  layers on a contiguous cache (``HybridRuntimeMetadata``);
* ``attention_backend="paged"``: both kinds on page pools (``HybridPagedRuntimeMetadata``);
  the sliding layers on their own, small pool whose windowed page manager gives the pages
  before the window back (``jaxkv.engine.step_inputs.hybrid_page_managers`` drives both pools in
  lockstep), so at 32k tokens they hold about ``W`` tokens per sequence, not 32k.

Either may store keys and values quantised (``kv_quantization``). The model never looks inside a
cache: each layer asks its view for the new tokens' positions, writes with
``concatenate_to_cache`` and reads with ``jaxkv.ops.attention``.

One block, as in HF transformers' ``Gemma3DecoderLayer``::

    h = x + post_attn_norm(attention(pre_attn_norm(x)))      # q/k RMS-normed per head, then RoPE
    x = h + post_mlp_norm(down(gelu_tanh(gate(n)) * up(n)))   # n = pre_mlp_norm(h)

Every RMSNorm scales by ``1 + weight`` in float32; the embedding is multiplied by
``sqrt(hidden_size)`` (rounded to the compute dtype); attention logits are scaled by
``query_pre_attn_scalar ** -0.5``; local layers use RoPE base ``rope_local_theta``, global ones
``rope_theta`` (with optional linear scaling); the LM head is the tied embedding.

Shapes: ``B`` batch, ``T`` new tokens, ``H`` query heads, ``K`` KV heads, ``D`` head dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv import _validation as v
from jaxkv._sizes import ceil_div
from jaxkv.caches.hybrid import (
    HybridCache,
    HybridCacheMetadata,
    HybridPagedRuntimeMetadata,
    HybridRuntimeMetadata,
)
from jaxkv.models.llama import apply_rope
from jaxkv.ops.attention import attention

__all__ = [
    "GLOBAL",
    "SLIDING",
    "Gemma3Config",
    "Params",
    "gemma3_forward",
    "gemma3_forward_uncached",
    "gemma3_params_to_device",
]

Params = dict[str, Any]

SLIDING = "sliding_attention"
"""Layer kind of a sliding-window layer (a ``jaxkv.caches.hybrid`` kind)."""
GLOBAL = "attention"
"""Layer kind of a global (full-context) layer."""

_LAYER_WEIGHTS = (
    "attn_norm",
    "wq",
    "wk",
    "wv",
    "q_norm",
    "k_norm",
    "wo",
    "post_attn_norm",
    "mlp_norm",
    "w_gate",
    "w_up",
    "w_down",
    "post_mlp_norm",
)


def _positive_int(owner: str, field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {field} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{owner}: {field} must be a positive int, got {value}")


def _positive_float(owner: str, field: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"{owner}: {field} must be a float{' or None' if optional else ''}, got "
            f"{type(value).__name__} {value!r}"
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}: {field} must be a finite positive number, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
    """Shape and numerics of a Gemma 3 text decoder. Immutable and hashable (a static jit
    argument); every field is checked when the object is built.

    Attributes:
        vocab_size: rows of the (tied) token embedding.
        hidden_size: width of the residual stream.
        intermediate_size: width of the GeGLU MLP.
        num_layers: decoder blocks.
        num_heads: query heads per layer.
        num_kv_heads: key/value heads per layer (divides ``num_heads``).
        head_dim: width of one head (query, key and value alike; even, for RoPE).
        sliding_window: ``W``, positions a sliding layer sees, the current one included.
        layer_kinds: per layer, ``SLIDING`` (``"sliding_attention"``) or ``GLOBAL``
            (``"attention"``); Gemma 3 makes every sixth layer global.
        rope_theta: RoPE base of the global layers.
        rope_local_theta: RoPE base of the sliding layers.
        rope_scaling_factor: linear RoPE scaling of the global layers (positions divided by it;
            ``1.0``: none).
        rms_norm_eps: epsilon added to the mean square in every RMSNorm.
        query_pre_attn_scalar: attention logits are scaled by ``query_pre_attn_scalar ** -0.5``.
        attn_logit_soft_cap: ``None``, or ``c`` for attention logits ``c * tanh(logits / c)``.
        final_logit_soft_cap: ``None``, or ``c`` for output logits ``c * tanh(logits / c)``.
        max_position_embeddings: context length the model was trained for.
        bos_token_id: beginning-of-sequence id.
        eos_token_ids: ids that end generation; the first is the checkpoint's own EOS.
        pad_token_id: padding id, or ``None``.
        name: free-form model name ("" when absent).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int
    layer_kinds: tuple[str, ...]
    rope_theta: float = 1_000_000.0
    rope_local_theta: float = 10_000.0
    rope_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256.0
    attn_logit_soft_cap: float | None = None
    final_logit_soft_cap: float | None = None
    max_position_embeddings: int = 32_768
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1,)
    pad_token_id: int | None = 0
    name: str = ""

    def __post_init__(self) -> None:
        owner = "Gemma3Config"
        for field in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "sliding_window",
            "max_position_embeddings",
        ):
            _positive_int(owner, field, getattr(self, field))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{owner}: num_heads must be a multiple of num_kv_heads, got num_heads="
                f"{self.num_heads} and num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"{owner}: head_dim must be even for RoPE, got {self.head_dim}")
        if not isinstance(self.layer_kinds, tuple):
            raise TypeError(
                f"{owner}: layer_kinds must be a tuple of {SLIDING!r}/{GLOBAL!r}, got "
                f"{type(self.layer_kinds).__name__} {self.layer_kinds!r:.80}"
            )
        if len(self.layer_kinds) != self.num_layers:
            raise ValueError(
                f"{owner}: layer_kinds must have one entry per layer ({self.num_layers}), got "
                f"{len(self.layer_kinds)}"
            )
        for index, kind in enumerate(self.layer_kinds):
            if kind not in (SLIDING, GLOBAL):
                raise ValueError(
                    f"{owner}: layer_kinds[{index}] must be {SLIDING!r} or {GLOBAL!r}, got {kind!r}"
                )
        for field in (
            "rope_theta",
            "rope_local_theta",
            "rope_scaling_factor",
            "rms_norm_eps",
            "query_pre_attn_scalar",
        ):
            _positive_float(owner, field, getattr(self, field))
        for field in ("attn_logit_soft_cap", "final_logit_soft_cap"):
            _positive_float(owner, field, getattr(self, field), optional=True)
        self._check_token_id("bos_token_id", self.bos_token_id)
        if not isinstance(self.eos_token_ids, tuple) or not self.eos_token_ids:
            raise ValueError(
                f"{owner}: eos_token_ids must be a non-empty tuple of ints, got "
                f"{self.eos_token_ids!r}"
            )
        for token_id in self.eos_token_ids:
            self._check_token_id("eos_token_ids", token_id)
        if self.pad_token_id is not None:
            self._check_token_id("pad_token_id", self.pad_token_id)
        if not isinstance(self.name, str):
            raise TypeError(f"{owner}: name must be a str, got {type(self.name).__name__}")

    def _check_token_id(self, field: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(
                f"Gemma3Config: {field} must hold ints, got {type(value).__name__} {value!r}"
            )
        if not 0 <= value < self.vocab_size:
            raise ValueError(
                f"Gemma3Config: {field} must be in [0, vocab_size={self.vocab_size}), got {value}"
            )

    @staticmethod
    def pattern(num_layers: int, global_every: int = 6) -> tuple[str, ...]:
        """Gemma 3's layer kinds: layer ``i`` is global when ``(i + 1) % global_every == 0``.

        Args:
            num_layers: decoder blocks (>= 1).
            global_every: period of the pattern (>= 1; ``1``: every layer global).

        Returns:
            ``num_layers`` kinds, each ``SLIDING`` or ``GLOBAL``.

        Raises:
            TypeError, ValueError: a count that is not a positive int.
        """
        _positive_int("Gemma3Config.pattern", "num_layers", num_layers)
        _positive_int("Gemma3Config.pattern", "global_every", global_every)
        return tuple(
            GLOBAL if (index + 1) % global_every == 0 else SLIDING for index in range(num_layers)
        )

    @property
    def eos_token_id(self) -> int:
        """The checkpoint's own end-of-sequence id (first of ``eos_token_ids``)."""
        return self.eos_token_ids[0]

    @property
    def embed_scale(self) -> float:
        """``sqrt(hidden_size)``, the factor of the token embedding."""
        return math.sqrt(self.hidden_size)

    @property
    def global_layers(self) -> tuple[int, ...]:
        """Indices of the global layers."""
        return tuple(i for i, kind in enumerate(self.layer_kinds) if kind == GLOBAL)

    def replace(self, **changes: Any) -> Gemma3Config:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def cache_metadata(
        self,
        batch_size: int,
        max_length: int,
        *,
        dtype: Any = jnp.float32,
        attention_backend: str = "contiguous",
        kv_quantization: str = "none",
        page_size: int = 16,
        num_pages: int | None = None,
        rollback_depth: int = 0,
        sliding_num_pages: int | None = None,
        max_chunk_tokens: int | None = None,
        window_margin: int = 0,
    ) -> HybridCacheMetadata:
        """Metadata of a ``HybridCache`` for this stack.

        Args:
            batch_size: rows (with ``"paged"``: ``max_num_seqs`` of every step).
            max_length: most tokens a row holds over its life.
            dtype: float dtype of stored keys/values (what a quantised cache decodes to).
            attention_backend: ``"contiguous"`` (sliding layers on rings of ``sliding_window``
                slots, global layers contiguous) or ``"paged"`` (both on page pools).
            kv_quantization: storage codec of both kinds (``"none"``, ``"int8"``, ``"int4"``,
                ``"fp8"``).
            page_size: paged only: tokens per page.
            num_pages: paged only: pages per global layer's pool (default ``batch_size *
                ceil(max_length / page_size)``, every row's worst case).
            sliding_num_pages: paged only: pages per sliding layer's pool, driven by a windowed
                page manager (``hybrid_page_managers``). Default: what ``batch_size`` rows
                need at most, ``batch_size * (ceil((sliding_window + max_chunk_tokens +
                window_margin) / page_size) + 1)``, capped at ``num_pages``. Pass
                ``sliding_num_pages=num_pages`` to drive both kinds with one ``PageManager``.
            max_chunk_tokens: paged only: most new tokens one row takes in one step, for the
                default ``sliding_num_pages`` (default ``min(max_length, sliding_window)``).
            window_margin: paged only: tokens the sliding pool keeps before the window (the
                ``window_margin`` of its manager: how far ``truncate`` can roll back), for the
                default ``sliding_num_pages``.
            rollback_depth: contiguous only: spare ring slots of the sliding layers, so the
                cache can ``truncate`` / ``rollback`` up to that many of its last tokens (a
                speculative-decoding verifier); global layers and page pools roll back anyway.

        Returns:
            the validated ``HybridCacheMetadata``.

        Raises:
            ValueError, TypeError: an argument out of range, naming it.
        """
        owner = "Gemma3Config.cache_metadata"
        v.require_int(owner, "batch_size", batch_size, minimum=1)
        v.require_int(owner, "max_length", max_length, minimum=1)
        v.require_choice(owner, "attention_backend", attention_backend, ("contiguous", "paged"))
        settings: dict[str, Any] = dict(
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=dtype,
            kv_quantization=kv_quantization,
        )
        sliding_settings: dict[str, Any] = {}
        if attention_backend == "paged":
            v.require_int(owner, "page_size", page_size, minimum=1)
            max_pages_per_seq = ceil_div(max_length, page_size)
            if num_pages is None:
                num_pages = batch_size * max_pages_per_seq
            v.require_int(owner, "num_pages", num_pages, minimum=1)
            v.require_int(owner, "window_margin", window_margin, minimum=0)
            if max_chunk_tokens is None:
                max_chunk_tokens = min(max_length, self.sliding_window)
            v.require_int(owner, "max_chunk_tokens", max_chunk_tokens, minimum=1)
            if sliding_num_pages is None:
                span = self.sliding_window + max_chunk_tokens + window_margin
                sliding_num_pages = min(num_pages, batch_size * (ceil_div(span, page_size) + 1))
            v.require_int(owner, "sliding_num_pages", sliding_num_pages, minimum=1)
            settings.update(
                num_pages=num_pages, page_size=page_size, max_pages_per_seq=max_pages_per_seq
            )
            sliding_settings = {"num_pages": sliding_num_pages}
        else:
            for name, value in (
                ("sliding_num_pages", sliding_num_pages),
                ("max_chunk_tokens", max_chunk_tokens),
            ):
                if value is not None:
                    raise ValueError(
                        f"{owner}: {name}={value!r} applies to attention_backend='paged' only"
                    )
            settings.update(max_length=max_length)
        kinds = self.layer_kinds
        v.require_int(owner, "rollback_depth", rollback_depth, minimum=0)
        ring_settings = (
            {"rollback_depth": rollback_depth} if attention_backend == "contiguous" else {}
        )
        return HybridCacheMetadata.create(
            kinds,
            batch_size=batch_size,
            attention_backend=attention_backend,
            attention=dict(settings) if GLOBAL in kinds else None,
            sliding_attention=(
                dict(
                    settings,
                    sliding_window=self.sliding_window,
                    **ring_settings,
                    **sliding_settings,
                )
                if SLIDING in kinds
                else None
            ),
        )


def gemma3_params_to_device(params: Params, dtype: Any = jnp.float32) -> Params:
    """Params from ``jaxkv.io.gguf_gemma3.load_gemma3_gguf`` (NumPy or JAX) -> JAX arrays.

    Matrices become ``dtype`` and keep the ``x @ W`` orientation ``[in, out]``; per layer the
    query/key/value projections are fused into ``wqkv: [hidden, (H + 2K) * D]`` and gate/up into
    ``w_gate_up: [hidden, 2 * intermediate]`` (one wide matmul each). Norm weights stay float32.
    The embedding ``embed: [vocab, hidden]`` is stored once and serves as the LM head too.

    Args:
        params: ``{"embed", "final_norm", "layers": [...]}`` with the per-layer names of
            ``load_gemma3_gguf``.
        dtype: dtype of the matrices (float32, bfloat16 or float16).

    Returns:
        the device params ``gemma3_forward`` takes.

    Raises:
        ValueError: ``params`` lacks a weight (the missing name is given).
    """
    for key in ("embed", "final_norm", "layers"):
        if key not in params:
            raise ValueError(f"gemma3_params_to_device: params has no {key!r}")
    for index, layer in enumerate(params["layers"]):
        missing = [name for name in _LAYER_WEIGHTS if name not in layer]
        if missing:
            raise ValueError(f"gemma3_params_to_device: layers[{index}] lacks {missing}")

    def put(array: Any, target: Any = dtype) -> jax.Array:
        return jnp.asarray(array, dtype=target)

    def norm(array: Any) -> jax.Array:
        return put(array, jnp.float32)

    layers = [
        {
            "attn_norm": norm(layer["attn_norm"]),
            "wqkv": jnp.concatenate([put(layer[n]) for n in ("wq", "wk", "wv")], axis=1),
            "q_norm": norm(layer["q_norm"]),
            "k_norm": norm(layer["k_norm"]),
            "wo": put(layer["wo"]),
            "post_attn_norm": norm(layer["post_attn_norm"]),
            "mlp_norm": norm(layer["mlp_norm"]),
            "w_gate_up": jnp.concatenate([put(layer["w_gate"]), put(layer["w_up"])], axis=1),
            "w_down": put(layer["w_down"]),
            "post_mlp_norm": norm(layer["post_mlp_norm"]),
        }
        for layer in params["layers"]
    ]
    return {
        "embed": put(params["embed"]),
        "final_norm": norm(params["final_norm"]),
        "layers": layers,
    }


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Gemma's RMSNorm: ``x: [..., n]`` normalised in float32, times ``1 + weight: [n]``, then
    cast back to ``x.dtype`` (the product is taken before the cast, as in HF)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


def rope_tables(
    positions: jax.Array, theta: float, head_dim: int, scaling_factor: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)``, each ``[..., 1, head_dim // 2]``, at ``positions: [...]`` for RoPE base
    ``theta`` (inverse frequencies divided by ``scaling_factor``: linear scaling)."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inverse = 1.0 / (theta**exponents)
    if scaling_factor != 1.0:
        inverse = inverse / scaling_factor
    angles = positions.astype(jnp.float32)[..., None] * inverse
    return jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]


def _linear(x: jax.Array, weight: jax.Array) -> jax.Array:
    return x @ weight.astype(x.dtype)


def _embed(params: Params, config: Gemma3Config, token_ids: jax.Array, dtype: Any) -> jax.Array:
    """``token_ids: [...]`` -> ``[..., hidden]`` scaled embeddings in ``dtype`` (the scale is
    rounded to ``dtype`` first, as HF does)."""
    rows = params["embed"][token_ids].astype(dtype)
    return rows * jnp.asarray(config.embed_scale, dtype)


def _project(x: jax.Array, layer: Params, config: Gemma3Config):
    """``x: [..., hidden]`` -> q ``[..., H, D]``, k ``[..., K, D]`` (both RMS-normed per head)
    and v ``[..., K, D]``."""
    c = config
    lead = x.shape[:-1]
    fused = _linear(x, layer["wqkv"])
    q_width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    q = fused[..., :q_width].reshape(*lead, c.num_heads, c.head_dim)
    k = fused[..., q_width : q_width + kv_width].reshape(*lead, c.num_kv_heads, c.head_dim)
    value = fused[..., q_width + kv_width :].reshape(*lead, c.num_kv_heads, c.head_dim)
    q = rms_norm(q, layer["q_norm"], c.rms_norm_eps)
    k = rms_norm(k, layer["k_norm"], c.rms_norm_eps)
    return q, k, value


def _mlp(x: jax.Array, layer: Params, config: Gemma3Config) -> jax.Array:
    """GeGLU (tanh-approximated GELU) of the pre-MLP-normed ``x``, post-normed."""
    h = rms_norm(x, layer["mlp_norm"], config.rms_norm_eps)
    gate, up = jnp.split(_linear(h, layer["w_gate_up"]), 2, axis=-1)
    out = _linear(jax.nn.gelu(gate, approximate=True) * up, layer["w_down"])
    return rms_norm(out, layer["post_mlp_norm"], config.rms_norm_eps)


def _rope_for_layers(positions: jax.Array, config: Gemma3Config) -> dict[str, Any]:
    """RoPE tables of each layer kind at ``positions`` (computed once per forward)."""
    c = config
    return {
        SLIDING: rope_tables(positions, c.rope_local_theta, c.head_dim),
        GLOBAL: rope_tables(positions, c.rope_theta, c.head_dim, c.rope_scaling_factor),
    }


def _soft_cap(logits: jax.Array, cap: float | None) -> jax.Array:
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def _lm_head(params: Params, config: Gemma3Config, x: jax.Array) -> jax.Array:
    """``x: [..., hidden]`` -> final-normed, tied-embedding float32 logits ``[..., vocab]``."""
    x = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    logits = jnp.einsum("...h,vh->...v", x, params["embed"].astype(x.dtype))
    return _soft_cap(logits.astype(jnp.float32), config.final_logit_soft_cap)


def _select(x: jax.Array, logits_indices: jax.Array | None) -> jax.Array:
    """``x: [B, T, hidden]`` at ``logits_indices`` (``[B]`` -> ``[B, hidden]``; ``[B, K]`` ->
    ``[B, K, hidden]``), or all of it."""
    if logits_indices is None:
        return x
    if logits_indices.ndim == 1:
        return jnp.take_along_axis(x, logits_indices[:, None, None], axis=1)[:, 0]
    return jnp.take_along_axis(x, logits_indices[:, :, None], axis=1)


# --------------------------------------------------------------------------------------------
# Forward passes
# --------------------------------------------------------------------------------------------


def _check_inputs(owner, config, token_ids, cache, runtime, logits_indices):
    """Validate the arguments of ``gemma3_forward``; returns the runtime to use."""
    if not isinstance(config, Gemma3Config):
        raise TypeError(f"{owner}: config must be Gemma3Config, got {type(config).__name__}")
    v.check_array(owner, "token_ids", token_ids, (None, None))
    if not jnp.issubdtype(token_ids.dtype, jnp.integer):
        raise TypeError(f"{owner}: token_ids must be an int array, got {token_ids.dtype}")
    if token_ids.shape[1] < 1:
        raise ValueError(f"{owner}: token_ids must hold at least one token per row, got T=0")
    if not isinstance(cache, HybridCache):
        raise TypeError(
            f"{owner}: cache must be a HybridCache (build it with "
            f"HybridCache.init_cache(config.cache_metadata(...))), got {type(cache).__name__}"
        )
    if cache.metadata.layer_kinds != config.layer_kinds:
        raise ValueError(
            f"{owner}: the cache's layer kinds {cache.metadata.layer_kinds} do not match the "
            f"config's {config.layer_kinds}"
        )
    if cache.metadata.attention_backend == "paged":
        if not isinstance(runtime, HybridPagedRuntimeMetadata):
            raise TypeError(
                f"{owner}: a paged cache needs runtime=HybridPagedRuntimeMetadata "
                f"(jaxkv.engine.step_inputs.hybrid_paged_runtime), got {type(runtime).__name__}"
            )
        if token_ids.shape != runtime.token_index.shape:
            raise ValueError(
                f"{owner}: token_ids must be [batch, T] = {runtime.token_index.shape} like "
                f"runtime.token_index, got {token_ids.shape}"
            )
        full, sliding = cache.metadata.attention, cache.metadata.sliding_attention
        if (
            full is not None
            and sliding is not None
            and full.num_pages != sliding.num_pages
            and runtime.sliding_attention is None
        ):
            raise ValueError(
                f"{owner}: the sliding layers have their own pool ({sliding.num_pages} pages, "
                f"the global layers {full.num_pages}) but the runtime has no sliding_attention "
                f"part; schedule with jaxkv.engine.step_inputs.hybrid_page_managers(metadata) "
                f"and pass its HybridStep to hybrid_paged_runtime"
            )
    else:
        if runtime is None:
            runtime = HybridRuntimeMetadata.create()
        if not isinstance(runtime, HybridRuntimeMetadata):
            raise TypeError(
                f"{owner}: runtime must be HybridRuntimeMetadata or None for a contiguous "
                f"cache, got {type(runtime).__name__}"
            )
    if token_ids.shape[0] != cache.metadata.batch_size:
        raise ValueError(
            f"{owner}: token_ids has {token_ids.shape[0]} rows but the cache has batch_size="
            f"{cache.metadata.batch_size}"
        )
    if logits_indices is not None:
        if not hasattr(logits_indices, "ndim") or logits_indices.ndim not in (1, 2):
            raise ValueError(
                f"{owner}: logits_indices must be a [batch] or [batch, K] int array, got "
                f"{logits_indices!r:.80}"
            )
        v.check_array(
            owner,
            "logits_indices",
            logits_indices,
            (token_ids.shape[0],) + (None,) * (logits_indices.ndim - 1),
        )
        if not jnp.issubdtype(logits_indices.dtype, jnp.integer):
            raise TypeError(
                f"{owner}: logits_indices must be an int array, got {logits_indices.dtype}"
            )
    return runtime


def gemma3_forward(
    params: Params,
    config: Gemma3Config,
    token_ids: jax.Array,
    cache: HybridCache,
    runtime: HybridRuntimeMetadata | HybridPagedRuntimeMetadata | None = None,
    *,
    logits_indices: jax.Array | None = None,
    compute_dtype: Any = jnp.float32,
) -> tuple[jax.Array, HybridCache]:
    """Run ``T >= 1`` new tokens per row through the model, writing their keys/values.

    Activations stay in the ``[B, T]`` layout; with the paged backend each attention layer
    moves its input into the step's packed token axis (``runtime.attention_inputs``) and its
    output back, so both backends run the same code.

    Args:
        params: from ``gemma3_params_to_device``.
        config: the model's ``Gemma3Config`` (static under jit).
        token_ids: ``[B, T]`` int token ids; padding entries (per ``runtime``) may hold any id.
            With the paged backend, ``runtime.batch_token_ids()`` (row ``r`` = slot ``r``).
        cache: ``HybridCache.init_cache(config.cache_metadata(...))`` (or its later state).
        runtime: contiguous backend: ``HybridRuntimeMetadata.create(new_lengths,
            padding_side)`` (``None``: every token real); paged backend (required): the step's
            ``jaxkv.engine.step_inputs.hybrid_paged_runtime(...)``.
        logits_indices: ``[B]`` (one token per row) or ``[B, K]`` (``K`` per row) indices into
            the ``T`` axis where logits are wanted; ``None``: every token.
        compute_dtype: dtype of activations and matmuls (norms and softmax run in float32).

    Returns:
        ``(logits, new_cache)``: float32 logits ``[B, T, vocab]``, ``[B, vocab]`` or ``[B, K,
        vocab]`` (meaningless at padding tokens). A row the cache refuses (a contiguous write
        past ``max_length``) is untouched in every layer and gets NaN logits; under ``jit``
        the refusal is flagged in the cache (``check_overflow``).

    Raises:
        TypeError, ValueError: an argument of the wrong type or shape (named).
        CacheOverflowError: (eager calls, contiguous backend) a row would pass ``max_length``.
    """
    owner = "gemma3_forward"
    runtime = _check_inputs(owner, config, token_ids, cache, runtime, logits_indices)
    c = config
    cache, runtime, refused = cache.admit(runtime, token_ids.shape[1])
    x = _embed(params, c, token_ids, compute_dtype)  # [B, T, hidden]
    paged = isinstance(runtime, HybridPagedRuntimeMetadata)
    # Positions in the attention layout: [B, T] (contiguous) or the packed [N] (paged).
    num_attention_tokens = runtime.num_tokens if paged else token_ids.shape[1]
    positions = cache.views[0].query_positions(
        runtime.for_kind(c.layer_kinds[0]), num_attention_tokens
    )
    rope = _rope_for_layers(jnp.maximum(positions, 0), c)
    scale = c.query_pre_attn_scalar**-0.5
    views = list(cache.views)
    for index, (kind, layer) in enumerate(zip(c.layer_kinds, params["layers"], strict=True)):
        h = rms_norm(x, layer["attn_norm"], c.rms_norm_eps)
        q, k, value = _project(runtime.attention_inputs(h), layer, c)  # [..., heads, D]
        q, k = apply_rope(q, rope[kind]), apply_rope(k, rope[kind])
        kv, views[index] = views[index].concatenate_to_cache(k, value, runtime.for_kind(kind))
        out = attention(
            q,
            kv,
            scale=scale,
            logit_soft_cap=c.attn_logit_soft_cap,
            sliding_window=c.sliding_window if kind == SLIDING else None,
        )
        out = _linear(out.reshape(*out.shape[:-2], -1), layer["wo"])
        out = runtime.attention_outputs(out)  # [B, T, hidden]
        x = x + rms_norm(out, layer["post_attn_norm"], c.rms_norm_eps)
        x = x + _mlp(x, layer, c)
    logits = _lm_head(params, c, _select(x, logits_indices))
    refused = refused.reshape(refused.shape + (1,) * (logits.ndim - 1))
    return jnp.where(refused, jnp.nan, logits), cache.with_views(views)


def gemma3_forward_uncached(
    params: Params, config: Gemma3Config, token_ids: jax.Array
) -> jax.Array:
    """Reference forward over whole sequences with dense (windowed) causal attention, no cache.

    Args:
        params: from ``gemma3_params_to_device``.
        config: the model's ``Gemma3Config``.
        token_ids: ``[B, L]`` int32, every token real.

    Returns:
        float32 logits ``[B, L, vocab]``.

    Raises:
        TypeError, ValueError: ``token_ids`` is not a ``[B, L]`` int array.
    """
    owner = "gemma3_forward_uncached"
    v.check_array(owner, "token_ids", token_ids, (None, None))
    if not jnp.issubdtype(token_ids.dtype, jnp.integer):
        raise TypeError(f"{owner}: token_ids must be an int array, got {token_ids.dtype}")
    c = config
    batch, length = token_ids.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    rope = _rope_for_layers(positions, c)
    query_pos, key_pos = np.arange(length)[:, None], np.arange(length)[None, :]
    causal = key_pos <= query_pos
    visible = {GLOBAL: causal, SLIDING: causal & (query_pos - key_pos < c.sliding_window)}
    groups = c.num_heads // c.num_kv_heads
    x = _embed(params, c, token_ids, jnp.float32)
    for kind, layer in zip(c.layer_kinds, params["layers"], strict=True):
        q, k, value = _project(rms_norm(x, layer["attn_norm"], c.rms_norm_eps), layer, c)
        q, k = apply_rope(q, rope[kind]), apply_rope(k, rope[kind])
        k, value = jnp.repeat(k, groups, axis=2), jnp.repeat(value, groups, axis=2)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * c.query_pre_attn_scalar**-0.5
        logits = _soft_cap(logits, c.attn_logit_soft_cap)
        logits = jnp.where(jnp.asarray(visible[kind]), logits, -jnp.inf)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), value)
        out = _linear(out.reshape(batch, length, -1), layer["wo"])
        x = x + rms_norm(out, layer["post_attn_norm"], c.rms_norm_eps)
        x = x + _mlp(x, layer, c)
    return _lm_head(params, c, x)
