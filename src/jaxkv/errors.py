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
