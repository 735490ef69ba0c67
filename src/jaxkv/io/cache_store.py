"""Caches on disk: save the sequences a cache holds to a safetensors file, with a fingerprint of
everything that makes them reusable, and load them back bit for bit into a cache.

The unit is the *sequence*. A file holds one sequence (what a prompt cache needs: a saved prefix
joins a batch slot or fresh pages later) or several rows of a cache (the whole cache, with
``rows=None``). What is saved follows the family of each layer:

=========================  ==================================================================
layer                      saved per sequence
=========================  ==================================================================
contiguous                 ``keys``/``values`` (and scales) of the row's first tokens, ``lengths``
sliding-window ring        the row's whole ring: ``keys``/``values`` (and scales), ``positions``,
                           ``lengths``
paged                      the pages of the sequence's page table (``key_pages``/``value_pages``
                           and scales), in table order
Mamba, Mamba2, linear      the row's states (``conv_state``, ``ssm_state`` / ``state``),
                           ``lengths``
=========================  ==================================================================

A hybrid cache saves each layer by its family (the paged backend: rows for the recurrent layers,
pages for the attention layers). Loading writes the saved rows into rows of a target cache
(``rows``) and the saved pages into pages of a target pool (``pages``, e.g. just allocated by a
``jaxkv.pages.PageManager``); the target must have the file's configuration except its number of
rows, its capacity (``max_length``; a ring's slots must match) and its pool size. Arrays come back
bit-identical; a contiguous row's slots past the saved tokens are zeroed, overflow flags clear.
A ring or recurrent layer with ``rollback_depth`` also saves its rollback checkpoints and
``rollback_floor`` per row, so a loaded row can roll back as far as the saved one could (the
target's ``rollback_depth`` must match the file's; files of caches without it load as before).

The engine restores a saved prompt into a paged cache like this (a page id of ``-1`` in
``pages`` keeps the target's page: here the full pages a prefix-cache hit already holds)::

    info = read_cache_info(path)                        # fingerprint, tokens, page count
    hit = manager.add_sequence(seq_id, info.token_ids)  # prefix-cache hits: whole pages
    step = manager.schedule([(seq_id, len(info.token_ids) - hit)])   # allocates the rest
    held = manager.get_sequence(seq_id).page_ids
    pages = [-1] * (hit // page_size) + list(held[hit // page_size :])
    loaded = load_cache(path, expected, cache, pages=pages)
    manager.commit_step(step)                           # the load stood in for the step

File layout (``CACHE_LAYOUT_VERSION`` 2). A safetensors file whose tensors are named
``layer.{i}.{field}`` (as the view names its arrays), ``tokens`` (int32, every sequence's ids one
after another) and, with paged layers, ``page_table`` (int32, the source page ids). Its string
metadata (the safetensors ``__metadata__``) holds:

* ``format``: ``"jaxkv.cache"``;
* ``layout_version``: ``"2"`` (read first: a newer file is refused before anything else; an
  older one is refused by the fingerprint check, since its ``layout_version`` differs: version 1
  stored paged pools ``[pages, page_size, kv_heads, dim]``, version 2 stores them as the pool
  holds them, ``[pages, kv_heads, page_size, dim]``);
* ``header``: canonical JSON with ``layout_version``, ``fingerprint`` (the ``CacheFingerprint``),
  ``cache`` (cache class, and the ``HybridCacheMetadata`` JSON for a hybrid cache),
  ``layers`` (per layer: view class, metadata class and JSON, ``{field: axis}`` saved, or
  ``null``), ``sequences`` (token count per sequence, source rows), ``pages`` (page size, count,
  or ``null``) and ``tensors`` (per tensor: true dtype, stored dtype, shape, sha256);
* ``header_sha256``: sha256 of ``format + "\\n" + layout_version + "\\n" + header``.

Dtypes that safetensors readers may not know (bfloat16, float8, ...; see ``ml_dtypes``) are
stored as unsigned words of the same width, the true dtype in the header. Nothing is pickled.

Writes are atomic: the file is written to a temporary file in the same directory, flushed to
disk and moved onto ``path`` with ``os.replace``; a failed write leaves ``path`` as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import stat
import tempfile
import threading
from collections.abc import Sequence
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv import _validation as v
from jaxkv._sizes import ceil_div
from jaxkv.abstracts import BaseCache
from jaxkv.caches import (
    HybridCache,
    HybridCacheMetadata,
    LinearAttentionCacheMetadata,
    LinearAttentionCacheView,
    Mamba2CacheMetadata,
    Mamba2CacheView,
    MambaCacheMetadata,
    MambaCacheView,
    PagedCache,
    PagedCacheMetadata,
    PagedCacheView,
    RecurrentCache,
    TransformerCache,
    TransformerCacheMetadata,
    TransformerCacheView,
)
from jaxkv.errors import (
    CacheFileCorruptedError,
    CacheFileVersionError,
    CacheTargetMismatchError,
    FingerprintMismatchError,
)

CACHE_LAYOUT_VERSION = 2
"""Version of the file layout this module writes, and the newest it reads (a fingerprint
carries it, so a file of another version never loads into a cache of this one)."""

FILE_FORMAT = "jaxkv.cache"
"""The ``format`` entry of every cache file's metadata."""

MAX_TOKEN_ID = 2**31 - 1
"""Token ids are stored as int32."""

_CACHE_TYPES = (TransformerCache, PagedCache, RecurrentCache, HybridCache)
_ROW_VIEW_TYPES = (TransformerCacheView, MambaCacheView, Mamba2CacheView, LinearAttentionCacheView)
_METADATA_TYPES = {
    cls.__name__: cls
    for cls in (
        TransformerCacheMetadata,
        PagedCacheMetadata,
        MambaCacheMetadata,
        Mamba2CacheMetadata,
        LinearAttentionCacheMetadata,
        HybridCacheMetadata,
    )
}

# Metadata fields a target may choose freely: its rows, its capacity and its pool size (a
# ring's slots are checked on their own). The number of layers is the cache's, checked once.
_FREE_FIELDS = {
    TransformerCacheMetadata: {"batch_size", "max_length", "num_layers"},
    PagedCacheMetadata: {"batch_size", "num_pages", "max_pages_per_seq", "num_layers"},
    MambaCacheMetadata: {"batch_size", "num_layers"},
    Mamba2CacheMetadata: {"batch_size", "num_layers"},
    LinearAttentionCacheMetadata: {"batch_size", "num_layers"},
}

# How a saved field is indexed: whole rows, a contiguous row's first tokens, or pages.
_ROW, _ROW_TOKENS, _PAGE = "row", "row_tokens", "page"
_TOKEN_FIELDS = ("keys", "values", "key_scales", "value_scales")
_PAGE_FIELDS = ("key_pages", "value_pages", "key_scales", "value_scales")
_RESET_FIELDS = {"overflow": False, "rollback_refused": False}
"""Per-row flags that are not saved; a loaded row gets this value."""

