"""The row operations of every cache family, as one property: random programs of ragged writes,
``reset_rows``, ``truncate``, ``select``, ``reorder``, ``repeat``, ``insert`` and ``extract``
against a reference that keeps each row's token history in plain Python and recomputes from it.

After every step, a probe writes one token into every row of a copy of the cache (caches are
functional, so the cache itself is unchanged) and its outputs are compared with the reference
recomputed from the row's whole history: naive attention for the KV families (contiguous, ring,
paged), the whole-sequence scan of the mixer for the recurrent ones (Mamba, Mamba2, linear
attention), the whole-sequence forward of a tiny model for the hybrid stack. Families that cannot
roll back must refuse ``truncate`` with ``UnsupportedOperationError`` and stay unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxkv.caches import (
    HybridCache,
    HybridRuntimeMetadata,
    PagedCache,
    PagedCacheMetadata,
    RecurrentCache,
    RecurrentRuntimeMetadata,
    TransformerCache,
    TransformerCacheMetadata,
    TransformerRuntimeMetadata,
)
from jaxkv.engine.step_inputs import hybrid_paged_runtime, paged_runtime
from jaxkv.errors import UnsupportedOperationError
from jaxkv.models import hybrid, mamba, mamba2
from jaxkv.models import linear_attention as linear
from jaxkv.ops import attention
from jaxkv.ops.reference import naive_attention
from jaxkv.pages import PagedRows, PageManager

VOCAB, MAX_POS, KV_HEADS, Q_HEADS, DIM, LAYERS = 48, 48, 2, 4, 8, 2
CAPACITY = 40  # tokens a row may hold (every program stays below it)
MAX_ROWS = 4
WIDTHS = (1, 3)  # tokens per row of a write (ragged below that)
WINDOW = 4
HIDDEN = 16
ATOL = 2e-4
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _tables():
    rng = np.random.default_rng(0)
    make = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return {
        name: (make(LAYERS, VOCAB, heads, DIM), make(LAYERS, MAX_POS, heads, DIM))
        for name, heads in (("q", Q_HEADS), ("k", KV_HEADS), ("v", KV_HEADS))
    }


TABLES = _tables()
FRESH_IDS = itertools.count()
EMBED = np.random.default_rng(1).standard_normal((VOCAB, HIDDEN)).astype(np.float32)


def _qkv(layer, token_ids, positions):
    """q, k, v of tokens at positions (NumPy or JAX int arrays of any shape)."""
    xp = jnp if isinstance(token_ids, jax.Array) else np
    out = []
    for name in ("q", "k", "v"):
        by_token, by_position = TABLES[name]
        out.append(
            xp.asarray(by_token[layer])[token_ids] + xp.asarray(by_position[layer])[positions]
        )
    return out


def _kv_reference(history, count, window=None):
    """Per layer, naive attention of the last ``count`` tokens of ``history``:
    ``[count, layers, Q_HEADS, DIM]``."""
    tokens = np.asarray(history)
    positions = np.arange(len(tokens))
    out = []
    for layer in range(LAYERS):
        q, k, v = _qkv(layer, tokens, positions)
        out.append(
            naive_attention(
                q[None, len(tokens) - count :],
                k[None],
                v[None],
                positions[None, len(tokens) - count :],
                positions[None],
                sliding_window=window,
            )[0]
        )
    return np.stack(out, axis=1)


# --------------------------------------------------------------------------------------------
# Families: how to build, write and recompute; the row operations come from the caches
# --------------------------------------------------------------------------------------------


class RowFamily:
    """A cache family as the program sees it. ``state`` is what the row operations act on."""

    truncates = True

    def init(self, batch):
        raise NotImplementedError

    def write(self, state, tokens, counts, side):
        """Write ``counts[b]`` of ``tokens[b]`` per row; return ``(state, outputs)`` where
        ``outputs[b]`` holds the outputs of the row's last ``counts[b]`` tokens."""
        raise NotImplementedError

    def reference(self, history, count):
        raise NotImplementedError

    def lengths(self, state):
        return np.asarray(self._cache(state)[0].lengths).tolist()

    def _cache(self, state):
        return state

    def apply(self, state, operation, *args):
        return getattr(state, operation)(*args)

    def extract(self, state, slot):
        return state.extract(slot)

    def insert(self, state, other, slot):
        return state.insert(other, slot)

    def discard(self, state):
        """An extracted one-row state that will not be used any more."""


