"""Step inputs: the host's step plan (``jaxkv.pages.StepMetadata``) turned into the device
runtime metadata a jitted step takes. The caches take device arrays only; this is where the host
plan crosses over.

* ``paged_runtime(step)`` -> ``PagedRuntimeMetadata`` for a paged cache;
* ``hybrid_page_manager(metadata)`` -> the ``PageManager`` of a hybrid paged stack (prefix
  caching off when the stack has recurrent layers);
* ``hybrid_page_managers(metadata, window_margin=...)`` -> the ``HybridPageManager`` of a stack
  of global and sliding-window layers whose sliding layers sit on their own, windowed pool;
* ``hybrid_paged_runtime(step, slots=..., width=..., padding_side=...)`` ->
  ``HybridPagedRuntimeMetadata`` for a hybrid stack on the paged backend (which batch row, or
  *slot*, each scheduled sequence's recurrent state lives in, and where its tokens sit in the
  ``[batch, T]`` layout); ``step`` is one manager's ``StepMetadata`` or a ``HybridStep`` of two.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxkv import _validation as v
from jaxkv._sizes import next_power_of_two
from jaxkv.caches.hybrid import RECURRENT_KINDS, HybridCacheMetadata, HybridPagedRuntimeMetadata
from jaxkv.caches.paged import RUNTIME_ARRAYS, PagedRuntimeMetadata
from jaxkv.caches.recurrent import RecurrentRuntimeMetadata
from jaxkv.pages import HybridPageManager, HybridStep, PageManager
from jaxkv.pages.step import StepMetadata


def hybrid_page_manager(metadata: HybridCacheMetadata, **options: Any) -> PageManager:
    """The ``PageManager`` that drives a hybrid stack's paged attention layers (its geometry
    from ``metadata.paged_geometry()``; ``options`` go to ``PageManager``).

    A stack with recurrent layers keeps one state per slot that page sharing cannot reach, so
    its manager runs with prefix caching off (a prefix-cache hit would skip tokens the recurrent
    state never saw); rows are copied with ``reorder`` on both the cache and the ``PagedRows``.

    Raises:
        ValueError: ``enable_prefix_caching=True`` for a stack with recurrent layers, or a
            stack without paged attention layers.
    """
    owner = "hybrid_page_manager"
    if not isinstance(metadata, HybridCacheMetadata):
        raise TypeError(
            f"{owner}: metadata must be HybridCacheMetadata, got {type(metadata).__name__}"
        )
    recurrent = [kind for kind in metadata.layer_kinds if kind in RECURRENT_KINDS]
    if recurrent:
        if options.get("enable_prefix_caching"):
            raise ValueError(
                f"{owner}: enable_prefix_caching=True cannot serve a stack with "
                f"{sorted(set(recurrent))} layers: a prefix-cache hit skips tokens their "
                f"recurrent state never saw; use enable_prefix_caching=False"
            )
        options["enable_prefix_caching"] = False
    return PageManager(**metadata.paged_geometry(), **options)


def hybrid_page_managers(
    metadata: HybridCacheMetadata, *, window_margin: int = 0, **options: Any
) -> HybridPageManager:
    """The ``HybridPageManager`` of a stack of global and sliding-window attention layers on the
    paged backend: a ``PageManager`` of ``metadata.paged_geometry()`` for the global layers and a
    windowed one of ``metadata.sliding_paged_geometry()`` for the sliding layers, both with
    prefix caching off; ``options`` (e.g. ``token_buckets``) go to both.

    Args:
        metadata: the stack's paged ``HybridCacheMetadata``, with both kinds of attention layer
            and no recurrent layer.
        window_margin: tokens the sliding pool keeps before the window, so that ``truncate``
            can roll back that far (size the pool for it: ``Gemma3Config.cache_metadata``'s
            ``window_margin``).

    Raises:
        TypeError: ``metadata`` is not a ``HybridCacheMetadata``.
        ValueError: a stack without both kinds of attention layer, with recurrent layers, or
            ``enable_prefix_caching=True``.
    """
    owner = "hybrid_page_managers"
    if not isinstance(metadata, HybridCacheMetadata):
        raise TypeError(
            f"{owner}: metadata must be HybridCacheMetadata, got {type(metadata).__name__}"
        )
    kinds = set(metadata.layer_kinds)
    if not {"attention", "sliding_attention"} <= kinds or kinds & set(RECURRENT_KINDS):
        raise ValueError(
            f"{owner}: needs a stack of 'attention' and 'sliding_attention' layers (and no "
            f"recurrent ones), got layer kinds {sorted(kinds)}"
        )
    if options.get("enable_prefix_caching"):
        raise ValueError(
            f"{owner}: enable_prefix_caching=True cannot serve a windowed sliding pool (its "
            f"window's pages are released); use enable_prefix_caching=False"
        )
    options["enable_prefix_caching"] = False
    full = PageManager(**metadata.paged_geometry(), **options)
    sliding = PageManager(
        **metadata.sliding_paged_geometry(), window_margin=window_margin, **options
    )
    return HybridPageManager(full, sliding)


def query_bucket(step: StepMetadata) -> int:
    """The power of two >= the step's longest run of new tokens (at most the padded count):
    the ``max_query_len`` a jitted step specialises on."""
    longest = max(step.num_new_tokens, default=1)
    return min(next_power_of_two(longest), step.num_tokens_padded)


_TOKEN_PADDING = {"slot_mapping": -1, "positions": 0, "token_ids": 0}
"""What the packed token arrays hold past the step's tokens."""


