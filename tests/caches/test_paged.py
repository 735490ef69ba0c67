"""The paged cache driven by a real ``PageManager``, against dense reference attention.

A toy "model" makes each token's query, key and value from its token id and position (fixed random
tables per layer), so identical prefixes give identical keys, as in a real model; every step runs
``copy_pages -> concatenate_to_cache -> attention`` in one jitted, donated function and each
sequence's outputs are compared with ``naive_attention`` over that sequence's whole history.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.caches import (
    PagedCache,
    PagedCacheMetadata,
    PagedCacheView,
    PagedRuntimeMetadata,
)
from jaxkv.engine.step_inputs import paged_runtime
from jaxkv.ops import PagedKV, attention
from jaxkv.ops.reference import naive_attention
from jaxkv.pages import PageManager

ATOL = 1e-5
VOCAB, MAX_POS = 64, 40
LAYERS, KV_HEADS, Q_HEADS, DIM = 2, 2, 4, 8
PAGE_SIZE, MAX_SEQS, MAX_PAGES = 4, 4, 10
TOKENS = 16  # the single token bucket: every step has the same shapes


def _tables(seed=0):
    rng = np.random.default_rng(seed)
    make = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return {
        name: (make(LAYERS, VOCAB, heads, DIM), make(LAYERS, MAX_POS, heads, DIM))
        for name, heads in (("q", Q_HEADS), ("k", KV_HEADS), ("v", KV_HEADS))
    }


TABLES = _tables()


def _embed(name, layer, token_ids, positions):
    by_token, by_pos = TABLES[name]
    return by_token[layer][token_ids] + by_pos[layer][positions]


def _step(cache, runtime):
    """One device step: copies, then per layer write + attention. Returns [layers, T, Hq, D]."""
    cache = cache.copy_pages(runtime.copy_ops)
    positions = cache[0].query_positions(runtime, runtime.slot_mapping.shape[0])
    safe = jnp.maximum(positions, 0)
    outputs = []
    for layer, view in enumerate(cache):
        q, k, v = (
            jnp.asarray(TABLES[name][0][layer])[runtime.token_ids]
            + jnp.asarray(TABLES[name][1][layer])[safe]
            for name in ("q", "k", "v")
        )
        kv, view = view.concatenate_to_cache(k, v, runtime)
        outputs.append(attention(q, kv))
        cache = cache.replace_view(layer, view)
    return jnp.stack(outputs), cache


class Engine:
    """A PageManager and a paged cache run in lock step; checks every step against dense."""

    def __init__(self, *, window=None, prefix=True, num_pages=40, dtype=jnp.float32):
        self.window = window
        self.metadata = PagedCacheMetadata.create(
            LAYERS, num_pages, PAGE_SIZE, KV_HEADS, DIM, MAX_SEQS, MAX_PAGES, dtype=dtype,
            sliding_window=window,
        )  # fmt: skip
        self.manager = PageManager(
            num_pages,
            PAGE_SIZE,
            MAX_SEQS,
            MAX_PAGES,
            enable_prefix_caching=prefix,
            hash_key=b"test",
            token_buckets=(TOKENS,),
        )
        self.cache = PagedCache.init_cache(self.metadata)
        self.tokens: dict = {}
        self.traces = 0

        def counted(cache, runtime):
            self.traces += 1
            return _step(cache, runtime)

        self.step_fn = jax.jit(counted, donate_argnums=0)

    def add(self, seq_id, prompt):
        self.tokens[seq_id] = list(prompt)
        return self.manager.add_sequence(seq_id, prompt)

    def fork(self, parent, child):
        self.manager.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])

    def append(self, seq_id, token):
        self.tokens[seq_id].append(token)
        self.manager.append_tokens(seq_id, [token])

    def run(self, batch):
        """Schedule, run and commit one step; returns {seq_id: [new, layers, Hq, D]} outputs."""
        step = self.manager.schedule(batch)
        runtime = paged_runtime(step)
        outputs, self.cache = self.step_fn(self.cache, runtime)
        self.manager.commit_step(step)
        outputs = np.asarray(outputs)
        start = step.query_start_loc
        result = {}
        for row, seq_id in enumerate(step.seq_ids):
            got = outputs[:, start[row] : start[row + 1]].transpose(1, 0, 2, 3)
            end = int(step.context_lens[row])
            np.testing.assert_allclose(got, self.expected(seq_id, end, len(got)), atol=ATOL)
            result[seq_id] = got
        return result

    def expected(self, seq_id, end, count):
        """Dense attention of the sequence's positions ``end - count .. end - 1``."""
        tokens = np.asarray(self.tokens[seq_id][:end])
        positions = np.arange(end)
        out = []
        for layer in range(LAYERS):
            q, k, v = (_embed(name, layer, tokens, positions) for name in ("q", "k", "v"))
            out.append(
                naive_attention(
                    q[None, end - count :],
                    k[None],
                    v[None],
                    positions[None, end - count :],
                    positions[None],
                    sliding_window=self.window,
                )[0]
            )
        return np.stack(out, axis=1)


