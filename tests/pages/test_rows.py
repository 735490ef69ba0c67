"""Tests of `PagedRows`: the paged family's row operations on page tables, their error paths,
consumption and atomicity, and a stateful property test against a shadow pool."""

from __future__ import annotations

from collections.abc import Callable, Hashable

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from jaxkv.pages import (
    CapacityError,
    ConsumedRowsError,
    DuplicateSequenceError,
    OutOfPagesError,
    PagedRows,
    PageManager,
    PagesError,
    StepPendingError,
    UnknownSequenceError,
)

from .shadow_pool import ShadowPool

KEY = b"rows-test-key"


def make(**overrides: object) -> PageManager:
    config: dict[str, object] = dict(
        num_pages=16, page_size=4, max_num_seqs=6, max_pages_per_seq=4, hash_key=KEY
    )
    config.update(overrides)
    return PageManager(**config)  # type: ignore[arg-type]


def run_step(manager: PageManager, pool: ShadowPool, batch: list[tuple[Hashable, int]]) -> None:
    step = manager.schedule(batch)
    pool.apply(step)
    manager.commit_step(step)


def computed_rows(
    prompts: list[list[int] | None], **overrides: object
) -> tuple[PagedRows, ShadowPool]:
    """One computed sequence per prompt (None: an empty row), ids "s0", "s1", ..."""
    manager = make(**overrides)
    pool = ShadowPool(manager.num_pages, manager.page_size)
    seq_ids: list[Hashable | None] = []
    for index, prompt in enumerate(prompts):
        if prompt is None:
            seq_ids.append(None)
            continue
        seq_id = f"s{index}"
        hits = manager.add_sequence(seq_id, prompt)
        run_step(manager, pool, [(seq_id, len(prompt) - hits)])
        seq_ids.append(seq_id)
    return PagedRows(manager, seq_ids), pool


def tokens_of(rows: PagedRows) -> list[list[int] | None]:
    return [
        None if seq_id is None else list(rows.manager.get_sequence(seq_id).token_ids)
        for seq_id in rows.seq_ids
    ]


def read_back(rows: PagedRows, pool: ShadowPool) -> list[list[int | None] | None]:
    """What the pool holds at each row's computed positions, through its page table."""
    result: list[list[int | None] | None] = []
    for seq_id in rows.seq_ids:
        if seq_id is None:
            result.append(None)
        else:
            info = rows.manager.get_sequence(seq_id)
            result.append(pool.read(info.page_ids, info.num_computed))
    return result


A, B, C = [1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14]


# -- construction and reads -------------------------------------------------------------------


def test_constructor_and_reads() -> None:
    rows, _ = computed_rows([A, None, B])
    assert rows.seq_ids == ("s0", None, "s2")
    assert rows.batch_size == 3
    assert rows.slots() == {"s0": 0, "s2": 2}
    assert not rows.consumed
    assert "s0" in repr(rows)
    np.testing.assert_array_equal(rows.overflow_rows(), [False, False, False])
    assert rows.overflow_rows().dtype == np.bool_
    assert rows.check_overflow() is None
    assert tokens_of(rows) == [A, None, B]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("manager", ["s0"]), {}, TypeError, "manager must be a PageManager, got str"),
        ((None, "s0"), {}, TypeError, "seq_ids must be a sequence"),
        ((None, []), {}, ValueError, "seq_ids must hold at least one row"),
        ((None, ["s0", "zz"]), {}, UnknownSequenceError, r"seq_ids\[1\]='zz' is not a live"),
        ((None, ["s0", ["x"]]), {}, UnknownSequenceError, r"seq_ids\[1\]=\['x'\]"),
        ((None, ["s0", None, "s0"]), {}, DuplicateSequenceError, r"seq_ids\[2\]='s0' already"),
        ((None, ["s0"]), {"new_seq_id": 5}, TypeError, "new_seq_id must be a callable"),
    ],
)
def test_constructor_validates(
    args: tuple[object, object], kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    rows, _ = computed_rows([A])
    manager = rows.manager if args[0] is None else args[0]
    with pytest.raises(error, match=match):
        PagedRows(manager, args[1], **kwargs)  # type: ignore[arg-type]


# -- reset_rows -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "selection",
    [[True, False, True], np.array([True, False, True]), [0, 2], np.array([2, 0]), (2, 0, 2)],
    ids=["list mask", "numpy mask", "ids", "numpy ids", "repeated ids"],
)
def test_reset_rows_frees_the_selected_rows(selection: object) -> None:
    rows, _ = computed_rows([A, B, C])
    manager = rows.manager
    result = rows.reset_rows(selection)
    assert result.seq_ids == (None, "s1", None)
    assert manager.seq_ids == ("s1",)
    assert rows.consumed and not result.consumed
    manager.check_invariants()


