"""Boundary checks shared by every cache family: each error names the field, the value and the
allowed range, so a user sees at once what to fix."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Storage dtypes a cache accepts for keys and values.
FLOAT_DTYPES = tuple(np.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))


MAX_SIZE = 2**31 - 1
"""Largest size a cache dimension may have: sizes, positions and ids travel as int32."""


def require_int(
    owner: str, name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """``value`` as an int, or ``ValueError``/``TypeError`` naming ``owner.name``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{owner}: {name} must be <= {maximum}, got {value}")
    return int(value)


def require_size(owner: str, name: str, value: Any) -> int:
    """A cache dimension: an int in ``[1, MAX_SIZE]``."""
    return require_int(owner, name, value, minimum=1, maximum=MAX_SIZE)


def require_optional_int(
    owner: str, name: str, value: Any, *, minimum: int, maximum: int | None = None
) -> int | None:
    if value is None:
        return None
    return require_int(owner, name, value, minimum=minimum, maximum=maximum)


def require_float_dtype(owner: str, name: str, value: Any) -> np.dtype:
    """Normalise ``value`` (a dtype, type or name) to a NumPy dtype among ``FLOAT_DTYPES``."""
    try:
        dtype = np.dtype(value)
    except TypeError:
        raise TypeError(f"{owner}: {name} must be a dtype, got {value!r}") from None
    if dtype not in FLOAT_DTYPES:
        allowed = ", ".join(d.name for d in FLOAT_DTYPES)
        raise ValueError(f"{owner}: {name} must be one of {allowed}, got {dtype.name}")
    return dtype


def require_choice(owner: str, name: str, value: Any, choices: tuple[Any, ...]) -> Any:
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {choices}, got {value!r}")
    return value


def check_array(
    owner: str,
    name: str,
    array: Any,
    shape: tuple[int | None, ...],
    dtype: np.dtype | None = None,
) -> None:
    """Raise ``ValueError`` unless ``array`` has ``shape`` (``None`` = any size) and ``dtype``."""
    if not hasattr(array, "shape") or not hasattr(array, "dtype"):
        raise TypeError(f"{owner}: {name} must be an array, got {type(array).__name__}")
    actual = tuple(array.shape)
    if len(actual) != len(shape) or any(
        want is not None and want != got for want, got in zip(shape, actual, strict=False)
    ):
        pretty = (
            "("
            + ", ".join("*" if s is None else str(s) for s in shape)
            + ("," if len(shape) == 1 else "")
            + ")"
        )
        raise ValueError(f"{owner}: {name} must have shape {pretty}, got {actual}")
    if dtype is not None and np.dtype(array.dtype) != np.dtype(dtype):
        raise ValueError(
            f"{owner}: {name} must have dtype {np.dtype(dtype).name}, "
            f"got {np.dtype(array.dtype).name}"
        )


def require_layers(owner: str, layers: Any, num_layers: int) -> range | set[int]:
    """The layer ids a cache builds views for: every layer when ``layers`` is ``None``, else
    the given ids, each an int in ``[0, num_layers)``."""
    wanted = range(num_layers) if layers is None else set(layers)
    for layer in wanted:
        require_int(owner, "layers[i]", layer, minimum=0)
        if layer >= num_layers:
            raise ValueError(f"{owner}: layer {layer} out of range for num_layers={num_layers}")
    return wanted


def is_traced(*arrays: Any) -> bool:
    """Whether any of ``arrays`` is a tracer (we are inside jit/vmap and cannot read values)."""
    return any(isinstance(a, jax.core.Tracer) for a in arrays)
