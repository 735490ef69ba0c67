"""Where an engine's sequences live on the device: the paged backend (one page pool driven by a
``PageManager``: prefix caching, forks with copy-on-write, preemption) and the contiguous
backend (one ``TransformerCache`` row, or *slot*, per sequence).

A backend knows nothing of requests or sampling. The engine hands it a plan, ``[(sequence,
num_new_tokens), ...]`` in row order, and gets back the logits of each row's last new token; in
a *verification* step (speculative decoding: every row decodes its last token and its drafts)
the logits of every new token instead, and ``rollback`` then forgets the rejected drafts.
Every step shape comes from a small fixed set (``shapes()``), so a workload compiles a bounded
number of functions, all of them before the first token when the engine warms up.

Given a ``Placement`` (``jaxkv.engine.placement``: an engine on a device mesh), a backend builds
its cache in its shards, sizes the default page pool by what one device holds of a page,
replicates each step's host inputs and keeps the cache's shardings through every step and row
operation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv._sizes import ceil_div, next_power_of_two
from jaxkv.caches.paged import PagedCache, PagedCacheMetadata
from jaxkv.engine.model import Model
from jaxkv.engine.placement import Placement
from jaxkv.engine.prefix_store import PrefixDirectory, RowPrefix, prefix_fingerprint
from jaxkv.engine.requests import CacheConfig, SchedulerConfig
from jaxkv.engine.step import compiled_forward
from jaxkv.engine.step_inputs import paged_runtime
from jaxkv.io.cache_store import CacheFingerprint
from jaxkv.pages import PageManager

Plan = Sequence[tuple[Any, int]]
"""``[(sequence, num_new_tokens), ...]``; a sequence has ``seq_id`` and ``tokens``."""

Shape = tuple[int, int, int]
"""``(num_tokens, max_query_len, logits_per_row)`` of a step: ``logits_per_row`` is 1, or the
verification width (a verification step has logits at every new token)."""


def verify_indices(starts: np.ndarray, counts: np.ndarray, width: int) -> np.ndarray:
    """``[rows, width]`` int32 token indices of a verification step: row ``i``'s new tokens
    start at ``starts[i]``; past its ``counts[i]`` tokens (and on empty rows) the index repeats
    its last token (those logits are never read)."""
    columns = np.minimum(np.arange(width)[None, :], np.maximum(counts - 1, 0)[:, None])
    return (starts[:, None] + columns).astype(np.int32)


def mixed_buckets(scheduler: SchedulerConfig, floor: int) -> tuple[int, ...]:
    """Token counts of steps that prefill: ``scheduler.prefill_buckets``, or the budget and a
    quarter of it when that is still above ``floor``."""
    budget = scheduler.max_num_batched_tokens
    if scheduler.prefill_buckets is not None:
        return tuple(b for b in scheduler.prefill_buckets if b > floor) or (budget,)
    quarter = next_power_of_two(max(budget // 4, 1))
    return tuple(sorted({budget, *((quarter,) if floor < quarter < budget else ())}))


class _Backend:
    """What both backends share: the fingerprint their caches are saved under."""

    model: Any
    cache: Any

    @functools.cached_property
    def fingerprint(self) -> CacheFingerprint:
        """The fingerprint of this backend's cache on disk (prefix files, saved prompts): the
        model, tokenizer, layout, dtype, codec and page size; computed once."""
        return prefix_fingerprint(self.model, self.cache)


class PagedBackend(_Backend):
    """Sequences in one page pool; ``manager`` is the host truth about it.

    Step shapes: decode steps pack ``max_num_seqs`` tokens (or a quarter of that, when few
    sequences run) with one query per row; steps that prefill pack a token bucket of
    ``mixed_buckets`` with queries up to the bucket wide.
    """

    kind = "paged"

    def __init__(
        self,
        model: Model,
        cache: CacheConfig,
        scheduler: SchedulerConfig,
        max_model_len: int,
        verify_width: int = 0,
        placement: Placement | None = None,
    ):
        config = model.config
        self.model = model
        self.placement = placement
        self.rows = scheduler.max_num_seqs
        self.budget = scheduler.max_num_batched_tokens
        self.max_row_tokens = self.budget
        self.max_prefill_rows = min(scheduler.max_prefill_seqs, self.rows)
        page_size = cache.page_size
        max_pages_per_seq = ceil_div(max_model_len, page_size)
        probe = PagedCacheMetadata.create(
            config.num_layers,
            max_pages_per_seq,
            page_size,
            config.num_kv_heads,
            config.head_dim,
            self.rows,
            max_pages_per_seq,
            dtype=model.dtype,
            kv_quantization=cache.kv_quantization,
        )
        num_pages = cache.num_pages
        if num_pages is None:
            # Every row's longest sequence, plus a copy-on-write page per row, within budget.
            worst = self.rows * (max_pages_per_seq + 1)
            affordable = cache.memory_bytes // self._page_bytes(probe)
            num_pages = max(min(worst, affordable), max_pages_per_seq + 1)
        if num_pages < max_pages_per_seq:
            raise ValueError(
                f"CacheConfig: num_pages={num_pages} cannot hold one sequence of max_model_len="
                f"{max_model_len} tokens ({max_pages_per_seq} pages of {page_size}); expected "
                f"num_pages >= {max_pages_per_seq}"
            )
        self.metadata = probe.replace(num_pages=num_pages)
        # Decode steps pad to all rows, or to a quarter of them when few are running (the
        # matmuls of a step cost what its padded token count costs).
        self.decode_buckets = tuple(sorted({self.rows, max(1, self.rows // 4)}))
        self.mixed = mixed_buckets(scheduler, self.rows)
        self.verify_width = verify_width
        verify = [b * verify_width for b in self.decode_buckets] if verify_width else []
        if placement is None:
            self.cache = PagedCache.init_cache(self.metadata)
        else:
            self.cache = placement.build_cache(lambda: PagedCache.init_cache(self.metadata))
        self.page_size = page_size
        self.prefix_caching = cache.enable_prefix_caching
        # Pages evicted from the prefix cache go to disk and come back on a miss.
        self.directory = None
        if cache.prefix_cache_dir is not None:
            self.directory = PrefixDirectory(
                cache.prefix_cache_dir, cache.prefix_cache_dir_max_bytes, self.fingerprint
            )
        self.manager = PageManager(
            num_pages,
            page_size,
            self.rows,
            max_pages_per_seq,
            enable_prefix_caching=cache.enable_prefix_caching,
            hash_key=None if self.directory is None else self.directory.hash_key,
            token_buckets=sorted({*self.decode_buckets, *self.mixed, *verify}),
            record_evictions=self.directory is not None,
        )

    # -- prefixes on disk ------------------------------------------------------------------

    def spill_evictions(self) -> None:
        """Write the pages just evicted from the prefix cache to the directory (before anything
        overwrites them)."""
        evicted = self.manager.take_evictions()
        if evicted and self.directory is not None:
            self.directory.spill(self.cache, evicted)

    def restore_prefix(self, seq: Any) -> None:
        """Bring back from the directory the pages of ``seq``'s prompt the pool misses."""
        size = self.page_size
        limit = (len(seq.tokens) - 1) // size  # the pages add_sequence may hit
        if self.directory is None or limit <= 0:
            return
        head = seq.tokens[: limit * size]
        salt = seq.cache_salt
        first = len(self.manager.cached_prefix(head, cache_salt=salt))
        if first == limit:
            return
        hashes = self.manager.prefix_hashes(head, cache_salt=salt)
        if hashes[first] in self.directory:
            self.directory.restore(self, head, hashes, first, salt)

    def persist_prefixes(self) -> int:
        """Write every page of the prefix cache to the directory; pages written."""
        if self.directory is None:
            return 0
        self.spill_evictions()
        return self.directory.spill(self.cache, self.manager.cached_pages())

    def _page_bytes(self, metadata: PagedCacheMetadata) -> int:
        """Bytes of one page (every layer's keys, values and scales) on one device: all of it
        on one device; on a mesh, the part of it each device holds (a pool split over
        ``"tensor"`` by KV heads holds ``1 / tensor`` of each page per device)."""
        if self.placement is None:
            return metadata.bytes_per_page()
        return ceil_div(self.placement.per_device_bytes(metadata), metadata.num_pages)

    # -- sequences -------------------------------------------------------------------------

    def admit(self, seq: Any) -> int:
        """Register a sequence; returns its prompt tokens served by the prefix cache."""
        if self.directory is not None:
            self.restore_prefix(seq)
        return self.manager.add_sequence(seq.seq_id, seq.tokens, cache_salt=seq.cache_salt)

    def release(self, seq: Any) -> None:
        if seq.seq_id in self.manager:
            self.manager.free(seq.seq_id)

    def fork(self, parent: Any, child: Any) -> None:
        self.manager.fork(parent.seq_id, child.seq_id)

    def append(self, seq: Any, token: int) -> None:
        self.manager.append_tokens(seq.seq_id, [token])

    def speculate(self, seq: Any, drafts: Sequence[int]) -> None:
        """The drafts join the sequence's known tokens (the next step computes them)."""
        self.manager.append_tokens(seq.seq_id, list(drafts))

    def rollback(self, seq: Any, num_tokens: int) -> None:
        """Keep the sequence's first ``num_tokens`` tokens: pages left empty go back to the
        pool; pages the prefix cache took stay valid (their key/values belong to their own
        tokens, rejected drafts or not)."""
        self.manager.truncate(seq.seq_id, num_tokens)

    def fits(self, plan: Plan) -> bool:
        batch = [(seq.seq_id, count) for seq, count in plan]
        return self.manager.pages_needed(batch) <= self.manager.num_available_pages

    @property
    def pages_used(self) -> int:
        return self.manager.num_used_pages

    # -- steps -----------------------------------------------------------------------------

    def shapes(self) -> list[Shape]:
        """Every ``(num_tokens, max_query_len, logits_per_row)`` a step may take."""
        width = self.verify_width
        verify = [(b * width, width, width) for b in self.decode_buckets] if width else []
        return [
            *((b, 1, 1) for b in self.decode_buckets),
            *((b, b, 1) for b in self.mixed),
            *verify,
        ]

    def _shape(self, counts: list[int], verify: bool) -> Shape:
        total, longest = sum(counts), max(counts)
        if verify:
            width = self.verify_width
            return next(b for b in self.decode_buckets if b >= len(counts)) * width, width, width
        if longest == 1 and total <= self.rows:
            return next(b for b in self.decode_buckets if b >= total), 1, 1
        bucket = next(b for b in self.mixed if b >= total)
        return bucket, bucket, 1

    def _split(self, shape: Shape) -> int:
        """The leading rows that may prefill (the others decode one token); every row of a
        verification step takes several tokens."""
        _, width, logits_per_row = shape
        if logits_per_row > 1:
            return 0
        return self.max_prefill_rows if width > 1 and self.max_prefill_rows < self.rows else 0

    def _inputs(self, runtime: Any, logits_per_row: int) -> tuple[Any, ...]:
        indices = runtime.logits_indices
        if logits_per_row > 1:
            starts = np.asarray(runtime.query_start_loc)
            counts = np.diff(starts)
            indices = jnp.asarray(verify_indices(starts[:-1], counts, logits_per_row).reshape(-1))
        host = (runtime.token_ids, runtime, indices)
        if self.placement is not None:
            host = self.placement.host(host)
        return (self.model.params, self.cache, *host)

    def run(
        self, plan: Plan, on_compile: Callable[[float], None], verify: bool = False
    ) -> tuple[jax.Array, list[int]]:
        """Run one step: ``(logits [rows, vocab], logits row of each plan entry)``; with
        ``verify``, ``logits [rows * verify_width, vocab]`` and each entry's first row (its
        ``i``-th new token at ``row + i``)."""
        manager = self.manager
        step = manager.schedule([(seq.seq_id, count) for seq, count in plan])
        try:
            self.spill_evictions()  # the step may write into pages it evicted
            shape = self._shape([count for _, count in plan], verify)
            tokens, width, logits_per_row = shape
            runtime = paged_runtime(
                step, num_tokens=tokens, max_query_len=width, prefill_rows=self._split(shape)
            )
            args = self._inputs(runtime, logits_per_row)
            compiled, seconds = compiled_forward(
                self.model.config, *args, keep_cache_sharding=self.placement is not None
            )
            if seconds:
                on_compile(seconds)
            logits, self.cache = compiled(*args)
        except BaseException:
            manager.abandon_step(step)  # the step's sequences are freed; the engine drops them
            raise
        manager.commit_step(step)
        return logits, [row * logits_per_row for row in range(len(plan))]

    def warm(self, shape: Shape) -> float:
        """Compile one step shape (on an empty step of that shape); seconds spent."""
        tokens, width, logits_per_row = shape
        manager = PageManager(
            self.metadata.num_pages,
            self.metadata.page_size,
            self.rows,
            self.metadata.max_pages_per_seq,
            token_buckets=[tokens],
        )
        count = min(width, manager.max_seq_len)
        manager.add_sequence("warm", [0] * count)
        step = manager.schedule([("warm", count)])
        runtime = paged_runtime(
            step, num_tokens=tokens, max_query_len=width, prefill_rows=self._split(shape)
        )
        # Slots of -1 write nothing: the step runs once (a first run costs more than later
        # ones) without touching a page.
        runtime = runtime.replace(slot_mapping=jnp.full_like(runtime.slot_mapping, -1))
        args = self._inputs(runtime, logits_per_row)
        compiled, spent = compiled_forward(
            self.model.config, *args, keep_cache_sharding=self.placement is not None
        )
        logits, self.cache = compiled(*args)
        logits.block_until_ready()
        return spent


