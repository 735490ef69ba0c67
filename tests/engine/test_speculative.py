"""Speculative decoding: prompt lookup and draft-model drafters, verification steps that keep
exactly what plain decoding would produce (greedy and seeded sampling, paged and contiguous
caches, on a tiny model and on the bundled SmolLM2), the acceptance rule's output distribution,
the engine's counters, and the refusals.
"""

from __future__ import annotations

import collections

import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from jaxkv import cli
from jaxkv.engine import (
    CacheConfig,
    Engine,
    HybridModel,
    Model,
    SamplingParams,
    SchedulerConfig,
    SpeculativeConfig,
    generate,
    speculative_config,
)
from jaxkv.engine.draft_model import DraftModelDrafter
from jaxkv.engine.sampler import sample_rows
from jaxkv.engine.speculative import DraftRequest, NgramDrafter, accepted_length, prompt_lookup

# -- prompt lookup ----------------------------------------------------------------------------


def test_prompt_lookup_copies_what_followed_the_latest_match():
    tokens = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 4, 1, 2, 3]
    # The longest suffix that occurred before is [1, 2, 3]; its latest earlier occurrence is
    # followed by 7, 8, 4.
    assert prompt_lookup(tokens, 3) == [7, 8, 4]
    assert prompt_lookup(tokens, 2) == [7, 8]
    assert prompt_lookup(tokens, 0) == []


def test_prompt_lookup_prefers_a_full_run_of_drafts():
    # The latest match of [5] sits at the end with one follower; the earlier one has four.
    assert prompt_lookup([5, 6, 7, 8, 9, 5, 5], 4, ngram_max=1, ngram_min=1) == [6, 7, 8, 9]


def test_prompt_lookup_without_a_match_proposes_nothing():
    assert prompt_lookup([1, 2, 3, 4], 4) == []
    assert prompt_lookup([7], 4) == []
    # Only n-grams of at least ngram_min tokens count.
    assert prompt_lookup([1, 2, 9, 2], 2, ngram_max=3, ngram_min=2) == []
    assert prompt_lookup([1, 2, 9, 2], 2, ngram_max=3, ngram_min=1) == [9, 2]


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 4), min_size=1, max_size=40),
    max_drafts=st.integers(0, 6),
    ngram_max=st.integers(1, 4),
)
def test_prompt_lookup_drafts_continue_an_earlier_occurrence(tokens, max_drafts, ngram_max):
    drafts = prompt_lookup(tokens, max_drafts, ngram_max=ngram_max, ngram_min=1)
    assert len(drafts) <= max_drafts
    if not drafts:
        # No suffix of length 1 occurred earlier (with a follower), or nothing was wanted.
        assert max_drafts == 0 or tokens[-1] not in tokens[:-1]
        return
    # Some earlier position i with tokens[i - n : i] == the last n tokens is followed by drafts.
    length = len(tokens)
    found = False
    for n in range(1, min(ngram_max, length - 1) + 1):
        suffix = tokens[length - n :]
        for i in range(n, length):
            if tokens[i - n : i] == suffix and tokens[i : i + len(drafts)] == drafts:
                found = True
    assert found, (tokens, drafts)


def test_accepted_length_counts_leading_agreement():
    assert accepted_length([5, 6, 7, 8], [5, 6, 9]) == 2
    assert accepted_length([5, 6, 7, 8], [5, 6, 7]) == 3
    assert accepted_length([1], []) == 0
    assert accepted_length([4, 6], [5]) == 0


def test_ngram_drafter_answers_every_request():
    drafter = NgramDrafter(ngram_max=2, ngram_min=1)
    requests = [DraftRequest("a", [1, 2, 1, 2], 3), DraftRequest("b", [1, 2, 3], 3)]
    assert drafter.propose(requests) == [[1, 2], []]
    # By default a single repeated token is no match.
    assert NgramDrafter().propose([DraftRequest("c", [4, 9, 4], 3)]) == [[]]


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "medusa"}, "method"),
        ({"num_draft_tokens": 0}, "num_draft_tokens"),
        ({"num_draft_tokens": 33}, "num_draft_tokens"),
        ({"ngram_min": 3, "ngram_max": 2}, "ngram_max"),
        ({"method": "draft"}, "draft_model"),
        ({"method": "ngram", "draft_model": object()}, "draft_model"),
    ],
)
def test_bad_speculative_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig(**kwargs)


