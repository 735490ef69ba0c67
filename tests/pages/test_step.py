"""Tests of `build_step_metadata`'s refusals of steps that would lose a token's key/value on the
device (a page twice in a row, a written page in two rows, clashing copies), of the pool geometry
every `StepMetadata` carries, and a property test: every step the builder accepts, applied the way
the device applies it, leaves every row reading its own tokens."""

from __future__ import annotations

import dataclasses

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from jaxkv.pages import PageManager, StepMetadata, StepRow, build_step_metadata

from .shadow_pool import ShadowPool

CONFIG = dict(num_pages=6, page_size=2, max_num_seqs=3, max_pages_per_seq=3, token_buckets=(16,))


def build(rows: list[StepRow], copy_ops: object = ()) -> StepMetadata:
    return build_step_metadata(rows, copy_ops, **CONFIG)  # type: ignore[arg-type]


# -- refusals: duplicate slots and clashing copies --------------------------------------------

REFUSALS: list[tuple[str, list[StepRow], list[tuple[int, int]], str]] = [
    (
        "page twice in a row",
        [StepRow("a", (0, 0), 0, (1, 2, 3))],
        [],
        r"rows\[0\] \(seq_id='a'\) holds page 0 twice \(page_ids\[0\] and page_ids\[1\]\)",
    ),
    (
        "page twice in a row, read only",
        [StepRow("a", (1, 1, 2), 4, (9,))],
        [],
        r"rows\[0\] \(seq_id='a'\) holds page 1 twice",
    ),
    (
        "a written page also read by another row",
        [StepRow("a", (0, 1), 2, (5,)), StepRow("b", (1, 2), 3, (6,))],
        [],
        r"page 1 is written this step by rows\[0\] \(seq_id='a'\) \(page_ids\[1\]\) but also "
        r"held by rows\[1\] \(seq_id='b'\)",
    ),
    (
        "two rows write one page",
        [StepRow("a", (0,), 0, (1,)), StepRow("b", (0,), 1, (2,))],
        [],
        "page 0 is written this step by rows",
    ),
    (
        "a forked partial page written in place by both forks",
        [StepRow("a", (0, 1), 3, (7,)), StepRow("b", (0, 1), 3, (8,))],
        [],
        r"page 1 is written this step by rows\[0\]",
    ),
    (
        "two copies into one page",
        [StepRow("a", (0, 1), 3, (7,)), StepRow("b", (0, 2), 3, (8,))],
        [(1, 2), (3, 2)],
        r"copy_ops\[0\]=\(1, 2\) and copy_ops\[1\]=\(3, 2\) both copy into page 2",
    ),
    (
        "a copy into a page another row reads",
        [StepRow("a", (0, 1), 3, (7,)), StepRow("b", (0, 2), 3, (8,))],
        [(1, 0)],
        r"copy_ops\[0\]=\(1, 0\) overwrites page 0, which rows\[0\] \(seq_id='a'\) reads at "
        r"page_ids\[0\] without writing it",
    ),
    (
        "a copy into a page its own row reads",
        [StepRow("a", (0, 1), 3, (7,))],
        [(2, 0)],
        r"copy_ops\[0\]=\(2, 0\) overwrites page 0",
    ),
    (
        "a copy destination that is another copy's source",
        [StepRow("a", (0, 1), 3, (7,)), StepRow("b", (0, 2), 3, (8,))],
        [(1, 2), (2, 1)],
        r"copy_ops\[0\]=\(1, 2\) copies into page 2, which copy_ops\[1\]=\(2, 1\) copies from",
    ),
    (
        "a copy into a page no row writes",
        [StepRow("a", (0, 1), 3, (7,))],
        [(1, 4)],
        r"copy_ops\[0\]=\(1, 4\) copies into page 4, which no row writes this step",
    ),
    (
        "one sequence in two rows",
        [StepRow("a", (0,), 0, (1,)), StepRow("a", (1,), 0, (1,))],
        [],
        r"rows\[1\] repeats seq_id='a' of rows\[0\]",
    ),
]