def test_reset_rows_of_nothing_or_of_empty_rows() -> None:
    rows, _ = computed_rows([A, None])
    rows = rows.reset_rows([])
    assert rows.seq_ids == ("s0", None)
    rows = rows.reset_rows([False, True])
    assert rows.seq_ids == ("s0", None)
    rows = rows.reset_rows(np.array([True, True]))
    assert rows.seq_ids == (None, None) and len(rows.manager) == 0
    rows.manager.check_invariants()
    assert rows.manager.num_used_pages == 0


# -- truncate ---------------------------------------------------------------------------------


def test_truncate_rolls_each_row_back() -> None:
    rows, pool = computed_rows([A, B, None])
    result = rows.truncate([2, 3, 0])
    assert tokens_of(result) == [A[:2], B, None]
    info = result.manager.get_sequence("s0")
    assert info.num_computed == 2 and len(info.page_ids) == 1
    assert read_back(result, pool) == [A[:2], B, None]
    result.manager.check_invariants()


def test_truncate_then_write_keeps_cached_pages_intact() -> None:
    rows, pool = computed_rows([A + [7, 8, 9]])  # 9 tokens: pages 0, 1 cached
    manager = rows.manager
    cached = manager.get_sequence("s0").page_ids[1]
    assert manager._prefix_cache.is_cached(cached)
    rows = rows.truncate([6])
    manager.append_tokens("s0", [50, 51])
    run_step(manager, pool, [("s0", 2)])
    assert pool.pages[cached] == [5, 6, 7, 8]
    assert read_back(rows, pool) == [A + [50, 51]]
    manager.check_invariants()


def test_truncate_skips_unchanged_rows_even_when_pending() -> None:
    rows, pool = computed_rows([A, B])
    manager = rows.manager
    manager.append_tokens("s1", [1])
    step = manager.schedule([("s1", 1)])
    before = manager.snapshot()
    with pytest.raises(StepPendingError, match=r"row 1 \(seq_id='s1'\) is in the pending step"):
        rows.truncate([2, 1])
    assert manager.snapshot() == before and not rows.consumed
    rows = rows.truncate([2, 4])  # row 1 unchanged: allowed
    assert tokens_of(rows) == [A[:2], B + [1]]
    pool.apply(step)
    manager.commit_step(step)
    manager.check_invariants()


# -- select -----------------------------------------------------------------------------------


def test_select_keeps_the_given_rows_in_order_and_frees_the_others() -> None:
    rows, pool = computed_rows([A, B, None, C])
    manager = rows.manager
    result = rows.select([3, 0, 2])
    assert result.seq_ids == ("s3", "s0", None)
    assert set(manager.seq_ids) == {"s0", "s3"}
    assert read_back(result, pool) == [C, A, None]
    manager.check_invariants()
    result = result.select(np.array([1]))
    assert result.seq_ids == ("s0",) and manager.seq_ids == ("s0",)


# -- reorder ----------------------------------------------------------------------------------


def test_reorder_forks_repeated_rows_and_frees_unused_ones() -> None:
    rows, pool = computed_rows([A, B, C])
    manager = rows.manager
    pages = manager.get_sequence("s0").page_ids
    result = rows.reorder([0, 0, 2])
    first, second, third = result.seq_ids
    assert (first, third) == ("s0", "s2")  # first use keeps the sequence
    assert second == ("row", 0)  # further uses fork it
    assert manager.get_sequence(second).page_ids == pages  # shared, nothing copied
    assert [manager._allocator.refcount(page) for page in pages] == [2, 2]
    assert "s1" not in manager
    assert tokens_of(result) == [A, A, C]
    assert read_back(result, pool) == [A, A, C]
    manager.check_invariants()

    # Beam search continues: both beams write into their shared partial page (copy-on-write).
    manager.append_tokens(first, [100])
    manager.append_tokens(second, [200])
    step = manager.schedule([(first, 1), (second, 1)])
    assert step.num_copies == 1
    pool.apply(step)
    manager.commit_step(step)
    assert read_back(result, pool) == [A + [100], A + [200], C]
    manager.check_invariants()


def test_reorder_moves_rows_and_empty_sources_give_empty_rows() -> None:
    rows, _ = computed_rows([A, None, B])
    result = rows.reorder(np.array([2, 1, 1]))
    assert result.seq_ids == ("s2", None, None)
    assert result.manager.seq_ids == ("s2",)


def test_reorder_frees_before_forking_so_a_full_pool_can_reorder() -> None:
    rows, _ = computed_rows([A, B, C], max_num_seqs=3)
    result = rows.reorder([0, 0, 0])
    assert result.seq_ids == ("s0", ("row", 0), ("row", 1))
    assert len(result.manager) == 3
    result.manager.check_invariants()