def _prompt(rng, length):
    return rng.integers(1, VOCAB, size=length).tolist()


@pytest.mark.parametrize("window", [None, 6])
def test_ragged_steps_with_page_manager_match_dense(window):
    rng = np.random.default_rng(0)
    engine = Engine(window=window)
    # Scatter pages: occupy the pool with throw-away sequences, then free them in random order.
    for i in range(MAX_SEQS):
        engine.add(("warm", i), _prompt(rng, 4))
    engine.run([(("warm", i), 4) for i in range(MAX_SEQS)])
    for i in rng.permutation(MAX_SEQS):
        engine.manager.free(("warm", int(i)))

    engine.add("a", _prompt(rng, 11))
    engine.add("b", _prompt(rng, 3))
    engine.add("c", _prompt(rng, 17))
    engine.run([("a", 5), ("b", 3), ("c", 8)])  # prefill chunks
    engine.append("b", 7)
    engine.run([("a", 6), ("b", 1), ("c", 4)])  # chunks and a decode
    for seq in ("a", "b"):
        engine.append(seq, int(rng.integers(1, VOCAB)))
    engine.run([("b", 1), ("c", 5), ("a", 1)])  # the last chunk of c between two decodes
    for _ in range(3):
        for seq in ("a", "b", "c"):
            engine.append(seq, int(rng.integers(1, VOCAB)))
        engine.run([("c", 1), ("a", 1), ("b", 1)])
    # Fixed token buckets: one compilation per bound on new tokens per row (4, 8 and 1 here).
    assert engine.traces == 3


def test_fork_copy_on_write_gives_each_branch_its_own_continuation():
    rng = np.random.default_rng(1)
    engine = Engine()
    engine.add("parent", _prompt(rng, 6))  # 6 tokens: the second page is shared half-full
    engine.run([("parent", 6)])
    engine.fork("parent", "child")
    engine.append("parent", 11)
    engine.append("child", 12)
    step = engine.manager.schedule([("parent", 1), ("child", 1)])
    assert step.num_copies == 1  # the first writer gets a private copy of the shared page
    runtime = paged_runtime(step)
    outputs, engine.cache = engine.step_fn(engine.cache, runtime)
    engine.manager.commit_step(step)
    for row, seq in enumerate(step.seq_ids):
        got = np.asarray(outputs)[:, row][None]  # [1 new token, layers, Hq, D]
        np.testing.assert_allclose(got, engine.expected(seq, 7, 1), atol=ATOL)
    parent_out = engine.expected("parent", 7, 1)
    child_out = engine.expected("child", 7, 1)
    assert not np.allclose(parent_out, child_out)
    # Both branches keep decoding on their own pages.
    for _ in range(3):
        engine.append("parent", int(rng.integers(1, VOCAB)))
        engine.append("child", int(rng.integers(1, VOCAB)))
        engine.run([("child", 1), ("parent", 1)])
    parent_pages = engine.manager.get_sequence("parent").page_ids
    child_pages = engine.manager.get_sequence("child").page_ids
    assert parent_pages[0] == child_pages[0] and parent_pages[1] != child_pages[1]


