"""`HybridPageManager`: the two page managers of a stack that mixes global and sliding-window
attention layers, driven in lockstep.

Global layers need every position of a sequence; sliding-window layers only its last `W`. Each
group therefore sits on its own page pool with its own page table: `full` (a plain `PageManager`)
keeps every page, `sliding` (a `PageManager` in windowed mode, `sliding_window=W`) gives the pages
before the window back after each step, so its pool holds about
`max_num_seqs * (ceil((W + margin + chunk) / page_size) + 1)` pages instead of every row's worst
case. Both managers know the same sequences with the same tokens; every operation here is applied
to both, and `schedule` returns a `HybridStep` of the two `StepMetadata` of one batch (same token
layout, each with its own page tables, slot mapping and copy ops), which
`jaxkv.engine.step_inputs.hybrid_paged_runtime` turns into one device runtime.

Every method validates first and either succeeds on both managers or raises leaving both exactly
as they were (`snapshot()` compares them together). Prefix caching is off in both: the sliding
pool cannot serve a hit (its window's pages are released), and a hit in one pool only would put
the two out of step.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from jaxkv.pages.errors import OutOfPagesError, StepPendingError
from jaxkv.pages.manager import PageManager
from jaxkv.pages.step import StepMetadata


def _read_once(token_ids: Any, limit: int) -> Any:
    """An iterator's first `limit + 1` token ids as a list (both managers read the same ids, and
    `PageManager` refuses more than `limit`); anything else unchanged."""
    if isinstance(token_ids, Iterator):
        return list(itertools.islice(token_ids, limit + 1))
    return token_ids


@dataclass(frozen=True, eq=False)
class HybridStep:
    """The two plans of one scheduled batch.

    Attributes:
        full: the global layers' `StepMetadata` (every page of every sequence).
        sliding: the sliding layers' `StepMetadata` (windowed page tables); same sequences,
            new tokens, positions and packed layout as `full`.
    """

    full: StepMetadata
    sliding: StepMetadata

    @property
    def seq_ids(self) -> tuple[Hashable, ...]:
        """Ids of the scheduled sequences, in row order."""
        return self.full.seq_ids

    @property
    def num_new_tokens(self) -> tuple[int, ...]:
        """New tokens per scheduled row."""
        return self.full.num_new_tokens


class HybridPageManager:
    """A global-attention `PageManager` and a windowed one, in lockstep (see the module docstring).

    Args:
        full: a `PageManager` without `sliding_window`, for the global layers.
        sliding: a `PageManager` with `sliding_window`, for the sliding layers.

    Both must be empty, with no step pending, prefix caching off, and the same `max_num_seqs`,
    `max_seq_len` and `token_buckets` (so that both plan one token layout).

    Raises:
        TypeError: an argument is not a `PageManager`.
        ValueError: the managers do not fit together (the message names the field).
    """

    def __init__(self, full: PageManager, sliding: PageManager) -> None:
        owner = "HybridPageManager"
        for name, manager in (("full", full), ("sliding", sliding)):
            if not isinstance(manager, PageManager):
                raise TypeError(f"{owner}: {name} must be a PageManager, got {manager!r:.80}")
            if len(manager) or manager.pending_step is not None:
                raise ValueError(
                    f"{owner}: {name} must be empty with no pending step, got {len(manager)} "
                    "live sequence(s)"
                )
            if manager.enable_prefix_caching:
                raise ValueError(
                    f"{owner}: {name}.enable_prefix_caching must be False (a hit in one pool "
                    "only would put the two managers out of step)"
                )
        if full.sliding_window is not None:
            raise ValueError(
                f"{owner}: full.sliding_window must be None, got {full.sliding_window}"
            )
        if sliding.sliding_window is None:
            raise ValueError(f"{owner}: sliding.sliding_window must be set, got None")
        for field in ("max_num_seqs", "max_seq_len", "token_buckets"):
            mine, theirs = getattr(full, field), getattr(sliding, field)
            if mine != theirs:
                raise ValueError(
                    f"{owner}: full.{field}={mine} and sliding.{field}={theirs} must be equal"
                )
        self._full = full
        self._sliding = sliding
        self._pending: HybridStep | None = None

    @property
    def full(self) -> PageManager:
        """The global layers' manager (read it; change it only through this object)."""
        return self._full

    @property
    def sliding(self) -> PageManager:
        """The sliding layers' windowed manager (read it; change it only through this object)."""
        return self._sliding

    @property
    def seq_ids(self) -> tuple[Hashable, ...]:
        """Live sequence ids, in the order they were added."""
        return self._full.seq_ids

    @property
    def pending_step(self) -> HybridStep | None:
        """The scheduled, not yet committed step, or None."""
        return self._pending

    def __len__(self) -> int:
        return len(self._full)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._full

    def add_sequence(self, seq_id: Hashable, prompt_token_ids: Sequence[int]) -> int:
        """Add a sequence to both managers (`PageManager.add_sequence`); returns 0 (no prefix
        hits). A generator prompt is read once."""
        tokens = _read_once(prompt_token_ids, self._full.max_seq_len)
        self._full.add_sequence(seq_id, tokens)
        # Same configuration, same sequences: whatever the first accepted, the second does.
        self._sliding.add_sequence(seq_id, tokens)
        return 0

    def append_tokens(self, seq_id: Hashable, token_ids: Sequence[int]) -> None:
        """`PageManager.append_tokens` on both managers."""
        tokens = _read_once(token_ids, self._full.max_seq_len)
        self._full.append_tokens(seq_id, tokens)
        self._sliding.append_tokens(seq_id, tokens)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """`PageManager.fork` on both managers (the child shares the parent's held pages)."""
        self._full.fork(parent_id, child_id)
        self._sliding.fork(parent_id, child_id)

    def free(self, seq_id: Hashable) -> None:
        """`PageManager.free` on both managers: every page of the sequence goes back."""
        self._full.free(seq_id)
        self._sliding.free(seq_id)

    def truncate(self, seq_id: Hashable, num_tokens: int) -> None:
        """`PageManager.truncate` on both managers. The windowed manager decides first (it also
        refuses a length whose window needs a released page); nothing changes on a refusal."""
        self._sliding.truncate(seq_id, num_tokens)
        self._full.truncate(seq_id, num_tokens)

    def min_truncate_length(self, seq_id: Hashable) -> int:
        """The smallest length `truncate` accepts (`PageManager.min_truncate_length` of the
        windowed manager)."""
        return self._sliding.min_truncate_length(seq_id)

    def schedule(self, batch: Sequence[tuple[Hashable, int]]) -> HybridStep:
        """Schedule one batch on both managers (`PageManager.schedule`).

        Raises:
            StepPendingError: a step is already pending.
            OutOfPagesError: either pool lacks the pages (the message names it); nothing changes.
            The validation errors of `PageManager.schedule`.
        """
        if self._pending is not None:
            raise StepPendingError(
                "schedule() called while a step is pending; commit_step() it first"
            )
        for name, manager in (("sliding", self._sliding), ("full", self._full)):
            needed = manager.pages_needed(batch)
            if needed > manager.num_available_pages:
                raise OutOfPagesError(
                    needed,
                    manager.num_free_pages,
                    manager.num_evictable_pages,
                    what=f"schedule() of {len(batch)} seq(s) in the {name} pool "
                    f"({manager.num_pages} pages)",
                )
        step = HybridStep(full=self._full.schedule(batch), sliding=self._sliding.schedule(batch))
        self._pending = step
        return step

    def commit_step(self, step: HybridStep) -> None:
        """`PageManager.commit_step` on both; the windowed manager then releases the pages that
        fell out of every window."""
        self._check_pending("commit_step", step)
        self._full.commit_step(step.full)
        self._sliding.commit_step(step.sliding)
        self._pending = None

    def abandon_step(self, step: HybridStep) -> list[Hashable]:
        """`PageManager.abandon_step` on both: the step's sequences are freed; returns their ids."""
        self._check_pending("abandon_step", step)
        freed = self._full.abandon_step(step.full)
        self._sliding.abandon_step(step.sliding)
        self._pending = None
        return freed

    def snapshot(self) -> dict[str, Any]:
        """Both managers' `snapshot()`, by name."""
        return {"full": self._full.snapshot(), "sliding": self._sliding.snapshot()}

    def check_invariants(self) -> None:
        """Each manager's invariants, and that both know the same sequences (ids in order,
        tokens, computed counts) with the same step pending."""
        self._full.check_invariants()
        self._sliding.check_invariants()
        if self._full.seq_ids != self._sliding.seq_ids:
            raise AssertionError(
                f"the managers hold other sequences: {self._full.seq_ids} and "
                f"{self._sliding.seq_ids}"
            )
        for seq_id in self._full.seq_ids:
            full, sliding = self._full.get_sequence(seq_id), self._sliding.get_sequence(seq_id)
            if (full.token_ids, full.num_computed) != (sliding.token_ids, sliding.num_computed):
                raise AssertionError(f"sequence {seq_id!r} differs between the two managers")
        pending = self._pending
        if (pending is None) != (self._full.pending_step is None) or (
            pending is not None
            and (self._full.pending_step, self._sliding.pending_step)
            != (pending.full, pending.sliding)
        ):
            raise AssertionError("the managers' pending steps are out of step")

    def _check_pending(self, what: str, step: object) -> None:
        if self._pending is None or step is not self._pending:
            raise StepPendingError(f"{what}(step): step is not the pending step")
