"""Tests of `HybridPageManager`: a global and a windowed `PageManager` driven in lockstep."""

from __future__ import annotations

import pytest

from jaxkv.pages import (
    HybridPageManager,
    HybridStep,
    OutOfPagesError,
    PageManager,
    StepPendingError,
    UnknownSequenceError,
)

GEOMETRY = dict(page_size=4, max_num_seqs=2, max_pages_per_seq=16, enable_prefix_caching=False)


def make(sliding_pages: int = 8, margin: int = 2) -> HybridPageManager:
    full = PageManager(num_pages=32, **GEOMETRY)
    sliding = PageManager(
        num_pages=sliding_pages, sliding_window=8, window_margin=margin, **GEOMETRY
    )
    return HybridPageManager(full, sliding)


def test_both_managers_plan_one_token_layout_and_only_the_sliding_one_releases() -> None:
    pages = make(sliding_pages=12)
    pages.add_sequence("a", list(range(40)))
    pages.add_sequence("b", iter(range(100, 110)))
    for batch in ([("a", 16), ("b", 10)], [("a", 16)], [("a", 4)]):
        step = pages.schedule(batch)
        assert isinstance(step, HybridStep) and pages.pending_step is step
        assert step.full.seq_ids == step.sliding.seq_ids == step.seq_ids
        assert (step.full.positions == step.sliding.positions).all()
        assert (step.full.token_ids == step.sliding.token_ids).all()
        pages.commit_step(step)
        pages.check_invariants()
    full, sliding = pages.full.get_sequence("a"), pages.sliding.get_sequence("a")
    assert full.num_computed == sliding.num_computed == 36
    assert -1 not in full.page_ids and len(full.page_ids) == 9
    # 36 - W - M = 26: pages 0..5 (positions 0..23) went back.
    assert sliding.page_ids[:6] == (-1,) * 6 and -1 not in sliding.page_ids[6:]
    assert pages.sliding.num_free_pages == 12 - 3 - 3  # a holds 3 pages, b (10 tokens) 3


def test_operations_apply_to_both_and_refusals_change_neither() -> None:
    pages = make()
    pages.add_sequence("a", list(range(30)))
    pages.commit_step(pages.schedule([("a", 24)]))
    pages.fork("a", "b")
    pages.append_tokens("b", [7])
    pages.check_invariants()
    assert pages.min_truncate_length("a") == 20
    before = pages.snapshot()
    with pytest.raises(ValueError, match=r"num_tokens=3 .* expected num_tokens >= 20"):
        pages.truncate("a", 3)
    with pytest.raises(UnknownSequenceError):
        pages.free("nobody")
    assert pages.snapshot() == before
    pages.truncate("a", 22)
    pages.free("b")
    pages.check_invariants()
    assert pages.seq_ids == ("a",) and len(pages) == 1 and "a" in pages
    pages.free("a")
    assert pages.full.num_free_pages == 32 and pages.sliding.num_free_pages == 8


def test_a_sliding_pool_too_small_for_one_step_raises_at_schedule_and_changes_nothing() -> None:
    pages = make(sliding_pages=3)
    pages.add_sequence("a", list(range(40)))
    before = pages.snapshot()
    with pytest.raises(OutOfPagesError, match="sliding pool"):
        pages.schedule([("a", 16)])
    assert pages.snapshot() == before and pages.pending_step is None
    step = pages.schedule([("a", 8)])
    with pytest.raises(StepPendingError):
        pages.schedule([("a", 1)])
    with pytest.raises(StepPendingError, match="not the pending step"):
        pages.commit_step(step.full)
    assert pages.abandon_step(step) == ["a"]
    pages.check_invariants()
    assert len(pages) == 0


@pytest.mark.parametrize(
    ("full", "sliding", "error", "match"),
    [
        (dict(), dict(sliding_window=None), ValueError, "sliding.sliding_window must be set"),
        (dict(sliding_window=8), dict(), ValueError, "full.sliding_window must be None"),
        (dict(max_num_seqs=3), dict(), ValueError, "max_num_seqs=3 and sliding.max_num_seqs=2"),
        (dict(token_buckets=(8,)), dict(), ValueError, "token_buckets"),
        (dict(enable_prefix_caching=True), dict(), ValueError, "full.enable_prefix_caching"),
    ],
)
def test_constructor_refuses_managers_that_cannot_run_in_lockstep(
    full: dict, sliding: dict, error: type, match: str
) -> None:
    full_manager = PageManager(**{"num_pages": 32, **GEOMETRY, **full})
    sliding_manager = PageManager(**{"num_pages": 32, "sliding_window": 8, **GEOMETRY, **sliding})
    with pytest.raises(error, match=match):
        HybridPageManager(full_manager, sliding_manager)


def test_constructor_refuses_non_managers_and_managers_in_use() -> None:
    with pytest.raises(TypeError, match="full must be a PageManager"):
        HybridPageManager(object(), object())  # type: ignore[arg-type]
    busy = PageManager(num_pages=32, **GEOMETRY)
    busy.add_sequence("a", [1])
    sliding = PageManager(num_pages=8, sliding_window=8, **GEOMETRY)
    with pytest.raises(ValueError, match="full must be empty"):
        HybridPageManager(busy, sliding)
