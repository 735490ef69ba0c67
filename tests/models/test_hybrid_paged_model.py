"""Tiny hybrid stacks (attention + Mamba2 + an MLP-only layer; global + sliding-window attention)
through the PAGED attention backend, driven by a real ``PageManager``: ragged prefill chunks of
different lengths, sequences that sit steps out and come back in another row of the step, a slot
reused by a new sequence, then decode steps. Every step's logits equal the whole-sequence forward
and the contiguous backend fed the same ``[batch, T]`` tokens."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.caches.hybrid import HybridCache, HybridMetadata
from jaxkv.engine.step_inputs import hybrid_paged_runtime
from jaxkv.models import hybrid, mamba2
from jaxkv.pages import PageManager

ATOL = 1e-5
HIDDEN = 16
SLOTS = 3  # batch rows = max_num_seqs
LONGEST = 12
PAGE_SIZE = 4
PREFILL_WIDTH = 8  # columns of a chunked step; decode steps take one
VOCAB = 40

CONFIGS = {
    "attention_mamba2": hybrid.HybridConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        layer_kinds=("attention", "mamba2", "none", "attention"),
        mamba2=mamba2.Mamba2Config(HIDDEN, 2, 8, state_size=4, n_groups=1, block_size=4),
        attention_block_size=4,
    ),
    "global_and_sliding": hybrid.HybridConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        layer_kinds=("sliding_attention", "attention", "sliding_attention"),
        sliding_window=3,
        attention_block_size=8,
    ),
}

# These tiny models are compiled a few times each and run for microseconds: spend less on codegen.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.cache
def _model(name):
    config = CONFIGS[name]
    params = jax.jit(hybrid.init_hybrid, static_argnums=1, compiler_options=FAST_COMPILE)(
        jax.random.PRNGKey(3), config
    )
    jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    full = jit(functools.partial(hybrid.hybrid_forward, params, config))
    step = jit(functools.partial(hybrid.hybrid_forward_cached, params, config), donate_argnums=1)
    return config, params, full, step


def _plan():
    """``(event, argument)`` pairs: sequence ids are their slots.

    Sequence 1 finishes early; its slot is reset and taken by sequence 3 while the others decode.
    """
    return [
        ("add", (0, 7)),  # (seq_id, prompt length)
        ("add", (1, 5)),
        ("add", (2, 6)),
        ("step", [(0, 5), (1, 2), (2, 4)]),  # ragged first chunks
        ("step", [(2, 2), (0, 2)]),  # seq 1 sits out; seq 2 is row 0 of the step
        ("step", [(1, 3)]),
        ("step", "decode"),
        ("step", "decode"),
        ("finish", 1),
        ("add", (3, 4)),  # takes slot 1
        ("step", [(0, 1), (3, 4), (2, 1)]),  # a prefill among decodes, out of slot order
        ("step", "decode"),
        ("step", "decode"),
        ("step", "decode"),
    ]


class Driver:
    """A ``PageManager``, a paged cache and (as a second reference) a contiguous cache, run in
    lock step; records every sequence's logits."""

    def __init__(self, name, tokens, lengths, padding_side):
        self.config, _, self.full, self.step = _model(name)
        self.tokens, self.lengths, self.padding_side = tokens, lengths, padding_side
        metadata = self.config.cache_metadata(
            SLOTS, LONGEST, attention_backend="paged", page_size=PAGE_SIZE
        )
        self.paged = HybridCache.init_cache(metadata)
        self.contiguous = HybridCache.init_cache(self.config.cache_metadata(SLOTS, LONGEST))
        self.manager = PageManager(
            **metadata.paged_geometry(), enable_prefix_caching=False, token_buckets=(16,)
        )
        self.logits = {seq: [] for seq in range(len(lengths))}
        self.shapes = set()

    def add(self, seq_id, prompt_length):
        slot = self._slot(seq_id)
        self.paged = self.paged.reset_rows([slot])
        self.contiguous = self.contiguous.reset_rows([slot])
        self.manager.add_sequence(seq_id, self.tokens[seq_id, :prompt_length].tolist())

    def finish(self, seq_id):
        self.manager.free(seq_id)

    @staticmethod
    def _slot(seq_id):
        return 1 if seq_id == 3 else seq_id

    def run(self, batch):
        if batch == "decode":
            batch = [
                (seq_id, 1)
                for seq_id in self.manager.seq_ids
                if self.manager.get_sequence(seq_id).num_computed < self.lengths[seq_id]
            ]
        for seq_id, count in batch:
            # Past the prompt, feed the sequence's next token as a sampler would.
            info = self.manager.get_sequence(seq_id)
            wanted = info.num_computed + count
            if wanted > len(info.token_ids):
                next_tokens = self.tokens[seq_id, len(info.token_ids) : wanted].tolist()
                self.manager.append_tokens(seq_id, next_tokens)
        step = self.manager.schedule(batch)
        width = 1 if max(step.num_new_tokens) == 1 else PREFILL_WIDTH
        runtime = hybrid_paged_runtime(
            step,
            slots={seq_id: self._slot(seq_id) for seq_id in step.seq_ids},
            width=width,
            padding_side=self.padding_side,
        )
        tokens = runtime.batch_token_ids()
        self.shapes.add((runtime.num_tokens, width))
        paged_logits, self.paged = self.step(tokens, self.paged, runtime)
        contiguous_runtime = HybridMetadata.create(runtime.recurrent.new_lengths, self.padding_side)
        dense_logits, self.contiguous = self.step(tokens, self.contiguous, contiguous_runtime)
        self.manager.commit_step(step)
        np.testing.assert_allclose(
            np.asarray(paged_logits), np.asarray(dense_logits), atol=ATOL, rtol=0
        )
        # Each sequence's logits from the packed layout, in its own order.
        packed = np.asarray(runtime.to_packed(paged_logits))
        starts = step.query_start_loc
        for row, seq_id in enumerate(step.seq_ids):
            self.logits[seq_id].append(packed[starts[row] : starts[row + 1]])
        # The last token's logits sit at logits_indices.
        last = packed[step.logits_indices[: step.num_seqs]]
        for row, seq_id in enumerate(step.seq_ids):
            np.testing.assert_array_equal(last[row], self.logits[seq_id][-1][-1])

    def play(self, plan):
        for event, argument in plan:
            if event == "add":
                self.add(*argument)
            elif event == "finish":
                self.finish(argument)
            else:
                self.run(argument)
        self.contiguous.check_overflow()