def test_speculative_config_from_options():
    assert speculative_config("none") is None
    assert speculative_config("ngram", 3) == SpeculativeConfig("ngram", 3)
    with pytest.raises(ValueError, match="--draft-model"):
        speculative_config("draft", 3)
    with pytest.raises(ValueError, match="--speculative draft"):
        speculative_config("ngram", 3, "model.gguf")


# -- the engine on a tiny model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> Model:
    return Model.tiny()


# Texts a tiny random model continues with repeats, so prompt lookup finds matches.
PROMPTS = [
    "the cat sat on the mat and the cat sat on the",
    "one two three one two three one two",
    "hello",
]
SCHEDULER = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64)


def _run(model, kind, speculative, sampling, prompts=PROMPTS):
    engine = Engine(model, CacheConfig(kind=kind), SCHEDULER, speculative=speculative)
    results = engine.generate(prompts, sampling)
    return results, engine.stats()


@pytest.mark.parametrize("kind", ["paged", "contiguous"])
def test_greedy_speculation_equals_plain_decoding(tiny, kind):
    sampling = SamplingParams(max_tokens=40, ignore_eos=True)
    plain, plain_stats = _run(tiny, kind, None, sampling)
    fast, stats = _run(tiny, kind, SpeculativeConfig(num_draft_tokens=4), sampling)
    assert [r.outputs[0].token_ids for r in fast] == [r.outputs[0].token_ids for r in plain]
    assert [r.outputs[0].text for r in fast] == [r.outputs[0].text for r in plain]
    assert stats.num_verify_steps > 0 and stats.num_accepted_tokens > 0
    assert stats.num_accepted_tokens <= stats.num_draft_tokens
    assert stats.num_generated_tokens == plain_stats.num_generated_tokens == 3 * 40
    assert stats.num_steps < plain_stats.num_steps
    assert stats.tokens_per_verification > 1.0
    assert stats.tokens_per_verification <= 5.0  # k = 4 drafts and one token of its own
    assert plain_stats.num_verify_steps == plain_stats.num_draft_tokens == 0


