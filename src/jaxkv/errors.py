"""Exceptions jaxkv raises beyond ``ValueError``/``TypeError`` for bad arguments."""

from __future__ import annotations


class CacheOverflowError(OverflowError):
    """A write would go past a cache's capacity; nothing was written and nothing was lost."""


class UnsupportedOperationError(NotImplementedError):
    """A row operation that a cache family cannot do; the message names the family, the
    operation and why.

    Attributes:
        family: the cache family (``"sliding-window ring"``, ``"Mamba"``, ...).
        operation: the operation's name (``"truncate"``, ...).
        reason: why the family cannot do it (and what to do instead, when there is a way).
    """

    def __init__(self, family: str, operation: str, reason: str) -> None:
        self.family = family
        self.operation = operation
        self.reason = reason
        super().__init__(f"{operation} is not supported by the {family} cache: {reason}")

    def __reduce__(self) -> tuple:
        return (type(self), (self.family, self.operation, self.reason))


class CacheFileError(ValueError):
    """A cache file on disk cannot be loaded (``jaxkv.io.load_cache``); nothing was changed.

    Attributes:
        path: the file, as given.
    """

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(message)

    def __reduce__(self) -> tuple:
        return (type(self), (self.path, self.args[0]))


class CacheFileCorruptedError(CacheFileError):
    """A cache file is truncated, damaged or not a jaxkv cache file at all: its safetensors
    structure, its header checksum or a tensor's checksum does not hold."""


class CacheFileVersionError(CacheFileError):
    """A cache file was written with a newer cache layout version than this jaxkv reads.

    Attributes:
        version: the file's layout version.
        supported: the newest layout version this jaxkv reads.
    """

    def __init__(self, path: str, version: int, supported: int) -> None:
        self.version = version
        self.supported = supported
        super().__init__(
            path,
            f"{path}: cache layout version {version} is newer than this jaxkv reads (at most "
            f"{supported}); upgrade jaxkv or save the cache again",
        )

    def __reduce__(self) -> tuple:
        return (type(self), (self.path, self.version, self.supported))


class FingerprintMismatchError(CacheFileError):
    """A cache file was saved for another model, tokenizer, chat template, cache layout, dtype,
    codec, page size or token sequence than the one expected: reusing it would be wrong.

    Attributes:
        differences: ``{field: (value in the file, expected value)}`` for every field that
            differs.
    """

    def __init__(self, path: str, differences: dict) -> None:
        self.differences = dict(differences)
        listed = "; ".join(
            f"{name}: file has {stored!r}, expected {wanted!r}"
            for name, (stored, wanted) in self.differences.items()
        )
        super().__init__(
            path,
            f"{path}: the cache fingerprint does not match expected_fingerprint in "
            f"{len(self.differences)} field(s): {listed}",
        )

    def __reduce__(self) -> tuple:
        return (type(self), (self.path, self.differences))


class CacheTargetMismatchError(CacheFileError):
    """The cache a file is loaded into does not fit the file: another family, number of layers,
    configuration (heads, dims, dtype, codec, window, page size), shape or dtype, or too small
    for the saved tokens."""
