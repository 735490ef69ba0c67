"""Speculative decoding: a *drafter* guesses a sequence's next tokens, the target model checks
all of them in one step, and the sequence keeps the longest run of guesses the target agrees
with, plus one token of the target's own.

A verification step feeds each running row its last token and up to ``k`` drafts::

    known tokens   ... t[L-1] | d1  d2  d3  d4        (d: drafts, L: tokens before them)
    step computes      t[L-1]   d1  d2  d3  d4        k + 1 queries, logits at each
    target samples     s0       s1  s2  s3  s4        with the PRNG key of that output index
    accepted           s0 == d1, s1 == d2, s2 != d3   ->  j = 2
    emitted            s0 s1 s2                       (= d1 d2, then the target's s2)
    cache keeps        ... t[L-1] d1 d2               d3 d4 rolled back

Each ``s_i`` is drawn exactly as plain decoding would draw that output token: same logits (the
forward is causal), same sampling settings, same PRNG key (``(seed, choice, output index)``).
So for a drafter whose guesses are deterministic (prompt lookup, a greedy draft model) the
output is token for token the output of plain decoding with the same seed, greedy or sampled.
This is the rejection-sampling rule of speculative sampling for a draft distribution that puts
all its mass on its guess ``d``: ``d`` is kept with probability ``p(d)`` (``s == d``) and
otherwise the token comes from ``p`` with ``d`` removed (``s`` given ``s != d``), so the output
distribution is the target's.

Drafters:

* ``NgramDrafter`` (prompt lookup): the longest recent n-gram of the sequence that also occurs
  earlier in it (prompt or output) proposes the tokens that followed that earlier occurrence.
  Costs no model; pays off when the output copies its input (rewriting, summaries, code edits).
* ``DraftModelDrafter``: a smaller model on the same tokenizer decodes ``k`` tokens greedily.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import numpy as np

from jaxkv import _validation as v

SpeculativeMethod = Literal["ngram", "draft"]
SPECULATIVE_METHODS = ("ngram", "draft")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """How an engine speculates.

    Attributes:
        method: ``"ngram"`` (prompt lookup) or ``"draft"`` (a draft model).
        num_draft_tokens: most tokens proposed per sequence and step (``k``); a verification
            step computes ``k + 1`` tokens per row.
        ngram_max: longest n-gram prompt lookup matches (it tries the longest first).
        ngram_min: shortest n-gram it accepts as a match (2: a single repeated token is too
            weak a hint; on open-ended text its drafts are mostly rejected and the verification
            steps then cost more than they give).
        draft_model: for ``method="draft"``, a jaxkv ``Model`` with the target's vocabulary.
    """

    method: SpeculativeMethod = "ngram"
    num_draft_tokens: int = 4
    ngram_max: int = 3
    ngram_min: int = 2
    draft_model: Any = None

    def __post_init__(self) -> None:
        owner = "SpeculativeConfig"
        v.require_choice(owner, "method", self.method, SPECULATIVE_METHODS)
        v.require_int(owner, "num_draft_tokens", self.num_draft_tokens, minimum=1, maximum=32)
        v.require_int(owner, "ngram_min", self.ngram_min, minimum=1, maximum=64)
        v.require_int(owner, "ngram_max", self.ngram_max, minimum=self.ngram_min, maximum=64)
        if self.method == "draft" and self.draft_model is None:
            raise ValueError(f"{owner}: method='draft' needs a draft_model, got None")
        if self.method == "ngram" and self.draft_model is not None:
            raise ValueError(
                f"{owner}: draft_model is only used with method='draft', got method='ngram'"
            )

    @property
    def verify_width(self) -> int:
        """Tokens a verification step computes per row: the last token and the drafts."""
        return self.num_draft_tokens + 1


@dataclasses.dataclass(frozen=True)
class DraftRequest:
    """One sequence asking for drafts.

    Attributes:
        seq_id: the sequence (stable over its life; a drafter may keep state per sequence).
        tokens: every known token (prompt and output so far), the last one not yet computed by
            the target.
        max_drafts: most tokens to propose (fewer, or none, is always allowed).
    """

    seq_id: Hashable
    tokens: Sequence[int]
    max_drafts: int


class Drafter(abc.ABC):
    """Proposes draft tokens for many sequences at once."""

    @abc.abstractmethod
    def propose(self, requests: Sequence[DraftRequest]) -> list[list[int]]:
        """The drafts of each request (each at most its ``max_drafts`` long, maybe empty)."""

    def release(self, seq_id: Hashable) -> None:  # noqa: B027 (stateless drafters keep nothing)
        """``seq_id`` is gone (finished, aborted or preempted): drop what is kept for it."""


def prompt_lookup(
    tokens: Sequence[int] | np.ndarray, max_drafts: int, ngram_max: int = 3, ngram_min: int = 2
) -> list[int]:
    """Drafts by prompt lookup: for ``n`` from ``ngram_max`` down to ``ngram_min``, find an
    earlier occurrence of the sequence's last ``n`` tokens (the most recent one that ``max_drafts``
    tokens follow, else the first) and propose the (at most ``max_drafts``) tokens that followed
    it. ``[]`` when nothing matches.

    Args:
        tokens: ``[L]`` token ids, prompt and output so far.
    """
    ids = np.asarray(tokens, dtype=np.int64)
    length = ids.shape[0]
    if max_drafts <= 0:
        return []
    for n in range(min(ngram_max, length - 1), ngram_min - 1, -1):
        pattern = ids[length - n :]
        # Windows ids[i : i + n] for i < length - n (an earlier occurrence that has a follower).
        windows = np.lib.stride_tricks.sliding_window_view(ids[: length - 1], n)
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if hits.size:
            # The latest occurrence followed by a full run of drafts; else the earliest (the
            # latest may sit at the very end, with one token after it).
            full = hits[hits + n + max_drafts <= length]
            start = int(full[-1] if full.size else hits[0]) + n
            return [int(t) for t in ids[start : start + max_drafts]]
    return []


class NgramDrafter(Drafter):
    """Prompt lookup (see ``prompt_lookup``): stateless, no model."""

    def __init__(self, ngram_max: int = 3, ngram_min: int = 2):
        v.require_int("NgramDrafter", "ngram_min", ngram_min, minimum=1)
        v.require_int("NgramDrafter", "ngram_max", ngram_max, minimum=ngram_min)
        self.ngram_max = ngram_max
        self.ngram_min = ngram_min

    def propose(self, requests: Sequence[DraftRequest]) -> list[list[int]]:
        return [
            prompt_lookup(r.tokens, r.max_drafts, self.ngram_max, self.ngram_min) for r in requests
        ]


def accepted_length(sampled: Sequence[int], drafts: Sequence[int]) -> int:
    """How many leading drafts the target agrees with: the largest ``j`` with
    ``sampled[i] == drafts[i]`` for every ``i < j`` (``sampled[i]`` is the target's token after
    the ``i``-th draft's predecessor)."""
    accepted = 0
    for target, draft in zip(sampled, drafts, strict=False):
        if int(target) != int(draft):
            break
        accepted += 1
    return accepted


def speculative_config(
    method: str, num_draft_tokens: int = 4, draft_model: str | None = None, dtype: Any = None
) -> SpeculativeConfig | None:
    """The ``SpeculativeConfig`` of command-line options: ``method`` ``"none"`` (``None``),
    ``"ngram"``, or ``"draft"`` with ``draft_model`` a GGUF path or bundled model name (loaded
    here, in ``dtype``)."""
    if method == "none":
        if draft_model is not None:
            raise ValueError(
                f"--draft-model {draft_model!r} needs --speculative draft, got --speculative none"
            )
        return None
    if method == "draft":
        if draft_model is None:
            raise ValueError("--speculative draft needs --draft-model (a GGUF file or 'smollm2')")
        from jaxkv.engine.model import Model

        loaded = Model.load(draft_model) if dtype is None else Model.load(draft_model, dtype=dtype)
        return SpeculativeConfig("draft", num_draft_tokens, draft_model=loaded)
    if draft_model is not None:
        raise ValueError(
            f"--draft-model {draft_model!r} needs --speculative draft, got --speculative {method}"
        )
    return SpeculativeConfig(method, num_draft_tokens)  # type: ignore[arg-type]


__all__ = [
    "SPECULATIVE_METHODS",
    "DraftRequest",
    "Drafter",
    "NgramDrafter",
    "SpeculativeConfig",
    "accepted_length",
    "prompt_lookup",
    "speculative_config",
]