@jax.jit
def _reset_rows(cache: Any, mask: jax.Array) -> Any:
    return cache.reset_rows(mask)


@jax.jit
def _copy_rows(cache: Any, indices: jax.Array) -> Any:
    return cache.reorder(indices)


@jax.jit
def _insert_row(cache: Any, row: Any, slot: jax.Array) -> Any:
    return cache.insert(row, slot)


@jax.jit
def _truncate_rows(cache: Any, rows: jax.Array, lengths: jax.Array) -> Any:
    """Rows where ``rows: [batch]`` bool is set keep their first ``lengths[b]`` tokens; the
    others keep their current length (every layer of a stack holds the same tokens per row)."""
    current = next(view for view in cache if view is not None).lengths
    return cache.truncate(jnp.where(rows, lengths, current))


class ContiguousBackend(_Backend):
    """One ``max_model_len`` row of a ``TransformerCache`` per sequence.

    Steps lay tokens out ``[max_num_seqs, width]`` (right-padded): width 1 for decode steps,
    else a bucket of ``mixed_buckets`` of the per-row chunk. No pages: nothing is shared and
    nothing runs out (a sequence is admitted only into a free row, and never grows past
    ``max_model_len``).
    """

    kind = "contiguous"

    def __init__(
        self,
        model: Model,
        cache: CacheConfig,
        scheduler: SchedulerConfig,
        max_model_len: int,
        verify_width: int = 0,
        placement: Placement | None = None,
    ):
        self.model = model
        self.placement = placement
        self.rows = scheduler.max_num_seqs
        self.verify_width = verify_width
        self.budget = scheduler.max_num_batched_tokens
        # Every row of the layout pays for the widest one: the chunk is the budget per row.
        self.max_row_tokens = max(16, self.budget // self.rows // 16 * 16)
        self.max_prefill_rows = self.rows
        widths = {b // self.rows for b in mixed_buckets(scheduler, 0)}
        widths = {w for w in widths if 1 < w < self.max_row_tokens} | {self.max_row_tokens}
        self.mixed = tuple(sorted(widths))
        # A verification step writes a row's drafts; rings and recurrent layers keep enough
        # spare slots and state checkpoints to forget all of them.
        self.rollback_depth = max(verify_width - 1, 0)

        def build() -> Any:
            return model.contiguous_cache(
                self.rows, max_model_len, cache.kv_quantization, rollback_depth=self.rollback_depth
            )

        self.cache = build() if placement is None else placement.build_cache(build)
        self.max_model_len = max_model_len
        self.kv_quantization = cache.kv_quantization
        self.page_size = 0
        self.prefix_caching = False
        self.free_slots = list(range(self.rows))
        self.slot_of: dict[Hashable, int] = {}
        self.to_reset: set[int] = set()
        self.to_truncate: dict[int, int] = {}
        # A saved prompt (Engine.load_prefix) that admitted sequences may start from, and the
        # tokens each released row still holds (Engine.save_prefix saves one of them).
        self.row_prefix: RowPrefix | None = None
        self.released: dict[int, list[int]] = {}

    def empty_row(self) -> Any:
        """An empty one-row cache of this backend's configuration."""
        return self.model.contiguous_cache(
            1, self.max_model_len, self.kv_quantization, rollback_depth=self.rollback_depth
        )

    def row_holding(self, tokens: Sequence[int]) -> int | None:
        """A released slot whose row still holds the KV of ``tokens`` (and maybe more), or
        ``None``."""
        width = len(tokens)
        for slot, held in self.released.items():
            if held[:width] == list(tokens) and len(held) >= width:
                return slot
        return None

    def admit(self, seq: Any) -> int:
        slot = self.free_slots.pop(0)
        self.slot_of[seq.seq_id] = slot
        self.released.pop(slot, None)
        cached, row = 0, None
        if self.row_prefix is not None:
            cached, row = self.row_prefix.take(seq.tokens, seq.cache_salt)
        if row is None:
            self.to_reset.add(slot)
            return 0
        self._flush()
        self.cache = self._rows(_insert_row, row, np.int32(slot))
        return cached

    def release(self, seq: Any) -> None:
        slot = self.slot_of.pop(seq.seq_id, None)
        if slot is not None:
            self.released[slot] = list(seq.tokens[: seq.num_computed])
            self.free_slots.append(slot)
            self.free_slots.sort()

    def fork(self, parent: Any, child: Any) -> None:
        slot = self.free_slots.pop(0)
        self.slot_of[child.seq_id] = slot
        self.released.pop(slot, None)
        self._flush()
        indices = np.arange(self.rows, dtype=np.int32)
        indices[slot] = self.slot_of[parent.seq_id]
        self.cache = self._rows(_copy_rows, indices)

    def append(self, seq: Any, token: int) -> None:
        pass

    def speculate(self, seq: Any, drafts: Sequence[int]) -> None:
        pass

    def rollback(self, seq: Any, num_tokens: int) -> None:
        """Keep the row's first ``num_tokens`` tokens (applied before the next step)."""
        self.to_truncate[self.slot_of[seq.seq_id]] = num_tokens

    def fits(self, plan: Plan) -> bool:
        return True

    @property
    def pages_used(self) -> int:
        return 0

    def _flush(self) -> None:
        """Apply the pending row resets and rollbacks."""
        if self.to_reset:
            mask = np.zeros((self.rows,), bool)
            mask[list(self.to_reset)] = True
            self.cache = self._rows(_reset_rows, mask)
            self.to_reset.clear()
        if self.to_truncate:
            rows = np.zeros((self.rows,), bool)
            lengths = np.zeros((self.rows,), np.int32)
            for slot, length in self.to_truncate.items():
                rows[slot], lengths[slot] = True, length
            self.cache = self._rows(_truncate_rows, rows, lengths)
            self.to_truncate.clear()

    def _rows(self, operation: Any, *arguments: np.ndarray) -> Any:
        """The cache after a jitted row operation (``_reset_rows``, ``_copy_rows`` or
        ``_truncate_rows``) with ``arguments: [rows]`` each; on a mesh, each array stays where
        it was."""
        if self.placement is None:
            return operation(self.cache, *arguments)
        arguments = tuple(self.placement.host(a) for a in arguments)
        return self.placement.keeping(operation.__wrapped__, self.cache, *arguments)

    def shapes(self) -> list[Shape]:
        width = self.verify_width
        verify = [(self.rows * width, width, width)] if width else []
        return [(self.rows, 1, 1), *((self.rows * b, b, 1) for b in self.mixed), *verify]

    def _width(self, counts: list[int]) -> int:
        longest = max(counts)
        return 1 if longest == 1 else next(b for b in self.mixed if b >= longest)

    def _inputs(self, tokens: np.ndarray, counts: np.ndarray, verify: bool) -> tuple[Any, ...]:
        runtime = self.model.rows_runtime(counts)
        if verify:
            starts = np.zeros_like(counts)
            indices = jnp.asarray(verify_indices(starts, counts, tokens.shape[1]))
        else:
            indices = jnp.asarray(np.maximum(counts - 1, 0))
        host = (jnp.asarray(tokens), runtime, indices)
        if self.placement is not None:
            host = self.placement.host(host)
        return (self.model.params, self.cache, *host)

    def run(
        self, plan: Plan, on_compile: Callable[[float], None], verify: bool = False
    ) -> tuple[jax.Array, list[int]]:
        """Run one step (see ``PagedBackend.run``); a row's logits sit at its slot (times the
        verification width)."""
        self._flush()
        width = self.verify_width if verify else self._width([count for _, count in plan])
        tokens = np.zeros((self.rows, width), np.int32)
        counts = np.zeros((self.rows,), np.int32)
        rows = []
        for seq, count in plan:
            slot = self.slot_of[seq.seq_id]
            start = seq.num_computed
            tokens[slot, :count] = seq.tokens[start : start + count]
            counts[slot] = count
            rows.append(slot * width if verify else slot)
        args = self._inputs(tokens, counts, verify)
        compiled, seconds = self._compiled(args)
        if seconds:
            on_compile(seconds)
        logits, self.cache = compiled(*args)
        if verify:
            logits = logits.reshape(-1, logits.shape[-1])
        return logits, rows

    def warm(self, shape: Shape) -> float:
        _, width, logits_per_row = shape
        counts = np.zeros((self.rows,), np.int32)
        tokens = np.zeros((self.rows, width), np.int32)
        args = self._inputs(tokens, counts, logits_per_row > 1)
        compiled, spent = self._compiled(args)
        logits, self.cache = compiled(*args)  # no row takes a token: nothing is written
        logits.block_until_ready()
        return spent

    def _compiled(self, args: tuple[Any, ...]) -> tuple[Any, float]:
        return compiled_forward(
            self.model.config,
            *args,
            step=self.model.step_function,
            keep_cache_sharding=self.placement is not None,
        )


def make_backend(
    model: Model,
    cache: CacheConfig,
    scheduler: SchedulerConfig,
    max_model_len: int,
    verify_width: int = 0,
    placement: Placement | None = None,
) -> PagedBackend | ContiguousBackend:
    """The backend ``cache.kind`` names; ``verify_width > 0`` adds verification steps of that
    many tokens per row (speculative decoding); ``placement`` puts it on a device mesh."""
    backend = PagedBackend if cache.kind == "paged" else ContiguousBackend
    return backend(model, cache, scheduler, max_model_len, verify_width, placement)
