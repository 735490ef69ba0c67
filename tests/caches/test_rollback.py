"""Rollback (``truncate`` / ``rollback``) of every cache family, as one property per family:
random programs of ragged appends and rollbacks against a reference that recomputes from the
kept tokens only (a fresh cache fed them), plus the refusals (past ``rollback_depth``, a ring or
recurrent state without it, out-of-range lengths, a hybrid stack all or none).

Every write pads to ``WIDTH`` tokens per row (the runtimes' per-row counts say how many are
real), so each family compiles one append and one rollback whatever the program.
"""

from __future__ import annotations

import functools

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
    RecurrentRuntimeMetadata,
    TransformerCache,
    TransformerCacheMetadata,
    TransformerRuntimeMetadata,
)
from jaxkv.engine.step_inputs import hybrid_paged_runtime, paged_runtime
from jaxkv.errors import CacheOverflowError, UnsupportedOperationError
from jaxkv.io import CacheFingerprint, hash_text, load_cache, save_cache
from jaxkv.models import hybrid, mamba, mamba2
from jaxkv.models import linear_attention as linear
from jaxkv.models.gemma3 import Gemma3Config
from jaxkv.ops import attention
from jaxkv.ops.reference import naive_attention
from jaxkv.pages import PagedRows, PageManager

BATCH, WIDTH, DEPTH = 2, 4, 3
VOCAB, HIDDEN, HEADS, DIM = 32, 8, 2, 4
WINDOW, CAPACITY = 3, 48
ATOL = 1e-5
FAST_COMPILE = {"xla_backend_optimization_level": 0}
PROPERTY = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

EMBED = np.random.default_rng(0).standard_normal((VOCAB, HIDDEN)).astype(np.float32)
KV_TABLES = {
    name: np.random.default_rng(index + 1).standard_normal((VOCAB, HEADS, DIM)).astype(np.float32)
    for index, name in enumerate(("q", "k", "v"))
}