def test_reorder_capacity_error_is_atomic() -> None:
    rows, _ = computed_rows([A, None, B], max_num_seqs=3)
    manager = rows.manager
    manager.add_sequence("outside", [1])
    before = manager.snapshot()
    with pytest.raises(CapacityError, match="needs 2 fork.*2 sequences would be live.*=3"):
        rows.reorder([0, 0, 0])  # frees s2, forks s0 twice
    assert manager.snapshot() == before and not rows.consumed
    assert rows.reorder([0, 1, 0]).seq_ids == ("s0", None, ("row", 0))  # one fork fits


def test_reorder_refuses_to_fork_a_pending_row() -> None:
    rows, pool = computed_rows([A, B])
    manager = rows.manager
    manager.append_tokens("s0", [1])
    step = manager.schedule([("s0", 1)])
    before = manager.snapshot()
    with pytest.raises(StepPendingError, match=r"PagedRows.reorder: row 0 \(seq_id='s0'\)"):
        rows.reorder([0, 0])
    assert manager.snapshot() == before and not rows.consumed
    rows = rows.reorder([1, 1])  # forks the other row; frees the pending one
    assert rows.seq_ids == ("s1", ("row", 0))
    pool.apply(step)
    manager.commit_step(step)  # the freed sequence is skipped
    manager.check_invariants()


# -- repeat -----------------------------------------------------------------------------------


def test_repeat_interleaves_forks() -> None:
    rows, pool = computed_rows([A, None, B])
    result = rows.repeat(2)
    assert result.seq_ids == ("s0", ("row", 0), None, None, "s2", ("row", 1))
    assert tokens_of(result) == [A, A, None, None, B, B]
    assert read_back(result, pool) == [A, A, None, None, B, B]
    assert result.slots() == {"s0": 0, ("row", 0): 1, "s2": 4, ("row", 1): 5}
    result.manager.check_invariants()
    seq_ids = result.seq_ids
    same = result.repeat(1)
    assert same.seq_ids == seq_ids and result.consumed


def test_repeat_capacity_error_is_atomic() -> None:
    rows, _ = computed_rows([A, B])
    before = rows.manager.snapshot()
    with pytest.raises(CapacityError, match="needs 6 fork.*2 sequences would be live.*=6"):
        rows.repeat(4)
    assert rows.manager.snapshot() == before and not rows.consumed
    assert rows.repeat(3).batch_size == 6  # 4 forks fit exactly


def test_default_ids_skip_live_ones_and_a_custom_minter_is_used() -> None:
    manager = make()
    manager.add_sequence(("row", 0), [1, 2])
    manager.add_sequence("a", [3, 4])
    rows = PagedRows(manager, ["a"]).repeat(2)
    assert rows.seq_ids == ("a", ("row", 1))

    names = iter(["beam-1", "beam-2"])
    rows = PagedRows(manager, [("row", 0)], new_seq_id=lambda: next(names)).repeat(3)
    assert rows.seq_ids == (("row", 0), "beam-1", "beam-2")
    manager.check_invariants()


@pytest.mark.parametrize(
    ("minted", "error", "match"),
    [
        (["a", "x"], DuplicateSequenceError, r"new_seq_id\(\) returned 'a', which is None, live"),
        (["x", "x"], DuplicateSequenceError, "returned 'x'.*already minted"),
        ([None, "x"], DuplicateSequenceError, "returned None"),
        ([["x"], "y"], TypeError, r"new_seq_id\(\) returned unhashable \['x'\]"),
    ],
)
def test_a_bad_minted_id_is_refused_before_anything_changes(
    minted: list[object], error: type[Exception], match: str
) -> None:
    manager = make()
    manager.add_sequence("a", [1, 2, 3])
    names = iter(minted)
    rows = PagedRows(manager, ["a"], new_seq_id=lambda: next(names))
    before = manager.snapshot()
    with pytest.raises(error, match=match):
        rows.repeat(3)
    assert manager.snapshot() == before and not rows.consumed


# -- insert and extract -----------------------------------------------------------------------


def test_extract_forks_a_row_and_leaves_self_unchanged() -> None:
    rows, pool = computed_rows([A, None])
    manager = rows.manager
    one = rows.extract(0)
    assert not rows.consumed and rows.seq_ids == ("s0", None)
    assert one.batch_size == 1 and one.seq_ids == (("row", 0),)
    assert manager.get_sequence(("row", 0)).page_ids == manager.get_sequence("s0").page_ids
    assert read_back(one, pool) == [A]
    empty = rows.extract(1)
    assert empty.seq_ids == (None,)
    manager.check_invariants()