def paged_runtime(
    step: StepMetadata,
    *,
    num_tokens: int | None = None,
    max_query_len: int | None = None,
    prefill_rows: int = 0,
) -> PagedRuntimeMetadata:
    """Device arrays (int32) of a host step, checked for consistency.

    Args:
        step: the ``StepMetadata`` from ``PageManager.schedule``.
        num_tokens: pad the packed token axis further, to this many entries (at least the
            step's padded count), so that steps of different buckets share a compiled shape.
        max_query_len: the static bound on any row's new tokens (default ``query_bucket``);
            at least the step's longest row.
        prefill_rows: ``0``, or how many leading rows may take several tokens (see
            ``PagedRuntimeMetadata``).

    Raises:
        TypeError: ``step`` is not a ``StepMetadata``.
        ValueError: arrays whose shapes disagree, or values outside the contract (a
            ``query_start_loc`` that is not a prefix sum, a padding slot that is not ``-1``, a
            context shorter than the row's new tokens); a ``num_tokens`` or ``max_query_len``
            too small for the step.
    """
    owner = "paged_runtime"
    if not isinstance(step, StepMetadata):
        raise TypeError(f"{owner}: step must be a StepMetadata, got {type(step).__name__}")
    # The builder makes int32 arrays; a hand-made step may hold other numbers (checked below).
    arrays = {name: np.asarray(getattr(step, name)).astype(np.int64) for name in RUNTIME_ARRAYS}
    start = np.asarray(step.query_start_loc)
    if start[-1] != step.num_tokens:
        raise ValueError(
            f"{owner}: query_start_loc must rise from 0 to num_tokens={step.num_tokens}, "
            f"got {start.tolist()}"
        )
    padded = int(arrays["slot_mapping"].shape[0])
    if num_tokens is not None:
        v.require_int(owner, "num_tokens", num_tokens, minimum=padded)
        for name, fill in _TOKEN_PADDING.items():
            extra = np.full((num_tokens - padded,), fill, np.int64)
            arrays[name] = np.concatenate([arrays[name], extra])
    longest = max(step.num_new_tokens, default=1)
    if max_query_len is None:
        max_query_len = query_bucket(step)
    v.require_int(owner, "max_query_len", max_query_len, minimum=max(longest, 1))
    return PagedRuntimeMetadata.create(
        **arrays,
        num_seqs=np.asarray(step.num_seqs),
        num_pages=step.num_pages,
        page_size=step.page_size,
        max_query_len=max_query_len,
        prefill_rows=prefill_rows,
    )


