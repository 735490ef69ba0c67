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

The directory (``PrefixDirectory``) holds one file per *chain* of pages spilled together
(consecutive pages of one prefix; a file per page would make a long prefix slow to read back),
each page named by its prefix-cache digest: the digest chains the whole prefix up to the page
and the request's cache salt, so a page is found only by a prompt with the same prefix and salt
(tenants stay apart). The digests are keyed by ``prefix-cache.key``, a random secret kept in the
directory and mixed with the fingerprint: they stay the same across restarts of the same model
and differ for another one. Which digests are on disk, in which file, and the files' order of
last use are plain dicts rebuilt from the directory listing (by modification time) at start; the
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
from jaxkv.errors import CacheFileError, FingerprintMismatchError
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


_TOKENIZER_IDS: dict[int, tuple[Any, str]] = {}


def _tokenizer_id(tokenizer: Any) -> str:
    """``tokenizer_identity``, once per tokenizer object (it reads the whole vocabulary)."""
    known = _TOKENIZER_IDS.get(id(tokenizer))
    if known is None or known[0] is not tokenizer:
        known = (tokenizer, tokenizer_identity(tokenizer))  # holding it keeps its id unique
        _TOKENIZER_IDS[id(tokenizer)] = known
    return known[1]


def prefix_fingerprint(model: Any, pool: Any) -> CacheFingerprint:
    """The expected fingerprint (any tokens) of prefixes of ``model`` in a cache like ``pool``
    (the paged pool, or the contiguous rows)."""
    tokenizer = model.tokenizer
    return CacheFingerprint.create(
        pool,
        None,
        model_sha256=model_digest(model),
        tokenizer_id=_tokenizer_id(tokenizer),
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


def concatenate_pages(pages: Sequence[PagedCache], num_pages: int) -> PagedCache:
    """Staging caches ``pages`` one after another in a staging cache of ``num_pages`` pages (at
    least their total; the rest zero)."""
    first = pages[0]
    total = sum(_geometry(page).num_pages for page in pages)
    views = []
    for layer, view in enumerate(first.views):
        if view is None:
            views.append(None)
            continue
        fields = {}
        for name in PAGE_FIELDS:
            if getattr(view, name) is None:
                continue
            parts = [getattr(page.views[layer], name) for page in pages]
            if num_pages > total:
                shape = (num_pages - total, *parts[0].shape[1:])
                parts.append(jnp.zeros(shape, parts[0].dtype))
            fields[name] = jnp.concatenate(parts)
        metadata = view.metadata.replace(num_pages=num_pages, max_pages_per_seq=num_pages)
        views.append(dataclasses.replace(view, metadata=metadata, **fields))
    return first.with_views(views)


def _load_staged(path: str, fingerprint: CacheFingerprint, pool: PagedCache, num_pages: int):
    """The ``num_pages`` pages of the file at ``path`` as a staging cache of their own (raises
    what ``load_cache`` raises)."""
    staged = staging_cache(pool, num_pages)
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


def _matching_info(path: str, fingerprint: CacheFingerprint) -> Any:
    """``read_cache_info(path)``, refused (``FingerprintMismatchError``) unless the file was
    saved with ``fingerprint`` (any tokens)."""
    info = read_cache_info(path)
    differences = info.fingerprint.differences(fingerprint)
    if differences:
        raise FingerprintMismatchError(path, differences)
    return info


def load_prefix_file(
    backend: Any,
    fingerprint: CacheFingerprint,
    path: str,
    prompt_ids: Sequence[int] | None,
    cache_salt: str | None,
) -> PrefixFile:
    """Load the pages the file at ``path`` shares with ``prompt_ids`` (all of them for
    ``None``) into ``backend``'s pool as cached prefix pages; see ``Engine.load_prefix``."""
    info = _matching_info(path, fingerprint)
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
    info = _matching_info(path, fingerprint)
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
    """Save the row of the contiguous ``backend`` that holds ``prompt_ids`` (that of a finished
    request, which keeps its KV until the slot is reused) cut to the prompt; see
    ``Engine.save_prefix``."""
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
    """Prefix-cache pages kept in ``directory``, at most ``max_bytes`` of them (least recently
    used files removed first).

    A file holds a *chain*: consecutive pages of one prefix, spilled or persisted together
    (``<digest of its last page>.jkv``, a ``save_cache`` file of their tokens), and a sidecar
    ``<same>.pages`` lists the pages' digests in order (written first, so a file is never
    without it). Invariants: ``_where[digest] = (stem, position)`` points into ``_chains[stem]``
    at that digest; every stem of ``_chains`` is in ``_files`` (its bytes, least recently used
    first) and on disk.

    Args:
        directory: created if missing.
        max_bytes: bound of the files' total size.
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
        self._files: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._chains: dict[str, tuple[str, ...]] = {}
        self._where: dict[str, tuple[str, int]] = {}
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
            if name.endswith(".partial"):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)  # a write that died half way
                continue
            stem = name[: -len(PAGE_SUFFIX)]
            if not name.endswith(PAGE_SUFFIX) or len(stem) != 64 or not entry.is_file():
                continue
            digests = self._read_sidecar(stem)
            if digests is None:
                self._remove_files(stem, "a page file without its list of pages")
                continue
            with contextlib.suppress(OSError):
                status = entry.stat()
                sidecar = os.path.getsize(self._sidecar(stem))
                found.append((status.st_mtime_ns, stem, status.st_size + sidecar, digests))
        for _, stem, size, digests in sorted(found):
            self._register(stem, size, digests)
        for entry in os.scandir(self.directory):
            stem = entry.name[: -len(".pages")]
            if entry.name.endswith(".pages") and stem not in self._files:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)  # its page file was never written

    def _read_sidecar(self, stem: str) -> tuple[str, ...] | None:
        try:
            with open(self._sidecar(stem), encoding="ascii") as file:
                digests = tuple(line.strip() for line in file if line.strip())
        except (OSError, UnicodeDecodeError):
            return None
        valid = digests and digests[-1] == stem
        valid = valid and all(len(d) == 64 and set(d) <= set("0123456789abcdef") for d in digests)
        return digests if valid else None

    def _path(self, stem: str) -> str:
        return os.path.join(self.directory, stem + PAGE_SUFFIX)

    def _sidecar(self, stem: str) -> str:
        return os.path.join(self.directory, stem + ".pages")

    def _register(self, stem: str, size: int, digests: tuple[str, ...]) -> None:
        self._files[stem] = size
        self._chains[stem] = digests
        for position, digest in enumerate(digests):
            self._where[digest] = (stem, position)

    def _remove_files(self, stem: str, reason: str | None = None) -> None:
        if reason is not None:
            logger.warning("%s: %s; deleted", self._path(stem), reason)
            self.counters.dropped_files += 1
        for path in (self._path(stem), self._sidecar(stem)):
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _drop(self, stem: str, reason: str | None = None) -> None:
        self._files.pop(stem, None)
        for digest in self._chains.pop(stem, ()):
            if self._where.get(digest, (None,))[0] == stem:
                del self._where[digest]
        self._remove_files(stem, reason)

    def _trim(self) -> None:
        while self._files and self.num_bytes > self.max_bytes:
            self._drop(next(iter(self._files)))

    def _touch(self, stem: str) -> None:
        self._files.move_to_end(stem)
        with contextlib.suppress(OSError):
            os.utime(self._path(stem))  # the order of use survives a restart

    @property
    def num_files(self) -> int:
        """Chain files on disk."""
        return len(self._files)

    @property
    def num_pages(self) -> int:
        """Pages on disk."""
        return len(self._where)

    @property
    def num_bytes(self) -> int:
        """The files' total size."""
        return sum(self._files.values())

    def __contains__(self, page_hash: object) -> bool:
        return isinstance(page_hash, bytes) and page_hash.hex() in self._where

    # -- pages out -----------------------------------------------------------------------------

    def spill(self, pool: PagedCache, entries: Sequence[Any]) -> int:
        """Write the cached pages ``entries`` (``jaxkv.pages.CachedPage``: digest, parent
        digest, tokens, pool page, whose contents ``pool`` still holds) not on disk yet, one
        file per chain of them; returns the pages written. A write that fails is logged and
        skipped."""
        fresh: dict[bytes, Any] = {}
        for entry in entries:
            where = self._where.get(entry.page_hash.hex())
            if where is not None:
                self._touch(where[0])
            else:
                fresh.setdefault(entry.page_hash, entry)
        if not fresh:
            return 0
        chains = _chains_of(list(fresh.values()))
        staged = gather_pages(pool, [entry.page for chain in chains for entry in chain])
        written, start = 0, 0
        for chain in chains:
            slots = list(range(start, start + len(chain)))
            start += len(chain)
            if self._write_chain(staged, chain, slots):
                written += len(chain)
        self.counters.spilled_pages += written
        self._trim()
        return written

    def _write_chain(self, staged: PagedCache, chain: list[Any], slots: list[int]) -> bool:
        stem = chain[-1].page_hash.hex()
        digests = tuple(entry.page_hash.hex() for entry in chain)
        tokens = [token for entry in chain for token in entry.token_ids]
        try:
            temporary = f"{self._sidecar(stem)}.{secrets.token_hex(4)}.partial"
            with open(temporary, "w", encoding="ascii") as file:
                file.write("\n".join(digests) + "\n")
            os.replace(temporary, self._sidecar(stem))
            save_cache(
                self._path(stem),
                staged,
                tokens,
                self.fingerprint.replace(tokens_sha256=hash_tokens(tokens)),
                pages=slots,
            )
            size = os.path.getsize(self._path(stem)) + os.path.getsize(self._sidecar(stem))
        except OSError as error:
            logger.warning("%s: cannot write pages (%s)", self._path(stem), error)
            self.counters.write_errors += 1
            self._remove_files(stem)
            return False
        self._register(stem, size, digests)
        return True

    # -- pages in ------------------------------------------------------------------------------

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
        wanted = [digest.hex() for digest in page_hashes]
        groups = []  # (staging cache, first prefix page it serves, its position there, pages)
        index = first
        while index < len(wanted) and wanted[index] in self._where:
            stem, position = self._where[wanted[index]]
            chain = self._chains[stem]
            count = 0
            while (
                position + count < len(chain)
                and index + count < len(wanted)
                and chain[position + count] == wanted[index + count]
            ):
                count += 1
            try:
                loaded = load_cache(
                    self._path(stem),
                    self.fingerprint,
                    staging_cache(backend.cache, len(chain)),
                    pages=list(range(len(chain))),
                )
            except (CacheFileError, OSError) as error:
                self._drop(stem, f"unusable prefix-cache pages ({error})")
                break
            saved = loaded.token_ids[position * size : (position + count) * size]
            if list(saved) != list(token_ids[index * size : (index + count) * size]):
                self._drop(stem, "its tokens are not those its digests name")
                break
            staged = concatenate_pages([loaded.cache], next_power_of_two(len(chain)))
            groups.append((staged, index, position, count))
            self._touch(stem)
            index += count
        if not groups:
            return 0

        def write(indices: list[int], page_ids: list[int]) -> None:
            backend.spill_evictions()
            for staged, start, position, count in groups:
                targets = [-1] * staged_pages(staged)
                for prefix_index, page in zip(indices, page_ids, strict=True):
                    if start <= prefix_index < start + count:
                        targets[position + prefix_index - start] = page
                backend.cache = scatter_pages(backend.cache, staged, targets)

        cached = backend.manager.import_prefix(
            token_ids[: index * size], write, cache_salt=cache_salt
        )
        restored = max(0, cached // size - first)
        self.counters.loaded_pages += restored
        return restored


def _chains_of(entries: list[Any]) -> list[list[Any]]:
    """``entries`` (cached pages) as chains, each page followed by its child when the child is
    among them; every entry in exactly one chain."""
    by_hash = {entry.page_hash: entry for entry in entries}
    children: dict[bytes, list[Any]] = collections.defaultdict(list)
    for entry in entries:
        if entry.parent_hash in by_hash:
            children[entry.parent_hash].append(entry)
    used: set[bytes] = set()
    chains = []

    def walk(start: Any) -> None:
        chain = [start]
        used.add(start.page_hash)
        while True:
            following = [c for c in children[chain[-1].page_hash] if c.page_hash not in used]
            if not following:
                break
            chain.append(following[0])
            used.add(following[0].page_hash)
        chains.append(chain)

    for entry in entries:
        if entry.parent_hash not in by_hash and entry.page_hash not in used:
            walk(entry)
    for entry in entries:
        if entry.page_hash not in used:
            walk(entry)
    return chains


def staged_pages(staged: PagedCache) -> int:
    """Pages of a staging cache."""
    return _geometry(staged).num_pages
