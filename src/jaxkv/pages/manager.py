"""`PageManager`: which device page holds each token of each sequence.

The device keeps the KV of every sequence in one pool of `num_pages` pages of `page_size` tokens.
The manager owns the host-side truth about that pool: a page allocator (free queue + refcounts), a
prefix cache (digest -> full computed page, LRU of unreferenced cached pages) and, per sequence,
its token ids, how many of them already have KV on the device (`num_computed`) and its page table.

Life of a step:

1. `add_sequence(seq_id, prompt)` reuses cached full pages of the prompt (prefix hits start the
   sequence's `num_computed` past them) and returns the number of hit tokens. It allocates nothing.
2. `schedule([(seq_id, num_new_tokens), ...])` allocates the pages the new tokens need, copies
   shared partially filled pages on first write (copy-on-write), and returns a `StepMetadata` (the
   device arrays, including the copy ops to apply before the writes, and the pool geometry the
   device cache must match). The step is now pending.
3. The device runs the step (copies, then writes KV at `slot_mapping`, then attention).
4. `commit_step(step)` marks the new tokens computed and registers newly full pages in the prefix
   cache. After sampling, `append_tokens(seq_id, [token])` extends a sequence; the next decode step
   schedules it with `num_new_tokens=1`.
5. Between steps, `fork(parent, child)` starts a copy sharing every page, `truncate(seq_id, n)`
   rolls a sequence back to its first `n` tokens (speculative decoding, beam search: it keeps the
   pages of the computed tokens that remain and drops the rest, like `free` does) and
   `free(seq_id)` drops it. `jaxkv.pages.rows.PagedRows` builds the batch row operations on these.

Windowed mode (`sliding_window=W`, `window_margin=M`): the pool serves sliding-window attention
layers, whose queries never see a key `W` or more positions behind them. After each committed step,
every page of a sequence lying wholly before `num_computed - W - M` goes back to the allocator and
its page-table entry becomes `NO_PAGE` (-1); the table keeps its logical indexing (entry i still
stands for positions `i * page_size ..`), so attention reads it unchanged and masks the released
positions, which lie outside every query's window. A sequence then holds about
`ceil((W + M + chunk) / page_size) + 1` pages however long it grows, and the pool may be smaller
than `max_pages_per_seq`. The `M` tokens of margin are what `truncate` may still roll back::

    positions  | released (-1) | -1 |   held: the window, the margin, the new tokens   |
               0                    ^ num_computed - W - M (rounded down to a page)
                                                            ^ num_computed

A `truncate` to a length whose window needs a released page is refused. Prefix caching is refused
in windowed mode (a hit would need the pages of its window, which are released).

Copy-on-write: `schedule` gives a sequence a private copy of the page its first new token lands in
when that page is partially filled and either shared (refcount > 1, after a `fork`) or cached. A
cached page is full and immutable, so a sequence holds one only partly after a `truncate` inside
it; the copy keeps the cached contents intact for every other (and later) reader.

One step is pending at a time. While it is pending, `schedule` raises `StepPendingError`, and so do
`fork`, `append_tokens` and `truncate` of a sequence in that step; `add_sequence`, `free` and all
reads are allowed (a sequence freed while pending is skipped at commit). Once scheduled, a step
must run and be committed: its copy ops have already been folded into the page tables.

Every public method validates its arguments first and either succeeds or raises leaving the manager
exactly as it was (compare `snapshot()` before and after).

Invariants (checked by `check_invariants`, written down where the data lives):

- every page is exactly one of: free (in the allocator's free queue, refcount 0, not cached),
  evictable (cached, refcount 0, in the prefix cache's LRU) or in use (refcount > 0);
- a page's refcount equals the number of live sequences whose page table holds it, and no page
  table holds a page twice;
- every cached page's digest matches its recorded contents, and a sequence holding a cached page
  at index i has computed at least one of its positions and agrees with its token ids over every
  computed position it holds (all `page_size` of them, except in the last page of a sequence
  truncated inside a cached page);
- a sequence's `page_hashes[i]` is the chained digest of its tokens of page i, for each of its
  `num_computed // page_size` full computed pages (when prefix caching is on);
- a sequence's page table has `ceil(end / page_size)` entries where `end` is `num_computed` (plus
  its pending new tokens while a step is pending), never more than `max_pages_per_seq`; without a
  window every entry is a page; in windowed mode the first `r` entries are `NO_PAGE` and the rest
  pages, with `r >= (num_computed - W - M) // page_size` (released after every commit) and, when
  `r > 0`, `r * page_size + W <= num_computed` (every position a future query can see is held);
- every page a pending step writes is held by that sequence alone and is not cached;
- once every sequence is freed, `num_free_pages + num_evictable_pages == num_pages` (no leak).
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Hashable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jaxkv._sizes import ceil_div
from jaxkv.pages._ints import MAX_INT32, first_non_int, positive_int
from jaxkv.pages.allocator import PageAllocator
from jaxkv.pages.errors import (
    CapacityError,
    DuplicateSequenceError,
    OutOfPagesError,
    SchedulingError,
    StepPendingError,
    UnknownSequenceError,
)
from jaxkv.pages.prefix_cache import ROOT_HASH, CachedPage, PrefixCache
from jaxkv.pages.step import (
    StepMetadata,
    StepRow,
    build_step_metadata,
    default_token_buckets,
    select_bucket,
    validate_token_buckets,
)

MAX_TOKEN_ID = MAX_INT32
"""Token ids travel to the device as int32."""

NO_PAGE = -1
"""The page-table entry of a released page (windowed mode): the position range has no page."""


def _token_list(argument: str, token_ids: object, *, allow_empty: bool, limit: int) -> list[int]:
    """The token ids of `token_ids` as Python ints, at most `limit + 1` of them.

    `token_ids` is a sequence, a 1-D array or an iterator (a generator): it is read once, but
    never past `limit + 1` entries, so that an endless generator cannot hang the manager; the
    caller refuses a result longer than `limit`. Unordered iterables (sets, mappings) are refused.
    """
    if isinstance(token_ids, np.ndarray):
        if token_ids.ndim != 1:
            raise TypeError(
                f"{argument} must be a 1-D sequence of int token ids, got an array of shape "
                f"{token_ids.shape}"
            )
    elif isinstance(token_ids, str | bytes) or not isinstance(token_ids, Sequence | Iterator):
        raise TypeError(f"{argument} must be a sequence of int token ids, got {token_ids!r:.80}")
    tokens = list(itertools.islice(token_ids, limit + 1))
    if not tokens and not allow_empty:
        raise ValueError(f"{argument} must hold at least one token id, got an empty sequence")
    bad = first_non_int(tokens)
    if bad is not None:
        raise TypeError(f"{argument}[{bad}] must be an int token id, got {tokens[bad]!r}")
    if tokens and (min(tokens) < 0 or max(tokens) > MAX_TOKEN_ID):
        index, token = next((i, t) for i, t in enumerate(tokens) if not 0 <= t <= MAX_TOKEN_ID)
        raise ValueError(
            f"{argument}[{index}]={token} is out of range; expected 0 <= id <= {MAX_TOKEN_ID}"
        )
    return [int(token) for token in tokens]


def _count(token_ids: object, tokens: list[int]) -> str:
    """How many token ids a call passed: exact for a sized argument, a bound for an iterator
    `_token_list` stopped reading."""
    if isinstance(token_ids, Sized):
        try:
            return str(len(token_ids))
        except OverflowError:  # e.g. range(2**70)
            pass
    return f"more than {len(tokens) - 1}"


def _salt_bytes(cache_salt: object) -> bytes:
    if cache_salt is None:
        return b""
    if isinstance(cache_salt, str):
        try:
            cache_salt = cache_salt.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                f"cache_salt must be None or a non-empty str/bytes, got {cache_salt!r:.80} "
                "(not encodable as UTF-8)"
            ) from None
    if not isinstance(cache_salt, bytes) or not cache_salt:
        raise ValueError(f"cache_salt must be None or a non-empty str/bytes, got {cache_salt!r}")
    return cache_salt


def _hashable_id(argument: str, seq_id: object) -> Hashable:
    try:
        hash(seq_id)
    except TypeError:
        raise TypeError(f"{argument} must be hashable, got {seq_id!r}") from None
    return seq_id


@dataclass
class _Sequence:
    """Mutable per-sequence state (internal).

    `tokens[:num_computed]` have KV on the device; `pages[i]` holds positions
    `i * page_size .. (i + 1) * page_size - 1` (`NO_PAGE` once released, windowed mode only);
    `page_hashes[i]` is the chained digest of full
    page i, kept for the first `num_computed // page_size` pages when prefix caching is on. After a
    `truncate` inside a cached page, `pages[-1]` is that cached page, of which the sequence has
    computed only a prefix; `schedule` copies it before writing into it.
    """

    seq_id: Hashable
    tokens: list[int]
    num_computed: int
    pages: list[int]
    salt: bytes
    page_hashes: list[bytes]
    num_prompt_tokens: int
    num_cached_tokens: int

    def copy(self, seq_id: Hashable) -> _Sequence:
        return _Sequence(
            seq_id=seq_id,
            tokens=list(self.tokens),
            num_computed=self.num_computed,
            pages=list(self.pages),
            salt=self.salt,
            page_hashes=list(self.page_hashes),
            num_prompt_tokens=self.num_prompt_tokens,
            num_cached_tokens=self.num_cached_tokens,
        )


@dataclass(frozen=True)
class SequenceInfo:
    """A read-only view of one sequence.

    Attributes:
        seq_id: its id.
        token_ids: every known token id (prompt, then appended).
        num_computed: how many of them have KV on the device.
        page_ids: its page table, in position order (`NO_PAGE` for released pages, windowed mode).
        num_prompt_tokens: prompt length at `add_sequence`.
        num_cached_tokens: prompt tokens served by the prefix cache at `add_sequence`.
        cache_salt: the salt it was added with (bytes), or None.
    """

    seq_id: Hashable
    token_ids: tuple[int, ...]
    num_computed: int
    page_ids: tuple[int, ...]
    num_prompt_tokens: int
    num_cached_tokens: int
    cache_salt: bytes | None


@dataclass(frozen=True)
class PageStats:
    """Pool occupancy and prefix-cache counters.

    Attributes:
        num_pages: pages in the pool.
        num_used_pages: pages held by at least one sequence.
        num_evictable_pages: cached pages nobody holds (reusable, evicted on demand).
        num_free_pages: pages in the free queue.
        num_cached_pages: pages registered in the prefix cache (held or evictable).
        num_seqs: live sequences.
        prefix_queries: `add_sequence` calls that consulted the prefix cache.
        prefix_query_tokens: prompt tokens those calls asked about.
        prefix_hit_tokens: prompt tokens served from the cache.
        prefix_hit_rate: `prefix_hit_tokens / prefix_query_tokens` (0.0 before any query).
        num_evictions: cached pages evicted to make room.
        num_copies: copy-on-write page copies issued.
    """

    num_pages: int
    num_used_pages: int
    num_evictable_pages: int
    num_free_pages: int
    num_cached_pages: int
    num_seqs: int
    prefix_queries: int
    prefix_query_tokens: int
    prefix_hit_tokens: int
    prefix_hit_rate: float
    num_evictions: int
    num_copies: int


@dataclass
class _Counters:
    prefix_queries: int = 0
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0
    num_evictions: int = 0
    num_copies: int = 0


@dataclass
class _PendingStep:
    step: StepMetadata
    # (sequence object at schedule time, new tokens). Kept by identity, so that a sequence freed
    # and re-added under the same id while the step is pending is skipped at commit.
    entries: list[tuple[_Sequence, int]] = field(default_factory=list)


class PageManager:
    """Host-side bookkeeping of a paged KV pool (see the module docstring for the step protocol).

    Args:
        num_pages: pages in the device pool (page ids `0 .. num_pages - 1`).
        page_size: tokens per page.
        max_num_seqs: most live sequences at once; also the row count of every step array.
        max_pages_per_seq: most pages one sequence may hold; a sequence holds at most
            `max_pages_per_seq * page_size` tokens.
        enable_prefix_caching: share identical full prompt pages between sequences.
        hash_key: key of the page digests (1 to 64 bytes); a fresh random key when None. A key
            kept across processes gives the same prefix the same digests (pages kept outside the
            pool can then be found again by digest).
        token_buckets: increasing sizes the packed token axis is padded to; by default powers of two
            from 8 up to the first one >= `max_num_seqs * max_pages_per_seq * page_size`.
        record_evictions: remember every cached page evicted from the prefix cache until
            `take_evictions` hands them out (to copy their contents elsewhere before they are
            overwritten).
        sliding_window: `None`, or `W`: windowed mode (see the module docstring), for a pool of
            sliding-window attention layers that see `W` positions, the current one included.
            Needs `enable_prefix_caching=False`; `num_pages` may then be below
            `max_pages_per_seq`.
        window_margin: windowed mode only: `M`, tokens kept before the window so that
            `truncate` can roll a sequence back by up to `M` tokens (an int >= 0).
    """

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        max_num_seqs: int,
        max_pages_per_seq: int,
        enable_prefix_caching: bool = True,
        hash_key: bytes | None = None,
        token_buckets: Sequence[int] | None = None,
        record_evictions: bool = False,
        sliding_window: int | None = None,
        window_margin: int = 0,
    ) -> None:
        self._num_pages = positive_int("num_pages", num_pages)
        self._page_size = positive_int("page_size", page_size)
        self._max_num_seqs = positive_int("max_num_seqs", max_num_seqs)
        self._max_pages_per_seq = positive_int("max_pages_per_seq", max_pages_per_seq)
        if self._num_pages * self._page_size > MAX_TOKEN_ID:
            raise ValueError(
                f"num_pages * page_size = {self._num_pages * self._page_size} slots do not fit the "
                f"int32 slot_mapping; expected at most {MAX_TOKEN_ID}"
            )
        if sliding_window is not None:
            sliding_window = positive_int("sliding_window", sliding_window)
            if enable_prefix_caching:
                raise ValueError(
                    f"enable_prefix_caching=True cannot serve sliding_window={sliding_window}: "
                    "the pages before the window are released, so a prefix hit would miss the "
                    "keys its window needs; use enable_prefix_caching=False"
                )
        if isinstance(window_margin, bool) or not isinstance(window_margin, int | np.integer):
            raise TypeError(f"window_margin must be an int >= 0, got {window_margin!r}")
        if window_margin < 0 or (window_margin and sliding_window is None):
            raise ValueError(
                f"window_margin={window_margin} must be 0 without a sliding_window and >= 0 with "
                f"one (sliding_window={sliding_window})"
            )
        self._sliding_window = sliding_window
        self._window_margin = int(window_margin)
        if self._max_pages_per_seq > self._num_pages and sliding_window is None:
            raise ValueError(
                f"max_pages_per_seq={self._max_pages_per_seq} exceeds num_pages={self._num_pages}; "
                "one sequence could never hold that many pages"
            )
        if not isinstance(enable_prefix_caching, bool):
            raise TypeError(f"enable_prefix_caching must be a bool, got {enable_prefix_caching!r}")
        if not isinstance(record_evictions, bool):
            raise TypeError(f"record_evictions must be a bool, got {record_evictions!r}")
        if hash_key is None:
            hash_key = secrets.token_bytes(32)
        elif not isinstance(hash_key, bytes) or not 1 <= len(hash_key) <= 64:
            raise ValueError(f"hash_key must be None or 1 to 64 bytes, got {hash_key!r:.40}")
        if token_buckets is None:
            max_tokens = self._max_num_seqs * self._max_pages_per_seq * self._page_size
            self._token_buckets = default_token_buckets(max_tokens)
        else:
            self._token_buckets = validate_token_buckets(token_buckets)
        self._enable_prefix_caching = enable_prefix_caching
        self._allocator = PageAllocator(self._num_pages)
        self._prefix_cache = PrefixCache(self._page_size, hash_key)
        # Live sequences in insertion order.
        self._seqs: dict[Hashable, _Sequence] = {}
        self._pending: _PendingStep | None = None
        self._counters = _Counters()
        # Cached pages evicted since the last `take_evictions` (only with record_evictions): their
        # device contents stay valid until the step or import that took them writes.
        self._evicted: list[CachedPage] | None = [] if record_evictions else None

    # -- configuration and reads -----------------------------------------------------------------

    @property
    def num_pages(self) -> int:
        """Pages in the device pool."""
        return self._num_pages

    @property
    def page_size(self) -> int:
        """Tokens per page."""
        return self._page_size

    @property
    def max_num_seqs(self) -> int:
        """Most live sequences; the row count of every step array."""
        return self._max_num_seqs

    @property
    def max_pages_per_seq(self) -> int:
        """Most pages one sequence may hold; the page-table width."""
        return self._max_pages_per_seq

    @property
    def max_seq_len(self) -> int:
        """Most tokens one sequence may hold: `max_pages_per_seq * page_size`."""
        return self._max_pages_per_seq * self._page_size

    @property
    def sliding_window(self) -> int | None:
        """`W` in windowed mode (pages before the window are released), else `None`."""
        return self._sliding_window

    @property
    def window_margin(self) -> int:
        """`M`, tokens kept before the window for `truncate` (0 without a window)."""
        return self._window_margin

    def min_truncate_length(self, seq_id: Hashable) -> int:
        """The smallest `num_tokens` that `truncate(seq_id, num_tokens)` accepts: 0, or in windowed
        mode, once pages were released, the first position the window needs still held
        (`released * page_size + sliding_window`).

        Raises:
            UnknownSequenceError: `seq_id` is not live.
        """
        return self._min_length(self._lookup("seq_id", seq_id))

    def _min_length(self, seq: _Sequence) -> int:
        released = self._num_released(seq)
        return released * self._page_size + self._sliding_window if released else 0

    @staticmethod
    def _num_released(seq: _Sequence) -> int:
        """Leading `NO_PAGE` entries of the sequence's table (they form a prefix)."""
        count = 0
        for page in seq.pages:
            if page != NO_PAGE:
                break
            count += 1
        return count

    @property
    def token_buckets(self) -> tuple[int, ...]:
        """Sizes the packed token axis is padded to, increasing."""
        return self._token_buckets

    @property
    def enable_prefix_caching(self) -> bool:
        """Whether full computed pages are shared by content."""
        return self._enable_prefix_caching

    @property
    def num_free_pages(self) -> int:
        """Pages in the free queue."""
        return self._allocator.num_free

    @property
    def num_evictable_pages(self) -> int:
        """Unreferenced cached pages (reusable by a prefix hit, or evicted for new data)."""
        return self._prefix_cache.num_evictable

    @property
    def num_available_pages(self) -> int:
        """Pages a schedule may allocate right now: free plus evictable."""
        return self._allocator.num_free + self._prefix_cache.num_evictable

    @property
    def num_used_pages(self) -> int:
        """Pages held by at least one sequence."""
        return self._num_pages - self.num_available_pages

    @property
    def pending_step(self) -> StepMetadata | None:
        """The scheduled, not yet committed step, or None."""
        return None if self._pending is None else self._pending.step

    @property
    def seq_ids(self) -> tuple[Hashable, ...]:
        """Live sequence ids, in the order they were added."""
        return tuple(self._seqs)

    def __len__(self) -> int:
        return len(self._seqs)

    def __contains__(self, seq_id: object) -> bool:
        try:
            return seq_id in self._seqs
        except TypeError:
            return False

    def get_sequence(self, seq_id: Hashable) -> SequenceInfo:
        """A read-only view of a live sequence.

        Raises:
            UnknownSequenceError: `seq_id` is not live.
        """
        seq = self._lookup("seq_id", seq_id)
        return SequenceInfo(
            seq_id=seq.seq_id,
            token_ids=tuple(seq.tokens),
            num_computed=seq.num_computed,
            page_ids=tuple(seq.pages),
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            cache_salt=seq.salt or None,
        )

    def in_pending_step(self, seq_id: Hashable) -> bool:
        """Whether live `seq_id` is in the pending step (then `fork`, `append_tokens` and
        `truncate` of it are refused until `commit_step`).

        Raises:
            UnknownSequenceError: `seq_id` is not live.
        """
        return self._in_pending(self._lookup("seq_id", seq_id))

    def stats(self) -> PageStats:
        """Current occupancy and cumulative prefix-cache counters."""
        counters = self._counters
        hit_rate = (
            counters.prefix_hit_tokens / counters.prefix_query_tokens
            if counters.prefix_query_tokens
            else 0.0
        )
        return PageStats(
            num_pages=self._num_pages,
            num_used_pages=self.num_used_pages,
            num_evictable_pages=self.num_evictable_pages,
            num_free_pages=self.num_free_pages,
            num_cached_pages=self._prefix_cache.num_cached,
            num_seqs=len(self._seqs),
            prefix_queries=counters.prefix_queries,
            prefix_query_tokens=counters.prefix_query_tokens,
            prefix_hit_tokens=counters.prefix_hit_tokens,
            prefix_hit_rate=hit_rate,
            num_evictions=counters.num_evictions,
            num_copies=counters.num_copies,
        )

    # -- sequence lifecycle ----------------------------------------------------------------------

    def add_sequence(
        self,
        seq_id: Hashable,
        prompt_token_ids: Sequence[int],
        *,
        cache_salt: str | bytes | None = None,
    ) -> int:
        """Add a sequence with its prompt; reuse cached full pages of the prompt's prefix.

        Allocates nothing: pages for the uncached rest come with `schedule`. At least the last
        prompt token is always left to compute (the model needs its logits), so at most
        `(len(prompt) - 1) // page_size` pages can hit.

        Args:
            seq_id: a new, hashable id.
            prompt_token_ids: 1 to `max_seq_len` token ids in `[0, 2**31 - 1]` (Python or NumPy
                ints, not bools): a sequence, a 1-D array or an iterator, read once and never past
                `max_seq_len + 1` entries (an endless generator is refused, not hung on); sets and
                mappings, which have no order, are refused.
            cache_salt: requests with different salts never share pages (None shares with None).

        Returns:
            The number of prompt tokens served by the prefix cache (the sequence's `num_computed`).

        Raises:
            DuplicateSequenceError: `seq_id` is already live.
            CapacityError: `max_num_seqs` sequences are live, or the prompt exceeds `max_seq_len`.
            TypeError, ValueError: malformed arguments.
        """
        _hashable_id("seq_id", seq_id)
        if seq_id in self._seqs:
            raise DuplicateSequenceError(f"seq_id={seq_id!r} is already a live sequence")
        tokens = _token_list(
            "prompt_token_ids", prompt_token_ids, allow_empty=False, limit=self.max_seq_len
        )
        salt = _salt_bytes(cache_salt)
        if len(tokens) > self.max_seq_len:
            raise CapacityError(
                f"prompt_token_ids has {_count(prompt_token_ids, tokens)} tokens; a sequence holds "
                f"at most max_pages_per_seq * page_size = {self.max_seq_len}"
            )
        if len(self._seqs) >= self._max_num_seqs:
            raise CapacityError(
                f"cannot add seq_id={seq_id!r}: max_num_seqs={self._max_num_seqs} sequences "
                "are live"
            )

        pages: list[int] = []
        page_hashes: list[bytes] = []
        if self._enable_prefix_caching:
            parent = ROOT_HASH
            size = self._page_size
            for index in range((len(tokens) - 1) // size):
                page_tokens = tokens[index * size : (index + 1) * size]
                page_hash = self._prefix_cache.hash_page(parent, salt, page_tokens)
                page = self._prefix_cache.match(page_hash, parent, salt, page_tokens)
                if page is None:
                    break
                pages.append(page)
                page_hashes.append(page_hash)
                parent = page_hash
            # Nothing can fail past this point: take the hits.
            for page in pages:
                if self._prefix_cache.is_evictable(page):
                    self._prefix_cache.unpark(page)
                self._allocator.incref(page)
            self._counters.prefix_queries += 1
            self._counters.prefix_query_tokens += len(tokens)
            self._counters.prefix_hit_tokens += len(pages) * self._page_size

        num_hit = len(pages) * self._page_size
        self._seqs[seq_id] = _Sequence(
            seq_id=seq_id,
            tokens=tokens,
            num_computed=num_hit,
            pages=pages,
            salt=salt,
            page_hashes=page_hashes,
            num_prompt_tokens=len(tokens),
            num_cached_tokens=num_hit,
        )
        return num_hit

    def append_tokens(self, seq_id: Hashable, token_ids: Sequence[int]) -> None:
        """Append known tokens (e.g. the sampled one) to a sequence; they are computed by a later
        `schedule`. Allocates nothing.

        `token_ids` is taken like `add_sequence`'s prompt (it may be empty), and read no further
        than the room left in the sequence plus one.

        Raises:
            TypeError, ValueError: malformed `token_ids`.
            UnknownSequenceError: `seq_id` is not live.
            StepPendingError: `seq_id` is in the pending step.
            CapacityError: the sequence would exceed `max_seq_len`.
        """
        seq = self._lookup("seq_id", seq_id)
        room = self.max_seq_len - len(seq.tokens)
        tokens = _token_list("token_ids", token_ids, allow_empty=True, limit=room)
        self._refuse_if_pending("append_tokens", seq)
        if len(tokens) > room:
            raise CapacityError(
                f"appending {_count(token_ids, tokens)} token(s) to seq_id={seq_id!r} "
                f"({len(seq.tokens)} tokens) exceeds max_pages_per_seq * page_size = "
                f"{self.max_seq_len}"
            )
        seq.tokens.extend(tokens)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Start `child_id` as a copy of `parent_id` sharing all of its pages (refcounts + 1).

        The first write into a shared, partially filled page gives the writer a private copy; the
        copy appears in that step's `StepMetadata.copy_ops`. Allocates nothing.

        Raises:
            UnknownSequenceError: `parent_id` is not live.
            DuplicateSequenceError: `child_id` is already live.
            CapacityError: `max_num_seqs` sequences are live.
            StepPendingError: `parent_id` is in the pending step.
        """
        parent = self._lookup("parent_id", parent_id)
        _hashable_id("child_id", child_id)
        if child_id in self._seqs:
            raise DuplicateSequenceError(f"child_id={child_id!r} is already a live sequence")
        if len(self._seqs) >= self._max_num_seqs:
            raise CapacityError(
                f"cannot fork into child_id={child_id!r}: max_num_seqs={self._max_num_seqs} "
                "sequences are live"
            )
        self._refuse_if_pending("fork", parent)
        for page in parent.pages:
            if page != NO_PAGE:
                self._allocator.incref(page)
        self._seqs[child_id] = parent.copy(child_id)

    def free(self, seq_id: Hashable) -> None:
        """Remove a sequence and drop its hold on its pages.

        A page nobody holds any more becomes evictable if it is cached (reusable by a later prefix
        hit), free otherwise. Pages are released last-to-first, so a sequence's tail pages are
        evicted before its head pages (heads are the likeliest to be shared again).

        Raises:
            UnknownSequenceError: `seq_id` is not live (never added or already freed).
        """
        seq = self._lookup("seq_id", seq_id)
        del self._seqs[seq_id]
        self._release_pages(seq.pages)

    def truncate(self, seq_id: Hashable, num_tokens: int) -> None:
        """Keep only the first `num_tokens` known tokens of a sequence (rollback).

        `num_computed` becomes `min(num_computed, num_tokens)`; the sequence keeps the
        `ceil(num_computed / page_size)` pages that hold those computed tokens and drops the rest
        last-to-first, like `free` (a page nobody holds any more becomes evictable if cached, free
        otherwise). Its digests are trimmed to the full computed pages it keeps. Its prompt
        counters (`num_prompt_tokens`, `num_cached_tokens`) describe `add_sequence` and stay.

        The last kept page may be a cached page the sequence now holds only partly; the next
        `schedule` of the sequence writes into a private copy of it (copy-on-write), never into
        the cached page. Allocates nothing.

        In windowed mode the sequence cannot go back past the margin its released pages left:
        a `num_tokens` below `min_truncate_length(seq_id)` is refused.

        Args:
            seq_id: a live sequence, not in the pending step.
            num_tokens: `min_truncate_length(seq_id) <= num_tokens <= len(token_ids)` (the
                minimum is 0 unless windowed mode released pages).

        Raises:
            UnknownSequenceError: `seq_id` is not live.
            TypeError: `num_tokens` is not an int.
            ValueError: `num_tokens` is out of range, or (windowed) its window needs a released
                page; nothing changes.
            StepPendingError: `seq_id` is in the pending step.
        """
        seq = self._lookup("seq_id", seq_id)
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int | np.integer):
            raise TypeError(
                f"num_tokens for seq_id={seq_id!r} must be an int, got "
                f"{type(num_tokens).__name__} {num_tokens!r}"
            )
        if not 0 <= num_tokens <= len(seq.tokens):
            raise ValueError(
                f"num_tokens={num_tokens} for seq_id={seq_id!r} is out of range; expected "
                f"0 <= num_tokens <= {len(seq.tokens)} (its known tokens)"
            )
        self._refuse_if_pending("truncate", seq)
        floor = self._min_length(seq)
        if num_tokens < floor:
            raise ValueError(
                f"num_tokens={num_tokens} for seq_id={seq_id!r} is below the smallest length its "
                f"held pages can serve, {floor}: sliding_window={self._sliding_window} needs the "
                f"positions before it, whose pages were released (window_margin="
                f"{self._window_margin}); expected num_tokens >= {floor}"
            )

        # Nothing can fail past this point.
        num_tokens = int(num_tokens)
        del seq.tokens[num_tokens:]
        seq.num_computed = min(seq.num_computed, num_tokens)
        keep = ceil_div(seq.num_computed, self._page_size)
        dropped = seq.pages[keep:]
        del seq.pages[keep:]
        del seq.page_hashes[seq.num_computed // self._page_size :]
        self._release_pages(dropped)

    # -- prefixes kept outside the pool ----------------------------------------------------------

    def prefix_hashes(
        self, token_ids: Sequence[int], *, cache_salt: str | bytes | None = None
    ) -> list[bytes]:
        """The chained digests of the full pages of `token_ids` (`len // page_size` of them), as
        the prefix cache names them under this manager's key and `cache_salt`.

        Raises:
            TypeError, ValueError: malformed token ids or salt (as in `add_sequence`).
        """
        tokens = _token_list("token_ids", token_ids, allow_empty=True, limit=self.max_seq_len)
        salt = _salt_bytes(cache_salt)
        size = self._page_size
        digests: list[bytes] = []
        parent = ROOT_HASH
        for index in range(len(tokens) // size):
            parent = self._prefix_cache.hash_page(
                parent, salt, tokens[index * size : (index + 1) * size]
            )
            digests.append(parent)
        return digests

    def cached_prefix(
        self, token_ids: Sequence[int], *, cache_salt: str | bytes | None = None
    ) -> tuple[int, ...]:
        """The pool pages holding the longest cached run of full pages that `token_ids` starts
        with (every full page counts, the last one too). Reads only: nothing is held, so the
        pages stay as evictable as they were.

        Raises:
            TypeError, ValueError: malformed token ids or salt.
        """
        tokens = _token_list("token_ids", token_ids, allow_empty=True, limit=self.max_seq_len)
        salt = _salt_bytes(cache_salt)
        if not self._enable_prefix_caching:
            return ()
        return tuple(self._match_run(tokens, salt, len(tokens) // self._page_size))

    def _match_run(self, tokens: list[int], salt: bytes, limit: int) -> list[int]:
        pages: list[int] = []
        parent = ROOT_HASH
        size = self._page_size
        for index in range(limit):
            page_tokens = tokens[index * size : (index + 1) * size]
            page_hash = self._prefix_cache.hash_page(parent, salt, page_tokens)
            page = self._prefix_cache.match(page_hash, parent, salt, page_tokens)
            if page is None:
                break
            pages.append(page)
            parent = page_hash
        return pages

    def import_prefix(
        self,
        token_ids: Sequence[int],
        write: Callable[[list[int], list[int]], None],
        *,
        cache_salt: str | bytes | None = None,
    ) -> int:
        """Make the full pages of `token_ids` cached prefix pages, their contents supplied by
        `write` (e.g. read from a file), so that a later `add_sequence` of a prompt starting with
        them hits them.

        Pages already cached are kept. For each of the others a page is taken (free first, else
        the least recently used evictable cached page), while any is available; the run stops
        at the first page that finds none. Then `write(indices, page_ids)` is called once with
        the position of each taken page in the prefix and its page id; it must fill those pages
        on the device. On success they enter the prefix cache (unreferenced and evictable, the
        prefix's head most recently used); if `write` raises, they go back to the free pool and
        the error propagates. Either way nothing stays held.

        ::

            token_ids   | page 0 | page 1 | page 2 | pa  <- partial page: not imported
            cached?       yes      no       no
            write(...)             ([1, 2], [p1, p2])

        Args:
            token_ids: the prefix; its first `len // page_size` pages are imported.
            write: `write(indices, page_ids)`, called only when at least one page was taken.
            cache_salt: the salt of the requests that may hit these pages.

        Returns:
            How many leading tokens of `token_ids` are now cached (a multiple of `page_size`).

        Raises:
            TypeError, ValueError: malformed arguments (nothing changes).
            StepPendingError: a step is pending (its pages must not change owners under it).
            Whatever `write` raises (the taken pages are freed).
        """
        tokens = _token_list("token_ids", token_ids, allow_empty=True, limit=self.max_seq_len)
        salt = _salt_bytes(cache_salt)
        if not callable(write):
            raise TypeError(f"write must be callable, got {write!r:.80}")
        if not self._enable_prefix_caching:
            raise ValueError("import_prefix needs a manager with enable_prefix_caching=True")
        if self._pending is not None:
            raise StepPendingError("import_prefix() called while a step is pending")
        size = self._page_size
        held: list[int] = []
        taken: list[tuple[int, int, bytes, bytes]] = []  # (index, page, digest, parent)
        parent = ROOT_HASH
        for index in range(min(len(tokens) // size, self._max_pages_per_seq)):
            page_tokens = tokens[index * size : (index + 1) * size]
            page_hash = self._prefix_cache.hash_page(parent, salt, page_tokens)
            page = self._prefix_cache.match(page_hash, parent, salt, page_tokens)
            if page is not None:
                if self._prefix_cache.is_evictable(page):
                    self._prefix_cache.unpark(page)
                self._allocator.incref(page)
            elif self._allocator.num_free or self._prefix_cache.num_evictable:
                page = self._take_page()
                taken.append((index, page, page_hash, parent))
            else:
                break
            held.append(page)
            parent = page_hash
        if taken:
            try:
                write([index for index, *_ in taken], [page for _, page, *_ in taken])
            except BaseException:
                fresh = {page for _, page, *_ in taken}
                for page in reversed(held):
                    if self._allocator.decref(page) == 0:
                        if page in fresh:
                            self._allocator.release(page)
                        else:
                            self._prefix_cache.park(page)
                raise
            for index, page, page_hash, page_parent in taken:
                page_tokens = tokens[index * size : (index + 1) * size]
                # False only if the digest is cached already (not possible here: it missed).
                self._prefix_cache.insert(page, page_hash, page_parent, salt, page_tokens)
        self._release_pages(held)
        return len(held) * size

    def cached_pages(self) -> list[CachedPage]:
        """Every page of the prefix cache (held or evictable), in the order they were cached."""
        return list(self._prefix_cache.entries())

    def take_evictions(self) -> list[CachedPage]:
        """The cached pages evicted since the last call, oldest first (their digests, salts and
        token ids; the pages themselves now belong to whoever took them, and their device
        contents are intact until that owner's step or import writes them). Empty unless the
        manager was made with `record_evictions=True`."""
        if self._evicted is None:
            return []
        evicted, self._evicted = self._evicted, []
        return evicted

    # -- steps -----------------------------------------------------------------------------------

    def pages_needed(self, batch: Sequence[tuple[Hashable, int]]) -> int:
        """Pages `schedule(batch)` would allocate (new pages plus copy-on-write copies).

        Allowed while a step is pending, for sequences outside it (the pending step has already
        allocated its pages).

        Raises:
            The same validation errors as `schedule`, but never `OutOfPagesError`.
            StepPendingError: a sequence of `batch` is in the pending step (its pages and
                `num_computed` change at `commit_step`, so no count would be right).
        """
        entries = self._validate_batch(batch)
        for seq, _ in entries:
            self._refuse_if_pending("pages_needed", seq)
        return self._plan(entries)

    def schedule(self, batch: Sequence[tuple[Hashable, int]]) -> StepMetadata:
        """Allocate pages for a step and build its device arrays; the step becomes pending.

        Args:
            batch: `(seq_id, num_new_tokens)` pairs, each sequence at most once, in the row order
                the arrays use; `1 <= num_new_tokens <= len(tokens) - num_computed` (a prefill
                chunk, or 1 for decode). The sequence's next `num_new_tokens` uncomputed tokens
                are scheduled.

        Returns:
            The `StepMetadata` of the step; apply its `copy_ops`, run it, then `commit_step` it.

        Raises:
            StepPendingError: a step is already pending.
            UnknownSequenceError: a `seq_id` is not live.
            SchedulingError: an empty batch, a sequence listed twice, a bad `num_new_tokens`.
            CapacityError: more tokens than the largest token bucket.
            OutOfPagesError: not enough free plus evictable pages.
        """
        if self._pending is not None:
            raise StepPendingError(
                "schedule() called while a step is pending; commit_step() it first"
            )
        entries = self._validate_batch(batch)
        needed = self._plan(entries)
        free, evictable = self._allocator.num_free, self._prefix_cache.num_evictable
        if needed > free + evictable:
            raise OutOfPagesError(
                needed, free, evictable, what=f"schedule() of {len(entries)} seq(s)"
            )

        # Nothing can fail past this point.
        copy_ops: list[tuple[int, int]] = []
        rows: list[StepRow] = []
        released: list[int] = []
        size = self._page_size
        for seq, count in entries:
            start = seq.num_computed
            if start % size:
                index = start // size
                shared = seq.pages[index]
                if self._must_copy(shared, self._allocator.refcount(shared)):
                    private = self._take_page()
                    # 0 only for a cached page this sequence held alone (after a truncate).
                    if self._allocator.decref(shared) == 0:
                        released.append(shared)
                    seq.pages[index] = private
                    copy_ops.append((shared, private))
            while len(seq.pages) * size < start + count:
                seq.pages.append(self._take_page())
            rows.append(
                StepRow(
                    seq_id=seq.seq_id,
                    page_ids=tuple(seq.pages),
                    num_computed=start,
                    new_token_ids=tuple(seq.tokens[start : start + count]),
                )
            )
        # Parked only now: a copy source is never evicted and reused within its own step.
        for page in released:
            self._prefix_cache.park(page)
        self._counters.num_copies += len(copy_ops)
        step = build_step_metadata(
            rows,
            copy_ops,
            num_pages=self._num_pages,
            page_size=size,
            max_num_seqs=self._max_num_seqs,
            max_pages_per_seq=self._max_pages_per_seq,
            token_buckets=self._token_buckets,
        )
        self._pending = _PendingStep(step=step, entries=list(entries))
        return step

    def commit_step(self, step: StepMetadata) -> None:
        """The device ran `step`: its new tokens are computed; newly full pages become cached.

        Sequences freed since `schedule` are skipped.

        Raises:
            StepPendingError: `step` is not the pending step (none pending, or another one).
        """
        if self._pending is None:
            raise StepPendingError("commit_step() called with no pending step")
        if step is not self._pending.step:
            raise StepPendingError("commit_step(step): step is not the pending step")
        for seq, count in self._pending.entries:
            if self._seqs.get(seq.seq_id) is not seq:
                continue
            seq.num_computed += count
            if self._enable_prefix_caching:
                self._register_full_pages(seq)
            if self._sliding_window is not None:
                self._release_before_window(seq)
        self._pending = None

    def abandon_step(self, step: StepMetadata) -> list[Hashable]:
        """The device could not run `step`: free every sequence in it and clear the pending step.

        Their pages may hold half-written or half-copied contents, so none of them can go on;
        pages nobody else holds return to the pool (a cached page is never written by a step,
        so the prefix cache stays right). Returns the ids freed.

        Raises:
            StepPendingError: `step` is not the pending step.
        """
        if self._pending is None or step is not self._pending.step:
            raise StepPendingError("abandon_step(step): step is not the pending step")
        freed = []
        for seq, _ in self._pending.entries:
            if self._seqs.get(seq.seq_id) is seq:
                self.free(seq.seq_id)
                freed.append(seq.seq_id)
        self._pending = None
        return freed

    # -- state inspection ------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """A deep, comparable copy of the whole state (for tests and debugging).

        Two snapshots compare equal iff free queue order, refcounts, cache contents, LRU order,
        sequences, pending step and counters are all equal.
        """
        return {
            "free_queue": tuple(self._allocator.free_pages()),
            "refcounts": tuple(self._allocator.refcounts()),
            "cached": tuple(
                sorted(
                    (e.page, e.page_hash, e.parent_hash, e.salt, e.token_ids)
                    for e in self._prefix_cache.entries()
                )
            ),
            "lru": tuple(self._prefix_cache.evictable_pages()),
            "seqs": tuple(
                (
                    seq_id,
                    tuple(seq.tokens),
                    seq.num_computed,
                    tuple(seq.pages),
                    seq.salt,
                    tuple(seq.page_hashes),
                    seq.num_prompt_tokens,
                    seq.num_cached_tokens,
                )
                for seq_id, seq in self._seqs.items()
            ),
            "pending": None if self._pending is None else id(self._pending.step),
            "counters": (
                self._counters.prefix_queries,
                self._counters.prefix_query_tokens,
                self._counters.prefix_hit_tokens,
                self._counters.num_evictions,
                self._counters.num_copies,
            ),
        }

    def check_invariants(self) -> None:
        """Raise AssertionError if any invariant in the module docstring is broken."""
        self._allocator.check()
        self._prefix_cache.check()
        size = self._page_size
        holders = [0] * self._num_pages
        pending_new = {}
        if self._pending is not None:
            pending_new = {id(seq): count for seq, count in self._pending.entries}
        if len(self._seqs) > self._max_num_seqs:
            raise AssertionError(f"{len(self._seqs)} live sequences > max_num_seqs")
        for seq_id, seq in self._seqs.items():
            released = self._num_released(seq)
            held = seq.pages[released:]
            if NO_PAGE in held or (released and self._sliding_window is None):
                raise AssertionError(
                    f"sequence {seq_id!r}: released entries must be a prefix of the table, and "
                    f"only in windowed mode: {seq.pages}"
                )
            if len(set(held)) != len(held):
                raise AssertionError(f"sequence {seq_id!r} holds a page twice: {seq.pages}")
            for page in held:
                holders[page] += 1
            if self._sliding_window is not None:
                window = self._sliding_window
                due = max(seq.num_computed - window - self._window_margin, 0) // size
                if released < due or (released and released * size + window > seq.num_computed):
                    raise AssertionError(
                        f"sequence {seq_id!r}: {released} released page(s) at num_computed="
                        f"{seq.num_computed}; expected at least {due}, and the window's "
                        f"positions from {max(seq.num_computed - window, 0)} held"
                    )
            if not 0 <= seq.num_computed <= len(seq.tokens) <= self.max_seq_len:
                raise AssertionError(
                    f"sequence {seq_id!r}: num_computed={seq.num_computed}, "
                    f"{len(seq.tokens)} tokens, max_seq_len={self.max_seq_len}"
                )
            end = seq.num_computed + pending_new.get(id(seq), 0)
            if len(seq.pages) != ceil_div(end, size) or len(seq.pages) > self._max_pages_per_seq:
                raise AssertionError(
                    f"sequence {seq_id!r} holds {len(seq.pages)} pages for {end} tokens"
                )
            if self._enable_prefix_caching and len(seq.page_hashes) != seq.num_computed // size:
                raise AssertionError(
                    f"sequence {seq_id!r}: {len(seq.page_hashes)} page digests for "
                    f"{seq.num_computed // size} full computed pages"
                )
            parent = ROOT_HASH
            for index, page_hash in enumerate(seq.page_hashes):
                page_tokens = seq.tokens[index * size : (index + 1) * size]
                if page_hash != self._prefix_cache.hash_page(parent, seq.salt, page_tokens):
                    raise AssertionError(
                        f"sequence {seq_id!r} page {index}: its digest does not match its tokens"
                    )
                parent = page_hash
            for index, page in enumerate(seq.pages):
                if page != NO_PAGE and self._prefix_cache.is_cached(page):
                    entry = self._prefix_cache.entry(page)
                    # Positions of this page the sequence has computed: all of them, except in
                    # the last page of a sequence truncated inside a cached page (a prefix).
                    start = index * size
                    held = min(size, seq.num_computed - start)
                    if held < 1:
                        raise AssertionError(
                            f"sequence {seq_id!r} page {index} (id {page}) is cached but the "
                            "sequence has computed none of its positions"
                        )
                    if entry.token_ids[:held] != tuple(seq.tokens[start : start + held]):
                        raise AssertionError(
                            f"sequence {seq_id!r} page {index} (id {page}) is cached with "
                            "other token ids"
                        )
                    if index < len(seq.page_hashes) and seq.page_hashes[index] != entry.page_hash:
                        raise AssertionError(
                            f"sequence {seq_id!r} page {index} (id {page}): digest mismatch"
                        )
            if id(seq) in pending_new:
                first = seq.num_computed // size
                for index in range(first, ceil_div(end, size)):
                    page = seq.pages[index]
                    if self._prefix_cache.is_cached(page) or self._allocator.refcount(page) != 1:
                        raise AssertionError(
                            f"sequence {seq_id!r}: the pending step writes page {index} (id "
                            f"{page}), which is cached or shared"
                        )
        refcounts = self._allocator.refcounts()
        for page in range(self._num_pages):
            if refcounts[page] != holders[page]:
                raise AssertionError(
                    f"page {page}: refcount {refcounts[page]} but {holders[page]} holder(s)"
                )
            is_free = self._allocator.is_free(page)
            is_evictable = self._prefix_cache.is_evictable(page)
            in_use = refcounts[page] > 0
            if is_free + is_evictable + in_use != 1:
                raise AssertionError(
                    f"page {page}: free={is_free}, evictable={is_evictable}, in_use={in_use}; "
                    "expected exactly one"
                )
            if is_free and self._prefix_cache.is_cached(page):
                raise AssertionError(f"page {page} is free but still cached")
        if not self._seqs and self.num_available_pages != self._num_pages:
            raise AssertionError(
                f"no live sequence but only {self.num_available_pages} of {self._num_pages} "
                "pages are free or evictable"
            )

    # -- internals -------------------------------------------------------------------------------

    def _lookup(self, argument: str, seq_id: object) -> _Sequence:
        _hashable_id(argument, seq_id)
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise UnknownSequenceError(argument, seq_id)
        return seq

    def _in_pending(self, seq: _Sequence) -> bool:
        return self._pending is not None and any(s is seq for s, _ in self._pending.entries)

    def _refuse_if_pending(self, what: str, seq: _Sequence) -> None:
        if self._in_pending(seq):
            raise StepPendingError(
                f"{what}() of seq_id={seq.seq_id!r}: it is in the pending step; commit_step() first"
            )

    def _validate_batch(self, batch: object) -> list[tuple[_Sequence, int]]:
        if isinstance(batch, str | bytes) or not isinstance(batch, Sequence):
            raise TypeError(
                f"batch must be a sequence of (seq_id, num_new_tokens), got {batch!r:.80}"
            )
        if not batch:
            raise SchedulingError("batch is empty; schedule at least one sequence")
        entries: list[tuple[_Sequence, int]] = []
        seen: set[Hashable] = set()
        for position, item in enumerate(batch):
            if not isinstance(item, tuple | list) or len(item) != 2:
                raise TypeError(
                    f"batch[{position}] must be a (seq_id, num_new_tokens) pair, got {item!r}"
                )
            seq_id, count = item
            seq = self._lookup(f"batch[{position}] seq_id", seq_id)
            if seq_id in seen:
                raise SchedulingError(f"batch lists seq_id={seq_id!r} more than once")
            seen.add(seq_id)
            remaining = len(seq.tokens) - seq.num_computed
            if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 1:
                raise SchedulingError(
                    f"num_new_tokens for seq_id={seq_id!r} must be an int >= 1, got {count!r}"
                )
            if count > remaining:
                raise SchedulingError(
                    f"num_new_tokens={count} for seq_id={seq_id!r} exceeds its {remaining} "
                    "uncomputed token(s); append_tokens() first"
                )
            entries.append((seq, int(count)))
        if len(entries) > self._max_num_seqs:  # unreachable while live seqs <= max_num_seqs
            raise CapacityError(f"batch has {len(entries)} sequences > max_num_seqs")
        select_bucket(sum(count for _, count in entries), self._token_buckets)
        return entries

    def _plan(self, entries: list[tuple[_Sequence, int]]) -> int:
        """Pages the entries need, simulating the refcount drops of earlier copies in the batch."""
        size = self._page_size
        simulated: dict[int, int] = {}
        needed = 0
        for seq, count in entries:
            start = seq.num_computed
            if start % size:
                shared = seq.pages[start // size]
                refcount = simulated.get(shared, self._allocator.refcount(shared))
                if self._must_copy(shared, refcount):
                    needed += 1
                    simulated[shared] = refcount - 1
            needed += ceil_div(start + count, size) - len(seq.pages)
        return needed

    def _must_copy(self, page: int, refcount: int) -> bool:
        """Whether a write into the partially filled `page` (held `refcount` times) needs a private
        copy: another sequence holds it, or it is cached (full and immutable; a truncated sequence
        holds it partly). `schedule` and `_plan` both decide through this."""
        return refcount > 1 or self._prefix_cache.is_cached(page)

    def _release_pages(self, pages: list[int]) -> None:
        """Drop one hold on each page, last to first; a page nobody holds becomes evictable if
        cached, free otherwise."""
        for page in reversed(pages):
            if page == NO_PAGE:
                continue
            if self._allocator.decref(page) == 0:
                if self._prefix_cache.is_cached(page):
                    self._prefix_cache.park(page)
                else:
                    self._allocator.release(page)

    def _release_before_window(self, seq: _Sequence) -> None:
        """Windowed mode: give back every page wholly before `num_computed - W - M` (no current or
        future query sees it, and `truncate` keeps `M` tokens of margin)."""
        assert self._sliding_window is not None
        floor = seq.num_computed - self._sliding_window - self._window_margin
        released = self._num_released(seq)
        gone = seq.pages[released : max(floor, 0) // self._page_size]
        for index in range(released, released + len(gone)):
            seq.pages[index] = NO_PAGE
        self._release_pages(gone)

    def _take_page(self) -> int:
        """A page with refcount 1: the oldest free page, else the least recently used evictable
        cached page (its digest is forgotten). The caller has checked that one exists."""
        if self._allocator.num_free:
            return self._allocator.allocate()
        if self._evicted is not None:
            self._evicted.append(self._prefix_cache.entry(self._lru_head()))
        page = self._prefix_cache.evict()
        self._allocator.incref(page)
        self._counters.num_evictions += 1
        return page

    def _lru_head(self) -> int:
        return next(self._prefix_cache.evictable_pages())

    def _register_full_pages(self, seq: _Sequence) -> None:
        size = self._page_size
        for index in range(len(seq.page_hashes), seq.num_computed // size):
            parent = seq.page_hashes[-1] if seq.page_hashes else ROOT_HASH
            page_tokens = seq.tokens[index * size : (index + 1) * size]
            page_hash = self._prefix_cache.hash_page(parent, seq.salt, page_tokens)
            seq.page_hashes.append(page_hash)
            # False when the same prefix is already cached under another page (two sequences
            # computed it concurrently); this page then stays private and is freed normally.
            self._prefix_cache.insert(seq.pages[index], page_hash, parent, seq.salt, page_tokens)
