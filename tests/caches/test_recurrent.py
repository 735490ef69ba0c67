"""Recurrent-state caches (Mamba, Mamba2, linear attention) against a plain Python record of each
row's inputs: conv windows and states after ragged writes (left/right padding, T larger than the
kernel), per-row reset, validation, serialisation, PyTree behaviour and donation under jit."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.caches.recurrent import (
    LinearAttentionCacheMetadata,
    LinearAttentionCacheView,
    Mamba2CacheMetadata,
    Mamba2CacheView,
    MambaCacheMetadata,
    MambaCacheView,
    RecurrentCache,
    RecurrentMetadata,
    init_view,
    shift_conv_window,
)


def _metadatas(batch=3, **kwargs):
    return [
        MambaCacheMetadata.create(batch, 2, 6, 4, 4, **kwargs),
        Mamba2CacheMetadata.create(batch, 2, 2, 3, 2, n_groups=2, conv_kernel=3, **kwargs),
        LinearAttentionCacheMetadata.create(batch, 2, 2, 3, 5, decay=[0.9, 0.5], **kwargs),
    ]


# ------------------------------------------------------------------------------------------
# The conv window against a Python list of each row's inputs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("kernel", [2, 4])
def test_conv_window_and_state_follow_each_rows_history(padding_side, kernel):
    rng = np.random.default_rng(kernel)
    batch, channels, width = 3, 2, 6  # width > kernel: one write may pass the whole window
    metadata = MambaCacheMetadata.create(batch, 1, channels, 2, kernel)
    view = MambaCacheView.init(metadata, 0)
    history = [[np.zeros(channels, np.float32)] * (kernel - 1) for _ in range(batch)]
    step = jax.jit(
        lambda view, x, ssm, runtime: view.concatenate_to_cache(view.read(runtime, None, x), ssm)
    )  # noqa: E501
    for _ in range(6):
        counts = rng.integers(0, width + 1, batch)
        chunk = np.full((batch, width, channels), 99.0, np.float32)  # padding junk
        starts = [0 if padding_side == "right" else width - n for n in counts]
        for row, n in enumerate(counts):
            chunk[row, starts[row] : starts[row] + n] = rng.standard_normal((n, channels))
        runtime = RecurrentMetadata.create(counts.astype(np.int32), padding_side)
        ssm = jnp.asarray(rng.standard_normal(metadata.ssm_state_shape), jnp.float32)
        previous_ssm = np.asarray(view.ssm_state)
        read, view = step(view, jnp.asarray(chunk), ssm, runtime)
        window = np.asarray(read.conv_window)
        assert window.shape == (batch, kernel - 1 + width, channels)
        for row, n in enumerate(counts):
            for rank in range(n):
                t = starts[row] + rank
                history[row].append(chunk[row, t])
                want = np.stack(history[row][-kernel:])  # the K inputs ending at this token
                np.testing.assert_array_equal(window[row, t : t + kernel], want)
            want_state = np.stack(history[row][-(kernel - 1) :]).T
            np.testing.assert_array_equal(np.asarray(view.conv_state)[row], want_state)
            want_ssm = np.asarray(ssm)[row] if n else previous_ssm[row]
            np.testing.assert_array_equal(np.asarray(view.ssm_state)[row], want_ssm)
            assert read.token_mask[row].sum() == n
        np.testing.assert_array_equal(
            np.asarray(view.lengths), [len(h) - (kernel - 1) for h in history]
        )


def test_shift_conv_window_is_shared_and_exact_in_bfloat16_storage():
    state = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2).astype(jnp.bfloat16)
    new = jnp.full((2, 4, 3), 5.0)
    window, kept = shift_conv_window(state, new, jnp.array([4, 1]), "left")
    assert window.dtype == jnp.float32 and kept.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(window[1, :3, 0]), [0, 0, 0])
    np.testing.assert_array_equal(np.asarray(window[1, 3:, 0]), [6, 7, 5])
    np.testing.assert_array_equal(np.asarray(kept[1, 0]), [7, 5])
    np.testing.assert_array_equal(np.asarray(kept[0, 0]), [5, 5])


def test_mamba2_conv_covers_x_b_and_c_channels():
    metadata = Mamba2CacheMetadata.create(1, 1, num_heads=4, head_dim=8, state_size=16, n_groups=2)
    assert metadata.conv_dim == 4 * 8 + 2 * 2 * 16
    view = Mamba2CacheView.init(metadata)
    assert view.conv_state.shape == (1, 96, 3)
    assert view.ssm_state.shape == (1, 4, 8, 16)
    assert view.ssm_state.dtype == jnp.float32


def test_linear_attention_state_write_and_untouched_rows():
    metadata = LinearAttentionCacheMetadata.create(2, 1, 2, 3, 4)
    view = LinearAttentionCacheView.init(metadata, 0)
    state = jnp.ones(metadata.state_shape)
    read = view.read(RecurrentMetadata.create([2, 0], "left"), 3)
    read, view = view.concatenate_to_cache(read, state)
    np.testing.assert_array_equal(np.asarray(read.positions), [[-1, 0, 1], [-1, -1, -1]])
    np.testing.assert_array_equal(np.asarray(view.state[0]), 1.0)
    np.testing.assert_array_equal(np.asarray(view.state[1]), 0.0)  # no real token: unchanged
    np.testing.assert_array_equal(np.asarray(view.lengths), [2, 0])
    read = view.read(RecurrentMetadata.create([1, 2]), 2)
    np.testing.assert_array_equal(np.asarray(read.positions), [[2, -1], [0, 1]])
    assert read.conv_window is None and read.state.dtype == jnp.float32
    assert metadata.decay_factors() is None
    decayed = LinearAttentionCacheMetadata.create(1, 1, 2, 3, decay=np.array([0.5, 1.0]))
    assert decayed.decay == (0.5, 1.0) and decayed.value_dim == 3
    np.testing.assert_array_equal(np.asarray(decayed.decay_factors()), [0.5, 1.0])


# ------------------------------------------------------------------------------------------
# Reset, cache container
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(3))
def test_reset_rows_zeroes_only_the_selected_rows(index):
    metadata = _metadatas()[index]
    cache = RecurrentCache.init_cache(metadata)
    filled = jax.tree_util.tree_map(lambda x: x + 1, cache)
    reset = filled.reset_rows([2])
    for view in reset:
        for leaf in jax.tree_util.tree_leaves(view):
            assert not np.asarray(leaf[2]).any()
            assert np.asarray(leaf[:2] == 1).all()
    by_mask = filled.reset_rows(jnp.array([False, False, True]))
    for a, b in zip(
        jax.tree_util.tree_leaves(reset), jax.tree_util.tree_leaves(by_mask), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match=r"row ids must lie in \[0, 3\)"):
        filled.reset_rows([3])
    with pytest.raises(ValueError, match=r"rows must have shape \(3,\)"):
        filled.reset_rows(jnp.array([True, False]))
    # Traced masks work under jit.
    jitted = jax.jit(lambda cache, rows: cache.reset_rows(rows))(filled, jnp.array([0, 0, 1]) > 0)
    np.testing.assert_array_equal(np.asarray(jitted[0].lengths), [1, 1, 0])


def test_cache_init_partial_layers_and_empty():
    metadata = _metadatas()[1]
    cache = RecurrentCache.init_cache(metadata, layers=[1])
    assert cache[0] is None and isinstance(cache[1], Mamba2CacheView)
    assert cache[1].layer_index == 1 and len(cache) == 2
    assert list(RecurrentCache.init_empty(3)) == [None, None, None]
    with pytest.raises(ValueError, match="layer 2 out of range for num_layers=2"):
        RecurrentCache.init_cache(metadata, layers=[2])
    with pytest.raises(TypeError, match="metadata must be one of MambaCacheMetadata"):
        RecurrentCache.init_cache("mamba")
    with pytest.raises(ValueError, match="num_layers must be >= 1, got 0"):
        RecurrentCache.init_empty(0)
    with pytest.raises(TypeError, match="metadata must be MambaCacheMetadata, got Mamba2"):
        MambaCacheView.init(metadata)
    with pytest.raises(TypeError, match="metadata must be LinearAttentionCacheMetadata"):
        LinearAttentionCacheView.init(metadata)
    with pytest.raises(ValueError, match="layer_index must be >= 0, got -1"):
        init_view(metadata, -1)


def test_state_bytes_are_constant_in_sequence_length():
    mamba, mamba2, linear = _metadatas(batch=2)
    assert mamba.state_bytes_per_sequence() == 2 * (6 * 3 + 6 * 4) * 4
    assert mamba2.state_bytes_per_sequence() == 2 * ((6 + 2 * 2 * 2) * 2 + 6 * 2) * 4
    assert linear.state_bytes_per_sequence() == 2 * 2 * 3 * 5 * 4
    half = linear.replace(dtype=np.dtype(jnp.bfloat16))
    assert half.state_bytes_per_sequence() * 2 == linear.state_bytes_per_sequence()
    cache = RecurrentCache.init_cache(mamba)
    allocated = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(cache))
    assert allocated == mamba.bytes_total()


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: MambaCacheMetadata.create(0, 1, 8), "batch_size must be >= 1, got 0"),
        (lambda: MambaCacheMetadata.create(1, 1, 8, conv_kernel=1), "conv_kernel must be >= 2"),
        (lambda: MambaCacheMetadata.create(1, 1, 8.0), "d_inner must be an int"),
        (lambda: MambaCacheMetadata.create(1, 1, 8, dtype=jnp.int8), "dtype must be one of"),
        (lambda: Mamba2CacheMetadata.create(1, 1, 3, 4, n_groups=2), "n_groups=2 must divide"),
        (lambda: Mamba2CacheMetadata.create(1, 1, 2, 0), "head_dim must be >= 1, got 0"),
        (
            lambda: LinearAttentionCacheMetadata.create(1, 1, 2, 4, decay=[0.5]),
            "decay must be a tuple of num_heads=2 floats",
        ),
        (
            lambda: LinearAttentionCacheMetadata.create(1, 1, 2, 4, decay=[0.5, 0.0]),
            r"decay\[1\] must be a float in \(0, 1\], got 0.0",
        ),
        (
            lambda: LinearAttentionCacheMetadata.create(1, 1, 1, 4, decay="fast"),
            "decay must be a sequence of floats",
        ),
        (lambda: LinearAttentionCacheMetadata.create(1, True, 1, 4), "num_layers must be an int"),
        (lambda: RecurrentMetadata.create([[1]]), r"new_lengths must be a \[batch\] int array"),
        (lambda: RecurrentMetadata.create([1.5]), r"new_lengths must be a \[batch\] int array"),
        (lambda: RecurrentMetadata.create([1], "middle"), "padding_side must be one of"),
    ],
)
def test_metadata_validation_names_the_field(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_replace_and_from_dict_revalidate():
    metadata = _metadatas()[1]
    assert metadata.replace(state_size=8).ssm_state_shape == (3, 2, 3, 8)
    with pytest.raises(ValueError, match="n_groups=3 must divide num_heads=2"):
        metadata.replace(n_groups=3)
    data = metadata.to_dict()
    data["conv_kernel"] = 1
    with pytest.raises(ValueError, match="conv_kernel must be >= 2, got 1"):
        Mamba2CacheMetadata.from_dict(data)
    data = metadata.to_dict()
    data["extra"] = 1
    with pytest.raises(ValueError, match="unknown field"):
        Mamba2CacheMetadata.from_dict(data)


def test_write_validation():
    view = MambaCacheView.init(MambaCacheMetadata.create(2, 1, 4, 3, 3), 0)
    x = jnp.ones((2, 3, 4))
    ssm = jnp.ones((2, 4, 3))
    with pytest.raises(
        ValueError, match=r"conv_input must have shape \(2, \*, 4\), got \(2, 3, 5\)"
    ):
        view.read(None, 3, jnp.ones((2, 3, 5)))
    with pytest.raises(ValueError, match="at least one new token"):
        view.read(None, 0, jnp.ones((2, 0, 4)))
    with pytest.raises(TypeError, match="conv_input must be a float array"):
        view.read(None, 3, jnp.ones((2, 3, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"ssm_state must have shape \(2, 4, 3\)"):
        view.concatenate_to_cache(view.read(None, 3, x), jnp.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=r"new_lengths must lie in \[0, 3\], got \[4 1\]"):
        view.read(RecurrentMetadata.create([4, 1]), 3, x)
    with pytest.raises(ValueError, match=r"runtime.new_lengths must have shape \(2,\)"):
        view.read(RecurrentMetadata.create([1, 1, 1]), 3, x)
    with pytest.raises(TypeError, match="runtime must be RecurrentRuntimeMetadata"):
        view.read({"new_lengths": [1, 1]}, 3, x)
    with pytest.raises(ValueError, match="holds 3 tokens per row but num_tokens=2"):
        view.read(None, 2, x)
    with pytest.raises(TypeError, match="conv_input is required"):
        view.read(None, 3)
    with pytest.raises(TypeError, match="step must be the RecurrentStep that read"):
        view.concatenate_to_cache(x, ssm)
    linear = LinearAttentionCacheView.init(LinearAttentionCacheMetadata.create(2, 1, 1, 2), 0)
    with pytest.raises(ValueError, match="num_tokens must be >= 1, got 0"):
        linear.read(None, 0)
    with pytest.raises(TypeError, match="has no conv state: conv_input must be None"):
        linear.read(None, 1, x)
    with pytest.raises(ValueError, match=r"state must have shape \(2, 1, 2, 2\)"):
        linear.concatenate_to_cache(linear.read(None, 1), jnp.ones((2, 2, 2)))


# ------------------------------------------------------------------------------------------
# Serialisation, PyTree behaviour, jit and donation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_metadata_round_trips_exactly(dtype):
    for metadata in _metadatas(dtype=dtype):
        for restored in (
            type(metadata).from_json(metadata.to_json()),
            type(metadata).from_dict(metadata.to_dict()),
        ):
            assert restored == metadata and hash(restored) == hash(metadata)
            assert restored.dtype == np.dtype(dtype)
    linear = _metadatas()[2]
    assert type(linear).from_json(linear.to_json()).decay == (0.9, 0.5)


def test_runtime_metadata_round_trips_exactly():
    runtime = RecurrentMetadata.create(np.array([3, 0, 2], np.int32), "left")
    restored = RecurrentMetadata.from_json(runtime.to_json())
    assert restored.padding_side == "left" and restored.new_lengths.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(restored.new_lengths), [3, 0, 2])
    assert RecurrentMetadata.from_dict(RecurrentMetadata().to_dict()).new_lengths is None


def test_cache_is_a_pytree_with_static_metadata():
    metadata = _metadatas()[1]
    cache = RecurrentCache.init_cache(metadata)
    leaves, treedef = jax.tree_util.tree_flatten(cache)
    assert len(leaves) == 2 * 3  # conv_state, ssm_state, lengths per layer
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(rebuilt[1], Mamba2CacheView) and rebuilt[1].layer_index == 1
    assert rebuilt[0].metadata is metadata
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(cache)[0]]
    assert ".views[0].conv_state" in paths and ".views[1].ssm_state" in paths
    linear = RecurrentCache.init_cache(_metadatas()[2])
    assert len(jax.tree_util.tree_leaves(linear)) == 2 * 2


@pytest.mark.parametrize("index", [0, 2])
def test_jit_specialises_on_metadata_and_donation_writes_in_place(index):
    metadata = _metadatas(batch=2)[index]
    cache = RecurrentCache.init_cache(metadata)
    traces = []

    def write(cache, new):
        traces.append(1)
        view = cache[0]
        if isinstance(view, LinearAttentionCacheView):
            _, view = view.concatenate_to_cache(view.read(None, 1), view.state + new)
        else:
            conv_input = jnp.full((2, 1, metadata.conv_dim), new)
            step = view.read(None, 1, conv_input)
            _, view = view.concatenate_to_cache(step, view.ssm_state + new)
        return cache.replace_view(0, view)

    donated = jax.jit(write, donate_argnums=0)
    cache = donated(cache, 1.0)
    state_name = "state" if index == 2 else "ssm_state"
    before = getattr(cache[0], state_name).unsafe_buffer_pointer()
    cache = donated(cache, 1.0)
    assert getattr(cache[0], state_name).unsafe_buffer_pointer() == before
    np.testing.assert_array_equal(np.asarray(getattr(cache[0], state_name)), 2.0)
    np.testing.assert_array_equal(np.asarray(cache[0].lengths), [2, 2])
    count = len(traces)
    donated(cache, 1.0)
    assert len(traces) == count  # same metadata: no retrace
    other = RecurrentCache.init_cache(dataclasses.replace(metadata, num_layers=3))
    donated(other, 1.0)
    assert len(traces) == count + 1
