"""A tiny hybrid decoder with random weights: a stack mixing attention (full or sliding window),
Mamba, Mamba2 and linear-attention layers, written against ``jaxkv.caches.hybrid.HybridCache``.

Each block is ``h += mixer(rms_norm(h)); h += mlp(rms_norm(h))`` with a SwiGLU MLP; the mixer
follows the layer's kind (``"none"``: no mixer, MLP only). Attention layers use RoPE and
grouped-query attention. ``hybrid_forward`` runs whole sequences without a cache (dense causal
attention, recurrent layers scanned from a zero state); ``hybrid_forward_cached`` runs a chunk of
``T >= 1`` tokens per row through a ``HybridCache``, reading attention with
``jaxkv.ops.attention.attention``. The two agree, which the tests check.

The cached forward runs either attention backend. Activations live in the ``[batch, T]`` layout
throughout; with the ``"paged"`` backend each attention layer gathers its input into the step's
packed ``[num_tokens]`` axis (``runtime.attention_inputs``), writes and attends there, and
scatters its output back (``runtime.attention_outputs``), while recurrent layers and MLPs stay
in ``[batch, T]``. Both backends run the same code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxkv import _validation as v
from jaxkv._sizes import ceil_div
from jaxkv.caches.hybrid import (
    ATTENTION_KINDS,
    LAYER_KINDS,
    HybridCache,
    HybridCacheMetadata,
    HybridPagedRuntimeMetadata,
    HybridRuntimeMetadata,
)
from jaxkv.models import linear_attention as linear
from jaxkv.models import mamba, mamba2
from jaxkv.models.linear_attention import rms_norm
from jaxkv.models.mamba import centered, dense_init, draw_uniform
from jaxkv.ops.attention import attention

ATTENTION_WEIGHTS = ("q_proj", "k_proj", "v_proj", "out_proj")
_NEEDS_CONFIG = {"mamba": "mamba", "mamba2": "mamba2", "linear_attention": "linear_attention"}


@dataclasses.dataclass(frozen=True)
class HybridConfig:
    """Shape of a tiny hybrid decoder.

    Attributes:
        vocab_size, hidden_size, mlp_size: embedding rows, residual width, SwiGLU width.
        layer_kinds: one of ``jaxkv.caches.hybrid.LAYER_KINDS`` per layer.
        num_heads, num_kv_heads, head_dim: attention heads (``num_kv_heads`` divides
            ``num_heads``).
        sliding_window: window of ``"sliding_attention"`` layers (required when there are any).
        rope_theta: RoPE base.
        mamba, mamba2, linear_attention: the mixer config of each recurrent kind in use
            (``hidden_size`` must match).
        attention_block_size: key slots per step of the cached attention read.
    """

    vocab_size: int
    hidden_size: int
    layer_kinds: tuple[str, ...]
    mlp_size: int = 32
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 8
    sliding_window: int | None = None
    rope_theta: float = 10000.0
    mamba: mamba.MambaConfig | None = None
    mamba2: mamba2.Mamba2Config | None = None
    linear_attention: linear.LinearAttentionConfig | None = None
    attention_block_size: int = 16

    def __post_init__(self) -> None:
        owner = "HybridConfig"
        kinds = self.layer_kinds
        if isinstance(kinds, str) or not isinstance(kinds, tuple | list) or not kinds:
            raise TypeError(f"{owner}: layer_kinds must be a non-empty tuple, got {kinds!r}")
        object.__setattr__(self, "layer_kinds", tuple(kinds))
        for index, kind in enumerate(self.layer_kinds):
            if kind not in LAYER_KINDS:
                raise ValueError(
                    f"{owner}: layer_kinds[{index}] must be one of {LAYER_KINDS}, got {kind!r}"
                )
        for name in ("vocab_size", "hidden_size", "mlp_size", "num_heads", "num_kv_heads"):
            v.require_int(owner, name, getattr(self, name), minimum=1)
        v.require_int(owner, "head_dim", self.head_dim, minimum=2)
        v.require_int(owner, "attention_block_size", self.attention_block_size, minimum=1)
        if self.head_dim % 2:
            raise ValueError(f"{owner}: head_dim must be even for RoPE, got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{owner}: num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}"
            )
        v.require_optional_int(owner, "sliding_window", self.sliding_window, minimum=1)
        if "sliding_attention" in self.layer_kinds and self.sliding_window is None:
            raise ValueError(f"{owner}: sliding_window must be set for sliding_attention layers")
        for kind, field in _NEEDS_CONFIG.items():
            sub = getattr(self, field)
            if kind in self.layer_kinds and sub is None:
                raise ValueError(f"{owner}: {field} config required by the {kind!r} layers")
            if sub is not None and sub.hidden_size != self.hidden_size:
                raise ValueError(
                    f"{owner}: {field}.hidden_size={sub.hidden_size} must equal "
                    f"hidden_size={self.hidden_size}"
                )

    def cache_metadata(
        self,
        batch_size: int,
        max_length: int,
        *,
        dtype: Any = jnp.float32,
        attention_backend: str = "contiguous",
        page_size: int = 16,
        num_pages: int | None = None,
        rollback_depth: int = 0,
    ) -> HybridCacheMetadata:
        """Cache metadata for this stack: attention layers hold up to ``max_length`` tokens per
        row; every cache (KV and recurrent states) is stored in ``dtype``. ``rollback_depth``
        goes to the layers that need it to ``truncate`` (sliding-window rings of the contiguous
        backend and the recurrent layers): the whole stack can then forget up to that many of
        its last tokens.

        With ``attention_backend="paged"``, ``batch_size`` is also the ``max_num_seqs`` of every
        step; each attention layer gets a pool of ``num_pages`` pages of ``page_size`` tokens
        (default: ``batch_size * ceil(max_length / page_size)``, every sequence's worst case) and
        a sequence holds up to ``ceil(max_length / page_size)`` pages.
        """
        owner = "HybridConfig.cache_metadata"
        kinds = self.layer_kinds
        v.require_choice(owner, "attention_backend", attention_backend, ("contiguous", "paged"))
        v.require_int(owner, "max_length", max_length, minimum=1)
        heads = dict(num_kv_heads=self.num_kv_heads, head_dim=self.head_dim)
        if attention_backend == "paged":
            v.require_int(owner, "page_size", page_size, minimum=1)
            v.require_int(owner, "batch_size", batch_size, minimum=1)
            max_pages_per_seq = ceil_div(max_length, page_size)
            if num_pages is None:
                num_pages = batch_size * max_pages_per_seq
            attention_settings = dict(
                heads, num_pages=num_pages, page_size=page_size, max_pages_per_seq=max_pages_per_seq
            )
        else:
            attention_settings = dict(heads, max_length=max_length)
        count = kinds.count
        sliding_settings = dict(attention_settings, sliding_window=self.sliding_window, dtype=dtype)
        if attention_backend == "contiguous":
            sliding_settings["rollback_depth"] = rollback_depth
        depth = dict(dtype=dtype, rollback_depth=rollback_depth)
        return HybridCacheMetadata.create(
            kinds,
            batch_size=batch_size,
            attention_backend=attention_backend,
            attention=dict(attention_settings, dtype=dtype) if "attention" in kinds else None,
            sliding_attention=sliding_settings if "sliding_attention" in kinds else None,
            mamba=self.mamba.cache_metadata(batch_size, count("mamba"), **depth)
            if "mamba" in kinds
            else None,
            mamba2=self.mamba2.cache_metadata(batch_size, count("mamba2"), **depth)
            if "mamba2" in kinds
            else None,
            linear_attention=(
                self.linear_attention.cache_metadata(batch_size, count("linear_attention"), **depth)
                if "linear_attention" in kinds
                else None
            ),
        )


def init_hybrid(key: jax.Array, config: HybridConfig) -> dict[str, Any]:
    """Random float32 weights: ``embed [vocab, hidden]``, ``final_norm [hidden]``, ``lm_head
    [hidden, vocab]`` and ``layers``, one dict per layer with ``mixer_norm``/``mlp_norm
    [hidden]``, ``gate``/``up [hidden, mlp]``, ``down [mlp, hidden]`` and ``mixer`` (the kind's
    weights: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` for attention; absent for
    ``"none"``)."""
    if not isinstance(config, HybridConfig):
        raise TypeError(f"init_hybrid: config must be HybridConfig, got {type(config).__name__}")
    c = config
    keys = jax.random.split(key, 1 + len(c.layer_kinds))
    q_width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    u = draw_uniform(
        keys[0],
        {
            "embed": (c.vocab_size, c.hidden_size),
            "final_norm": (c.hidden_size,),
            "lm_head": (c.hidden_size, c.vocab_size),
        },
    )
    layers = []
    for kind, layer_key in zip(c.layer_kinds, keys[1:], strict=True):
        mixer_key, own_key = jax.random.split(layer_key)
        shapes = {
            "mixer_norm": (c.hidden_size,),
            "mlp_norm": (c.hidden_size,),
            "gate": (c.hidden_size, c.mlp_size),
            "up": (c.hidden_size, c.mlp_size),
            "down": (c.mlp_size, c.hidden_size),
        }
        if kind in ATTENTION_KINDS:
            shapes.update(
                q_proj=(c.hidden_size, q_width),
                k_proj=(c.hidden_size, kv_width),
                v_proj=(c.hidden_size, kv_width),
                out_proj=(q_width, c.hidden_size),
            )
        w = draw_uniform(own_key, shapes)
        layer = {
            "mixer_norm": 1.0 + centered(w["mixer_norm"], 0.1),
            "mlp_norm": 1.0 + centered(w["mlp_norm"], 0.1),
            "gate": dense_init(w["gate"]),
            "up": dense_init(w["up"]),
            "down": dense_init(w["down"]),
        }
        if kind in ATTENTION_KINDS:
            layer["mixer"] = {name: dense_init(w[name]) for name in ATTENTION_WEIGHTS}
        elif kind == "mamba":
            layer["mixer"] = mamba.init_mamba(mixer_key, c.mamba)
        elif kind == "mamba2":
            layer["mixer"] = mamba2.init_mamba2(mixer_key, c.mamba2)
        elif kind == "linear_attention":
            layer["mixer"] = linear.init_linear_attention(mixer_key, c.linear_attention)
        layers.append(layer)
    return {
        "embed": centered(u["embed"], 1.0),
        "final_norm": 1.0 + centered(u["final_norm"], 0.1),
        "lm_head": dense_init(u["lm_head"]),
        "layers": layers,
    }


# --------------------------------------------------------------------------------------------
# Attention mixer
# --------------------------------------------------------------------------------------------


def _rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate ``x: [..., heads, head_dim]`` by ``positions: [...]`` (half-split)."""
    half = x.shape[-1] // 2
    inverse = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None, None] * inverse  # [..., 1, half]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    first, second = x[..., :half], x[..., half:]
    return jnp.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)


def _qkv(params, config, hidden, positions):
    """``hidden: [..., hidden]`` -> q ``[..., heads, D]``, k and v ``[..., kv_heads, D]``."""
    c = config
    lead = hidden.shape[:-1]
    q = (hidden @ params["q_proj"]).reshape(*lead, c.num_heads, c.head_dim)
    k = (hidden @ params["k_proj"]).reshape(*lead, c.num_kv_heads, c.head_dim)
    value = (hidden @ params["v_proj"]).reshape(*lead, c.num_kv_heads, c.head_dim)
    return _rope(q, positions, c.rope_theta), _rope(k, positions, c.rope_theta), value


def _attention_full(params, config, hidden, window):
    """Dense causal (optionally windowed) attention over whole sequences."""
    c = config
    batch, length, _ = hidden.shape
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    q, k, value = _qkv(params, c, hidden, positions)
    groups = c.num_heads // c.num_kv_heads
    k, value = jnp.repeat(k, groups, axis=2), jnp.repeat(value, groups, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, k) * c.head_dim**-0.5
    query_pos, key_pos = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
    visible = key_pos <= query_pos
    if window is not None:
        visible &= query_pos - key_pos < window
    probs = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
    out = jnp.einsum("bhts,bshd->bthd", probs, value)
    return out.reshape(batch, length, -1) @ params["out_proj"]


def _attention_cached(params, config, hidden, view, runtime):
    """One attention layer through its cache view, whatever the backend: ``hidden: [batch, T,
    hidden]`` goes to the layout the backend's views write (``runtime.attention_inputs``: the
    same ``[batch, T]`` rows, or the paged step's packed ``[N]`` axis) and comes back."""
    c = config
    x = runtime.attention_inputs(hidden)  # [..., hidden]
    part = runtime.for_kind("attention")
    positions = view.query_positions(part, x.shape[-2])  # [...], -1 for padding
    q, k, value = _qkv(params, c, x, jnp.maximum(positions, 0))
    kv, view = view.concatenate_to_cache(k, value, part)
    out = attention(q, kv, block_size=c.attention_block_size)  # [..., heads, head_dim]
    out = out.reshape(*out.shape[:-2], -1) @ params["out_proj"]
    return runtime.attention_outputs(out), view


# --------------------------------------------------------------------------------------------
# The stack
# --------------------------------------------------------------------------------------------


def _mlp(layer, hidden):
    x = rms_norm(hidden, layer["mlp_norm"])
    return (jax.nn.silu(x @ layer["gate"]) * (x @ layer["up"])) @ layer["down"]


def _check_tokens(owner: str, tokens: Any, config: HybridConfig) -> None:
    v.check_array(owner, "tokens", tokens, (None, None))
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"{owner}: tokens must be an int array, got {tokens.dtype}")
    if tokens.shape[1] < 1:
        raise ValueError(f"{owner}: tokens must hold at least one token per row, got T=0")


def _logits(params, hidden):
    return rms_norm(hidden, params["final_norm"]) @ params["lm_head"]


def hybrid_forward(params: dict[str, Any], config: HybridConfig, tokens: jax.Array) -> jax.Array:
    """Whole sequences, no cache.

    Args:
        tokens: ``[batch, L]`` int token ids, every token real.

    Returns:
        ``[batch, L, vocab_size]`` float32 logits.
    """
    _check_tokens("hybrid_forward", tokens, config)
    c = config
    hidden = params["embed"][tokens]
    for kind, layer in zip(c.layer_kinds, params["layers"], strict=True):
        if kind != "none":
            x = rms_norm(hidden, layer["mixer_norm"])
            if kind == "attention":
                x = _attention_full(layer["mixer"], c, x, None)
            elif kind == "sliding_attention":
                x = _attention_full(layer["mixer"], c, x, c.sliding_window)
            elif kind == "mamba":
                x = mamba.mamba_forward(layer["mixer"], c.mamba, x)
            elif kind == "mamba2":
                x = mamba2.mamba2_forward(layer["mixer"], c.mamba2, x)
            else:
                x = linear.linear_attention_forward(layer["mixer"], c.linear_attention, x)
            hidden = hidden + x
        hidden = hidden + _mlp(layer, hidden)
    return _logits(params, hidden)


def hybrid_forward_cached(
    params: dict[str, Any],
    config: HybridConfig,
    tokens: jax.Array,
    cache: HybridCache,
    runtime: HybridRuntimeMetadata | HybridPagedRuntimeMetadata | None = None,
) -> tuple[jax.Array, HybridCache]:
    """A chunk of ``T >= 1`` tokens per row through ``cache``.

    Args:
        tokens: ``[batch, T]`` int token ids; padding tokens (per ``runtime``) may hold any id.
            With the paged backend, ``runtime.batch_token_ids()`` gives them (row ``r`` = slot
            ``r``, ``T = runtime.width``).
        cache: a ``HybridCache`` built from ``config.cache_metadata(...)``.
        runtime: contiguous backend: which tokens of each row are real
            (``HybridRuntimeMetadata.create``; default: all). Paged backend (required): the
            step's ``jaxkv.engine.step_inputs.hybrid_paged_runtime(...)``; its copy ops are
            applied by the paged views before their writes.

    Returns:
        ``(logits, new_cache)``: ``logits: [batch, T, vocab_size]`` (meaningless at padding
        tokens; ``runtime.to_packed(logits)[runtime.attention.logits_indices]`` gives each
        scheduled sequence's last logits with the paged backend). A row the cache refuses
        (``HybridCache.admit``: an attention overflow, or a paged slot whose recurrent state does
        not match its pages) is untouched in every layer and gets NaN logits; eagerly the
        refusal raises, under ``jax.jit`` a contiguous overflow is also flagged in the cache
        (``HybridCache.check_overflow``).
    """
    owner = "hybrid_forward_cached"
    _check_tokens(owner, tokens, config)
    if not isinstance(cache, HybridCache):
        raise TypeError(f"{owner}: cache must be HybridCache, got {type(cache).__name__}")
    if cache.metadata.layer_kinds != config.layer_kinds:
        raise ValueError(
            f"{owner}: the cache's layer kinds {cache.metadata.layer_kinds} do not match the "
            f"config's {config.layer_kinds}"
        )
    if cache.metadata.attention_backend == "paged":
        if not isinstance(runtime, HybridPagedRuntimeMetadata):
            raise TypeError(
                f"{owner}: a paged cache needs runtime=HybridPagedMetadata, "
                f"got {type(runtime).__name__}"
            )
        if runtime.batch_size != cache.metadata.batch_size:
            raise ValueError(
                f"{owner}: runtime has {runtime.batch_size} slots but the cache has batch_size="
                f"{cache.metadata.batch_size}"
            )
        if tokens.shape != runtime.token_index.shape:
            raise ValueError(
                f"{owner}: tokens must be [batch, T] = {runtime.token_index.shape} like "
                f"runtime.token_index, got {tokens.shape}"
            )
    else:
        if runtime is None:
            runtime = HybridRuntimeMetadata.create()
        if not isinstance(runtime, HybridRuntimeMetadata):
            raise TypeError(
                f"{owner}: runtime must be HybridMetadata, got {type(runtime).__name__}"
            )
    # One decision for every layer: a row any layer would refuse takes no token anywhere.
    cache, runtime, refused = cache.admit(runtime, tokens.shape[1])
    c = config
    hidden = params["embed"][tokens]
    views = list(cache.views)
    for index, (kind, layer) in enumerate(zip(c.layer_kinds, params["layers"], strict=True)):
        if kind != "none":
            x = rms_norm(hidden, layer["mixer_norm"])
            part = runtime.for_kind(kind)
            view = views[index]
            if kind in ATTENTION_KINDS:
                x, views[index] = _attention_cached(layer["mixer"], c, x, view, runtime)
            elif kind == "mamba":
                x, views[index] = mamba.mamba_cached(layer["mixer"], c.mamba, x, view, part)
            elif kind == "mamba2":
                x, views[index] = mamba2.mamba2_cached(layer["mixer"], c.mamba2, x, view, part)
            else:
                x, views[index] = linear.linear_attention_cached(
                    layer["mixer"], c.linear_attention, x, view, part
                )
            hidden = hidden + x
        hidden = hidden + _mlp(layer, hidden)
    logits = jnp.where(refused[:, None, None], jnp.nan, _logits(params, hidden))
    return logits, cache.with_views(views)