class BatchFamily(RowFamily):
    """Families whose writes take ``[batch, T]`` tokens with a ragged runtime."""

    def _write(self, cache, tokens, counts, side):
        raise NotImplementedError

    def write(self, state, tokens, counts, side):
        out, state = self._write(state, jnp.asarray(tokens), jnp.asarray(counts, jnp.int32), side)
        out = np.asarray(out)
        width = tokens.shape[1]
        results = []
        for row, count in enumerate(counts):
            start = 0 if side == "right" else width - count
            results.append(out[row, start : start + count])
        return state, results


class KVFamily(BatchFamily):
    def __init__(self, window=None, kv_quantization="none"):
        self.window = window
        self.kv_quantization = kv_quantization
        self.truncates = window is None

    def init(self, batch):
        metadata = TransformerCacheMetadata.create(
            batch,
            CAPACITY,
            LAYERS,
            KV_HEADS,
            DIM,
            sliding_window=self.window,
            kv_quantization=self.kv_quantization,
        )
        return TransformerCache.init_cache(metadata)

    @functools.partial(jax.jit, static_argnums=(0, 4))
    def _write(self, cache, tokens, counts, side):
        runtime = TransformerRuntimeMetadata.create(counts, side)
        positions = jnp.maximum(cache[0].query_positions(runtime, tokens.shape[1]), 0)
        outputs = []
        for layer, view in enumerate(cache):
            q, k, v = _qkv(layer, tokens, positions)
            kv, view = view.concatenate_to_cache(k, v, runtime)
            outputs.append(attention(q, kv, block_size=8))
            cache = cache.replace_view(layer, view)
        return jnp.stack(outputs, axis=2), cache

    def reference(self, history, count):
        return _kv_reference(history, count, self.window)

    def __hash__(self):
        return hash((self.window, self.kv_quantization))


class PagedFamily(RowFamily):
    """A paged cache driven by a ``PageManager``; the row operations act on ``PagedRows`` (the
    host page tables) and on the cache (which has nothing to move)."""

    PAGE_SIZE, SEQS, PAGES = 4, MAX_ROWS + 2, 96

    def init(self, batch):
        manager = PageManager(
            self.PAGES,
            self.PAGE_SIZE,
            self.SEQS,
            CAPACITY // self.PAGE_SIZE,
            hash_key=b"rows",
            token_buckets=(16,),
        )
        metadata = PagedCacheMetadata.create(
            LAYERS,
            self.PAGES,
            self.PAGE_SIZE,
            KV_HEADS,
            DIM,
            self.SEQS,
            CAPACITY // self.PAGE_SIZE,
        )
        return PagedCache.init_cache(metadata), PagedRows(manager, [None] * batch)

    @staticmethod
    @jax.jit
    def _step(cache, runtime):
        positions = jnp.maximum(cache[0].query_positions(runtime, runtime.slot_mapping.shape[0]), 0)
        outputs = []
        for layer, view in enumerate(cache):
            q, k, v = _qkv(layer, runtime.token_ids, positions)
            kv, view = view.concatenate_to_cache(k, v, runtime)
            outputs.append(attention(q, kv, block_size=8))
            cache = cache.replace_view(layer, view)
        return jnp.stack(outputs, axis=1), cache

    def write(self, state, tokens, counts, side):
        cache, rows = state
        manager = rows.manager
        seq_ids = list(rows.seq_ids)
        batch = []
        width = tokens.shape[1]
        for row, count in enumerate(counts):
            if not count:
                continue
            start = 0 if side == "right" else width - count  # packed: padding is dropped
            new = [int(t) for t in tokens[row, start : start + count]]
            if seq_ids[row] is None:
                seq_ids[row] = ("fresh", next(FRESH_IDS))
                hit = manager.add_sequence(seq_ids[row], new)
            else:
                manager.append_tokens(seq_ids[row], new)
                hit = 0
            batch.append((seq_ids[row], count - hit))
        rows = PagedRows(manager, seq_ids)
        results = [np.zeros((0, LAYERS, Q_HEADS, DIM))] * len(counts)
        if batch:
            step = manager.schedule(batch)
            out, cache = self._step(cache, paged_runtime(step))
            manager.commit_step(step)
            out = np.asarray(out)
            start = step.query_start_loc
            where = {seq_id: i for i, seq_id in enumerate(step.seq_ids)}
            for row, seq_id in enumerate(seq_ids):
                if seq_id in where:
                    i = where[seq_id]
                    results[row] = out[start[i] : start[i + 1]]
        return (cache, rows), results

    def reference(self, history, count):
        return _kv_reference(history, count)

    def lengths(self, state):
        manager = state[1].manager
        return [
            0 if seq_id is None else manager.get_sequence(seq_id).num_computed
            for seq_id in state[1].seq_ids
        ]

    def apply(self, state, operation, *args):
        cache, rows = state
        return getattr(cache, operation)(*args), getattr(rows, operation)(*args)

    def extract(self, state, slot):
        return state[0].extract(slot), state[1].extract(slot)

    def insert(self, state, other, slot):
        return state[0].insert(other[0], slot), state[1].insert(other[1], slot)

    def discard(self, state):
        state[1].reset_rows([0])