_NATIVE_DTYPES = frozenset(
    np.dtype(name)
    for name in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
    + ("float16", "float32", "float64")
)
"""Dtypes stored as themselves; any other is stored as unsigned words of its width."""
_WORDS = {size: np.dtype(f"uint{8 * size}") for size in (1, 2, 4, 8)}

_CHUNK_BYTES = 16 * 2**20


# --------------------------------------------------------------------------------------------
# Hashes
# --------------------------------------------------------------------------------------------

_MODEL_HASHES: dict[tuple, str] = {}
_MODEL_HASHES_LOCK = threading.Lock()


def hash_model_file(path: str | os.PathLike[str]) -> str:
    """The sha256 (lowercase hex) of a model file, e.g. a GGUF checkpoint.

    A file is hashed once per process: the digest is remembered under the file's resolved path,
    size, modification time and inode, so a 100 MB checkpoint is read again only when it changes
    (a file that changes while it is hashed is not remembered).

    Raises:
        TypeError: ``path`` is not a str or ``os.PathLike``.
        FileNotFoundError: no such file.
        ValueError: ``path`` is not a regular file.
    """
    owner = "hash_model_file"
    resolved = os.path.realpath(_as_path(owner, "path", path))
    before = os.stat(resolved)
    if not stat.S_ISREG(before.st_mode):
        raise ValueError(f"{owner}: path must be a regular file, got {resolved!r}")
    key = _file_identity(resolved, before)
    with _MODEL_HASHES_LOCK:
        known = _MODEL_HASHES.get(key)
    if known is not None:
        return known
    with open(resolved, "rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    if _file_identity(resolved, os.stat(resolved)) == key:
        with _MODEL_HASHES_LOCK:
            _MODEL_HASHES[key] = digest
    return digest


def _file_identity(path: str, status: os.stat_result) -> tuple:
    return (path, status.st_size, status.st_mtime_ns, status.st_ino, status.st_dev)


def hash_text(text: str) -> str:
    """The sha256 (lowercase hex) of ``text`` encoded as UTF-8 (a chat template, a name)."""
    if not isinstance(text, str):
        raise TypeError(f"hash_text: text must be a str, got {type(text).__name__}")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_tokens(tokens: Any) -> str:
    """The sha256 (lowercase hex) of token ids: one sequence (a sequence or 1-D array of ints)
    or several (a sequence of them, or a 2-D array). ``[[1, 2], [3]]`` and ``[[1], [2, 3]]``
    differ; one sequence hashes like a list holding it."""
    return _hash_token_rows(_token_rows("hash_tokens", "tokens", tokens, None))


def _hash_token_rows(rows: tuple[tuple[int, ...], ...]) -> str:
    digest = hashlib.sha256(b"jaxkv.tokens\0")
    for row in rows:
        digest.update(len(row).to_bytes(8, "little"))
        digest.update(np.asarray(row, dtype="<i4").tobytes())
    return digest.hexdigest()


def tokenizer_identity(tokenizer: Any) -> str:
    """The sha256 (lowercase hex) of what a ``jaxkv.io.Tokenizer`` maps ids to and from: its
    model, vocabulary and special ids (the chat template has its own fingerprint field)."""
    owner = "tokenizer_identity"
    for name in ("vocab_size", "id_to_token", "model"):
        if not hasattr(tokenizer, name):
            raise TypeError(
                f"{owner}: tokenizer must be a jaxkv.io.Tokenizer (no {name!r}), "
                f"got {type(tokenizer).__name__}"
            )
    identity = {
        "model": tokenizer.model,
        "vocab": [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)],
        "special_ids": {
            name: getattr(tokenizer, name, None)
            for name in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id")
        },
        "eos_token_ids": sorted(getattr(tokenizer, "eos_token_ids", ())),
        "add_bos": getattr(tokenizer, "add_bos", None),
    }
    return hash_text(json.dumps(identity, sort_keys=True, ensure_ascii=False))


# --------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------

_HEX = frozenset("0123456789abcdef")


def _require_digest(owner: str, name: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) != 64 or not set(value) <= _HEX:
        raise ValueError(
            f"{owner}: {name} must be a sha256 as 64 lowercase hex digits, got {value!r}"
        )
    return value


