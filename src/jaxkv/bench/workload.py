"""Seeded serving workloads: which prompts arrive when, and how many tokens each must produce.

A workload is plain data (token ids, lengths, arrival offsets) so that every backend — the
in-process engine, a server over HTTP, HF transformers in another interpreter — runs exactly
the same requests. The same ``WorkloadSpec`` and vocabulary always give the same workload.

Layout of one prompt (``shared_prefix`` tokens, identical in every request, then a unique
part whose length is drawn from ``prompt_len``)::

    | shared prefix (P tokens) | random tokens (L ~ U[prompt_len]) |   -> P + L tokens
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

SCHEMA = "jaxkv.bench.workload/1"


def _check_range(name: str, value: Any, minimum: int) -> tuple[int, int]:
    if (
        not isinstance(value, tuple | list)
        or len(value) != 2
        or any(isinstance(x, bool) or not isinstance(x, int | np.integer) for x in value)
    ):
        raise TypeError(f"WorkloadSpec: {name} must be a (min, max) pair of ints, got {value!r}")
    low, high = int(value[0]), int(value[1])
    if low < minimum or high < low:
        raise ValueError(
            f"WorkloadSpec: {name} must satisfy {minimum} <= min <= max, got ({low}, {high})"
        )
    return low, high


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    """What to draw.

    Attributes:
        num_requests: how many requests.
        prompt_len: ``(min, max)`` length of each prompt's unique part, uniform, inclusive.
        output_len: ``(min, max)`` tokens each request must generate, uniform, inclusive
            (requests run with ``ignore_eos``, so each produces exactly its length).
        shared_prefix: tokens of one random prefix put before every prompt (0: none).
        request_rate: mean arrivals per second of a Poisson process; ``inf``: all at time 0.
        seed: seeds the lengths, the tokens and the arrivals (independent streams, so changing
            the rate keeps the same prompts).
    """

    num_requests: int = 64
    prompt_len: tuple[int, int] = (32, 1024)
    output_len: tuple[int, int] = (16, 256)
    shared_prefix: int = 0
    request_rate: float = math.inf
    seed: int = 0

    def __post_init__(self) -> None:
        owner = "WorkloadSpec"
        for name, minimum in (("num_requests", 1), ("shared_prefix", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise TypeError(f"{owner}: {name} must be an int, got {value!r}")
            if value < minimum:
                raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")
        object.__setattr__(self, "prompt_len", _check_range("prompt_len", self.prompt_len, 0))
        object.__setattr__(self, "output_len", _check_range("output_len", self.output_len, 1))
        if self.shared_prefix + self.prompt_len[0] < 1:
            raise ValueError(f"{owner}: prompts would be empty (shared_prefix 0, prompt_len min 0)")
        rate = self.request_rate
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0:
            raise ValueError(f"{owner}: request_rate must be a number > 0 or inf, got {rate!r}")

    @property
    def max_sequence_len(self) -> int:
        """Longest prompt + output any request of this spec can have."""
        return self.shared_prefix + self.prompt_len[1] + self.output_len[1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_requests": self.num_requests,
            "prompt_len": list(self.prompt_len),
            "output_len": list(self.output_len),
            "shared_prefix": self.shared_prefix,
            # JSON has no infinity: null stands for "all at once".
            "request_rate": None if math.isinf(self.request_rate) else self.request_rate,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkloadSpec:
        rate = data.get("request_rate")
        return cls(
            num_requests=data["num_requests"],
            prompt_len=tuple(data["prompt_len"]),
            output_len=tuple(data["output_len"]),
            shared_prefix=data["shared_prefix"],
            request_rate=math.inf if rate is None else rate,
            seed=data["seed"],
        )


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    """One request of a workload.

    Attributes:
        index: position in the workload (``0 .. num_requests - 1``), in arrival order.
        prompt_token_ids: the whole prompt (shared prefix included).
        output_len: tokens it must generate.
        arrival: seconds after the start of the run at which it arrives.
    """

    index: int
    prompt_token_ids: tuple[int, ...]
    output_len: int
    arrival: float

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclasses.dataclass(frozen=True)
class Workload:
    """A spec and the requests drawn from it, in arrival order (``spec`` is ``None`` for a
    hand-built workload)."""

    requests: tuple[BenchRequest, ...]
    spec: WorkloadSpec | None = None

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(r.prompt_len for r in self.requests)

    @property
    def num_output_tokens(self) -> int:
        return sum(r.output_len for r in self.requests)

    @classmethod
    def from_prompts(
        cls,
        prompts: Sequence[Sequence[int]],
        output_lens: Sequence[int],
        arrivals: Sequence[float] | None = None,
    ) -> Workload:
        """A workload of the given prompts (token ids), output lengths and arrival offsets
        (default: all at 0)."""
        if len(prompts) != len(output_lens):
            raise ValueError(
                f"Workload.from_prompts: {len(prompts)} prompts but {len(output_lens)} output "
                "lengths"
            )
        arrivals = [0.0] * len(prompts) if arrivals is None else list(arrivals)
        if len(arrivals) != len(prompts) or sorted(arrivals) != arrivals:
            raise ValueError("Workload.from_prompts: arrivals must be one per prompt, increasing")
        requests = tuple(
            BenchRequest(i, tuple(int(t) for t in p), int(n), float(a))
            for i, (p, n, a) in enumerate(zip(prompts, output_lens, arrivals, strict=True))
        )
        if any(not r.prompt_token_ids or r.output_len < 1 for r in requests):
            raise ValueError("Workload.from_prompts: prompts must be non-empty, outputs >= 1")
        return cls(requests)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (what the HF worker reads)."""
        return {
            "schema": SCHEMA,
            "spec": None if self.spec is None else self.spec.to_dict(),
            "requests": [
                {
                    "index": r.index,
                    "prompt_token_ids": list(r.prompt_token_ids),
                    "output_len": r.output_len,
                    "arrival": r.arrival,
                }
                for r in self.requests
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Workload:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"Workload.from_dict: expected schema {SCHEMA!r}, got {data!r:.80}")
        spec = None if data["spec"] is None else WorkloadSpec.from_dict(data["spec"])
        requests = tuple(
            BenchRequest(r["index"], tuple(r["prompt_token_ids"]), r["output_len"], r["arrival"])
            for r in data["requests"]
        )
        return cls(requests, spec)


def sampleable_token_ids(vocab_size: int, special_token_ids: Iterable[int] = ()) -> np.ndarray:
    """The ids prompts are drawn from: ``0 .. vocab_size - 1`` without the special ones.

    Returns:
        int64 ``[num_ids]``, increasing.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"sampleable_token_ids: vocab_size must be an int >= 1, got {vocab_size}")
    keep = np.ones(vocab_size, bool)
    special = np.fromiter((i for i in special_token_ids if 0 <= i < vocab_size), np.int64)
    keep[special] = False
    ids = np.flatnonzero(keep)
    if ids.size == 0:
        raise ValueError("sampleable_token_ids: every id of the vocabulary is special")
    return ids


def tokenizer_token_ids(tokenizer: Any) -> np.ndarray:
    """``sampleable_token_ids`` of a jaxkv ``Tokenizer``: no control or user-defined token, no
    BOS/EOS/pad/unk."""
    special = set(tokenizer.special_tokens.values()) | set(tokenizer.eos_token_ids)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            special.add(token_id)
    return sampleable_token_ids(tokenizer.vocab_size, special)


def make_workload(spec: WorkloadSpec, token_ids: np.ndarray) -> Workload:
    """Draw ``spec``'s requests.

    Args:
        spec: what to draw.
        token_ids: int ``[num_ids]``, the ids prompt tokens are drawn from (uniformly), e.g.
            ``tokenizer_token_ids(model.tokenizer)``.

    Returns:
        the workload, requests in arrival order. Arrivals: the first at 0, then gaps drawn
        from an exponential distribution of mean ``1 / request_rate`` (all 0 when the rate is
        infinite).
    """
    token_ids = np.asarray(token_ids)
    if token_ids.ndim != 1 or token_ids.size == 0:
        raise ValueError(
            f"make_workload: token_ids must be a non-empty 1-D array, got {token_ids.shape}"
        )
    # Independent streams: lengths, prefix + prompt tokens, arrivals.
    length_seed, token_seed, arrival_seed = np.random.SeedSequence(spec.seed).spawn(3)
    lengths = np.random.default_rng(length_seed)
    tokens = np.random.default_rng(token_seed)
    arrivals_rng = np.random.default_rng(arrival_seed)

    n = spec.num_requests
    prompt_lens = lengths.integers(spec.prompt_len[0], spec.prompt_len[1] + 1, size=n)
    output_lens = lengths.integers(spec.output_len[0], spec.output_len[1] + 1, size=n)
    prefix = token_ids[tokens.integers(0, token_ids.size, size=spec.shared_prefix)]
    if math.isinf(spec.request_rate):
        arrivals = np.zeros(n)
    else:
        gaps = arrivals_rng.exponential(1.0 / spec.request_rate, size=n)
        arrivals = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    requests = []
    for index in range(n):
        unique = token_ids[tokens.integers(0, token_ids.size, size=int(prompt_lens[index]))]
        prompt = tuple(int(t) for t in np.concatenate([prefix, unique]))
        requests.append(
            BenchRequest(index, prompt, int(output_lens[index]), float(arrivals[index]))
        )
    return Workload(tuple(requests), spec)


def prefix_probe(
    token_ids: np.ndarray, prefix_len: int, suffix_len: int, output_len: int, seed: int
) -> tuple[Workload, Workload]:
    """Two one-request workloads that share a ``prefix_len``-token prefix, each followed by its
    own ``suffix_len`` random tokens: run the first on a cold cache, then the second, which
    should find the prefix cached. A new ``seed`` gives a new prefix (a cold one again)."""
    rng = np.random.default_rng(seed)
    prefix = token_ids[rng.integers(0, token_ids.size, size=prefix_len)]
    cold, warm = (
        np.concatenate([prefix, token_ids[rng.integers(0, token_ids.size, size=suffix_len)]])
        for _ in range(2)
    )
    return (
        Workload.from_prompts([cold.tolist()], [output_len]),
        Workload.from_prompts([warm.tolist()], [output_len]),
    )
