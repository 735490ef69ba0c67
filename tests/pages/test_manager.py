"""Tests of `PageManager`: step arrays, prefix reuse, eviction, copy-on-write, error paths."""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Callable

import numpy as np
import pytest

import jaxkv.pages
from jaxkv.pages import (
    ROOT_HASH,
    CapacityError,
    DuplicateSequenceError,
    OutOfPagesError,
    PageManager,
    PagesError,
    SchedulingError,
    StepMetadata,
    StepPendingError,
    StepRow,
    UnknownSequenceError,
    build_step_metadata,
    default_token_buckets,
    select_bucket,
)

from .shadow_pool import ShadowPool

KEY = b"manager-test-key"


def make(**overrides: object) -> PageManager:
    config: dict[str, object] = dict(
        num_pages=8, page_size=4, max_num_seqs=3, max_pages_per_seq=4, hash_key=KEY
    )
    config.update(overrides)
    return PageManager(**config)  # type: ignore[arg-type]


def run_step(
    manager: PageManager, pool: ShadowPool, batch: list[tuple[object, int]]
) -> StepMetadata:
    """Schedule, 'run' on the shadow pool, check every row reads back its tokens, commit."""
    step = manager.schedule(batch)
    pool.apply(step)
    for row, seq_id in enumerate(step.seq_ids):
        info = manager.get_sequence(seq_id)
        length = int(step.context_lens[row])
        pages = [p for p in step.page_tables[row].tolist() if p != -1]
        assert pool.read(pages, length) == list(info.token_ids[:length])
    manager.commit_step(step)
    return step


def compute_prompt(
    manager: PageManager, pool: ShadowPool, seq_id: object, prompt: list[int], **kwargs: object
) -> int:
    hits = manager.add_sequence(seq_id, prompt, **kwargs)  # type: ignore[arg-type]
    run_step(manager, pool, [(seq_id, len(prompt) - hits)])
    return hits


