"""Integer argument checks shared by the page bookkeeping (plain Python and NumPy).

Everything the host hands the device travels as int32, so sizes, page ids and token ids are
checked against `MAX_INT32` on the host. Bools are never ints here (`True` is not a page id), NumPy
integer scalars always are.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAX_INT32 = 2**31 - 1
"""The largest value an int32 device array holds."""


def is_int(value: object) -> bool:
    """Whether `value` is a Python or NumPy integer and not a bool."""
    return not isinstance(value, bool | np.bool_) and isinstance(value, int | np.integer)


def positive_int(argument: str, value: object, *, maximum: int = MAX_INT32) -> int:
    """`value` as a Python int in `[1, maximum]`.

    Raises:
        ValueError: `value` is not an int (a bool, a float, ...) or lies outside `[1, maximum]`.
    """
    if not is_int(value) or value < 1:
        raise ValueError(f"{argument} must be an int >= 1, got {value!r}")
    if value > maximum:
        raise ValueError(f"{argument}={value} is too large; expected at most {maximum}")
    return int(value)


def first_non_int(values: Sequence[object]) -> int | None:
    """The index of the first entry of `values` that is not an int (see `is_int`), or None.

    The common all-int case costs one C-level pass (`set(map(type, values))`); only a failing
    call walks the entries in Python to name the culprit.
    """
    if all(
        issubclass(kind, int | np.integer) and not issubclass(kind, bool)
        for kind in set(map(type, values))
    ):
        return None
    return next(index for index, value in enumerate(values) if not is_int(value))
