"""Tests of the free queue and reference counts."""

from __future__ import annotations

import pytest

from jaxkv.pages import OutOfPagesError, PageAllocator


def state(allocator: PageAllocator) -> tuple:
    return tuple(allocator.free_pages()), tuple(allocator.refcounts())


def test_fresh_allocator_is_all_free_in_id_order() -> None:
    allocator = PageAllocator(4)
    assert allocator.num_pages == 4
    assert allocator.num_free == 4
    assert list(allocator.free_pages()) == [0, 1, 2, 3]
    assert allocator.refcounts() == [0, 0, 0, 0]
    allocator.check()


def test_allocate_is_fifo_and_released_pages_go_to_the_back() -> None:
    allocator = PageAllocator(3)
    assert [allocator.allocate() for _ in range(2)] == [0, 1]
    assert allocator.refcount(0) == 1 and allocator.refcount(1) == 1
    assert allocator.decref(0) == 0
    allocator.release(0)
    assert list(allocator.free_pages()) == [2, 0]
    assert allocator.allocate() == 2
    assert allocator.allocate() == 0
    assert allocator.num_free == 0
    allocator.check()


def test_incref_decref_count_holders() -> None:
    allocator = PageAllocator(2)
    page = allocator.allocate()
    assert allocator.incref(page) == 2
    assert allocator.incref(page) == 3
    assert allocator.decref(page) == 2
    assert allocator.decref(page) == 1
    assert allocator.decref(page) == 0
    assert not allocator.is_free(page)  # parked until released
    allocator.release(page)
    assert allocator.is_free(page)


def test_parked_page_can_be_increfed() -> None:
    allocator = PageAllocator(2)
    page = allocator.allocate()
    allocator.decref(page)
    assert allocator.incref(page) == 1
    allocator.check()


def test_allocate_when_empty_raises_and_changes_nothing() -> None:
    allocator = PageAllocator(1)
    allocator.allocate()
    before = state(allocator)
    with pytest.raises(OutOfPagesError, match="needs 1 page"):
        allocator.allocate()
    assert state(allocator) == before


@pytest.mark.parametrize("num_pages", [0, -1, 1.5, True, "4"])
def test_bad_num_pages(num_pages: object) -> None:
    with pytest.raises(ValueError, match="num_pages"):
        PageAllocator(num_pages)  # type: ignore[arg-type]


def test_error_paths_leave_state_unchanged() -> None:
    allocator = PageAllocator(3)
    used = allocator.allocate()
    before = state(allocator)
    with pytest.raises(ValueError, match="free queue"):
        allocator.incref(1)  # page 1 is free
    with pytest.raises(ValueError, match="double free"):
        allocator.release(2)
    with pytest.raises(ValueError, match="refcount 1"):
        allocator.release(used)
    with pytest.raises(ValueError, match="refcount 0"):
        allocator.decref(1)
    with pytest.raises(ValueError, match="page=3 is out of range"):
        allocator.refcount(3)
    with pytest.raises(ValueError, match="page=-1 is out of range"):
        allocator.decref(-1)
    with pytest.raises(TypeError, match="page must be an int"):
        allocator.incref(1.0)  # type: ignore[arg-type]
    assert state(allocator) == before


def test_check_detects_a_free_page_in_use() -> None:
    allocator = PageAllocator(2)
    allocator._refcounts[0] = 1  # corrupt: page 0 is still in the free queue
    with pytest.raises(AssertionError, match="page 0 is in the free queue with refcount 1"):
        allocator.check()
