"""JAX's persistent compilation cache, on by default in a per-user directory.

Compiling a model's step takes seconds per step shape; with the cache on, a second run of the
same model and shapes loads the compiled executables from disk instead. ``Engine`` (and so
``generate``, ``ChatSession`` and every ``jaxkv`` command) calls ``enable_compilation_cache()``
when it is built.

Where the cache lives is read from the ``JAXKV_COMPILATION_CACHE`` environment variable:

* unset or empty: ``$XDG_CACHE_HOME/jaxkv/xla`` (``~/.cache/jaxkv/xla`` without XDG);
* ``off`` (or ``0``, ``false``, ``no``, ``none``): no persistent cache;
* anything else: that directory.

A directory set by the user through JAX itself (``jax_compilation_cache_dir``) wins over all of
these: jaxkv then leaves JAX's settings alone. Two processes may share a directory: the cache
is bounded (least recently used entries go first), and a bounded JAX cache takes a file lock
around every read and write, so no process reads another's half-written entry.
"""

from __future__ import annotations

import os
import pathlib

import jax

ENVIRONMENT_VARIABLE = "JAXKV_COMPILATION_CACHE"
DEFAULT_MAX_BYTES = 4 * 2**30
"""The default bound of the cache directory: a few hundred step executables."""

_OFF = frozenset({"off", "0", "false", "no", "none"})
_state: dict[str, pathlib.Path | None] = {}


def cache_directory(setting: str | None = None) -> pathlib.Path | None:
    """Where the cache goes for ``setting`` (default: the environment variable), or None when
    it is turned off.

    Raises:
        TypeError: ``setting`` is not a str or None.
    """
    if setting is not None and not isinstance(setting, str):
        raise TypeError(
            f"cache_directory: setting must be a str or None, got {type(setting).__name__}"
        )
    value = os.environ.get(ENVIRONMENT_VARIABLE, "") if setting is None else setting
    value = value.strip()
    if value.lower() in _OFF:
        return None
    if value:
        return pathlib.Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "jaxkv" / "xla"


def enable_compilation_cache(
    setting: str | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> pathlib.Path | None:
    """Turn JAX's persistent compilation cache on. JAX opens its cache once per process, so
    the first call decides; later calls return what it chose.

    Args:
        setting: a directory, ``"off"``, or None to read ``JAXKV_COMPILATION_CACHE`` (see the
            module's docstring).
        max_bytes: the bound of the directory; least recently used entries are evicted.

    Returns:
        The directory in use, or None when the cache is off (or could not be created: a
        read-only home directory only costs compile time).

    Raises:
        TypeError / ValueError: ``setting`` is not a str or None, ``max_bytes`` is not a
            positive int.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(
            f"enable_compilation_cache: max_bytes must be a positive int, got {max_bytes!r}"
        )
    if "directory" in _state:  # JAX opens its cache once per process: the first call decides
        return _state["directory"]
    chosen = jax.config.jax_compilation_cache_dir
    if chosen:  # the user's own JAX setting
        _state["directory"] = pathlib.Path(chosen)
        return _state["directory"]
    directory = cache_directory(setting)
    if directory is None:
        _state["directory"] = None
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        _state["directory"] = None
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_compilation_cache_max_size", max_bytes)
    # Every step of a model is worth keeping, and the small row operations too.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_enable_compilation_cache", True)
    _state["directory"] = directory
    return directory