@dataclasses.dataclass(frozen=True)
class CacheFingerprint:
    """Everything that decides whether a saved cache may be reused: two equal fingerprints
    mean the same keys, values and states for the same tokens.

    Build it with ``create`` from a cache and its tokens; ``differences`` says which fields two
    fingerprints disagree on.

    Attributes:
        model_sha256: sha256 of the model file (``hash_model_file``).
        tokenizer_id: identity of the tokenizer (``tokenizer_identity``, or any non-empty
            string naming it).
        chat_template_sha256: sha256 of the chat template (``hash_text``; of ``""`` for none).
        dtype: the cache's dtype (``"float32"``; a hybrid cache whose kinds differ lists
            ``"kind=dtype"`` pairs).
        kv_codec: storage codec of the keys and values: ``"none"``, ``"int8"``, ``"fp8"`` or
            ``"int4/g{group_size}"`` (``"none"`` for recurrent caches; pairs like ``dtype``
            when kinds differ).
        page_size: tokens per page of the paged layers, ``None`` without any.
        tokens_sha256: ``hash_tokens`` of the sequences the cache holds. ``None`` in an
            *expected* fingerprint accepts whatever tokens the file holds (``load_cache``
            returns them); a saved fingerprint always has it.
        layout_version: the file layout (``CACHE_LAYOUT_VERSION``).
    """

    model_sha256: str
    tokenizer_id: str
    chat_template_sha256: str
    dtype: str
    kv_codec: str
    page_size: int | None
    tokens_sha256: str | None
    layout_version: int = CACHE_LAYOUT_VERSION

    def __post_init__(self) -> None:
        owner = "CacheFingerprint"
        _require_digest(owner, "model_sha256", self.model_sha256)
        _require_digest(owner, "chat_template_sha256", self.chat_template_sha256)
        if self.tokens_sha256 is not None:
            _require_digest(owner, "tokens_sha256", self.tokens_sha256)
        for name in ("tokenizer_id", "dtype", "kv_codec"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{owner}: {name} must be a non-empty str, got {value!r}")
        v.require_optional_int(owner, "page_size", self.page_size, minimum=1)
        v.require_int(owner, "layout_version", self.layout_version, minimum=1)

    @classmethod
    def create(
        cls,
        cache: BaseCache,
        tokens: Any,
        *,
        model_sha256: str,
        tokenizer_id: str,
        chat_template: str | None = None,
    ) -> CacheFingerprint:
        """The fingerprint of ``cache`` holding ``tokens``.

        Args:
            cache: the cache (its dtype, codec and page size are read from its metadata).
            tokens: the token ids it holds, as ``save_cache`` takes them (one sequence, or one
                per saved row); ``None`` for an expected fingerprint that accepts any tokens.
            model_sha256: ``hash_model_file(model_path)``.
            tokenizer_id: ``tokenizer_identity(tokenizer)``.
            chat_template: the chat template text (``None``: no template).
        """
        owner = "CacheFingerprint.create"
        dtype, kv_codec, page_size = _cache_settings(owner, _cache_layers(owner, cache), cache)
        if chat_template is not None and not isinstance(chat_template, str):
            raise TypeError(
                f"{owner}: chat_template must be a str or None, got {type(chat_template).__name__}"
            )
        return cls(
            model_sha256=model_sha256,
            tokenizer_id=tokenizer_id,
            chat_template_sha256=hash_text(chat_template or ""),
            dtype=dtype,
            kv_codec=kv_codec,
            page_size=page_size,
            tokens_sha256=None if tokens is None else hash_tokens(tokens),
            layout_version=CACHE_LAYOUT_VERSION,
        )

    def replace(self, **changes: Any) -> CacheFingerprint:
        """A copy with ``changes`` (validated like the original)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """``{field: value}`` (JSON-compatible)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheFingerprint:
        """The fingerprint of ``to_dict`` output; ``ValueError`` for missing or unknown
        fields."""
        names = {field.name for field in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(
                f"CacheFingerprint.from_dict: expected fields {sorted(names)}, got {got}"
            )
        return cls(**data)

    def differences(self, expected: CacheFingerprint) -> dict[str, tuple[Any, Any]]:
        """``{field: (this value, expected value)}`` for every field that differs (an
        ``expected.tokens_sha256`` of ``None`` matches any tokens)."""
        if not isinstance(expected, CacheFingerprint):
            raise TypeError(
                f"CacheFingerprint.differences: expected must be a CacheFingerprint, "
                f"got {type(expected).__name__}"
            )
        found = {}
        for field in dataclasses.fields(self):
            mine, theirs = getattr(self, field.name), getattr(expected, field.name)
            if field.name == "tokens_sha256" and theirs is None:
                continue
            if mine != theirs:
                found[field.name] = (mine, theirs)
        return found


def _codec_name(metadata: Any) -> str:
    if metadata.kv_quantization == "int4":
        return f"int4/g{metadata.quantization_group_size}"
    return metadata.kv_quantization


def _cache_settings(owner: str, layers: list[Any], cache: BaseCache) -> tuple[str, str, int | None]:
    """``(dtype, kv_codec, page_size)`` of a cache, as ``CacheFingerprint`` describes them."""
    dtypes: dict[str, str] = {}
    codecs: dict[str, str] = {}
    page_sizes = set()
    for index, view in enumerate(layers):
        if view is None:
            continue
        metadata = view.metadata
        label = cache.metadata.layer_kinds[index] if isinstance(cache, HybridCache) else str(index)
        dtypes.setdefault(label, np.dtype(metadata.dtype).name)
        if hasattr(metadata, "kv_quantization"):
            codecs.setdefault(label, _codec_name(metadata))
        if isinstance(view, PagedCacheView):
            page_sizes.add(metadata.page_size)
    if not dtypes:
        raise ValueError(f"{owner}: cache has no initialised views (every layer is None)")

    def describe(values: dict[str, str]) -> str:
        if len(set(values.values())) == 1:
            return next(iter(values.values()))
        return ",".join(f"{label}={value}" for label, value in values.items())

    return describe(dtypes), describe(codecs) if codecs else "none", min(page_sizes, default=None)


# --------------------------------------------------------------------------------------------
# What a file holds, and what a load returns
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CacheFileInfo:
    """What a cache file holds, read from its verified header (``read_cache_info``).

    Attributes:
        path: the file.
        layout_version: its layout version.
        fingerprint: the ``CacheFingerprint`` it was saved with.
        cache_type: class name of the cache it was saved from (``"TransformerCache"``, ...).
        layer_views: class name of each layer's view, ``None`` where a layer keeps nothing.
        tokens: the token ids of every saved sequence.
        source_rows: the rows the sequences came from, ``None`` for a paged cache.
        page_size: tokens per page of the paged layers, ``None`` without any.
        source_page_table: the saved pages' ids in the source pool, ``None`` without paged
            layers; a load needs as many destination pages.
    """

    path: str
    layout_version: int
    fingerprint: CacheFingerprint
    cache_type: str
    layer_views: tuple[str | None, ...]
    tokens: tuple[tuple[int, ...], ...]
    source_rows: tuple[int, ...] | None
    page_size: int | None
    source_page_table: tuple[int, ...] | None
    _header: dict[str, Any] = dataclasses.field(repr=False, compare=False)

    @property
    def num_sequences(self) -> int:
        """Sequences in the file."""
        return len(self.tokens)

    @property
    def token_ids(self) -> tuple[int, ...]:
        """The token ids of a file that holds one sequence."""
        return _only_sequence("CacheFileInfo.token_ids", self.tokens)

    @property
    def num_pages(self) -> int:
        """Pages saved per paged layer (0 without paged layers)."""
        return 0 if self.source_page_table is None else len(self.source_page_table)

    @property
    def layers(self) -> tuple[int, ...]:
        """Ids of the layers that have a view (``init_cache(..., layers=...)``)."""
        return tuple(i for i, view in enumerate(self.layer_views) if view is not None)

    def cache_metadata(self) -> Any:
        """The metadata of the saved cache: ``HybridCacheMetadata`` for a hybrid cache, else
        the metadata of its layers. ``init_cache`` of it builds a cache the file loads into
        whole (``rows=None``)."""
        cache = self._header["cache"]
        if cache["metadata"] is not None:
            return HybridCacheMetadata.from_json(cache["metadata"])
        first = next(layer for layer in self._header["layers"] if layer is not None)
        return _METADATA_TYPES[first["metadata_class"]].from_json(first["metadata"])


@dataclasses.dataclass(frozen=True)
class LoadedCache:
    """What ``load_cache`` returns.

    Attributes:
        cache: a new cache: the target with the saved sequences written in (the target itself
            is unchanged).
        tokens: the token ids of every loaded sequence, in file order.
        fingerprint: the fingerprint the file was saved with.
        rows: the target rows the sequences went to, ``None`` for a paged cache.
        page_table: the target pages each saved page went to (``-1``: kept the target's), in
            the sequence's order, ``None`` without paged layers.
    """

    cache: BaseCache
    tokens: tuple[tuple[int, ...], ...]
    fingerprint: CacheFingerprint
    rows: tuple[int, ...] | None
    page_table: tuple[int, ...] | None

    @property
    def token_ids(self) -> tuple[int, ...]:
        """The token ids of a file that holds one sequence."""
        return _only_sequence("LoadedCache.token_ids", self.tokens)


def _only_sequence(owner: str, tokens: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    if len(tokens) != 1:
        raise ValueError(f"{owner}: the file holds {len(tokens)} sequences, not one; use tokens")
    return tokens[0]


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _as_path(owner: str, name: str, path: Any) -> str:
    if isinstance(path, bytes) or not isinstance(path, str | os.PathLike):
        raise TypeError(f"{owner}: {name} must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise ValueError(f"{owner}: {name} must be a non-empty file path, got {path!r}")
    return path


def _cache_layers(owner: str, cache: Any) -> list[Any]:
    if not isinstance(cache, _CACHE_TYPES):
        allowed = ", ".join(t.__name__ for t in _CACHE_TYPES)
        raise TypeError(f"{owner}: cache must be one of {allowed}, got {type(cache).__name__}")
    layers = list(cache.views)
    for index, view in enumerate(layers):
        if view is not None and not isinstance(view, (*_ROW_VIEW_TYPES, PagedCacheView)):
            raise TypeError(
                f"{owner}: cache layer {index} is a {type(view).__name__}, which has no file layout"
            )
    return layers


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _int_list(owner: str, name: str, value: Any) -> list[int]:
    """``value`` (a sequence or 1-D array of ints) as Python ints."""
    if isinstance(value, jax.Array | np.ndarray):
        array = np.asarray(value)
        if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
            raise TypeError(
                f"{owner}: {name} must be a 1-D sequence of ints, got an array of shape "
                f"{array.shape} and dtype {array.dtype}"
            )
        return [int(item) for item in array]
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise TypeError(f"{owner}: {name} must be a sequence of ints, got {type(value).__name__}")
    for index, item in enumerate(value):
        if not _is_int(item):
            raise TypeError(f"{owner}: {name}[{index}] must be an int, got {item!r}")
    return [int(item) for item in value]


def _token_rows(
    owner: str, name: str, tokens: Any, count: int | None
) -> tuple[tuple[int, ...], ...]:
    """Token ids as one tuple per sequence: ``tokens`` is one sequence of ids or a sequence of
    them (``count`` of them, when given)."""
    if isinstance(tokens, jax.Array | np.ndarray) and np.ndim(tokens) == 2:
        tokens = list(np.asarray(tokens))
    nested = (
        not isinstance(tokens, jax.Array | np.ndarray)
        and isinstance(tokens, Sequence)
        and not isinstance(tokens, str | bytes)
        and len(tokens) > 0
        and not _is_int(tokens[0])
    )
    if nested:
        rows = tuple(
            tuple(_int_list(owner, f"{name}[{index}]", row)) for index, row in enumerate(tokens)
        )
    else:
        rows = (tuple(_int_list(owner, name, tokens)),)
    if count is not None and len(rows) != count:
        raise ValueError(
            f"{owner}: {name} must hold {count} token sequence(s), one per saved row, "
            f"got {len(rows)}"
        )
    for index, row in enumerate(rows):
        bad = [token for token in row if not 0 <= token <= MAX_TOKEN_ID]
        if bad:
            label = f"{name}[{index}]" if nested else name
            raise ValueError(
                f"{owner}: {label} must hold token ids in [0, {MAX_TOKEN_ID}], got {bad[0]}"
            )
    return rows


def _row_ids(owner: str, rows: Any, batch_size: int) -> tuple[int, ...]:
    """Distinct row ids in ``[0, batch_size)``: ``None`` is every row, an int one row."""
    if rows is None:
        return tuple(range(batch_size))
    if isinstance(rows, bool | np.bool_):
        raise TypeError(
            f"{owner}: rows must be an int row id, a sequence of them or None, got {rows!r}"
        )
    ids = [int(rows)] if _is_int(rows) else _int_list(owner, "rows", rows)
    if not ids:
        raise ValueError(f"{owner}: rows must name at least one row, got {rows!r}")
    bad = [row for row in ids if not 0 <= row < batch_size]
    if bad:
        raise ValueError(
            f"{owner}: rows must lie in [0, {batch_size}) (the cache's rows), got {ids}"
        )
    if len(set(ids)) != len(ids):
        raise ValueError(f"{owner}: rows must be distinct, got {ids}")
    return tuple(ids)


def _page_ids(owner: str, pages: Any, num_pages: int, *, allow_skip: bool) -> np.ndarray:
    """Distinct page ids in ``[0, num_pages)`` (and ``-1`` when ``allow_skip``), int64."""
    if pages is None:
        raise ValueError(
            f"{owner}: the cache has paged layers, so pages must give the sequence's page ids "
            f"(its page table, e.g. PageManager.get_sequence(seq_id).page_ids), got None"
        )
    ids = np.asarray(_int_list(owner, "pages", pages), dtype=np.int64)
    low = -1 if allow_skip else 0
    bad = ids[(ids < low) | (ids >= num_pages)]
    if bad.size:
        allowed = f"[0, {num_pages})" + (" or -1 (keep the target's page)" if allow_skip else "")
        raise ValueError(f"{owner}: pages must hold page ids in {allowed}, got {bad[0]}")
    real = ids[ids >= 0]
    if np.unique(real).size != real.size:
        raise ValueError(f"{owner}: pages must be distinct page ids, got {ids.tolist()}")
    return ids


# --------------------------------------------------------------------------------------------
# Layer plans: which fields of a view are saved, indexed how
# --------------------------------------------------------------------------------------------


def _layer_plan(view: Any) -> dict[str, str]:
    """``{field: _ROW | _ROW_TOKENS | _PAGE}`` of what ``view`` saves."""
    if isinstance(view, PagedCacheView):
        return {name: _PAGE for name in _PAGE_FIELDS if getattr(view, name) is not None}
    by_tokens = isinstance(view, TransformerCacheView) and not view.metadata.is_ring
    plan = {}
    for field in dataclasses.fields(view):
        value = getattr(view, field.name)
        if field.name in _RESET_FIELDS or not isinstance(value, jax.Array | np.ndarray):
            continue
        plan[field.name] = _ROW_TOKENS if by_tokens and field.name in _TOKEN_FIELDS else _ROW
    return plan


def _family(view: Any) -> str:
    if isinstance(view, PagedCacheView):
        return "paged"
    return view._family()


# --------------------------------------------------------------------------------------------
# save_cache
# --------------------------------------------------------------------------------------------


def save_cache(
    path: str | os.PathLike[str],
    cache: BaseCache,
    tokens: Any,
    fingerprint: CacheFingerprint,
    *,
    rows: int | Sequence[int] | None = None,
    pages: Sequence[int] | np.ndarray | None = None,
) -> CacheFileInfo:
    """Save sequences of ``cache`` to ``path`` (atomically; an existing file is replaced).

    Args:
        path: the file to write; its directory must exist.
        cache: a ``TransformerCache``, ``PagedCache``, ``RecurrentCache`` or ``HybridCache``
            (not changed).
        tokens: the token ids the saved sequences hold: one sequence of ints when ``rows`` is
            an int or the cache is paged, else one sequence per saved row. Each must have as
            many ids as its row's ``lengths`` (or fill exactly its ``pages``).
        fingerprint: ``CacheFingerprint.create(cache, tokens, ...)``; its dtype, codec, page
            size, tokens hash and layout version must describe what is saved.
        rows: caches with rows (every family but paged attention): the row to save (an int),
            the rows (a sequence of distinct ids), or ``None`` for every row.
        pages: caches with paged layers: the sequence's page ids in table order (its page
            table, ``PageManager.get_sequence(seq_id).page_ids``), as many as its tokens fill
            (``ceil(len(tokens) / page_size)``). A paged cache saves one sequence at a time.

    Returns:
        The ``CacheFileInfo`` of the file written.

    Raises:
        TypeError/ValueError: an argument that does not fit (named in the message); nothing is
            written.
        OSError: the file could not be written; ``path`` is left as it was.
    """
    owner = "save_cache"
    path = _as_path(owner, "path", path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{owner}: path's directory {directory!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{owner}: path must be a file path, got the directory {path!r}")
    layers = _cache_layers(owner, cache)
    if not isinstance(fingerprint, CacheFingerprint):
        raise TypeError(
            f"{owner}: fingerprint must be a CacheFingerprint, got {type(fingerprint).__name__}"
        )
    row_ids, token_rows, page_table = _selection(owner, layers, tokens, rows, pages)
    _check_fingerprint_describes(owner, fingerprint, layers, cache, token_rows)
    payload, header = _payload(cache, layers, fingerprint, row_ids, token_rows, page_table)
    _write_atomically(path, payload)
    table = None if page_table is None else tuple(int(page) for page in page_table)
    return _info(path, header, token_rows, table)


def _selection(
    owner: str, layers: list[Any], tokens: Any, rows: Any, pages: Any
) -> tuple[tuple[int, ...] | None, tuple[tuple[int, ...], ...], np.ndarray | None]:
    """``(row ids, token ids per sequence, page table)`` of what ``save_cache`` saves, each
    checked against the cache (``None`` where the cache has no rows / no pages)."""
    row_views = [view for view in layers if isinstance(view, _ROW_VIEW_TYPES)]
    paged_views = [view for view in layers if isinstance(view, PagedCacheView)]
    if not row_views and not paged_views:
        raise ValueError(f"{owner}: cache has no initialised views (every layer is None)")

    row_ids = None
    if row_views:
        row_ids = _row_ids(owner, rows, row_views[0].metadata.batch_size)
    elif rows is not None:
        raise ValueError(
            f"{owner}: a paged cache keeps no rows on the device (its rows are page tables), so "
            f"rows must be None; give the sequence's page ids as pages, got rows={rows!r}"
        )
    count = 1 if row_ids is None else len(row_ids)
    if paged_views and count != 1:
        raise ValueError(
            f"{owner}: a cache with paged layers saves one sequence at a time, so rows must be "
            f"one row id (its slot), got {row_ids}"
        )
    single = row_ids is None or _is_int(rows)
    token_rows = _token_rows(owner, "tokens", tokens, None if single else count)
    if single and len(token_rows) != 1:
        raise ValueError(
            f"{owner}: tokens must hold one sequence of token ids (one row is saved), "
            f"got {len(token_rows)} sequences"
        )

    for index, view in enumerate(layers):
        if not isinstance(view, _ROW_VIEW_TYPES):
            continue
        lengths = np.asarray(view.lengths)[list(row_ids)]
        for k, (row, length) in enumerate(zip(row_ids, lengths, strict=True)):
            if int(length) != len(token_rows[k]):
                raise ValueError(
                    f"{owner}: tokens{'' if single else f'[{k}]'} holds {len(token_rows[k])} "
                    f"token ids, but row {row} of layer {index} holds {int(length)} tokens; "
                    f"give exactly the tokens the row holds"
                )

    if not paged_views:
        if pages is not None:
            raise ValueError(f"{owner}: the cache has no paged layers, so pages must be None")
        return row_ids, token_rows, None
    geometry = paged_views[0].metadata
    page_table = _page_ids(owner, pages, geometry.num_pages, allow_skip=False)
    needed = ceil_div(len(token_rows[0]), geometry.page_size)
    if page_table.size != needed:
        raise ValueError(
            f"{owner}: {len(token_rows[0])} tokens fill {needed} page(s) of "
            f"{geometry.page_size}, so pages must hold {needed} page id(s) (the first entries "
            f"of the sequence's page table), got {page_table.size}"
        )
    return row_ids, token_rows, page_table


def _check_fingerprint_describes(
    owner: str,
    fingerprint: CacheFingerprint,
    layers: list[Any],
    cache: BaseCache,
    token_rows: tuple[tuple[int, ...], ...],
) -> None:
    """A file records only a fingerprint that tells the truth about what it holds."""
    dtype, kv_codec, page_size = _cache_settings(owner, layers, cache)
    actual = {
        "dtype": dtype,
        "kv_codec": kv_codec,
        "page_size": page_size,
        "tokens_sha256": _hash_token_rows(token_rows),
        "layout_version": CACHE_LAYOUT_VERSION,
    }
    for name, value in actual.items():
        if getattr(fingerprint, name) != value:
            raise ValueError(
                f"{owner}: fingerprint.{name}={getattr(fingerprint, name)!r} does not describe "
                f"what is saved ({name}={value!r}); build the fingerprint with "
                f"CacheFingerprint.create(cache, tokens, ...)"
            )


def _payload(
    cache: BaseCache,
    layers: list[Any],
    fingerprint: CacheFingerprint,
    row_ids: tuple[int, ...] | None,
    token_rows: tuple[tuple[int, ...], ...],
    page_table: np.ndarray | None,
) -> tuple[bytes, dict[str, Any]]:
    """The file's bytes (safetensors) and its header."""
    tensors: dict[str, np.ndarray] = {}
    layer_specs: list[dict[str, Any] | None] = []
    saved_tokens = max((len(row) for row in token_rows), default=0)
    for index, view in enumerate(layers):
        if view is None:
            layer_specs.append(None)
            continue
        plan = _layer_plan(view)
        for name, axis in plan.items():
            tensors[f"layer.{index}.{name}"] = _take(
                getattr(view, name), axis, row_ids, page_table, saved_tokens
            )
        layer_specs.append(
            {
                "view": type(view).__name__,
                "family": _family(view),
                "metadata_class": type(view.metadata).__name__,
                "metadata": view.metadata.to_json(),
                "fields": plan,
            }
        )
    tensors["tokens"] = np.asarray([t for row in token_rows for t in row], dtype=np.int32)
    if page_table is not None:
        tensors["page_table"] = page_table.astype(np.int32)

    stored, manifest = {}, {}
    for name, array in tensors.items():
        stored[name], manifest[name] = _to_stored(array)
    hybrid = isinstance(cache, HybridCache)
    header = {
        "layout_version": CACHE_LAYOUT_VERSION,
        "fingerprint": fingerprint.to_dict(),
        "cache": {
            "class": type(cache).__name__,
            "metadata": cache.metadata.to_json() if hybrid else None,
            "layer_kinds": list(cache.metadata.layer_kinds) if hybrid else None,
        },
        "layers": layer_specs,
        "sequences": {
            "lengths": [len(row) for row in token_rows],
            "source_rows": None if row_ids is None else list(row_ids),
        },
        "pages": None
        if page_table is None
        else {"page_size": fingerprint.page_size, "count": int(page_table.size)},
        "tensors": manifest,
    }
    header_json = json.dumps(header, sort_keys=True, separators=(",", ":"))
    version = str(CACHE_LAYOUT_VERSION)
    metadata = {
        "format": FILE_FORMAT,
        "layout_version": version,
        "header": header_json,
        "header_sha256": _header_digest(FILE_FORMAT, version, header_json),
    }
    import safetensors.numpy

    return safetensors.numpy.save(stored, metadata=metadata), header


def _take(
    array: jax.Array,
    axis: str,
    row_ids: tuple[int, ...] | None,
    page_table: np.ndarray | None,
    saved_tokens: int,
) -> np.ndarray:
    """The saved part of one field, on the host."""
    if axis == _PAGE:
        return np.asarray(array[jnp.asarray(page_table, jnp.int32)])
    index = jnp.asarray(row_ids, jnp.int32)
    if axis == _ROW_TOKENS:
        return np.asarray(array[index, :saved_tokens])
    return np.asarray(array[index])


def _to_stored(array: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """``(what safetensors stores, manifest entry)``: unknown dtypes as unsigned words."""
    array = np.ascontiguousarray(array)
    stored = array if array.dtype in _NATIVE_DTYPES else array.view(_WORDS[array.dtype.itemsize])
    return stored, {
        "dtype": array.dtype.name,
        "stored_dtype": stored.dtype.name,
        "shape": list(array.shape),
        "sha256": _array_digest(stored),
    }


def _array_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8)).hexdigest()


def _header_digest(file_format: str, version: str, header_json: str) -> str:
    return hash_text(f"{file_format}\n{version}\n{header_json}")


def _write_all(file: BinaryIO, payload: bytes) -> None:
    """Write ``payload`` to ``file`` in chunks."""
    view = memoryview(payload)
    for start in range(0, len(view), _CHUNK_BYTES):
        file.write(view[start : start + _CHUNK_BYTES])


def _write_atomically(path: str, payload: bytes) -> None:
    """Write ``payload`` to a temporary file beside ``path``, flush it to disk and move it onto
    ``path``: readers see the old file or the new one, never part of one. On any failure the
    temporary file is removed and ``path`` is untouched."""
    directory = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(
        dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".partial"
    )
    try:
        with os.fdopen(descriptor, "wb") as file:
            # mkstemp makes the file private; keep the mode of the file being replaced.
            mode = stat.S_IMODE(os.stat(path).st_mode) if os.path.exists(path) else 0o644
            os.fchmod(file.fileno(), mode)
            _write_all(file, payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    # Make the rename itself durable (not every platform can open a directory).
    with contextlib.suppress(OSError):
        directory_descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(directory_descriptor)
        finally:
            os.close(directory_descriptor)


# --------------------------------------------------------------------------------------------
# Reading a file
# --------------------------------------------------------------------------------------------


class _CacheFile:
    """An open cache file whose envelope and header checksum have been verified."""

    def __init__(self, path: str) -> None:
        from safetensors import SafetensorError, safe_open

        self.path = path
        try:
            self._handle = safe_open(path, framework="numpy")
            metadata = self._handle.metadata()
            names = set(self._handle.keys())
        except SafetensorError as error:
            raise CacheFileCorruptedError(
                path,
                f"{path}: not a complete safetensors file ({error}); it is truncated, damaged "
                f"or not a cache file",
            ) from error
        self._corrupt_unless(
            isinstance(metadata, dict) and metadata.get("format") == FILE_FORMAT,
            f"not a jaxkv cache file (its metadata has no format={FILE_FORMAT!r})",
        )
        version_text = metadata.get("layout_version", "")
        self._corrupt_unless(
            version_text.isascii() and version_text.isdigit(),
            f"layout_version must be a positive integer, got {version_text!r}",
        )
        version = int(version_text)
        if version > CACHE_LAYOUT_VERSION:
            raise CacheFileVersionError(path, version, CACHE_LAYOUT_VERSION)
        header_json = metadata.get("header", "")
        self._corrupt_unless(
            metadata.get("header_sha256") == _header_digest(FILE_FORMAT, version_text, header_json),
            "its header does not match its header checksum (header_sha256)",
        )
        self._corrupt_unless(version >= 1, f"unknown layout version {version}")
        try:
            header = json.loads(header_json)
            self.fingerprint = CacheFingerprint.from_dict(header["fingerprint"])
            self.manifest = header["tensors"]
            self.lengths = [int(n) for n in header["sequences"]["lengths"]]
            if not isinstance(header["layers"], list) or "class" not in header["cache"]:
                raise ValueError("no layers or no cache class")
        except (KeyError, TypeError, ValueError) as error:
            raise CacheFileCorruptedError(path, f"{path}: malformed header ({error})") from error
        self.header = header
        self._corrupt_unless(
            header.get("layout_version") == version,
            f"its header says layout version {header.get('layout_version')!r}, not {version}",
        )
        self._corrupt_unless(
            names == set(self.manifest),
            f"its tensors {sorted(names)} are not those its header lists {sorted(self.manifest)}",
        )

    def _corrupt_unless(self, condition: bool, reason: str) -> None:
        if not condition:
            raise CacheFileCorruptedError(self.path, f"{self.path}: {reason}")

    def tensor(self, name: str) -> np.ndarray:
        """Tensor ``name`` in its true dtype, its checksum verified."""
        from safetensors import SafetensorError

        entry = self.manifest[name]
        try:
            stored = self._handle.get_tensor(name)
        except SafetensorError as error:
            raise CacheFileCorruptedError(
                self.path, f"{self.path}: cannot read tensor {name!r} ({error})"
            ) from error
        self._corrupt_unless(
            stored.dtype.name == entry["stored_dtype"] and list(stored.shape) == entry["shape"],
            f"tensor {name!r} has dtype {stored.dtype.name} and shape {list(stored.shape)}, but "
            f"its header lists {entry['stored_dtype']} and {entry['shape']}",
        )
        self._corrupt_unless(
            _array_digest(stored) == entry["sha256"],
            f"tensor {name!r} does not match its checksum (its data is damaged)",
        )
        dtype = _dtype_named(entry["dtype"])
        self._corrupt_unless(
            dtype is not None and dtype.itemsize == stored.dtype.itemsize,
            f"tensor {name!r} has unknown dtype {entry['dtype']!r}",
        )
        return stored if dtype == stored.dtype else stored.view(dtype)

    def tokens(self) -> tuple[tuple[int, ...], ...]:
        """Every sequence's token ids, checked against the fingerprint's hash."""
        flat = self.tensor("tokens")
        self._corrupt_unless(
            flat.ndim == 1 and flat.size == sum(self.lengths) and min(self.lengths, default=0) >= 0,
            f"its tokens ({flat.shape}) do not add up to the sequence lengths {self.lengths}",
        )
        ends = np.cumsum(self.lengths)
        rows = tuple(
            tuple(int(t) for t in flat[end - n : end])
            for n, end in zip(self.lengths, ends, strict=True)
        )
        self._corrupt_unless(
            _hash_token_rows(rows) == self.fingerprint.tokens_sha256,
            "its tokens do not match the fingerprint's tokens_sha256",
        )
        return rows

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._handle.__exit__(None, None, None)


def _dtype_named(name: str) -> np.dtype | None:
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes

        scalar = getattr(ml_dtypes, name, None)
        return None if scalar is None else np.dtype(scalar)


@contextlib.contextmanager
def _open(owner: str, path: Any):
    path = _as_path(owner, "path", path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{owner}: path {path!r} is not an existing file")
    file = _CacheFile(path)
    try:
        yield file
    finally:
        file.close()


def _info(
    path: str,
    header: dict[str, Any],
    tokens: tuple[tuple[int, ...], ...],
    page_table: tuple[int, ...] | None,
) -> CacheFileInfo:
    pages = header["pages"]
    rows = header["sequences"]["source_rows"]
    return CacheFileInfo(
        path=path,
        layout_version=header["layout_version"],
        fingerprint=CacheFingerprint.from_dict(header["fingerprint"]),
        cache_type=header["cache"]["class"],
        layer_views=tuple(None if layer is None else layer["view"] for layer in header["layers"]),
        tokens=tokens,
        source_rows=None if rows is None else tuple(rows),
        page_size=None if pages is None else pages["page_size"],
        source_page_table=page_table,
        _header=header,
    )


def read_cache_info(path: str | os.PathLike[str]) -> CacheFileInfo:
    """What the cache file at ``path`` holds (its header and tokens, verified), without loading
    its arrays: e.g. to see whether its fingerprint fits, or how many pages to allocate.

    Raises:
        FileNotFoundError: no such file.
        CacheFileCorruptedError: a truncated or damaged file, or not a cache file.
        CacheFileVersionError: a file of a newer layout version.
    """
    with _open("read_cache_info", path) as file:
        table = None
        if file.header["pages"] is not None:
            table = tuple(int(page) for page in file.tensor("page_table"))
        return _info(file.path, file.header, file.tokens(), table)


# --------------------------------------------------------------------------------------------
# load_cache
# --------------------------------------------------------------------------------------------


def load_cache(
    path: str | os.PathLike[str],
    expected_fingerprint: CacheFingerprint,
    cache: BaseCache,
    *,
    rows: int | Sequence[int] | None = None,
    pages: Sequence[int] | np.ndarray | None = None,
) -> LoadedCache:
    """Load the sequences saved at ``path`` into ``cache`` (which is not changed).

    Args:
        path: a file ``save_cache`` wrote.
        expected_fingerprint: the fingerprint the file must have (model, tokenizer, chat
            template, layout, dtype, codec, page size and, unless ``None``, tokens).
        cache: the target: a cache of the family and configuration the file was saved from;
            its rows, capacity (``max_length``, at least the saved tokens; a ring's slots must
            match) and pool size (``num_pages``) may differ.
        rows: caches with rows: the target row of each saved sequence (an int for a file of one
            sequence, a sequence of ids), or ``None``: rows ``0 .. batch_size - 1``, which needs
            a file of ``batch_size`` sequences.
        pages: caches with paged layers: the target page of each saved page, in the sequence's
            order (e.g. the page table a ``PageManager`` just allocated); ``-1`` keeps the
            target's page (one a prefix-cache hit already holds).

    Returns:
        A ``LoadedCache``: the new cache, the loaded token ids, the file's fingerprint, and
        where the sequences went.

    Raises:
        FileNotFoundError: no such file.
        CacheFileCorruptedError: a truncated or damaged file (a tensor or header checksum fails).
        CacheFileVersionError: a file of a newer layout version.
        FingerprintMismatchError: the file's fingerprint differs from ``expected_fingerprint``
            (its ``differences`` name the fields).
        CacheTargetMismatchError: ``cache`` does not fit the file (family, layers,
            configuration, shapes, dtypes, capacity, number of rows or pages).
        TypeError/ValueError: a malformed argument.
    """
    owner = "load_cache"
    if not isinstance(expected_fingerprint, CacheFingerprint):
        raise TypeError(
            f"{owner}: expected_fingerprint must be a CacheFingerprint, "
            f"got {type(expected_fingerprint).__name__}"
        )
    layers = _cache_layers(owner, cache)
    with _open(owner, path) as file:
        differences = file.fingerprint.differences(expected_fingerprint)
        if differences:
            raise FingerprintMismatchError(file.path, differences)
        target = _Target(file, cache, layers)
        row_ids = target.rows(rows)
        page_table = target.pages(pages)
        tokens = file.tokens()
        views = []
        for index, view in enumerate(layers):
            if view is None:
                views.append(None)
                continue
            plan = file.header["layers"][index]["fields"]
            saved = {name: file.tensor(f"layer.{index}.{name}") for name in plan}
            if isinstance(view, PagedCacheView):
                views.append(_write_pages(view, saved, page_table))
            else:
                views.append(_write_rows(view, plan, saved, row_ids))
    return LoadedCache(
        cache=cache.with_views(views),
        tokens=tokens,
        fingerprint=file.fingerprint,
        rows=row_ids,
        page_table=None if page_table is None else tuple(int(page) for page in page_table),
    )


class _Target:
    """The checks that a target cache fits an open file (every one raises
    ``CacheTargetMismatchError`` naming the argument, what it has and what the file needs)."""

    def __init__(self, file: _CacheFile, cache: BaseCache, layers: list[Any]) -> None:
        self.file = file
        self.path = file.path
        header = file.header
        stored_class = header["cache"]["class"]
        if type(cache).__name__ != stored_class:
            self.fail(
                f"cache must be a {stored_class} (the file holds one), got a {type(cache).__name__}"
            )
        if len(layers) != len(header["layers"]):
            self.fail(
                f"cache must have {len(header['layers'])} layers like the saved cache, got "
                f"{len(layers)}"
            )
        stored_kinds = header["cache"]["layer_kinds"]
        if stored_kinds is not None and list(cache.metadata.layer_kinds) != stored_kinds:
            self.fail(
                f"cache has layer kinds {list(cache.metadata.layer_kinds)}, but the file was "
                f"saved from a stack of {stored_kinds}"
            )
        self.row_batch = None
        self.num_pages = None
        for index, (view, spec) in enumerate(zip(layers, header["layers"], strict=True)):
            self.check_layer(index, view, spec)
            if isinstance(view, PagedCacheView):
                self.num_pages = view.metadata.num_pages
            elif view is not None:
                self.row_batch = view.metadata.batch_size

    def fail(self, message: str) -> None:
        raise CacheTargetMismatchError(self.path, f"{self.path}: {message}")

    def check_layer(self, index: int, view: Any, spec: dict[str, Any] | None) -> None:
        if (view is None) != (spec is None):
            has = "no view" if view is None else f"a {type(view).__name__}"
            saved = "no view" if spec is None else f"a {spec['view']}"
            self.fail(f"cache layer {index} has {has}, but the saved cache had {saved} there")
        if view is None:
            return
        if type(view).__name__ != spec["view"]:
            self.fail(
                f"cache layer {index} is a {type(view).__name__} ({_family(view)}), but the file "
                f"holds a {spec['view']} ({spec['family']}) layer"
            )
        try:
            stored = _stored_metadata(spec["metadata_class"], spec["metadata"])
        except (AttributeError, TypeError, ValueError) as error:
            raise CacheFileCorruptedError(
                self.path, f"{self.path}: layer {index} has malformed metadata ({error})"
            ) from error
        target = view.metadata
        if type(target) is not type(stored):
            self.fail(
                f"cache layer {index} has {type(target).__name__}, but the file holds "
                f"{type(stored).__name__}"
            )
        free = _FREE_FIELDS[type(stored)]
        for field in dataclasses.fields(stored):
            if field.name in free:
                continue
            mine, theirs = getattr(target, field.name), getattr(stored, field.name)
            if mine != theirs:
                self.fail(
                    f"cache layer {index} ({_family(view)}) has {field.name}={_show(mine)}, but "
                    f"the file was saved from a cache with {field.name}={_show(theirs)}"
                )
        longest = max(self.file.lengths, default=0)
        if isinstance(view, TransformerCacheView):
            if target.is_ring != stored.is_ring or (
                target.is_ring and target.num_slots != stored.num_slots
            ):
                self.fail(
                    f"cache layer {index} keeps {target.num_slots} slots per row "
                    f"({_family(view)}), but the saved {spec['family']} layer keeps "
                    f"{stored.num_slots}: a ring loads only into a ring of the same slots"
                )
            if target.max_length < longest:
                self.fail(
                    f"cache layer {index} has max_length={target.max_length}, but the file holds "
                    f"a sequence of {longest} tokens"
                )
        if isinstance(view, PagedCacheView):
            saved_pages = self.file.header["pages"]["count"]
            if target.max_pages_per_seq < saved_pages:
                self.fail(
                    f"cache layer {index} has max_pages_per_seq={target.max_pages_per_seq}, but "
                    f"the file holds a sequence of {saved_pages} pages"
                )
        plan = _layer_plan(view)
        if plan != spec["fields"]:
            self.fail(
                f"cache layer {index} keeps the arrays {plan}, but the file holds {spec['fields']}"
            )
        for name, axis in plan.items():
            entry = self.file.manifest[f"layer.{index}.{name}"]
            array = getattr(view, name)
            expected = list(array.shape[1:])
            saved = entry["shape"][1:]
            if axis == _ROW_TOKENS:
                expected, saved = expected[1:], saved[1:]
            if expected != saved or np.dtype(array.dtype).name != entry["dtype"]:
                self.fail(
                    f"cache layer {index}.{name} has shape {tuple(array.shape)} and dtype "
                    f"{np.dtype(array.dtype).name}, which do not fit the saved {entry['shape']} "
                    f"{entry['dtype']}"
                )

    def rows(self, rows: Any) -> tuple[int, ...] | None:
        """The target rows of the saved sequences (``None`` for a paged cache)."""
        count = len(self.file.lengths)
        if self.row_batch is None:
            if rows is not None:
                raise ValueError(
                    "load_cache: a paged cache keeps no rows on the device, so rows must be "
                    f"None; give the destination page ids as pages, got rows={rows!r}"
                )
            return None
        if rows is None and count != self.row_batch:
            self.fail(
                f"the file holds {count} sequence(s) but cache has {self.row_batch} rows; pass "
                f"rows= to say which rows they go to"
            )
        ids = _row_ids("load_cache", rows, self.row_batch)
        if len(ids) != count:
            raise ValueError(
                f"load_cache: rows must name {count} row(s), one per saved sequence, "
                f"got {list(ids)}"
            )
        return ids

    def pages(self, pages: Any) -> np.ndarray | None:
        """The target pages of the saved pages (``None`` without paged layers)."""
        saved = self.file.header["pages"]
        if self.num_pages is None:
            if pages is not None:
                raise ValueError("load_cache: the cache has no paged layers, so pages must be None")
            return None
        ids = _page_ids("load_cache", pages, self.num_pages, allow_skip=True)
        if ids.size != saved["count"]:
            raise ValueError(
                f"load_cache: pages must hold {saved['count']} page id(s), one per saved page "
                f"(the file's sequence fills {saved['count']} page(s) of {saved['page_size']}), "
                f"got {ids.size}"
            )
        return ids


@functools.lru_cache(maxsize=256)
def _stored_metadata(class_name: str, text: str) -> Any:
    """A layer's metadata from its JSON in a header (parsed once per distinct text: a directory
    of page files repeats the same few)."""
    metadata_type = _METADATA_TYPES.get(class_name)
    if metadata_type is None:
        raise ValueError(f"unknown metadata class {class_name!r}")
    return metadata_type.from_json(text)


def _show(value: Any) -> str:
    return value.name if isinstance(value, np.dtype) else repr(value)


def _write_rows(
    view: Any, plan: dict[str, str], saved: dict[str, np.ndarray], row_ids: tuple[int, ...]
) -> Any:
    """``view`` with the saved rows written into rows ``row_ids`` (a contiguous row's slots
    past the saved tokens zeroed, its overflow flag cleared)."""
    index = jnp.asarray(row_ids, jnp.int32)
    fields = {}
    for name, array in saved.items():
        current = getattr(view, name)
        if plan[name] == _ROW_TOKENS:
            padded = np.zeros((len(row_ids), *current.shape[1:]), array.dtype)
            padded[:, : array.shape[1]] = array
            array = padded
        fields[name] = current.at[index].set(jnp.asarray(array))
    for name, fill in _RESET_FIELDS.items():
        current = getattr(view, name, None)
        if current is not None:
            fields[name] = current.at[index].set(fill)
    return dataclasses.replace(view, **fields)


def _write_pages(view: PagedCacheView, saved: dict[str, np.ndarray], page_table: np.ndarray):
    """``view`` with the saved pages written into pages ``page_table`` (``-1``: skipped)."""
    keep = page_table >= 0
    if not keep.any():
        return view
    if np.array_equal(page_table, np.arange(view.metadata.num_pages)):
        # The file fills the whole pool, in order: its arrays become the pool's.
        fields = {name: jnp.asarray(array) for name, array in saved.items()}
        return dataclasses.replace(view, **fields)
    index = jnp.asarray(page_table[keep], jnp.int32)
    fields = {
        name: getattr(view, name).at[index].set(jnp.asarray(array[keep]))
        for name, array in saved.items()
    }
    return dataclasses.replace(view, **fields)