def hybrid_paged_runtime(
    step: StepMetadata | HybridStep,
    *,
    slots: Sequence[int] | Mapping[Hashable, int] | None = None,
    width: int | None = None,
    padding_side: str = "right",
) -> HybridPagedRuntimeMetadata:
    """The hybrid runtime of one host step (NumPy work on the host; arrays int32).

    Args:
        step: the ``StepMetadata`` from ``PageManager.schedule`` (one page table for every
            attention layer), or the ``HybridStep`` from ``HybridPageManager.schedule``: its
            ``full`` plan drives the global layers, its ``sliding`` plan (which must lay out the
            same tokens) the sliding layers' own pool (``sliding_attention``).
        slots: the batch row (slot) of each scheduled sequence: a sequence of ints in
            ``step.seq_ids`` order, or a mapping ``seq_id -> slot`` holding every scheduled
            id (``jaxkv.pages.PagedRows.slots()``). Default: the ``i``-th scheduled sequence
            takes slot ``i``. Slots are distinct, in ``[0, max_num_seqs)``.
        width: ``T``, columns of the batch layout, at least the longest row of new tokens;
            also the ``max_query_len`` of the paged part, so a jitted step compiles once per
            ``(num_tokens, width)``. Default: that longest row rounded up to a power of two
            (at most the padded token count).
        padding_side: where each slot's padding sits, ``"right"`` or ``"left"``.

    Raises:
        TypeError: ``step`` is not a ``StepMetadata`` or ``HybridStep``; a slot that is not an
            int.
        ValueError: slots of the wrong count, repeated or out of range, a missing seq id;
            a ``width`` shorter than a row; a bad ``padding_side``; step arrays that
            disagree (see ``paged_runtime``); the two plans of a ``HybridStep`` laying out other
            tokens.
    """
    owner = "hybrid_paged_runtime"
    sliding_step = None
    if isinstance(step, HybridStep):
        step, sliding_step = step.full, step.sliding
        if not isinstance(step, StepMetadata) or not isinstance(sliding_step, StepMetadata):
            raise TypeError(f"{owner}: a HybridStep must hold two StepMetadata")
        _check_lockstep(owner, step, sliding_step)
    if not isinstance(step, StepMetadata):
        raise TypeError(
            f"{owner}: step must be a StepMetadata or HybridStep, got {type(step).__name__}"
        )
    v.require_choice(owner, "padding_side", padding_side, ("right", "left"))
    attention = paged_runtime(step)
    seqs = int(step.page_tables.shape[0])
    slot_of_row = _resolve_slots(owner, step, slots, seqs)
    counts = np.asarray(step.num_new_tokens, np.int64)
    longest = int(counts.max(initial=0))
    if width is None:
        width = max(attention.max_query_len, longest, 1)
    v.require_int(owner, "width", width, minimum=1)
    if width < longest:
        raise ValueError(
            f"{owner}: width={width} is shorter than the longest row of new tokens "
            f"({longest}); expected width >= {longest}"
        )
    starts = np.asarray(step.query_start_loc, np.int64)[: step.num_seqs]
    new_lengths = np.zeros((seqs,), np.int32)
    new_lengths[slot_of_row] = counts
    column = np.arange(width)[None, :]
    lead = (width - counts)[:, None] if padding_side == "left" else 0
    rank = column - lead  # [num_seqs, width] rank among the row's new tokens
    token_index = np.full((seqs, width), -1, np.int32)
    token_index[slot_of_row] = np.where(
        (rank >= 0) & (rank < counts[:, None]), starts[:, None] + rank, -1
    )
    sliding = None
    if sliding_step is not None:
        sliding = paged_runtime(sliding_step).replace(max_query_len=width)
    return HybridPagedRuntimeMetadata(
        # The width bounds every row's new tokens, so it serves as paged attention's query
        # bound too: a jitted step then specialises on (num_tokens, width) only.
        attention=attention.replace(max_query_len=width),
        recurrent=RecurrentRuntimeMetadata.create(new_lengths, padding_side),
        token_index=jnp.asarray(token_index),
        sliding_attention=sliding,
    )


_LOCKSTEP = (
    "seq_ids",
    "num_new_tokens",
    "num_tokens_padded",
    "max_num_seqs",
    "max_pages_per_seq",
)


def _check_lockstep(owner: str, full: StepMetadata, sliding: StepMetadata) -> None:
    """The two plans of one batch lay out the same tokens (they differ only in pages)."""
    for name in _LOCKSTEP:
        if getattr(full, name) != getattr(sliding, name):
            raise ValueError(
                f"{owner}: step.full.{name}={getattr(full, name)!r} and step.sliding.{name}="
                f"{getattr(sliding, name)!r} must be equal (both plans of one scheduled batch)"
            )
    # Their token arrays are compared once, by HybridPagedRuntimeMetadata itself.


def _resolve_slots(owner: str, step: StepMetadata, slots: Any, seqs: int) -> np.ndarray:
    """``[num_seqs]`` int64 slot of each scheduled row, validated."""
    if slots is None:
        return np.arange(step.num_seqs)
    if isinstance(slots, Mapping):
        missing = [seq_id for seq_id in step.seq_ids if seq_id not in slots]
        if missing:
            raise ValueError(f"{owner}: slots has no entry for scheduled seq id(s) {missing}")
        slots = [slots[seq_id] for seq_id in step.seq_ids]
    elif isinstance(slots, str | bytes) or not isinstance(slots, Sequence):
        raise TypeError(
            f"{owner}: slots must be a sequence of ints or a mapping seq_id -> int, got {slots!r}"
        )
    slots = list(slots)
    if len(slots) != step.num_seqs:
        raise ValueError(
            f"{owner}: slots has {len(slots)} entries; expected one per scheduled sequence "
            f"({step.num_seqs})"
        )
    for index, slot in enumerate(slots):
        v.require_int(owner, f"slots[{index}]", slot)
        if not 0 <= slot < seqs:
            raise ValueError(f"{owner}: slots[{index}]={slot} outside [0, max_num_seqs={seqs})")
    if len(set(slots)) != len(slots):
        raise ValueError(f"{owner}: slots must be distinct, got {slots}")
    return np.asarray(slots, np.int64)