MIXERS = {
    "mamba": (
        mamba.MambaConfig(HIDDEN, 12, state_size=4, conv_kernel=3),
        mamba.init_mamba,
        mamba.mamba_forward,
        mamba.mamba_cached,
    ),
    "mamba2": (
        mamba2.Mamba2Config(HIDDEN, 2, 4, state_size=4, n_groups=1, block_size=4),
        mamba2.init_mamba2,
        mamba2.mamba2_forward,
        mamba2.mamba2_cached,
    ),
    "linear_attention": (
        linear.LinearAttentionConfig(
            HIDDEN, 2, 4, 4, "elu_plus_one", linear.lightning_decay(2), block_size=4
        ),
        linear.init_linear_attention,
        linear.linear_attention_forward,
        linear.linear_attention_cached,
    ),
}


class RecurrentFamily(BatchFamily):
    """One recurrent mixer layer with random weights, through its cache view."""

    truncates = False

    def __init__(self, name):
        self.name = name
        config, init, forward, cached = MIXERS[name]
        self.config = config
        self.params = jax.jit(init, static_argnums=1, compiler_options=FAST_COMPILE)(
            jax.random.PRNGKey(3), config
        )
        self.full = jax.jit(
            functools.partial(forward, self.params, config), compiler_options=FAST_COMPILE
        )
        self.cached = cached

    def init(self, batch):
        return RecurrentCache.init_cache(self.config.cache_metadata(batch))

    @functools.partial(jax.jit, static_argnums=(0, 4))
    def _write(self, cache, tokens, counts, side):
        runtime = RecurrentRuntimeMetadata.create(counts, side)
        out, view = self.cached(
            self.params, self.config, jnp.asarray(EMBED)[tokens], cache[0], runtime
        )
        return out, cache.replace_view(0, view)

    def reference(self, history, count):
        padded = np.zeros((1, CAPACITY), np.int32)
        padded[0, : len(history)] = history
        out = np.asarray(self.full(jnp.asarray(EMBED[padded])))[0]  # causal: padding comes last
        return out[len(history) - count : len(history)]

    def __hash__(self):
        return hash(self.name)