def test_extract_refusals_are_atomic() -> None:
    rows, pool = computed_rows([A, B], max_num_seqs=2)
    manager = rows.manager
    before = manager.snapshot()
    with pytest.raises(CapacityError, match="PagedRows.extract: needs 1 fork.*max_num_seqs=2"):
        rows.extract(0)
    assert manager.snapshot() == before
    rows = rows.reset_rows([1])
    manager.append_tokens("s0", [1])
    step = manager.schedule([("s0", 1)])
    before = manager.snapshot()
    with pytest.raises(StepPendingError, match="PagedRows.extract: row 0"):
        rows.extract(0)
    assert manager.snapshot() == before and not rows.consumed
    pool.apply(step)
    manager.commit_step(step)


def test_insert_replaces_a_row_and_consumes_both() -> None:
    rows, pool = computed_rows([A, B, C])
    manager = rows.manager
    one = rows.extract(2)
    result = rows.insert(one, 0)
    assert result.seq_ids == (("row", 0), "s1", "s2")
    assert "s0" not in manager
    assert rows.consumed and one.consumed
    assert read_back(result, pool) == [C, B, C]
    manager.check_invariants()


def test_insert_of_a_newly_added_sequence_and_of_an_empty_row() -> None:
    rows, pool = computed_rows([A, None])
    manager = rows.manager
    manager.add_sequence("new", A + [9])  # a prefix hit on s0's first page
    run_step(manager, pool, [("new", 3)])
    rows = rows.insert(PagedRows(manager, ["new"]), 1)
    assert rows.seq_ids == ("s0", "new")
    assert read_back(rows, pool) == [A, A + [9]]
    rows = rows.insert(PagedRows(manager, [None]), 0)
    assert rows.seq_ids == (None, "new") and manager.seq_ids == ("new",)
    manager.check_invariants()


