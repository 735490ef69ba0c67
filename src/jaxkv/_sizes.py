"""Integer size helpers shared by the device caches, the host page manager and the engine
(plain Python: ``jaxkv.pages`` uses them without JAX)."""

from __future__ import annotations


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, ``b >= 1`` (e.g. the pages ``a`` tokens need)."""
    return -(-a // b)


def next_power_of_two(n: int, minimum: int = 1) -> int:
    """The smallest power of two that is ``>= n`` and ``>= minimum`` (a shape bucket)."""
    size = max(1, minimum)
    while size < n:
        size *= 2
    return size