class HybridFamily(BatchFamily):
    """A tiny hybrid model: global and sliding attention, Mamba, Mamba2, linear attention and an
    MLP-only layer, through one ``HybridCache``."""

    truncates = False
    CONFIG = hybrid.HybridConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        layer_kinds=(
            "attention",
            "mamba2",
            "sliding_attention",
            "none",
            "mamba",
            "linear_attention",
        ),
        sliding_window=WINDOW,
        mamba=MIXERS["mamba"][0],
        mamba2=MIXERS["mamba2"][0],
        linear_attention=MIXERS["linear_attention"][0],
        attention_block_size=8,
    )

    def __init__(self):
        self.params = jax.jit(hybrid.init_hybrid, static_argnums=1, compiler_options=FAST_COMPILE)(
            jax.random.PRNGKey(5), self.CONFIG
        )
        self.full = jax.jit(
            functools.partial(hybrid.hybrid_forward, self.params, self.CONFIG),
            compiler_options=FAST_COMPILE,
        )

    def init(self, batch):
        return HybridCache.init_cache(self.CONFIG.cache_metadata(batch, CAPACITY))

    @functools.partial(jax.jit, static_argnums=(0, 4))
    def _write(self, cache, tokens, counts, side):
        runtime = HybridRuntimeMetadata.create(counts, side)
        return hybrid.hybrid_forward_cached(self.params, self.CONFIG, tokens, cache, runtime)

    def reference(self, history, count):
        padded = np.zeros((1, CAPACITY), np.int32)
        padded[0, : len(history)] = history
        out = np.asarray(self.full(jnp.asarray(padded)))[0]
        return out[len(history) - count : len(history)]

    def lengths(self, state):
        return np.asarray(state.lengths()).tolist()

    def __hash__(self):
        return 0


class HybridPagedFamily(HybridFamily):
    """The hybrid model on the paged backend: attention pages on the host (``PagedRows``), the
    recurrent state in one row per slot. A step always has ``max_num_seqs`` slots, so the
    operations that change the number of rows are refused."""

    fixed_rows = 3

    def init(self, batch):
        metadata = self.CONFIG.cache_metadata(
            self.fixed_rows, CAPACITY, attention_backend="paged", page_size=4
        )
        manager = PageManager(
            **metadata.paged_geometry(), enable_prefix_caching=False, token_buckets=(16,)
        )
        return HybridCache.init_cache(metadata), PagedRows(manager, [None] * self.fixed_rows)

    @functools.partial(jax.jit, static_argnums=0)
    def _paged_write(self, cache, runtime):
        tokens = runtime.batch_token_ids()
        return hybrid.hybrid_forward_cached(self.params, self.CONFIG, tokens, cache, runtime)

    def write(self, state, tokens, counts, side):
        cache, rows = state
        manager = rows.manager
        seq_ids = list(rows.seq_ids)
        width = tokens.shape[1]
        batch = []
        for row, count in enumerate(counts):
            if not count:
                continue
            start = 0 if side == "right" else width - count
            new = [int(t) for t in tokens[row, start : start + count]]
            if seq_ids[row] is None:
                seq_ids[row] = ("fresh", next(FRESH_IDS))
                manager.add_sequence(seq_ids[row], new)
            else:
                manager.append_tokens(seq_ids[row], new)
            batch.append((seq_ids[row], count))
        rows = PagedRows(manager, seq_ids)
        results = [np.zeros((0, VOCAB))] * len(counts)
        if batch:
            step = manager.schedule(batch)
            runtime = hybrid_paged_runtime(step, slots=rows.slots(), width=width, padding_side=side)
            logits, cache = self._paged_write(cache, runtime)
            manager.commit_step(step)
            logits = np.asarray(logits)
            for row, count in enumerate(counts):
                start = 0 if side == "right" else width - count
                results[row] = logits[row, start : start + count]
        return (cache, rows), results

    def lengths(self, state):
        return np.asarray(state[0].lengths()).tolist()

    def _cache(self, state):
        return state[0]

    def apply(self, state, operation, *args):
        cache, rows = state
        return getattr(cache, operation)(*args), getattr(rows, operation)(*args)

    def probe_copy(self, state):
        """A state whose host half is a deep copy: a probe's writes leave ``state`` as it was."""
        cache, rows = state
        return cache, PagedRows(copy.deepcopy(rows.manager), rows.seq_ids)

    def __hash__(self):
        return 1


