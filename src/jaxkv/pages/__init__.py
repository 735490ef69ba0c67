"""Host-side bookkeeping of the paged KV cache, in plain Python and NumPy.

`PageManager` decides which device page each token of each sequence goes to, shares identical
prompt prefixes through a hash-keyed prefix cache, forks sequences with copy-on-write, truncates
them (rollback), and produces the `StepMetadata` arrays a jitted device step consumes. `PagedRows`
does the batch row operations of the paged family (reset, truncate, select, reorder, repeat,
insert, extract) on page tables through the manager. `HybridPageManager` drives a global and a
windowed manager (sliding-window layers, whose out-of-window pages go back to the pool) in
lockstep. Nothing here imports JAX.
"""

from jaxkv.pages.allocator import PageAllocator
from jaxkv.pages.errors import (
    CapacityError,
    DuplicateSequenceError,
    OutOfPagesError,
    PagesError,
    SchedulingError,
    StepPendingError,
    UnknownSequenceError,
)
from jaxkv.pages.hybrid import HybridPageManager, HybridStep
from jaxkv.pages.manager import NO_PAGE, PageManager, PageStats, SequenceInfo
from jaxkv.pages.prefix_cache import ROOT_HASH, CachedPage, PrefixCache
from jaxkv.pages.rows import ConsumedRowsError, PagedRows
from jaxkv.pages.step import (
    StepMetadata,
    StepRow,
    build_step_metadata,
    default_token_buckets,
    select_bucket,
)

__all__ = [
    "CachedPage",
    "CapacityError",
    "ConsumedRowsError",
    "DuplicateSequenceError",
    "HybridPageManager",
    "HybridStep",
    "NO_PAGE",
    "OutOfPagesError",
    "PageAllocator",
    "PageManager",
    "PageStats",
    "PagedRows",
    "PagesError",
    "PrefixCache",
    "ROOT_HASH",
    "SchedulingError",
    "SequenceInfo",
    "StepMetadata",
    "StepPendingError",
    "StepRow",
    "UnknownSequenceError",
    "build_step_metadata",
    "default_token_buckets",
    "select_bucket",
]
