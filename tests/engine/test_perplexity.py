"""``jaxkv.engine.perplexity``: the bundled model against Hugging Face's perplexity of
tests/data/perplexity_text.txt, sliding windows and the padded last window against a brute-force
evaluation written out below (HF's perplexity guide, with a dense uncached forward per window),
the int8 codec, the window plan's bookkeeping, and the argument checks.

The bundled model is loaded once for the module; the sliding-window cases run ``Model.tiny()``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxkv.engine import Model, PerplexityResult, perplexity
from jaxkv.engine.perplexity import plan_windows
from jaxkv.models.llama import forward_uncached

DATA = pathlib.Path(__file__).parents[1] / "data"
REFERENCE = json.loads((DATA / "reference.json").read_text())["perplexity"]
TEXT = (DATA / REFERENCE["file"]).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def model() -> Model:
    return Model.load()


@pytest.fixture(scope="module")
def baseline(model) -> PerplexityResult:
    """The whole text in one window (the default window of 1024 holds its 613 tokens)."""
    return perplexity(model, TEXT)


@pytest.fixture(scope="module")
def tiny() -> Model:
    return Model.tiny()


@pytest.fixture(scope="module")
def tiny_ids(tiny) -> list[int]:
    return tiny.tokenizer.encode_text(TEXT)[:200]


_dense_logits = jax.jit(forward_uncached, static_argnums=1)


def brute_force_nll(model: Model, ids: list[int], window: int, stride: int) -> np.ndarray:
    """HF's perplexity guide written out: windows ``ids[begin : begin + window]`` for ``begin``
    in ``0, stride, ...`` until one reaches the end; each one's logits come from a dense forward
    of that window alone (no cache, no padding) and it scores its last ``end - prev_end``
    labels, shifted by one (a window's first token is never a target)."""
    nll = []
    prev_end = 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        target_len = end - prev_end
        chunk = np.asarray(ids[begin:end], np.int32)
        logits = np.asarray(_dense_logits(model.params, model.config, chunk[None]))[0]
        logits = logits.astype(np.float64)
        peak = logits.max(-1, keepdims=True)
        log_probs = logits - peak - np.log(np.exp(logits - peak).sum(-1, keepdims=True))
        for i in range(max(len(chunk) - target_len, 1), len(chunk)):
            nll.append(-log_probs[i - 1, chunk[i]])
        prev_end = end
        if end == len(ids):
            break
    return np.asarray(nll)


# -- the bundled model against the HF reference ------------------------------------------------


def test_one_window_matches_the_hf_reference(baseline):
    assert baseline.num_windows == 1
    assert baseline.num_tokens == REFERENCE["num_tokens"]
    assert baseline.num_scored_tokens == REFERENCE["num_scored_tokens"]
    assert abs(baseline.perplexity / REFERENCE["perplexity"] - 1) < 1e-3
    assert baseline.mean_nll == pytest.approx(REFERENCE["mean_nll"], abs=1e-3)
    hf_nll = np.load(DATA / "reference.npz")["perplexity/nll"]
    np.testing.assert_allclose(baseline.token_nll, hf_nll, atol=1e-3, rtol=0)


def test_text_is_tokenized_like_the_reference(model, baseline):
    """Plain text, no BOS (SmolLM2's tokenizer adds none): the same ids as the reference."""
    by_ids = perplexity(model, REFERENCE["ids"])
    assert by_ids.perplexity == baseline.perplexity
    assert by_ids.compile_seconds == 0.0  # the same shape as the text's


def test_int8_cache_changes_perplexity_by_less_than_1_percent(model, baseline):
    int8 = perplexity(model, TEXT, kv_quantization="int8")
    assert int8.kv_quantization == "int8"
    assert int8.perplexity != baseline.perplexity  # the codec was applied
    assert abs(int8.perplexity / baseline.perplexity - 1) < 0.01


# -- sliding windows and padding (tiny model) --------------------------------------------------


def test_sliding_windows_match_the_brute_force(tiny, tiny_ids):
    full = perplexity(tiny, tiny_ids)
    sliding = perplexity(tiny, tiny_ids, window=64, stride=32)
    assert (sliding.num_windows, sliding.window, sliding.stride) == (6, 64, 32)
    assert sliding.num_scored_tokens == full.num_scored_tokens == len(tiny_ids) - 1
    np.testing.assert_allclose(
        sliding.token_nll, brute_force_nll(tiny, tiny_ids, 64, 32), atol=1e-3, rtol=1e-5
    )
    # Less context: close to the one-window value, not equal to it.
    assert sliding.mean_nll != full.mean_nll
    assert abs(sliding.mean_nll / full.mean_nll - 1) < 0.05


def test_padded_last_window_matches_the_unpadded_brute_force(tiny, tiny_ids):
    window, stride = 64, 24
    begin, end, _ = plan_windows(len(tiny_ids), window, stride)[-1]
    assert end - begin < window and len(tiny_ids) % stride != 0  # the last window is padded
    result = perplexity(tiny, tiny_ids, window=window, stride=stride)
    want = brute_force_nll(tiny, tiny_ids, window, stride)
    np.testing.assert_allclose(result.token_nll, want, atol=1e-3, rtol=1e-5)
    assert result.mean_nll == pytest.approx(float(want.mean()), rel=1e-5)


def test_disjoint_windows_skip_each_window_first_token(tiny, tiny_ids):
    result = perplexity(tiny, tiny_ids, window=64, stride=64)
    assert result.num_windows == 4
    assert result.num_scored_tokens == len(tiny_ids) - 4
    np.testing.assert_allclose(
        result.token_nll, brute_force_nll(tiny, tiny_ids, 64, 64), atol=1e-3, rtol=1e-5
    )


def test_progress_and_result_fields(tiny, tiny_ids):
    calls = []
    result = perplexity(
        tiny, tiny_ids, window=64, stride=32, on_progress=lambda *c: calls.append(c)
    )
    assert calls == [(i, 6) for i in range(7)]
    assert result.seconds > 0 and result.tokens_per_second > 0
    assert result.perplexity == pytest.approx(np.exp(result.mean_nll))
    assert result.summary().startswith(
        f"perplexity {result.perplexity:.3f} over 200 tokens (6 windows of 64, stride 32; kv none)"
    )


def test_bos_is_prepended_when_the_checkpoint_says_so(tiny):
    tokenizer = copy.copy(tiny.tokenizer)
    tokenizer.add_bos = True
    with_bos = dataclasses.replace(tiny, tokenizer=tokenizer)
    text = TEXT[:400] + " <|im_start|>"  # special-token text stays text
    plain = tiny.tokenizer.encode_text(text)
    result = perplexity(with_bos, text, window=64)
    assert result.num_tokens == len(plain) + 1
    reference = perplexity(tiny, [tokenizer.bos_token_id, *plain], window=64)
    np.testing.assert_array_equal(result.token_nll, reference.token_nll)


@given(num_tokens=st.integers(2, 300), window=st.integers(2, 80), stride_fraction=st.floats(0, 1))
def test_window_plan_scores_every_token_once(num_tokens, window, stride_fraction):
    stride = max(1, round(stride_fraction * window))
    plan = plan_windows(num_tokens, window, stride)
    scored = [t for _, end, first in plan for t in range(first, end)]
    assert plan[0][0] == 0 and plan[-1][1] == num_tokens
    assert all(0 < end - begin <= window and begin < first for begin, end, first in plan)
    begins = [begin for begin, _, _ in plan]
    assert begins == list(range(0, stride * len(plan), stride))
    if stride < window:
        assert scored == list(range(1, num_tokens))  # each once, in order
    else:  # disjoint windows: each one's first token has no context
        assert scored == [t for t in range(1, num_tokens) if t % window != 0]


# -- argument checks ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(window=st.integers(-5, 100), stride=st.integers(-5, 120))
def test_bad_window_and_stride_combinations_are_refused(tiny, window, stride):
    if window >= 2 and 1 <= stride <= window:
        return  # a valid combination (run by the tests above)
    name = "window" if window < 2 else "stride"
    with pytest.raises(ValueError, match=f"perplexity: {name} must be ") as error:
        perplexity(tiny, "some text", window=window, stride=stride)
    assert f"got {stride if name == 'stride' else window}" in str(error.value)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"text_or_ids": ""}, ValueError, "text must be non-empty, got ''"),
        ({"text_or_ids": "a"}, ValueError, "text must have at least 2 tokens"),
        ({"text_or_ids": [5]}, ValueError, "ids must have at least 2 tokens"),
        ({"text_or_ids": [1, 49152]}, ValueError, r"in \[0, 49152\), got 49152 at index 1"),
        ({"text_or_ids": [1, -1]}, ValueError, r"in \[0, 49152\), got -1 at index 1"),
        ({"text_or_ids": [1.0, 2.0]}, TypeError, "a str or a 1-D sequence of ints"),
        ({"text_or_ids": [[1, 2]]}, TypeError, "a str or a 1-D sequence of ints"),
        ({"text_or_ids": b"text"}, TypeError, "got bytes"),
        ({"window": 4096}, ValueError, "window must be <= the model's context of 2048"),
        ({"window": 2.5}, TypeError, "window must be an int"),
        ({"kv_quantization": "int9"}, ValueError, "kv_quantization must be one of"),
        ({"kv_dtype": "int8"}, ValueError, "kv_dtype must be one of"),
        ({"on_progress": 3}, TypeError, "on_progress must be callable"),
    ],
)
def test_argument_errors_name_the_argument(tiny, kwargs, error, message):
    kwargs = {"text_or_ids": "some text", **kwargs}
    with pytest.raises(error, match=message):
        perplexity(tiny, **kwargs)


def test_model_must_be_a_llama_model():
    with pytest.raises(TypeError, match="model must be a jaxkv.engine.Model"):
        perplexity(object(), "some text")