def test_insert_refusals_are_atomic() -> None:
    rows, _ = computed_rows([A, B])
    manager = rows.manager
    other_manager = make()
    other_manager.add_sequence("x", [1])
    elsewhere = PagedRows(other_manager, ["x"])
    two = PagedRows(manager, [None, None])
    alias = PagedRows(manager, ["s1"])
    one = rows.extract(0)
    consumed = PagedRows(manager, [None])
    consumed.reset_rows([0])
    before = manager.snapshot()
    cases: list[tuple[Callable[[], object], type[Exception], str]] = [
        (lambda: rows.insert(elsewhere, 0), ValueError, "pools do not share pages"),
        (lambda: rows.insert(two, 0), ValueError, "exactly one row, got 2 rows"),
        (lambda: rows.insert("one", 0), TypeError, "other must be a PagedRows, got str"),
        (lambda: rows.insert(rows, 0), ValueError, "not this one"),
        (lambda: rows.insert(alias, 0), ValueError, "seq_id='s1' already backs row 1"),
        (lambda: rows.insert(consumed, 0), ConsumedRowsError, r"consumed by reset_rows\(\)"),
        (lambda: rows.insert(one, 2), ValueError, r"slot must lie in \[0, 2\), got 2"),
        (lambda: rows.insert(one, True), TypeError, "slot must be an int row id, got True"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
        assert manager.snapshot() == before
        assert not rows.consumed and not one.consumed
    assert isinstance(elsewhere, PagedRows) and not elsewhere.consumed


# -- consumption ------------------------------------------------------------------------------

OPERATIONS: dict[str, Callable[[PagedRows], object]] = {
    "reset_rows": lambda rows: rows.reset_rows([0]),
    "truncate": lambda rows: rows.truncate([1, 1]),
    "select": lambda rows: rows.select([1]),
    "reorder": lambda rows: rows.reorder([1, 0]),
    "repeat": lambda rows: rows.repeat(2),
    "insert": lambda rows: rows.insert(PagedRows(rows.manager, [None]), 0),
    "extract": lambda rows: rows.extract(0),
    "overflow_rows": lambda rows: rows.overflow_rows(),
    "check_overflow": lambda rows: rows.check_overflow(),
    "seq_ids": lambda rows: rows.seq_ids,
    "batch_size": lambda rows: rows.batch_size,
    "slots": lambda rows: rows.slots(),
}


@pytest.mark.parametrize("consumer", ["reset_rows", "truncate", "select", "reorder", "repeat"])
@pytest.mark.parametrize("use", sorted(OPERATIONS))
def test_a_consumed_rows_object_refuses_every_use(consumer: str, use: str) -> None:
    rows, _ = computed_rows([A, B])
    result = OPERATIONS[consumer](rows)
    assert isinstance(result, PagedRows) and rows.consumed
    with pytest.raises(ConsumedRowsError, match=rf"consumed by {consumer}\(\); use the PagedRows"):
        OPERATIONS[use](rows)
    assert rows.manager is result.manager  # still readable
    assert "consumed" in repr(rows)


def test_consumed_error_is_a_runtime_error_and_extract_consumes_nothing() -> None:
    assert issubclass(ConsumedRowsError, RuntimeError)
    assert issubclass(ConsumedRowsError, PagesError)
    rows, _ = computed_rows([A, B])
    rows.extract(0)
    rows.overflow_rows()
    rows.check_overflow()
    assert not rows.consumed
    rows.select([0])


# -- argument errors: clear, and nothing changes ----------------------------------------------

ARGUMENT_ERRORS: list[tuple[str, Callable[[PagedRows], object], type[Exception], str]] = [
    ("reset mask length", lambda r: r.reset_rows([True]), ValueError, r"shape \(3,\), got \(1,\)"),
    (
        "reset 2-D mask",
        lambda r: r.reset_rows(np.ones((3, 1), bool)),
        ValueError,
        r"rows mask must have shape \(3,\), got \(3, 1\)",
    ),
    ("reset range", lambda r: r.reset_rows([3]), ValueError, r"row ids in \[0, 3\), got \[3\]"),
    ("reset negative", lambda r: r.reset_rows([-1]), ValueError, "-1 is out of range"),
    ("reset float", lambda r: r.reset_rows([0.0]), TypeError, r"rows\[0\] must be an int"),
    ("reset float array", lambda r: r.reset_rows(np.ones(3)), TypeError, "dtype float64"),
    ("reset str", lambda r: r.reset_rows("0"), TypeError, "rows must be a sequence of ints"),
    ("truncate length", lambda r: r.truncate([1, 1]), ValueError, "one int per row \\(3\\), got 2"),
    (
        "truncate too long",
        lambda r: r.truncate([7, 0, 0]),
        ValueError,
        r"lengths\[0\]=7 is out of range; row 0 \(seq_id='s0'\) holds 6 token\(s\)",
    ),
    (
        "truncate empty row",
        lambda r: r.truncate([0, 0, 1]),
        ValueError,
        r"lengths\[2\]=1 is out of range; row 2 \(an empty row\) holds 0",
    ),
    ("truncate negative", lambda r: r.truncate([0, -1, 0]), ValueError, r"lengths\[1\]=-1"),
    ("truncate bool", lambda r: r.truncate([0, True, 0]), TypeError, r"lengths\[1\] must be an"),
    ("truncate scalar", lambda r: r.truncate(3), TypeError, "lengths must be a sequence of ints"),
    ("select none", lambda r: r.select([]), ValueError, "at least one row"),
    ("select twice", lambda r: r.select([0, 0]), ValueError, r"distinct row ids, got \[0, 0\]"),
    ("select range", lambda r: r.select([0, 5]), ValueError, r"rows must be row ids in \[0, 3\)"),
    ("select float", lambda r: r.select([1.5]), TypeError, r"rows\[0\] must be an int"),
    ("reorder length", lambda r: r.reorder([0, 1]), ValueError, r"one row id per row \(3\)"),
    ("reorder range", lambda r: r.reorder([0, 1, 3]), ValueError, r"indices must be row ids"),
    ("reorder 2-D", lambda r: r.reorder(np.zeros((3, 1), int)), TypeError, r"shape \(3, 1\)"),
    ("repeat zero", lambda r: r.repeat(0), ValueError, "n must be >= 1, got 0"),
    ("repeat bool", lambda r: r.repeat(True), TypeError, "n must be an int, got bool"),
    ("repeat float", lambda r: r.repeat(2.0), TypeError, "n must be an int, got float"),
    ("extract range", lambda r: r.extract(-1), ValueError, r"slot must lie in \[0, 3\), got -1"),
    ("extract str", lambda r: r.extract("0"), TypeError, "slot must be an int row id"),
]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [case[1:] for case in ARGUMENT_ERRORS],
    ids=[case[0] for case in ARGUMENT_ERRORS],
)
def test_argument_errors_are_clear_and_atomic(
    call: Callable[[PagedRows], object], error: type[Exception], match: str
) -> None:
    rows, _ = computed_rows([A, B, None])
    before = rows.manager.snapshot()
    with pytest.raises(error, match=match):
        call(rows)
    assert rows.manager.snapshot() == before
    assert not rows.consumed and rows.seq_ids == ("s0", "s1", None)


# -- stateful: ragged writes and row operations against a shadow pool -------------------------

NUM_PAGES = 14
PAGE_SIZE = 2
MAX_NUM_SEQS = 6
MAX_PAGES_PER_SEQ = 6
MAX_SEQ_LEN = PAGE_SIZE * MAX_PAGES_PER_SEQ
MAX_BATCH = 8

# Shared stems over a tiny vocabulary make prefix hits, and truncations inside cached pages, common.
STEMS = [[1, 1, 2, 2], [1, 1, 2, 2, 3, 3], [4, 5, 4, 5, 4]]
prompts = st.builds(
    lambda stem, tail: stem + tail,
    st.sampled_from(STEMS),
    st.lists(st.integers(0, 5), min_size=1, max_size=3),
)
salts = st.sampled_from([None, "tenant"])


class PagedRowsMachine(RuleBasedStateMachine):
    """`rows` is the batch; `side` a one-row `PagedRows` extracted or added earlier (or None).
    `reference[b]` / `side_reference` are the token ids each row must hold, in plain Python."""

    def __init__(self) -> None:
        super().__init__()
        self.manager = PageManager(
            num_pages=NUM_PAGES,
            page_size=PAGE_SIZE,
            max_num_seqs=MAX_NUM_SEQS,
            max_pages_per_seq=MAX_PAGES_PER_SEQ,
            hash_key=b"rows-stateful",
            token_buckets=(8, 16, 32, 64, 128),
        )
        self.pool = ShadowPool(NUM_PAGES, PAGE_SIZE)
        self.rows = PagedRows(self.manager, [None])
        self.reference: list[list[int] | None] = [None]
        self.side: PagedRows | None = None
        self.side_reference: list[int] | None = None
        self.next_id = 0

    # -- helpers ---------------------------------------------------------------------------------

    def add(self, prompt: list[int], salt: str | None) -> PagedRows | None:
        """A newly added sequence as a one-row PagedRows (None when max_num_seqs are live)."""
        if len(self.manager) >= MAX_NUM_SEQS:
            return None
        seq_id = f"seq{self.next_id}"
        self.next_id += 1
        if self.manager.add_sequence(seq_id, prompt, cache_salt=salt):
            event("prefix hit")
        return PagedRows(self.manager, [seq_id])

    def adopt(self, old: PagedRows, new: PagedRows, reference: list[list[int] | None]) -> None:
        with pytest.raises(ConsumedRowsError):
            old.seq_ids  # noqa: B018
        self.rows, self.reference = new, reference

    def refused(self, error: type[Exception], call: Callable[[], object]) -> None:
        before = self.manager.snapshot()
        with pytest.raises(error):
            call()
        assert self.manager.snapshot() == before
        assert not self.rows.consumed

    def live_rows(self) -> list[tuple[Hashable, list[int]]]:
        """(seq_id, reference tokens) of every non-empty row, the side row included."""
        pairs = [
            (seq_id, tokens)
            for seq_id, tokens in zip(self.rows.seq_ids, self.reference, strict=True)
            if seq_id is not None
        ]
        if self.side is not None and self.side.seq_ids[0] is not None:
            pairs.append((self.side.seq_ids[0], self.side_reference))
        return pairs

    def pick_row(self, data: st.DataObject) -> int:
        return data.draw(st.integers(0, self.rows.batch_size - 1), label="row")

    # -- rules -----------------------------------------------------------------------------------

    @initialize(first=prompts, second=prompts)
    def start(self, first: list[int], second: list[int]) -> None:
        """Two computed rows sharing a stem, and an empty one."""
        rows, reference = self.rows.repeat(3), [None, None, None]
        self.adopt(self.rows, rows, reference)
        for slot, prompt in ((0, STEMS[1] + first[-1:]), (1, second)):
            self.insert_new_at(prompt, None, slot, compute_now=True)

    @rule(prompt=prompts, salt=salts, data=st.data(), compute_now=st.booleans())
    def insert_new(
        self, prompt: list[int], salt: str | None, data: st.DataObject, compute_now: bool
    ) -> None:
        """A newly added sequence joins the batch at a random slot."""
        self.insert_new_at(prompt, salt, self.pick_row(data), compute_now)

    def insert_new_at(
        self, prompt: list[int], salt: str | None, slot: int, compute_now: bool
    ) -> None:
        incoming = self.add(prompt, salt)
        if incoming is None:
            return
        (seq_id,) = incoming.seq_ids
        if compute_now:
            remaining = len(prompt) - self.manager.get_sequence(seq_id).num_computed
            self.try_step([(seq_id, remaining)])
        reference = list(self.reference)
        reference[slot] = list(prompt)
        self.adopt(self.rows, self.rows.insert(incoming, slot), reference)
        assert incoming.consumed

    @rule(data=st.data())
    def extract(self, data: st.DataObject) -> None:
        """The side row becomes a fork of a random row (the old side row is dropped)."""
        if self.side is not None:
            self.side.reset_rows([0])
            self.side = self.side_reference = None
        slot = self.pick_row(data)
        seq_id = self.rows.seq_ids[slot]
        if seq_id is not None and len(self.manager) >= MAX_NUM_SEQS:
            self.refused(CapacityError, lambda: self.rows.extract(slot))
            return
        self.side = self.rows.extract(slot)
        ref = self.reference[slot]
        self.side_reference = None if ref is None else list(ref)
        assert not self.rows.consumed
        if seq_id is not None:
            event("extract")
            ours, theirs = (self.manager.get_sequence(s) for s in (seq_id, self.side.seq_ids[0]))
            assert ours.page_ids == theirs.page_ids

    @rule(data=st.data())
    def insert_side(self, data: st.DataObject) -> None:
        if self.side is None:
            return
        slot = self.pick_row(data)
        reference = list(self.reference)
        reference[slot] = self.side_reference
        self.adopt(self.rows, self.rows.insert(self.side, slot), reference)
        self.side = self.side_reference = None
        event("insert extracted row")

    @rule(data=st.data(), tokens=st.lists(st.integers(0, 5), min_size=1, max_size=4))
    def append(self, data: st.DataObject, tokens: list[int]) -> None:
        live = self.live_rows()
        if not live:
            return
        seq_id, reference = data.draw(st.sampled_from(live), label="row to append to")
        tokens = tokens[: MAX_SEQ_LEN - len(reference)]
        self.manager.append_tokens(seq_id, tokens)
        reference.extend(tokens)

    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        """A ragged write: a random subset of the rows, each with a random chunk."""
        pending = {}
        for seq_id, reference in self.live_rows():
            remaining = len(reference) - self.manager.get_sequence(seq_id).num_computed
            if remaining:
                pending[seq_id] = remaining
        if not pending:
            return
        chosen = data.draw(
            st.lists(st.sampled_from(sorted(pending, key=str)), min_size=1, unique=True),
            label="batch",
        )
        self.try_step(
            [(s, data.draw(st.integers(1, pending[s]), label="num_new_tokens")) for s in chosen]
        )

    @rule(data=st.data())
    def decode(self, data: st.DataObject) -> None:
        """Every row with room gets one new token, then every row computes what it lacks (a
        ragged write: prefill remainders and single decode tokens in one step)."""
        batch = []
        for seq_id, reference in self.live_rows():
            if len(reference) < MAX_SEQ_LEN:
                token = data.draw(st.integers(0, 5), label="token")
                self.manager.append_tokens(seq_id, [token])
                reference.append(token)
            remaining = len(reference) - self.manager.get_sequence(seq_id).num_computed
            if remaining:
                batch.append((seq_id, remaining))
        if batch:
            self.try_step(batch)

    def try_step(self, batch: list[tuple[Hashable, int]]) -> None:
        needed = self.manager.pages_needed(batch)
        page_counts = {s: len(self.manager.get_sequence(s).page_ids) for s, _ in batch}
        # Cached pages a row writes into (held partly after a truncate): they must not change.
        cached_targets = {}
        for seq_id, _ in batch:
            info = self.manager.get_sequence(seq_id)
            if info.num_computed % PAGE_SIZE:
                page = info.page_ids[info.num_computed // PAGE_SIZE]
                if self.manager._prefix_cache.is_cached(page):
                    cached_targets[page] = list(self.pool.pages[page])
        before = self.manager.snapshot()
        try:
            step = self.manager.schedule(batch)
        except OutOfPagesError as error:
            assert needed == error.needed > error.free + error.evictable
            assert self.manager.snapshot() == before
            event("out of pages")
            return
        grown = sum(
            len(self.manager.get_sequence(s).page_ids) - page_counts[s] for s in page_counts
        )
        assert needed == step.num_copies + grown  # _plan agrees exactly with schedule
        assert step.num_copies >= len(cached_targets)
        if step.num_copies:
            event("copy-on-write")
        self.pool.apply(step)
        for page, contents in cached_targets.items():
            assert self.pool.pages[page] == contents
            event("write after a truncate inside a cached page")
        self.manager.commit_step(step)

    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        lengths = [
            0 if ref is None else data.draw(st.integers(0, len(ref)), label="length")
            for ref in self.reference
        ]
        result = self.rows.truncate(lengths)
        reference = [
            None if ref is None else ref[:n] for ref, n in zip(self.reference, lengths, strict=True)
        ]
        self.adopt(self.rows, result, reference)
        for seq_id in result.seq_ids:
            if seq_id is None:
                continue
            info = self.manager.get_sequence(seq_id)
            if info.num_computed % PAGE_SIZE:
                page = info.page_ids[-1]
                if self.manager._prefix_cache.is_cached(page):
                    event("truncated inside a cached page")

    @rule(data=st.data())
    def select(self, data: st.DataObject) -> None:
        rows = data.draw(
            st.permutations(range(self.rows.batch_size)).flatmap(
                lambda order: st.integers(1, len(order)).map(lambda n: order[:n])
            ),
            label="rows",
        )
        self.adopt(self.rows, self.rows.select(rows), [self.reference[r] for r in rows])

    def excess_sequences(self, sources: list[int]) -> int:
        """Live sequences beyond max_num_seqs once the rows are gathered from `sources`."""
        unused = {r for r in range(self.rows.batch_size) if r not in sources}
        freed = sum(self.rows.seq_ids[r] is not None for r in unused)
        seen: set[int] = set()
        forks = 0
        for row in sources:
            forks += row in seen and self.rows.seq_ids[row] is not None
            seen.add(row)
        return len(self.manager) - freed + forks - MAX_NUM_SEQS

    def gather(self, sources: list[int], call: Callable[[], PagedRows]) -> None:
        if self.excess_sequences(sources) > 0:
            self.refused(CapacityError, call)
            event("fork capacity refused")
            return
        result = call()
        reference: list[list[int] | None] = []
        for row in sources:
            ref = self.reference[row]
            reference.append(None if ref is None else list(ref))
        self.adopt(self.rows, result, reference)

    @rule(data=st.data())
    def reorder(self, data: st.DataObject) -> None:
        size = self.rows.batch_size
        indices = data.draw(
            st.lists(st.integers(0, size - 1), min_size=size, max_size=size), label="indices"
        )
        self.gather(indices, lambda: self.rows.reorder(indices))

    @rule(n=st.integers(1, 3))
    def repeat(self, n: int) -> None:
        if self.rows.batch_size * n > MAX_BATCH:
            return
        sources = [row for row in range(self.rows.batch_size) for _ in range(n)]
        self.gather(sources, lambda: self.rows.repeat(n))

    @rule(data=st.data())
    def reset_rows(self, data: st.DataObject) -> None:
        mask = data.draw(
            st.lists(
                st.integers(0, 3).map(lambda draw: draw == 0),  # a row is reset 1 time in 4
                min_size=self.rows.batch_size,
                max_size=self.rows.batch_size,
            ),
            label="mask",
        )
        reference = [None if flag else ref for ref, flag in zip(self.reference, mask, strict=True)]
        self.adopt(self.rows, self.rows.reset_rows(np.array(mask)), reference)

    # -- invariants ------------------------------------------------------------------------------

    @invariant()
    def manager_invariants_hold(self) -> None:
        self.manager.check_invariants()
        live = {seq_id for seq_id, _ in self.live_rows()}
        assert set(self.manager.seq_ids) == live  # no sequence leaks out of the rows
        assert not self.rows.overflow_rows().any()

    @invariant()
    def every_row_reads_back_its_own_tokens(self) -> None:
        for seq_id, reference in self.live_rows():
            info = self.manager.get_sequence(seq_id)
            assert list(info.token_ids) == reference
            assert (
                self.pool.read(info.page_ids, info.num_computed) == reference[: info.num_computed]
            )
        assert len(self.reference) == self.rows.batch_size
        for seq_id, reference in zip(self.rows.seq_ids, self.reference, strict=True):
            assert (seq_id is None) == (reference is None)

    @invariant()
    def cached_pages_are_intact(self) -> None:
        for entry in self.manager._prefix_cache.entries():
            assert tuple(self.pool.pages[entry.page]) == entry.token_ids

    def teardown(self) -> None:
        self.rows.reset_rows([True] * self.rows.batch_size)
        if self.side is not None:
            self.side.reset_rows([0])
        self.manager.check_invariants()
        assert len(self.manager) == 0
        assert self.manager.num_free_pages + self.manager.num_evictable_pages == NUM_PAGES


TestPagedRowsStateful = PagedRowsMachine.TestCase
TestPagedRowsStateful.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_a_row_freed_behind_the_rows_back_is_refused_before_anything_changes() -> None:
    rows, _ = computed_rows([A, B])
    manager = rows.manager
    manager.free("s1")
    before = manager.snapshot()
    for call in (lambda: rows.reset_rows([0, 1]), lambda: rows.repeat(2), lambda: rows.select([0])):
        with pytest.raises(UnknownSequenceError, match=r"PagedRows.\w+: seq_ids\[1\]='s1'"):
            call()
        assert manager.snapshot() == before and not rows.consumed
    one = PagedRows(manager, ["s0"])
    target = PagedRows(manager, [None])
    manager.free("s0")
    with pytest.raises(UnknownSequenceError, match=r"insert \(other\): seq_ids\[0\]='s0'"):
        target.insert(one, 0)
    assert not target.consumed and not one.consumed