def _pad(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-row token ids -> ``[BATCH, WIDTH]`` ids (right padded with 0) and the counts."""
    ids = np.zeros((BATCH, WIDTH), np.int32)
    for row, tokens in enumerate(rows):
        ids[row, : len(tokens)] = tokens
    return ids, np.asarray([len(tokens) for tokens in rows], np.int32)


# --------------------------------------------------------------------------------------------
# Families: how to append and how to compare, for caches with rows on the device
# --------------------------------------------------------------------------------------------


class Family:
    """A family under test: ``init()`` an empty cache, ``append(cache, ids, counts) -> (out,
    cache)`` (jitted, ``out: [BATCH, WIDTH, ...]``), and a reference cache fed the same way."""

    depth = DEPTH

    def init(self):
        raise NotImplementedError

    def init_reference(self):
        return self.init()

    def append(self, cache, ids, counts):
        raise NotImplementedError

    def append_reference(self, cache, ids, counts):
        return self.append(cache, ids, counts)

    def states(self, cache) -> list[np.ndarray]:
        """Arrays that must equal the reference's after a rollback (none by default)."""
        return []


class RingFamily(Family):
    """Keys/values/queries from token tables (no positions: the ring must still mask by
    position). The reference is a ring without ``rollback_depth``."""

    def __init__(self, window: int | None = WINDOW, depth: int = DEPTH):
        self.depth = depth
        self.metadata = TransformerCacheMetadata.create(
            BATCH, CAPACITY, 1, HEADS, DIM, sliding_window=window, rollback_depth=depth
        )
        self.reference_metadata = self.metadata.replace(rollback_depth=0)
        self._append = jax.jit(self._step, static_argnames="side", compiler_options=FAST_COMPILE)

    @staticmethod
    def _step(cache, ids, counts, side="right"):
        q, k, v = (jnp.asarray(KV_TABLES[name])[ids] for name in ("q", "k", "v"))
        runtime = TransformerRuntimeMetadata.create(counts, side)
        kv, view = cache[0].concatenate_to_cache(k, v, runtime)
        return attention(q, kv, block_size=4), cache.replace_view(0, view)

    def init(self):
        return TransformerCache.init_cache(self.metadata)

    def init_reference(self):
        return TransformerCache.init_cache(self.reference_metadata)

    def append(self, cache, ids, counts, side="right"):
        return self._append(cache, ids, counts, side=side)


class StateFamily(Family):
    """A recurrent mixer (Mamba, Mamba2, linear attention) through one cache view."""

    def __init__(self, name: str):
        if name == "mamba":
            config = mamba.MambaConfig(hidden_size=HIDDEN, d_inner=8, state_size=4, conv_kernel=3)
            init, cached = mamba.init_mamba, mamba.mamba_cached
        elif name == "mamba2":
            config = mamba2.Mamba2Config(
                hidden_size=HIDDEN, num_heads=2, head_dim=4, state_size=4, conv_kernel=3
            )
            init, cached = mamba2.init_mamba2, mamba2.mamba2_cached
        else:
            config = linear.LinearAttentionConfig(
                hidden_size=HIDDEN,
                num_heads=2,
                key_dim=4,
                value_dim=4,
                feature_map="elu_plus_one",
                decay=linear.lightning_decay(2),
            )
            init, cached = linear.init_linear_attention, linear.linear_attention_cached
        self.name = name
        self.metadata = config.cache_metadata(BATCH, rollback_depth=DEPTH)
        params = init(jax.random.PRNGKey(3), config)

        def step(view, ids, counts, side="right"):
            hidden = jnp.asarray(EMBED)[ids]
            runtime = RecurrentRuntimeMetadata.create(counts, side)
            return cached(params, config, hidden, view, runtime)

        self._append = jax.jit(step, static_argnames="side", compiler_options=FAST_COMPILE)

    def init(self):
        return self.metadata.view_type.init(self.metadata, 0)

    def append(self, cache, ids, counts, side="right"):
        return self._append(cache, ids, counts, side=side)

    def states(self, cache):
        fields = ["lengths", "state" if self.name == "linear_attention" else "ssm_state"]
        if self.name != "linear_attention":
            fields.append("conv_state")
        return [np.asarray(getattr(cache, field)) for field in fields]


class HybridFamily(Family):
    """A tiny stack of every layer kind through one ``HybridCache``; outputs are logits."""

    CONFIG = hybrid.HybridConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
        mlp_size=16,
        layer_kinds=("attention", "mamba", "sliding_attention", "mamba2", "linear_attention"),
        sliding_window=WINDOW,
        mamba=mamba.MambaConfig(hidden_size=HIDDEN, d_inner=8, state_size=4, conv_kernel=3),
        mamba2=mamba2.Mamba2Config(
            hidden_size=HIDDEN, num_heads=2, head_dim=4, state_size=4, conv_kernel=3
        ),
        linear_attention=linear.LinearAttentionConfig(
            hidden_size=HIDDEN, num_heads=2, key_dim=4, value_dim=4
        ),
        attention_block_size=4,
    )

    def __init__(self):
        self.metadata = self.CONFIG.cache_metadata(BATCH, CAPACITY, rollback_depth=DEPTH)
        params = jax.jit(hybrid.init_hybrid, static_argnums=1, compiler_options=FAST_COMPILE)(
            jax.random.PRNGKey(5), self.CONFIG
        )

        def step(cache, ids, counts):
            runtime = HybridRuntimeMetadata.create(counts)
            return hybrid.hybrid_forward_cached(params, self.CONFIG, ids, cache, runtime)

        self._append = jax.jit(step, compiler_options=FAST_COMPILE)

    def init(self):
        return HybridCache.init_cache(self.metadata)

    def append(self, cache, ids, counts):
        return self._append(cache, ids, counts)