@functools.cache
def _family(name):
    if name == "contiguous":
        return KVFamily()
    if name == "contiguous-int8":
        return KVFamily(kv_quantization="int8")
    if name == "ring":
        return KVFamily(window=WINDOW)
    if name == "paged":
        return PagedFamily()
    if name == "hybrid":
        return HybridFamily()
    if name == "hybrid-paged":
        return HybridPagedFamily()
    return RecurrentFamily(name)


# --------------------------------------------------------------------------------------------
# The program
# --------------------------------------------------------------------------------------------


class Program:
    """Runs one random program on a family, checking it against the token histories."""

    def __init__(self, family, data, atol):
        self.family = family
        self.data = data
        self.atol = atol
        fixed = getattr(family, "fixed_rows", None)
        batch = fixed or data.draw(st.integers(1, MAX_ROWS), label="batch")
        self.state = family.init(batch)
        self.histories = [[] for _ in range(batch)]

    def draw_write(self, histories):
        draw = self.data.draw
        width = draw(st.sampled_from(WIDTHS), label="width")
        room = [min(width, CAPACITY - 1 - len(h)) for h in histories]
        counts = [draw(st.integers(0, r), label="count") for r in room]
        side = draw(st.sampled_from(("right", "left")), label="side")
        tokens = np.asarray(
            draw(
                st.lists(
                    st.lists(st.integers(0, VOCAB - 1), min_size=width, max_size=width),
                    min_size=len(histories),
                    max_size=len(histories),
                ),
                label="tokens",
            ),
            np.int32,
        ).reshape(len(histories), width)
        return tokens, counts, side

    def write(self, state, histories, tokens, counts, side):
        """Write and check the outputs of every row's new tokens; returns the new state and
        histories."""
        state, outputs = self.family.write(state, tokens, counts, side)
        width = tokens.shape[1]
        new_histories = []
        for row, (history, count) in enumerate(zip(histories, counts, strict=True)):
            start = 0 if side == "right" else width - count
            history = history + tokens[row, start : start + count].tolist()
            computed = len(outputs[row])
            if computed:
                np.testing.assert_allclose(
                    outputs[row],
                    self.family.reference(history, computed),
                    atol=self.atol,
                    err_msg=f"row {row} after history of {len(history)} tokens",
                )
            new_histories.append(history)
        return state, new_histories

    def probe(self):
        """One token into every row of a copy: outputs against the whole history."""
        tokens = np.asarray(
            self.data.draw(
                st.lists(
                    st.integers(0, VOCAB - 1),
                    min_size=len(self.histories),
                    max_size=len(self.histories),
                ),
                label="probe",
            ),
            np.int32,
        )[:, None]
        if hasattr(self.family, "probe_copy"):
            copied = self.family.probe_copy(self.state)
            self.write(copied, self.histories, tokens, [1] * len(tokens), "right")
        elif isinstance(self.family, PagedFamily):
            # The host half mutates the manager: probe the real state, then roll it back.
            lengths = [len(h) for h in self.histories]
            state, _ = self.write(self.state, self.histories, tokens, [1] * len(tokens), "right")
            cache, rows = state
            rows = rows.truncate(lengths)
            self.state = (cache, rows.reset_rows([r for r, n in enumerate(lengths) if n == 0]))
        else:
            self.write(self.state, self.histories, tokens, [1] * len(tokens), "right")
        assert self.family.lengths(self.state) == [len(h) for h in self.histories]

    def step(self):
        draw = self.data.draw
        batch = len(self.histories)
        operations = ["write", "write", "reset_rows", "truncate", "select", "reorder", "extract"]
        operations += ["insert"] + (["repeat"] if 2 * batch <= MAX_ROWS else [])
        operation = draw(st.sampled_from(operations), label="operation")
        rows = st.integers(0, batch - 1)
        if getattr(self.family, "fixed_rows", None) and operation in RESIZING:
            cache = self.family._cache(self.state)
            with pytest.raises(UnsupportedOperationError, match="number of rows cannot change"):
                getattr(cache, operation)(*RESIZING[operation])
            return
        if operation == "write":
            tokens, counts, side = self.draw_write(self.histories)
            self.state, self.histories = self.write(
                self.state, self.histories, tokens, counts, side
            )
        elif operation == "reset_rows":
            chosen = draw(st.lists(rows, unique=True, max_size=batch), label="rows")
            self.state = self.family.apply(self.state, "reset_rows", chosen)
            self.histories = [[] if r in chosen else h for r, h in enumerate(self.histories)]
        elif operation == "truncate":
            lengths = [draw(st.integers(0, len(h)), label="length") for h in self.histories]
            if not self.family.truncates:
                before = jax.tree_util.tree_leaves(self.family._cache(self.state))
                with pytest.raises(UnsupportedOperationError, match="truncate is not supported"):
                    self.family.apply(self.state, "truncate", np.asarray(lengths, np.int32))
                after = jax.tree_util.tree_leaves(self.family._cache(self.state))
                assert all(a is b for a, b in zip(before, after, strict=True))
                return
            self.state = self.family.apply(self.state, "truncate", np.asarray(lengths, np.int32))
            self.histories = [h[:n] for h, n in zip(self.histories, lengths, strict=True)]
        elif operation == "select":
            chosen = draw(st.lists(rows, unique=True, min_size=1, max_size=batch), label="rows")
            self.state = self.family.apply(self.state, "select", chosen)
            self.histories = [self.histories[r] for r in chosen]
        elif operation == "reorder":
            indices = draw(st.lists(rows, min_size=batch, max_size=batch), label="indices")
            self.state = self.family.apply(self.state, "reorder", np.asarray(indices, np.int32))
            self.histories = [list(self.histories[i]) for i in indices]
        elif operation == "repeat":
            self.state = self.family.apply(self.state, "repeat", 2)
            self.histories = [list(h) for h in self.histories for _ in range(2)]
        elif operation in ("extract", "insert"):
            source = draw(rows, label="source")
            one = self.family.extract(self.state, source)
            history = [list(self.histories[source])]
            if draw(st.booleans(), label="write into the extracted row"):
                tokens, counts, side = self.draw_write(history)
                one, history = self.write(one, history, tokens, counts, side)
            if operation == "insert":
                slot = draw(rows, label="slot")
                self.state = self.family.insert(self.state, one, slot)
                self.histories[slot] = history[0]
            else:
                self.family.discard(one)
        self.probe()

    def run(self):
        self.probe()
        for _ in range(self.data.draw(st.integers(1, 7), label="steps")):
            self.step()


