"""How each request picks its next tokens (``SamplingParams``) and the single-batch ``sample``
helper. The batched device sampler the engine runs is ``jaxkv.engine.sampler``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp

from jaxkv import _validation as v

MAX_LOGPROBS = 20
"""Most alternatives ``SamplingParams.logprobs`` may ask for per token (OpenAI's bound)."""

MAX_N = 16
"""Most choices one request may ask for."""


def _number(owner: str, name: str, value: object, low: float, high: float, *, open_low=False):
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TypeError(f"{owner}: {name} must be a finite number, got {value!r}")
    below = value <= low if open_low else value < low
    if below or value > high:
        bound = "(" if open_low else "["
        raise ValueError(f"{owner}: {name} must lie in {bound}{low}, {high}], got {value!r}")


def _strings(owner: str, name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise TypeError(f"{owner}: {name} must be a list of non-empty strings, got {value!r}")
    items = tuple(value)
    if any(not isinstance(s, str) or not s for s in items):
        raise ValueError(f"{owner}: {name} must be a list of non-empty strings, got {items!r}")
    return items


def _token_ids(owner: str, name: str, value: object) -> tuple[int, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(f"{owner}: {name} must be a list of token ids, got {value!r}")
    items = tuple(value)
    for index, item in enumerate(items):
        v.require_int(owner, f"{name}[{index}]", item, minimum=0)
    return tuple(int(i) for i in items)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    The filters apply in this order: penalties, temperature, then top-k, top-p and min-p
    (each on the distribution after temperature), then a draw; ``temperature=0`` is greedy
    (penalties still apply).

    Attributes:
        temperature: 0 for greedy decoding, else logits are divided by it before sampling.
        top_k: keep only the ``top_k`` most likely tokens (``None``: all).
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``
            (nucleus sampling; 1.0: all).
        seed: PRNG seed. A seeded request draws the same tokens whatever else runs beside it;
            ``None`` takes a fresh seed from the engine.
        min_p: drop tokens whose probability is below ``min_p`` times the most likely one's.
        repetition_penalty: > 1 discourages every token already in the prompt or the output
            (positive logits divided by it, negative ones multiplied); 1.0: off.
        presence_penalty: subtracted from the logit of every token the output already holds.
        frequency_penalty: subtracted once per occurrence of a token in the output.
        max_tokens: most tokens generated per choice.
        stop: strings that end a choice (excluded from its text).
        stop_token_ids: token ids that end a choice besides the model's EOS ids.
        ignore_eos: keep generating past EOS (benchmarks use this for fixed lengths).
        logprobs: ``None``, or report each generated token's log-probability plus this many
            most likely alternatives (``0 <= logprobs <= MAX_LOGPROBS``). Log-probabilities are
            those of the model's raw distribution, before penalties and temperature.
        n: choices generated from one prompt; they share the prompt's KV pages.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1

    def __post_init__(self) -> None:
        owner = "SamplingParams"
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, int | float):
            raise TypeError(f"{owner}: temperature must be a number, got {self.temperature!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"{owner}: temperature must be >= 0, got {self.temperature}")
        v.require_optional_int(owner, "top_k", self.top_k, minimum=1)
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, int | float):
            raise ValueError(f"{owner}: top_p must lie in (0, 1], got {self.top_p!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{owner}: top_p must lie in (0, 1], got {self.top_p!r}")
        if self.seed is not None:
            v.require_int(owner, "seed", self.seed)
        _number(owner, "min_p", self.min_p, 0.0, 1.0)
        _number(owner, "repetition_penalty", self.repetition_penalty, 0.0, 100.0, open_low=True)
        _number(owner, "presence_penalty", self.presence_penalty, -2.0, 2.0)
        _number(owner, "frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        v.require_int(owner, "max_tokens", self.max_tokens, minimum=1)
        object.__setattr__(self, "stop", _strings(owner, "stop", self.stop))
        object.__setattr__(
            self, "stop_token_ids", _token_ids(owner, "stop_token_ids", self.stop_token_ids)
        )
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"{owner}: ignore_eos must be a bool, got {self.ignore_eos!r}")
        v.require_optional_int(owner, "logprobs", self.logprobs, minimum=0, maximum=MAX_LOGPROBS)
        v.require_int(owner, "n", self.n, minimum=1, maximum=MAX_N)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


def sample(logits: jax.Array, key: jax.Array, params: SamplingParams) -> jax.Array:
    """Pick one token per row of ``logits: [batch, vocab]`` with one setting for every row
    (``key``: a PRNG key, unused when greedy) -> ``[batch]`` int32.

    Penalties need the rows' histories, which only the engine has: here they are ignored.
    """
    from jaxkv.engine.sampler import filtered_sample

    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    batch, vocab = logits.shape
    top_k = vocab if params.top_k is None else min(params.top_k, vocab)
    keys = jax.random.split(key, batch)
    return filtered_sample(
        logits,
        keys,
        jnp.full((batch,), params.temperature, jnp.float32),
        jnp.full((batch,), top_k, jnp.int32),
        jnp.full((batch,), params.top_p, jnp.float32),
        jnp.full((batch,), params.min_p, jnp.float32),
    )


def sample_dynamic(
    logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
    """Temperature / top-k / top-p sampling with one setting (traced scalars) for every row:
    ``logits: [batch, vocab]`` -> ``[batch]`` int32; ``top_k`` counts tokens (vocab = off)."""
    from jaxkv.engine.sampler import filtered_sample

    batch = logits.shape[0]
    keys = jax.random.split(key, batch)

    def rows(x, dtype):
        return jnp.broadcast_to(jnp.asarray(x, dtype), (batch,))

    return filtered_sample(
        logits,
        keys,
        rows(temperature, jnp.float32),
        rows(top_k, jnp.int32),
        rows(top_p, jnp.float32),
        jnp.zeros((batch,), jnp.float32),
    )