@functools.cache
def _family(name: str) -> Family:
    if name == "contiguous":
        return RingFamily(window=None, depth=0)
    if name == "ring":
        return RingFamily()
    if name == "hybrid":
        return HybridFamily()
    return StateFamily(name)


def _replay(family: Family, kept: list[list[int]]):
    """A fresh reference cache fed ``kept`` tokens per row, ``WIDTH`` at a time."""
    cache = family.init_reference()
    for start in range(0, max(map(len, kept)), WIDTH):
        ids, counts = _pad([tokens[start : start + WIDTH] for tokens in kept])
        _, cache = family.append_reference(cache, ids, counts)
    return cache


def _assert_outputs_close(got, want, counts):
    for row, count in enumerate(counts):
        np.testing.assert_allclose(
            np.asarray(got)[row, :count], np.asarray(want)[row, :count], atol=ATOL, rtol=ATOL
        )


PROBE = [[5, 6, 7], [8]]

appends = st.tuples(
    st.just("append"),
    st.lists(st.lists(st.integers(1, VOCAB - 1), max_size=WIDTH), min_size=BATCH, max_size=BATCH),
)
rollbacks = st.tuples(
    st.sampled_from(["rollback", "rollback_jit"]),
    st.lists(st.integers(0, DEPTH), min_size=BATCH, max_size=BATCH),
)
programs = st.lists(st.one_of(appends, rollbacks), min_size=2, max_size=8)


def _run_program(family: Family, program, jit_rollback) -> None:
    """Apply ``program`` to a cache and check it against the reference after every step."""
    cache = family.init()
    kept: list[list[int]] = [[] for _ in range(BATCH)]
    floors = [0] * BATCH
    for kind, rows in program:
        if kind == "append":
            if max(len(kept[b]) + len(rows[b]) for b in range(BATCH)) > CAPACITY:
                continue
            _, cache = family.append(cache, *_pad(rows))
            for row, tokens in enumerate(rows):
                kept[row] += tokens
                if family.depth:
                    floors[row] = max(floors[row], len(kept[row]) - family.depth)
        else:
            limit = [len(kept[b]) - (floors[b] if family.depth else 0) for b in range(BATCH)]
            counts = np.minimum(rows, limit).astype(np.int32)
            cache = (
                jit_rollback(cache, counts) if kind == "rollback_jit" else cache.rollback(counts)
            )
            kept = [tokens[: len(tokens) - int(n)] for tokens, n in zip(kept, counts, strict=True)]
            assert not np.asarray(cache.overflow_rows()).any()
        reference = _replay(family, kept)
        for got, want in zip(family.states(cache), family.states(reference), strict=True):
            np.testing.assert_allclose(got, want, atol=ATOL, rtol=ATOL)
        ids, counts = _pad(PROBE)
        got, _ = family.append(cache, ids, counts)
        want, _ = family.append_reference(reference, ids, counts)
        _assert_outputs_close(got, want, counts)


@functools.cache
def _jit_rollback():
    return jax.jit(lambda cache, counts: cache.rollback(counts))


@pytest.mark.parametrize(
    "name", ["contiguous", "ring", "mamba", "mamba2", "linear_attention", "hybrid"]
)
@PROPERTY
@given(program=programs)
def test_rollback_equals_recomputing_from_the_kept_tokens(name, program):
    _run_program(_family(name), program, _jit_rollback())


# --------------------------------------------------------------------------------------------
# Paged: PageManager bookkeeping, pages back to the pool, prefix cache consistent
# --------------------------------------------------------------------------------------------

PAGE_SIZE, PAGED_TOKENS, NUM_PAGES = 2, 8, 40


