"""Paged KV cache: every layer's keys and values in one pool of fixed-size pages.

Layout. Each layer holds ``key_pages: [num_pages, num_kv_heads, page_size, head_dim]`` and
``value_pages: [num_pages, num_kv_heads, page_size, value_dim]`` (as the storage codec's words). A
token lives at ``slot = page * page_size + offset``. The page axis is outermost, so a page is one
contiguous run of memory and a page copy or a page read during attention is one contiguous move
(a token write is one short run per head). Within a page the heads come first: a gathered page
is then, per head, the ``[page_size, head_dim]`` matrix attention multiplies by, with no
transposing copy of the block in between (``jaxkv.ops.paged_attention``).

Which page holds which token is decided on the host by ``jaxkv.pages.PageManager``; the engine
turns its step plan into a ``PagedRuntimeMetadata`` (``jaxkv.engine.step_inputs.paged_runtime``),
and per layer ``kv, view = view.concatenate_to_cache(key, value, runtime)`` applies the step's
copy-on-write page copies, then writes the new tokens at ``slot_mapping`` (``-1`` writes nothing);
``jaxkv.ops.attention(query, kv)`` then runs ragged paged attention of the packed queries.

Rows. The pools have no rows: a paged cache's rows are its page tables, kept on the host, and
every step has ``batch_size`` (the page manager's ``max_num_seqs``) page-table rows whatever
the batch holds. The row operations of ``jaxkv.abstracts.RowOperations`` on paged views and
caches therefore check their arguments and move nothing on the device;
``jaxkv.pages.PagedRows`` does the same operations on the page tables (fork with copy-on-write
for ``repeat`` and duplicated ``reorder`` rows, frees, ``truncate``/``rollback``), which is all
they take.

Storage goes through the metadata's storage codec (``jaxkv.quantization``): floats, 16-bit ones
held as ``uint16`` words so that XLA's CPU backend scatters into the pool in place; or with
``kv_quantization`` (``"int8"``, ``"int4"``, ``"fp8"``) the codec's words plus
``[num_pages, num_kv_heads, page_size, groups]`` scale pools.

Capacity is the host's business: the manager never hands out a slot outside the pool, and the
device drops any write whose slot is ``-1`` (or otherwise outside the pool) instead of letting
JAX wrap or clamp it onto live data.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv import _validation as v
from jaxkv._sizes import ceil_div
from jaxkv.abstracts import (
    AttentionCacheView,
    BaseCacheMetadata,
    BaseRunTimeMetadata,
    RowOperations,
    pytree_dataclass,
    static_field,
)
from jaxkv.caches.kv_storage import KVStorageMetadata, decode_states
from jaxkv.caches.rows import (
    LayerCache,
    require_count,
    rollback_counts,
    row_mask,
    slot_index,
    static_row_ids,
)
from jaxkv.kv import PagedKV

_MAX_SLOTS = 2**31 - 1  # slot ids travel as int32


@pytree_dataclass
class PagedCacheMetadata(KVStorageMetadata, BaseCacheMetadata):
    """Static configuration of a paged KV cache.

    Attributes:
        num_layers: layers (views) in the cache.
        num_pages: pages in each layer's pool.
        page_size: tokens per page.
        num_kv_heads: KV heads.
        head_dim: head dimension of keys.
        value_dim: head dimension of values (``head_dim`` unless given).
        batch_size: rows of every step's page table (sequences per step; ``max_num_seqs`` in
            ``jaxkv.pages``).
        max_pages_per_seq: width of the page table; a sequence holds at most
            ``max_pages_per_seq * page_size`` tokens.
        sliding_window: ``None``, or the attention window ``W`` (attention skips the blocks
            before the window). Driven by a windowed ``PageManager``, the pages before the window
            go back to the pool and their page-table entries become ``-1``, so ``num_pages`` may
            then be below ``max_pages_per_seq``.
        dtype: dtype of keys and values (float32, bfloat16 or float16); with a codec, the dtype
            ``key_states()``/``value_states()`` return.
        kv_quantization: storage codec, one of ``jaxkv.quantization.CODECS`` (``"none"``:
            plain ``dtype`` floats).
        quantization_group_size: int4 only: channels per scale (must divide ``head_dim`` and
            ``value_dim``); ``None`` for the other codecs.
    """

    num_layers: int
    num_pages: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    value_dim: int
    batch_size: int
    max_pages_per_seq: int
    sliding_window: int | None = None
    dtype: np.dtype = np.dtype(np.float32)
    kv_quantization: str = "none"
    quantization_group_size: int | None = None

    @classmethod
    def create(
        cls,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        batch_size: int | None = None,
        max_pages_per_seq: int | None = None,
        *,
        dtype: Any = jnp.float32,
        value_dim: int | None = None,
        sliding_window: int | None = None,
        kv_quantization: str = "none",
        quantization_group_size: int | None = None,
        max_num_seqs: int | None = None,
    ) -> PagedCacheMetadata:
        """Validated metadata; raises ``ValueError``/``TypeError`` naming the field on bad input.

        ``batch_size`` is the rows of every step (``max_num_seqs``, the name ``jaxkv.pages``
        uses, is accepted for it). ``value_dim`` defaults to ``head_dim``. ``kv_quantization``
        picks the storage codec (``"none"``, ``"int8"``, ``"int4"``, ``"fp8"``); int4's
        ``quantization_group_size`` defaults to ``min(64, head_dim, value_dim)``.
        """
        owner = "PagedCacheMetadata.create"
        return cls._construct(
            dict(
                num_layers=num_layers,
                num_pages=num_pages,
                page_size=page_size,
                num_kv_heads=num_kv_heads,
                head_dim=head_dim,
                value_dim=value_dim,
                batch_size=_rows(owner, batch_size, max_num_seqs),
                max_pages_per_seq=max_pages_per_seq,
                sliding_window=sliding_window,
                dtype=dtype,
                kv_quantization=kv_quantization,
                quantization_group_size=quantization_group_size,
            )
        )

    @classmethod
    def from_memory_budget(
        cls,
        num_layers: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        batch_size: int | None = None,
        max_pages_per_seq: int | None = None,
        *,
        dtype: Any = jnp.float32,
        memory_bytes: int | None = None,
        memory_fraction: float | None = None,
        device: jax.Device | None = None,
        value_dim: int | None = None,
        sliding_window: int | None = None,
        kv_quantization: str = "none",
        quantization_group_size: int | None = None,
        max_num_seqs: int | None = None,
    ) -> PagedCacheMetadata:
        """Metadata whose ``num_pages`` is as many pages as a memory budget holds (pages are
        sized with the codec's scales included).

        Give exactly one budget: ``memory_bytes`` (bytes for the pools of all layers), or
        ``memory_fraction`` of the memory the backend reports for ``device`` (default
        ``jax.devices()[0]``): ``fraction * bytes_limit - bytes_in_use`` from
        ``device.memory_stats()``. The result's ``token_capacity`` says how many tokens fit.

        Raises:
            ValueError: no budget or both; a fraction outside ``(0, 1]``; a backend that reports
                no memory statistics (the CPU backend may not: pass ``memory_bytes``); a budget
                smaller than one full sequence (``max_pages_per_seq`` pages).
        """
        owner = "PagedCacheMetadata.from_memory_budget"
        if (memory_bytes is None) == (memory_fraction is None):
            raise ValueError(
                f"{owner}: give exactly one of memory_bytes and memory_fraction, got "
                f"memory_bytes={memory_bytes!r}, memory_fraction={memory_fraction!r}"
            )
        if memory_bytes is not None:
            budget = v.require_int(owner, "memory_bytes", memory_bytes, minimum=1)
        else:
            if (
                isinstance(memory_fraction, bool)
                or not isinstance(memory_fraction, int | float)
                or not 0 < memory_fraction <= 1
            ):
                raise ValueError(
                    f"{owner}: memory_fraction must be a float in (0, 1], got {memory_fraction!r}"
                )
            device = jax.devices()[0] if device is None else device
            stats = device.memory_stats()
            if not stats or "bytes_limit" not in stats:
                raise ValueError(
                    f"{owner}: device {device} reports no memory statistics "
                    f"(memory_stats() -> {stats!r}); pass memory_bytes instead"
                )
            budget = int(memory_fraction * stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
            if budget <= 0:
                raise ValueError(
                    f"{owner}: memory_fraction={memory_fraction} of {stats['bytes_limit']} bytes "
                    f"leaves no room ({stats.get('bytes_in_use', 0)} bytes already in use)"
                )
        # Size one page with the smallest valid pool, validating every other field.
        v.require_int(owner, "max_pages_per_seq", max_pages_per_seq, minimum=1)
        probe = cls.create(
            num_layers,
            max_pages_per_seq,
            page_size,
            num_kv_heads,
            head_dim,
            batch_size,
            max_pages_per_seq,
            dtype=dtype,
            max_num_seqs=max_num_seqs,
            value_dim=value_dim,
            sliding_window=sliding_window,
            kv_quantization=kv_quantization,
            quantization_group_size=quantization_group_size,
        )
        num_pages = budget // probe.bytes_per_page()
        if num_pages < probe.max_pages_per_seq:
            raise ValueError(
                f"{owner}: a budget of {budget} bytes holds {num_pages} page(s) of "
                f"{probe.bytes_per_page()} bytes; expected at least max_pages_per_seq="
                f"{probe.max_pages_per_seq} (one full sequence)"
            )
        num_pages = min(num_pages, _MAX_SLOTS // probe.page_size)
        return probe.replace(num_pages=num_pages)

    @classmethod
    def fill_defaults(cls, fields: dict[str, Any]) -> dict[str, Any]:
        return cls.fill_kv_defaults(cls.__name__, fields)

    def validate(self) -> None:
        owner = type(self).__name__
        for name in ("num_layers", "num_pages", "page_size", "batch_size", "max_pages_per_seq"):
            v.require_size(owner, name, getattr(self, name))
        v.require_optional_int(owner, "sliding_window", self.sliding_window, minimum=1)
        if self.max_pages_per_seq > self.num_pages and self.sliding_window is None:
            raise ValueError(
                f"{owner}: max_pages_per_seq={self.max_pages_per_seq} exceeds "
                f"num_pages={self.num_pages} (only a sliding_window pool, whose windowed page "
                f"manager releases the pages before the window, may be smaller)"
            )
        if self.num_pages * self.page_size > _MAX_SLOTS:
            raise ValueError(
                f"{owner}: num_pages * page_size = {self.num_pages * self.page_size} slots do not "
                f"fit int32 slot ids (at most {_MAX_SLOTS})"
            )
        self.validate_kv()

    @property
    def max_num_seqs(self) -> int:
        """``batch_size`` under the name ``jaxkv.pages.PageManager`` uses."""
        return self.batch_size

    @property
    def value_heads(self) -> int:
        """Heads of values: ``num_kv_heads``."""
        return self.num_kv_heads

    @property
    def num_slots(self) -> int:
        """Token slots in each layer's pool: ``num_pages * page_size``."""
        return self.num_pages * self.page_size

    @property
    def token_capacity(self) -> int:
        """Tokens the whole pool holds (all sequences together): ``num_pages * page_size``."""
        return self.num_slots

    @property
    def max_seq_len(self) -> int:
        """Most tokens one sequence holds: ``max_pages_per_seq * page_size``."""
        return self.max_pages_per_seq * self.page_size

    def bytes_per_page(self) -> int:
        """Bytes of one page across all layers."""
        return self.page_size * self.bytes_per_token()

    def bytes_per_sequence(self, length: int) -> int:
        """Bytes a sequence of ``length`` tokens holds across all layers: whole pages."""
        length = v.require_int(
            f"{type(self).__name__}.bytes_per_sequence", "length", length, minimum=0
        )
        return ceil_div(length, self.page_size) * self.bytes_per_page()

    def bytes_total(self) -> int:
        """Bytes the pools of all layers allocate."""
        return self.num_pages * self.bytes_per_page()


def _rows(owner: str, batch_size: Any, max_num_seqs: Any) -> Any:
    if batch_size is not None and max_num_seqs is not None and batch_size != max_num_seqs:
        raise ValueError(
            f"{owner}: batch_size={batch_size!r} conflicts with max_num_seqs={max_num_seqs!r} "
            f"(two names of the same field); give one"
        )
    return max_num_seqs if batch_size is None else batch_size


# The step arrays a runtime carries (all int32).
RUNTIME_ARRAYS = (
    "page_tables",
    "context_lens",
    "query_start_loc",
    "slot_mapping",
    "positions",
    "token_ids",
    "copy_ops",
    "logits_indices",
)


@pytree_dataclass
class PagedRuntimeMetadata(BaseRunTimeMetadata):
    """The device arrays of one paged step (see ``jaxkv.pages.StepMetadata`` for the contract).

    With ``S = batch_size`` (rows of the step), ``P = max_pages_per_seq`` and ``T`` the padded
    token count, every field is an int32 array leaf:

    Attributes:
        page_tables: ``[S, P]`` each row's pages in position order, ``-1`` unused.
        context_lens: ``[S]`` tokens in the pool per row after this step's writes.
        query_start_loc: ``[S + 1]`` where each row's new tokens start in the packed axis.
        num_seqs: ``[]`` real rows. An array leaf, not a static field, so a jitted step compiles
            once per token bucket and not once per batch size; nothing on the device needs it
            static (unused rows have no tokens and zero context).
        slot_mapping: ``[T]`` ``page * page_size + offset`` of each new token, ``-1`` padding.
        positions: ``[T]`` absolute position of each new token (``0`` for padding).
        token_ids: ``[T]`` ids of the new tokens.
        copy_ops: ``[S, 2]`` ``(src_page, dst_page)`` copies to apply before the writes; ``-1``
            rows are no-ops.
        logits_indices: ``[S]`` packed index of each row's last new token.
        num_pages, page_size: (static) the pool the step was planned for (the page manager's);
            a cache with another pool refuses the step, at trace time, so even under ``jit``.
        max_query_len: (static) a bound on any row's new tokens, rounded up to a power of two
            so steps of similar shape share a compiled function; attention lays queries out as
            ``[S, max_query_len]`` and reads each row's pages once. ``0`` means unknown (then the
            bound is ``T``).
        prefill_rows: (static) ``0``, or ``P``: only rows ``0 .. P - 1`` may have more than one
            new token (the engine puts the rows that prefill first); attention then lays those
            out ``[P, max_query_len]`` and every other row at one query, instead of paying
            ``max_query_len`` for each decoding row.
    """

    page_tables: jax.Array
    context_lens: jax.Array
    query_start_loc: jax.Array
    num_seqs: jax.Array
    slot_mapping: jax.Array
    positions: jax.Array
    token_ids: jax.Array
    copy_ops: jax.Array
    logits_indices: jax.Array
    num_pages: int = static_field()
    page_size: int = static_field()
    max_query_len: int = static_field(0)
    prefill_rows: int = static_field(0)

    def __post_init__(self) -> None:
        owner = type(self).__name__
        v.require_int(owner, "max_query_len", self.max_query_len, minimum=0)
        v.require_int(owner, "prefill_rows", self.prefill_rows, minimum=0)
        v.require_int(owner, "num_pages", self.num_pages, minimum=1)
        v.require_int(owner, "page_size", self.page_size, minimum=1)
        for name in (*RUNTIME_ARRAYS, "num_seqs"):
            array = getattr(self, name)
            if not hasattr(array, "shape") or not hasattr(array, "dtype"):
                raise TypeError(f"{owner}: {name} must be an array, got {type(array).__name__}")
            if not jnp.issubdtype(array.dtype, jnp.integer):
                raise TypeError(f"{owner}: {name} must be an integer array, got {array.dtype}")
        if self.num_seqs.shape == (1,):
            # A one-element array (what a JSON round trip of a 0-d array gives) is the scalar.
            object.__setattr__(self, "num_seqs", self.num_seqs.reshape(()))
        v.check_array(owner, "page_tables", self.page_tables, (None, None))
        seqs = self.page_tables.shape[0]
        tokens = self.slot_mapping.shape[0] if self.slot_mapping.ndim == 1 else None
        v.check_array(owner, "context_lens", self.context_lens, (seqs,))
        v.check_array(owner, "query_start_loc", self.query_start_loc, (seqs + 1,))
        v.check_array(owner, "num_seqs", self.num_seqs, ())
        v.check_array(owner, "slot_mapping", self.slot_mapping, (None,))
        v.check_array(owner, "positions", self.positions, (tokens,))
        v.check_array(owner, "token_ids", self.token_ids, (tokens,))
        v.check_array(owner, "copy_ops", self.copy_ops, (None, 2))
        v.check_array(owner, "logits_indices", self.logits_indices, (seqs,))

    @classmethod
    def create(
        cls,
        *,
        num_pages: int,
        page_size: int,
        max_query_len: int = 0,
        prefill_rows: int = 0,
        **arrays: Any,
    ) -> PagedRuntimeMetadata:
        """Runtime metadata from the step arrays (NumPy or JAX, any int dtype; stored as int32),
        checked for consistency when they are concrete.

        Args:
            num_pages, page_size: the pool the step was planned for.
            max_query_len: static bound on any row's new tokens (``0``: unknown).
            prefill_rows: static count of leading rows that may take several tokens (``0``:
                every row may).
            **arrays: every name of ``RUNTIME_ARRAYS`` plus ``num_seqs``.

        Raises:
            TypeError: a missing, unknown or non-integer array.
            ValueError: arrays whose shapes disagree, or values outside the contract (a
                ``query_start_loc`` that is not a prefix sum from 0, a padding slot that is not
                ``-1``, a context shorter than the row's new tokens, ``num_seqs`` outside the
                rows).
        """
        owner = "PagedRuntimeMetadata.create"
        expected = {*RUNTIME_ARRAYS, "num_seqs"}
        if set(arrays) != expected:
            raise TypeError(
                f"{owner}: expected the arrays {sorted(expected)}, got {sorted(arrays)}"
            )
        host = {name: np.asarray(array) for name, array in arrays.items()}
        for name, array in host.items():
            if not np.issubdtype(array.dtype, np.integer):
                raise TypeError(f"{owner}: {name} must be an integer array, got {array.dtype}")
        runtime = cls(
            **{name: jnp.asarray(array, jnp.int32) for name, array in host.items()},
            num_pages=num_pages,
            page_size=page_size,
            max_query_len=max_query_len,
            prefill_rows=prefill_rows,
        )
        seqs = host["page_tables"].shape[0]
        start = host["query_start_loc"]
        num_tokens = int(start[-1])
        if start[0] != 0 or np.any(np.diff(start) < 0):
            raise ValueError(
                f"{owner}: query_start_loc must rise from 0 to num_tokens={num_tokens}, "
                f"got {start.tolist()}"
            )
        if not 0 <= int(host["num_seqs"]) <= seqs:
            raise ValueError(f"{owner}: num_seqs={int(host['num_seqs'])} outside [0, {seqs}]")
        slots = host["slot_mapping"]
        if num_tokens > slots.shape[0] or np.any(slots[num_tokens:] != -1):
            raise ValueError(
                f"{owner}: slot_mapping must be -1 past num_tokens={num_tokens}, "
                f"got {slots.tolist()}"
            )
        if prefill_rows and np.any(np.diff(start)[prefill_rows:] > 1):
            raise ValueError(
                f"{owner}: with prefill_rows={prefill_rows}, rows past the first "
                f"{prefill_rows} take at most one new token; got {np.diff(start).tolist()}"
            )
        if np.any(host["context_lens"] < np.diff(start)):
            raise ValueError(
                f"{owner}: context_lens {host['context_lens'].tolist()} shorter than the new "
                f"tokens per row {np.diff(start).tolist()}"
            )
        return runtime

    def token_positions(self) -> jax.Array:
        """``[T]`` int32 positions of the new tokens, ``-1`` where ``slot_mapping`` is ``-1``."""
        return jnp.where(self.slot_mapping >= 0, self.positions, -1).astype(jnp.int32)


def _check_runtime(owner: str, runtime: Any, metadata: PagedCacheMetadata) -> None:
    if not isinstance(runtime, PagedRuntimeMetadata):
        raise TypeError(
            f"{owner}: runtime must be PagedRuntimeMetadata, got {type(runtime).__name__}"
        )
    m = metadata
    if (runtime.num_pages, runtime.page_size) != (m.num_pages, m.page_size):
        raise ValueError(
            f"{owner}: the runtime was built for a pool of {runtime.num_pages} pages of "
            f"{runtime.page_size} tokens, but this cache has {m.num_pages} pages of "
            f"{m.page_size}: its page manager drives another pool"
        )
    v.check_array(
        owner, "runtime.page_tables", runtime.page_tables, (m.batch_size, m.max_pages_per_seq)
    )
    if not v.is_traced(runtime.page_tables, runtime.slot_mapping):
        tables = np.asarray(runtime.page_tables)
        if tables.size and (tables.min() < -1 or tables.max() >= m.num_pages):
            raise ValueError(
                f"{owner}: runtime.page_tables must hold page ids in [0, {m.num_pages}) or -1, "
                f"got values in [{tables.min()}, {tables.max()}]"
            )
        slots = np.asarray(runtime.slot_mapping)
        if slots.size and (slots.min() < -1 or slots.max() >= m.num_slots):
            raise ValueError(
                f"{owner}: runtime.slot_mapping must hold slots in [0, {m.num_slots}) or -1, "
                f"got values in [{slots.min()}, {slots.max()}]"
            )
        real = slots[slots >= 0]
        unique, counts = np.unique(real, return_counts=True)
        if np.any(counts > 1):
            raise ValueError(
                f"{owner}: runtime.slot_mapping writes slot {int(unique[counts > 1][0])} twice "
                f"(one token's keys and values would be lost); every real slot must be distinct"
            )


@pytree_dataclass
class PagedCacheView(AttentionCacheView, RowOperations):
    """One layer of a paged cache.

    Attributes:
        key_pages: ``[num_pages, num_kv_heads, page_size, storage.stored_dim(head_dim)]`` stored
            words of the metadata's storage codec (``key_states()`` gives the floats).
        value_pages: ``[num_pages, num_kv_heads, page_size, storage.stored_dim(value_dim)]``,
            likewise.
        metadata: the cache's ``PagedCacheMetadata`` (static).
        layer_index: which layer this view belongs to (static).
        key_scales: with a quantising codec, ``[num_pages, num_kv_heads, page_size, groups]``
            uint16 (float16 bits); ``None`` unquantised.
        value_scales: likewise for values.

    Row operations (see the module docstring): the pool has no rows, so they check their
    arguments and move nothing. Move the rows' pages with ``jaxkv.pages.PagedRows``.
    """

    key_pages: jax.Array
    value_pages: jax.Array
    metadata: PagedCacheMetadata = static_field()
    layer_index: int | None = static_field(None)
    key_scales: jax.Array | None = None
    value_scales: jax.Array | None = None

    @classmethod
    def init(cls, metadata: PagedCacheMetadata, layer_index: int | None = None) -> PagedCacheView:
        """A zero-filled pool for ``metadata``."""
        if not isinstance(metadata, PagedCacheMetadata):
            raise TypeError(
                f"PagedCacheView.init: metadata must be PagedCacheMetadata, "
                f"got {type(metadata).__name__}"
            )
        m = metadata
        lead = (m.num_pages, m.num_kv_heads, m.page_size)
        key_pages, key_scales = m.storage.allocate(lead, m.head_dim)
        value_pages, value_scales = m.storage.allocate(lead, m.value_dim)
        return cls(
            key_pages=key_pages,
            value_pages=value_pages,
            metadata=m,
            layer_index=layer_index,
            key_scales=key_scales,
            value_scales=value_scales,
        )

    def key_states(self) -> jax.Array:
        """``[num_pages, num_kv_heads, page_size, head_dim]`` keys as ``metadata.dtype`` floats
        (a quantised pool is dequantised whole: for inspection; attention reads block by
        block)."""
        return decode_states(self.key_pages, self.key_scales, self.metadata)

    def value_states(self) -> jax.Array:
        """``[num_pages, num_kv_heads, page_size, value_dim]`` values as ``metadata.dtype``
        floats."""
        return decode_states(self.value_pages, self.value_scales, self.metadata)

    def query_positions(self, runtime: PagedRuntimeMetadata, num_tokens: int) -> jax.Array:
        """``[num_tokens]`` int32 absolute positions of the step's new tokens (``-1`` for
        padding): what a model needs for RoPE before it writes."""
        owner = "PagedCacheView.query_positions"
        if not isinstance(runtime, PagedRuntimeMetadata):
            raise TypeError(
                f"{owner}: runtime must be PagedRuntimeMetadata, got {type(runtime).__name__}"
            )
        if num_tokens != runtime.slot_mapping.shape[0]:
            raise ValueError(
                f"{owner}: num_tokens={num_tokens!r} does not match the runtime's "
                f"{runtime.slot_mapping.shape[0]} packed tokens"
            )
        return runtime.token_positions()

    def concatenate_to_cache(
        self, key: jax.Array, value: jax.Array, runtime: PagedRuntimeMetadata
    ) -> tuple[PagedKV, PagedCacheView]:
        """Apply the step's page copies, then write its new tokens at ``runtime.slot_mapping``;
        padding (``-1``) writes nothing.

        Args:
            key: ``[num_tokens, num_kv_heads, head_dim]``, any float dtype (encoded with the
                metadata's storage codec), packed like ``runtime.slot_mapping``.
            value: ``[num_tokens, num_kv_heads, value_dim]``.
            runtime: the step's ``PagedRuntimeMetadata``; its ``copy_ops`` (copy-on-write of
                shared pages) are applied before the writes, as the page manager requires.

        Returns:
            ``(kv, new_view)``: ``kv`` is the ``PagedKV`` to pass to ``jaxkv.ops.attention`` (the
            pools after the write, the step's page tables, context lengths, packed query
            positions and window); ``new_view`` holds the written tokens. ``self`` is unchanged.

        Raises:
            ValueError/TypeError: a shape or dtype that does not fit the metadata, or (eager calls
                only) a page id or slot outside the pool.
        """
        m = self.metadata
        owner = f"PagedCacheView.concatenate_to_cache (layer {self.layer_index})"
        _check_runtime(owner, runtime, m)
        num_tokens = runtime.slot_mapping.shape[0]
        v.check_array(owner, "key", key, (num_tokens, m.num_kv_heads, m.head_dim))
        v.check_array(owner, "value", value, (num_tokens, m.num_kv_heads, m.value_dim))
        for name, array in (("key", key), ("value", value)):
            if not jnp.issubdtype(array.dtype, jnp.floating):
                raise TypeError(f"{owner}: {name} must be a float array, got {array.dtype}")

        pools = self.copy_pages(runtime.copy_ops)

        # -1 (padding) becomes an out-of-range slot that mode="drop" discards; x.at[-1] would
        # wrap onto the last slot of the pool.
        slots = runtime.slot_mapping.astype(jnp.int32)
        slots = jnp.where((slots >= 0) & (slots < m.num_slots), slots, m.num_slots)

        # Index pages and offsets directly: scattering into a reshaped (flattened) pool makes
        # XLA copy the whole pool around the write instead of updating it in place.
        pages, offsets = slots // m.page_size, slots % m.page_size

        def write(pool: jax.Array | None, new: jax.Array | None) -> jax.Array | None:
            if pool is None:
                return None
            # Token t's [heads, dim] goes to pool[pages[t], :, offsets[t]].
            return pool.at[pages, :, offsets].set(new, mode="drop")

        storage = m.storage
        key_words, key_scale = storage.encode(key)
        value_words, value_scale = storage.encode(value)
        key_pages = write(pools.key_pages, key_words)
        value_pages = write(pools.value_pages, value_words)
        key_scales = write(pools.key_scales, key_scale)
        value_scales = write(pools.value_scales, value_scale)
        kv = PagedKV(
            key_pages=key_pages,
            value_pages=value_pages,
            page_tables=runtime.page_tables,
            context_lens=runtime.context_lens,
            query_start_loc=runtime.query_start_loc,
            query_positions=runtime.token_positions(),
            max_query_len=runtime.max_query_len,
            prefill_rows=runtime.prefill_rows,
            sliding_window=m.sliding_window,
            codec=storage,
            key_scales=key_scales,
            value_scales=value_scales,
        )
        new_view = dataclasses.replace(
            self,
            key_pages=key_pages,
            value_pages=value_pages,
            key_scales=key_scales,
            value_scales=value_scales,
        )
        return kv, new_view

    def copy_pages(self, copy_ops: jax.Array) -> PagedCacheView:
        """A view where page ``dst`` holds a copy of page ``src`` for each ``(src, dst)`` row of
        ``copy_ops: [C, 2]`` int; rows with a ``-1`` (or any id outside the pool) do nothing.

        All sources are read before any destination is written. ``concatenate_to_cache``
        applies its runtime's copies itself; this is for driving a pool by hand."""
        src, dst = _copy_indices("PagedCacheView.copy_pages", copy_ops, self.metadata.num_pages)

        def copy(pool: jax.Array | None) -> jax.Array | None:
            return None if pool is None else pool.at[dst].set(pool[src], mode="drop")

        return dataclasses.replace(
            self,
            key_pages=copy(self.key_pages),
            value_pages=copy(self.value_pages),
            key_scales=copy(self.key_scales),
            value_scales=copy(self.value_scales),
        )

    # -- row operations: the pool has no rows (see the class docstring) ---------------------

    @property
    def batch_size(self) -> int:
        """Rows of every step's page table: the page manager's ``max_num_seqs``, however many
        rows a ``PagedRows`` holds."""
        return self.metadata.batch_size

    def _owner(self, operation: str) -> str:
        return f"PagedCacheView.{operation} (layer {self.layer_index})"

    def reset_rows(self, rows: Any) -> PagedCacheView:
        """Nothing to clear on the device: a freed sequence's pages return to the host's pool
        (``PagedRows.reset_rows``)."""
        row_mask(self._owner("reset_rows"), rows, self.batch_size)
        return self

    def truncate(self, lengths: Any) -> PagedCacheView:
        """Nothing to change on the device: rollback shortens the host's page tables
        (``PagedRows.truncate``; pages that become empty go back to the pool)."""
        lengths = jnp.asarray(lengths)
        if lengths.ndim != 1 or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise TypeError(
                f"{self._owner('truncate')}: lengths must be a [rows] int array, got {lengths!r}"
            )
        return self

    def rollback(self, n: Any) -> PagedCacheView:
        """Nothing to change on the device: ``PagedRows.rollback`` forgets the last ``n`` tokens
        of each row's sequence (pages that become empty go back to the pool). ``n``: an int or
        ``[rows]`` ints ``>= 0``."""
        rollback_counts(self._owner("rollback"), n, self.batch_size)
        return self

    def select(self, rows: Any) -> PagedCacheView:
        """The same pools (``PagedRows.select`` frees the rows left out)."""
        static_row_ids(self._owner("select"), "rows", rows, self.batch_size)
        return self

    def reorder(self, indices: Any) -> PagedCacheView:
        """The same pools (``PagedRows.reorder`` forks and frees the page tables)."""
        array = jnp.asarray(indices)
        if array.ndim != 1 or not jnp.issubdtype(array.dtype, jnp.integer):
            raise TypeError(f"{self._owner('reorder')}: indices must be row ids, got {indices!r}")
        return self

    def repeat(self, n: int) -> PagedCacheView:
        """The same pools (``PagedRows.repeat`` forks the page tables: the copies share pages
        until they write)."""
        require_count(self._owner("repeat"), n)
        return self

    def insert(self, other: Any, slot: Any) -> PagedCacheView:
        """``other``'s pools: a paged batch and a row taken out of it with ``extract`` share one
        pool (and one page manager), so the one-row cache that was written to since -- a
        sequence prefilled on its own before it joins the batch -- holds the newest pool. The
        sequence joins row ``slot`` through ``PagedRows.insert`` (pools of different caches
        share no page ids, so ``other`` must come from this pool; between the ``extract`` and
        the ``insert``, write to one of the two only)."""
        owner = self._owner("insert")
        if type(other) is not type(self) or other.metadata != self.metadata:
            raise TypeError(
                f"{owner}: other must be a PagedCacheView of the same pool ({self.metadata}), "
                f"got {type(other).__name__} with metadata {getattr(other, 'metadata', None)}"
            )
        slot_index(owner, slot, self.batch_size)
        return other

    def extract(self, slot: Any) -> PagedCacheView:
        """The same pools, for one row (``PagedRows.extract`` forks the row's page table); see
        ``insert`` for bringing the row back."""
        slot_index(self._owner("extract"), slot, self.batch_size)
        return self

    def overflow_rows(self) -> jax.Array:
        """``[batch_size]`` bool, all ``False``: paged capacity is checked on the host before a
        step is built (``OutOfPagesError``/``CapacityError``), so no write is ever dropped."""
        return jnp.zeros((self.batch_size,), jnp.bool_)

    def check_overflow(self) -> None:
        """Nothing can have overflowed (see ``overflow_rows``)."""

    def _overflow_limit(self) -> str:
        return "the page pool"


def _copy_indices(owner: str, copy_ops: Any, num_pages: int) -> tuple[jax.Array, jax.Array]:
    """``(src, dst)`` gather/scatter indices; no-op rows get ``src=0`` and an out-of-range
    ``dst`` that a dropping scatter discards (never clipped onto a real page)."""
    if not hasattr(copy_ops, "shape") or not hasattr(copy_ops, "dtype"):
        raise TypeError(f"{owner}: copy_ops must be a [C, 2] int array, got {copy_ops!r}")
    v.check_array(owner, "copy_ops", copy_ops, (None, 2))
    if not jnp.issubdtype(copy_ops.dtype, jnp.integer):
        raise TypeError(f"{owner}: copy_ops must be an integer array, got {copy_ops.dtype}")
    if not v.is_traced(copy_ops):
        ops = np.asarray(copy_ops)
        real = np.all(ops != -1, axis=1)
        half = np.any(ops == -1, axis=1) & ~np.all(ops == -1, axis=1)
        bad = real & (np.any((ops < 0) | (ops >= num_pages), axis=1) | (ops[:, 0] == ops[:, 1]))
        if np.any(half) or np.any(bad):
            row = int(np.flatnonzero(half | bad)[0])
            raise ValueError(
                f"{owner}: copy_ops row {row} = {ops[row].tolist()} must be two distinct page "
                f"ids in [0, {num_pages}) or (-1, -1)"
            )
        targets, counts = np.unique(ops[real, 1], return_counts=True)
        if np.any(counts > 1):
            raise ValueError(
                f"{owner}: copy_ops copies into page {int(targets[counts > 1][0])} twice (which "
                f"copy lands is unspecified); every destination must be distinct"
            )
    ops = jnp.asarray(copy_ops, jnp.int32)
    real = jnp.all((ops >= 0) & (ops < num_pages), axis=1)
    src = jnp.where(real, ops[:, 0], 0)
    dst = jnp.where(real, ops[:, 1], num_pages)
    return src, dst


@pytree_dataclass
class PagedCache(LayerCache):
    """A paged KV cache: one ``PagedCacheView`` (page pool) per layer. Its row operations move
    nothing on the device (see the module docstring); ``jaxkv.pages.PagedRows`` moves the page
    tables."""

    views: tuple[PagedCacheView | None, ...]

    metadata_types = (PagedCacheMetadata,)

    def copy_pages(self, copy_ops: jax.Array) -> PagedCache:
        """Apply ``(src, dst)`` page copies (``copy_ops: [C, 2]`` int, ``-1`` rows are no-ops) in
        every layer; jittable (donate the cache to copy in place). ``concatenate_to_cache``
        applies a step's copies itself."""
        return self._map("copy_pages", copy_ops)


PagedCacheMetadata.view_type = PagedCacheView
