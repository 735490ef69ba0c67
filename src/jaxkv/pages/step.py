"""The step-metadata builder: the NumPy arrays one jitted paged-attention step consumes.

`build_step_metadata` turns a list of scheduled rows (a sequence's pages, how many of its tokens are
already computed, and the new token ids to compute now) into fixed-shape int32 arrays. Shapes depend
only on the manager's configuration and on a token bucket, so a jitted step compiles at most
`len(token_buckets)` times.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from jaxkv.pages.errors import CapacityError

_MAX_INT32 = 2**31 - 1


def default_token_buckets(max_num_tokens: int, min_bucket: int = 8) -> tuple[int, ...]:
    """Powers of two from `min_bucket` up to the first one >= `max_num_tokens`.

    >>> default_token_buckets(40)
    (8, 16, 32, 64)
    """
    if (
        isinstance(max_num_tokens, bool)
        or not isinstance(max_num_tokens, int)
        or max_num_tokens < 1
    ):
        raise ValueError(f"max_num_tokens must be an int >= 1, got {max_num_tokens!r}")
    if isinstance(min_bucket, bool) or not isinstance(min_bucket, int) or min_bucket < 1:
        raise ValueError(f"min_bucket must be an int >= 1, got {min_bucket!r}")
    buckets = [min_bucket]
    while buckets[-1] < max_num_tokens:
        buckets.append(buckets[-1] * 2)
    return tuple(buckets)


def validate_token_buckets(token_buckets: Sequence[int]) -> tuple[int, ...]:
    """Check that `token_buckets` is a non-empty, strictly increasing sequence of ints >= 1."""
    buckets = tuple(token_buckets)
    if not buckets:
        raise ValueError("token_buckets must not be empty")
    for bucket in buckets:
        if isinstance(bucket, bool) or not isinstance(bucket, int | np.integer) or bucket < 1:
            raise ValueError(f"token_buckets must hold ints >= 1, got {token_buckets!r}")
    if any(a >= b for a, b in zip(buckets, buckets[1:], strict=False)):
        raise ValueError(f"token_buckets must be strictly increasing, got {token_buckets!r}")
    return tuple(int(b) for b in buckets)


def select_bucket(num_tokens: int, token_buckets: Sequence[int]) -> int:
    """The smallest bucket >= `num_tokens`.

    Raises:
        CapacityError: `num_tokens` exceeds the largest bucket.
    """
    for bucket in token_buckets:
        if bucket >= num_tokens:
            return bucket
    raise CapacityError(
        f"num_tokens={num_tokens} exceeds the largest token bucket {token_buckets[-1]}; "
        "schedule fewer tokens per step or configure larger token_buckets"
    )


@dataclass(frozen=True)
class StepRow:
    """One scheduled sequence, as the builder sees it.

    Attributes:
        seq_id: the sequence's id.
        page_ids: the sequence's page table AFTER this step's allocation and copy-on-write; it
            covers positions `0 .. num_computed + len(new_token_ids) - 1`.
        num_computed: tokens whose KV is already on the device (the first new position).
        new_token_ids: the ids of the tokens computed this step.
    """

    seq_id: Hashable
    page_ids: tuple[int, ...]
    num_computed: int
    new_token_ids: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class StepMetadata:
    """Everything one device step needs, as read-only NumPy arrays (the device contract).

    Let `S = max_num_seqs`, `P = max_pages_per_seq`, `T = num_tokens_padded` (a token bucket) and
    `C = max_num_seqs`. Rows `0 .. num_seqs - 1` are the scheduled sequences in `seq_ids` order; the
    packed token axis holds row 0's new tokens, then row 1's, and so on, then padding.

    Attributes:
        seq_ids: ids of the scheduled sequences, one per real row.
        num_new_tokens: tokens computed this step per real row.
        num_seqs: real rows (`len(seq_ids)`).
        num_tokens: real tokens in the packed axis (`sum(num_new_tokens)`).
        num_tokens_padded: `T`, the smallest token bucket >= `num_tokens`.
        num_copies: real rows of `copy_ops`.
        page_tables: int32 `[S, P]`; row i = row i's pages in position order, unused entries -1;
            rows >= num_seqs all -1.
        context_lens: int32 `[S]`; tokens in KV for row i AFTER this step's writes
            (`num_computed + num_new_tokens`), 0 for padding rows.
        query_start_loc: int32 `[S + 1]`; `query_start_loc[i]` is where row i's new tokens start in
            the packed axis, `query_start_loc[i + 1] - query_start_loc[i]` their count; entries past
            `num_seqs` repeat `num_tokens`.
        slot_mapping: int32 `[T]`; `page * page_size + offset` where each new token's K/V is
            written; -1 for padding (the device must drop those writes, not wrap them).
        positions: int32 `[T]`; absolute position of each new token; 0 for padding.
        token_ids: int32 `[T]`; the new tokens' ids; 0 for padding.
        copy_ops: int32 `[C, 2]`; `(src_page, dst_page)` whole-page copies the device must apply
            BEFORE this step's writes (copy-on-write of shared, partially filled pages); rows
            >= num_copies are -1. At most one copy per sequence per step, hence `C = max_num_seqs`.
        logits_indices: int32 `[S]`; index in the packed axis of row i's last new token (where the
            sampler reads logits); 0 for padding rows.
    """

    seq_ids: tuple[Hashable, ...]
    num_new_tokens: tuple[int, ...]
    num_seqs: int
    num_tokens: int
    num_tokens_padded: int
    num_copies: int
    page_tables: np.ndarray
    context_lens: np.ndarray
    query_start_loc: np.ndarray
    slot_mapping: np.ndarray
    positions: np.ndarray
    token_ids: np.ndarray
    copy_ops: np.ndarray
    logits_indices: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        """The device arrays by field name."""
        return {
            "page_tables": self.page_tables,
            "context_lens": self.context_lens,
            "query_start_loc": self.query_start_loc,
            "slot_mapping": self.slot_mapping,
            "positions": self.positions,
            "token_ids": self.token_ids,
            "copy_ops": self.copy_ops,
            "logits_indices": self.logits_indices,
        }


def build_step_metadata(
    rows: Sequence[StepRow],
    copy_ops: Sequence[tuple[int, int]],
    *,
    num_pages: int,
    page_size: int,
    max_num_seqs: int,
    max_pages_per_seq: int,
    token_buckets: Sequence[int],
) -> StepMetadata:
    """Pack scheduled rows into the fixed-shape arrays described in `StepMetadata`.

    Args:
        rows: 1 to `max_num_seqs` scheduled sequences, each with at least one new token.
        copy_ops: up to `max_num_seqs` `(src_page, dst_page)` pairs to apply before the writes.
        num_pages, page_size, max_num_seqs, max_pages_per_seq: the pool's configuration.
        token_buckets: increasing padded sizes of the packed token axis.

    Raises:
        ValueError: a row or copy op that does not fit the configuration (a page id outside
            `[0, num_pages)`, a page table too short for the new positions, ...).
        CapacityError: more tokens than the largest bucket.
    """
    num_seqs = len(rows)
    if not 1 <= num_seqs <= max_num_seqs:
        raise ValueError(f"rows has {num_seqs} entries; expected 1 to max_num_seqs={max_num_seqs}")
    if len(copy_ops) > max_num_seqs:
        raise ValueError(
            f"copy_ops has {len(copy_ops)} entries; expected at most max_num_seqs={max_num_seqs}"
        )
    # Flatten in Python, then convert once: a step has up to max_num_seqs rows.
    num_new: list[int] = []
    flat_pages: list[int] = []
    flat_tokens: list[int] = []
    flat_positions: list[int] = []
    pages_per_row: list[int] = []
    for row in rows:
        count = len(row.new_token_ids)
        end = row.num_computed + count
        if count == 0:
            raise ValueError(f"row {row.seq_id!r} has no new tokens")
        if row.num_computed < 0:
            raise ValueError(f"row {row.seq_id!r}: num_computed={row.num_computed} is negative")
        if len(row.page_ids) > max_pages_per_seq:
            raise ValueError(
                f"row {row.seq_id!r} has {len(row.page_ids)} pages; "
                f"max_pages_per_seq={max_pages_per_seq}"
            )
        if len(row.page_ids) * page_size < end:
            raise ValueError(
                f"row {row.seq_id!r}: {len(row.page_ids)} page(s) of {page_size} cannot hold "
                f"{end} tokens"
            )
        num_new.append(count)
        pages_per_row.append(len(row.page_ids))
        flat_pages.extend(row.page_ids)
        flat_tokens.extend(row.new_token_ids)
        flat_positions.extend(range(row.num_computed, end))
    pages = np.asarray(flat_pages, dtype=np.int64)
    if pages.size and (pages.min() < 0 or pages.max() >= num_pages):
        bad = int(pages[(pages < 0) | (pages >= num_pages)][0])
        raise ValueError(f"page id {bad} outside [0, num_pages={num_pages}) in a row's page_ids")
    new_tokens = np.asarray(flat_tokens, dtype=np.int64)
    if new_tokens.min() < 0 or new_tokens.max() > _MAX_INT32:
        raise ValueError(f"a new token id is outside [0, {_MAX_INT32}]")
    for src, dst in copy_ops:
        if not (0 <= src < num_pages and 0 <= dst < num_pages) or src == dst:
            raise ValueError(
                f"copy op ({src}, {dst}) must name two distinct pages in [0, num_pages={num_pages})"
            )

    num_tokens = len(flat_tokens)
    num_tokens_padded = select_bucket(num_tokens, token_buckets)
    counts = np.asarray(num_new, dtype=np.int64)
    row_of_page = np.repeat(np.arange(num_seqs), pages_per_row)
    column_of_page = np.arange(pages.size) - np.repeat(
        np.cumsum(pages_per_row) - pages_per_row, pages_per_row
    )
    page_tables = np.full((max_num_seqs, max_pages_per_seq), -1, dtype=np.int32)
    page_tables[row_of_page, column_of_page] = pages

    ends = np.cumsum(counts)
    query_start_loc = np.full((max_num_seqs + 1,), num_tokens, dtype=np.int32)
    query_start_loc[0] = 0
    query_start_loc[1 : num_seqs + 1] = ends
    logits_indices = np.zeros((max_num_seqs,), dtype=np.int32)
    logits_indices[:num_seqs] = ends - 1

    token_positions = np.asarray(flat_positions, dtype=np.int64)
    row_of_token = np.repeat(np.arange(num_seqs), counts)
    context_lens = np.zeros((max_num_seqs,), dtype=np.int32)
    context_lens[:num_seqs] = token_positions[ends - 1] + 1
    token_pages = page_tables[row_of_token, token_positions // page_size].astype(np.int64)
    slot_mapping = np.full((num_tokens_padded,), -1, dtype=np.int32)
    slot_mapping[:num_tokens] = token_pages * page_size + token_positions % page_size
    positions = np.zeros((num_tokens_padded,), dtype=np.int32)
    positions[:num_tokens] = token_positions
    token_ids = np.zeros((num_tokens_padded,), dtype=np.int32)
    token_ids[:num_tokens] = new_tokens
    copy_array = np.full((max_num_seqs, 2), -1, dtype=np.int32)
    if copy_ops:
        copy_array[: len(copy_ops)] = np.asarray(copy_ops, dtype=np.int32)

    _check_outgoing(
        page_tables,
        slot_mapping,
        copy_array,
        query_start_loc,
        num_tokens=num_tokens,
        num_copies=len(copy_ops),
        num_pages=num_pages,
        page_size=page_size,
    )
    step_arrays = (page_tables, context_lens, query_start_loc, slot_mapping, positions, token_ids)
    for array in (*step_arrays, copy_array, logits_indices):
        array.setflags(write=False)
    return StepMetadata(
        seq_ids=tuple(row.seq_id for row in rows),
        num_new_tokens=tuple(num_new),
        num_seqs=num_seqs,
        num_tokens=num_tokens,
        num_tokens_padded=num_tokens_padded,
        num_copies=len(copy_ops),
        page_tables=page_tables,
        context_lens=context_lens,
        query_start_loc=query_start_loc,
        slot_mapping=slot_mapping,
        positions=positions,
        token_ids=token_ids,
        copy_ops=copy_array,
        logits_indices=logits_indices,
    )


def _check_outgoing(
    page_tables: np.ndarray,
    slot_mapping: np.ndarray,
    copy_ops: np.ndarray,
    query_start_loc: np.ndarray,
    *,
    num_tokens: int,
    num_copies: int,
    num_pages: int,
    page_size: int,
) -> None:
    """Every page id or slot leaving the host is in range or the -1 sentinel; never clipped."""
    used = page_tables[page_tables != -1]
    if used.size and (used.min() < 0 or used.max() >= num_pages):
        raise AssertionError(f"page_tables holds a page id outside [0, {num_pages})")
    real_slots = slot_mapping[:num_tokens]
    if real_slots.size and (real_slots.min() < 0 or real_slots.max() >= num_pages * page_size):
        raise AssertionError(f"slot_mapping holds a slot outside [0, {num_pages * page_size})")
    if np.any(slot_mapping[num_tokens:] != -1):
        raise AssertionError("slot_mapping padding is not -1")
    real_copies = copy_ops[:num_copies]
    if real_copies.size and (real_copies.min() < 0 or real_copies.max() >= num_pages):
        raise AssertionError(f"copy_ops holds a page id outside [0, {num_pages})")
    if np.any(copy_ops[num_copies:] != -1):
        raise AssertionError("copy_ops padding is not -1")
    if np.any(np.diff(query_start_loc) < 0) or query_start_loc[-1] != num_tokens:
        raise AssertionError("query_start_loc is not a non-decreasing prefix sum of the new tokens")
