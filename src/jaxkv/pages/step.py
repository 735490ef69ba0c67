"""The step-metadata builder: the NumPy arrays one jitted paged-attention step consumes.

`build_step_metadata` turns a list of scheduled rows (a sequence's pages, how many of its tokens are
already computed, and the new token ids to compute now) into fixed-shape int32 arrays. Shapes depend
only on the manager's configuration and on a token bucket, so a jitted step compiles at most
`len(token_buckets)` times.

The device cannot raise, so the builder refuses on the host every step that would lose or mix up a
token's key/value there (see `build_step_metadata` for the rules), and each `StepMetadata` carries
the pool geometry it was built for, so the device side can refuse a cache of another shape.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from jaxkv._sizes import ceil_div
from jaxkv.pages._ints import MAX_INT32, first_non_int, is_int, positive_int
from jaxkv.pages.errors import CapacityError

MAX_TOKEN_BUCKETS = 1024
"""Most token buckets a configuration may list (each one is a separate compile of the step)."""


def default_token_buckets(max_num_tokens: int, min_bucket: int = 8) -> tuple[int, ...]:
    """Powers of two from `min_bucket` up to the first one >= `max_num_tokens`.

    >>> default_token_buckets(40)
    (8, 16, 32, 64)

    Raises:
        ValueError: `max_num_tokens` or `min_bucket` is not an int >= 1.
    """
    if not is_int(max_num_tokens) or max_num_tokens < 1:
        raise ValueError(f"max_num_tokens must be an int >= 1, got {max_num_tokens!r}")
    if not is_int(min_bucket) or min_bucket < 1:
        raise ValueError(f"min_bucket must be an int >= 1, got {min_bucket!r}")
    buckets = [int(min_bucket)]
    while buckets[-1] < max_num_tokens:
        buckets.append(buckets[-1] * 2)
    return tuple(buckets)


def validate_token_buckets(token_buckets: Iterable[int]) -> tuple[int, ...]:
    """Check that `token_buckets` is a non-empty, strictly increasing sequence of ints >= 1 (at most
    `MAX_TOKEN_BUCKETS` of them); return it as a tuple of Python ints.

    An iterator (a generator) is read once, entirely (at most `MAX_TOKEN_BUCKETS + 1` entries: a
    longer one is refused, so an endless one cannot hang the caller).

    Raises:
        ValueError: anything else (not iterable, a str, empty, too long, a non-int or a bool entry,
            an entry < 1, not strictly increasing).
    """
    if isinstance(token_buckets, str | bytes) or not isinstance(token_buckets, Iterable):
        raise ValueError(
            f"token_buckets must be a sequence of increasing ints >= 1, got {token_buckets!r:.80}"
        )
    if isinstance(token_buckets, np.ndarray) and token_buckets.ndim != 1:
        raise ValueError(f"token_buckets must be 1-D, got an array of shape {token_buckets.shape}")
    buckets = tuple(itertools.islice(token_buckets, MAX_TOKEN_BUCKETS + 1))
    if not buckets:
        raise ValueError("token_buckets must not be empty")
    if len(buckets) > MAX_TOKEN_BUCKETS:
        raise ValueError(
            f"token_buckets holds more than MAX_TOKEN_BUCKETS={MAX_TOKEN_BUCKETS} buckets; each "
            "bucket is a separate compile of the step"
        )
    for bucket in buckets:
        if not is_int(bucket) or bucket < 1:
            raise ValueError(f"token_buckets must hold ints >= 1, got {buckets!r:.200}")
    if any(a >= b for a, b in zip(buckets, buckets[1:], strict=False)):
        raise ValueError(f"token_buckets must be strictly increasing, got {buckets!r:.200}")
    return tuple(int(b) for b in buckets)


def select_bucket(num_tokens: int, token_buckets: Iterable[int]) -> int:
    """The smallest bucket >= `num_tokens`.

    Args:
        num_tokens: an int >= 0.
        token_buckets: as accepted by `validate_token_buckets`.

    Raises:
        TypeError: `num_tokens` is not an int (a bool, a float, ...).
        ValueError: `num_tokens` is negative, or `token_buckets` is malformed.
        CapacityError: `num_tokens` exceeds the largest bucket.
    """
    if not is_int(num_tokens):
        raise TypeError(
            f"num_tokens must be an int, got {type(num_tokens).__name__} {num_tokens!r}"
        )
    if num_tokens < 0:
        raise ValueError(f"num_tokens={num_tokens} is negative; expected an int >= 0")
    buckets = validate_token_buckets(token_buckets)
    for bucket in buckets:
        if bucket >= num_tokens:
            return bucket
    raise CapacityError(
        f"num_tokens={num_tokens} exceeds the largest token bucket {buckets[-1]}; "
        "schedule fewer tokens per step or configure larger token_buckets"
    )


@dataclass(frozen=True)
class StepRow:
    """One scheduled sequence, as the builder sees it.

    Attributes:
        seq_id: the sequence's id.
        page_ids: the sequence's page table AFTER this step's allocation and copy-on-write; it
            covers positions `0 .. num_computed + len(new_token_ids) - 1`. An entry may be -1
            (no page: released before a sliding window) where the row does not write.
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

    What the builder guarantees beyond the shapes (the device relies on it and checks none of it):
    no page appears twice in a row; a page a row writes this step is in no other row; every real
    slot of `slot_mapping` is distinct; copy destinations are distinct, are no copy's source, and
    are each a page some row writes this step (hence in no other row). The step also records the
    pool geometry it was built for (`num_pages`, `page_size`, `max_num_seqs`,
    `max_pages_per_seq`): the device cache must have exactly that geometry, since a cache of
    other `num_pages` or `page_size` would drop writes or read other sequences' pages.

    Attributes:
        seq_ids: ids of the scheduled sequences, one per real row (distinct).
        num_new_tokens: tokens computed this step per real row.
        num_seqs: real rows (`len(seq_ids)`).
        num_tokens: real tokens in the packed axis (`sum(num_new_tokens)`).
        num_tokens_padded: `T`, the smallest token bucket >= `num_tokens`.
        num_copies: real rows of `copy_ops`.
        page_tables: int32 `[S, P]`; row i = row i's pages in position order, unused entries -1
            (past the context, or released before a sliding window); rows >= num_seqs all -1.
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
        num_pages: pages in the pool the step was built for (page ids `0 .. num_pages - 1`).
        page_size: tokens per page of that pool (`slot_mapping` is `page * page_size + offset`).
        max_num_seqs: `S`, the row count of the row arrays.
        max_pages_per_seq: `P`, the page-table width.
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
    num_pages: int
    page_size: int
    max_num_seqs: int
    max_pages_per_seq: int

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
    copy_ops: Sequence[tuple[int, int]] | np.ndarray,
    *,
    num_pages: int,
    page_size: int,
    max_num_seqs: int,
    max_pages_per_seq: int,
    token_buckets: Sequence[int],
) -> StepMetadata:
    """Pack scheduled rows into the fixed-shape arrays described in `StepMetadata`.

    Refused, because the device would lose a token's key/value or read another one's:

    - a page twice in one row's page table;
    - a page a row writes this step (the pages of positions `num_computed .. end - 1`) that is
      also in another row's page table: a writer's page is its own (pages shared by forks are
      read-only until copy-on-write gave the writer a private copy); pages read but not written
      may be shared by several rows;
    - two copies into one destination page, a copy destination that is also a copy source, a copy
      destination that some row reads without writing it, and a copy destination that no row
      writes this step (a copy exists to give a writer its private page);
    - two rows of one sequence.

    The checks are vectorised: a step has at most `max_num_seqs` rows.

    Args:
        rows: 1 to `max_num_seqs` scheduled sequences (`StepRow`), each with at least one new token;
            `page_ids` and `new_token_ids` are sequences (or 1-D integer arrays) of ints.
        copy_ops: up to `max_num_seqs` `(src_page, dst_page)` pairs to apply before the writes (a
            sequence of pairs or an int array of shape `[n, 2]`).
        num_pages, page_size, max_num_seqs, max_pages_per_seq: the pool's configuration, ints >= 1
            with `num_pages * page_size <= 2**31 - 1`; recorded in the result.
        token_buckets: increasing padded sizes of the packed token axis.

    Raises:
        TypeError: a malformed row or copy op (not a `StepRow`, an unhashable `seq_id`, a non-int
            page id, token id or `num_computed`, a generator instead of a sequence, ...).
        ValueError: a row or copy op that does not fit the configuration (a page id outside
            `[0, num_pages)`, a page table too short for the new positions, ...), one of the
            refusals above, or a malformed configuration.
        CapacityError: more tokens than the largest bucket.
    """
    num_pages = positive_int("num_pages", num_pages)
    page_size = positive_int("page_size", page_size)
    max_num_seqs = positive_int("max_num_seqs", max_num_seqs)
    max_pages_per_seq = positive_int("max_pages_per_seq", max_pages_per_seq)
    if num_pages * page_size > MAX_INT32:
        raise ValueError(
            f"num_pages * page_size = {num_pages * page_size} slots do not fit the int32 "
            f"slot_mapping; expected at most {MAX_INT32}"
        )
    token_buckets = validate_token_buckets(token_buckets)
    if isinstance(rows, str | bytes) or not isinstance(rows, Sequence):
        raise TypeError(f"rows must be a sequence of StepRow, got {rows!r:.80}")
    num_seqs = len(rows)
    if not 1 <= num_seqs <= max_num_seqs:
        raise ValueError(f"rows has {num_seqs} entries; expected 1 to max_num_seqs={max_num_seqs}")
    copies = _copy_pairs(copy_ops, num_pages=num_pages, max_num_seqs=max_num_seqs)
    # Flatten in Python, then convert once: a step has up to max_num_seqs rows.
    num_new: list[int] = []
    flat_pages: list[int] = []
    flat_tokens: list[int] = []
    flat_positions: list[int] = []
    pages_per_row: list[int] = []
    first_written: list[int] = []
    end_written: list[int] = []
    seen: dict[Hashable, int] = {}
    for index, row in enumerate(rows):
        page_ids, new_token_ids, start = _check_row(
            index, row, page_size=page_size, max_pages=max_pages_per_seq
        )
        try:
            repeated = row.seq_id in seen
        except TypeError:
            raise TypeError(f"rows[{index}].seq_id must be hashable, got {row.seq_id!r}") from None
        if repeated:
            raise ValueError(
                f"rows[{index}] repeats seq_id={row.seq_id!r} of rows[{seen[row.seq_id]}]; a "
                "sequence is one row of a step"
            )
        seen[row.seq_id] = index
        end = start + len(new_token_ids)
        num_new.append(len(new_token_ids))
        pages_per_row.append(len(page_ids))
        first_written.append(start // page_size)
        end_written.append(ceil_div(end, page_size))
        flat_pages.extend(page_ids)
        flat_tokens.extend(new_token_ids)
        flat_positions.extend(range(start, end))
    # Types and ranges once per step, over the flattened values (a row's culprit is found only
    # on the way to an error); then these conversions cannot overflow.
    _check_values(rows, "page_ids", flat_pages, pages_per_row, low=-1, high=num_pages - 1)
    _check_values(rows, "new_token_ids", flat_tokens, num_new, low=0, high=MAX_INT32)
    pages = np.asarray(flat_pages, dtype=np.int64)
    new_tokens = np.asarray(flat_tokens, dtype=np.int64)
    row_of_page = np.repeat(np.arange(num_seqs), pages_per_row)
    column_of_page = np.arange(pages.size) - np.repeat(
        np.cumsum(pages_per_row) - pages_per_row, pages_per_row
    )
    written = (column_of_page >= np.asarray(first_written)[row_of_page]) & (
        column_of_page < np.asarray(end_written)[row_of_page]
    )
    missing = written & (pages < 0)
    if missing.any():
        at = int(np.argmax(missing))
        raise ValueError(
            f"{_row_name(*_at(rows, row_of_page[at]))}: page_ids[{int(column_of_page[at])}] is -1 "
            "(no page) but the row writes there this step; only pages it reads may be released"
        )
    held = pages >= 0
    pages, row_of_page, column_of_page, written = (
        array[held] for array in (pages, row_of_page, column_of_page, written)
    )
    _check_exclusive(rows, pages, row_of_page, column_of_page, written, num_pages=num_pages)
    _check_copies(rows, copies, pages, row_of_page, column_of_page, written)

    num_tokens = len(flat_tokens)
    num_tokens_padded = select_bucket(num_tokens, token_buckets)
    counts = np.asarray(num_new, dtype=np.int64)
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
    copy_array[: len(copies)] = copies

    _check_outgoing(
        page_tables,
        slot_mapping,
        copy_array,
        query_start_loc,
        num_tokens=num_tokens,
        num_copies=len(copies),
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
        num_copies=len(copies),
        page_tables=page_tables,
        context_lens=context_lens,
        query_start_loc=query_start_loc,
        slot_mapping=slot_mapping,
        positions=positions,
        token_ids=token_ids,
        copy_ops=copy_array,
        logits_indices=logits_indices,
        num_pages=num_pages,
        page_size=page_size,
        max_num_seqs=max_num_seqs,
        max_pages_per_seq=max_pages_per_seq,
    )


def _sequence(index: int, row: StepRow, field: str) -> list | tuple:
    """`row.<field>` (a tuple, list, other sequence or 1-D integer array) as a list or tuple; its
    entries are checked later, with the whole step's (`_check_values`)."""
    values = getattr(row, field)
    if type(values) is tuple or type(values) is list:  # the common case, first (and cheap)
        return values
    argument = f"{_row_name(index, row)}: {field}"
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or not (values.size == 0 or np.issubdtype(values.dtype, np.integer)):
            raise TypeError(
                f"{argument} must be a 1-D sequence of ints, got an array of shape "
                f"{values.shape} and dtype {values.dtype}"
            )
        return values.tolist()
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(f"{argument} must be a sequence of ints, got {values!r:.80}")
    return list(values)


def _check_row(
    index: int, row: object, *, page_size: int, max_pages: int
) -> tuple[list | tuple, list | tuple, int]:
    """One row's `(page_ids, new_token_ids, num_computed)`, their shapes checked."""
    # `type(...) is` first: the common case costs no isinstance check.
    if type(row) is not StepRow and not isinstance(row, StepRow):
        raise TypeError(f"rows[{index}] must be a StepRow, got {type(row).__name__} {row!r:.80}")
    page_ids = _sequence(index, row, "page_ids")
    new_token_ids = _sequence(index, row, "new_token_ids")
    start = row.num_computed
    if type(start) is not int and not is_int(start):
        raise TypeError(
            f"{_row_name(index, row)}: num_computed must be an int, got {type(start).__name__} "
            f"{start!r}"
        )
    if start < 0:
        raise ValueError(f"{_row_name(index, row)}: num_computed={start} is negative")
    if not new_token_ids:
        raise ValueError(f"{_row_name(index, row)} has no new tokens")
    if len(page_ids) > max_pages:
        raise ValueError(
            f"{_row_name(index, row)} has {len(page_ids)} pages; max_pages_per_seq={max_pages}"
        )
    end = start + len(new_token_ids)
    if len(page_ids) * page_size < end:
        raise ValueError(
            f"{_row_name(index, row)}: {len(page_ids)} page(s) of {page_size} cannot hold "
            f"{end} tokens"
        )
    return page_ids, new_token_ids, int(start)


def _check_values(
    rows: Sequence[StepRow],
    field: str,
    flat: list[int],
    counts: list[int],
    *,
    low: int,
    high: int,
) -> None:
    """Every entry of the rows' `field` (flattened into `flat`, `counts[i]` from row i) is an
    int in `[low, high]`; an error names the row and the entry."""
    bad = first_non_int(flat)
    out_of_range = bad is None and bool(flat) and (min(flat) < low or max(flat) > high)
    if bad is None and not out_of_range:
        return
    if bad is None:
        bad = next(at for at, value in enumerate(flat) if not low <= value <= high)
    row = 0
    while bad >= counts[row]:
        bad -= counts[row]
        row += 1
    value = rows[row].page_ids[bad] if field == "page_ids" else rows[row].new_token_ids[bad]
    owner = f"{_row_name(row, rows[row])}: {field}[{bad}]"
    if not out_of_range:
        raise TypeError(f"{owner} must be an int, got {value!r}")
    what = "page id" if field == "page_ids" else "new token id"
    limit = f"num_pages={high + 1})" if field == "page_ids" else f"{high}]"
    raise ValueError(f"{owner}: {what} {value} outside [{low}, {limit}")


def _copy_pairs(copy_ops: object, *, num_pages: int, max_num_seqs: int) -> np.ndarray:
    """`copy_ops` as an int64 `[n, 2]` array, each pair two distinct pages in range."""
    if isinstance(copy_ops, np.ndarray):
        if copy_ops.size == 0:
            return np.zeros((0, 2), dtype=np.int64)
        if (
            copy_ops.ndim != 2
            or copy_ops.shape[1] != 2
            or not (np.issubdtype(copy_ops.dtype, np.integer))
        ):
            raise TypeError(
                "copy_ops must be (src_page, dst_page) pairs of ints, got an array of shape "
                f"{copy_ops.shape} and dtype {copy_ops.dtype}"
            )
        pairs = copy_ops.tolist()
    elif isinstance(copy_ops, str | bytes) or not isinstance(copy_ops, Sequence):
        raise TypeError(
            f"copy_ops must be a sequence of (src_page, dst_page) pairs, got {copy_ops!r:.80}"
        )
    else:
        pairs = []
        for index, pair in enumerate(copy_ops):
            if (
                not isinstance(pair, tuple | list | np.ndarray)
                or len(pair) != 2
                or not (is_int(pair[0]) and is_int(pair[1]))
            ):
                raise TypeError(
                    f"copy_ops[{index}] must be a (src_page, dst_page) pair of ints, got {pair!r}"
                )
            pairs.append((pair[0], pair[1]))
    if len(pairs) > max_num_seqs:
        raise ValueError(
            f"copy_ops has {len(pairs)} entries; expected at most max_num_seqs={max_num_seqs}"
        )
    for src, dst in pairs:
        if not (0 <= src < num_pages and 0 <= dst < num_pages) or src == dst:
            raise ValueError(
                f"copy op ({src}, {dst}) must name two distinct pages in [0, num_pages={num_pages})"
            )
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def _row_name(index: int, row: StepRow) -> str:
    return f"rows[{index}] (seq_id={row.seq_id!r})"


def _at(rows: Sequence[StepRow], index: object) -> tuple[int, StepRow]:
    return int(index), rows[int(index)]  # type: ignore[call-overload]


def _check_exclusive(
    rows: Sequence[StepRow],
    pages: np.ndarray,
    row_of_page: np.ndarray,
    column_of_page: np.ndarray,
    written: np.ndarray,
    *,
    num_pages: int,
) -> None:
    """No page twice in a row; a page a row writes is in no other row."""
    key = row_of_page * num_pages + pages
    order = np.argsort(key, kind="stable")
    repeated = np.flatnonzero(key[order][1:] == key[order][:-1])
    if repeated.size:
        first, second = order[repeated[0]], order[repeated[0] + 1]
        raise ValueError(
            f"{_row_name(*_at(rows, row_of_page[first]))} holds page {int(pages[first])} twice "
            f"(page_ids[{int(column_of_page[first])}] and page_ids[{int(column_of_page[second])}]);"
            " a page holds the positions of one page of one row"
        )
    # Each (row, page) is now unique, so a page's count is the number of rows holding it.
    unique, counts = np.unique(pages, return_counts=True)
    clash = written & np.isin(pages, unique[counts > 1])
    if clash.any():
        at = int(np.argmax(clash))
        page, writer = int(pages[at]), int(row_of_page[at])
        other = int(row_of_page[np.flatnonzero((pages == page) & (row_of_page != writer))[0]])
        raise ValueError(
            f"page {page} is written this step by {_row_name(*_at(rows, writer))} (page_ids"
            f"[{int(column_of_page[at])}]) but also held by {_row_name(*_at(rows, other))}; a "
            "page a row writes into must be that row's alone (copy-on-write gives the writer a "
            "private copy first)"
        )


def _check_copies(
    rows: Sequence[StepRow],
    copies: np.ndarray,
    pages: np.ndarray,
    row_of_page: np.ndarray,
    column_of_page: np.ndarray,
    written: np.ndarray,
) -> None:
    """Copy destinations: distinct, never a source, each a page some row writes (and, by
    `_check_exclusive`, no other row holds)."""
    if not copies.size:
        return
    src, dst = copies[:, 0], copies[:, 1]

    def name(index: int) -> str:
        return f"copy_ops[{index}]=({int(src[index])}, {int(dst[index])})"

    unique, counts = np.unique(dst, return_counts=True)
    if np.any(counts > 1):
        first, second = np.flatnonzero(dst == unique[counts > 1][0])[:2]
        raise ValueError(
            f"{name(first)} and {name(second)} both copy into page {int(dst[first])}; one copy "
            "per destination page"
        )
    chained = np.isin(dst, src)
    if chained.any():
        at = int(np.argmax(chained))
        source = int(np.flatnonzero(src == dst[at])[0])
        raise ValueError(
            f"{name(at)} copies into page {int(dst[at])}, which {name(source)} copies from; the "
            "result would depend on the order of the copies"
        )
    read_only = np.isin(dst, pages[~written])
    if read_only.any():
        at = int(np.argmax(read_only))
        held = np.flatnonzero((pages == dst[at]) & ~written)[0]
        raise ValueError(
            f"{name(at)} overwrites page {int(dst[at])}, which "
            f"{_row_name(*_at(rows, row_of_page[held]))} reads at page_ids"
            f"[{int(column_of_page[held])}] without writing it this step"
        )
    unused = ~np.isin(dst, pages[written])
    if unused.any():
        at = int(np.argmax(unused))
        raise ValueError(
            f"{name(at)} copies into page {int(dst[at])}, which no row writes this step; a copy "
            "gives a row that writes into it a private page"
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
    """Every page id or slot leaving the host is in range or the -1 sentinel, never clipped; no
    real slot and no copy destination twice."""
    used = page_tables[page_tables != -1]
    if used.size and (used.min() < 0 or used.max() >= num_pages):
        raise AssertionError(f"page_tables holds a page id outside [0, {num_pages})")
    real_slots = slot_mapping[:num_tokens]
    if real_slots.size and (real_slots.min() < 0 or real_slots.max() >= num_pages * page_size):
        raise AssertionError(f"slot_mapping holds a slot outside [0, {num_pages * page_size})")
    if np.unique(real_slots).size != real_slots.size:
        raise AssertionError("slot_mapping writes one slot twice")
    if np.any(slot_mapping[num_tokens:] != -1):
        raise AssertionError("slot_mapping padding is not -1")
    real_copies = copy_ops[:num_copies]
    if real_copies.size and (real_copies.min() < 0 or real_copies.max() >= num_pages):
        raise AssertionError(f"copy_ops holds a page id outside [0, {num_pages})")
    if np.unique(real_copies[:, 1]).size != num_copies:
        raise AssertionError("copy_ops copies into one page twice")
    if np.any(copy_ops[num_copies:] != -1):
        raise AssertionError("copy_ops padding is not -1")
    if np.any(np.diff(query_start_loc) < 0) or query_start_loc[-1] != num_tokens:
        raise AssertionError("query_start_loc is not a non-decreasing prefix sum of the new tokens")
