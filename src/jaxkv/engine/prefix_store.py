"""Prefixes of the paged engine on disk: a prompt cache file (``Engine.load_prefix`` /
``Engine.save_prefix``, what ``jaxkv generate --prompt-cache`` uses) and a directory the prefix
cache spills evicted pages to and reads them back from (``CacheConfig(prefix_cache_dir=...)``,
``jaxkv serve --prefix-cache-dir``).

Both keep pages in ``jaxkv.io.save_cache`` files, fingerprinted with the model file's hash, the
tokenizer, the chat template, the layout version, dtype, KV codec and page size; both bring
pages back through ``PageManager.import_prefix``, so a loaded page is an ordinary cached prefix
page that normal prefix matching reuses (salts included), and a page that does not fit the pool
is simply not loaded.

How pages move between the pool and the host: a jitted gather copies the pages to save into a
small *staging* ``PagedCache`` of their own (``save_cache`` then writes from it), and a jitted
scatter with the pool donated writes loaded staging pages into their pool pages in place. Both
pad the page count to a power of two, so few shapes compile.

The directory (``PrefixDirectory``) holds one file per page, named by the page's prefix-cache
digest (``<digest hex>.jkv``): the digest chains the whole prefix up to the page and the
request's cache salt, so a page is found only by a prompt with the same prefix and salt
(tenants stay apart). The digests are keyed by ``prefix-cache.key``, a random secret kept in the
directory and mixed with the fingerprint: they stay the same across restarts of the same model
and differ for another one. Which digests are on disk, and their order of last use, is a plain
``OrderedDict`` rebuilt from the directory listing (by modification time) at start; the
directory is kept under ``max_bytes`` by removing the least recently used files. A file that
fails to load (damaged, truncated, another fingerprint) is logged, deleted and treated as a
miss.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv._sizes import next_power_of_two
from jaxkv.caches.paged import PagedCache
from jaxkv.errors import CacheFileError
from jaxkv.io.cache_store import (
    CacheFingerprint,
    hash_model_file,
    hash_tokens,
    load_cache,
    read_cache_info,
    save_cache,
    tokenizer_identity,
)

logger = logging.getLogger("jaxkv.engine.prefix_store")

PAGE_FIELDS = ("key_pages", "value_pages", "key_scales", "value_scales")
"""Arrays of a paged layer indexed by page (``None`` ones are skipped)."""

KEY_FILE = "prefix-cache.key"
"""The directory's secret: 32 random bytes as hex, keying the page digests."""

PAGE_SUFFIX = ".jkv"


# --------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------


