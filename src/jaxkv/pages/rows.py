"""`PagedRows`: the batch row operations of the paged cache family, done on the host.

Every cache family offers the same row operations (`reset_rows`, `truncate`, `rollback`,
`select`, `reorder`, `repeat`, `insert`, `extract`, `overflow_rows`, `check_overflow`; see
`jaxkv.abstracts.RowOperations`). Contiguous caches gather and scatter rows of device arrays. A
paged pool has no rows on the device: a row is a sequence of the `PageManager`, and its tokens are
wherever that sequence's page table points. So the paged family moves page-table rows instead:
forks (shared pages, copy-on-write on the next write), truncations and frees, all bookkeeping in
the manager; the device pools are never touched.

Data and invariants (checked by the constructor, re-checked and kept by every operation):

- `seq_ids[b]` is the sequence row `b` holds, or None for an empty row;
- every non-None id is a live sequence of `manager` and backs exactly one row (an operation finds
  an id freed behind its back and refuses with `UnknownSequenceError` before changing anything);
- an operation consumes the object it is called on (like a donated device cache): once consumed,
  its ids may have been freed or handed to the result, so every later use of it (any operation,
  `seq_ids`, `batch_size`, `slots`) raises `ConsumedRowsError`; only `manager`, `consumed` and
  `repr` stay readable.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import numpy as np

from jaxkv.pages.errors import (
    CapacityError,
    DuplicateSequenceError,
    PagesError,
    StepPendingError,
    UnknownSequenceError,
)
from jaxkv.pages.manager import PageManager


class ConsumedRowsError(PagesError, RuntimeError):
    """A `PagedRows` used after an operation consumed it (use the object that operation
    returned)."""


def _is_int(value: object) -> bool:
    return not isinstance(value, bool | np.bool_) and isinstance(value, int | np.integer)


def _int_list(owner: str, argument: str, values: object) -> list[int]:
    """`values` (a sequence or 1-D NumPy array of ints) as Python ints."""
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or not (values.size == 0 or np.issubdtype(values.dtype, np.integer)):
            raise TypeError(
                f"{owner}: {argument} must be a 1-D sequence of ints, got an array of shape "
                f"{values.shape} and dtype {values.dtype}"
            )
        return [int(value) for value in values]
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(f"{owner}: {argument} must be a sequence of ints, got {values!r:.80}")
    for index, value in enumerate(values):
        if not _is_int(value):
            raise TypeError(f"{owner}: {argument}[{index}] must be an int, got {value!r}")
    return [int(value) for value in values]


def _check_row_ids(owner: str, argument: str, ids: list[int], batch_size: int) -> None:
    bad = [row for row in ids if not 0 <= row < batch_size]
    if bad:
        raise ValueError(
            f"{owner}: {argument} must be row ids in [0, {batch_size}), got {ids} ({bad[0]} is "
            "out of range)"
        )


def _row_mask(owner: str, rows: object, batch_size: int) -> list[bool]:
    """A `[batch]` bool mask from a bool mask (list or NumPy) or a sequence of row ids."""
    if isinstance(rows, np.ndarray) and rows.dtype == np.bool_:
        mask = rows.tolist() if rows.ndim == 1 else None
    elif (
        isinstance(rows, Sequence)
        and not isinstance(rows, str | bytes)
        and len(rows) > 0
        and all(isinstance(flag, bool | np.bool_) for flag in rows)
    ):
        mask = [bool(flag) for flag in rows]
    else:
        ids = _int_list(owner, "rows", rows)
        _check_row_ids(owner, "rows", ids, batch_size)
        mask = [False] * batch_size
        for row in ids:
            mask[row] = True
        return mask
    if mask is None or len(mask) != batch_size:
        shape = np.shape(rows)
        raise ValueError(f"{owner}: a rows mask must have shape ({batch_size},), got {shape}")
    return mask


def _slot(owner: str, slot: object, batch_size: int) -> int:
    if not _is_int(slot):
        raise TypeError(f"{owner}: slot must be an int row id, got {slot!r}")
    if not 0 <= slot < batch_size:
        raise ValueError(f"{owner}: slot must lie in [0, {batch_size}), got {slot}")
    return int(slot)


def _default_minter(manager: PageManager) -> Callable[[], Hashable]:
    """Mints `("row", 0)`, `("row", 1)`, ..., skipping ids live in `manager`."""
    counter = itertools.count()

    def new_seq_id() -> Hashable:
        while True:
            seq_id = ("row", next(counter))
            if seq_id not in manager:
                return seq_id

    return new_seq_id


class PagedRows:
    """A batch's rows over one `PageManager`: row `b` holds sequence `seq_ids[b]`, or None (an
    empty row).

    A paged pool has no rows on the device: the device holds pages, and a row is a page table
    on the host. The row's tokens are the sequence's `token_ids` in the manager (the first
    `num_computed` of them have KV in the pool). The row operations therefore move page-table rows
    (forks share pages and copy-on-write on the next write, truncations and frees release pages),
    and the device pools need no change: the next `schedule` of the manager carries whatever
    copies are due.

    Every operation validates all its arguments first (row ids in range, bool masks of the right
    length, lengths in range, `n >= 1`, room for the forks it makes: `max_num_seqs` live
    sequences, and no fork or truncation of a sequence in the pending step; freeing one in it is
    allowed, as in `PageManager.free`), then returns a NEW `PagedRows` and consumes this one,
    except `extract`, `overflow_rows` and `check_overflow`. On any error, nothing changed and this
    object is not consumed.

    Args:
        manager: the pool's bookkeeping.
        seq_ids: one entry per row: a live sequence id of `manager` (each at most once) or None.
        new_seq_id: zero-argument callable minting fresh hashable ids for the sequences that forks
            create; by default `("row", n)` with an increasing `n`, skipping ids already live.

    Raises:
        TypeError: `manager` is not a `PageManager`, `seq_ids` is not a sequence, or `new_seq_id`
            is not callable.
        ValueError: `seq_ids` is empty.
        UnknownSequenceError: an id is not live in `manager`.
        DuplicateSequenceError: an id backs two rows.
    """

    def __init__(
        self,
        manager: PageManager,
        seq_ids: Sequence[Hashable | None],
        *,
        new_seq_id: Callable[[], Hashable] | None = None,
    ) -> None:
        owner = "PagedRows"
        if not isinstance(manager, PageManager):
            raise TypeError(f"{owner}: manager must be a PageManager, got {type(manager).__name__}")
        if isinstance(seq_ids, str | bytes) or not isinstance(seq_ids, Sequence):
            raise TypeError(
                f"{owner}: seq_ids must be a sequence of sequence ids or None, got {seq_ids!r:.80}"
            )
        if not seq_ids:
            raise ValueError(f"{owner}: seq_ids must hold at least one row, got {seq_ids!r}")
        if new_seq_id is not None and not callable(new_seq_id):
            raise TypeError(f"{owner}: new_seq_id must be a callable or None, got {new_seq_id!r}")
        rows: dict[Hashable, int] = {}
        for row, seq_id in enumerate(seq_ids):
            if seq_id is None:
                continue
            if seq_id not in manager:
                raise UnknownSequenceError(f"{owner}: seq_ids[{row}]", seq_id)
            if seq_id in rows:
                raise DuplicateSequenceError(
                    f"{owner}: seq_ids[{row}]={seq_id!r} already backs row {rows[seq_id]}; a "
                    "sequence backs one row at most (fork it for a second row)"
                )
            rows[seq_id] = row
        self._manager = manager
        self._seq_ids: tuple[Hashable | None, ...] = tuple(seq_ids)
        self._new_seq_id = _default_minter(manager) if new_seq_id is None else new_seq_id
        # The operation that consumed this object, or None while it is usable.
        self._consumed_by: str | None = None

    # -- reads -----------------------------------------------------------------------------------

    @property
    def manager(self) -> PageManager:
        """The pool's bookkeeping (readable even once consumed)."""
        return self._manager

    @property
    def seq_ids(self) -> tuple[Hashable | None, ...]:
        """The sequence of each row (None: an empty row)."""
        self._check_usable("seq_ids")
        return self._seq_ids

    @property
    def batch_size(self) -> int:
        """Rows in the batch."""
        self._check_usable("batch_size")
        return len(self._seq_ids)

    @property
    def consumed(self) -> bool:
        """Whether an operation consumed this object."""
        return self._consumed_by is not None

    def slots(self) -> dict[Hashable, int]:
        """`seq_id -> row` for the non-empty rows (to lay recurrent state out by row)."""
        self._check_usable("slots")
        return {seq_id: row for row, seq_id in enumerate(self._seq_ids) if seq_id is not None}

    def __repr__(self) -> str:
        if self._consumed_by is not None:
            return f"PagedRows(<consumed by {self._consumed_by}()>)"
        return f"PagedRows(seq_ids={self._seq_ids!r})"

    # -- row operations --------------------------------------------------------------------------

    def reset_rows(self, rows: Any) -> PagedRows:
        """The selected rows become empty: their sequences are freed.

        Args:
            rows: a `[batch]` bool mask (list or NumPy) or a sequence of row ids.

        Returns:
            The new rows; this object is consumed.

        Raises:
            TypeError, ValueError: malformed `rows`.
        """
        owner = self._owner("reset_rows")
        mask = _row_mask(owner, rows, len(self._seq_ids))
        for row, selected in enumerate(mask):
            if selected and self._seq_ids[row] is not None:
                self._manager.free(self._seq_ids[row])
        seq_ids = [
            None if selected else seq_id
            for seq_id, selected in zip(self._seq_ids, mask, strict=True)
        ]
        return self._successor("reset_rows", seq_ids)

    def truncate(self, lengths: Any) -> PagedRows:
        """Row `b` keeps only the first `lengths[b]` tokens of its sequence (rollback, via
        `PageManager.truncate`); a row whose length does not change is left alone.

        Args:
            lengths: `[batch]` ints, `0 <= lengths[b] <= len(token_ids)` of row b's sequence (an
                empty row needs 0).

        Returns:
            The new rows; this object is consumed.

        Raises:
            TypeError, ValueError: malformed or out-of-range `lengths`.
            StepPendingError: a row to shorten is in the pending step.
        """
        owner = self._owner("truncate")
        values = self._per_row(owner, "lengths", lengths, "one int")
        changes: list[tuple[Hashable, int]] = []
        for row, (seq_id, length) in enumerate(zip(self._seq_ids, values, strict=True)):
            known = 0 if seq_id is None else len(self._manager.get_sequence(seq_id).token_ids)
            if not 0 <= length <= known:
                what = "an empty row" if seq_id is None else f"seq_id={seq_id!r}"
                raise ValueError(
                    f"{owner}: lengths[{row}]={length} is out of range; row {row} ({what}) holds "
                    f"{known} token(s), expected 0 <= lengths[{row}] <= {known}"
                )
            if length != known:
                self._refuse_if_pending(owner, row, seq_id)
                changes.append((seq_id, length))
        for seq_id, length in changes:
            self._manager.truncate(seq_id, length)
        return self._successor("truncate", list(self._seq_ids))

    def rollback(self, n: Any) -> PagedRows:
        """Row `b` forgets the last `n[b]` known tokens of its sequence: `truncate` to
        `len(token_ids) - n[b]` (a speculative-decoding verifier passes the rejected drafts).
        Pages that become empty go back to the pool (cached ones stay in the prefix cache as
        evictable pages, their digests intact).

        Args:
            n: an int (every row) or `[batch]` ints, each `0 <= n[b] <= len(token_ids)` of row
                b's sequence (an empty row needs 0).

        Returns:
            The new rows; this object is consumed.

        Raises:
            TypeError, ValueError: malformed or out-of-range `n`.
            StepPendingError: a row to shorten is in the pending step.
        """
        owner = self._owner("rollback")
        if _is_int(n):
            counts = [int(n)] * len(self._seq_ids)
        else:
            counts = self._per_row(owner, "n", n, "one int")
        lengths = []
        for row, (seq_id, count) in enumerate(zip(self._seq_ids, counts, strict=True)):
            known = 0 if seq_id is None else len(self._manager.get_sequence(seq_id).token_ids)
            if not 0 <= count <= known:
                what = "an empty row" if seq_id is None else f"seq_id={seq_id!r}"
                raise ValueError(
                    f"{owner}: n[{row}]={count} is out of range; row {row} ({what}) holds "
                    f"{known} token(s), expected 0 <= n[{row}] <= {known}"
                )
            lengths.append(known - count)
        return self.truncate(lengths)

    def select(self, rows: Sequence[int]) -> PagedRows:
        """Only the given rows, in this order; the other rows' sequences are freed.

        Args:
            rows: distinct row ids, at least one.

        Returns:
            The new rows (`len(rows)` of them); this object is consumed.

        Raises:
            TypeError, ValueError: malformed, out-of-range, repeated or no row ids.
        """
        owner = self._owner("select")
        ids = _int_list(owner, "rows", rows)
        if not ids:
            raise ValueError(f"{owner}: rows must name at least one row, got {rows!r}")
        _check_row_ids(owner, "rows", ids, len(self._seq_ids))
        if len(set(ids)) != len(ids):
            raise ValueError(f"{owner}: rows must be distinct row ids, got {ids}")
        return self._gather("select", ids)

    def reorder(self, indices: Any) -> PagedRows:
        """Row `b` of the result holds a copy of row `indices[b]` (beam search).

        The first use of a source row keeps its sequence; every further use forks it (shared
        pages, copy-on-write on the next write; no page is copied now). Rows nobody uses are freed
        first, so their room counts for the forks. An empty source row gives an empty row.

        Args:
            indices: `[batch]` row ids, duplicates allowed.

        Returns:
            The new rows; this object is consumed.

        Raises:
            TypeError, ValueError: malformed, out-of-range or wrongly sized `indices`.
            CapacityError: the forks would exceed `max_num_seqs` live sequences.
            StepPendingError: a row to fork is in the pending step.
            DuplicateSequenceError, TypeError: `new_seq_id` minted a live or unhashable id.
        """
        owner = self._owner("reorder")
        ids = self._per_row(owner, "indices", indices, "one row id")
        _check_row_ids(owner, "indices", ids, len(self._seq_ids))
        return self._gather("reorder", ids)

    def repeat(self, n: int) -> PagedRows:
        """Every row repeated `n` times, interleaved (`0, 0, 1, 1, ...`): parallel samples. Each
        non-empty row is forked `n - 1` times.

        Returns:
            The new rows (`n * batch_size` of them); this object is consumed.

        Raises:
            TypeError, ValueError: `n` is not an int >= 1.
            CapacityError: the forks would exceed `max_num_seqs` live sequences.
            StepPendingError: a row to fork is in the pending step.
        """
        owner = self._owner("repeat")
        if not _is_int(n):
            raise TypeError(f"{owner}: n must be an int, got {type(n).__name__} {n!r}")
        if n < 1:
            raise ValueError(f"{owner}: n must be >= 1, got {n}")
        n = int(n)
        # Room for the forks first: a huge `n` is refused before the rows are laid out.
        non_empty = sum(seq_id is not None for seq_id in self._seq_ids)
        self._check_room(owner, (n - 1) * non_empty, num_freed=0)
        return self._gather("repeat", [row for row in range(len(self._seq_ids)) for _ in range(n)])

    def insert(self, other: PagedRows, slot: int) -> PagedRows:
        """Row `slot` is replaced by the single row of `other` (a sequence prefilled elsewhere joins
        the batch); row `slot`'s current sequence is freed.

        Args:
            other: a one-row `PagedRows` over the same manager; it is consumed too.
            slot: the row to replace.

        Returns:
            The new rows; this object and `other` are consumed.

        Raises:
            TypeError: `other` is not a `PagedRows`, or `slot` is not an int.
            ValueError: `other` is over another manager (pools do not share pages), has more than
                one row, is this object, or holds a sequence that already backs a row here; `slot`
                is out of range.
            ConsumedRowsError: `other` was consumed.
        """
        owner = self._owner("insert")
        if not isinstance(other, PagedRows):
            raise TypeError(f"{owner}: other must be a PagedRows, got {type(other).__name__}")
        if other is self:
            raise ValueError(f"{owner}: other must be another PagedRows, not this one")
        other._check_usable("insert (as other)")
        other._check_live(f"{owner} (other)")
        if other._manager is not self._manager:
            raise ValueError(
                f"{owner}: other is over another PageManager; pools do not share pages, so a row "
                "can only move between PagedRows of the same manager"
            )
        if len(other._seq_ids) != 1:
            raise ValueError(
                f"{owner}: other must hold exactly one row, got {len(other._seq_ids)} rows"
            )
        slot = _slot(owner, slot, len(self._seq_ids))
        incoming = other._seq_ids[0]
        if incoming is not None and incoming in self._seq_ids:
            raise ValueError(
                f"{owner}: other's seq_id={incoming!r} already backs row "
                f"{self._seq_ids.index(incoming)} here; a sequence backs one row at most"
            )
        if self._seq_ids[slot] is not None:
            self._manager.free(self._seq_ids[slot])
        seq_ids = list(self._seq_ids)
        seq_ids[slot] = incoming
        other._consumed_by = "insert"
        return self._successor("insert", seq_ids)

    def extract(self, slot: int) -> PagedRows:
        """Row `slot` as a one-row `PagedRows` holding a FORK of its sequence (an empty row gives a
        one-row `PagedRows` of None). This object is NOT consumed and does not change.

        Raises:
            TypeError, ValueError: `slot` is not a row id.
            CapacityError: `max_num_seqs` sequences are live.
            StepPendingError: the row's sequence is in the pending step.
        """
        owner = self._owner("extract")
        slot = _slot(owner, slot, len(self._seq_ids))
        seq_id = self._seq_ids[slot]
        if seq_id is None:
            return PagedRows(self._manager, [None], new_seq_id=self._new_seq_id)
        self._check_forks(owner, [(slot, seq_id)], num_freed=0)
        (child,) = self._mint(owner, 1)
        self._manager.fork(seq_id, child)
        return PagedRows(self._manager, [child], new_seq_id=self._new_seq_id)

    def overflow_rows(self) -> np.ndarray:
        """`[batch]` bool, all False: paged capacity is checked on the host before anything is
        written (`add_sequence`, `append_tokens` and `schedule` raise `CapacityError` or
        `OutOfPagesError` up front), so no write into a paged pool is ever silently dropped."""
        self._check_usable("overflow_rows")
        return np.zeros((len(self._seq_ids),), dtype=np.bool_)

    def check_overflow(self) -> None:
        """Returns None: no row can have overflowed (see `overflow_rows`), so there is nothing to
        raise `jaxkv.errors.CacheOverflowError` about."""
        self._check_usable("check_overflow")

    # -- internals -------------------------------------------------------------------------------

    def _per_row(self, owner: str, argument: str, values: object, what: str) -> list[int]:
        """`values` as ints, exactly one per row."""
        values = _int_list(owner, argument, values)
        if len(values) != len(self._seq_ids):
            raise ValueError(
                f"{owner}: {argument} must hold {what} per row ({len(self._seq_ids)}), got "
                f"{len(values)}"
            )
        return values

    def _owner(self, operation: str) -> str:
        """`PagedRows.<operation>`, once this object is known usable and all its rows live."""
        self._check_usable(operation)
        owner = f"PagedRows.{operation}"
        self._check_live(owner)
        return owner

    def _check_live(self, owner: str) -> None:
        # Only a `free` of the manager behind this object's back can break this.
        for row, seq_id in enumerate(self._seq_ids):
            if seq_id is not None and seq_id not in self._manager:
                raise UnknownSequenceError(f"{owner}: seq_ids[{row}]", seq_id)

    def _check_usable(self, what: str) -> None:
        if self._consumed_by is not None:
            raise ConsumedRowsError(
                f"PagedRows.{what}: this PagedRows was consumed by {self._consumed_by}(); use the "
                f"PagedRows that {self._consumed_by}() returned"
            )

    def _successor(self, operation: str, seq_ids: Sequence[Hashable | None]) -> PagedRows:
        """The result of `operation`; this object is consumed."""
        self._consumed_by = operation
        result = PagedRows.__new__(PagedRows)
        result._manager = self._manager
        result._seq_ids = tuple(seq_ids)
        result._new_seq_id = self._new_seq_id
        result._consumed_by = None
        return result

    def _refuse_if_pending(self, owner: str, row: int, seq_id: Hashable) -> None:
        if self._manager.in_pending_step(seq_id):
            raise StepPendingError(
                f"{owner}: row {row} (seq_id={seq_id!r}) is in the pending step; commit_step() "
                "first"
            )

    def _check_forks(self, owner: str, forks: list[tuple[int, Hashable]], num_freed: int) -> None:
        """Room for `len(forks)` new sequences once `num_freed` are freed, and no fork source in
        the pending step."""
        self._check_room(owner, len(forks), num_freed)
        for row, seq_id in forks:
            self._refuse_if_pending(owner, row, seq_id)

    def _check_room(self, owner: str, num_forks: int, num_freed: int) -> None:
        """Room for `num_forks` new sequences once `num_freed` are freed."""
        live = len(self._manager) - num_freed
        if num_forks and live + num_forks > self._manager.max_num_seqs:
            raise CapacityError(
                f"{owner}: needs {num_forks} fork(s) but {live} sequences would be live and "
                f"max_num_seqs={self._manager.max_num_seqs}"
            )

    def _mint(self, owner: str, count: int) -> list[Hashable]:
        """`count` fresh ids from `new_seq_id`: hashable, not live, distinct."""
        ids: list[Hashable] = []
        for _ in range(count):
            seq_id = self._new_seq_id()
            try:
                hash(seq_id)
            except TypeError:
                raise TypeError(f"{owner}: new_seq_id() returned unhashable {seq_id!r}") from None
            if seq_id is None or seq_id in self._manager or seq_id in ids:
                raise DuplicateSequenceError(
                    f"{owner}: new_seq_id() returned {seq_id!r}, which is None, live or already "
                    "minted for this operation; it must mint a fresh id per call"
                )
            ids.append(seq_id)
        return ids

    def _gather(self, operation: str, sources: list[int]) -> PagedRows:
        """Row `b` of the result is a copy of row `sources[b]`: the first use of a row keeps its
        sequence, later uses fork it, unused rows are freed (before the forks)."""
        owner = f"PagedRows.{operation}"
        used = set(sources)
        unused = [
            seq_id
            for row, seq_id in enumerate(self._seq_ids)
            if row not in used and seq_id is not None
        ]
        seen: set[int] = set()
        forks: list[tuple[int, Hashable]] = []
        for row in sources:
            if row in seen and self._seq_ids[row] is not None:
                forks.append((row, self._seq_ids[row]))
            seen.add(row)
        self._check_forks(owner, forks, num_freed=len(unused))
        children: Iterator[Hashable] = iter(self._mint(owner, len(forks)))

        # Nothing can fail past this point.
        for seq_id in unused:
            self._manager.free(seq_id)
        seq_ids: list[Hashable | None] = []
        seen.clear()
        for row in sources:
            parent = self._seq_ids[row]
            if parent is None or row not in seen:
                seq_ids.append(parent)
            else:
                child = next(children)
                self._manager.fork(parent, child)
                seq_ids.append(child)
            seen.add(row)
        return self._successor(operation, seq_ids)
