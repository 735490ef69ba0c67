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


def round_up_bucket(n: int, minimum: int = 1, steps_per_octave: int = 4) -> int:
    """The smallest shape bucket ``>= n`` and ``>= minimum`` among ``minimum * 2**k * (1 +
    i / steps_per_octave)``: like ``next_power_of_two`` but with ``steps_per_octave`` buckets in
    each doubling, so a size is padded by at most ``1 / steps_per_octave`` (2,081 tokens get
    2,560 slots rather than 4,096) while the number of distinct shapes stays logarithmic."""
    base = next_power_of_two(n, minimum)
    if base == max(1, minimum) or base < 2 * steps_per_octave:
        return base
    half = base // 2
    step = half // steps_per_octave
    return half + ceil_div(n - half, step) * step
