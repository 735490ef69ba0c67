"""The prefix cache: content hash -> page, and an LRU of unreferenced cached pages.

A FULL, computed page is identified by a keyed BLAKE2b digest (32 bytes) of

    parent_hash || len(salt) || salt || token ids (int64 little endian)

where `parent_hash` is the digest of the previous page of the same sequence (`ROOT_HASH` for the
first page) and `salt` is the request's cache salt (empty when none). Chaining makes a page's hash
stand for the whole prefix up to and including it; the salt keeps tenants apart; the per-manager
key makes digests unpredictable to a client, so one cannot craft a colliding prompt.

A hit is never trusted on the digest alone: `match` also compares the stored parent hash, salt and
token ids of the cached page with the ones asked for.

Data structures and their invariants (checked by `check`):

- `_entries: page -> CachedPage` and `_page_by_hash: digest -> page` are inverse maps of each other;
- every entry's digest equals `hash_page(parent_hash, salt, token_ids)` and it holds exactly
  `page_size` token ids;
- `_lru` (oldest first) holds exactly the cached pages nobody references (refcount 0); the manager
  parks a cached page there when its last holder lets go and unparks it on reuse. Eviction pops the
  oldest entry and forgets its digest.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from jaxkv.pages._ints import first_non_int, is_int, positive_int

HASH_SIZE = 32
"""Bytes in a page digest."""

ROOT_HASH = bytes(HASH_SIZE)
"""Parent digest of a sequence's first page."""

_INT64 = np.iinfo(np.int64)


def _digest(argument: str, value: object) -> bytes:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise TypeError(f"{argument} must be a {HASH_SIZE}-byte digest, got {value!r:.80}")
    return value


def _salt(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"salt must be bytes (b'' for none), got {value!r:.80}")
    return value


@dataclass(frozen=True)
class CachedPage:
    """What the prefix cache remembers about one full, computed page."""

    page: int
    page_hash: bytes
    parent_hash: bytes
    salt: bytes
    token_ids: tuple[int, ...]


def _page_id(page: object) -> int:
    if not is_int(page):
        raise TypeError(f"page must be an int page id, got {page!r}")
    if page < 0:
        raise ValueError(f"page={page} is negative; expected a page id >= 0")
    return int(page)