class PagedEngine:
    """A ``PageManager`` (prefix caching on) and a one-layer paged cache run in lock step."""

    def __init__(self):
        self.manager = PageManager(
            NUM_PAGES,
            PAGE_SIZE,
            BATCH,
            CAPACITY // PAGE_SIZE,
            enable_prefix_caching=True,
            hash_key=b"rollback",
            token_buckets=(PAGED_TOKENS,),
        )
        metadata = PagedCacheMetadata.create(
            1, NUM_PAGES, PAGE_SIZE, HEADS, DIM, BATCH, CAPACITY // PAGE_SIZE
        )
        self.cache = PagedCache.init_cache(metadata)
        self.step_fn = _paged_step()

    def run(self, batch):
        """Schedule, run and commit one step; check each row's outputs against dense attention
        over the sequence's known tokens."""
        step = self.manager.schedule(batch)
        outputs, self.cache = self.step_fn(self.cache, paged_runtime(step))
        self.manager.commit_step(step)
        start = np.asarray(step.query_start_loc)
        for row, seq_id in enumerate(step.seq_ids):
            end = int(step.context_lens[row])
            tokens = np.asarray(self.manager.get_sequence(seq_id).token_ids[:end])
            count = int(start[row + 1] - start[row])
            q, k, v = (KV_TABLES[name][tokens][None] for name in ("q", "k", "v"))
            positions = np.arange(end)[None]
            want = naive_attention(
                q[:, end - count :], k, v, positions[:, end - count :], positions
            )
            np.testing.assert_allclose(
                np.asarray(outputs)[start[row] : start[row + 1]], want[0], atol=ATOL
            )


@functools.cache
def _paged_step():
    def step(cache, runtime):
        cache = cache.copy_pages(runtime.copy_ops)
        q, k, v = (jnp.asarray(KV_TABLES[name])[runtime.token_ids] for name in ("q", "k", "v"))
        kv, view = cache[0].concatenate_to_cache(k, v, runtime)
        return attention(q, kv), cache.replace_view(0, view)

    return jax.jit(step, compiler_options=FAST_COMPILE)