def test_prefix_reuse_matches_recomputation_with_fewer_pages():
    rng = np.random.default_rng(2)
    shared = _prompt(rng, 12)
    second = shared + _prompt(rng, 3)
    outputs, pages = {}, {}
    for prefix in (True, False):
        engine = Engine(prefix=prefix)
        engine.add("first", shared + [5])
        engine.run([("first", 13)])
        hit = engine.add("second", second)
        assert hit == (12 if prefix else 0)
        before = engine.manager.num_used_pages
        out = engine.run([("second", len(second) - hit)])["second"]
        outputs[prefix] = out[-3:]  # the tokens after the shared prefix
        pages[prefix] = engine.manager.num_used_pages - before
    np.testing.assert_allclose(outputs[True], outputs[False], atol=ATOL)
    assert pages == {True: 1, False: 4}


def test_bfloat16_pool_is_stored_as_words_and_attends():
    rng = np.random.default_rng(3)
    engine = Engine(dtype=jnp.bfloat16)
    assert engine.cache[0].key_pages.dtype == jnp.uint16
    engine.add("a", _prompt(rng, 9))
    step = engine.manager.schedule([("a", 9)])
    out, engine.cache = engine.step_fn(engine.cache, paged_runtime(step))
    expected = engine.expected("a", 9, 9)
    np.testing.assert_allclose(np.asarray(out)[:, :9].transpose(1, 0, 2, 3), expected, atol=0.05)
    keys = engine.cache[0].key_states()
    assert keys.dtype == jnp.bfloat16
    page = step.page_tables[0, 0]
    written = _embed("k", 0, np.asarray(engine.tokens["a"][:4]), np.arange(4))
    # A page is [kv_heads, page_size, dim].
    np.testing.assert_array_equal(
        keys[page].swapaxes(0, 1), jnp.asarray(written).astype(jnp.bfloat16)
    )


def _runtime(slot_mapping, positions=None, copy_ops=None, num_pages=None):
    """A hand-made runtime for one sequence in a MAX_SEQS x MAX_PAGES table."""
    tokens = len(slot_mapping)
    real = sum(s >= 0 for s in slot_mapping)
    tables = np.full((MAX_SEQS, MAX_PAGES), -1, np.int32)
    tables[0, :3] = [5, 2, 7]
    start = np.full((MAX_SEQS + 1,), real, np.int32)
    start[0] = 0
    return PagedRuntimeMetadata(
        page_tables=jnp.asarray(tables),
        context_lens=jnp.asarray([real, 0, 0, 0], jnp.int32),
        query_start_loc=jnp.asarray(start),
        num_seqs=jnp.asarray(1, jnp.int32),
        slot_mapping=jnp.asarray(slot_mapping, jnp.int32),
        positions=jnp.asarray(positions if positions is not None else range(tokens), jnp.int32),
        token_ids=jnp.zeros((tokens,), jnp.int32),
        copy_ops=jnp.asarray(
            copy_ops if copy_ops is not None else -np.ones((MAX_SEQS, 2)), jnp.int32
        ),
        logits_indices=jnp.zeros((MAX_SEQS,), jnp.int32),
        num_pages=12 if num_pages is None else num_pages,
        page_size=PAGE_SIZE,
    )


def _metadata(**overrides):
    args = dict(
        num_layers=1,
        num_pages=12,
        page_size=PAGE_SIZE,
        num_kv_heads=KV_HEADS,
        head_dim=DIM,
        max_num_seqs=MAX_SEQS,
        max_pages_per_seq=MAX_PAGES,
    )
    args.update(overrides)
    return PagedCacheMetadata.create(**args)


