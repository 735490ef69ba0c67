"""Stateful property test of `PageManager` against a reference model and a shadow device pool.

The reference model is a dict `seq_id -> token list`. The shadow pool (`ShadowPool`) receives every
step exactly as the device would (copy ops, then writes at `slot_mapping`). After every rule, all
invariants hold and every live sequence reads back exactly its own computed tokens through its
page table, whatever sharing, forking, caching and eviction happened in between.
"""

from __future__ import annotations

from collections.abc import Callable

import hypothesis.strategies as st
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from jaxkv.pages import (
    CapacityError,
    OutOfPagesError,
    PageManager,
    UnknownSequenceError,
)

from .shadow_pool import ShadowPool

NUM_PAGES = 10
MAX_NUM_SEQS = 4
MAX_PAGES_PER_SEQ = 6

# A tiny vocabulary and a few shared stems make prefix hits (and salted misses) common.
STEMS = [[], [1, 1, 2, 2], [1, 1, 2, 2, 3, 3], [4, 5, 4, 5, 4]]
prompts = st.builds(
    lambda stem, tail: stem + tail,
    st.sampled_from(STEMS),
    st.lists(st.integers(0, 5), min_size=1, max_size=3),
)
salts = st.sampled_from([None, "tenant"])


class PageManagerMachine(RuleBasedStateMachine):
    page_size = 2
    enable_prefix_caching = True
    max_pages_per_seq = MAX_PAGES_PER_SEQ
    window: dict[str, int] = {}  # windowed mode: sliding_window and window_margin

    def __init__(self) -> None:
        super().__init__()
        self.manager = PageManager(
            num_pages=NUM_PAGES,
            page_size=self.page_size,
            max_num_seqs=MAX_NUM_SEQS,
            max_pages_per_seq=self.max_pages_per_seq,
            enable_prefix_caching=self.enable_prefix_caching,
            hash_key=b"stateful",
            token_buckets=(4, 8, 16, 32, 64),
            **self.window,
        )
        self.pool = ShadowPool(NUM_PAGES, self.page_size)
        self.reference: dict[int, list[int]] = {}
        self.next_id = 0

    @property
    def max_seq_len(self) -> int:
        return self.max_pages_per_seq * self.page_size

    def held_from(self, page_ids: tuple[int, ...] | list[int]) -> int:
        """The first position a page table still holds (windowed mode releases a prefix)."""
        released = next((i for i, page in enumerate(page_ids) if page != -1), len(page_ids))
        return released * self.page_size

    def pick(self, data: st.DataObject) -> int | None:
        if not self.reference:
            return None
        return data.draw(st.sampled_from(sorted(self.reference)), label="seq_id")

    def expect_refusal(
        self, error: type[Exception], call: Callable[..., object], *args: object
    ) -> None:
        before = self.manager.snapshot()
        try:
            call(*args)
        except error:
            pass
        else:
            raise AssertionError(f"{call.__name__}{args!r} did not raise {error.__name__}")
        assert self.manager.snapshot() == before

    # -- rules -----------------------------------------------------------------------------------

    @initialize()
    def warm_cache(self) -> None:
        """Start every run with computed stems, one of them already freed (evictable pages)."""
        for stem in (STEMS[2], STEMS[3]):
            self.add(stem + [0], None, compute_now=True)
        self.free_id(min(self.reference))

    @rule(prompt=prompts, salt=salts, compute_now=st.booleans())
    def add(self, prompt: list[int], salt: str | None, compute_now: bool) -> None:
        seq_id = self.next_id
        self.next_id += 1
        if len(self.reference) >= MAX_NUM_SEQS:
            self.expect_refusal(CapacityError, self.manager.add_sequence, seq_id, prompt)
            return
        hits = self.manager.add_sequence(seq_id, prompt, cache_salt=salt)
        assert hits % self.page_size == 0 and 0 <= hits <= len(prompt) - 1
        if not self.enable_prefix_caching:
            assert hits == 0
        assert self.manager.get_sequence(seq_id).num_computed == hits
        if hits:
            event("prefix hit")
        self.reference[seq_id] = list(prompt)
        if compute_now:
            self.try_step([(seq_id, len(prompt) - hits)])

    @rule(length=st.integers(6, 12), token=st.integers(6, 9))
    def add_long_fresh_prompt(self, length: int, token: int) -> None:
        """Pressure: a long prompt nobody shares, computed at once if it fits."""
        if len(self.reference) >= MAX_NUM_SEQS:
            return
        seq_id = self.next_id
        self.next_id += 1
        prompt = [token] * length
        hits = self.manager.add_sequence(seq_id, prompt)
        self.reference[seq_id] = prompt
        self.try_step([(seq_id, length - hits)])

    @rule(data=st.data(), tokens=st.lists(st.integers(0, 5), min_size=1, max_size=3))
    def append(self, data: st.DataObject, tokens: list[int]) -> None:
        seq_id = self.pick(data)
        if seq_id is None:
            return
        if len(self.reference[seq_id]) + len(tokens) > self.max_seq_len:
            self.expect_refusal(CapacityError, self.manager.append_tokens, seq_id, tokens)
            return
        self.manager.append_tokens(seq_id, tokens)
        self.reference[seq_id].extend(tokens)

    def uncomputed(self) -> dict[int, int]:
        remaining = {
            seq_id: len(tokens) - self.manager.get_sequence(seq_id).num_computed
            for seq_id, tokens in self.reference.items()
        }
        return {seq_id: count for seq_id, count in remaining.items() if count > 0}

    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        pending = self.uncomputed()
        candidates = sorted(pending)
        if not candidates:
            return
        chosen = data.draw(
            st.lists(st.sampled_from(candidates), min_size=1, unique=True), label="batch"
        )
        batch = [
            (seq_id, data.draw(st.integers(1, pending[seq_id]), label="num_new_tokens"))
            for seq_id in chosen
        ]
        self.try_step(batch)

    @rule()
    def step_everything(self) -> None:
        """Compute every known token of every sequence in one step (if it fits)."""
        batch = sorted(self.uncomputed().items())
        if batch:
            self.try_step(batch)

    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = self.pick(data)
        if parent is None:
            return
        child = self.next_id
        self.next_id += 1
        if len(self.reference) >= MAX_NUM_SEQS:
            self.expect_refusal(CapacityError, self.manager.fork, parent, child)
            return
        self.manager.fork(parent, child)
        self.reference[child] = list(self.reference[parent])

    @rule(data=st.data(), first=st.integers(0, 5), second=st.integers(0, 5))
    def fork_and_decode(self, data: st.DataObject, first: int, second: int) -> None:
        """Parallel sampling: fork, give each branch its own next token, decode both at once."""
        parent = self.pick(data)
        if parent is None or len(self.reference) >= MAX_NUM_SEQS:
            return
        if len(self.reference[parent]) >= self.max_seq_len or self.uncomputed().get(parent):
            return
        child = self.next_id
        self.next_id += 1
        self.manager.fork(parent, child)
        self.reference[child] = list(self.reference[parent])
        for seq_id, token in ((parent, first), (child, second)):
            self.manager.append_tokens(seq_id, [token])
            self.reference[seq_id].append(token)
        self.try_step([(parent, 1), (child, 1)])

    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq_id = self.pick(data)
        if seq_id is not None:
            self.free_id(seq_id)

    def free_id(self, seq_id: int) -> None:
        self.manager.free(seq_id)
        del self.reference[seq_id]

    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        """Rollback, often inside a cached page: the next write must copy it, not change it."""
        seq_id = self.pick(data)
        if seq_id is None:
            return
        length = data.draw(st.integers(0, len(self.reference[seq_id])), label="num_tokens")
        if length < self.manager.min_truncate_length(seq_id):
            self.expect_refusal(ValueError, self.manager.truncate, seq_id, length)
            event("truncate below the window refused")
            return
        self.manager.truncate(seq_id, length)
        del self.reference[seq_id][length:]
        info = self.manager.get_sequence(seq_id)
        assert info.num_computed <= length
        assert len(info.page_ids) == -(-info.num_computed // self.page_size)
        if info.num_computed % self.page_size and self.manager._prefix_cache.is_cached(
            info.page_ids[-1]
        ):
            event("truncated inside a cached page")

    @rule()
    def free_unknown(self) -> None:
        self.expect_refusal(UnknownSequenceError, self.manager.free, self.next_id + 1000)

    def try_step(self, batch: list[tuple[int, int]]) -> None:
        needed = self.manager.pages_needed(batch)
        available = self.manager.num_available_pages
        before = self.manager.snapshot()
        evictions = self.manager.stats().num_evictions
        try:
            step = self.manager.schedule(batch)
        except OutOfPagesError as error:
            assert needed > available
            assert (error.needed, error.free + error.evictable) == (needed, available)
            assert self.manager.snapshot() == before
            event("out of pages")
            return
        assert needed <= available
        assert step.num_copies <= len(batch)
        geometry = (step.num_pages, step.page_size, step.max_num_seqs, step.max_pages_per_seq)
        assert geometry == (NUM_PAGES, self.page_size, MAX_NUM_SEQS, self.max_pages_per_seq)
        if step.num_copies:
            event("copy-on-write")
        if self.manager.stats().num_evictions > evictions:
            event("eviction")
        self.pool.apply(step)
        # What attention reads this step: every row's whole context, through its page table.
        # (windowed: from the first page still held, which the window of every query starts after)
        for row, seq_id in enumerate(step.seq_ids):
            length = int(step.context_lens[row])
            table = step.page_tables[row].tolist()
            used = -(-length // self.page_size)
            assert all(page == -1 for page in table[used:])
            start = self.held_from(table[:used])
            if self.window:
                first_query = length - step.num_new_tokens[row]
                assert start <= max(first_query - self.window["sliding_window"], 0)
            else:
                assert start == 0
            assert self.pool.read(table, length, start) == self.reference[seq_id][start:length]
        self.manager.commit_step(step)
        if self.window:
            window = self.window["sliding_window"] + self.window["window_margin"]
            for seq_id in step.seq_ids:
                info = self.manager.get_sequence(seq_id)
                held = [page for page in info.page_ids if page != -1]
                assert len(held) <= -(-(window + max(step.num_new_tokens)) // self.page_size) + 1
                if self.held_from(info.page_ids):
                    event("pages released before the window")

    # -- invariants ------------------------------------------------------------------------------

    @invariant()
    def manager_invariants_hold(self) -> None:
        self.manager.check_invariants()
        stats = self.manager.stats()
        assert stats.num_used_pages + stats.num_evictable_pages + stats.num_free_pages == NUM_PAGES
        assert stats.num_seqs == len(self.reference)

    @invariant()
    def every_sequence_reads_back_its_own_tokens(self) -> None:
        assert set(self.manager.seq_ids) == set(self.reference)
        for seq_id, tokens in self.reference.items():
            info = self.manager.get_sequence(seq_id)
            assert list(info.token_ids) == tokens
            start = self.held_from(info.page_ids)
            assert (
                self.pool.read(info.page_ids, info.num_computed, start)
                == (tokens[start : info.num_computed])
            )

    @invariant()
    def cached_pages_are_intact(self) -> None:
        """A cached page is full and immutable: the pool holds exactly its registered tokens."""
        for entry in self.manager._prefix_cache.entries():
            assert tuple(self.pool.pages[entry.page]) == entry.token_ids

    def teardown(self) -> None:
        for seq_id in list(self.reference):
            self.manager.free(seq_id)
        self.manager.check_invariants()
        assert self.manager.num_free_pages + self.manager.num_evictable_pages == NUM_PAGES


class PageManagerWithoutCachingMachine(PageManagerMachine):
    page_size = 3
    enable_prefix_caching = False


class WindowedPageManagerMachine(PageManagerMachine):
    """Windowed mode: the pool (10 pages) is smaller than one sequence's table (12 pages); the
    pages before `num_computed - W - M` go back after every step."""

    page_size = 2
    enable_prefix_caching = False
    max_pages_per_seq = 12
    window = {"sliding_window": 4, "window_margin": 1}


FAST = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

TestPageManagerStateful = PageManagerMachine.TestCase
TestPageManagerStateful.settings = FAST
TestPageManagerWithoutCaching = PageManagerWithoutCachingMachine.TestCase
TestPageManagerWithoutCaching.settings = settings(FAST, max_examples=30)
TestWindowedPageManager = WindowedPageManagerMachine.TestCase
TestWindowedPageManager.settings = settings(FAST, max_examples=40)
