"""The page allocator: a FIFO free queue and a reference count per page.

A page is in exactly one of three states:

- free: in the free queue, refcount 0, holds nothing anyone will read;
- in use: refcount > 0, held by that many sequences;
- parked: refcount 0 but NOT in the free queue. The allocator does not own parked pages; the prefix
  cache keeps them (unreferenced cached pages, reusable until evicted) and hands them back with
  `incref` when a sequence reuses them or when they are evicted for new data.

Invariants (checked by `check`):

- every page in the free queue has refcount 0;
- the free queue holds no page twice;
- refcounts are never negative.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from jaxkv.pages._ints import is_int, positive_int
from jaxkv.pages.errors import OutOfPagesError


def _check_page_id(argument: str, page: object, num_pages: int) -> int:
    """`page` as a Python int page id (NumPy integers are accepted, bools are not)."""
    if not is_int(page):
        raise TypeError(f"{argument} must be an int page id, got {page!r}")
    if not 0 <= page < num_pages:
        raise ValueError(
            f"{argument}={page} is out of range; expected 0 <= {argument} < {num_pages}"
        )
    return int(page)


class PageAllocator:
    """Free queue and reference counts for `num_pages` pages with ids `0 .. num_pages - 1`.

    The free queue is first-in first-out: `allocate` takes the page that has been free longest, so
    a just-released page is reused last (which keeps stale data around longest for debugging and
    spreads writes over the pool). Page arguments may be Python or NumPy ints, never bools.

    Args:
        num_pages: an int in `[1, 2**31 - 1]` (page ids travel to the device as int32).

    Raises:
        ValueError: `num_pages` is not such an int.
    """

    def __init__(self, num_pages: int) -> None:
        num_pages = positive_int("num_pages", num_pages)
        self._num_pages = num_pages
        # refcounts[page]: number of sequences holding the page.
        self._refcounts: list[int] = [0] * num_pages
        # Free queue, oldest first. An OrderedDict gives O(1) pop-front, push-back and membership.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_pages))

    @property
    def num_pages(self) -> int:
        """Total pages in the pool."""
        return self._num_pages

    @property
    def num_free(self) -> int:
        """Pages in the free queue."""
        return len(self._free)

    def free_pages(self) -> Iterator[int]:
        """The free queue, oldest first."""
        return iter(self._free)

    def refcount(self, page: int) -> int:
        """Number of sequences holding `page`."""
        return self._refcounts[_check_page_id("page", page, self._num_pages)]

    def refcounts(self) -> list[int]:
        """A copy of every page's refcount, indexed by page id."""
        return list(self._refcounts)

    def is_free(self, page: int) -> bool:
        """Whether `page` is in the free queue."""
        return _check_page_id("page", page, self._num_pages) in self._free

    def allocate(self) -> int:
        """Take the oldest free page and give it refcount 1.

        Raises:
            OutOfPagesError: the free queue is empty.
        """
        if not self._free:
            raise OutOfPagesError(needed=1, free=0, evictable=0, what="allocate()")
        page, _ = self._free.popitem(last=False)
        self._refcounts[page] = 1
        return page

    def incref(self, page: int) -> int:
        """Add one holder to a page that is in use or parked; return the new refcount."""
        page = _check_page_id("page", page, self._num_pages)
        if page in self._free:
            raise ValueError(f"page={page} is in the free queue; allocate() it instead of incref()")
        self._refcounts[page] += 1
        return self._refcounts[page]

    def decref(self, page: int) -> int:
        """Drop one holder; return the new refcount. A page reaching 0 is parked, not freed:
        the caller decides between `release` (free queue) and the prefix cache."""
        page = _check_page_id("page", page, self._num_pages)
        if self._refcounts[page] == 0:
            raise ValueError(f"page={page} has refcount 0; it cannot be released again")
        self._refcounts[page] -= 1
        return self._refcounts[page]

    def release(self, page: int) -> None:
        """Put a parked page (refcount 0, not free) at the back of the free queue."""
        page = _check_page_id("page", page, self._num_pages)
        if self._refcounts[page] != 0:
            raise ValueError(
                f"page={page} has refcount {self._refcounts[page]}; only refcount-0 pages "
                "can be freed"
            )
        if page in self._free:
            raise ValueError(f"page={page} is already in the free queue (double free)")
        self._free[page] = None

    def check(self) -> None:
        """Raise AssertionError if an allocator invariant is broken."""
        for page, count in enumerate(self._refcounts):
            if count < 0:
                raise AssertionError(f"page {page} has negative refcount {count}")
        for page in self._free:
            if self._refcounts[page] != 0:
                raise AssertionError(
                    f"page {page} is in the free queue with refcount {self._refcounts[page]}"
                )
