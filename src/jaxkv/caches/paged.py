"""Paged KV cache: every layer's keys and values in one pool of fixed-size pages.

Layout. Each layer holds ``key_pages: [num_pages, page_size, kv_heads, head_dim]`` and
``value_pages: [num_pages, page_size, kv_heads, value_dim]``. A token lives at
``slot = page * page_size + offset``; keeping the page axis outermost makes a page one contiguous
run of memory, so a page copy, a page read during attention and a token write are each one
contiguous move, and the pool reshapes for free to ``[num_pages * page_size, kv_heads, dim]`` for
the slot scatter. (Heads-outer layouts suit accelerator kernels that read one head at a time;
here whole pages are gathered, and one contiguous page per gather index is what that wants.)

Which page holds which token is decided on the host by ``jaxkv.pages.PageManager``; its
``StepMetadata`` becomes a ``PagedRuntimeMetadata`` (``from_step``), and one device step is:

1. ``cache.copy_pages(runtime.copy_ops)`` -- copy-on-write copies, in every layer;
2. per layer, ``kv, view = view.concatenate_to_cache(key, value, runtime)`` -- write the new
   tokens at ``slot_mapping`` (``-1`` writes nothing);
3. ``jaxkv.ops.attention(query, kv)`` -- ragged paged attention of the packed queries.

16-bit floats are held as ``uint16`` words (see ``jaxkv.caches.storage``) so that XLA's CPU
backend scatters into the pool in place; attention bit-casts the pages it reads. With
``kv_quantization`` (``"int8"``, ``"int4"``, ``"fp8"``, see ``jaxkv.quantization``) the pools hold
the codec's words and each layer also keeps ``[num_pages, page_size, kv_heads, groups]`` scale
pools; tokens are quantised as they are written and attention dequantises each block it reads.

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
from jaxkv import quantization
from jaxkv.abstracts import (
    BaseCache,
    BaseCacheMetadata,
    BaseCacheView,
    BaseRunTimeMetadata,
    pytree_dataclass,
    static_field,
)
from jaxkv.caches import storage
from jaxkv.ops.paged_attention import PagedKV
from jaxkv.pages.step import StepMetadata

_MAX_SLOTS = 2**31 - 1  # slot ids travel as int32


@pytree_dataclass
class PagedCacheMetadata(BaseCacheMetadata):
    """Static configuration of a paged KV cache.

    Attributes:
        num_layers: layers (views) in the cache.
        num_pages: pages in each layer's pool.
        page_size: tokens per page.
        num_kv_heads: KV heads.
        head_dim: head dimension of keys.
        value_dim: head dimension of values (usually ``head_dim``).
        max_num_seqs: rows of every step's page table (sequences per step).
        max_pages_per_seq: width of the page table; a sequence holds at most
            ``max_pages_per_seq * page_size`` tokens.
        sliding_window: ``None``, or the attention window ``W`` (every page stays in the pool;
            attention skips the blocks before the window).
        dtype: storage dtype of keys and values (float32, bfloat16 or float16); with a codec,
            the dtype ``key_states()``/``value_states()`` return.
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
    max_num_seqs: int
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
        max_num_seqs: int,
        max_pages_per_seq: int,
        dtype: Any = jnp.float32,
        *,
        value_dim: int | None = None,
        sliding_window: int | None = None,
        kv_quantization: str = "none",
        quantization_group_size: int | None = None,
    ) -> PagedCacheMetadata:
        """Validated metadata; raises ``ValueError``/``TypeError`` naming the field on bad input.

        ``value_dim`` defaults to ``head_dim``. ``kv_quantization`` picks the storage codec
        (``"none"``, ``"int8"``, ``"int4"``, ``"fp8"``); int4's ``quantization_group_size``
        defaults to ``min(64, head_dim, value_dim)``.
        """
        owner = "PagedCacheMetadata.create"
        return cls(
            num_layers=num_layers,
            num_pages=num_pages,
            page_size=page_size,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            value_dim=head_dim if value_dim is None else value_dim,
            max_num_seqs=max_num_seqs,
            max_pages_per_seq=max_pages_per_seq,
            sliding_window=sliding_window,
            dtype=v.require_float_dtype(owner, "dtype", dtype),
            kv_quantization=kv_quantization,
            quantization_group_size=quantization_group_size,
        )

    @classmethod
    def from_memory_budget(
        cls,
        num_layers: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_num_seqs: int,
        max_pages_per_seq: int,
        dtype: Any = jnp.float32,
        *,
        memory_bytes: int | None = None,
        memory_fraction: float | None = None,
        device: jax.Device | None = None,
        value_dim: int | None = None,
        sliding_window: int | None = None,
        kv_quantization: str = "none",
        quantization_group_size: int | None = None,
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
            max_num_seqs,
            max_pages_per_seq,
            dtype,
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

    def validate(self) -> None:
        owner = type(self).__name__
        for name in (
            "num_layers",
            "num_pages",
            "page_size",
            "num_kv_heads",
            "head_dim",
            "value_dim",
            "max_num_seqs",
            "max_pages_per_seq",
        ):
            v.require_int(owner, name, getattr(self, name), minimum=1)
        v.require_optional_int(owner, "sliding_window", self.sliding_window, minimum=1)
        if self.max_pages_per_seq > self.num_pages:
            raise ValueError(
                f"{owner}: max_pages_per_seq={self.max_pages_per_seq} exceeds "
                f"num_pages={self.num_pages}"
            )
        if self.num_pages * self.page_size > _MAX_SLOTS:
            raise ValueError(
                f"{owner}: num_pages * page_size = {self.num_pages * self.page_size} slots do not "
                f"fit int32 slot ids (at most {_MAX_SLOTS})"
            )
        if not isinstance(self.dtype, np.dtype):
            raise TypeError(f"{owner}: dtype must be a numpy dtype, got {self.dtype!r}")
        v.require_float_dtype(owner, "dtype", self.dtype)
        group_size = quantization.resolve_group_size(
            owner,
            self.kv_quantization,
            self.quantization_group_size,
            (("head_dim", self.head_dim), ("value_dim", self.value_dim)),
        )
        if group_size != self.quantization_group_size:
            # int4's default group size, fixed here so that it is part of the (static) metadata.
            object.__setattr__(self, "quantization_group_size", group_size)

    @property
    def codec(self) -> quantization.KVCodec | None:
        """The storage codec, or ``None`` when unquantised."""
        return quantization.make_codec(self.kv_quantization, self.quantization_group_size)

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

    def bytes_per_token(self) -> int:
        """Bytes of keys and values one token occupies across all layers (scales included)."""
        codec = self.codec
        per_head = quantization.bytes_per_head(
            codec, self.head_dim, self.dtype
        ) + quantization.bytes_per_head(codec, self.value_dim, self.dtype)
        return self.num_layers * self.num_kv_heads * per_head

    def bytes_per_page(self) -> int:
        """Bytes of one page across all layers."""
        return self.page_size * self.bytes_per_token()

    def bytes_total(self) -> int:
        """Bytes the pools of all layers allocate."""
        return self.num_pages * self.bytes_per_page()


# The StepMetadata arrays a runtime carries (all int32).
_RUNTIME_ARRAYS = (
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

    With ``S = max_num_seqs``, ``P = max_pages_per_seq`` and ``T`` the padded token count, every
    field is an int32 array leaf:

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
        max_query_len: (static) a bound on any row's new tokens this step, rounded up to a power
            of two so steps of similar shape share a compiled function; attention lays queries
            out as ``[S, max_query_len]`` and reads each row's pages once. ``0`` means unknown
            (then the bound is ``T``).
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
    max_query_len: int = static_field(0)

    def __post_init__(self) -> None:
        owner = type(self).__name__
        v.require_int(owner, "max_query_len", self.max_query_len, minimum=0)
        for name in (*_RUNTIME_ARRAYS, "num_seqs"):
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
    def from_step(cls, step: StepMetadata) -> PagedRuntimeMetadata:
        """Device arrays (int32) from a host ``StepMetadata``, checked for consistency.

        Raises:
            TypeError: ``step`` is not a ``StepMetadata``.
            ValueError: arrays whose shapes disagree, or values outside the contract (a
                ``query_start_loc`` that is not a prefix sum, a padding slot that is not ``-1``, a
                context shorter than the row's new tokens).
        """
        owner = "PagedRuntimeMetadata.from_step"
        if not isinstance(step, StepMetadata):
            raise TypeError(f"{owner}: step must be a StepMetadata, got {type(step).__name__}")
        arrays = {name: np.asarray(getattr(step, name)) for name in _RUNTIME_ARRAYS}
        runtime = cls(
            **{name: jnp.asarray(array, jnp.int32) for name, array in arrays.items()},
            num_seqs=jnp.asarray(step.num_seqs, jnp.int32),
            max_query_len=_query_bucket(step),
        )
        seqs = arrays["page_tables"].shape[0]
        start = arrays["query_start_loc"]
        if start[0] != 0 or np.any(np.diff(start) < 0) or start[-1] != step.num_tokens:
            raise ValueError(
                f"{owner}: query_start_loc must rise from 0 to num_tokens={step.num_tokens}, "
                f"got {start.tolist()}"
            )
        if not 0 <= step.num_seqs <= seqs:
            raise ValueError(f"{owner}: num_seqs={step.num_seqs} outside [0, {seqs}]")
        slots = arrays["slot_mapping"]
        if step.num_tokens > slots.shape[0] or np.any(slots[step.num_tokens :] != -1):
            raise ValueError(
                f"{owner}: slot_mapping must be -1 past num_tokens={step.num_tokens}, "
                f"got {slots.tolist()}"
            )
        if np.any(arrays["context_lens"] < np.diff(start)):
            raise ValueError(
                f"{owner}: context_lens {arrays['context_lens'].tolist()} shorter than the new "
                f"tokens per row {np.diff(start).tolist()}"
            )
        return runtime

    def token_positions(self) -> jax.Array:
        """``[T]`` int32 positions of the new tokens, ``-1`` where ``slot_mapping`` is ``-1``."""
        return jnp.where(self.slot_mapping >= 0, self.positions, -1).astype(jnp.int32)


def _query_bucket(step: StepMetadata) -> int:
    """The power of two >= the step's longest run of new tokens (at most the padded count)."""
    longest = max(step.num_new_tokens, default=1)
    return min(1 << max(longest - 1, 0).bit_length(), step.num_tokens_padded)


def _check_runtime(owner: str, runtime: Any, metadata: PagedCacheMetadata) -> None:
    if not isinstance(runtime, PagedRuntimeMetadata):
        raise TypeError(
            f"{owner}: runtime must be PagedRuntimeMetadata, got {type(runtime).__name__}"
        )
    m = metadata
    v.check_array(
        owner, "runtime.page_tables", runtime.page_tables, (m.max_num_seqs, m.max_pages_per_seq)
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


@pytree_dataclass
class PagedCacheView(BaseCacheView):
    """One layer of a paged cache.

    Attributes:
        key_pages: ``[num_pages, page_size, kv_heads, head_dim]`` in ``metadata.dtype`` (16-bit
            floats held as ``uint16`` words; ``key_states()`` gives the floats). With a codec:
            its words, ``[num_pages, page_size, kv_heads, codec.stored_dim(head_dim)]``.
        value_pages: ``[num_pages, page_size, kv_heads, value_dim]``, likewise.
        metadata: the cache's ``PagedCacheMetadata`` (static).
        layer_index: which layer this view belongs to (static).
        key_scales: with a codec, ``[num_pages, page_size, kv_heads, groups]`` uint16 (float16
            bits); ``None`` unquantised.
        value_scales: likewise for values.
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
        lead = (m.num_pages, m.page_size, m.num_kv_heads)
        key_pages, key_scales = storage.allocate(lead, m.head_dim, m.dtype, m.codec)
        value_pages, value_scales = storage.allocate(lead, m.value_dim, m.dtype, m.codec)
        return cls(
            key_pages=key_pages,
            value_pages=value_pages,
            metadata=m,
            layer_index=layer_index,
            key_scales=key_scales,
            value_scales=value_scales,
        )

    def key_states(self) -> jax.Array:
        """``[num_pages, page_size, kv_heads, head_dim]`` keys as ``metadata.dtype`` floats (a
        quantised pool is dequantised whole: for inspection; attention reads block by block)."""
        m = self.metadata
        return storage.decode_values(self.key_pages, self.key_scales, m.dtype, m.codec)

    def value_states(self) -> jax.Array:
        """``[num_pages, page_size, kv_heads, value_dim]`` values as ``metadata.dtype`` floats."""
        m = self.metadata
        return storage.decode_values(self.value_pages, self.value_scales, m.dtype, m.codec)

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
        """Write the step's new tokens at ``runtime.slot_mapping``; padding (``-1``) writes nothing.

        Args:
            key: ``[num_tokens, kv_heads, head_dim]``, any float dtype (cast to
                ``metadata.dtype``, or quantised token by token with the metadata's codec),
                packed like ``runtime.slot_mapping``.
            value: ``[num_tokens, kv_heads, value_dim]``.
            runtime: the step's ``PagedRuntimeMetadata``.

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
            return pool.at[pages, offsets].set(new, mode="drop")

        codec = m.codec
        key_words, key_scale = storage.encode_values(key, m.dtype, codec)
        value_words, value_scale = storage.encode_values(value, m.dtype, codec)
        key_pages = write(self.key_pages, key_words)
        value_pages = write(self.value_pages, value_words)
        key_scales = write(self.key_scales, key_scale)
        value_scales = write(self.value_scales, value_scale)
        kv = PagedKV(
            key_pages=key_pages,
            value_pages=value_pages,
            page_tables=runtime.page_tables,
            context_lens=runtime.context_lens,
            query_start_loc=runtime.query_start_loc,
            query_positions=runtime.token_positions(),
            max_query_len=runtime.max_query_len,
            sliding_window=m.sliding_window,
            stored_as=None if codec is not None else storage.stored_as(m.dtype),
            key_scales=key_scales,
            value_scales=value_scales,
            codec=codec,
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

        All sources are read before any destination is written."""
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
    ops = jnp.asarray(copy_ops, jnp.int32)
    real = jnp.all((ops >= 0) & (ops < num_pages), axis=1)
    src = jnp.where(real, ops[:, 0], 0)
    dst = jnp.where(real, ops[:, 1], num_pages)
    return src, dst


@pytree_dataclass
class PagedCache(BaseCache):
    """A paged KV cache: one ``PagedCacheView`` (page pool) per layer."""

    views: tuple[PagedCacheView | None, ...]

    @classmethod
    def init_cache(cls, metadata: PagedCacheMetadata, *, layers: Any = None) -> PagedCache:
        """A cache with a zero-filled pool for every layer (or only for the layer ids in
        ``layers``; the others are ``None``)."""
        owner = "PagedCache.init_cache"
        if not isinstance(metadata, PagedCacheMetadata):
            raise TypeError(
                f"{owner}: metadata must be PagedCacheMetadata, got {type(metadata).__name__}"
            )
        wanted = v.require_layers(owner, layers, metadata.num_layers)
        return cls(
            views=tuple(
                PagedCacheView.init(metadata, i) if i in wanted else None
                for i in range(metadata.num_layers)
            )
        )

    @classmethod
    def init_empty(cls, num_layers: int) -> PagedCache:
        """A cache of ``num_layers`` ``None`` views."""
        v.require_int("PagedCache.init_empty", "num_layers", num_layers, minimum=1)
        return cls(views=(None,) * num_layers)

    def copy_pages(self, copy_ops: jax.Array) -> PagedCache:
        """Apply ``(src, dst)`` page copies (``copy_ops: [C, 2]`` int, ``-1`` rows are no-ops) in
        every layer; jittable (donate the cache to copy in place). Call it before the step's
        writes, with ``PagedRuntimeMetadata.copy_ops``."""
        return self.with_views(
            view if view is None else view.copy_pages(copy_ops) for view in self.views
        )
