"""Perplexity of a text under a model: the sliding-window evaluation of Hugging Face's perplexity
guide, run through a KV cache whose storage uses a chosen codec, so codecs can be compared.

Windows of ``window`` tokens start every ``stride`` tokens; each window scores only the tokens no
earlier window scored, with the tokens before them in the window as context. The last window is
padded at the end to the common shape (one compiled shape for the whole text); attention is
causal, so the padding changes none of the scored tokens, and it is masked out of the score::

    text (N = 9):   t0 t1 t2 t3 t4 t5 t6 t7 t8         window = 6, stride = 2
    window 0:       t0 t1 t2 t3 t4 t5                  scores t1 .. t5
    window 1:             t2 t3 t4 t5 t6 t7            scores t6 t7   (t2 .. t5 context)
    window 2:                   t4 t5 t6 t7 t8 pad     scores t8      (t4 .. t7 context)

Token ``t0`` has no context and is never scored, so a text of ``N`` tokens scores ``N - 1``
(fewer with ``stride == window``: each window's first token then has no context either).

Each window is a fresh forward from position 0 through the model's contiguous cache of the
window's length; the negative log-likelihoods are computed inside the jitted function, so the logits
``[window - 1, vocab]`` stay on the device and only ``[window - 1]`` float32 values come back.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv import _validation as v
from jaxkv.engine.model import Gemma3Model, Model
from jaxkv.engine.step import compiled_forward
from jaxkv.quantization import CODECS

DEFAULT_WINDOW = 1024
"""Tokens per window unless told (or the model's context, if that is shorter)."""

ProgressCallback = Callable[[int, int], None]
"""``on_progress(done, total)``: windows scored so far, of ``total``."""

_OWNER = "perplexity"


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """What ``perplexity`` measured.

    Attributes:
        perplexity: ``exp(mean_nll)``.
        mean_nll: mean negative log-likelihood (natural log) of the scored tokens.
        token_nll: float32 ``[num_scored_tokens]``: the NLL of each scored token, in text order.
        num_tokens: tokens of the text.
        num_scored_tokens: tokens scored (``num_tokens - 1`` unless ``stride == window``).
        num_windows: windows run.
        window: tokens per window (the requested one, or the text's length if shorter).
        stride: tokens between the starts of consecutive windows.
        kv_quantization: the KV cache's storage codec.
        seconds: time of the windows' forwards (compilation excluded).
        compile_seconds: time spent compiling (0.0 when an earlier call had compiled the shape).
    """

    perplexity: float
    mean_nll: float
    token_nll: np.ndarray
    num_tokens: int
    num_scored_tokens: int
    num_windows: int
    window: int
    stride: int
    kv_quantization: str
    seconds: float
    compile_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Scored tokens per second of forward time."""
        return self.num_scored_tokens / self.seconds if self.seconds > 0 else math.inf

    def summary(self) -> str:
        """One line, e.g. ``perplexity 27.105 over 3,210 tokens (7 windows of 1,024, stride
        512; kv none) in 12.3 s``."""
        if self.num_windows == 1:
            windows = f"1 window of {self.window:,}"
        else:
            windows = f"{self.num_windows:,} windows of {self.window:,}, stride {self.stride:,}"
        return (
            f"perplexity {self.perplexity:.3f} over {self.num_tokens:,} tokens "
            f"({windows}; kv {self.kv_quantization}) in {self.seconds:.1f} s"
        )


@functools.cache
def _window_nll(model_forward: Callable[..., Any]) -> Any:
    """The jitted NLL of one window for a model's whole-sequence forward (one per class)."""
    return jax.jit(functools.partial(_nll, model_forward), static_argnames="config")


def _nll(model_forward, params, cache, tokens, scored, *, config):
    """NLL of each next token of one window.

    Args:
        tokens: int32 ``[window]``: the window (padded at the end).
        scored: bool ``[window - 1]``: whether the prediction of ``tokens[i + 1]`` counts.

    Returns:
        float32 ``[window - 1]``: ``-log p(tokens[i + 1] | tokens[: i + 1])``, 0 where not scored.
    """
    logits, _ = model_forward(params, config, tokens[None, :-1], cache)  # [1, window - 1, V]
    logits = logits[0]
    targets = tokens[1:, None]
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets, axis=-1)[:, 0]
    return jnp.where(scored, nll, 0.0)