@pytest.mark.parametrize("kind", ["paged", "contiguous"])
def test_seeded_sampling_is_unchanged_by_speculation(tiny, kind):
    """Each token is drawn with the key plain decoding would use, so a seeded request gives
    the same tokens, log-probabilities and penalties either way."""
    sampling = SamplingParams(
        temperature=0.7,
        top_k=8,
        seed=11,
        max_tokens=24,
        ignore_eos=True,
        logprobs=2,
        repetition_penalty=1.1,
        frequency_penalty=0.2,
    )
    plain, _ = _run(tiny, kind, None, sampling)
    fast, stats = _run(tiny, kind, SpeculativeConfig(num_draft_tokens=3), sampling)
    for a, b in zip(fast, plain, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert x.token_id == y.token_id and x.top[0][0] == y.top[0][0]
            np.testing.assert_allclose(x.logprob, y.logprob, atol=1e-4)
    assert stats.num_verify_steps > 0


def test_stops_inside_accepted_drafts_end_the_output_there(tiny):
    """max_tokens and stop strings reached in the middle of a run of accepted drafts end the
    output exactly where plain decoding ends it."""
    plain_long, _ = _run(tiny, "paged", None, SamplingParams(max_tokens=30, ignore_eos=True))
    text = plain_long[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    for sampling in (
        SamplingParams(max_tokens=5, ignore_eos=True),
        SamplingParams(max_tokens=30, ignore_eos=True, stop=[stop] if stop.strip() else []),
    ):
        plain, _ = _run(tiny, "paged", None, sampling)
        fast, _ = _run(tiny, "paged", SpeculativeConfig(num_draft_tokens=4), sampling)
        for a, b in zip(fast, plain, strict=True):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            assert a.outputs[0].text == b.outputs[0].text
            assert a.outputs[0].finish_reason == b.outputs[0].finish_reason


@pytest.mark.parametrize("kind", ["paged", "contiguous"])
def test_draft_model_speculation_equals_plain_decoding(kind):
    target = Model.tiny(num_layers=2, seed=3)
    sampling = SamplingParams(max_tokens=20, ignore_eos=True)
    plain, _ = _run(target, kind, None, sampling)
    # The target as its own drafter: every draft is accepted.
    same, same_stats = _run(
        target, kind, SpeculativeConfig("draft", 3, draft_model=target), sampling
    )
    # A truncated copy: some drafts are rejected and rolled back in both caches.
    cut, cut_stats = _run(
        target, kind, SpeculativeConfig("draft", 3, draft_model=target.truncated(1)), sampling
    )
    expected = [r.outputs[0].token_ids for r in plain]
    assert [r.outputs[0].token_ids for r in same] == expected
    assert [r.outputs[0].token_ids for r in cut] == expected
    assert same_stats.num_accepted_tokens == same_stats.num_draft_tokens > 0
    assert 0 < cut_stats.num_accepted_tokens < cut_stats.num_draft_tokens


def test_hybrid_stacks_roll_back_their_recurrent_states():
    """A hybrid stack (attention, Mamba2, linear attention) verifies drafts on its contiguous
    cache: its recurrent layers keep per-token checkpoints and go back to the accepted prefix.
    Drafts from the stack itself are all accepted; from another stack, (almost) all rejected;
    the tokens are plain decoding's either way."""
    target = HybridModel.tiny()
    sampling = SamplingParams(max_tokens=16, ignore_eos=True)
    plain, _ = _run(target, "contiguous", None, sampling)
    expected = [r.outputs[0].token_ids for r in plain]
    for draft in (target, HybridModel.tiny(seed=1)):
        config = SpeculativeConfig("draft", 3, draft_model=draft)
        fast, stats = _run(target, "contiguous", config, sampling)
        assert [r.outputs[0].token_ids for r in fast] == expected
        assert stats.num_verify_steps > 0
    assert stats.num_accepted_tokens < stats.num_draft_tokens


def test_the_draft_model_follows_rollbacks():
    """After a rejection the draft row keeps only the shared prefix and recomputes the rest:
    its proposals equal a fresh drafter's on the same tokens."""
    model = Model.tiny(num_layers=1, seed=5)
    follower = DraftModelDrafter(model, 3, max_num_seqs=2, max_model_len=64)
    tokens = [3, 4, 5, 6, 7]
    first = follower.propose([DraftRequest("s", tokens, 3)])[0]
    # The target keeps one draft and picks its own token instead of the second.
    other = (first[1] + 1) % model.vocab_size
    tokens = tokens + [first[0], other]
    followed = follower.propose([DraftRequest("s", tokens, 3)])[0]
    fresh = DraftModelDrafter(model, 3, max_num_seqs=2, max_model_len=64)
    assert followed == fresh.propose([DraftRequest("s", tokens, 3)])[0]
    follower.release("s")
    assert follower.propose([DraftRequest("t", [1, 2], 0)]) == [[]]


def test_the_acceptance_rule_keeps_the_target_distribution():
    """On a five-token vocabulary: a draft is kept when the target's own draw (with its key)
    equals it, otherwise the draw is the output. The output frequencies match the target's
    probabilities whatever the draft (chi-square at the 0.1% level), and the draft is kept with
    probability p(draft)."""
    probs = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    rows = 4000
    logits = jnp.asarray(np.tile(np.log(probs), (rows, 1)), jnp.float32)
    knobs = {
        "temperature": jnp.ones(rows),
        "top_k": jnp.full(rows, 5, jnp.int32),
        "top_p": jnp.ones(rows),
        "min_p": jnp.zeros(rows),
        "repetition": jnp.ones(rows),
        "presence": jnp.zeros(rows),
        "frequency": jnp.zeros(rows),
        "seed": jnp.arange(rows, dtype=jnp.int32),
        "choice": jnp.zeros(rows, jnp.int32),
        "counter": jnp.zeros(rows, jnp.int32),
    }
    drawn, _ = sample_rows(
        logits, knobs, None, penalties=False, num_logprobs=None, any_sampled=True
    )
    drawn = np.asarray(drawn)
    for draft in (0, 3):
        kept = drawn == draft
        output = np.where(kept, draft, drawn)
        counts = np.bincount(output, minlength=5)
        expected = probs * rows
        chi_square = float((((counts - expected) ** 2) / expected).sum())
        assert chi_square < 18.47, (counts, expected)  # 4 degrees of freedom, p = 0.001
        assert abs(kept.mean() - probs[draft]) < 4 * np.sqrt(probs[draft] / rows)


def test_speculation_is_refused_where_it_cannot_run(tiny):
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Engine(
            tiny,
            CacheConfig(kind="paged"),
            SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32),
            speculative=SpeculativeConfig(num_draft_tokens=4),
        )
    with pytest.raises(TypeError, match="SpeculativeConfig"):
        Engine(tiny, speculative={"method": "ngram"})
    with pytest.raises(ValueError, match="vocab_size"):
        Engine(tiny, speculative=SpeculativeConfig("draft", draft_model=_OtherVocab()))


class _OtherVocab:
    vocab_size = 7


def test_warmup_compiles_the_verification_steps(tiny):
    engine = Engine(tiny, CacheConfig(kind="paged"), SCHEDULER, speculative=SpeculativeConfig())
    engine.warmup()
    compiled = engine.stats().num_compiled_shapes
    assert any(shape[2] == 5 for shape in engine.backend.shapes())
    engine.generate(PROMPTS[:2], SamplingParams(max_tokens=12, ignore_eos=True))
    stats = engine.stats()
    assert stats.num_verify_steps > 0
    assert stats.num_compiled_shapes == compiled  # nothing compiled once tokens flowed


# -- the bundled model ------------------------------------------------------------------------

REWRITE = (
    "Repeat the following sentence exactly, word for word: The quick brown fox jumps over "
    "the lazy dog while the cat sleeps on the warm mat by the door."
)


@pytest.mark.parametrize("cache", ["contiguous", "paged"])
def test_real_model_greedy_speculation_equals_plain_greedy(cli_model, cache):
    prompt = cli_model.tokenizer.encode_chat([{"role": "user", "content": REWRITE}])
    plain = generate(cli_model, [prompt], max_new_tokens=32, cache=cache, warmup=False)
    fast = generate(
        cli_model,
        [prompt],
        max_new_tokens=32,
        cache=cache,
        warmup=False,
        speculative=SpeculativeConfig(num_draft_tokens=4),
    )
    assert fast.generations[0].token_ids == plain.generations[0].token_ids
    stats = fast.engine_stats
    assert stats.num_accepted_tokens > 8  # the answer copies the sentence
    assert fast.decode_steps < plain.decode_steps


def test_cli_generate_speculative(capsys, cached_model):
    argv = ["generate", "--raw", "one two three one two three one two", "--max-new-tokens", "8"]
    assert cli.main(argv) == 0
    plain = capsys.readouterr().out
    assert cli.main([*argv, "--speculative", "ngram", "--num-draft", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain
    assert any("speculative ngram" in line for line in captured.err.splitlines())


def test_cli_generate_speculative_usage_errors(capsys, no_loading):
    assert cli.main(["generate", "hi", "--speculative", "draft"]) == 2
    assert "expects --draft-model" in capsys.readouterr().err
    assert cli.main(["generate", "hi", "--draft-model", "x.gguf"]) == 2
    assert "expected --speculative draft" in capsys.readouterr().err
    assert cli.main(["generate", "hi", "--num-draft", "0"]) == 2
    assert "--num-draft" in capsys.readouterr().err


def test_counters_add_up(tiny):
    _, stats = _run(
        tiny,
        "paged",
        SpeculativeConfig(num_draft_tokens=2),
        SamplingParams(max_tokens=16, ignore_eos=True),
    )
    counts = collections.Counter(
        {
            "generated": stats.num_generated_tokens,
            "accepted": stats.num_accepted_tokens,
            "verified": stats.num_verified_sequences,
        }
    )
    # Every verification emits its accepted drafts plus one token of the model's own.
    assert counts["accepted"] + counts["verified"] <= counts["generated"]
    assert stats.draft_acceptance_rate == pytest.approx(
        stats.num_accepted_tokens / stats.num_draft_tokens
    )
