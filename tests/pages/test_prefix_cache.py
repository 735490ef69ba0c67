"""Tests of page digests, hit confirmation and the LRU of unreferenced cached pages."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from jaxkv.pages import ROOT_HASH, PrefixCache

KEY = b"test-key"


def reference_hash(key: bytes, parent: bytes, salt: bytes, tokens: list[int]) -> bytes:
    payload = parent + len(salt).to_bytes(8, "little") + salt
    payload += b"".join(int(t).to_bytes(8, "little", signed=True) for t in tokens)
    return hashlib.blake2b(payload, key=key, digest_size=32).digest()


def cache_state(cache: PrefixCache) -> tuple:
    return tuple(cache.entries()), tuple(cache.evictable_pages())


def test_hash_matches_a_plain_blake2b_reference() -> None:
    cache = PrefixCache(3, KEY)
    digest = cache.hash_page(ROOT_HASH, b"salt", [1, 2, 3])
    assert len(digest) == 32
    assert digest == reference_hash(KEY, ROOT_HASH, b"salt", [1, 2, 3])
    assert cache.hash_page(ROOT_HASH, b"salt", np.array([1, 2, 3])) == digest


def test_hash_depends_on_every_input() -> None:
    cache = PrefixCache(2, KEY)
    base = cache.hash_page(ROOT_HASH, b"", [5, 6])
    assert cache.hash_page(ROOT_HASH, b"", [5, 6]) == base
    variants = [
        cache.hash_page(ROOT_HASH, b"", [6, 5]),
        cache.hash_page(base, b"", [5, 6]),  # other parent
        cache.hash_page(ROOT_HASH, b"a", [5, 6]),  # salt
        PrefixCache(2, b"other-key").hash_page(ROOT_HASH, b"", [5, 6]),
    ]
    assert len({base, *variants}) == 5


def test_hash_rejects_a_partial_page() -> None:
    cache = PrefixCache(4, KEY)
    with pytest.raises(ValueError, match="token_ids has 3 ids; a cached page holds exactly 4"):
        cache.hash_page(ROOT_HASH, b"", [1, 2, 3])


@pytest.mark.parametrize(
    ("page_size", "key", "match"),
    [(0, KEY, "page_size"), (2, b"", "hash_key"), (2, b"x" * 65, "hash_key"), (2, "s", "hash_key")],
)
def test_bad_constructor_arguments(page_size: int, key: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PrefixCache(page_size, key)  # type: ignore[arg-type]


def test_insert_then_match_confirms_contents_not_just_the_digest() -> None:
    cache = PrefixCache(2, KEY)
    digest = cache.hash_page(ROOT_HASH, b"", [1, 2])
    assert cache.insert(7, digest, ROOT_HASH, b"", [1, 2])
    assert cache.is_cached(7) and cache.num_cached == 1
    assert cache.match(digest, ROOT_HASH, b"", [1, 2]) == 7
    # Same digest presented with other contents (a forged collision): no hit.
    assert cache.match(digest, ROOT_HASH, b"", [1, 3]) is None
    assert cache.match(digest, digest, b"", [1, 2]) is None
    assert cache.match(digest, ROOT_HASH, b"x", [1, 2]) is None
    assert cache.match(b"\x01" * 32, ROOT_HASH, b"", [1, 2]) is None
    cache.check()


def test_insert_refuses_duplicates_without_changes() -> None:
    cache = PrefixCache(2, KEY)
    digest = cache.hash_page(ROOT_HASH, b"", [1, 2])
    cache.insert(0, digest, ROOT_HASH, b"", [1, 2])
    before = cache_state(cache)
    assert not cache.insert(1, digest, ROOT_HASH, b"", [1, 2])  # digest already cached
    other = cache.hash_page(ROOT_HASH, b"", [3, 4])
    assert not cache.insert(0, other, ROOT_HASH, b"", [3, 4])  # page already cached
    assert cache_state(cache) == before


def test_lru_evicts_least_recently_parked_and_forgets_the_digest() -> None:
    cache = PrefixCache(1, KEY)
    digests = {}
    for page in range(3):
        digests[page] = cache.hash_page(ROOT_HASH, b"", [page])
        cache.insert(page, digests[page], ROOT_HASH, b"", [page])
    for page in (2, 0, 1):
        cache.park(page)
    assert list(cache.evictable_pages()) == [2, 0, 1]
    cache.unpark(0)  # reused by a sequence
    assert cache.num_evictable == 2 and not cache.is_evictable(0)
    cache.park(0)  # released again: now the most recent
    assert cache.evict() == 2
    assert not cache.is_cached(2)
    assert cache.match(digests[2], ROOT_HASH, b"", [2]) is None
    assert list(cache.evictable_pages()) == [1, 0]
    assert cache.num_cached == 2
    cache.check()


def test_lru_error_paths_leave_state_unchanged() -> None:
    cache = PrefixCache(1, KEY)
    cache.insert(0, cache.hash_page(ROOT_HASH, b"", [0]), ROOT_HASH, b"", [0])
    cache.park(0)
    before = cache_state(cache)
    with pytest.raises(ValueError, match="page=1 is not cached"):
        cache.park(1)
    with pytest.raises(ValueError, match="page=0 is already evictable"):
        cache.park(0)
    with pytest.raises(ValueError, match="page=5 is not an evictable cached page"):
        cache.unpark(5)
    assert cache_state(cache) == before
    cache.evict()
    with pytest.raises(ValueError, match="no evictable cached page"):
        cache.evict()


def test_check_detects_a_digest_that_does_not_match_contents() -> None:
    cache = PrefixCache(2, KEY)
    digest = cache.hash_page(ROOT_HASH, b"", [1, 2])
    cache.insert(3, digest, ROOT_HASH, b"", [9, 9])  # wrong contents for this digest
    with pytest.raises(AssertionError, match="cached page 3: stored digest does not match"):
        cache.check()
