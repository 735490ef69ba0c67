"""Exceptions raised by the host-side page bookkeeping.

Every exception derives from `PagesError`, so a caller can catch the whole family, and also from
the built-in it specialises (`ValueError`, `KeyError`, `RuntimeError`), so generic handlers keep
working.
A call that raises any of them leaves the `PageManager` exactly as it was before the call.
"""

from __future__ import annotations


class PagesError(Exception):
    """Base class of every error raised by `jaxkv.pages`."""


class OutOfPagesError(PagesError, RuntimeError):
    """Not enough pages, even after evicting every unreferenced cached page.

    Attributes:
        needed: pages the refused call would have allocated.
        free: pages in the free queue at the time of the call.
        evictable: unreferenced cached pages that could have been evicted.
    """

    def __init__(self, needed: int, free: int, evictable: int, what: str = "this call") -> None:
        self.needed = needed
        self.free = free
        self.evictable = evictable
        self.what = what
        super().__init__(
            f"out of pages: {what} needs {needed} page(s) but only {free} free and "
            f"{evictable} evictable cached page(s) are available ({free + evictable} in all)"
        )

    def __reduce__(self) -> tuple:
        return (type(self), (self.needed, self.free, self.evictable, self.what))


class UnknownSequenceError(PagesError, KeyError):
    """A sequence id that the manager does not hold (never added, or already freed)."""

    def __init__(self, argument: str, seq_id: object) -> None:
        self.argument = argument
        self.seq_id = seq_id
        self.message = (
            f"{argument}={seq_id!r} is not a live sequence (never added, or already freed)"
        )
        super().__init__(self.message)

    def __reduce__(self) -> tuple:
        return (type(self), (self.argument, self.seq_id))

    def __str__(self) -> str:
        # KeyError quotes its argument with repr(); keep the message readable.
        return self.message


class DuplicateSequenceError(PagesError, ValueError):
    """A sequence id that is already live."""


class CapacityError(PagesError, ValueError):
    """A request beyond a configured limit: max_num_seqs, max_pages_per_seq, the token buckets."""


class SchedulingError(PagesError, ValueError):
    """A step that cannot be scheduled as asked (too many tokens, a sequence listed twice, ...)."""


class StepPendingError(PagesError, RuntimeError):
    """A call that conflicts with the scheduled step that has not been committed yet."""