@PROPERTY
@given(
    prompt=st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=PAGED_TOKENS // 2),
    program=st.lists(st.one_of(appends, rollbacks), max_size=6),
)
def test_paged_rollback_frees_pages_and_keeps_the_prefix_cache_right(prompt, program):
    engine = PagedEngine()
    manager = engine.manager
    # Row 0 computes the prompt first; row 1 then starts from its cached full pages.
    manager.add_sequence("a", prompt)
    engine.run([("a", len(prompt))])
    hit = manager.add_sequence("b", prompt)
    assert hit % PAGE_SIZE == 0 and hit <= len(prompt)
    if len(prompt) > hit:
        engine.run([("b", len(prompt) - hit)])
    rows = PagedRows(manager, ["a", "b"])
    for kind, values in program:
        if kind == "append":
            batch = []
            for seq_id, tokens in zip(("a", "b"), values, strict=True):
                if tokens:
                    manager.append_tokens(seq_id, tokens)
                    batch.append((seq_id, len(tokens)))
            if batch:
                engine.run(batch)
        else:
            known = [len(manager.get_sequence(s).token_ids) for s in ("a", "b")]
            counts = np.minimum(values, known).tolist()
            used = manager.num_used_pages
            rows = rows.rollback(counts)
            engine.cache = engine.cache.rollback(np.asarray(counts, np.int32))
            for seq_id, length in zip(("a", "b"), np.subtract(known, counts), strict=True):
                info = manager.get_sequence(seq_id)
                assert len(info.token_ids) == info.num_computed == length
                assert len(info.page_ids) == -(-length // PAGE_SIZE)
            assert manager.num_used_pages <= used
        manager.check_invariants()
    # A new sequence with row 0's tokens reuses its cached pages and reads the right keys.
    tokens = list(manager.get_sequence("a").token_ids) + [1]
    rows = rows.reset_rows([1])
    hit = manager.add_sequence("c", tokens)
    if len(tokens) > hit:
        engine.run([("c", len(tokens) - hit)])
    manager.check_invariants()
    rows.reset_rows([0])
    manager.free("c")
    manager.check_invariants()
    assert manager.num_free_pages + manager.num_evictable_pages == NUM_PAGES


def test_paged_rollback_returns_emptied_pages_to_the_pool():
    manager = PageManager(8, 2, 1, 4, enable_prefix_caching=False, token_buckets=(8,))
    manager.add_sequence("a", [1, 2, 3, 4, 5])
    step = manager.schedule([("a", 5)])
    manager.commit_step(step)
    assert manager.num_free_pages == 5
    rows = PagedRows(manager, ["a"]).rollback(3)
    assert manager.get_sequence("a").token_ids == (1, 2)
    assert manager.num_free_pages == 7 and len(manager.get_sequence("a").page_ids) == 1
    with pytest.raises(ValueError, match=r"n\[0\]=3 is out of range"):
        rows.rollback(3)
    with pytest.raises(TypeError, match=r"n\[0\] must be an int"):
        rows.rollback([1.5])


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


def _filled(name: str, tokens_per_row=(7, 5)):
    """A cache of family ``name`` after writing ``tokens_per_row`` tokens (two writes)."""
    family = _family(name)
    cache = family.init()
    rows = [list(range(1, 1 + n)) for n in tokens_per_row]
    for start in range(0, max(tokens_per_row), WIDTH):
        _, cache = family.append(cache, *_pad([r[start : start + WIDTH] for r in rows]))
    return cache


def _lengths(cache) -> np.ndarray:
    if isinstance(cache, HybridCache):
        return np.asarray(cache.lengths())
    if isinstance(cache, TransformerCache):
        return np.asarray(cache[0].lengths)
    return np.asarray(cache.lengths)


@pytest.mark.parametrize("name", ["ring", "mamba", "mamba2", "linear_attention", "hybrid"])
def test_past_the_depth_is_refused_eagerly_and_flagged_under_jit(name):
    cache = _filled(name)  # lengths [7, 5]; each row can go back DEPTH tokens
    with pytest.raises(ValueError, match=r"rollback_depth=3.*row 0: \[4, 7\]"):
        cache.rollback(np.asarray([4, 0], np.int32))
    with pytest.raises(ValueError, match="lengths must lie in"):
        cache.truncate(np.asarray([7, 6], np.int32))  # longer than the row
    with pytest.raises(ValueError, match="n must be >= 0"):
        cache.rollback(-1)
    rolled = _jit_rollback()(cache, np.asarray([4, 2], np.int32))
    np.testing.assert_array_equal(_lengths(rolled), [7, 3])
    np.testing.assert_array_equal(np.asarray(rolled.overflow_rows()), [True, False])
    with pytest.raises(CacheOverflowError, match=r"rows \[0\] were asked to truncate past"):
        rolled.check_overflow()
    # The refused row is untouched: it matches the cache before the rollback everywhere.
    kept = _family(name).append(rolled, *_pad(PROBE))[0]
    before = _family(name).append(cache, *_pad(PROBE))[0]
    np.testing.assert_allclose(np.asarray(kept)[0], np.asarray(before)[0], atol=1e-6)
    # Going back twice: the floor does not move down past overwritten checkpoints.
    once = cache.rollback(np.asarray([3, 0], np.int32))
    with pytest.raises(ValueError, match=r"row 0: \[4, 4\]"):
        once.rollback(np.asarray([1, 0], np.int32))


@pytest.mark.parametrize("name", ["mamba", "mamba2", "linear_attention"])
def test_recurrent_state_without_depth_refuses_and_points_at_rollback_depth(name):
    metadata = _family(name).metadata.replace(rollback_depth=0)
    view = metadata.view_type.init(metadata, 0)
    assert view.state_checkpoints is None and view.rollback_floor is None
    with pytest.raises(UnsupportedOperationError, match="rollback_depth=D") as info:
        view.rollback(1)
    assert info.value.operation == "truncate"
    assert metadata.bytes_total() < _family(name).metadata.bytes_total()


def test_ring_without_depth_refuses_and_points_at_rollback_depth():
    metadata = TransformerCacheMetadata.create(2, 16, 1, 1, 4, sliding_window=4)
    cache = TransformerCache.init_cache(metadata)
    assert cache[0].rollback_floor is None and cache[0].rollback_refused is None
    with pytest.raises(UnsupportedOperationError, match="rollback_depth=D"):
        cache.rollback(0)
    hybrid_cache = HybridCache.init_cache(HybridFamily.CONFIG.cache_metadata(2, CAPACITY))
    with pytest.raises(
        UnsupportedOperationError,
        match="its mamba, mamba2, linear_attention layers keep one state per row.*and its "
        "sliding_attention layers are rings.*rollback_depth=D",
    ):
        hybrid_cache.truncate(np.asarray([0, 0], np.int32))


def test_hybrid_rolls_back_every_layer_or_none():
    family = _family("hybrid")
    metadata = family.metadata.replace(mamba=family.metadata.mamba.replace(rollback_depth=1))
    cache = HybridCache.init_cache(metadata)
    _, cache = family.append(cache, *_pad([[1, 2, 3, 4], [5, 6, 7]]))
    # Row 0 asks for 2 tokens back: the ring and the other layers could, the Mamba layer not.
    with pytest.raises(ValueError, match=r"every layer truncates together or none"):
        cache.rollback(np.asarray([2, 1], np.int32))
    rolled = jax.jit(lambda c, n: c.rollback(n))(cache, np.asarray([2, 1], np.int32))
    for layer, (before, after) in enumerate(zip(cache.views, rolled.views, strict=True)):
        np.testing.assert_array_equal(np.asarray(after.lengths), [4, 2], err_msg=f"layer {layer}")
        for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
            if x.ndim and x.shape[0] == BATCH and x.dtype != jnp.bool_:
                np.testing.assert_array_equal(np.asarray(x)[0], np.asarray(y)[0])
    flags = [np.asarray(view.overflow_rows()) for view in rolled.views]
    assert [f.tolist() for f in flags] == [[False, False]] + [[True, False]] * 4
    with pytest.raises(CacheOverflowError, match=r"rows \[0\] were asked to truncate"):
        rolled.check_overflow()


# --------------------------------------------------------------------------------------------
# Metadata, sizes, serialisation and row operations with checkpoints
# --------------------------------------------------------------------------------------------


def test_rollback_depth_is_validated_serialised_and_counted():
    ring = TransformerCacheMetadata.create(2, 64, 3, 2, 8, sliding_window=16, rollback_depth=4)
    plain = ring.replace(rollback_depth=0)
    assert ring.num_slots == 20 and plain.num_slots == 16
    assert TransformerCacheMetadata.from_json(ring.to_json()) == ring
    legacy = plain.to_dict()
    del legacy["rollback_depth"]  # written before the field existed
    assert TransformerCacheMetadata.from_dict(legacy) == plain
    assert ring.bytes_per_token() == plain.bytes_per_token()
    assert (
        ring.bytes_per_sequence(100) - plain.bytes_per_sequence(100) == 4 * ring.bytes_per_token()
    )
    assert ring.bytes_per_sequence(10) == plain.bytes_per_sequence(10)
    extra = 2 * (4 * ring.bytes_per_token() + 3 * (4 * 4 + 5))  # slots, positions, floor, flag
    assert ring.bytes_total() - plain.bytes_total() == extra
    for bad, error in ((-1, ValueError), (True, TypeError), (1.5, TypeError)):
        with pytest.raises(error, match="rollback_depth"):
            ring.replace(rollback_depth=bad)
    with pytest.raises(ValueError, match="rollback_depth=2 needs a sliding_window"):
        TransformerCacheMetadata.create(2, 64, 1, 2, 8, rollback_depth=2)
    for name in ("mamba", "mamba2", "linear_attention"):
        metadata = _family(name).metadata
        none = metadata.replace(rollback_depth=0)
        assert type(metadata).from_json(metadata.to_json()) == metadata
        state = none.state_bytes_per_sequence()
        assert metadata.bytes_per_token() == 0
        assert metadata.bytes_per_sequence(5) == (1 + DEPTH) * state
        assert metadata.bytes_total() - none.bytes_total() == BATCH * (DEPTH * state + 5)
        with pytest.raises(ValueError, match="rollback_depth must be >= 0"):
            metadata.replace(rollback_depth=-1)
    for metadata, cache in (
        (ring, TransformerCache.init_cache(ring)),
        (_family("hybrid").metadata, _family("hybrid").init()),
    ):
        allocated = sum(leaf.nbytes for leaf in jax.tree.leaves(cache))
        assert allocated == metadata.bytes_total()


@pytest.mark.parametrize("name", ["ring", "mamba2"])
def test_row_operations_carry_the_checkpoints(name):
    cache = _filled(name)
    back = np.asarray([2, 1], np.int32)

    def same(x, y):
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    order = np.asarray([1, 0], np.int32)
    same(cache.reorder(order).rollback(back[order]), cache.rollback(back).reorder(order))
    same(cache.select([1]).rollback(1), cache.rollback(back).select([1]))
    same(cache.extract(0).rollback(2), cache.rollback(back).extract(0))
    same(cache.repeat(2).rollback(np.repeat(back, 2)), cache.rollback(back).repeat(2))
    moved = cache.reset_rows([1]).insert(cache.extract(0), 1)
    same(moved.rollback(2).extract(1), cache.rollback(back).extract(0))
    emptied = cache.reset_rows([0])
    with pytest.raises(ValueError, match=r"row 0: \[0, 0\]"):
        emptied.rollback(np.asarray([1, 0], np.int32))


def test_a_saved_row_keeps_its_checkpoints(tmp_path):
    cache = _filled("hybrid")  # every layer kind, rings and recurrent layers with rollback_depth
    tokens = list(range(1, 8))

    def fingerprint(of):
        return CacheFingerprint.create(of, tokens, model_sha256=hash_text("m"), tokenizer_id="t")

    path = tmp_path / "row.safetensors"
    save_cache(path, cache, tokens, fingerprint(cache), rows=0)
    target = HybridCache.init_cache(cache.metadata)
    loaded = load_cache(path, fingerprint(target), target, rows=1).cache
    got = loaded.rollback(np.asarray([0, 3], np.int32)).extract(1)
    want = cache.rollback(np.asarray([3, 0], np.int32)).extract(0)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", ["ring", "mamba2", "linear_attention"])
def test_left_padded_writes_roll_back_like_right_padded_ones(name):
    family = _family(name)
    rows = [[3, 1, 4, 1, 5, 9, 2], [6, 5, 3]]
    cache = family.init()
    for start, width in ((0, 3), (3, 4)):
        chunk = [tokens[start : start + width] for tokens in rows]
        ids = np.zeros((BATCH, WIDTH), np.int32)
        for row, tokens in enumerate(chunk):
            ids[row, WIDTH - len(tokens) :] = tokens  # left padding: real tokens last
        counts = np.asarray([len(tokens) for tokens in chunk], np.int32)
        _, cache = family.append(cache, ids, counts, side="left")
    back = np.asarray([3, 2], np.int32)
    cache = cache.rollback(back)
    kept = [tokens[: len(tokens) - int(n)] for tokens, n in zip(rows, back, strict=True)]
    reference = _replay(family, kept)
    for got, want in zip(family.states(cache), family.states(reference), strict=True):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=ATOL)
    ids, counts = _pad(PROBE)
    got, _ = family.append(cache, ids, counts)
    want, _ = family.append_reference(reference, ids, counts)
    _assert_outputs_close(got, want, counts)