def _random_view(metadata, seed=4):
    rng = np.random.default_rng(seed)
    view = PagedCacheView.init(metadata, 0)
    return dataclasses.replace(
        view,
        key_pages=jnp.asarray(rng.standard_normal(view.key_pages.shape), jnp.float32),
        value_pages=jnp.asarray(rng.standard_normal(view.value_pages.shape), jnp.float32),
    )


def _by_slot(pool):
    """A ``[pages, kv_heads, page_size, dim]`` pool as ``[slots, kv_heads, dim]`` (a copy)."""
    pool = np.asarray(pool)
    return pool.swapaxes(1, 2).reshape(-1, pool.shape[1], pool.shape[-1])


def test_padding_slots_write_nothing_and_positions_are_minus_one():
    metadata = _metadata(max_pages_per_seq=MAX_PAGES, num_pages=MAX_PAGES)
    view = _random_view(metadata)
    slots = [21, 8, -1, 9, -1, -1]  # page 5 offset 1, page 2 offsets 0 and 1, padding
    runtime = _runtime(slots, positions=[5, 4, 0, 6, 0, 0], num_pages=MAX_PAGES)
    key = jnp.asarray(np.random.default_rng(5).standard_normal((6, KV_HEADS, DIM)), jnp.float32)
    kv, new_view = jax.jit(lambda v, k, r: v.concatenate_to_cache(k, k, r))(view, key, runtime)
    before = _by_slot(view.key_pages)
    after = _by_slot(new_view.key_pages)
    expected = before.copy()
    for row, slot in enumerate(slots):
        if slot >= 0:
            expected[slot] = np.asarray(key[row])
    np.testing.assert_array_equal(after, expected)  # in particular the last slot is untouched
    values = _by_slot(view.value_pages)
    values[[21, 8, 9]] = np.asarray(key)[[0, 1, 3]]
    np.testing.assert_array_equal(_by_slot(new_view.value_pages), values)
    assert isinstance(kv, PagedKV)
    np.testing.assert_array_equal(kv.query_positions, [5, 4, -1, 6, -1, -1])
    np.testing.assert_array_equal(view.query_positions(runtime, 6), [5, 4, -1, 6, -1, -1])


def test_copy_pages_applies_real_rows_only():
    metadata = _metadata(num_layers=2)
    cache = PagedCache.init_cache(metadata)
    cache = cache.with_views([_random_view(metadata, seed) for seed in (6, 7)])
    ops = jnp.asarray([[3, 6], [-1, -1], [1, 0], [-1, -1]], jnp.int32)
    copied = jax.jit(lambda c, o: c.copy_pages(o), donate_argnums=0)(
        jax.tree_util.tree_map(jnp.copy, cache), ops
    )
    for old, new in zip(cache, copied, strict=True):
        for pool in ("key_pages", "value_pages"):
            expected = np.asarray(getattr(old, pool)).copy()
            expected[6] = expected[3]
            expected[0] = expected[1]
            np.testing.assert_array_equal(getattr(new, pool), expected)
    # All -1: nothing changes, page 0 and the last page included.
    none = cache.copy_pages(-jnp.ones((MAX_SEQS, 2), jnp.int32))
    for old, new in zip(cache, none, strict=True):
        np.testing.assert_array_equal(new.key_pages, old.key_pages)


def test_jit_with_donation_writes_in_place():
    engine = Engine()
    engine.add("a", [1, 2, 3])
    pointer = engine.cache[1].key_pages.unsafe_buffer_pointer()
    engine.run([("a", 3)])
    assert engine.cache[1].key_pages.unsafe_buffer_pointer() == pointer