@pytest.mark.parametrize(
    ("rows", "copy_ops", "match"),
    [case[1:] for case in REFUSALS],
    ids=[case[0] for case in REFUSALS],
)
def test_builder_refuses_steps_that_lose_a_tokens_kv(
    rows: list[StepRow], copy_ops: list[tuple[int, int]], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        build(rows, copy_ops)


def test_read_only_pages_may_be_shared_and_a_copy_gives_a_writer_its_own_page() -> None:
    # Two forks of a 3-token sequence decode one token each: page 0 (full) is shared read-only,
    # a writes into its private copy 2 of the shared partial page 1, b writes page 1 in place.
    step = build([StepRow("a", (0, 2), 3, (7,)), StepRow("b", (0, 1), 3, (8,))], [(1, 2)])
    np.testing.assert_array_equal(step.page_tables[:2], [[0, 2, -1], [0, 1, -1]])
    np.testing.assert_array_equal(step.slot_mapping[:2], [5, 3])
    np.testing.assert_array_equal(step.copy_ops[:1], [[1, 2]])
    # Three forks: two copies of the same source are fine.
    step = build(
        [
            StepRow("a", (0, 2), 3, (7,)),
            StepRow("b", (0, 3), 3, (8,)),
            StepRow("c", (0, 1), 3, (9,)),
        ],
        np.array([[1, 2], [1, 3]]),
    )
    assert step.num_copies == 2


# -- the pool geometry travels with the step --------------------------------------------------


def test_every_step_records_the_geometry_it_was_built_for() -> None:
    step = build([StepRow("a", (0,), 0, (1,))])
    assert (step.num_pages, step.page_size, step.max_num_seqs, step.max_pages_per_seq) == (
        6,
        2,
        3,
        3,
    )
    assert step.page_tables.shape == (step.max_num_seqs, step.max_pages_per_seq)
    for name in ("num_pages", "page_size", "max_num_seqs", "max_pages_per_seq"):
        assert type(getattr(step, name)) is int, name

    manager = PageManager(8, 4, 2, 3, hash_key=b"geometry")
    manager.add_sequence("a", [1, 2, 3])
    step = manager.schedule([("a", 3)])
    assert (step.num_pages, step.page_size, step.max_num_seqs, step.max_pages_per_seq) == (
        8,
        4,
        2,
        3,
    )
    # Frozen, and `dataclasses.replace` (used by the device side's tests) keeps it.
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.num_pages = 4  # type: ignore[misc]
    copy = dataclasses.replace(step, slot_mapping=step.slot_mapping.copy())
    assert (copy.num_pages, copy.page_size, copy.max_num_seqs, copy.max_pages_per_seq) == (
        8,
        4,
        2,
        3,
    )
    manager.commit_step(step)


def test_numpy_geometry_is_recorded_as_python_ints() -> None:
    config = {**CONFIG, "num_pages": np.int64(6), "page_size": np.int32(2)}
    step = build_step_metadata([StepRow("a", (0,), 0, (1,))], [], **config)  # type: ignore[arg-type]
    assert type(step.num_pages) is int and type(step.page_size) is int


# -- property: whatever the builder accepts, the device applies without losing a token --------

NUM_PAGES, PAGE_SIZE = CONFIG["num_pages"], CONFIG["page_size"]


@st.composite
def arbitrary_steps(draw: st.DrawFn) -> tuple[list[StepRow], list[tuple[int, int]]]:
    """Rows and copies over a tiny pool, with pages drawn freely (so overlaps are common)."""
    rows = []
    for index in range(draw(st.integers(1, 3))):
        start = draw(st.integers(0, 4))
        count = draw(st.integers(1, 6 - start))
        num_pages = -(-(start + count) // PAGE_SIZE)
        pages = draw(
            st.lists(st.integers(0, NUM_PAGES - 1), min_size=num_pages, max_size=num_pages)
        )
        rows.append(StepRow(f"s{index}", tuple(pages), start, tuple(range(count))))
    copies = draw(
        st.lists(
            st.tuples(st.integers(0, NUM_PAGES - 1), st.integers(0, NUM_PAGES - 1)).filter(
                lambda pair: pair[0] != pair[1]
            ),
            max_size=len(rows),
        )
    )
    return rows, copies


@settings(max_examples=300, deadline=None)
@given(arbitrary_steps())
def test_every_accepted_step_keeps_every_rows_tokens(
    case: tuple[list[StepRow], list[tuple[int, int]]],
) -> None:
    rows, copies = case
    try:
        step = build(rows, copies)
    except ValueError:
        return
    # Mark every slot with what it held before the step, then apply the step as the device does.
    pool = ShadowPool(NUM_PAGES, PAGE_SIZE)
    pool.pages = [
        [("old", page, offset) for offset in range(PAGE_SIZE)] for page in range(NUM_PAGES)
    ]
    before = [list(page) for page in pool.pages]
    # Each new token's id names its row and position, so a misplaced write shows.
    step = dataclasses.replace(step, token_ids=step.token_ids.astype(object))
    for row, step_row in enumerate(rows):
        start = step_row.num_computed
        for offset in range(len(step_row.new_token_ids)):
            step.token_ids[step.query_start_loc[row] + offset] = ("new", row, start + offset)
    pool.apply(step)
    copied = {dst: src for src, dst in copies}
    for row, step_row in enumerate(rows):
        start, end = step_row.num_computed, int(step.context_lens[row])
        for position in range(end):
            page = step_row.page_ids[position // PAGE_SIZE]
            held = pool.pages[page][position % PAGE_SIZE]
            if position >= start:
                assert held == ("new", row, position)  # no other row's write landed here
            else:  # read, never overwritten: the old contents, or the copy's source
                assert held == before[copied.get(page, page)][position % PAGE_SIZE]


def test_shadow_pool_refuses_a_step_that_writes_one_slot_twice() -> None:
    step = build([StepRow("a", (0,), 0, (1,))])
    broken = dataclasses.replace(
        step,
        num_tokens=2,
        slot_mapping=np.array([0, 0] + [-1] * 14),
        token_ids=np.array([1, 2] + [0] * 14),
    )
    with pytest.raises(AssertionError, match="twice"):
        ShadowPool(6, 2).apply(broken)
