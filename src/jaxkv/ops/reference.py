"""A plain, dense reference attention (NumPy, float64) that tests compare every cache against."""

from __future__ import annotations

import numpy as np


def naive_attention(
    query: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    query_positions: np.ndarray,
    key_positions: np.ndarray,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    logit_soft_cap: float | None = None,
) -> np.ndarray:
    """Dense masked attention by absolute position, computed in float64.

    Args:
        query: ``[batch, T, query_heads, key_dim]``.
        keys: ``[batch, S, key_heads, key_dim]``; values: ``[batch, S, value_heads, value_dim]``.
        query_positions: ``[batch, T]`` (``-1`` = padding query, output zeros).
        key_positions: ``[batch, S]`` (``-1`` = empty slot).
        scale, sliding_window, logit_soft_cap: as in ``jaxkv.ops.attention``.

    Returns:
        ``[batch, T, query_heads, value_dim]`` float64.
    """
    q = np.asarray(query, np.float64)
    k = np.asarray(keys, np.float64)
    v = np.asarray(values, np.float64)
    query_heads, key_dim = q.shape[2], q.shape[3]
    k = np.repeat(k, query_heads // k.shape[2], axis=2)
    v = np.repeat(v, query_heads // v.shape[2], axis=2)
    scale = key_dim**-0.5 if scale is None else scale
    logits = np.einsum("bthd,bshd->bhts", q, k) * scale
    if logit_soft_cap is not None:
        logits = logit_soft_cap * np.tanh(logits / logit_soft_cap)
    qp = np.asarray(query_positions)[:, None, :, None]
    kp = np.asarray(key_positions)[:, None, None, :]
    visible = (kp >= 0) & (qp >= 0) & (kp <= qp)
    if sliding_window is not None:
        visible &= qp - kp < sliding_window
    logits = np.where(visible, logits, -np.inf)
    peak = np.max(logits, axis=-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    weights = np.exp(logits - peak)
    total = weights.sum(-1, keepdims=True)
    weights = weights / np.where(total > 0, total, 1.0)
    return np.einsum("bhts,bshd->bthd", weights, v)