def test_pytree_and_serialisation_round_trips():
    metadata = _metadata(sliding_window=5, dtype=jnp.bfloat16, value_dim=6)
    assert PagedCacheMetadata.from_json(metadata.to_json()) == metadata
    assert PagedCacheMetadata.from_dict(metadata.to_dict()) == metadata
    assert hash(metadata) == hash(PagedCacheMetadata.from_json(metadata.to_json()))
    runtime = _runtime([9, 10, -1])
    for restored in (
        PagedRuntimeMetadata.from_json(runtime.to_json()),
        PagedRuntimeMetadata.from_dict(runtime.to_dict()),
    ):
        for name in runtime.to_dict():
            got, want = getattr(restored, name), getattr(runtime, name)
            if name in ("max_query_len", "prefill_rows", "num_pages", "page_size"):  # static
                assert got == want
                continue
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
    cache = PagedCache.init_cache(metadata, layers=[0])
    leaves, treedef = jax.tree_util.tree_flatten(cache)
    assert len(leaves) == 2 and leaves[0].dtype == jnp.uint16
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt[0].metadata == metadata and rebuilt[0].layer_index == 0
    assert PagedCache.init_empty(3).views == (None, None, None)


def test_metadata_sizes_and_memory_budget():
    metadata = _metadata(dtype=jnp.bfloat16)
    assert metadata.bytes_per_token() == 1 * KV_HEADS * (DIM + DIM) * 2
    assert metadata.bytes_per_page() == PAGE_SIZE * metadata.bytes_per_token()
    assert metadata.bytes_total() == 12 * metadata.bytes_per_page()
    sized = PagedCacheMetadata.from_memory_budget(
        2, 16, 8, 128, 8, 4, dtype=jnp.bfloat16, memory_bytes=10 * 2**20
    )
    assert sized.num_pages == 10 * 2**20 // sized.bytes_per_page() == 80
    assert sized.token_capacity == 80 * 16

    class FakeDevice:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    device = FakeDevice({"bytes_limit": 100 * 2**20, "bytes_in_use": 10 * 2**20})
    by_fraction = PagedCacheMetadata.from_memory_budget(
        2, 16, 8, 128, 8, 4, dtype=jnp.bfloat16, memory_fraction=0.5, device=device
    )
    assert by_fraction.num_pages == 40 * 2**20 // by_fraction.bytes_per_page()
    with pytest.raises(ValueError, match="reports no memory statistics.*pass memory_bytes"):
        PagedCacheMetadata.from_memory_budget(
            2, 16, 8, 128, 8, 4, memory_fraction=0.5, device=FakeDevice(None)
        )
    with pytest.raises(ValueError, match="leaves no room"):
        PagedCacheMetadata.from_memory_budget(
            2, 16, 8, 128, 8, 4, memory_fraction=0.05, device=device
        )
    with pytest.raises(ValueError, match="exactly one of memory_bytes and memory_fraction"):
        PagedCacheMetadata.from_memory_budget(2, 16, 8, 128, 8, 4)
    with pytest.raises(ValueError, match="memory_fraction must be a float in"):
        PagedCacheMetadata.from_memory_budget(2, 16, 8, 128, 8, 4, memory_fraction=1.5)
    with pytest.raises(ValueError, match="holds 1 page.*at least max_pages_per_seq=4"):
        PagedCacheMetadata.from_memory_budget(2, 16, 8, 128, 8, 4, memory_bytes=300_000)
    with pytest.raises(TypeError, match="max_pages_per_seq must be an int"):
        PagedCacheMetadata.from_memory_budget(2, 16, 8, 128, 8, "4", memory_bytes=2**30)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"num_layers": 0}, ValueError, "num_layers must be >= 1, got 0"),
        ({"num_pages": 2}, ValueError, "max_pages_per_seq=10 exceeds num_pages=2"),
        ({"page_size": 1.5}, TypeError, "page_size must be an int"),
        ({"num_kv_heads": -1}, ValueError, "num_kv_heads must be >= 1"),
        ({"head_dim": 0}, ValueError, "head_dim must be >= 1"),
        ({"value_dim": 0}, ValueError, "value_dim must be >= 1"),
        ({"max_num_seqs": 0}, ValueError, "batch_size must be >= 1"),
        ({"max_pages_per_seq": 0}, ValueError, "max_pages_per_seq must be >= 1"),
        ({"sliding_window": 0}, ValueError, "sliding_window must be >= 1"),
        ({"dtype": jnp.int8}, ValueError, "dtype must be one of"),
        ({"num_pages": 2**30, "page_size": 4}, ValueError, "do not fit int32 slot ids"),
    ],
)
def test_metadata_validation(overrides, error, match):
    with pytest.raises(error, match=match):
        _metadata(**overrides)