def model_digest(model: Any) -> str:
    """The sha256 of what decides a model's keys and values: its GGUF file (``hash_model_file``,
    once per process), or, for a model built in memory (``Model.tiny``), its config and
    parameter bytes."""
    path = getattr(model, "path", "")
    if isinstance(path, str) and os.path.isfile(path):
        return hash_model_file(path)
    digest = hashlib.sha256(b"jaxkv.model-in-memory\0")
    digest.update(repr(model.config).encode("utf-8"))
    for leaf in jax.tree_util.tree_leaves(model.params):
        array = np.asarray(leaf)
        digest.update(f"{array.dtype.name}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return digest.hexdigest()


def prefix_fingerprint(model: Any, pool: PagedCache) -> CacheFingerprint:
    """The expected fingerprint (any tokens) of prefixes of ``model`` on a pool like ``pool``."""
    tokenizer = model.tokenizer
    return CacheFingerprint.create(
        pool,
        None,
        model_sha256=model_digest(model),
        tokenizer_id=tokenizer_identity(tokenizer),
        chat_template=getattr(tokenizer, "chat_template", None),
    )


# --------------------------------------------------------------------------------------------
# Pages between the pool and a staging cache
# --------------------------------------------------------------------------------------------


def _geometry(pool: PagedCache) -> Any:
    return next(view.metadata for view in pool.views if view is not None)


def staging_cache(pool: PagedCache, num_pages: int) -> PagedCache:
    """An empty ``PagedCache`` of ``num_pages`` pages with ``pool``'s configuration."""
    metadata = _geometry(pool).replace(num_pages=num_pages, max_pages_per_seq=num_pages)
    return PagedCache.init_cache(metadata, layers=[i for i, v in enumerate(pool.views) if v])


@functools.partial(jax.jit, static_argnames=("count",))
def _gather(pool: PagedCache, page_ids: jax.Array, *, count: int) -> PagedCache:
    """``count`` pages of ``pool`` (``page_ids: [count]`` int32) as a cache of their own."""
    views = []
    for view in pool.views:
        if view is None:
            views.append(None)
            continue
        metadata = view.metadata.replace(num_pages=count, max_pages_per_seq=count)
        fields = {
            name: getattr(view, name)[page_ids]
            for name in PAGE_FIELDS
            if getattr(view, name) is not None
        }
        views.append(dataclasses.replace(view, metadata=metadata, **fields))
    return pool.with_views(views)


@functools.partial(jax.jit, donate_argnums=(0,))
def _scatter(pool: PagedCache, staged: PagedCache, page_ids: jax.Array) -> PagedCache:
    """``pool`` with staging page ``i`` written into pool page ``page_ids[i]`` (``page_ids:
    [count]`` int32; an id past the pool writes nothing). ``pool`` is donated."""
    views = []
    for view, source in zip(pool.views, staged.views, strict=True):
        if view is None:
            views.append(None)
            continue
        fields = {
            name: getattr(view, name).at[page_ids].set(getattr(source, name), mode="drop")
            for name in PAGE_FIELDS
            if getattr(view, name) is not None
        }
        views.append(dataclasses.replace(view, **fields))
    return pool.with_views(views)


def gather_pages(pool: PagedCache, page_ids: Sequence[int]) -> PagedCache:
    """Pool pages ``page_ids`` (in order) copied into a staging cache of a power-of-two number
    of pages (the extra ones are copies of page ``0``)."""
    count = next_power_of_two(max(len(page_ids), 1))
    ids = np.zeros(count, np.int32)
    ids[: len(page_ids)] = page_ids
    return _gather(pool, jnp.asarray(ids), count=count)


def scatter_pages(pool: PagedCache, staged: PagedCache, targets: Sequence[int]) -> PagedCache:
    """``pool`` (donated) with staging page ``i`` written into pool page ``targets[i]``, for
    ``i < len(targets)``; ``-1`` skips a staging page."""
    geometry = _geometry(pool)
    count = _geometry(staged).num_pages
    ids = np.full(count, geometry.num_pages, np.int32)  # past the pool: dropped
    chosen = np.asarray(targets, np.int64)
    ids[: chosen.size] = np.where(chosen >= 0, chosen, geometry.num_pages)
    return _scatter(pool, staged, jnp.asarray(ids))


def _load_staged(path: str, fingerprint: CacheFingerprint, pool: PagedCache, num_pages: int):
    """The pages of the file at ``path`` in a fresh staging cache (raises what ``load_cache``
    raises)."""
    staged = staging_cache(pool, next_power_of_two(max(num_pages, 1)))
    return load_cache(path, fingerprint, staged, pages=list(range(num_pages))).cache


# --------------------------------------------------------------------------------------------
# A prompt cache file
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PrefixFile:
    """What ``Engine.load_prefix`` / ``Engine.save_prefix`` did.

    Attributes:
        path: the file.
        saved_tokens: tokens the file holds (full pages).
        cached_tokens: tokens of the prompt now cached in the pool from it (load: the longest
            saved prefix of the prompt that fits, in whole pages; save: what was written).
    """

    path: str
    saved_tokens: int
    cached_tokens: int


def load_prefix_file(
    backend: Any,
    fingerprint: CacheFingerprint,
    path: str,
    prompt_ids: Sequence[int] | None,
    cache_salt: str | None,
) -> PrefixFile:
    """Load the pages the file at ``path`` shares with ``prompt_ids`` (all of them for
    ``None``) into ``backend``'s pool as cached prefix pages; see ``Engine.load_prefix``."""
    info = read_cache_info(path)
    differences = info.fingerprint.differences(fingerprint)
    if differences:
        from jaxkv.errors import FingerprintMismatchError

        raise FingerprintMismatchError(path, differences)
    saved = list(info.token_ids)
    size = backend.page_size
    usable = len(saved) // size
    if prompt_ids is not None:
        common = 0
        for mine, theirs in zip(prompt_ids, saved, strict=False):
            if mine != theirs:
                break
            common += 1
        usable = min(usable, common // size)
    if usable == 0:
        return PrefixFile(path, len(saved), 0)
    staged = _load_staged(path, fingerprint, backend.cache, info.num_pages)

    def write(indices: list[int], page_ids: list[int]) -> None:
        backend.spill_evictions()
        targets = [-1] * info.num_pages
        for index, page in zip(indices, page_ids, strict=True):
            targets[index] = page
        backend.cache = scatter_pages(backend.cache, staged, targets)

    cached = backend.manager.import_prefix(saved[: usable * size], write, cache_salt=cache_salt)
    return PrefixFile(path, len(saved), cached)


def save_prefix_file(
    backend: Any,
    fingerprint: CacheFingerprint,
    path: str,
    prompt_ids: Sequence[int],
    cache_salt: str | None,
) -> PrefixFile:
    """Save the cached full pages ``prompt_ids`` starts with to ``path``; see
    ``Engine.save_prefix``."""
    pages = backend.manager.cached_prefix(prompt_ids, cache_salt=cache_salt)
    tokens = [int(t) for t in prompt_ids[: len(pages) * backend.page_size]]
    if not pages:
        return PrefixFile(path, 0, 0)
    staged = gather_pages(backend.cache, pages)
    save_cache(
        path,
        staged,
        tokens,
        fingerprint.replace(tokens_sha256=hash_tokens(tokens)),
        pages=list(range(len(pages))),
    )
    return PrefixFile(path, len(tokens), len(tokens))


# --------------------------------------------------------------------------------------------
# A prompt cache file on the contiguous backend
# --------------------------------------------------------------------------------------------


def _common_length(first: Sequence[int], second: Sequence[int]) -> int:
    length = 0
    for mine, theirs in zip(first, second, strict=False):
        if mine != theirs:
            break
        length += 1
    return length


@dataclasses.dataclass(frozen=True)
class RowPrefix:
    """A saved prompt held on the contiguous backend: ``row`` is a one-row cache of the
    backend's configuration holding the KV of ``token_ids``; a sequence admitted with the same
    ``salt`` whose prompt shares a prefix with them starts from a copy of the row cut to that
    prefix."""

    token_ids: tuple[int, ...]
    salt: str | None
    row: Any

    def reusable(self, tokens: Sequence[int], salt: str | None) -> int:
        """Tokens of a prompt ``tokens`` the row can stand for (never its last one: its
        logits are drawn from)."""
        if salt != self.salt:
            return 0
        return min(_common_length(tokens, self.token_ids), len(tokens) - 1)

    def take(self, tokens: Sequence[int], salt: str | None) -> tuple[int, Any]:
        """``(reused tokens, one-row cache holding them)`` for a prompt ``tokens``, or ``(0,
        None)``. A family that cannot roll a row back (recurrent state) reuses only the whole
        saved prompt."""
        length = self.reusable(tokens, salt)
        if length == 0:
            return 0, None
        if length == len(self.token_ids):
            return length, self.row
        try:
            return length, self.row.truncate(jnp.asarray([length], jnp.int32))
        except (NotImplementedError, ValueError):
            return 0, None


def load_row_prefix(
    backend: Any,
    fingerprint: CacheFingerprint,
    path: str,
    prompt_ids: Sequence[int] | None,
    cache_salt: str | None,
) -> PrefixFile:
    """Hold the one-row file at ``path`` on the contiguous ``backend`` for the sequences it
    admits next; see ``Engine.load_prefix``."""
    info = read_cache_info(path)
    differences = info.fingerprint.differences(fingerprint)
    if differences:
        from jaxkv.errors import FingerprintMismatchError

        raise FingerprintMismatchError(path, differences)
    saved = info.token_ids
    common = len(saved) if prompt_ids is None else _common_length(prompt_ids, saved)
    if common == 0:
        return PrefixFile(path, len(saved), 0)
    row = load_cache(path, fingerprint, backend.empty_row(), rows=0).cache
    backend.row_prefix = RowPrefix(tuple(saved), cache_salt, row)
    return PrefixFile(path, len(saved), common)


def save_row_prefix(
    backend: Any,
    fingerprint: CacheFingerprint,
    path: str,
    prompt_ids: Sequence[int],
    cache_salt: str | None,
) -> PrefixFile:
    """Save the row of the contiguous ``backend`` that holds ``prompt_ids`` (a running
    sequence's, or one just released) cut to the prompt; see ``Engine.save_prefix``."""
    prompt = [int(t) for t in prompt_ids]
    slot = backend.row_holding(prompt)
    if slot is None:
        return PrefixFile(path, 0, 0)
    row = backend.cache.extract(slot).truncate(jnp.asarray([len(prompt)], jnp.int32))
    save_cache(path, row, prompt, fingerprint.replace(tokens_sha256=hash_tokens(prompt)), rows=0)
    return PrefixFile(path, len(prompt), len(prompt))


# --------------------------------------------------------------------------------------------
# A directory of spilled pages
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DirectoryCounters:
    """What a ``PrefixDirectory`` did since it was opened."""

    spilled_pages: int = 0
    loaded_pages: int = 0
    dropped_files: int = 0
    write_errors: int = 0


def directory_stats(directory: PrefixDirectory | None, page_size: int) -> dict[str, int]:
    """The ``EngineStats`` fields of a directory (zeros without one)."""
    if directory is None:
        return {}
    counters = directory.counters
    return {
        "prefix_disk_hit_tokens": counters.loaded_pages * page_size,
        "prefix_spilled_pages": counters.spilled_pages,
        "prefix_dir_files": directory.num_files,
        "prefix_dir_bytes": directory.num_bytes,
    }


class PrefixDirectory:
    """Prefix-cache pages kept in ``directory``, one file per page digest, at most
    ``max_bytes`` of them (least recently used removed first).

    Args:
        directory: created if missing.
        max_bytes: bound of the page files' total size.
        fingerprint: the expected fingerprint (any tokens) of the engine's prefixes.

    Raises:
        OSError: the directory cannot be created or its key cannot be written.
    """

    def __init__(self, directory: str, max_bytes: int, fingerprint: CacheFingerprint):
        if not isinstance(directory, str | os.PathLike) or not os.fspath(directory):
            raise TypeError(f"PrefixDirectory: directory must be a path, got {directory!r}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"PrefixDirectory: max_bytes must be an int >= 1, got {max_bytes!r}")
        self.directory = os.fspath(directory)
        self.max_bytes = max_bytes
        self.fingerprint = fingerprint
        self.counters = DirectoryCounters()
        os.makedirs(self.directory, exist_ok=True)
        secret = self._secret()
        identity = json.dumps(fingerprint.to_dict(), sort_keys=True).encode("utf-8")
        self.hash_key = hashlib.blake2b(identity, key=secret, digest_size=32).digest()
        # digest hex -> file bytes, least recently used first.
        self._files: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._scan()
        self._trim()

    # -- bookkeeping ---------------------------------------------------------------------------

    def _secret(self) -> bytes:
        path = os.path.join(self.directory, KEY_FILE)
        with contextlib.suppress(FileNotFoundError):
            with open(path, encoding="ascii", errors="replace") as file:
                text = file.read().strip()
            with contextlib.suppress(ValueError):
                secret = bytes.fromhex(text)
                if len(secret) == 32:
                    return secret
            logger.warning("%s: malformed prefix-cache key; starting a new one", path)
        secret = secrets.token_bytes(32)
        temporary = f"{path}.{secrets.token_hex(4)}.partial"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="ascii") as file:
            file.write(secret.hex() + "\n")
        os.replace(temporary, path)
        return secret

    def _scan(self) -> None:
        found = []
        for entry in os.scandir(self.directory):
            name = entry.name
            if name.endswith(".partial") and name.startswith("."):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)  # a write that died half way
                continue
            stem = name[: -len(PAGE_SUFFIX)]
            if not name.endswith(PAGE_SUFFIX) or len(stem) != 64 or not entry.is_file():
                continue
            with contextlib.suppress(OSError):
                status = entry.stat()
                found.append((status.st_mtime_ns, stem, status.st_size))
        for _, stem, size in sorted(found):
            self._files[stem] = size

    def _path(self, digest_hex: str) -> str:
        return os.path.join(self.directory, digest_hex + PAGE_SUFFIX)

    def _drop(self, digest_hex: str, reason: str | None = None) -> None:
        self._files.pop(digest_hex, None)
        if reason is not None:
            logger.warning("%s: %s; deleted", self._path(digest_hex), reason)
            self.counters.dropped_files += 1
        with contextlib.suppress(OSError):
            os.unlink(self._path(digest_hex))

    def _trim(self) -> None:
        while self._files and self.num_bytes > self.max_bytes:
            self._drop(next(iter(self._files)))

    def _touch(self, digest_hex: str) -> None:
        self._files.move_to_end(digest_hex)
        with contextlib.suppress(OSError):
            os.utime(self._path(digest_hex))  # the order of use survives a restart

    @property
    def num_files(self) -> int:
        """Page files on disk."""
        return len(self._files)

    @property
    def num_bytes(self) -> int:
        """Their total size."""
        return sum(self._files.values())

    def __contains__(self, page_hash: object) -> bool:
        return isinstance(page_hash, bytes) and page_hash.hex() in self._files

    # -- pages out and in ----------------------------------------------------------------------

    def spill(self, pool: PagedCache, entries: Sequence[Any]) -> int:
        """Write the cached pages ``entries`` (``jaxkv.pages.CachedPage``: digest, tokens, pool
        page, whose contents ``pool`` still holds) to disk, those not there already; returns how
        many were written. A write that fails is logged and skipped."""
        fresh = []
        for entry in entries:
            name = entry.page_hash.hex()
            if name in self._files:
                self._touch(name)
            elif all(entry.page_hash != other.page_hash for other in fresh):
                fresh.append(entry)
        if not fresh:
            return 0
        staged = gather_pages(pool, [entry.page for entry in fresh])
        written = 0
        for index, entry in enumerate(fresh):
            name = entry.page_hash.hex()
            tokens = list(entry.token_ids)
            try:
                save_cache(
                    self._path(name),
                    staged,
                    tokens,
                    self.fingerprint.replace(tokens_sha256=hash_tokens(tokens)),
                    pages=[index],
                )
                self._files[name] = os.path.getsize(self._path(name))
            except OSError as error:
                logger.warning("%s: cannot write a page (%s)", self._path(name), error)
                self.counters.write_errors += 1
                continue
            written += 1
        self.counters.spilled_pages += written
        self._trim()
        return written

    def restore(
        self,
        backend: Any,
        token_ids: Sequence[int],
        page_hashes: Sequence[bytes],
        first: int,
        cache_salt: str | None,
    ) -> int:
        """Bring back from disk the run of pages ``first, first + 1, ...`` of ``token_ids``
        (whose digests are ``page_hashes``) that the directory holds, into ``backend``'s pool
        as cached prefix pages; returns the pages loaded."""
        size = backend.page_size
        run = []
        for index in range(first, len(page_hashes)):
            if page_hashes[index].hex() not in self._files:
                break
            run.append(index)
        if not run:
            return 0
        staged = staging_cache(backend.cache, next_power_of_two(len(run)))
        loaded = 0
        for slot, index in enumerate(run):
            name = page_hashes[index].hex()
            tokens = list(token_ids[index * size : (index + 1) * size])
            expected = self.fingerprint.replace(tokens_sha256=hash_tokens(tokens))
            try:
                page = load_cache(self._path(name), expected, staging_cache(backend.cache, 1),
                                  pages=[0]).cache  # fmt: skip
            except (CacheFileError, OSError) as error:
                self._drop(name, f"unusable prefix-cache page ({error})")
                break
            staged = _place(staged, page, slot)
            self._touch(name)
            loaded += 1
        if not loaded:
            return 0
        end = run[loaded - 1] + 1

        def write(indices: list[int], page_ids: list[int]) -> None:
            backend.spill_evictions()
            targets = [-1] * staged_pages(staged)
            for index, page in zip(indices, page_ids, strict=True):
                targets[index - first] = page
            backend.cache = scatter_pages(backend.cache, staged, targets)

        cached = backend.manager.import_prefix(
            token_ids[: end * size], write, cache_salt=cache_salt
        )
        restored = max(0, cached // size - first)
        self.counters.loaded_pages += restored
        return restored


def staged_pages(staged: PagedCache) -> int:
    """Pages of a staging cache."""
    return _geometry(staged).num_pages


@jax.jit
def _place_jit(staged: PagedCache, page: PagedCache, slot: jax.Array) -> PagedCache:
    views = []
    for view, source in zip(staged.views, page.views, strict=True):
        if view is None:
            views.append(None)
            continue
        fields = {
            name: jax.lax.dynamic_update_index_in_dim(
                getattr(view, name), getattr(source, name)[0], slot, 0
            )
            for name in PAGE_FIELDS
            if getattr(view, name) is not None
        }
        views.append(dataclasses.replace(view, **fields))
    return staged.with_views(views)


def _place(staged: PagedCache, page: PagedCache, slot: int) -> PagedCache:
    """``staged`` with its page ``slot`` set to the one page of ``page``."""
    return _place_jit(staged, page, jnp.asarray(slot, jnp.int32))