RESIZING = {"select": ([0],), "repeat": (2,), "extract": (0,), "insert": (None, 0)}
"""What a fixed number of rows refuses (with arguments that would otherwise be valid)."""

FAMILIES = [
    "contiguous",
    "contiguous-int8",
    "ring",
    "paged",
    "mamba",
    "mamba2",
    "linear_attention",
    "hybrid",
    "hybrid-paged",
]
PROGRAM_SETTINGS = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("name", FAMILIES)
@PROGRAM_SETTINGS
@given(data=st.data())
def test_random_programs_match_the_token_histories(name, data):
    family = _family(name)
    # int8 keys/values are rounded; the reference reads exact ones.
    atol = 0.1 if name == "contiguous-int8" else ATOL
    Program(family, data, atol).run()


# --------------------------------------------------------------------------------------------
# Under jit, and errors that name the family
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["contiguous", "ring", "mamba2", "hybrid"])
def test_row_operations_run_under_jit_with_traced_rows(name):
    family = _family(name)
    cache = family.init(3)
    tokens = jnp.asarray(np.arange(9).reshape(3, 3) % VOCAB, jnp.int32)
    _, cache = family._write(cache, tokens, jnp.asarray([3, 2, 1], jnp.int32), "right")
    one = cache.extract(1)
    eager = [
        cache.reset_rows([2]),
        cache.reorder(np.asarray([2, 0, 0], np.int32)),
        cache.insert(one, 0),
        cache.extract(2),
    ]
    traced = jax.jit(
        lambda c, o, rows, idx, slot: (
            c.reset_rows(rows),
            c.reorder(idx),
            c.insert(o, slot),
            c.extract(slot + 2),
        )
    )(cache, one, jnp.asarray([2]), jnp.asarray([2, 0, 0]), jnp.asarray(0))
    for a, b in zip(eager, traced, strict=True):
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # Out-of-range ids under jit touch no row (JAX would wrap -1 onto the last one).
    untouched = jax.jit(lambda c, o, s: (c.reset_rows(s), c.insert(o, s[0])))(
        cache, one, jnp.asarray([-1])
    )
    for result in untouched:
        for x, y in zip(
            jax.tree_util.tree_leaves(result), jax.tree_util.tree_leaves(cache), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_unsupported_operations_name_the_family_and_the_reason():
    ring = _family("ring").init(2)
    with pytest.raises(UnsupportedOperationError) as info:
        ring.truncate(np.asarray([0, 0], np.int32))
    assert info.value.family == "sliding-window ring" and info.value.operation == "truncate"
    assert "overwritten" in info.value.reason
    mamba_cache = _family("mamba").init(2)
    with pytest.raises(UnsupportedOperationError, match="Mamba cache: a row keeps one"):
        mamba_cache.truncate(np.asarray([0, 0], np.int32))
    assert isinstance(info.value, NotImplementedError)
    hybrid_cache = _family("hybrid").init(2)
    with pytest.raises(
        UnsupportedOperationError, match="hybrid cache: its mamba, mamba2, linear_attention layers"
    ):
        hybrid_cache.truncate(np.asarray([1, 1], np.int32))
    paged_hybrid = HybridCache.init_cache(
        HybridFamily.CONFIG.cache_metadata(3, CAPACITY, attention_backend="paged", page_size=4)
    )
    for operation, args in (("select", ([0],)), ("repeat", (2,)), ("extract", (0,))):
        with pytest.raises(UnsupportedOperationError, match="number of rows cannot change"):
            getattr(paged_hybrid, operation)(*args)
    reordered = paged_hybrid.reorder(np.asarray([2, 2, 0], np.int32))
    assert reordered[1].ssm_state.shape[0] == 3 and reordered[0] is paged_hybrid[0]


def test_row_arguments_are_checked_eagerly():
    cache = _family("contiguous").init(3)
    cases = [
        (lambda: cache.select([0, 0]), ValueError, "rows must be distinct row ids"),
        (lambda: cache.select([3]), ValueError, r"rows must lie in \[0, 3\)"),
        (lambda: cache.select([]), ValueError, "must name at least one row"),
        (lambda: cache.reorder([0, 1]), ValueError, r"indices must have shape \(3,\)"),
        (lambda: cache.reorder([0, 1, 5]), ValueError, r"indices must lie in \[0, 3\)"),
        (lambda: cache.repeat(0), ValueError, "n must be >= 1, got 0"),
        (lambda: cache.repeat(True), TypeError, "n must be an int"),
        (lambda: cache.extract(3), ValueError, r"slot must lie in \[0, 3\), got 3"),
        (lambda: cache.extract(True), TypeError, "slot must be an int row id"),
        (lambda: cache.insert(cache, 0), TypeError, "other must be a one-row"),
        (lambda: cache.reset_rows([-1]), ValueError, r"row ids must lie in \[0, 3\)"),
        (lambda: cache.truncate(np.asarray([1, 0, 0])), ValueError, "lengths must lie in"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
    with pytest.raises(TypeError, match="select.*must be concrete"):
        jax.jit(lambda c, r: c.select(r))(cache, jnp.asarray([0]))


def test_select_repeat_and_extract_keep_every_view_consistent():
    cache = _family("hybrid").init(2)
    for changed, rows in ((cache.select([1]), 1), (cache.repeat(2), 4), (cache.extract(0), 1)):
        assert changed.metadata.batch_size == rows
        for view in changed:
            if view is not None:
                assert view.metadata.batch_size == rows
                assert all(leaf.shape[0] == rows for leaf in jax.tree_util.tree_leaves(view))
        assert dataclasses.replace(changed.metadata) == changed.metadata
