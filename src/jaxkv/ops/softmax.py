"""The online (streaming) softmax both attention kernels fold key blocks into, and the block
sizing rule they share.

A kernel starts from ``init_softmax_state``, folds each block of keys in with
``online_softmax_update`` (running max, denominator and unnormalised output, all float32) and
normalises with ``finish_softmax``. ``two_block_size`` picks the block actually scanned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxkv._sizes import ceil_div

DEFAULT_BLOCK_SIZE = 256
"""Key slots a kernel reads per loop step unless told otherwise, when several queries of a row
attend together (prefill, verification)."""

DECODE_BLOCK_SIZE = 512
"""Key slots per loop step when every row has one query (decode). A decode block is cheap to
attend, so the loop's fixed cost per block matters: on XLA's CPU backend 512-slot blocks take
about a third less time than 256-slot ones at 1 x 8,192 live tokens and about a fifth less at
8 x 2,048, while larger blocks are slower again (``benchmarks/long_context.py``)."""


def default_block_size(queries_per_row: int) -> int:
    """The block a kernel scans when its caller gives none: ``DECODE_BLOCK_SIZE`` for one query
    per row, ``DEFAULT_BLOCK_SIZE`` otherwise."""
    return DECODE_BLOCK_SIZE if queries_per_row == 1 else DEFAULT_BLOCK_SIZE


def check_options(
    owner: str,
    *,
    scale: float | None,
    logit_soft_cap: float | None,
    sliding_window: int | None,
    block: tuple[str, int | None],
) -> None:
    """The attention options both kernels take: a finite ``scale``, a positive
    ``logit_soft_cap``, a ``sliding_window >= 1`` and a block size ``>= 1`` (``block`` is its
    ``(name, value)``), each ``None`` for the default."""

    def number(value: object) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    if scale is not None and not (number(scale) and math.isfinite(scale)):
        raise ValueError(f"{owner}: scale must be a finite float or None, got {scale!r}")
    if logit_soft_cap is not None and not (
        number(logit_soft_cap) and math.isfinite(logit_soft_cap) and logit_soft_cap > 0
    ):
        raise ValueError(f"{owner}: logit_soft_cap must be > 0, got {logit_soft_cap!r}")
    for name, value in (("sliding_window", sliding_window), block):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{owner}: {name} must be an int >= 1, got {value!r}")


def combine_windows(first: int | None, second: int | None) -> int | None:
    """The narrower of two optional sliding windows (``None``: no window)."""
    windows = [w for w in (first, second) if w is not None]
    return min(windows) if windows else None


SoftmaxState = tuple[jax.Array, jax.Array, jax.Array]
"""Online-softmax carry: running max and denominator, float32, and the unnormalised output,
float32 with a trailing ``value_dim``. Their query axes are ``[batch, heads, new_tokens, groups]``
when there are several new tokens (prefill) and ``[batch, heads, groups, 1]`` for one (decode):
XLA's CPU backend runs each kind of step fastest in its own order (prefill attention about a third
faster tokens-first; batch-8 decode with 4 groups of 128-dim heads about a quarter faster
groups-first). ``init_softmax_state`` / ``finish_softmax`` pick and undo the order."""


def _token_major(new_tokens: int) -> bool:
    return new_tokens > 1


def init_softmax_state(
    batch: int, heads: int, groups: int, new_tokens: int, value_dim: int
) -> SoftmaxState:
    """The empty online-softmax carry (no key seen yet)."""
    if _token_major(new_tokens):
        axes = (batch, heads, new_tokens, groups)
    else:
        axes = (batch, heads, groups, new_tokens)
    return (
        jnp.full(axes, -jnp.inf, jnp.float32),
        jnp.zeros(axes, jnp.float32),
        jnp.zeros((*axes, value_dim), jnp.float32),
    )


def online_softmax_update(
    state: SoftmaxState,
    q: jax.Array | Sequence[jax.Array],
    keys: jax.Array | Sequence[jax.Array],
    values: jax.Array | Sequence[jax.Array],
    visible: jax.Array,
    *,
    soft_cap: float | None,
    slots_first: bool = True,
) -> SoftmaxState:
    """Fold one block of keys into the online-softmax carry.

    Args:
        state: the carry (see ``SoftmaxState``).
        q: ``[batch, new_tokens, heads, groups, key_dim]`` float32, already scaled; or its
            channel runs (``codec.split_query``), matching those of ``keys``.
        keys: ``[batch, slots, heads, key_dim]`` float32, or its channel runs
            (``codec.decode_parts``): the logits sum over the runs.
        values: ``[batch, slots, heads, value_dim]`` float32, or its channel runs: the
            accumulator holds them side by side.
        visible: ``[batch, new_tokens, slots]`` bool, which keys each query may see.
        soft_cap: if set, logits become ``cap * tanh(logits / cap)``.
        slots_first: ``False`` when ``keys`` and ``values`` come heads first,
            ``[batch, heads, slots, dim]``.
    """
    q_runs, key_runs, value_runs = _runs(q, keys, values)
    token_major = _token_major(q_runs[0].shape[1])
    query_axes = "tg" if token_major else "gt"
    block = "bshd" if slots_first else "bhsd"
    # Slots no query may see can hold stale or uninitialised data; zero them so that even a NaN
    # there cannot reach the output through 0 * NaN.
    slot_used = jnp.any(visible, axis=1)[:, :, None, None]
    if not slots_first:
        slot_used = slot_used.reshape(slot_used.shape[0], 1, -1, 1)
    value_runs = [jnp.where(slot_used, run, 0.0) for run in value_runs]
    logits = sum(
        jnp.einsum(f"bthgd,{block}->bh{query_axes}s", q_run, key_run)
        for q_run, key_run in zip(q_runs, key_runs, strict=True)
    )

    def weigh(probs):
        return [
            jnp.einsum(f"bh{query_axes}s,{block}->bh{query_axes}d", probs, v) for v in value_runs
        ]

    return _fold(state, logits, visible, weigh, token_major=token_major, soft_cap=soft_cap)


def online_softmax_update_pages(
    state: SoftmaxState,
    q: jax.Array | Sequence[jax.Array],
    keys: jax.Array | Sequence[jax.Array],
    values: jax.Array | Sequence[jax.Array],
    visible: jax.Array,
    *,
    soft_cap: float | None,
) -> SoftmaxState:
    """``online_softmax_update`` for one query per row over a block of whole pages, read in the
    pool's own layout.

    Each page's keys are a small matrix of their own here: the products run batched over rows,
    pages and heads, so the block is used where the page gather put it. Attending the block as
    one ``[slots, dim]`` run per head instead needs a heads-major copy of every gathered block
    first, and on XLA's CPU backend that copy, not the arithmetic, was most of a batch-1 decode
    step at long contexts (``benchmarks/long_context.py``).

    Args:
        state: the decode carry (see ``SoftmaxState``).
        q: ``[batch, pages, heads, groups, key_dim]`` float32, already scaled: each row's one
            query repeated for every page of the block (made once, outside the block loop), or
            its channel runs.
        keys: ``[batch, pages, heads, page_size, key_dim]`` float32, or its channel runs.
        values: ``[batch, pages, heads, page_size, value_dim]`` float32, or its channel runs.
        visible: ``[batch, 1, pages * page_size]`` bool, in page-then-offset order.
        soft_cap: as for ``online_softmax_update``.
    """
    q_runs, key_runs, value_runs = _runs(q, keys, values)
    batch, pages, heads, page_size, _ = key_runs[0].shape
    groups = q_runs[0].shape[3]
    slot_used = jnp.any(visible, axis=1).reshape(batch, pages, 1, page_size, 1)
    value_runs = [jnp.where(slot_used, run, 0.0) for run in value_runs]
    logits = sum(
        jnp.einsum("bnhgd,bnhpd->bnhgp", q_run, key_run)
        for q_run, key_run in zip(q_runs, key_runs, strict=True)
    )
    # -> [batch, heads, groups, 1, slots], the decode carry's order.
    logits = logits.transpose(0, 2, 3, 1, 4).reshape(batch, heads, groups, 1, pages * page_size)

    def weigh(probs):
        per_page = probs.reshape(batch, heads, groups, pages, page_size).transpose(0, 3, 1, 2, 4)
        # One product per page, summed after: contracting pages and offsets in one product
        # would make XLA lay the values out heads first again.
        return [
            jnp.einsum("bnhgp,bnhpd->bnhgd", per_page, v).sum(axis=1)[:, :, :, None, :]
            for v in value_runs
        ]

    return _fold(state, logits, visible, weigh, token_major=False, soft_cap=soft_cap)


def _runs(*parts):
    """Each of ``parts`` as a tuple of channel runs (a single array is one run)."""
    return tuple((x,) if isinstance(x, jax.Array) else tuple(x) for x in parts)


def _fold(state, logits, visible, weigh, *, token_major, soft_cap):
    """The carry after one block: ``logits`` ``[batch, heads, <query axes>, slots]`` (the
    carry's order) masked by ``visible`` ``[batch, new_tokens, slots]``; ``weigh(probs)`` gives
    the probability-weighted value runs, ``[batch, heads, <query axes>, dim]`` each."""
    running_max, denominator, accumulator = state
    if token_major:
        visible = visible[:, None, :, None, :]
    else:
        visible = visible[:, None, None, :, :]
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    logits = jnp.where(visible, logits, -jnp.inf)
    new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
    # A query that has seen no visible key yet keeps max -inf; use 0 so exp() stays finite.
    safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
    probs = jnp.exp(logits - safe_max[..., None])
    correction = jnp.exp(running_max - safe_max)
    denominator = denominator * correction + jnp.sum(probs, axis=-1)
    weighted = weigh(probs)
    weighted = weighted[0] if len(weighted) == 1 else jnp.concatenate(weighted, axis=-1)
    accumulator = accumulator * correction[..., None] + weighted
    return new_max, denominator, accumulator


def finish_softmax(state: SoftmaxState, new_tokens: int) -> jax.Array:
    """Normalise the carry of ``new_tokens`` queries: ``[batch, new_tokens, heads * groups,
    value_dim]`` float32; queries that saw no key (padding) give zeros."""
    _, denominator, accumulator = state
    out = accumulator / jnp.where(denominator > 0, denominator, 1.0)[..., None]
    if _token_major(new_tokens):
        batch, heads, _, groups, value_dim = out.shape
        out = out.transpose(0, 2, 1, 3, 4)
    else:
        batch, heads, groups, _, value_dim = out.shape
        out = out.transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, new_tokens, heads * groups, value_dim)


def two_block_size(block_size: int, length: int) -> int:
    """The block actually scanned over ``length`` slots (or pages): ``block_size``, but at most
    half of ``length`` (rounded up) so that a loop always has room for two blocks.

    With a single block covering everything, the block's start is loop-invariant and XLA hoists
    the reads out of the loop: the contiguous step gets slower (about twice the attention time of
    a batch-8 decode at 256 slots), and in a paged step the hoisted page gather fuses with the
    step's write into the pool, forcing a copy of the whole pool.
    """
    return min(block_size, max(1, ceil_div(length, 2)))