# -- construction -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        (dict(num_pages=0), ValueError, "num_pages must be an int >= 1, got 0"),
        (dict(page_size=-1), ValueError, "page_size must be an int >= 1, got -1"),
        (dict(max_num_seqs=1.5), ValueError, "max_num_seqs must be an int >= 1, got 1.5"),
        (dict(max_pages_per_seq=True), ValueError, "max_pages_per_seq must be an int >= 1"),
        (dict(max_pages_per_seq=9), ValueError, "max_pages_per_seq=9 exceeds num_pages=8"),
        (dict(num_pages=2**20, page_size=2**12), ValueError, "int32 slot_mapping"),
        (dict(enable_prefix_caching="yes"), TypeError, "enable_prefix_caching must be a bool"),
        (dict(hash_key=b""), ValueError, "hash_key must be None or 1 to 64 bytes"),
        (dict(hash_key="key"), ValueError, "hash_key"),
        (dict(token_buckets=[]), ValueError, "token_buckets must not be empty"),
        (dict(token_buckets=[8, 8]), ValueError, "strictly increasing"),
        (dict(token_buckets=[0, 8]), ValueError, "ints >= 1"),
    ],
)
def test_constructor_validates_every_argument(
    overrides: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        make(**overrides)


def test_default_configuration() -> None:
    manager = PageManager(num_pages=16, page_size=4, max_num_seqs=2, max_pages_per_seq=4)
    assert manager.token_buckets == (8, 16, 32)  # up to 2 * 4 * 4 = 32 tokens
    assert manager.max_seq_len == 16
    assert manager.enable_prefix_caching
    assert manager.num_free_pages == 16 and manager.num_used_pages == 0
    manager.check_invariants()


def test_random_keys_differ_between_managers() -> None:
    first, second = (PageManager(4, 2, 1, 2) for _ in range(2))
    tokens = [1, 2]
    assert first._prefix_cache.hash_page(ROOT_HASH, b"", tokens) != second._prefix_cache.hash_page(
        ROOT_HASH, b"", tokens
    )


# -- step arrays ------------------------------------------------------------------------------


def test_prefill_then_decode_arrays_are_exact() -> None:
    manager = make(max_num_seqs=2, token_buckets=(4, 8, 16))
    pool = ShadowPool(8, 4)
    assert manager.add_sequence("a", [10, 11, 12, 13, 14, 15]) == 0

    step = manager.schedule([("a", 6)])
    assert step.seq_ids == ("a",) and step.num_new_tokens == (6,)
    assert (step.num_seqs, step.num_tokens, step.num_tokens_padded, step.num_copies) == (1, 6, 8, 0)
    np.testing.assert_array_equal(step.page_tables, [[0, 1, -1, -1], [-1, -1, -1, -1]])
    np.testing.assert_array_equal(step.context_lens, [6, 0])
    np.testing.assert_array_equal(step.query_start_loc, [0, 6, 6])
    np.testing.assert_array_equal(step.slot_mapping, [0, 1, 2, 3, 4, 5, -1, -1])
    np.testing.assert_array_equal(step.positions, [0, 1, 2, 3, 4, 5, 0, 0])
    np.testing.assert_array_equal(step.token_ids, [10, 11, 12, 13, 14, 15, 0, 0])
    np.testing.assert_array_equal(step.copy_ops, [[-1, -1], [-1, -1]])
    np.testing.assert_array_equal(step.logits_indices, [5, 0])
    for name, array in step.arrays().items():
        assert array.dtype == np.int32, name
        assert not array.flags.writeable, name
    assert manager.pending_step is step
    assert manager.get_sequence("a").num_computed == 0  # not before commit
    pool.apply(step)
    manager.commit_step(step)
    assert manager.pending_step is None
    assert manager.get_sequence("a").num_computed == 6

    manager.append_tokens("a", [99])
    step = manager.schedule([("a", 1)])
    assert (step.num_tokens, step.num_tokens_padded) == (1, 4)
    np.testing.assert_array_equal(step.page_tables, [[0, 1, -1, -1], [-1, -1, -1, -1]])
    np.testing.assert_array_equal(step.context_lens, [7, 0])
    np.testing.assert_array_equal(step.query_start_loc, [0, 1, 1])
    np.testing.assert_array_equal(step.slot_mapping, [6, -1, -1, -1])
    np.testing.assert_array_equal(step.positions, [6, 0, 0, 0])
    np.testing.assert_array_equal(step.token_ids, [99, 0, 0, 0])
    np.testing.assert_array_equal(step.logits_indices, [0, 0])
    pool.apply(step)
    manager.commit_step(step)
    assert pool.read([0, 1], 7) == [10, 11, 12, 13, 14, 15, 99]


def test_rows_follow_batch_order_and_pack_tokens() -> None:
    manager = make(token_buckets=(8, 16))
    pool = ShadowPool(8, 4)
    manager.add_sequence("a", [1, 2, 3])
    manager.add_sequence("b", [4, 5, 6, 7, 8])
    step = run_step(manager, pool, [("b", 5), ("a", 2)])
    assert step.seq_ids == ("b", "a")
    np.testing.assert_array_equal(step.query_start_loc, [0, 5, 7, 7])
    np.testing.assert_array_equal(step.logits_indices, [4, 6, 0])
    np.testing.assert_array_equal(step.context_lens, [5, 2, 0])
    np.testing.assert_array_equal(step.page_tables[2], [-1] * 4)
    np.testing.assert_array_equal(step.positions[:7], [0, 1, 2, 3, 4, 0, 1])
    np.testing.assert_array_equal(step.token_ids[:7], [4, 5, 6, 7, 8, 1, 2])
    # b got pages 0, 1; a got page 2; slots follow.
    np.testing.assert_array_equal(step.slot_mapping, [0, 1, 2, 3, 4, 8, 9, -1])
    step = run_step(manager, pool, [("a", 1)])
    np.testing.assert_array_equal(step.slot_mapping[:1], [10])


def test_chunked_prefill_allocates_pages_as_needed() -> None:
    manager = make()
    pool = ShadowPool(8, 4)
    prompt = list(range(100, 110))
    manager.add_sequence("a", prompt)
    for chunk, pages_after in [(3, 1), (4, 2), (3, 3)]:
        assert manager.pages_needed([("a", chunk)]) == pages_after - len(
            manager.get_sequence("a").page_ids
        )
        run_step(manager, pool, [("a", chunk)])
        assert len(manager.get_sequence("a").page_ids) == pages_after
    assert pool.read(manager.get_sequence("a").page_ids, 10) == prompt
    assert manager.num_used_pages == 3


# -- prefix caching ---------------------------------------------------------------------------


def test_same_prompt_reuses_full_pages_and_reports_hit_tokens() -> None:
    manager = make()
    pool = ShadowPool(8, 4)
    prompt = list(range(20, 30))  # 10 tokens: 2 full pages + 2 tokens
    assert compute_prompt(manager, pool, "a", prompt) == 0
    first_pages = manager.get_sequence("a").page_ids
    used_after_first = manager.num_used_pages
    assert used_after_first == 3

    assert manager.add_sequence("b", prompt) == 8
    info = manager.get_sequence("b")
    assert info.num_computed == 8 and info.num_cached_tokens == 8
    assert info.page_ids == first_pages[:2]
    assert manager.pages_needed([("b", 2)]) == 1  # the first sequence needed 3
    run_step(manager, pool, [("b", 2)])
    assert manager.num_used_pages == used_after_first + 1
    assert pool.read(manager.get_sequence("b").page_ids, 10) == prompt

    stats = manager.stats()
    assert (stats.prefix_queries, stats.prefix_query_tokens, stats.prefix_hit_tokens) == (2, 20, 8)
    assert stats.prefix_hit_rate == pytest.approx(0.4)
    assert stats.num_cached_pages == 2
    manager.check_invariants()


def test_the_last_prompt_token_is_always_computed() -> None:
    manager = make()
    pool = ShadowPool(8, 4)
    prompt = list(range(8))  # exactly 2 full pages
    compute_prompt(manager, pool, "a", prompt)
    assert manager.add_sequence("b", prompt) == 4
    assert manager.add_sequence("c", prompt[:1]) == 0


def test_different_salt_shares_nothing_and_same_salt_shares() -> None:
    manager = make(num_pages=12)
    pool = ShadowPool(12, 4)
    prompt = list(range(9))
    compute_prompt(manager, pool, "a", prompt, cache_salt="tenant-1")
    assert manager.add_sequence("b", prompt, cache_salt="tenant-2") == 0
    assert manager.add_sequence("c", prompt) == 0  # unsalted never meets salted
    run_step(manager, pool, [("b", 9), ("c", 9)])
    pages = [set(manager.get_sequence(s).page_ids) for s in ("a", "b", "c")]
    assert not (pages[0] & pages[1]) and not (pages[0] & pages[2]) and not (pages[1] & pages[2])
    manager.free("b")
    assert manager.add_sequence("d", prompt, cache_salt=b"tenant-1") == 8  # str salt == its utf-8
    assert manager.get_sequence("d").cache_salt == b"tenant-1"


def test_prompts_diverging_inside_a_page_share_only_the_full_pages_before() -> None:
    manager = make()
    pool = ShadowPool(8, 4)
    compute_prompt(manager, pool, "a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert manager.add_sequence("b", [1, 2, 3, 4, 5, 6, 0, 8, 9]) == 4
    assert manager.add_sequence("c", [0, 2, 3, 4, 5, 6, 7, 8, 9]) == 0


def test_pages_are_cached_only_once_computed() -> None:
    manager = make()
    manager.add_sequence("a", list(range(9)))
    step = manager.schedule([("a", 9)])
    assert manager.add_sequence("b", list(range(9))) == 0  # still pending
    manager.commit_step(step)
    assert manager.add_sequence("c", list(range(9))) == 8


def test_disabled_prefix_caching_never_hits() -> None:
    manager = make(enable_prefix_caching=False)
    pool = ShadowPool(8, 4)
    compute_prompt(manager, pool, "a", list(range(9)))
    assert manager.add_sequence("b", list(range(9))) == 0
    stats = manager.stats()
    assert (stats.prefix_queries, stats.num_cached_pages, stats.prefix_hit_rate) == (0, 0, 0.0)
    manager.free("a")
    assert manager.num_free_pages == 8 and manager.num_evictable_pages == 0


def test_hits_are_confirmed_by_contents_not_the_digest_alone() -> None:
    manager = make()
    pool = ShadowPool(8, 4)
    # Every page gets the same digest: any lookup finds *a* page, only contents can tell.
    manager._prefix_cache.hash_page = lambda parent, salt, tokens: b"\x07" * 32  # type: ignore[method-assign]
    compute_prompt(manager, pool, "a", [1, 2, 3, 4, 5])
    assert manager.add_sequence("b", [9, 9, 9, 9, 5]) == 0
    assert manager.add_sequence("c", [1, 2, 3, 4, 5]) == 4


def test_freed_cached_pages_stay_reusable_until_needed() -> None:
    manager = make()
    pool = ShadowPool(8, 4)
    prompt = list(range(10))
    compute_prompt(manager, pool, "a", prompt)
    manager.free("a")
    assert (manager.num_evictable_pages, manager.num_free_pages, manager.num_used_pages) == (
        2,
        6,
        0,
    )
    assert manager.add_sequence("b", prompt) == 8
    assert (manager.num_evictable_pages, manager.num_used_pages) == (0, 2)
    run_step(manager, pool, [("b", 2)])
    assert pool.read(manager.get_sequence("b").page_ids, 10) == prompt
    manager.check_invariants()


def test_eviction_is_least_recently_used_first() -> None:
    manager = make(num_pages=6, page_size=2, max_pages_per_seq=4)
    pool = ShadowPool(6, 2)
    compute_prompt(manager, pool, "a", [1] * 5)  # pages 0, 1 (cached), 2 (partial)
    compute_prompt(manager, pool, "b", [2] * 5)  # pages 3, 4 (cached), 5 (partial)
    manager.free("a")
    manager.free("b")
    # Tails are released first, so the LRU is a's page 1, a's page 0, b's page 4, b's page 3.
    assert list(manager._prefix_cache.evictable_pages()) == [1, 0, 4, 3]
    assert list(manager._allocator.free_pages()) == [2, 5]

    manager.add_sequence("c", [3] * 7)
    step = run_step(manager, pool, [("c", 7)])
    np.testing.assert_array_equal(step.page_tables[0], [2, 5, 1, 0])
    assert manager.stats().num_evictions == 2
    manager.free("c")
    assert manager.add_sequence("a2", [1] * 5) == 0  # evicted
    assert manager.add_sequence("b2", [2] * 5) == 4  # survived
    manager.check_invariants()


# -- fork and copy-on-write -------------------------------------------------------------------


def test_fork_shares_pages_and_copies_the_partial_page_on_first_write() -> None:
    manager = make()
    pool = ShadowPool(8, 4)
    prompt = [5, 6, 7, 8, 9, 10]
    compute_prompt(manager, pool, "a", prompt)
    manager.fork("a", "b")
    shared = manager.get_sequence("a").page_ids
    assert manager.get_sequence("b").page_ids == shared
    assert [manager._allocator.refcount(p) for p in shared] == [2, 2]

    manager.append_tokens("a", [70])
    manager.append_tokens("b", [80])
    assert manager.pages_needed([("a", 1), ("b", 1)]) == 1
    step = run_step(manager, pool, [("a", 1), ("b", 1)])
    assert step.num_copies == 1
    private = manager.get_sequence("a").page_ids[1]
    np.testing.assert_array_equal(step.copy_ops[0], [shared[1], private])
    np.testing.assert_array_equal(step.copy_ops[1:], -1)
    assert manager.get_sequence("b").page_ids == shared  # last holder writes in place
    assert manager.get_sequence("a").page_ids == (shared[0], private)
    assert pool.read(manager.get_sequence("a").page_ids, 7) == prompt + [70]
    assert pool.read(manager.get_sequence("b").page_ids, 7) == prompt + [80]
    assert manager.stats().num_copies == 1
    manager.check_invariants()


def test_three_way_fork_copies_twice() -> None:
    manager = make(num_pages=10)
    pool = ShadowPool(10, 4)
    compute_prompt(manager, pool, "a", [1, 2, 3])
    manager.fork("a", "b")
    manager.fork("b", "c")
    for seq_id, token in [("a", 10), ("b", 20), ("c", 30)]:
        manager.append_tokens(seq_id, [token])
    step = run_step(manager, pool, [("c", 1), ("a", 1), ("b", 1)])
    assert step.num_copies == 2
    for seq_id, token in [("a", 10), ("b", 20), ("c", 30)]:
        assert pool.read(manager.get_sequence(seq_id).page_ids, 4) == [1, 2, 3, token]


def test_fork_at_a_page_boundary_needs_no_copy() -> None:
    manager = make()
    pool = ShadowPool(8, 4)
    compute_prompt(manager, pool, "a", [1, 2, 3, 4])
    manager.fork("a", "b")
    manager.append_tokens("a", [5])
    manager.append_tokens("b", [6])
    step = run_step(manager, pool, [("a", 1), ("b", 1)])
    assert step.num_copies == 0
    np.testing.assert_array_equal(step.copy_ops, -1)


def test_forked_sequence_writes_in_place_once_the_parent_is_freed() -> None:
    manager = make()
    pool = ShadowPool(8, 4)
    compute_prompt(manager, pool, "a", [1, 2, 3])
    manager.fork("a", "b")
    manager.free("a")
    manager.append_tokens("b", [4])
    assert run_step(manager, pool, [("b", 1)]).num_copies == 0


def test_fork_of_an_uncomputed_sequence() -> None:
    manager = make()
    pool = ShadowPool(8, 4)
    manager.add_sequence("a", [1, 2, 3])
    manager.fork("a", "b")
    run_step(manager, pool, [("a", 3), ("b", 3)])
    assert set(manager.get_sequence("a").page_ids).isdisjoint(manager.get_sequence("b").page_ids)


# -- running out of pages ---------------------------------------------------------------------


def test_out_of_pages_is_atomic_and_explains_itself() -> None:
    manager = make(num_pages=4, page_size=2, max_pages_per_seq=4)
    pool = ShadowPool(4, 2)
    compute_prompt(manager, pool, "a", [1, 2, 3])  # 2 pages, page 1 partial
    manager.fork("a", "a2")
    manager.add_sequence("b", [7, 7, 7, 7, 7])
    manager.append_tokens("a", [4])
    # a needs a private copy (1), b needs 3: 4 > 2 free.
    batch = [("a", 1), ("b", 5)]
    assert manager.pages_needed(batch) == 4
    before = manager.snapshot()
    with pytest.raises(OutOfPagesError) as info:
        manager.schedule(batch)
    assert (info.value.needed, info.value.free, info.value.evictable) == (4, 2, 0)
    assert "needs 4 page(s) but only 2 free and 0 evictable" in str(info.value)
    assert isinstance(info.value, PagesError)
    assert manager.snapshot() == before
    manager.check_invariants()
    run_step(manager, pool, [("a", 1), ("b", 1)])  # a smaller step still fits


def test_out_of_pages_counts_evictable_pages() -> None:
    manager = make(num_pages=4, page_size=2, max_pages_per_seq=4)
    pool = ShadowPool(4, 2)
    compute_prompt(manager, pool, "a", [1, 2, 3, 4, 5])
    manager.free("a")
    manager.add_sequence("b", list(range(10, 18)))  # 4 pages > 2 free + 2 evictable? no: == 4
    manager.add_sequence("c", [9])
    before = manager.snapshot()
    with pytest.raises(OutOfPagesError, match="needs 5 page.*2 free and 2 evictable"):
        manager.schedule([("b", 8), ("c", 1)])
    assert manager.snapshot() == before
    run_step(manager, pool, [("b", 8)])
    assert manager.stats().num_evictions == 2


# -- error paths ------------------------------------------------------------------------------


def populated() -> tuple[PageManager, ShadowPool]:
    manager = make(max_num_seqs=3, token_buckets=(8, 16))
    pool = ShadowPool(8, 4)
    compute_prompt(manager, pool, "a", [1, 2, 3, 4, 5])
    manager.add_sequence("b", [6, 7])
    return manager, pool


ERROR_CASES: list[tuple[str, Callable[[PageManager], object], type[Exception], str]] = [
    ("free unknown", lambda m: m.free("zz"), UnknownSequenceError, "seq_id='zz' is not a live"),
    ("append unknown", lambda m: m.append_tokens(3, [1]), KeyError, "seq_id=3 is not a live"),
    ("info unknown", lambda m: m.get_sequence("zz"), UnknownSequenceError, "seq_id='zz'"),
    ("fork unknown", lambda m: m.fork("zz", "c"), UnknownSequenceError, "parent_id='zz'"),
    ("add existing", lambda m: m.add_sequence("a", [1]), DuplicateSequenceError, "seq_id='a'"),
    ("fork existing", lambda m: m.fork("a", "b"), DuplicateSequenceError, "child_id='b'"),
    ("unhashable", lambda m: m.add_sequence(["x"], [1]), TypeError, "seq_id must be hashable"),
    (
        "prompt too long",
        lambda m: m.add_sequence("c", [1] * 17),
        CapacityError,
        "prompt_token_ids has 17 tokens; .* = 16",
    ),
    ("empty prompt", lambda m: m.add_sequence("c", []), ValueError, "prompt_token_ids must hold"),
    (
        "negative id",
        lambda m: m.add_sequence("c", [1, -2]),
        ValueError,
        r"prompt_token_ids\[1\]=-2",
    ),
    ("huge id", lambda m: m.add_sequence("c", [2**31]), ValueError, r"prompt_token_ids\[0\]="),
    ("float id", lambda m: m.add_sequence("c", [1.0]), TypeError, r"prompt_token_ids\[0\] must"),
    ("str prompt", lambda m: m.add_sequence("c", "abc"), TypeError, "prompt_token_ids must be"),
    ("int salt", lambda m: m.add_sequence("c", [1], cache_salt=5), ValueError, "cache_salt"),
    ("empty salt", lambda m: m.add_sequence("c", [1], cache_salt=""), ValueError, "cache_salt"),
    (
        "append too long",
        lambda m: m.append_tokens("a", [1] * 12),
        CapacityError,
        "appending 12 token.*max_pages_per_seq \\* page_size = 16",
    ),
    ("append bad id", lambda m: m.append_tokens("a", [-1]), ValueError, r"token_ids\[0\]=-1"),
    (
        "schedule too many",
        lambda m: m.schedule([("b", 3)]),
        SchedulingError,
        "num_new_tokens=3 for seq_id='b' exceeds its 2 uncomputed",
    ),
    (
        "schedule computed seq",
        lambda m: m.schedule([("a", 1)]),
        SchedulingError,
        "exceeds its 0 uncomputed",
    ),
    ("schedule zero", lambda m: m.schedule([("b", 0)]), SchedulingError, "got 0"),
    ("schedule bool", lambda m: m.schedule([("b", True)]), SchedulingError, "got True"),
    ("schedule float", lambda m: m.schedule([("b", 1.0)]), SchedulingError, "got 1.0"),
    ("schedule twice", lambda m: m.schedule([("b", 1), ("b", 1)]), SchedulingError, "more than"),
    ("schedule empty", lambda m: m.schedule([]), SchedulingError, "batch is empty"),
    ("schedule unknown", lambda m: m.schedule([("zz", 1)]), UnknownSequenceError, r"batch\[0\]"),
    ("schedule non-pair", lambda m: m.schedule([("b",)]), TypeError, r"batch\[0\] must be a"),
    ("schedule non-seq", lambda m: m.schedule(5), TypeError, "batch must be a sequence"),
    ("commit nothing", lambda m: m.commit_step(None), StepPendingError, "no pending step"),
]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_error_paths_raise_clearly_and_change_nothing(
    call: Callable[[PageManager], object], error: type[Exception], match: str
) -> None:
    _raises_and_changes_nothing(call, error, match)


def _raises_and_changes_nothing(
    call: Callable[[PageManager], object], error: type[Exception], match: str
) -> None:
    manager, _ = populated()
    before = manager.snapshot()
    with pytest.raises(error, match=match):
        call(manager)
    assert manager.snapshot() == before
    manager.check_invariants()


def test_double_free_is_an_unknown_sequence() -> None:
    manager, _ = populated()
    manager.free("a")
    before = manager.snapshot()
    with pytest.raises(UnknownSequenceError, match="already freed") as info:
        manager.free("a")
    assert isinstance(info.value, KeyError)
    assert manager.snapshot() == before


def test_max_num_seqs_applies_to_add_and_fork() -> None:
    manager, _ = populated()
    manager.add_sequence("c", [1])
    before = manager.snapshot()
    with pytest.raises(CapacityError, match="max_num_seqs=3") as info:
        manager.add_sequence("d", [1])
    assert isinstance(info.value, ValueError)
    with pytest.raises(CapacityError, match="child_id='d': max_num_seqs=3"):
        manager.fork("a", "d")
    assert manager.snapshot() == before


def test_steps_beyond_the_largest_bucket_are_refused() -> None:
    manager = make(max_num_seqs=2, token_buckets=(4, 8))
    manager.add_sequence("a", [1] * 6)
    manager.add_sequence("b", [2] * 6)
    before = manager.snapshot()
    with pytest.raises(CapacityError, match="num_tokens=12 exceeds the largest token bucket 8"):
        manager.schedule([("a", 6), ("b", 6)])
    assert manager.snapshot() == before


# -- the pending step -------------------------------------------------------------------------


def test_pending_step_rules() -> None:
    manager, pool = populated()
    step = manager.schedule([("b", 2)])
    before = manager.snapshot()
    with pytest.raises(StepPendingError, match="schedule"):
        manager.schedule([("a", 0)])
    with pytest.raises(StepPendingError, match="fork.*seq_id='b'"):
        manager.fork("b", "c")
    with pytest.raises(StepPendingError, match="append_tokens.*seq_id='b'"):
        manager.append_tokens("b", [1])
    other = build_step_metadata(
        [StepRow("b", (0,), 0, (1,))],
        [],
        num_pages=8,
        page_size=4,
        max_num_seqs=3,
        max_pages_per_seq=4,
        token_buckets=(8,),
    )
    with pytest.raises(StepPendingError, match="not the pending step"):
        manager.commit_step(other)
    assert manager.snapshot() == before
    # Sequences outside the step may still change.
    manager.append_tokens("a", [9])
    manager.fork("a", "c")
    pool.apply(step)
    manager.commit_step(step)
    assert manager.get_sequence("b").num_computed == 2


def test_sequence_freed_or_replaced_while_pending_is_skipped_at_commit() -> None:
    manager, pool = populated()
    manager.append_tokens("a", [6])
    step = manager.schedule([("a", 1), ("b", 2)])
    manager.free("a")
    manager.free("b")
    manager.add_sequence("b", [6, 7])  # same id, new sequence
    pool.apply(step)
    manager.commit_step(step)
    assert manager.get_sequence("b").num_computed == 0
    manager.check_invariants()
    manager.free("b")
    assert manager.num_free_pages + manager.num_evictable_pages == manager.num_pages


# -- invariants and the builder ---------------------------------------------------------------


def test_check_invariants_detects_a_wrong_refcount() -> None:
    manager, _ = populated()
    page = manager.get_sequence("a").page_ids[0]
    manager._allocator._refcounts[page] += 1
    with pytest.raises(AssertionError, match=f"page {page}: refcount 2 but 1 holder"):
        manager.check_invariants()


def test_no_leak_once_every_sequence_is_freed() -> None:
    manager = make(num_pages=8, page_size=2, max_pages_per_seq=6)
    pool = ShadowPool(8, 2)
    compute_prompt(manager, pool, "a", [1, 2, 3, 4, 5])
    manager.fork("a", "b")
    manager.append_tokens("b", [6])
    run_step(manager, pool, [("b", 1)])
    compute_prompt(manager, pool, "c", [1, 2, 3, 4, 9])
    for seq_id in ("a", "b", "c"):
        manager.free(seq_id)
    manager.check_invariants()
    stats = manager.stats()
    assert stats.num_used_pages == 0 and stats.num_seqs == 0
    assert stats.num_free_pages + stats.num_evictable_pages == 8


BUILD_CONFIG = dict(num_pages=4, page_size=2, max_num_seqs=2, max_pages_per_seq=2)


@pytest.mark.parametrize(
    ("rows", "copy_ops", "error", "match"),
    [
        ([StepRow("a", (4,), 0, (1,))], [], ValueError, "page id 4 outside"),
        ([StepRow("a", (-1,), 0, (1,))], [], ValueError, r"page_ids\[0\] is -1 \(no page\)"),
        ([StepRow("a", (0,), 1, (1, 2))], [], ValueError, "cannot hold 3 tokens"),
        ([StepRow("a", (0, 1, 2), 0, (1,))], [], ValueError, "max_pages_per_seq=2"),
        ([StepRow("a", (0,), 0, ())], [], ValueError, "no new tokens"),
        ([StepRow("a", (0,), 0, (2**31,))], [], ValueError, "new token id"),
        ([], [], ValueError, "rows has 0 entries"),
        ([StepRow("a", (0,), 0, (1,))], [(0, 9)], ValueError, r"copy op \(0, 9\)"),
        ([StepRow("a", (0,), 0, (1,))], [(1, 1)], ValueError, "distinct"),
        ([StepRow("a", (0, 1), 0, (1, 1, 1, 1))], [], CapacityError, "num_tokens=4"),
    ],
)
def test_builder_rejects_what_does_not_fit(
    rows: list[StepRow], copy_ops: list[tuple[int, int]], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        build_step_metadata(rows, copy_ops, token_buckets=(1, 2), **BUILD_CONFIG)


def test_bucket_helpers() -> None:
    assert default_token_buckets(40) == (8, 16, 32, 64)
    assert default_token_buckets(8) == (8,)
    assert default_token_buckets(3, min_bucket=2) == (2, 4)
    assert [select_bucket(n, (8, 16, 32)) for n in (1, 8, 9, 32)] == [8, 8, 16, 32]
    with pytest.raises(CapacityError, match="num_tokens=33"):
        select_bucket(33, (8, 16, 32))
    with pytest.raises(ValueError, match="max_num_tokens"):
        default_token_buckets(0)


def test_pages_package_never_imports_jax() -> None:
    package_dir = pathlib.Path(jaxkv.pages.__file__).parent
    for source in package_dir.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] != "jax", f"{source.name} imports {name}"
                inside = name.startswith("jaxkv.pages") or name == "jaxkv._sizes"  # plain Python
                assert not name.startswith(("jaxkv.", "jaxkv")) or inside, (
                    f"{source.name} imports {name} outside jaxkv.pages"
                )


# -- truncate (rollback) ----------------------------------------------------------------------


def test_truncate_keeps_the_pages_of_the_computed_tokens_left() -> None:
    manager = make()
    pool = ShadowPool(8, 4)
    prompt = list(range(30, 40))  # 10 tokens: pages 0, 1 (cached), 2 (partial)
    compute_prompt(manager, pool, "a", prompt)
    pages = manager.get_sequence("a").page_ids
    manager.truncate("a", 5)
    info = manager.get_sequence("a")
    assert (info.token_ids, info.num_computed, info.page_ids) == (tuple(prompt[:5]), 5, pages[:2])
    assert (info.num_prompt_tokens, info.num_cached_tokens) == (10, 0)
    assert len(manager._seqs["a"].page_hashes) == 1
    assert list(manager._allocator.free_pages())[-1] == pages[2]  # private page: freed
    manager.check_invariants()
    manager.append_tokens("a", [90, 91, 92])
    run_step(manager, pool, [("a", 3)])
    assert pool.read(manager.get_sequence("a").page_ids, 8) == prompt[:5] + [90, 91, 92]
    manager.check_invariants()


def test_truncate_of_uncomputed_tokens_keeps_every_page() -> None:
    manager = make()
    pool = ShadowPool(8, 4)
    compute_prompt(manager, pool, "a", [1, 2, 3, 4, 5])
    manager.append_tokens("a", [6, 7, 8])
    before = manager.get_sequence("a")
    manager.truncate("a", 6)
    after = manager.get_sequence("a")
    assert after.token_ids == (1, 2, 3, 4, 5, 6)
    assert (after.num_computed, after.page_ids) == (5, before.page_ids)
    manager.truncate("a", 6)  # no change
    assert manager.get_sequence("a") == after
    manager.check_invariants()


def test_truncate_to_zero_releases_every_page() -> None:
    manager = make()
    pool = ShadowPool(8, 4)
    compute_prompt(manager, pool, "a", list(range(9)))  # pages 0, 1 cached, page 2 private
    manager.truncate("a", 0)
    info = manager.get_sequence("a")
    assert (info.token_ids, info.num_computed, info.page_ids) == ((), 0, ())
    assert manager.num_used_pages == 0
    assert (manager.num_evictable_pages, manager.num_free_pages) == (2, 6)
    manager.check_invariants()
    with pytest.raises(SchedulingError, match="exceeds its 0 uncomputed"):
        manager.schedule([("a", 1)])
    manager.append_tokens("a", [7, 7])
    run_step(manager, pool, [("a", 2)])
    assert pool.read(manager.get_sequence("a").page_ids, 2) == [7, 7]
    manager.check_invariants()


def test_truncate_inside_a_cached_page_copies_it_on_the_next_write() -> None:
    manager = make()
    pool = ShadowPool(8, 4)
    prompt = list(range(40, 49))  # pages 0, 1 cached, page 2 private
    compute_prompt(manager, pool, "a", prompt)
    cached = manager.get_sequence("a").page_ids[1]
    contents = list(pool.pages[cached])
    assert contents == prompt[4:8] and manager._prefix_cache.is_cached(cached)

    manager.truncate("a", 6)  # now holds positions 4, 5 of the cached page 1
    assert manager.get_sequence("a").page_ids[1] == cached
    assert manager._allocator.refcount(cached) == 1
    manager.check_invariants()
    manager.append_tokens("a", [70, 71])
    assert manager.pages_needed([("a", 2)]) == 1  # the private copy
    step = run_step(manager, pool, [("a", 2)])
    private = manager.get_sequence("a").page_ids[1]
    assert step.num_copies == 1 and private != cached
    np.testing.assert_array_equal(step.copy_ops[0], [cached, private])
    assert pool.pages[cached] == contents  # the cached page never changed
    assert pool.read(manager.get_sequence("a").page_ids, 8) == prompt[:6] + [70, 71]
    # Nobody holds the cached page any more: it is evictable and still serves prefix hits.
    assert manager._allocator.refcount(cached) == 0
    assert manager._prefix_cache.is_evictable(cached)
    manager.check_invariants()
    assert manager.add_sequence("b", prompt) == 8
    assert manager.get_sequence("b").page_ids[1] == cached
    # a's page 1 now holds [44, 45, 70, 71]: a new full page, cached under its own digest.
    assert manager._prefix_cache.is_cached(private)
    manager.check_invariants()


def test_truncated_forks_in_one_step_both_copy_the_cached_page() -> None:
    manager = make()
    pool = ShadowPool(8, 4)
    prompt = list(range(8))
    compute_prompt(manager, pool, "a", prompt + [8])
    manager.truncate("a", 6)
    manager.fork("a", "b")
    cached = manager.get_sequence("a").page_ids[1]
    assert manager._allocator.refcount(cached) == 2
    manager.append_tokens("a", [60])
    manager.append_tokens("b", [61])
    free_before = manager.num_free_pages
    assert manager.pages_needed([("a", 1), ("b", 1)]) == 2
    step = run_step(manager, pool, [("a", 1), ("b", 1)])
    assert step.num_copies == 2
    assert manager.num_free_pages == free_before - 2
    assert pool.pages[cached] == prompt[4:8]
    assert manager._prefix_cache.is_evictable(cached)
    for seq_id, token in (("a", 60), ("b", 61)):
        assert pool.read(manager.get_sequence(seq_id).page_ids, 7) == prompt[:6] + [token]
    manager.check_invariants()


def test_a_copied_cached_page_is_not_reused_within_its_own_step() -> None:
    manager = make(num_pages=3, page_size=2, max_pages_per_seq=3)
    pool = ShadowPool(3, 2)
    compute_prompt(manager, pool, "a", [1, 2, 3, 4, 5])  # pages 0, 1 cached, 2 private
    manager.truncate("a", 3)  # page 2 freed; page 1 cached, held partly
    manager.append_tokens("a", [9, 9, 9])
    # The copy needs 1 page and positions 4, 5 another: 2 > 1 free (the cached page the copy
    # releases only becomes evictable after the step's allocations).
    assert manager.pages_needed([("a", 3)]) == 2
    before = manager.snapshot()
    with pytest.raises(OutOfPagesError, match="needs 2 page.*1 free and 0 evictable"):
        manager.schedule([("a", 3)])
    assert manager.snapshot() == before
    step = run_step(manager, pool, [("a", 1)])
    assert step.num_copies == 1 and manager.num_evictable_pages == 1
    run_step(manager, pool, [("a", 2)])  # evicts the old cached page for positions 4, 5
    assert manager.stats().num_evictions == 1
    assert pool.read(manager.get_sequence("a").page_ids, 6) == [1, 2, 3, 9, 9, 9]
    manager.check_invariants()


def test_truncate_releases_shared_pages_like_free() -> None:
    manager = make(enable_prefix_caching=False)
    pool = ShadowPool(8, 4)
    compute_prompt(manager, pool, "a", list(range(10)))
    manager.fork("a", "b")
    pages = manager.get_sequence("a").page_ids
    manager.truncate("b", 4)
    assert manager.get_sequence("b").page_ids == pages[:1]
    assert [manager._allocator.refcount(p) for p in pages] == [2, 1, 1]
    manager.append_tokens("b", [50])
    assert run_step(manager, pool, [("b", 1)]).num_copies == 0  # a page boundary: a new page
    manager.truncate("a", 6)  # page 1 is a's alone again: written in place
    manager.append_tokens("a", [60])
    assert run_step(manager, pool, [("a", 1)]).num_copies == 0
    assert pool.read(manager.get_sequence("a").page_ids, 7) == [0, 1, 2, 3, 4, 5, 60]
    assert pool.read(manager.get_sequence("b").page_ids, 5) == [0, 1, 2, 3, 50]
    manager.check_invariants()


TRUNCATE_ERROR_CASES: list[tuple[str, Callable[[PageManager], object], type[Exception], str]] = [
    ("unknown", lambda m: m.truncate("zz", 0), UnknownSequenceError, "seq_id='zz' is not a live"),
    ("bool", lambda m: m.truncate("a", True), TypeError, "num_tokens for seq_id='a' must be an"),
    ("float", lambda m: m.truncate("a", 1.0), TypeError, "must be an int, got float 1.0"),
    ("negative", lambda m: m.truncate("a", -1), ValueError, "num_tokens=-1 for seq_id='a' is out"),
    ("too long", lambda m: m.truncate("b", 3), ValueError, "expected 0 <= num_tokens <= 2"),
    ("unhashable", lambda m: m.truncate(["a"], 0), TypeError, "seq_id must be hashable"),
]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [case[1:] for case in TRUNCATE_ERROR_CASES],
    ids=[case[0] for case in TRUNCATE_ERROR_CASES],
)
def test_truncate_errors_raise_clearly_and_change_nothing(
    call: Callable[[PageManager], object], error: type[Exception], match: str
) -> None:
    _raises_and_changes_nothing(call, error, match)


def test_truncate_refuses_a_sequence_in_the_pending_step() -> None:
    manager, pool = populated()
    manager.append_tokens("a", [9])
    step = manager.schedule([("b", 2)])
    assert manager.in_pending_step("b") and not manager.in_pending_step("a")
    before = manager.snapshot()
    with pytest.raises(StepPendingError, match=r"truncate\(\) of seq_id='b'"):
        manager.truncate("b", 1)
    assert manager.snapshot() == before
    manager.truncate("a", 5)  # outside the step: allowed
    pool.apply(step)
    manager.commit_step(step)
    manager.truncate("b", 1)
    assert manager.get_sequence("b").num_computed == 1
    with pytest.raises(UnknownSequenceError, match="seq_id='zz'"):
        manager.in_pending_step("zz")
    manager.check_invariants()


def test_check_invariants_detects_a_pending_write_into_a_cached_page() -> None:
    manager = make()
    pool = ShadowPool(8, 4)
    compute_prompt(manager, pool, "a", list(range(9)))
    manager.truncate("a", 6)
    manager.append_tokens("a", [1])
    manager.schedule([("a", 1)])
    manager.check_invariants()
    seq = manager._seqs["a"]
    private = seq.pages[1]
    seq.pages[1] = next(manager._prefix_cache.evictable_pages())  # undo the copy by hand
    manager._prefix_cache.unpark(seq.pages[1])
    manager._allocator.incref(seq.pages[1])
    manager._allocator.decref(private)
    manager._allocator.release(private)
    with pytest.raises(AssertionError, match="pending step writes page 1 .* cached or shared"):
        manager.check_invariants()


def test_check_invariants_detects_a_stale_page_digest() -> None:
    manager = make()
    pool = ShadowPool(8, 4)
    compute_prompt(manager, pool, "a", list(range(9)))
    manager._seqs["a"].tokens[5] = 99  # a computed token changed behind the manager's back
    with pytest.raises(AssertionError, match="page 1: its digest does not match its tokens"):
        manager.check_invariants()


def test_abandon_step_frees_the_sequences_of_a_step_the_device_could_not_run():
    manager = PageManager(num_pages=8, page_size=4, max_num_seqs=3, max_pages_per_seq=4)
    manager.add_sequence("done", list(range(6)))
    manager.commit_step(manager.schedule([("done", 6)]))
    manager.add_sequence("other", [1, 2, 3])
    manager.add_sequence("failed", list(range(10, 16)))
    step = manager.schedule([("failed", 6)])
    with pytest.raises(StepPendingError, match="not the pending step"):
        manager.abandon_step(None)
    assert manager.abandon_step(step) == ["failed"]
    assert manager.pending_step is None and "failed" not in manager
    manager.check_invariants()
    # The cached pages of the committed sequence are intact and still hit.
    manager.free("done")
    assert manager.add_sequence("again", list(range(6)) + [9]) == 4
    manager.commit_step(manager.schedule([("other", 3), ("again", 3)]))
    manager.check_invariants()


# -- windowed mode (sliding-window layers: pages before the window go back to the pool) ---------


def windowed(**overrides: object) -> PageManager:
    config: dict[str, object] = dict(
        num_pages=6,
        page_size=4,
        max_num_seqs=2,
        max_pages_per_seq=16,
        enable_prefix_caching=False,
        sliding_window=8,
        window_margin=2,
    )
    config.update(overrides)
    return PageManager(**config)  # type: ignore[arg-type]


def test_windowed_mode_releases_the_pages_before_the_window_after_each_commit() -> None:
    manager = windowed()
    manager.add_sequence("a", list(range(40)))
    done = 0
    for count in (5, 7, 3, 3, 6):
        step = manager.schedule([("a", count)])
        manager.commit_step(step)
        done += count
        manager.check_invariants()
        table = manager.get_sequence("a").page_ids
        released = max(done - 8 - 2, 0) // 4
        assert table[:released] == (jaxkv.pages.NO_PAGE,) * released
        assert -1 not in table[released:] and len(table) == -(-done // 4)
        assert manager.num_free_pages == 6 - (len(table) - released)
    # 24 computed: pages 0..2 (positions 0..11) released, 12 + W = 20 is the shortest length.
    assert manager.min_truncate_length("a") == 20
    # The step's page table keeps the logical indexing: -1 where the pages went back.
    step = manager.schedule([("a", 1)])
    assert step.page_tables[0, :3].tolist() == [-1, -1, -1]
    assert step.slot_mapping[0] // 4 == step.page_tables[0, 6]
    manager.commit_step(step)


def test_windowed_pool_is_smaller_than_one_sequence_and_serves_a_long_one() -> None:
    manager = windowed(num_pages=5, max_num_seqs=1)  # 5 pages, 64-token tables
    manager.add_sequence("a", list(range(64)))
    for _ in range(16):
        manager.commit_step(manager.schedule([("a", 4)]))
        held = [page for page in manager.get_sequence("a").page_ids if page != -1]
        assert len(held) <= -(-(8 + 2 + 4) // 4) + 1
    assert manager.get_sequence("a").num_computed == 64
    manager.free("a")
    manager.check_invariants()
    assert manager.num_free_pages == 5


def test_windowed_truncate_below_the_margin_is_refused_and_changes_nothing() -> None:
    manager = windowed()
    manager.add_sequence("a", list(range(30)))
    manager.commit_step(manager.schedule([("a", 24)]))
    floor = manager.min_truncate_length("a")
    assert floor == 20 and floor <= 24 - 2  # the margin can always be rolled back
    before = manager.snapshot()
    with pytest.raises(ValueError, match=r"num_tokens=19 .* expected num_tokens >= 20"):
        manager.truncate("a", floor - 1)
    assert manager.snapshot() == before
    manager.truncate("a", floor)
    manager.check_invariants()
    info = manager.get_sequence("a")
    assert info.num_computed == 20 and len(info.page_ids) == 5
    # The next step writes the positions back, in the page still held.
    manager.append_tokens("a", [99])
    manager.commit_step(manager.schedule([("a", 1)]))
    manager.check_invariants()


def test_windowed_fork_shares_held_pages_and_free_releases_everything() -> None:
    manager = windowed(num_pages=8)
    manager.add_sequence("a", list(range(30)))
    manager.commit_step(manager.schedule([("a", 22)]))
    manager.fork("a", "b")
    manager.check_invariants()
    table = manager.get_sequence("b").page_ids
    assert table == manager.get_sequence("a").page_ids and table[0] == -1
    held = [page for page in table if page != -1]
    assert manager.stats().num_used_pages == len(held)
    manager.commit_step(manager.schedule([("a", 1), ("b", 1)]))  # both copy the partial page
    manager.check_invariants()
    manager.free("a")
    manager.free("b")
    manager.check_invariants()
    assert manager.num_free_pages == 8


def test_windowed_pool_too_small_for_one_step_raises_at_schedule() -> None:
    manager = windowed(num_pages=3, max_num_seqs=1)
    manager.add_sequence("a", list(range(20)))
    before = manager.snapshot()
    with pytest.raises(OutOfPagesError, match="needs 4 page"):
        manager.schedule([("a", 16)])
    assert manager.snapshot() == before


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        (dict(enable_prefix_caching=True), ValueError, "enable_prefix_caching=True cannot serve"),
        (dict(sliding_window=0), ValueError, "sliding_window must be an int >= 1"),
        (dict(window_margin=-1), ValueError, "window_margin=-1"),
        (dict(window_margin=1.5), TypeError, "window_margin must be an int"),
        (dict(sliding_window=None, window_margin=2), ValueError, "must be 0 without"),
        (dict(sliding_window=None, window_margin=0), ValueError, "max_pages_per_seq=16 exceeds"),
    ],
)
def test_windowed_constructor_validates(overrides: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        windowed(**overrides)


def test_check_invariants_detects_a_window_page_released_too_early() -> None:
    manager = windowed()
    manager.add_sequence("a", list(range(30)))
    manager.commit_step(manager.schedule([("a", 12)]))
    # Pages 0 and 1 (positions 0..7): 4..7 are still in the window of position 12.
    manager._seqs["a"].pages[:2] = [jaxkv.pages.NO_PAGE] * 2
    with pytest.raises(AssertionError, match="released page"):
        manager.check_invariants()


def test_builder_accepts_released_entries_only_where_a_row_reads() -> None:
    geometry = dict(num_pages=4, page_size=2, max_num_seqs=1, max_pages_per_seq=4)
    step = build_step_metadata(
        [StepRow("a", (-1, 2, 3), 5, (7,))], [], token_buckets=(4,), **geometry
    )
    assert step.page_tables[0].tolist() == [-1, 2, 3, -1]
    assert step.slot_mapping[0] == 3 * 2 + 1
    with pytest.raises(ValueError, match=r"page_ids\[1\] is -1 \(no page\)"):
        build_step_metadata([StepRow("a", (0, -1), 2, (7,))], [], token_buckets=(4,), **geometry)