def plan_windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows over a text of ``num_tokens`` tokens, as ``(begin, end, first)``: the window
    is tokens ``[begin, end)`` and scores tokens ``[first, end)``, those no earlier window scored
    (``first > begin``: a window's first token is context only).

    Windows begin at ``0, stride, 2 * stride, ...`` up to the first one that reaches the end of
    the text; inputs are trusted (``perplexity`` validates them).
    """
    plan = []
    begin, scored_until = 0, 1  # token 0 is never scored
    while True:
        end = min(begin + window, num_tokens)
        plan.append((begin, end, max(scored_until, begin + 1)))
        if end == num_tokens:
            return plan
        begin, scored_until = begin + stride, end


def perplexity(
    model: Model,
    text_or_ids: str | Sequence[int] | np.ndarray,
    *,
    window: int | None = None,
    stride: int | None = None,
    kv_quantization: str = "none",
    kv_dtype: Any = None,
    on_progress: ProgressCallback | None = None,
) -> PerplexityResult:
    """Perplexity of a text under ``model``, by sliding windows (see the module docstring).

    Args:
        model: a ``Model`` or ``Gemma3Model`` (from ``Model.load``, or ``Model.tiny``).
        text_or_ids: the text, tokenized as plain text (special-token text stays text) with a
            BOS token first when the checkpoint's tokenizer adds one (``add_bos``); or its
            token ids, ``[num_tokens]`` ints in ``[0, vocab_size)``, used as given.
        window: tokens per window, in ``[2, model.context_length]``; default ``min(1024,
            model.context_length)``. A text shorter than the window is one window of its
            length.
        stride: tokens between window starts, in ``[1, window]``; default ``window // 2``.
            ``stride == window`` makes disjoint windows.
        kv_quantization: storage codec of the KV cache, one of ``jaxkv.quantization.CODECS``.
        kv_dtype: float dtype of the cache's keys and values (with a codec, the dtype they are
            read back as); default the model's dtype.
        on_progress: called as ``on_progress(done, total)`` with the windows scored so far:
            once with ``done = 0`` after compiling, then after each window.

    Returns:
        A ``PerplexityResult``.

    Raises:
        TypeError: ``model`` is not a ``Model`` or ``Gemma3Model``, ``text_or_ids`` is
            neither text nor a sequence of ints, or an argument has the wrong type.
        ValueError: the text is empty or has fewer than 2 tokens, an id is out of range,
            ``window``/``stride`` out of range, or ``kv_quantization``/``kv_dtype`` unknown.
    """
    if not isinstance(model, Model | Gemma3Model):
        raise TypeError(
            f"{_OWNER}: model must be a jaxkv.engine.Model or Gemma3Model (a loaded "
            f"checkpoint), got {type(model).__name__}"
        )
    context = model.context_length
    if window is None:
        window = min(DEFAULT_WINDOW, context)
    window = v.require_int(_OWNER, "window", window, minimum=2)
    if window > context:
        raise ValueError(
            f"{_OWNER}: window must be <= the model's context of {context} tokens, got {window}"
        )
    stride = window // 2 if stride is None else stride
    stride = v.require_int(_OWNER, "stride", stride, minimum=1)
    if stride > window:
        raise ValueError(f"{_OWNER}: stride must be <= window={window}, got {stride}")
    v.require_choice(_OWNER, "kv_quantization", kv_quantization, CODECS)
    kv_dtype = (
        model.dtype if kv_dtype is None else v.require_float_dtype(_OWNER, "kv_dtype", kv_dtype)
    )
    if on_progress is not None and not callable(on_progress):
        raise TypeError(f"{_OWNER}: on_progress must be callable or None, got {on_progress!r:.80}")
    ids = _token_ids(model, text_or_ids)

    num_tokens = len(ids)
    shape = min(window, num_tokens)  # every window is padded to this many tokens
    # Never donated: every window starts from this same empty cache.
    cache = model.contiguous_cache(1, shape - 1, kv_quantization, dtype=kv_dtype)
    compiled, compile_seconds = compiled_forward(
        model.config,
        model.params,
        cache,
        np.zeros(shape, np.int32),
        np.zeros(shape - 1, bool),
        step=_window_nll(model.forward_function),
    )

    plan = plan_windows(num_tokens, window, stride)
    if on_progress is not None:
        on_progress(0, len(plan))
    pieces = []
    begin_time = time.perf_counter()
    for index, (begin, end, first) in enumerate(plan):
        tokens = np.zeros(shape, np.int32)  # [shape]: the window, padded at the end
        tokens[: end - begin] = ids[begin:end]
        scored = np.zeros(shape - 1, bool)  # [shape - 1]: which next-token predictions count
        scored[first - begin - 1 : end - begin - 1] = True
        nll = np.asarray(compiled(model.params, cache, tokens, scored))
        pieces.append(nll[first - begin - 1 : end - begin - 1])
        if on_progress is not None:
            on_progress(index + 1, len(plan))
    seconds = time.perf_counter() - begin_time

    token_nll = np.concatenate(pieces)
    mean_nll = float(np.mean(token_nll, dtype=np.float64))
    return PerplexityResult(
        perplexity=math.exp(mean_nll),
        mean_nll=mean_nll,
        token_nll=token_nll,
        num_tokens=num_tokens,
        num_scored_tokens=len(token_nll),
        num_windows=len(plan),
        window=shape,
        stride=stride,
        kv_quantization=kv_quantization,
        seconds=seconds,
        compile_seconds=compile_seconds,
    )


def _token_ids(model: Model, text_or_ids: Any) -> np.ndarray:
    """``text_or_ids`` as int32 ``[num_tokens]`` ids, checked: at least 2, each in range."""
    if isinstance(text_or_ids, str):
        if not text_or_ids:
            raise ValueError(f"{_OWNER}: text must be non-empty, got ''")
        tokenizer = model.tokenizer
        ids = tokenizer.encode_text(text_or_ids)
        if tokenizer.add_bos and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id, *ids]
        what = "text"
    else:
        if isinstance(text_or_ids, bytes | bytearray):
            raise TypeError(f"{_OWNER}: text_or_ids must be str or ids, got bytes (decode them)")
        try:
            array = np.asarray(text_or_ids)
        except (TypeError, ValueError):
            array = None
        if (
            array is None
            or array.ndim != 1
            or not (np.issubdtype(array.dtype, np.integer) or array.size == 0)
        ):
            raise TypeError(
                f"{_OWNER}: text_or_ids must be a str or a 1-D sequence of ints, got "
                f"{type(text_or_ids).__name__} {text_or_ids!r:.80}"
            )
        ids = array.astype(np.int64)
        vocab = model.vocab_size
        bad = np.flatnonzero((ids < 0) | (ids >= vocab))
        if bad.size:
            raise ValueError(
                f"{_OWNER}: token ids must be in [0, {vocab}), got {int(ids[bad[0]])} at index "
                f"{int(bad[0])}"
            )
        what = "ids"
    if len(ids) < 2:
        raise ValueError(
            f"{_OWNER}: {what} must have at least 2 tokens (the first is context only), got "
            f"{len(ids)}"
        )
    return np.asarray(ids, np.int32)
