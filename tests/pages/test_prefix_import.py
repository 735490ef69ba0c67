"""Prefixes kept outside the pool: `PageManager.import_prefix` registers pages whose contents a
callback writes, `cached_prefix` and `prefix_hashes` read the prefix cache, and `take_evictions`
reports evicted cached pages (what a disk tier copies before the pages are overwritten)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxkv.pages import PageManager, StepPendingError

SIZE = 4


def manager(num_pages: int = 8, **options) -> PageManager:
    return PageManager(num_pages, SIZE, 4, num_pages, hash_key=b"k" * 32, **options)


def run_prompt(pages: PageManager, seq_id: str, tokens: list[int], salt=None) -> int:
    """Add, prefill and free one sequence; its prefix-cache hit tokens."""
    hit = pages.add_sequence(seq_id, tokens, cache_salt=salt)
    pages.commit_step(pages.schedule([(seq_id, len(tokens) - hit)]))
    pages.free(seq_id)
    return hit


def test_import_registers_pages_that_a_later_prompt_hits():
    pages = manager()
    prompt = list(range(1, 12))  # 2 full pages and a partial one
    calls = []
    cached = pages.import_prefix(prompt, lambda index, ids: calls.append((index, ids)))
    assert cached == 8 and [index for index, _ in calls] == [[0, 1]]
    written = calls[0][1]
    pages.check_invariants()
    assert pages.num_evictable_pages == 2 and pages.cached_prefix(prompt) == tuple(written)
    assert pages.add_sequence("a", prompt + [99]) == 8
    assert pages.get_sequence("a").page_ids == tuple(written)
    pages.check_invariants()


def test_import_keeps_cached_pages_and_writes_only_the_missing_ones():
    pages = manager()
    prompt = list(range(1, 14))
    run_prompt(pages, "a", prompt[:5])  # page 0 cached
    first = pages.cached_prefix(prompt)
    assert len(first) == 1
    calls = []
    assert pages.import_prefix(prompt, lambda index, ids: calls.append(index)) == 12
    assert calls == [[1, 2]] and pages.cached_prefix(prompt)[0] == first[0]
    assert pages.import_prefix(prompt, lambda index, ids: calls.append(index)) == 12
    assert len(calls) == 1  # everything was cached: write is not called
    pages.check_invariants()


def test_a_failing_write_frees_the_taken_pages():
    pages = manager()
    before = pages.snapshot()

    def fail(index, ids):
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        pages.import_prefix(list(range(20)), fail)
    pages.check_invariants()
    assert pages.snapshot()["lru"] == before["lru"] and pages.num_free_pages == 8
    assert pages.cached_prefix(list(range(20))) == ()


def test_import_stops_when_no_page_is_available_and_refuses_a_pending_step():
    pages = manager(num_pages=4)
    pages.add_sequence("held", list(range(100, 108)))
    step = pages.schedule([("held", 8)])  # 2 pages held by a running sequence
    with pytest.raises(StepPendingError):
        pages.import_prefix(list(range(16)), lambda index, ids: None)
    pages.commit_step(step)
    assert pages.import_prefix(list(range(16)), lambda index, ids: None) == 8
    pages.check_invariants()


def test_salts_and_keys_name_different_pages():
    pages = manager()
    prompt = list(range(9))
    pages.import_prefix(prompt, lambda index, ids: None, cache_salt="tenant-a")
    assert pages.cached_prefix(prompt, cache_salt="tenant-a") != ()
    assert pages.cached_prefix(prompt) == () and pages.cached_prefix(prompt, cache_salt="b") == ()
    assert pages.add_sequence("b", prompt, cache_salt="tenant-b") == 0
    same_key = manager()
    assert same_key.prefix_hashes(prompt) == pages.prefix_hashes(prompt)
    other_key = PageManager(8, SIZE, 4, 8, hash_key=b"x" * 32)
    assert other_key.prefix_hashes(prompt) != pages.prefix_hashes(prompt)
    assert len(pages.prefix_hashes(prompt)) == 2
    assert pages.prefix_hashes(prompt, cache_salt="a") != pages.prefix_hashes(prompt)


def test_evictions_are_recorded_with_their_contents_until_taken():
    pages = manager(num_pages=4, record_evictions=True)
    run_prompt(pages, "a", list(range(1, 10)))  # 2 cached pages, 1 freed
    hashes = pages.prefix_hashes(list(range(1, 10)))
    assert pages.take_evictions() == []
    run_prompt(pages, "b", list(range(50, 66)))  # needs all 4 pages: evicts both
    evicted = pages.take_evictions()
    # The tail page is released first, so it is evicted first.
    assert [entry.page_hash for entry in evicted] == hashes[::-1]
    assert evicted[1].token_ids == (1, 2, 3, 4) and evicted[1].salt == b""
    assert pages.take_evictions() == []
    assert manager().take_evictions() == []
    with pytest.raises(TypeError, match="record_evictions"):
        manager(record_evictions=1)


def test_cached_pages_lists_every_cached_page():
    pages = manager()
    run_prompt(pages, "a", list(range(1, 10)))
    cached = pages.cached_pages()
    assert [entry.page_hash for entry in cached] == pages.prefix_hashes(list(range(1, 10)))
    assert cached[0].parent_hash == bytes(32) and cached[1].parent_hash == cached[0].page_hash


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["import", "run", "fail"]),
            st.integers(0, 3),  # which prompt
            st.integers(1, 14),  # its length
            st.sampled_from([None, "s"]),
        ),
        max_size=12,
    )
)
def test_imports_between_runs_keep_the_invariants(operations):
    """Imports, failed imports and whole prompts in any order: the manager's invariants hold,
    and a prompt hits exactly the run of its pages that is cached."""
    pages = manager(num_pages=6, record_evictions=True)
    prompts = [list(range(base, base + 14)) for base in (1, 3, 100, 200)]

    def fail(index, ids):
        raise RuntimeError("write failed")

    for step, (kind, which, length, salt) in enumerate(operations):
        prompt = prompts[which][:length]
        if kind == "import":
            cached = pages.import_prefix(prompt, lambda index, ids: None, cache_salt=salt)
            assert cached == len(pages.cached_prefix(prompt, cache_salt=salt)) * SIZE
        elif kind == "fail":
            try:
                pages.import_prefix(prompt, fail, cache_salt=salt)
            except RuntimeError:
                pass
        else:
            expected = len(
                pages.cached_prefix(prompt[: (length - 1) // SIZE * SIZE], cache_salt=salt)
            )
            assert run_prompt(pages, f"s{step}", prompt, salt) == expected * SIZE
        pages.check_invariants()
        evicted = pages.take_evictions()
        assert all(len(entry.token_ids) == SIZE for entry in evicted)
        assert len(evicted) <= pages.stats().num_evictions