def test_metadata_replace_and_from_dict_validate():
    metadata = _metadata()
    with pytest.raises(ValueError, match="page_size must be >= 1"):
        metadata.replace(page_size=0)
    data = metadata.to_dict()
    data.pop("num_pages")
    with pytest.raises(ValueError, match="missing required field"):
        PagedCacheMetadata.from_dict(data)


def test_runtime_validation():
    engine = Engine()
    engine.add("a", [1, 2, 3])
    step = engine.manager.schedule([("a", 3)])
    runtime = paged_runtime(step)
    assert runtime.num_seqs.shape == () and int(runtime.num_seqs) == 1
    assert all(leaf.dtype == jnp.int32 for leaf in jax.tree_util.tree_leaves(runtime))
    with pytest.raises(TypeError, match="step must be a StepMetadata"):
        paged_runtime(step.arrays())
    arrays = {name: getattr(runtime, name) for name in runtime.to_dict()}
    with pytest.raises(ValueError, match=r"context_lens must have shape \(4,\)"):
        PagedRuntimeMetadata(**{**arrays, "context_lens": jnp.zeros((3,), jnp.int32)})
    with pytest.raises(ValueError, match=r"positions must have shape \(16,\)"):
        PagedRuntimeMetadata(**{**arrays, "positions": jnp.zeros((8,), jnp.int32)})
    with pytest.raises(TypeError, match="slot_mapping must be an integer array"):
        PagedRuntimeMetadata(**{**arrays, "slot_mapping": jnp.zeros((16,), jnp.float32)})
    with pytest.raises(TypeError, match="token_ids must be an array"):
        PagedRuntimeMetadata(**{**arrays, "token_ids": [0] * 16})
    broken = _mutable_step(step, slot_mapping=np.r_[step.slot_mapping[:3], np.zeros(13)])
    with pytest.raises(ValueError, match="slot_mapping must be -1 past num_tokens=3"):
        paged_runtime(broken)
    broken = _mutable_step(step, query_start_loc=np.asarray([0, 2, 1, 3, 3]))
    with pytest.raises(ValueError, match="query_start_loc must rise from 0 to num_tokens=3"):
        paged_runtime(broken)
    broken = _mutable_step(step, context_lens=np.asarray([2, 0, 0, 0]))
    with pytest.raises(ValueError, match="shorter than the new tokens per row"):
        paged_runtime(broken)
    engine.manager.commit_step(step)


def _mutable_step(step, **changes):
    return dataclasses.replace(step, **changes)