class PrefixCache:
    """Maps page-content digests to pages and keeps unreferenced cached pages in LRU order.

    Args:
        page_size: tokens per page (every cached page holds exactly this many).
        hash_key: BLAKE2b key, 1 to 64 bytes.

    Raises:
        ValueError: `page_size` is not an int >= 1, or `hash_key` is not 1 to 64 bytes.
    """

    def __init__(self, page_size: int, hash_key: bytes) -> None:
        page_size = positive_int("page_size", page_size)
        if not isinstance(hash_key, bytes) or not 1 <= len(hash_key) <= 64:
            raise ValueError(f"hash_key must be 1 to 64 bytes, got {hash_key!r:.40}")
        self._page_size = page_size
        self._hash_key = hash_key
        self._entries: dict[int, CachedPage] = {}
        self._page_by_hash: dict[bytes, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()

    # -- hashing ---------------------------------------------------------------------------------

    def hash_page(self, parent_hash: bytes, salt: bytes, token_ids: Sequence[int]) -> bytes:
        """Keyed BLAKE2b digest of one page chained to its parent.

        Args:
            parent_hash: the previous page's digest, or `ROOT_HASH` for the first page.
            salt: the request's cache salt (`b""` for none).
            token_ids: the page's `page_size` token ids (a sequence or a 1-D integer array of
                ints that fit int64).

        Raises:
            TypeError: a digest that is not `HASH_SIZE` bytes, a salt that is not bytes, token ids
                that are not a sequence of ints (bools and floats are not token ids).
            ValueError: not exactly `page_size` token ids, or one outside int64.
        """
        _digest("parent_hash", parent_hash)
        _salt(salt)
        tokens = self._page_tokens(token_ids)
        digest = hashlib.blake2b(key=self._hash_key, digest_size=HASH_SIZE)
        digest.update(parent_hash)
        digest.update(len(salt).to_bytes(8, "little"))
        digest.update(salt)
        digest.update(tokens.tobytes())
        return digest.digest()

    def _page_tokens(self, token_ids: object) -> np.ndarray:
        """One page's token ids as little-endian int64, never wrapped or truncated."""
        if isinstance(token_ids, np.ndarray):
            if token_ids.ndim != 1 or not (
                token_ids.size == 0 or np.issubdtype(token_ids.dtype, np.integer)
            ):
                raise TypeError(
                    f"token_ids must be a 1-D sequence of ints, got an array of shape "
                    f"{token_ids.shape} and dtype {token_ids.dtype}"
                )
        elif isinstance(token_ids, str | bytes) or not isinstance(token_ids, Sequence):
            raise TypeError(f"token_ids must be a sequence of ints, got {token_ids!r:.80}")
        else:
            bad = first_non_int(token_ids)
            if bad is not None:
                raise TypeError(f"token_ids[{bad}] must be an int, got {token_ids[bad]!r}")
        if len(token_ids) != self._page_size:
            raise ValueError(
                f"token_ids has {len(token_ids)} ids; a cached page holds exactly {self._page_size}"
            )
        if min(token_ids) < _INT64.min or max(token_ids) > _INT64.max:
            raise ValueError(f"token_ids holds an id outside int64: {token_ids!r:.200}")
        return np.asarray(token_ids, dtype="<i8")

    # -- lookup and insertion --------------------------------------------------------------------

    def match(
        self, page_hash: bytes, parent_hash: bytes, salt: bytes, token_ids: Sequence[int]
    ) -> int | None:
        """The cached page with this digest AND these exact contents, or None."""
        page = self._page_by_hash.get(page_hash)
        if page is None:
            return None
        entry = self._entries[page]
        if (
            entry.parent_hash != parent_hash
            or entry.salt != salt
            or entry.token_ids != tuple(token_ids)
        ):
            return None
        return page

    def insert(
        self,
        page: int,
        page_hash: bytes,
        parent_hash: bytes,
        salt: bytes,
        token_ids: Sequence[int],
    ) -> bool:
        """Register a full, computed, referenced page. Returns False (and changes nothing) when the
        digest is already cached under another page or the page is already cached.

        Raises:
            TypeError, ValueError: a malformed argument (as in `hash_page`; `page` must be an int
                >= 0); nothing is registered.
        """
        page = _page_id(page)
        _digest("page_hash", page_hash)
        _digest("parent_hash", parent_hash)
        _salt(salt)
        tokens = tuple(self._page_tokens(token_ids).tolist())
        if page_hash in self._page_by_hash or page in self._entries:
            return False
        self._entries[page] = CachedPage(page, page_hash, parent_hash, salt, tokens)
        self._page_by_hash[page_hash] = page
        return True

    def is_cached(self, page: int) -> bool:
        """Whether `page` holds a registered prefix."""
        return page in self._entries

    def entry(self, page: int) -> CachedPage:
        """The registered contents of a cached page."""
        return self._entries[page]

    def entries(self) -> Iterator[CachedPage]:
        """Every cached page, in insertion order."""
        return iter(self._entries.values())

    @property
    def num_cached(self) -> int:
        """Cached pages, referenced or not."""
        return len(self._entries)

    # -- LRU of unreferenced cached pages --------------------------------------------------------

    @property
    def num_evictable(self) -> int:
        """Cached pages nobody references (they can be evicted)."""
        return len(self._lru)

    def evictable_pages(self) -> Iterator[int]:
        """The LRU, least recently used first."""
        return iter(self._lru)

    def is_evictable(self, page: int) -> bool:
        """Whether `page` is cached and unreferenced."""
        return page in self._lru

    def park(self, page: int) -> None:
        """A cached page lost its last holder: make it the most recently used evictable page."""
        page = _page_id(page)
        if page not in self._entries:
            raise ValueError(f"page={page} is not cached; only cached pages can be parked")
        if page in self._lru:
            raise ValueError(f"page={page} is already evictable")
        self._lru[page] = None

    def unpark(self, page: int) -> None:
        """An evictable cached page is reused by a sequence: it is no longer evictable."""
        page = _page_id(page)
        if page not in self._lru:
            raise ValueError(f"page={page} is not an evictable cached page")
        del self._lru[page]

    def evict(self) -> int:
        """Forget the least recently used unreferenced cached page and return its id."""
        if not self._lru:
            raise ValueError("no evictable cached page")
        page, _ = self._lru.popitem(last=False)
        entry = self._entries.pop(page)
        del self._page_by_hash[entry.page_hash]
        return page

    def check(self) -> None:
        """Raise AssertionError if a prefix-cache invariant is broken."""
        if len(self._page_by_hash) != len(self._entries):
            raise AssertionError(
                f"{len(self._page_by_hash)} digests but {len(self._entries)} cached pages"
            )
        for page, entry in self._entries.items():
            if entry.page != page or self._page_by_hash.get(entry.page_hash) != page:
                raise AssertionError(f"cached page {page}: digest map does not point back to it")
            if len(entry.token_ids) != self._page_size:
                raise AssertionError(f"cached page {page} holds {len(entry.token_ids)} token ids")
            expected = self.hash_page(entry.parent_hash, entry.salt, entry.token_ids)
            if expected != entry.page_hash:
                raise AssertionError(f"cached page {page}: stored digest does not match contents")
        for page in self._lru:
            if page not in self._entries:
                raise AssertionError(f"evictable page {page} is not cached")
