"""Exceptions jaxkv raises beyond ``ValueError``/``TypeError`` for bad arguments."""

from __future__ import annotations


class CacheOverflowError(OverflowError):
    """A write would go past a cache's capacity; nothing was written and nothing was lost."""
