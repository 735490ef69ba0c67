"""Hostile input to the host page bookkeeping, `jaxkv.pages` (plain Python and NumPy, no device).

Every public entry point -- `PageAllocator`, `PrefixCache`, `PageManager` (constructor,
`add_sequence`, `append_tokens`, `fork`, `free`, `truncate`, `schedule`, `commit_step`,
`pages_needed`, `get_sequence`), `PagedRows` (constructor and every row operation),
`build_step_metadata`, `select_bucket` and `default_token_buckets` -- gets what a careless or
malicious caller would pass: wrong types, bools (Python and NumPy) for ints, floats, NaN and inf
for ints, 0, negative and huge sizes, values at and past int32 (`2**31 - 1`), out-of-range and
duplicate ids, unhashable ids, generators (endless ones too) and unordered collections where
sequences are expected, NumPy scalars and arrays.

Each probe asserts the promised behaviour: a clear error -- the documented exception type, a
message naming the argument -- with the state exactly as before (`snapshot()` equal,
`check_invariants()` passing, a `PagedRows` not consumed), or correct behaviour (NumPy integers
are ints; a generator is read entirely and used, or refused -- never read and then ignored).

The exception conventions of the package, which the probes pin down:

- a configuration size (a constructor argument, a token bucket, the builder's geometry) that is
  not an int >= 1 in range raises ValueError;
- a per-call value of the wrong type (a token id, a page id, a length, a row id, a row) raises
  TypeError, one out of range ValueError, or the `PagesError` the method documents
  (`SchedulingError` for a step's token counts, `CapacityError` for limits);
- nothing reads past what the call can accept: an endless generator is refused, not hung on
  (`endless` raises AssertionError past 10,000 entries, `answers_within` a TimeoutError).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import signal
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxkv.pages import (
    CapacityError,
    ConsumedRowsError,
    DuplicateSequenceError,
    OutOfPagesError,
    PageAllocator,
    PagedRows,
    PageManager,
    PrefixCache,
    SchedulingError,
    StepPendingError,
    StepRow,
    UnknownSequenceError,
    build_step_metadata,
    default_token_buckets,
    select_bucket,
)
from jaxkv.pages.prefix_cache import ROOT_HASH

KEY = b"adversarial"
NAN, INF = float("nan"), float("inf")
INT32_MAX = 2**31 - 1

# Values that are not ints (for an int argument), and ints that are no valid size.
NOT_INTS: list[object] = [
    True,
    False,
    np.bool_(True),
    1.0,
    2.5,
    NAN,
    INF,
    -INF,
    np.float64(4),
    1j,
    "4",
    b"4",
    None,
    [4],
]
BAD_SIZES: list[object] = [0, -1, -(2**31), 2**31, 2**63, 2**64]
UNHASHABLE: list[object] = [["x"], {"k": 1}, {1}, np.array([1]), bytearray(b"a")]


def name(value: object) -> str:
    """A short test id for a hostile value."""
    text = value.__name__ if isinstance(value, type) else repr(value)
    if " at 0x" in text:  # no addresses: ids must agree between test processes
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 24 else text[:21] + "..."


def endless(value: object = 1, limit: int = 10_000) -> Iterator[object]:
    """An endless iterator (of `value`, or of a counter when `value` is a callable of the index)
    that fails the probe once read past `limit` entries: no call may read an endless
    generator to its end."""
    for index in itertools.count():
        if index >= limit:
            raise AssertionError(f"read more than {limit} entries of an endless iterator")
        yield value(index) if callable(value) else value


@contextlib.contextmanager
def answers_within(seconds: float = 5.0) -> Iterator[None]:
    """Fail (TimeoutError) instead of hanging when a call does not return in time."""
    if not hasattr(signal, "setitimer"):  # no SIGALRM: run without the guard
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def make(**overrides: object) -> PageManager:
    config: dict[str, object] = dict(
        num_pages=8,
        page_size=4,
        max_num_seqs=3,
        max_pages_per_seq=4,
        hash_key=KEY,
        token_buckets=(8, 16),
    )
    config.update(overrides)
    return PageManager(**config)  # type: ignore[arg-type]


def populated() -> PageManager:
    """'a': 5 tokens computed (page 0 full and cached, page 1 partial); 'b': 2 tokens, none
    computed. One more sequence fits (max_num_seqs=3); max_seq_len is 16."""
    manager = make()
    manager.add_sequence("a", [1, 2, 3, 4, 5])
    manager.commit_step(manager.schedule([("a", 5)]))
    manager.add_sequence("b", [6, 7])
    return manager


def pending() -> PageManager:
    """`populated()` with a pending step computing 'b'."""
    manager = populated()
    manager.schedule([("b", 2)])
    return manager


def full() -> PageManager:
    """`populated()` plus 'c': max_num_seqs sequences live."""
    manager = populated()
    manager.add_sequence("c", [9])
    return manager


def refused(
    manager: PageManager, call: Callable[[PageManager], object], error: type, match: str
) -> None:
    """`call(manager)` raises `error` matching `match`, and the manager is exactly as before."""
    before = manager.snapshot()
    with answers_within(), pytest.raises(error, match=match):
        call(manager)
    assert manager.snapshot() == before
    manager.check_invariants()


# -- PageManager constructor ------------------------------------------------------------------

SIZE_ARGUMENTS = ["num_pages", "page_size", "max_num_seqs", "max_pages_per_seq"]


@pytest.mark.parametrize("argument", SIZE_ARGUMENTS)
@pytest.mark.parametrize("value", NOT_INTS + BAD_SIZES, ids=name)
def test_manager_refuses_every_bad_size(argument: str, value: object) -> None:
    with pytest.raises(ValueError, match=argument):
        make(**{argument: value})


CONSTRUCTOR_ERRORS: list[Any] = [
    pytest.param(dict(max_pages_per_seq=9), ValueError, "max_pages_per_seq=9 exceeds", id="wide"),
    pytest.param(dict(num_pages=2**20, page_size=2**11), ValueError, "int32", id="slots>int32"),
    *(
        pytest.param(dict(enable_prefix_caching=v), TypeError, "enable_prefix_caching", id=name(v))
        for v in (1, 0, "yes", None, np.bool_(True))
    ),
    *(
        pytest.param(dict(hash_key=v), ValueError, "hash_key", id=f"hash_key={name(v)}")
        for v in ("key", b"", b"x" * 65, bytearray(b"k"), memoryview(b"k"), 5)
    ),
    *(
        pytest.param(dict(token_buckets=v), ValueError, "token_buckets", id=f"buckets={name(v)}")
        for v in (
            5,
            8.0,
            [],
            (),
            [8, 8],
            [16, 8],
            [0, 8],
            [-8],
            [8.0],
            [True, 8],
            [8, NAN],
            [np.bool_(True)],
            "abc",
            b"ab",
            np.array([[8, 16]]),
        )
    ),
]


@pytest.mark.parametrize(("overrides", "error", "match"), CONSTRUCTOR_ERRORS)
def test_manager_constructor_refuses(overrides: dict[str, object], error: type, match: str) -> None:
    with answers_within(), pytest.raises(error, match=match):
        make(**overrides)


def test_manager_constructor_refuses_endless_and_empty_bucket_generators() -> None:
    with answers_within(), pytest.raises(ValueError, match="token_buckets"):
        make(token_buckets=endless(lambda index: 8 + index))
    with pytest.raises(ValueError, match="token_buckets must not be empty"):
        make(token_buckets=iter(()))


def test_manager_constructor_takes_numpy_ints_and_reads_a_bucket_generator_entirely() -> None:
    manager = make(
        num_pages=np.int64(8),
        page_size=np.int32(4),
        max_num_seqs=np.uint8(3),
        max_pages_per_seq=np.int16(4),
        token_buckets=(bucket for bucket in (4, 8, 16)),
    )
    assert manager.token_buckets == (4, 8, 16)
    for value in (
        manager.num_pages,
        manager.page_size,
        manager.max_num_seqs,
        *manager.token_buckets,
    ):
        assert type(value) is int
    assert make(token_buckets=np.array([8, 16])).token_buckets == (8, 16)
    manager.add_sequence("a", [1, 2, 3])
    step = manager.schedule([("a", 3)])
    assert step.num_tokens_padded == 4 and step.slot_mapping[:3].tolist() == [0, 1, 2]
    manager.commit_step(step)
    manager.check_invariants()


# -- PageManager: ids -------------------------------------------------------------------------

ID_CALLS: list[tuple[str, Callable[[PageManager, object], object], str]] = [
    ("add_sequence", lambda m, v: m.add_sequence(v, [1]), "seq_id"),
    ("append_tokens", lambda m, v: m.append_tokens(v, [1]), "seq_id"),
    ("fork parent", lambda m, v: m.fork(v, "c"), "parent_id"),
    ("fork child", lambda m, v: m.fork("a", v), "child_id"),
    ("free", lambda m, v: m.free(v), "seq_id"),
    ("truncate", lambda m, v: m.truncate(v, 0), "seq_id"),
    ("get_sequence", lambda m, v: m.get_sequence(v), "seq_id"),
    ("in_pending_step", lambda m, v: m.in_pending_step(v), "seq_id"),
    ("schedule", lambda m, v: m.schedule([(v, 1)]), r"batch\[0\] seq_id"),
    ("pages_needed", lambda m, v: m.pages_needed([(v, 1)]), r"batch\[0\] seq_id"),
]


@pytest.mark.parametrize(
    ("call", "argument"), [c[1:] for c in ID_CALLS], ids=[c[0] for c in ID_CALLS]
)
@pytest.mark.parametrize("value", UNHASHABLE, ids=name)
def test_unhashable_ids_are_refused(
    call: Callable[[PageManager, object], object], argument: str, value: object
) -> None:
    refused(populated(), lambda m: call(m, value), TypeError, f"{argument} must be hashable")


UNKNOWN_CALLS = [c for c in ID_CALLS if c[0] not in ("add_sequence", "fork child")]


@pytest.mark.parametrize(
    ("call", "argument"), [c[1:] for c in UNKNOWN_CALLS], ids=[c[0] for c in UNKNOWN_CALLS]
)
@pytest.mark.parametrize("value", ["zz", 99, None, np.int64(7), (1, 2)], ids=name)
def test_unknown_ids_are_refused(
    call: Callable[[PageManager, object], object], argument: str, value: object
) -> None:
    refused(populated(), lambda m: call(m, value), UnknownSequenceError, f"{argument}=")


DUPLICATE_ID_CALLS: list[Any] = [
    pytest.param(
        lambda m: m.add_sequence("a", [1]), DuplicateSequenceError, "seq_id='a'", id="add"
    ),
    pytest.param(lambda m: m.fork("a", "b"), DuplicateSequenceError, "child_id='b'", id="fork"),
    pytest.param(
        lambda m: m.fork("a", "a"), DuplicateSequenceError, "child_id='a'", id="fork self"
    ),
    pytest.param(lambda m: m.add_sequence(1.0, [1]), None, "", id="1.0 after 1"),
]


@pytest.mark.parametrize(("call", "error", "match"), DUPLICATE_ID_CALLS)
def test_duplicate_ids_are_refused(
    call: Callable[[PageManager], object], error: type | None, match: str
) -> None:
    manager = populated()
    if error is None:  # 1 and 1.0 are one dict key: the second is a duplicate
        manager.add_sequence(1, [1])
        refused(manager, call, DuplicateSequenceError, "seq_id=1.0")
    else:
        refused(manager, call, error, match)


def test_numpy_and_python_ints_name_one_sequence() -> None:
    manager = populated()
    manager.add_sequence(np.int64(7), [1, 2])
    assert manager.get_sequence(7).token_ids == (1, 2)
    refused(manager, lambda m: m.add_sequence(7, [1]), DuplicateSequenceError, "seq_id=7")
    manager.free(7)
    manager.check_invariants()


@pytest.mark.parametrize(
    "call",
    [lambda m: m.add_sequence("d", [1]), lambda m: m.fork("a", "d")],
    ids=["add", "fork"],
)
def test_max_num_seqs_is_refused(call: Callable[[PageManager], object]) -> None:
    refused(full(), call, CapacityError, "max_num_seqs=3")


def test_double_free_is_refused() -> None:
    manager = populated()
    manager.free("b")
    refused(manager, lambda m: m.free("b"), UnknownSequenceError, "seq_id='b'.*already freed")


# -- PageManager: token ids (add_sequence, append_tokens) -------------------------------------

TOKEN_CONTAINERS_REFUSED: list[object] = [
    "abc",
    b"ab",
    5,
    None,
    1.5,
    {1, 2},
    frozenset({1}),
    {1: 2},
    {1: 2}.keys(),
    np.array(5),
    np.array([[1, 2]]),
    object(),
]
TOKENS_OF_WRONG_TYPE: list[object] = [
    [True],
    [np.bool_(False)],
    [1.0],
    [NAN],
    [INF],
    ["1"],
    [None],
    [1, [2]],
    [np.float32(1)],
    [1 + 0j],
    np.array([1.0]),
    [1, 2, 3.5],
]
TOKENS_OUT_OF_RANGE: list[object] = [
    [-1],
    [2**31],
    [1, INT32_MAX + 1],
    [2**63],
    [2**64],
    [-(2**63) - 1],
    [np.int64(-1)],
    [np.uint64(2**63)],
    np.array([2**31], dtype=np.int64),
]


@pytest.mark.parametrize("tokens", TOKEN_CONTAINERS_REFUSED, ids=name)
@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda m, t: m.add_sequence("c", t), "prompt_token_ids"),
        (lambda m, t: m.append_tokens("a", t), "token_ids"),
    ],
    ids=["add_sequence", "append_tokens"],
)
def test_token_containers_that_are_no_sequence_are_refused(
    call: Callable[[PageManager, object], object], argument: str, tokens: object
) -> None:
    # A 2-D array may be refused as a whole or by its first row.
    refused(populated(), lambda m: call(m, tokens), TypeError, rf"{argument}(\[0\])? must be a")


@pytest.mark.parametrize("tokens", TOKENS_OF_WRONG_TYPE, ids=name)
@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda m, t: m.add_sequence("c", t), "prompt_token_ids"),
        (lambda m, t: m.append_tokens("a", t), "token_ids"),
    ],
    ids=["add_sequence", "append_tokens"],
)
def test_token_ids_of_the_wrong_type_are_refused(
    call: Callable[[PageManager, object], object], argument: str, tokens: object
) -> None:
    refused(populated(), lambda m: call(m, tokens), TypeError, rf"{argument}\[\d+\] must be an int")


@pytest.mark.parametrize("tokens", TOKENS_OUT_OF_RANGE, ids=name)
@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda m, t: m.add_sequence("c", t), "prompt_token_ids"),
        (lambda m, t: m.append_tokens("a", t), "token_ids"),
    ],
    ids=["add_sequence", "append_tokens"],
)
def test_token_ids_out_of_int32_are_refused(
    call: Callable[[PageManager, object], object], argument: str, tokens: object
) -> None:
    refused(
        populated(), lambda m: call(m, tokens), ValueError, rf"{argument}\[\d+\]=.* out of range"
    )


TOO_MANY_TOKENS: list[Any] = [
    pytest.param(lambda m: m.add_sequence("c", [1] * 17), "prompt_token_ids has 17", id="add list"),
    pytest.param(
        lambda m: m.add_sequence("c", (t for t in [1] * 17)),
        "prompt_token_ids has .* tokens; a sequence holds at most .* = 16",
        id="add generator",
    ),
    pytest.param(lambda m: m.add_sequence("c", endless()), "prompt_token_ids", id="add endless"),
    pytest.param(
        lambda m: m.add_sequence("c", itertools.islice(endless(), 10**9)),
        "prompt_token_ids",
        id="add long islice",
    ),
    pytest.param(lambda m: m.add_sequence("c", range(2**70)), "more than 16", id="add range"),
    pytest.param(lambda m: m.append_tokens("a", [1] * 12), "appending 12", id="append list"),
    pytest.param(
        lambda m: m.append_tokens("a", (t for t in [1] * 12)),
        "appending .* token.* exceeds",
        id="append generator",
    ),
    pytest.param(lambda m: m.append_tokens("a", endless()), "appending", id="append endless"),
]


@pytest.mark.parametrize(("call", "match"), TOO_MANY_TOKENS)
def test_too_many_tokens_are_refused_without_reading_an_endless_generator(
    call: Callable[[PageManager], object], match: str
) -> None:
    refused(populated(), call, CapacityError, match)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: m.add_sequence("c", []), "prompt_token_ids must hold at least one"),
        (lambda m: m.add_sequence("c", ()), "prompt_token_ids must hold at least one"),
        (lambda m: m.add_sequence("c", iter([])), "prompt_token_ids must hold at least one"),
        (lambda m: m.add_sequence("c", np.array([], int)), "prompt_token_ids must hold"),
    ],
    ids=["list", "tuple", "iterator", "array"],
)
def test_empty_prompts_are_refused(call: Callable[[PageManager], object], match: str) -> None:
    refused(populated(), call, ValueError, match)


@pytest.mark.parametrize(
    "salt", [5, b"", "", bytearray(b"s"), "\ud800", [b"s"], memoryview(b"s")], ids=name
)
def test_bad_cache_salts_are_refused(salt: object) -> None:
    refused(
        populated(), lambda m: m.add_sequence("c", [1], cache_salt=salt), ValueError, "cache_salt"
    )


@pytest.mark.parametrize(
    "prompt",
    [
        (t for t in [1, 2, 3]),
        iter([1, 2, 3]),
        range(1, 4),
        np.array([1, 2, 3], dtype=np.int32),
        [np.int64(1), np.uint16(2), 3],
    ],
    ids=["generator", "iterator", "range", "int32 array", "numpy scalars"],
)
def test_prompts_of_every_ordered_kind_are_read_entirely_and_used(prompt: object) -> None:
    manager = populated()
    manager.add_sequence("c", prompt)  # type: ignore[arg-type]
    assert manager.get_sequence("c").token_ids == (1, 2, 3)
    assert all(type(t) is int for t in manager.get_sequence("c").token_ids)
    if isinstance(prompt, Iterator):
        assert next(prompt, None) is None  # read to the end
    manager.append_tokens("c", (t for t in [4, 5]))
    manager.append_tokens("c", np.array([6], dtype=np.uint8))
    manager.append_tokens("c", [])
    assert manager.get_sequence("c").token_ids == (1, 2, 3, 4, 5, 6)
    manager.check_invariants()


def test_int32_max_token_id_reaches_the_device_exactly() -> None:
    manager = populated()
    manager.add_sequence("c", [INT32_MAX, 0, INT32_MAX])
    manager.append_tokens("a", [INT32_MAX])
    step = manager.schedule([("c", 3), ("a", 1)])
    assert step.token_ids[:4].tolist() == [INT32_MAX, 0, INT32_MAX, INT32_MAX]
    assert step.token_ids.dtype == np.int32
    manager.commit_step(step)
    manager.check_invariants()


def test_a_prompt_of_exactly_max_seq_len_tokens_fits() -> None:
    manager = populated()
    manager.add_sequence("c", endless_prefix(16))
    assert len(manager.get_sequence("c").token_ids) == 16
    manager.append_tokens("a", [0] * 11)  # exactly max_seq_len
    refused(manager, lambda m: m.append_tokens("a", [0]), CapacityError, "appending 1 token")


def endless_prefix(count: int) -> Iterator[int]:
    return itertools.islice(endless(), count)  # type: ignore[return-value]


# -- PageManager: truncate --------------------------------------------------------------------


@pytest.mark.parametrize("value", NOT_INTS, ids=name)
def test_truncate_refuses_non_int_lengths(value: object) -> None:
    refused(populated(), lambda m: m.truncate("a", value), TypeError, "num_tokens for seq_id='a'")


@pytest.mark.parametrize("value", [-1, 6, 2**31, 2**64, -(2**63), np.int64(-1)], ids=name)
def test_truncate_refuses_out_of_range_lengths(value: object) -> None:
    refused(populated(), lambda m: m.truncate("a", value), ValueError, f"num_tokens={value}")


@pytest.mark.parametrize("value", [np.int64(3), np.uint8(3), np.int32(3)], ids=name)
def test_truncate_takes_numpy_ints(value: object) -> None:
    manager = populated()
    manager.truncate("a", value)  # type: ignore[arg-type]
    assert manager.get_sequence("a").token_ids == (1, 2, 3)
    manager.check_invariants()


# -- PageManager: schedule and pages_needed ---------------------------------------------------

BATCH_ERRORS: list[tuple[str, object, type, str]] = [
    *(
        (f"batch={name(v)}", v, TypeError, "batch must be a sequence")
        for v in (5, "ab", b"ab", None, {"b": 1}, np.array([["b", 1]]))
    ),
    ("generator", "GENERATOR", TypeError, "batch must be a sequence"),
    ("empty list", [], SchedulingError, "batch is empty"),
    ("empty tuple", (), SchedulingError, "batch is empty"),
    *(
        (f"item={name(v)}", [v], TypeError, r"batch\[0\] must be a \(seq_id, num_new_tokens\)")
        for v in (("b",), ("b", 1, 2), "b", None, {"b": 1}, 5, np.array(["b", 1]))
    ),
    *(
        (f"count={name(v)}", [("b", v)], SchedulingError, "num_new_tokens for seq_id='b' must be")
        for v in (0, -1, -(2**63), *NOT_INTS)
    ),
    *(
        (f"count={name(v)}", [("b", v)], SchedulingError, f"num_new_tokens={v} for seq_id='b'")
        for v in (3, 2**31, 2**64)
    ),
    ("computed", [("a", 1)], SchedulingError, "exceeds its 0 uncomputed"),
    ("twice", [("b", 1), ("b", 1)], SchedulingError, "seq_id='b' more than once"),
    ("twice numpy", [(7, 1), (np.int64(7), 1)], SchedulingError, "more than once"),
]


def _batch(value: object) -> object:
    if isinstance(value, str) and value == "GENERATOR":
        return (item for item in [("b", 1)])
    return value


@pytest.mark.parametrize("method", ["schedule", "pages_needed"])
@pytest.mark.parametrize(
    ("batch", "error", "match"), [c[1:] for c in BATCH_ERRORS], ids=[c[0] for c in BATCH_ERRORS]
)
def test_bad_batches_are_refused(method: str, batch: object, error: type, match: str) -> None:
    manager = populated()
    manager.add_sequence(7, [1])
    refused(manager, lambda m: getattr(m, method)(_batch(batch)), error, match)


def test_a_step_past_the_largest_bucket_or_the_pool_is_refused() -> None:
    manager = populated()
    manager.add_sequence("c", [1] * 15)
    for method in ("schedule", "pages_needed"):
        refused(
            manager,
            lambda m, method=method: getattr(m, method)([("b", 2), ("c", 15)]),
            CapacityError,
            "17",
        )
    manager = make(num_pages=4, max_pages_per_seq=4, token_buckets=(32,))
    manager.add_sequence("a", [1] * 16)
    manager.add_sequence("b", [1])
    assert manager.pages_needed([("a", 16), ("b", 1)]) == 5
    refused(manager, lambda m: m.schedule([("a", 16), ("b", 1)]), OutOfPagesError, "needs 5")


def test_schedule_takes_numpy_counts_and_list_pairs() -> None:
    manager = populated()
    assert manager.pages_needed([["b", np.int64(2)]]) == 1
    step = manager.schedule([["b", np.uint8(2)]])
    assert step.num_new_tokens == (2,) and type(step.num_new_tokens[0]) is int
    manager.commit_step(step)
    manager.check_invariants()


# -- PageManager: the pending step ------------------------------------------------------------

PENDING_CALLS: list[Any] = [
    pytest.param(lambda m: m.schedule([("a", 1)]), StepPendingError, "schedule", id="schedule"),
    pytest.param(lambda m: m.append_tokens("b", [1]), StepPendingError, "seq_id='b'", id="append"),
    pytest.param(lambda m: m.fork("b", "c"), StepPendingError, "fork.*seq_id='b'", id="fork"),
    pytest.param(lambda m: m.truncate("b", 1), StepPendingError, "truncate.*'b'", id="truncate"),
    pytest.param(
        lambda m: m.pages_needed([("b", 1)]), StepPendingError, "pages_needed.*'b'", id="needed"
    ),
    pytest.param(lambda m: m.commit_step(None), StepPendingError, "not the pending", id="None"),
    pytest.param(lambda m: m.commit_step("step"), StepPendingError, "not the pending", id="str"),
    pytest.param(
        lambda m: m.commit_step(dataclasses.replace(m.pending_step)),
        StepPendingError,
        "not the pending step",
        id="a copy",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), PENDING_CALLS)
def test_calls_that_conflict_with_the_pending_step_are_refused(
    call: Callable[[PageManager], object], error: type, match: str
) -> None:
    refused(pending(), call, error, match)


def test_pages_needed_while_pending_is_right_for_sequences_outside_the_step() -> None:
    manager = pending()
    manager.append_tokens("a", [8, 9, 10, 11])  # positions 5..8: page 1 in place, one new page
    assert manager.pages_needed([("a", 4)]) == 1
    manager.commit_step(manager.pending_step)
    step = manager.schedule([("a", 4)])
    assert len(manager.get_sequence("a").page_ids) == 3 and step.num_copies == 0
    manager.commit_step(step)


def test_commit_twice_and_commit_of_nothing_are_refused() -> None:
    manager = pending()
    step = manager.pending_step
    manager.commit_step(step)
    refused(manager, lambda m: m.commit_step(step), StepPendingError, "no pending step")


# -- PageAllocator ----------------------------------------------------------------------------


def allocator_state(allocator: PageAllocator) -> tuple:
    return tuple(allocator.free_pages()), tuple(allocator.refcounts())


def busy_allocator() -> PageAllocator:
    """Pages 0 (refcount 2) and 1 (refcount 1) in use, 2 and 3 free."""
    allocator = PageAllocator(4)
    allocator.allocate()
    allocator.allocate()
    allocator.incref(0)
    return allocator


@pytest.mark.parametrize("value", [*NOT_INTS, 0, -1, 2**31, 2**40, 2**63], ids=name)
def test_allocator_refuses_every_bad_pool_size(value: object) -> None:
    with answers_within(), pytest.raises(ValueError, match="num_pages"):
        PageAllocator(value)  # type: ignore[arg-type]


PAGE_METHODS = ["refcount", "is_free", "incref", "decref", "release"]


@pytest.mark.parametrize("method", PAGE_METHODS)
@pytest.mark.parametrize(
    ("page", "error"),
    [(v, TypeError) for v in NOT_INTS] + [(v, ValueError) for v in (-1, 4, 2**31, 2**64)],
    ids=name,
)
def test_allocator_refuses_bad_page_ids(method: str, page: object, error: type) -> None:
    allocator = busy_allocator()
    before = allocator_state(allocator)
    with pytest.raises(error, match="page"):
        getattr(allocator, method)(page)
    assert allocator_state(allocator) == before
    allocator.check()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda a: a.incref(2), ValueError, "page=2 is in the free queue"),
        (lambda a: a.release(0), ValueError, "page=0 has refcount 2"),
        (lambda a: a.release(2), ValueError, "page=2 is already in the free queue"),
        (lambda a: a.decref(3), ValueError, "page=3 has refcount 0"),
    ],
    ids=["incref free", "release used", "double free", "decref free"],
)
def test_allocator_refuses_state_errors(
    call: Callable[[PageAllocator], object], error: type, match: str
) -> None:
    allocator = busy_allocator()
    before = allocator_state(allocator)
    with pytest.raises(error, match=match):
        call(allocator)
    assert allocator_state(allocator) == before
    allocator.check()


def test_allocator_out_of_pages_and_numpy_page_ids() -> None:
    allocator = PageAllocator(np.int64(2))
    assert allocator.num_pages == 2 and type(allocator.num_pages) is int
    pages = [allocator.allocate(), allocator.allocate()]
    before = allocator_state(allocator)
    with pytest.raises(OutOfPagesError):
        allocator.allocate()
    assert allocator_state(allocator) == before
    assert allocator.incref(np.int64(pages[0])) == 2
    assert allocator.decref(np.int32(pages[0])) == 1
    assert allocator.decref(np.uint8(pages[1])) == 0
    allocator.release(np.int64(pages[1]))
    assert [type(page) for page in allocator.free_pages()] == [int]
    assert allocator.is_free(np.int16(pages[1])) and allocator.refcount(np.int64(pages[0])) == 1
    allocator.check()


# -- PrefixCache ------------------------------------------------------------------------------


def cache_state(cache: PrefixCache) -> tuple:
    return tuple(cache.entries()), tuple(cache.evictable_pages())


def a_cache() -> PrefixCache:
    """Page size 2; page 5 cached ([1, 2]) and evictable; page 6 cached ([3, 4]) and held."""
    cache = PrefixCache(2, KEY)
    first = cache.hash_page(ROOT_HASH, b"", [1, 2])
    cache.insert(5, first, ROOT_HASH, b"", [1, 2])
    cache.park(5)
    cache.insert(6, cache.hash_page(first, b"", [3, 4]), first, b"", [3, 4])
    return cache


@pytest.mark.parametrize("value", [*NOT_INTS, 0, -1, 2**31], ids=name)
def test_prefix_cache_refuses_bad_page_sizes(value: object) -> None:
    with pytest.raises(ValueError, match="page_size"):
        PrefixCache(value, KEY)  # type: ignore[arg-type]


@pytest.mark.parametrize("key", ["s", b"", b"x" * 65, bytearray(b"k"), 5, None], ids=name)
def test_prefix_cache_refuses_bad_keys(key: object) -> None:
    with pytest.raises(ValueError, match="hash_key"):
        PrefixCache(2, key)  # type: ignore[arg-type]


HASH_ERRORS: list[tuple[str, tuple, type, str]] = [
    *(
        (f"tokens={name(t)}", (ROOT_HASH, b"", t), TypeError, r"token_ids\[0\] must be an int")
        for t in ([1.5, 2], [True, 2], [np.bool_(True), 2], ["1", 2], [None, 2], [NAN, 2])
    ),
    ("float array", (ROOT_HASH, b"", np.array([1.0, 2.0])), TypeError, "dtype float64"),
    ("generator", (ROOT_HASH, b"", (t for t in [1, 2])), TypeError, "token_ids must be a seq"),
    ("str tokens", (ROOT_HASH, b"", "12"), TypeError, "token_ids must be a sequence"),
    ("int64 overflow", (ROOT_HASH, b"", [2**63, 0]), ValueError, "outside int64"),
    (
        "uint64 wrap",
        (ROOT_HASH, b"", np.array([2**63, 0], dtype=np.uint64)),
        ValueError,
        "outside int64",
    ),
    ("short page", (ROOT_HASH, b"", [1]), ValueError, "token_ids has 1 ids"),
    *(
        (f"parent={name(p)}", (p, b"", [1, 2]), TypeError, "parent_hash must be a 32-byte")
        for p in ("x", bytes(31), bytes(33), None, bytearray(32))
    ),
    *(
        (f"salt={name(s)}", (ROOT_HASH, s, [1, 2]), TypeError, "salt must be bytes")
        for s in ("s", None, bytearray(b"s"))
    ),
]


@pytest.mark.parametrize(
    ("args", "error", "match"), [c[1:] for c in HASH_ERRORS], ids=[c[0] for c in HASH_ERRORS]
)
def test_hash_page_refuses_what_would_collide_or_crash(
    args: tuple, error: type, match: str
) -> None:
    cache = a_cache()
    with pytest.raises(error, match=match):
        cache.hash_page(*args)


def test_hash_page_of_numpy_ints_equals_that_of_python_ints() -> None:
    cache = a_cache()
    digest = cache.hash_page(ROOT_HASH, b"", [1, 2])
    assert cache.hash_page(ROOT_HASH, b"", (np.int64(1), np.uint8(2))) == digest
    assert cache.hash_page(ROOT_HASH, b"", np.array([1, 2], dtype=np.int16)) == digest


def _insert_args(**changes: object) -> dict[str, object]:
    tokens = [7, 8]
    args: dict[str, object] = dict(
        page=1,
        page_hash=PrefixCache(2, KEY).hash_page(ROOT_HASH, b"", tokens),
        parent_hash=ROOT_HASH,
        salt=b"",
        token_ids=tokens,
    )
    args.update(changes)
    return args


INSERT_ERRORS: list[Any] = [
    *(
        pytest.param(dict(page=v), TypeError, "page must be an int", id=f"page={name(v)}")
        for v in ("x", None, True, 1.0, NAN, (1,))
    ),
    pytest.param(dict(page=-1), ValueError, "page=-1 is negative", id="page=-1"),
    pytest.param(dict(page_hash=b"short"), TypeError, "page_hash must be", id="short digest"),
    pytest.param(dict(page_hash="x" * 32), TypeError, "page_hash must be", id="str digest"),
    pytest.param(dict(parent_hash=None), TypeError, "parent_hash must be", id="no parent"),
    pytest.param(dict(salt="s"), TypeError, "salt must be bytes", id="str salt"),
    pytest.param(dict(token_ids=[7]), ValueError, "token_ids has 1 ids", id="short page"),
    pytest.param(dict(token_ids=[7.0, 8]), TypeError, r"token_ids\[0\]", id="float token"),
    pytest.param(dict(token_ids=iter([7, 8])), TypeError, "token_ids must be", id="iterator"),
]


@pytest.mark.parametrize(("changes", "error", "match"), INSERT_ERRORS)
def test_insert_refuses_malformed_entries(
    changes: dict[str, object], error: type, match: str
) -> None:
    cache = a_cache()
    before = cache_state(cache)
    with pytest.raises(error, match=match):
        cache.insert(**_insert_args(**changes))  # type: ignore[arg-type]
    assert cache_state(cache) == before
    cache.check()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda c: c.park(1), ValueError, "page=1 is not cached"),
        (lambda c: c.park(5), ValueError, "page=5 is already evictable"),
        (lambda c: c.unpark(6), ValueError, "page=6 is not an evictable"),
        (lambda c: c.park("x"), TypeError, "page must be an int"),
        (lambda c: c.unpark(5.0), TypeError, "page must be an int"),
        (lambda c: c.park(True), TypeError, "page must be an int"),
    ],
    ids=["park uncached", "park twice", "unpark held", "park str", "unpark float", "park bool"],
)
def test_park_and_unpark_refuse_wrong_pages(
    call: Callable[[PrefixCache], object], error: type, match: str
) -> None:
    cache = a_cache()
    before = cache_state(cache)
    with pytest.raises(error, match=match):
        call(cache)
    assert cache_state(cache) == before
    cache.check()


def test_prefix_cache_takes_numpy_page_ids_as_ints() -> None:
    cache = PrefixCache(np.int64(2), KEY)
    digest = cache.hash_page(ROOT_HASH, b"", [1, 2])
    assert cache.insert(np.int64(3), digest, ROOT_HASH, b"", np.array([1, 2]))
    cache.park(np.int32(3))
    assert [type(page) for page in cache.evictable_pages()] == [int]
    assert [type(entry.page) for entry in cache.entries()] == [int]
    assert cache.entry(3).token_ids == (1, 2)
    assert all(type(t) is int for t in cache.entry(3).token_ids)
    cache.unpark(np.uint8(3))
    cache.check()


# -- PagedRows --------------------------------------------------------------------------------


def rows_of(**overrides: object) -> PagedRows:
    """Rows ('s0': 6 tokens computed, 's1': 3 tokens computed, None) over a 16-page pool."""
    config: dict[str, object] = dict(
        num_pages=16, page_size=4, max_num_seqs=6, max_pages_per_seq=4, hash_key=KEY
    )
    config.update(overrides)
    manager = PageManager(**config)  # type: ignore[arg-type]
    for seq_id, prompt in (("s0", [1, 2, 3, 4, 5, 6]), ("s1", [11, 12, 13])):
        manager.add_sequence(seq_id, prompt)
        manager.commit_step(manager.schedule([(seq_id, len(prompt))]))
    return PagedRows(manager, ["s0", "s1", None])


def rows_refused(
    rows: PagedRows,
    call: Callable[[PagedRows], object],
    error: type | tuple[type, ...],
    match: str | None,
) -> None:
    manager = rows.manager
    before = manager.snapshot()
    with answers_within(), pytest.raises(error, match=match):
        call(rows)
    assert manager.snapshot() == before
    manager.check_invariants()
    assert not rows.consumed and rows.seq_ids == ("s0", "s1", None)


SAME = "the rows' own manager"
ROWS_CONSTRUCTOR_ERRORS: list[Any] = [
    *(
        pytest.param(v, ["s0"], TypeError, "manager must be a PageManager", id=f"m={name(v)}")
        for v in ("m", None, PageManager, 5)
    ),
    *(
        pytest.param(SAME, v, TypeError, "seq_ids must be a sequence", id=f"ids={name(v)}")
        for v in ("s0", b"s0", 5, None, {"s0"}, np.array(["s0"]), "GENERATOR")
    ),
    pytest.param(SAME, [], ValueError, "at least one row", id="no rows"),
    pytest.param(SAME, ["zz"], UnknownSequenceError, r"seq_ids\[0\]='zz'", id="unknown"),
    pytest.param(SAME, ["s0", ["x"]], UnknownSequenceError, r"seq_ids\[1\]", id="unhashable"),
    pytest.param(SAME, ["s0", "s0"], DuplicateSequenceError, r"seq_ids\[1\]='s0'", id="twice"),
]


@pytest.mark.parametrize(("manager", "seq_ids", "error", "match"), ROWS_CONSTRUCTOR_ERRORS)
def test_paged_rows_constructor_refuses(
    manager: object, seq_ids: object, error: type, match: str
) -> None:
    rows = rows_of()
    target = rows.manager if manager is SAME else manager
    generated = isinstance(seq_ids, str) and seq_ids == "GENERATOR"
    ids = (s for s in ["s0"]) if generated else seq_ids
    before = rows.manager.snapshot()
    with pytest.raises(error, match=match):
        PagedRows(target, ids)  # type: ignore[arg-type]
    assert rows.manager.snapshot() == before
    with pytest.raises(TypeError, match="new_seq_id must be a callable"):
        PagedRows(rows.manager, ["s0"], new_seq_id=5)  # type: ignore[arg-type]


ROW_ID_VALUES: list[tuple[object, type, str]] = [
    (5, TypeError, "must be a sequence of ints"),
    ("0", TypeError, "must be a sequence of ints"),
    (None, TypeError, "must be a sequence of ints"),
    ({0}, TypeError, "must be a sequence of ints"),
    ("GENERATOR", TypeError, "must be a sequence of ints"),
    ([0.0], TypeError, r"\[0\] must be an int"),
    ([NAN], TypeError, r"\[0\] must be an int"),
    ([None], TypeError, r"\[0\] must be an int"),
    ([np.float32(0)], TypeError, r"\[0\] must be an int"),
    (np.array([0.5]), TypeError, "dtype float64"),
    (np.array([[0]]), TypeError, r"shape \(1, 1\)"),
    ([3], ValueError, r"row ids in \[0, 3\)"),
    ([-1], ValueError, r"row ids in \[0, 3\)"),
    ([2**64], ValueError, r"row ids in \[0, 3\)"),
    ([-(2**63)], ValueError, r"row ids in \[0, 3\)"),
]


def _rows_arg(value: object) -> object:
    return (row for row in [0]) if isinstance(value, str) and value == "GENERATOR" else value


@pytest.mark.parametrize(
    ("value", "error", "match"), ROW_ID_VALUES, ids=[name(c[0]) for c in ROW_ID_VALUES]
)
@pytest.mark.parametrize("operation", ["reset_rows", "select"])
def test_row_id_arguments_are_refused(
    operation: str, value: object, error: type, match: str
) -> None:
    rows_refused(rows_of(), lambda r: getattr(r, operation)(_rows_arg(value)), error, match)


PER_ROW_VALUES: list[tuple[object, type, str]] = [
    (3, TypeError, "must be a sequence of ints"),
    ("abc", TypeError, "must be a sequence of ints"),
    (None, TypeError, "must be a sequence of ints"),
    ("GENERATOR", TypeError, "must be a sequence of ints"),
    ([0, 1], ValueError, r"per row \(3\), got 2"),
    ([0, 1, 0, 0], ValueError, r"per row \(3\), got 4"),
    ([True, 1, 0], TypeError, r"\[0\] must be an int"),
    ([np.bool_(False), 1, 0], TypeError, r"\[0\] must be an int"),
    ([1.0, 1, 0], TypeError, r"\[0\] must be an int"),
    ([NAN, 1, 0], TypeError, r"\[0\] must be an int"),
    ([None, 1, 0], TypeError, r"\[0\] must be an int"),
    (np.array([1.0, 1.0, 0.0]), TypeError, "dtype float64"),
    (np.zeros((3, 1), int), TypeError, r"shape \(3, 1\)"),
]


@pytest.mark.parametrize(
    ("value", "error", "match"), PER_ROW_VALUES, ids=[name(c[0]) for c in PER_ROW_VALUES]
)
@pytest.mark.parametrize("operation", ["truncate", "reorder"])
def test_per_row_arguments_are_refused(
    operation: str, value: object, error: type, match: str
) -> None:
    rows_refused(rows_of(), lambda r: getattr(r, operation)(_rows_arg(value)), error, match)


ROW_VALUE_ERRORS: list[Any] = [
    pytest.param(lambda r: r.reset_rows([True]), ValueError, r"shape \(3,\)", id="short mask"),
    pytest.param(
        lambda r: r.reset_rows(np.ones((1, 3), bool)), ValueError, r"shape \(3,\)", id="2-D mask"
    ),
    pytest.param(lambda r: r.select([]), ValueError, "at least one row", id="select none"),
    pytest.param(lambda r: r.select([1, 1]), ValueError, "distinct row ids", id="select twice"),
    pytest.param(
        lambda r: r.select(np.array([], float)), ValueError, "at least one", id="select no floats"
    ),
    pytest.param(lambda r: r.truncate([7, 3, 0]), ValueError, r"lengths\[0\]=7", id="too long"),
    pytest.param(lambda r: r.truncate([-1, 3, 0]), ValueError, r"lengths\[0\]=-1", id="negative"),
    pytest.param(lambda r: r.truncate([2**64, 3, 0]), ValueError, r"lengths\[0\]=", id="huge"),
    pytest.param(lambda r: r.truncate([0, 3, 1]), ValueError, "an empty row", id="empty row"),
    pytest.param(lambda r: r.reorder([0, 1, 3]), ValueError, "indices must be row", id="range"),
    pytest.param(lambda r: r.reorder([0, -1, 2]), ValueError, "indices must be row", id="neg"),
    pytest.param(lambda r: r.reorder([2**64, 0, 1]), ValueError, "indices must be", id="huge"),
    *(
        pytest.param(lambda r, v=v: r.repeat(v), TypeError, "n must be an int", id=f"n={name(v)}")
        for v in (True, np.bool_(True), 2.0, NAN, INF, "2", None, np.float64(2))
    ),
    pytest.param(lambda r: r.repeat(0), ValueError, "n must be >= 1, got 0", id="n=0"),
    pytest.param(lambda r: r.repeat(-1), ValueError, "n must be >= 1, got -1", id="n=-1"),
    pytest.param(lambda r: r.repeat(10**12), CapacityError, "max_num_seqs=6", id="n=10**12"),
    pytest.param(lambda r: r.repeat(2**63), CapacityError, "max_num_seqs=6", id="n=2**63"),
    pytest.param(lambda r: r.repeat(4), CapacityError, "needs 6 fork", id="n=4"),
    *(
        pytest.param(lambda r, v=v: r.extract(v), TypeError, "slot must be an int", id=name(v))
        for v in (True, 1.0, NAN, "0", None, np.float64(0))
    ),
    *(
        pytest.param(
            lambda r, v=v: r.extract(v), ValueError, r"slot must lie in \[0, 3\)", id=name(v)
        )
        for v in (-1, 3, 2**64)
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), ROW_VALUE_ERRORS)
def test_row_operation_values_are_refused(
    call: Callable[[PagedRows], object], error: type, match: str
) -> None:
    rows_refused(rows_of(), call, error, match)


def test_row_operations_refuse_at_capacity_and_while_pending() -> None:
    rows = rows_of(max_num_seqs=2)
    rows_refused(rows, lambda r: r.extract(0), CapacityError, "max_num_seqs=2")
    rows_refused(rows, lambda r: r.reorder([0, 0, 1]), CapacityError, "max_num_seqs=2")
    rows = rows_of()
    rows.manager.append_tokens("s1", [9])
    step = rows.manager.schedule([("s1", 1)])
    rows_refused(rows, lambda r: r.extract(1), StepPendingError, "pending step")
    rows_refused(rows, lambda r: r.repeat(2), StepPendingError, "pending step")
    rows_refused(rows, lambda r: r.truncate([6, 2, 0]), StepPendingError, "pending step")
    rows.manager.commit_step(step)


def test_insert_refuses_every_wrong_other_and_slot() -> None:
    rows = rows_of()
    manager = rows.manager
    manager.add_sequence("new", [1, 2])
    other = PagedRows(manager, ["new"])
    for value, error, match in [
        ("x", TypeError, "other must be a PagedRows, got str"),
        (None, TypeError, "other must be a PagedRows"),
        (rows, ValueError, "not this one"),
        (rows_of().select([0]), ValueError, "another PageManager"),
        (PagedRows(manager, ["new", None]), ValueError, "exactly one row"),
        (PagedRows(manager, ["s0"]), ValueError, "already backs row 0"),
    ]:
        rows_refused(rows, lambda r, value=value: r.insert(value, 2), error, match)
    for slot, error, match in [
        (3, ValueError, r"slot must lie in \[0, 3\)"),
        (-1, ValueError, "slot must lie"),
        (True, TypeError, "slot must be an int"),
        (1.0, TypeError, "slot must be an int"),
    ]:
        rows_refused(rows, lambda r, slot=slot: r.insert(other, slot), error, match)
        assert not other.consumed
    consumed = PagedRows(manager, ["new"])
    consumed.repeat(1)
    rows_refused(rows, lambda r: r.insert(consumed, 2), ConsumedRowsError, "consumed")
    result = rows.insert(other, np.int64(2))
    assert result.seq_ids == ("s0", "s1", "new") and other.consumed


def test_row_operations_take_numpy_ints_and_numpy_bool_masks() -> None:
    rows = rows_of()
    rows = rows.reorder(np.array([1, 0, 2], dtype=np.uint8))
    assert rows.seq_ids == ("s1", "s0", None)
    rows = rows.repeat(np.int64(2))
    assert rows.batch_size == 6 and len(rows.manager) == 4
    rows = rows.reset_rows([np.bool_(False), np.bool_(True), False, True, False, False])
    rows = rows.select([np.int64(0), np.int32(2)])
    assert rows.seq_ids[0] == "s1" and rows.batch_size == 2
    rows = rows.truncate(np.array([2, 0], dtype=np.int64) * np.array([1, 1]))
    rows.manager.check_invariants()
    assert rows.extract(np.int64(0)).batch_size == 1


# -- build_step_metadata ----------------------------------------------------------------------

BUILD = dict(num_pages=6, page_size=2, max_num_seqs=3, max_pages_per_seq=3, token_buckets=(16,))
ROW = StepRow("a", (0, 1), 3, (7,))  # writes position 3 (page 1, offset 1)


def build(rows: object = (ROW,), copy_ops: object = (), **overrides: object) -> object:
    config = {**BUILD, **overrides}
    with answers_within():
        return build_step_metadata(rows, copy_ops, **config)  # type: ignore[arg-type]


@pytest.mark.parametrize("argument", SIZE_ARGUMENTS)
@pytest.mark.parametrize("value", NOT_INTS + BAD_SIZES, ids=name)
def test_builder_refuses_every_bad_geometry(argument: str, value: object) -> None:
    with pytest.raises(ValueError, match=argument):
        build(**{argument: value})


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(num_pages=2**20, page_size=2**12), "int32 slot_mapping"),
        *((dict(token_buckets=v), "token_buckets") for v in ([], 5, [0], [16, 8], [16.0], None)),
    ],
    ids=["slots>int32", "no buckets", "int", "zero", "decreasing", "float", "None"],
)
def test_builder_refuses_bad_configurations(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build(**overrides)


def _row(**changes: object) -> StepRow:
    return dataclasses.replace(ROW, **changes)


BUILDER_ROW_ERRORS: list[Any] = [
    *(
        pytest.param(v, TypeError, "rows must be a sequence of StepRow", id=f"rows={name(v)}")
        for v in ("GENERATOR", 5, "ab", None, {ROW})
    ),
    pytest.param([("a", (0, 1), 3, (7,))], TypeError, r"rows\[0\] must be a StepRow", id="tuple"),
    pytest.param([None], TypeError, r"rows\[0\] must be a StepRow", id="None row"),
    pytest.param([_row(seq_id=["a"])], TypeError, r"rows\[0\].seq_id must be hashable", id="id"),
    *(
        pytest.param([_row(page_ids=v)], TypeError, "page_ids", id=f"pages={name(v)}")
        for v in (
            (0, 1.5),
            (0, True),
            (0, "1"),
            (0, None),
            (0, np.float64(1)),
            (0, np.bool_(True)),
            np.array([0.0, 1.0]),
            "GENERATOR",
            5,
            "01",
        )
    ),
    *(
        pytest.param([_row(page_ids=v)], ValueError, "page id .* outside", id=f"pages={name(v)}")
        for v in ((0, 6), (0, -2), (0, 2**31), (0, 2**64), (np.int64(-2), 1))
    ),
    *(
        # -1 (no page: released before a sliding window) only where the row reads.
        pytest.param([_row(page_ids=v)], ValueError, r"is -1 \(no page\)", id=f"pages={name(v)}")
        for v in ((0, -1), (0, np.int64(-1)))
    ),
    *(
        pytest.param([_row(new_token_ids=v)], TypeError, "new_token_ids", id=f"tokens={name(v)}")
        for v in ((1.5,), (True,), ("1",), (None,), np.array([1.0]), "GENERATOR", 7)
    ),
    *(
        pytest.param([_row(new_token_ids=v)], ValueError, "new token id", id=f"tokens={name(v)}")
        for v in ((-1,), (2**31,), (2**64,), (np.uint64(2**63),))
    ),
    pytest.param([_row(new_token_ids=())], ValueError, "no new tokens", id="no tokens"),
    *(
        pytest.param([_row(num_computed=v)], TypeError, "num_computed must be an int", id=name(v))
        for v in (3.0, True, "3", None, NAN, np.float64(3))
    ),
    pytest.param([_row(num_computed=-1)], ValueError, "num_computed=-1 is negative", id="-1"),
    pytest.param([_row(num_computed=2**40)], ValueError, "cannot hold", id="2**40"),
    pytest.param([_row(page_ids=(0, 1, 2, 3))], ValueError, "max_pages_per_seq=3", id="wide"),
    pytest.param([ROW, _row(page_ids=(2, 3))], ValueError, "repeats seq_id='a'", id="same seq"),
    pytest.param([ROW] * 4, ValueError, "rows has 4 entries", id="too many rows"),
    pytest.param([], ValueError, "rows has 0 entries", id="no rows"),
]


def _generated(value: object, default: object) -> object:
    if isinstance(value, str) and value == "GENERATOR":
        return (item for item in default)  # type: ignore[union-attr]
    return value


@pytest.mark.parametrize(("rows", "error", "match"), BUILDER_ROW_ERRORS)
def test_builder_refuses_malformed_rows(rows: object, error: type, match: str) -> None:
    rows = _generated(rows, [ROW])
    if isinstance(rows, list) and rows and isinstance(rows[0], StepRow):
        rows = [
            dataclasses.replace(
                row,
                page_ids=_generated(row.page_ids, (0, 1)),
                new_token_ids=_generated(row.new_token_ids, (7,)),
            )
            for row in rows
        ]
    with pytest.raises(error, match=match):
        build(rows)


BUILDER_COPY_ERRORS: list[Any] = [
    *(
        pytest.param(v, TypeError, "copy_ops must be", id=f"copies={name(v)}")
        for v in ("GENERATOR", 5, "ab", None, np.array([[2.0, 1.0]]), np.array([2, 1]))
    ),
    *(
        pytest.param([v], TypeError, r"copy_ops\[0\] must be a \(src_page, dst_page\)", id=name(v))
        for v in ((2.5, 1), (True, 1), (2, np.bool_(True)), (2,), (2, 1, 0), None, ("2", "1"), 5)
    ),
    *(
        pytest.param([v], ValueError, r"copy op \(.*\) must name two distinct pages", id=name(v))
        for v in ((2, 9), (-1, 1), (1, 1), (2, 2**64), (2**64, 1))
    ),
    pytest.param([(2, 1)] * 4, ValueError, "copy_ops has 4 entries", id="too many copies"),
]


@pytest.mark.parametrize(("copy_ops", "error", "match"), BUILDER_COPY_ERRORS)
def test_builder_refuses_malformed_copy_ops(copy_ops: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        build([ROW], _generated(copy_ops, [(2, 1)]))


def test_builder_takes_numpy_ints_and_arrays() -> None:
    row = StepRow(np.int64(3), np.array([0, 1]), np.int64(3), np.array([7], dtype=np.uint16))
    step = build([row], np.array([[2, 1]], dtype=np.int32))
    assert step.slot_mapping[0] == 3 and step.copy_ops[0].tolist() == [2, 1]
    assert step.num_copies == 1 and step.num_new_tokens == (1,)
    step = build([ROW], [np.array([2, 1])], num_pages=np.int64(6))
    assert step.num_copies == 1 and type(step.num_pages) is int


def test_builder_at_the_int32_boundary() -> None:
    """The last slot of the largest pool int32 can address, and the largest token id."""
    last = INT32_MAX - 1  # num_pages * page_size <= 2**31 - 1: the last slot is 2**31 - 2
    step = build(
        [StepRow("a", (last,), 0, (INT32_MAX,))],
        num_pages=INT32_MAX,
        page_size=1,
        max_pages_per_seq=1,
    )
    assert step.slot_mapping[0] == last and step.token_ids[0] == INT32_MAX
    assert step.page_tables[0, 0] == last


# -- select_bucket and default_token_buckets --------------------------------------------------


@pytest.mark.parametrize(
    ("num_tokens", "buckets", "error", "match"),
    [
        *((v, (8, 16), TypeError, "num_tokens must be an int") for v in NOT_INTS),
        (-1, (8, 16), ValueError, "num_tokens=-1 is negative"),
        (-(2**63), (8, 16), ValueError, "is negative"),
        (17, (8, 16), CapacityError, "num_tokens=17 exceeds the largest token bucket 16"),
        (2**64, (8, 16), CapacityError, "exceeds the largest"),
        *((3, v, ValueError, "token_buckets") for v in ([], (), 5, None, [16, 8], [0], [8.0])),
        (3, [True, 8], ValueError, "token_buckets"),
        (3, "ENDLESS", ValueError, "token_buckets"),
    ],
    ids=name,
)
def test_select_bucket_refuses(
    num_tokens: object, buckets: object, error: type, match: str
) -> None:
    if isinstance(buckets, str) and buckets == "ENDLESS":
        buckets = endless(lambda index: 8 + index)
    with answers_within(), pytest.raises(error, match=match):
        select_bucket(num_tokens, buckets)  # type: ignore[arg-type]


def test_select_bucket_takes_numpy_ints_and_reads_a_generator_entirely() -> None:
    assert select_bucket(np.int64(9), (8, 16)) == 16
    assert select_bucket(0, (8,)) == 8
    assert select_bucket(INT32_MAX, (2**31,)) == 2**31
    assert select_bucket(9, (b for b in (8, 16, 32))) == 16
    with pytest.raises(CapacityError, match="largest token bucket 16"):
        select_bucket(99, (b for b in (8, 16)))
    assert select_bucket(3, np.array([4, 8])) == 4


@pytest.mark.parametrize("argument", ["max_num_tokens", "min_bucket"])
@pytest.mark.parametrize("value", [*NOT_INTS, 0, -1, -(2**63)], ids=name)
def test_default_token_buckets_refuses(argument: str, value: object) -> None:
    args = {"max_num_tokens": 40, "min_bucket": 8, argument: value}
    with pytest.raises(ValueError, match=argument):
        default_token_buckets(**args)  # type: ignore[arg-type]


def test_default_token_buckets_takes_numpy_ints_and_huge_sizes() -> None:
    assert default_token_buckets(np.int64(40), np.int32(8)) == (8, 16, 32, 64)
    assert all(type(b) is int for b in default_token_buckets(np.int64(40), np.int32(8)))
    huge = default_token_buckets(2**62)
    assert huge[-1] == 2**62 and len(huge) == 60


# -- property tests ---------------------------------------------------------------------------

HOSTILE = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(-3, 20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=2),
    st.sampled_from([np.int64(3), np.uint64(2**63), np.float32(1), np.bool_(True), np.int8(-1)]),
)


def _valid_int(value: object, low: int, high: int) -> bool:
    return (
        not isinstance(value, bool | np.bool_)
        and isinstance(value, int | np.integer)
        and low <= value <= high
    )


@settings(max_examples=150, deadline=None)
@given(value=HOSTILE)
def test_truncate_accepts_exactly_the_valid_lengths(value: object) -> None:
    manager = populated()
    if _valid_int(value, 0, 5):
        manager.truncate("a", value)  # type: ignore[arg-type]
        assert len(manager.get_sequence("a").token_ids) == value
        manager.check_invariants()
    else:
        before = manager.snapshot()
        with pytest.raises((TypeError, ValueError)):
            manager.truncate("a", value)  # type: ignore[arg-type]
        assert manager.snapshot() == before


@settings(max_examples=150, deadline=None)
@given(tokens=st.lists(HOSTILE, max_size=18), as_generator=st.booleans())
def test_add_sequence_accepts_exactly_the_valid_prompts(
    tokens: list[object], as_generator: bool
) -> None:
    manager = populated()
    prompt = (token for token in tokens) if as_generator else tokens
    valid = 1 <= len(tokens) <= 16 and all(_valid_int(t, 0, INT32_MAX) for t in tokens)
    if valid:
        manager.add_sequence("c", prompt)  # type: ignore[arg-type]
        assert manager.get_sequence("c").token_ids == tuple(int(t) for t in tokens)  # type: ignore[call-overload]
        manager.check_invariants()
    else:
        before = manager.snapshot()
        with pytest.raises((TypeError, ValueError)):
            manager.add_sequence("c", prompt)  # type: ignore[arg-type]
        assert manager.snapshot() == before
        manager.check_invariants()


@settings(max_examples=150, deadline=None)
@given(
    batch=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "zz", 1.5]), st.one_of(HOSTILE, st.integers(1, 3))
        ),
        max_size=4,
    )
)
def test_schedule_accepts_exactly_the_valid_batches(batch: list[tuple[object, object]]) -> None:
    manager = populated()
    manager.add_sequence("c", [1, 2, 3])
    remaining = {"a": 0, "b": 2, "c": 3}
    ids = [seq_id for seq_id, _ in batch]
    valid = (
        bool(batch)
        and len(set(ids)) == len(ids)
        and all(seq_id in remaining for seq_id in ids)
        and all(_valid_int(count, 1, remaining.get(seq_id, 0)) for seq_id, count in batch)
    )
    before = manager.snapshot()
    if not valid:
        with pytest.raises((TypeError, ValueError, KeyError)):
            manager.pages_needed(batch)
        with pytest.raises((TypeError, ValueError, KeyError)):
            manager.schedule(batch)
        assert manager.snapshot() == before
        return
    needed = manager.pages_needed(batch)
    free = manager.num_available_pages
    step = manager.schedule(batch)
    assert needed <= free
    assert step.num_tokens == sum(int(count) for _, count in batch)  # type: ignore[call-overload]
    manager.commit_step(step)
    manager.check_invariants()


@settings(max_examples=150, deadline=None)
@given(
    operation=st.sampled_from(["reset_rows", "select", "reorder", "truncate"]),
    values=st.lists(st.one_of(HOSTILE, st.integers(0, 3)), max_size=4),
)
def test_row_operations_accept_exactly_the_valid_arguments(
    operation: str, values: list[object]
) -> None:
    rows = rows_of()
    in_range = all(_valid_int(v, 0, 2) for v in values)
    mask = bool(values) and all(isinstance(v, bool | np.bool_) for v in values)
    valid = {
        "reset_rows": len(values) == 3 if mask else in_range,
        "select": in_range and len(values) >= 1 and len(set(values)) == len(values),
        "reorder": in_range and len(values) == 3,  # at most 2 forks: they always fit
        "truncate": len(values) == 3
        and all(_valid_int(v, 0, n) for v, n in zip(values, [6, 3, 0], strict=True)),
    }[operation]
    if valid:
        result = getattr(rows, operation)(values)
        assert rows.consumed and not result.consumed
        result.manager.check_invariants()
    else:
        rows_refused(rows, lambda r: getattr(r, operation)(values), (TypeError, ValueError), None)


def test_nothing_the_caller_keeps_aliases_the_bookkeeping() -> None:
    """Mutating an argument after the call (or a returned value) changes nothing inside."""
    manager = populated()
    prompt = [1, 2, 3]
    manager.add_sequence("c", prompt)
    prompt.append(4)
    assert manager.get_sequence("c").token_ids == (1, 2, 3)
    snapshot = manager.snapshot()
    manager.snapshot()["free_queue"] = ()
    assert manager.snapshot() == snapshot
    pages = [0, 1]
    step = build([StepRow("a", pages, 3, [7])])  # type: ignore[arg-type]
    pages[1] = 5
    assert step.page_tables[0, :2].tolist() == [0, 1]
    with pytest.raises(ValueError, match="read-only"):
        step.slot_mapping[0] = 0  # type: ignore[union-attr]
    ids = ["s0", "s1", None]
    rows = PagedRows(rows_of().manager, ids)
    ids[0] = None
    assert rows.seq_ids == ("s0", "s1", None)