@pytest.mark.parametrize(
    ("name", "padding_side"),
    [("attention_mamba2", "right"), ("global_and_sliding", "left")],
)
def test_paged_steps_match_full_forward_and_contiguous_backend(name, padding_side):
    rng = np.random.default_rng(11)
    lengths = [12, 7, 10, 8]
    tokens = rng.integers(0, VOCAB, (len(lengths), LONGEST)).astype(np.int32)
    driver = Driver(name, tokens, lengths, padding_side)
    driver.play(_plan())
    expected = np.asarray(driver.full(jnp.asarray(tokens)))  # causal: prefixes are exact
    for seq_id in range(len(lengths)):
        got = np.concatenate(driver.logits[seq_id])
        np.testing.assert_allclose(got, expected[seq_id, : got.shape[0]], atol=ATOL, rtol=0)
    # Every planned token of the long-lived sequences ran.
    assert [len(np.concatenate(driver.logits[s])) for s in range(4)] == [12, 7, 10, 7]
    # Two shapes: (packed bucket, width) of chunked steps and of decode steps.
    assert driver.shapes == {(16, PREFILL_WIDTH), (16, 1)}
    if "mamba2" in CONFIGS[name].layer_kinds:
        np.testing.assert_array_equal(np.asarray(driver.paged.lengths()), [12, 7, 10])
    else:
        with pytest.raises(ValueError, match="no view with per-row lengths"):
            driver.paged.lengths()


def test_paged_forward_validation():
    config, params, _, _ = _model("attention_mamba2")
    metadata = config.cache_metadata(SLOTS, LONGEST, attention_backend="paged", page_size=4)
    cache = HybridCache.init_cache(metadata)
    manager = PageManager(**metadata.paged_geometry(), enable_prefix_caching=False)
    manager.add_sequence("a", [1, 2, 3])
    runtime = hybrid_paged_runtime(manager.schedule([("a", 3)]), width=4)
    tokens = runtime.batch_token_ids()
    with pytest.raises(TypeError, match="a paged cache needs runtime=HybridPagedMetadata"):
        hybrid.hybrid_forward_cached(params, config, tokens, cache, HybridMetadata.create())
    with pytest.raises(TypeError, match="a paged cache needs runtime=HybridPagedMetadata"):
        hybrid.hybrid_forward_cached(params, config, tokens, cache)
    with pytest.raises(ValueError, match=r"tokens must be \[batch, T\] = \(3, 4\)"):
        hybrid.hybrid_forward_cached(params, config, tokens[:, :2], cache, runtime)
    wider = HybridCache.init_cache(
        config.cache_metadata(4, LONGEST, attention_backend="paged", page_size=4)
    )
    with pytest.raises(ValueError, match="runtime has 3 slots but the cache has batch_size=4"):
        hybrid.hybrid_forward_cached(params, config, tokens, wider, runtime)
    with pytest.raises(TypeError, match="runtime must be HybridMetadata"):
        contiguous = HybridCache.init_cache(config.cache_metadata(SLOTS, LONGEST))
        hybrid.hybrid_forward_cached(params, config, tokens, contiguous, runtime)
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        config.cache_metadata(SLOTS, LONGEST, attention_backend="ring")
    with pytest.raises(ValueError, match="page_size must be >= 1, got 0"):
        config.cache_metadata(SLOTS, LONGEST, attention_backend="paged", page_size=0)