def test_view_and_cache_validation():
    metadata = _metadata()
    view = PagedCacheView.init(metadata, 0)
    runtime = _runtime([1, 2, -1])
    key = jnp.zeros((3, KV_HEADS, DIM), jnp.float32)
    owner = r"concatenate_to_cache \(layer 0\)"
    with pytest.raises(TypeError, match="metadata must be PagedCacheMetadata"):
        PagedCacheView.init(object())
    with pytest.raises(TypeError, match=f"{owner}: runtime must be PagedRuntimeMetadata"):
        view.concatenate_to_cache(key, key, None)
    with pytest.raises(ValueError, match=r"key must have shape \(3, 2, 8\)"):
        view.concatenate_to_cache(key[:2], key, runtime)
    with pytest.raises(ValueError, match=r"value must have shape \(3, 2, 8\)"):
        view.concatenate_to_cache(key, key[..., :4], runtime)
    with pytest.raises(TypeError, match="key must be a float array"):
        view.concatenate_to_cache(key.astype(jnp.int32), key, runtime)
    with pytest.raises(ValueError, match=r"slot_mapping must hold slots in \[0, 48\)"):
        view.concatenate_to_cache(key, key, _runtime([1, 48, -1]))
    with pytest.raises(ValueError, match=r"page_tables must hold page ids in \[0, 12\)"):
        view.concatenate_to_cache(key, key, runtime.replace(page_tables=runtime.page_tables + 12))
    wide = _metadata(max_pages_per_seq=MAX_PAGES + 2)
    with pytest.raises(ValueError, match=r"runtime.page_tables must have shape \(4, 12\)"):
        PagedCacheView.init(wide).concatenate_to_cache(key, key, runtime)
    with pytest.raises(ValueError, match="num_tokens=4 does not match the runtime's 3"):
        view.query_positions(runtime, 4)
    with pytest.raises(TypeError, match="runtime must be PagedRuntimeMetadata"):
        view.query_positions(None, 3)
    for ops, match in (
        (jnp.asarray([[1, -1]]), r"row 0 = \[1, -1\] must be two distinct page ids"),
        (jnp.asarray([[-1, -1], [2, 12]]), r"row 1 = \[2, 12\]"),
        (jnp.asarray([[3, 3]]), r"row 0 = \[3, 3\]"),
        (jnp.asarray([1, 2]), r"copy_ops must have shape \(\*, 2\)"),
    ):
        with pytest.raises(ValueError, match=match):
            view.copy_pages(ops)
    with pytest.raises(TypeError, match="copy_ops must be an integer array"):
        view.copy_pages(jnp.zeros((2, 2), jnp.float32))
    with pytest.raises(TypeError, match="copy_ops must be a"):
        view.copy_pages([[1, 2]])
    with pytest.raises(TypeError, match="metadata must be PagedCacheMetadata"):
        PagedCache.init_cache(None)
    with pytest.raises(ValueError, match="layer 1 out of range for num_layers=1"):
        PagedCache.init_cache(metadata, layers=[1])
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        PagedCache.init_empty(0)


def test_donated_step_updates_the_pools_in_place_without_copies():
    """A write followed by attention must not copy the pools (cost would grow with num_pages)."""
    metadata = PagedCacheMetadata.create(1, 1024, 16, 3, 64, 1, 16)
    view = PagedCacheView.init(metadata, 0)
    tables = np.full((1, 16), -1, np.int32)
    tables[0, :9] = np.arange(9)
    runtime = PagedRuntimeMetadata(
        page_tables=jnp.asarray(tables),
        context_lens=jnp.asarray([129], jnp.int32),
        query_start_loc=jnp.asarray([0, 1], jnp.int32),
        num_seqs=jnp.asarray(1, jnp.int32),
        slot_mapping=jnp.asarray([128], jnp.int32),
        positions=jnp.asarray([128], jnp.int32),
        token_ids=jnp.zeros((1,), jnp.int32),
        copy_ops=jnp.full((1, 2), -1, jnp.int32),
        logits_indices=jnp.zeros((1,), jnp.int32),
        num_pages=1024,
        page_size=16,
        max_query_len=1,
    )

    def step(view, runtime, query, key):
        kv, view = view.concatenate_to_cache(key, key, runtime)
        return attention(query, kv), view

    compiled = (
        jax.jit(step, donate_argnums=0)
        .lower(view, runtime, jnp.ones((1, 9, 64)), jnp.ones((1, 3, 64)))
        .compile()
        .as_text()
    )
    pool_copies = [
        line for line in compiled.splitlines() if " copy(" in line and "1024,16,3,64" in line
    ]
    assert pool_copies == []