def test_gemma3_rings_take_the_rollback_depth():
    config = Gemma3Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=16,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
        sliding_window=WINDOW,
        layer_kinds=("sliding_attention", "attention"),
    )
    metadata = config.cache_metadata(BATCH, CAPACITY, rollback_depth=DEPTH)
    assert metadata.sliding_attention.num_slots == WINDOW + DEPTH
    assert metadata.attention.rollback_depth == 0
    cache = HybridCache.init_cache(metadata).rollback(0)
    np.testing.assert_array_equal(np.asarray(cache.lengths()), [0, 0])
    paged = config.cache_metadata(BATCH, CAPACITY, attention_backend="paged", rollback_depth=2)
    assert paged.sliding_attention.sliding_window == WINDOW  # page pools need no spare slots
    with pytest.raises(ValueError, match="rollback_depth must be >= 0"):
        config.cache_metadata(BATCH, CAPACITY, rollback_depth=-1)


def test_paged_hybrid_stack_rolls_back_with_its_page_tables():
    """A speculative verifier on the paged backend: the page tables roll back on the host
    (``PagedRows.rollback``), the recurrent rows in the ``HybridCache``; the next step's logits
    equal the whole-sequence forward of the kept tokens."""
    config = hybrid.HybridConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
        mlp_size=16,
        layer_kinds=("attention", "mamba2", "sliding_attention", "linear_attention"),
        sliding_window=WINDOW,
        mamba2=HybridFamily.CONFIG.mamba2,
        linear_attention=HybridFamily.CONFIG.linear_attention,
        attention_block_size=4,
    )
    metadata = config.cache_metadata(
        BATCH, 16, attention_backend="paged", page_size=4, rollback_depth=DEPTH
    )
    params = jax.jit(hybrid.init_hybrid, static_argnums=1, compiler_options=FAST_COMPILE)(
        jax.random.PRNGKey(7), config
    )
    forward = jax.jit(
        functools.partial(hybrid.hybrid_forward_cached, params, config),
        compiler_options=FAST_COMPILE,
    )
    manager = PageManager(
        **metadata.paged_geometry(), enable_prefix_caching=False, token_buckets=(8,)
    )
    cache = HybridCache.init_cache(metadata)
    sequences = {0: [3, 1, 4, 1, 5], 1: [9, 2, 6]}
    for seq_id, prompt in sequences.items():
        manager.add_sequence(seq_id, prompt)
    rows = PagedRows(manager, [0, 1])

    def run(batch):
        step = manager.schedule(batch)
        runtime = hybrid_paged_runtime(step, slots={0: 0, 1: 1}, width=WIDTH)
        logits, new_cache = forward(runtime.batch_token_ids(), cache, runtime)
        manager.commit_step(step)
        return np.asarray(logits), new_cache

    _, cache = run([(0, 4), (1, 3)])
    _, cache = run([(0, 1)])
    drafts = {0: [7, 8, 9], 1: [10, 11, 12]}  # a verifier's three draft tokens per row
    for seq_id, tokens in drafts.items():
        manager.append_tokens(seq_id, tokens)
    _, cache = run([(0, 3), (1, 3)])
    rejected = [2, 3]
    rows = rows.rollback(rejected)
    cache = cache.rollback(np.asarray(rejected, np.int32))
    kept = {
        seq: sequences[seq] + drafts[seq][: 3 - n] for seq, n in zip((0, 1), rejected, strict=True)
    }
    np.testing.assert_array_equal(np.asarray(cache.lengths()), [6, 3])
    for seq_id in (0, 1):
        manager.append_tokens(seq_id, [13])
    logits, cache = run([(0, 1), (1, 1)])
    full = jax.jit(functools.partial(hybrid.hybrid_forward, params, config))
    for seq_id in (0, 1):
        want = np.asarray(full(jnp.asarray([kept[seq_id] + [13]])))[0, -1]
        np.testing.assert_allclose(logits[seq_id, 0], want, atol=ATOL, rtol=ATOL)
    manager.check_invariants()
