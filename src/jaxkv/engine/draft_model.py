"""A draft model as a drafter for speculative decoding: a smaller model on the target's
tokenizer decodes ``k`` tokens greedily for every sequence at once, on a contiguous cache of its
own (one row per sequence, the engine's ``ContiguousBackend``).

The draft cache follows each sequence between steps. Before proposing, a row keeps the longest
prefix its cache shares with the sequence's tokens (rejected drafts are rolled back, accepted
ones are already there), computes what it has not seen (the target's last token, or a whole
prompt for a new sequence, in chunks) and then decodes ``k - 1`` more tokens one at a time::

    sequence        ... t[L-1]                     (t[L-1]: the target's latest token)
    draft cache     ... t[L-2] | t[L-1] d1 d2 d3   computed now; d4 proposed, not computed
    proposed            d1 d2 d3 d4
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxkv.engine.backends import ContiguousBackend
from jaxkv.engine.placement import fetch
from jaxkv.engine.requests import CacheConfig, SchedulerConfig
from jaxkv.engine.speculative import Drafter, DraftRequest, NgramDrafter, SpeculativeConfig

_CHUNK = 64
"""Most tokens a row catches up on in one draft step (a new prompt takes several)."""


class _DraftSequence:
    """What the draft cache holds of one sequence: ``tokens[:num_computed]``."""

    def __init__(self, seq_id: Hashable):
        self.seq_id = seq_id
        self.tokens: list[int] = []
        self.num_computed = 0


def _shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    left = np.asarray(a[:n], np.int64)
    right = np.asarray(b[:n], np.int64)
    differ = np.flatnonzero(left != right)
    return int(differ[0]) if differ.size else n


class DraftModelDrafter(Drafter):
    """Greedy drafts of ``model`` (a jaxkv ``Model`` with the target's vocabulary).

    Args:
        model: the draft model (e.g. ``target.truncated(4)``, or a smaller checkpoint).
        num_draft_tokens: drafts per sequence and step (``k``).
        max_num_seqs: most sequences drafted for at once (the engine's).
        max_model_len: longest sequence (the engine's).
    """

    def __init__(self, model: Any, num_draft_tokens: int, max_num_seqs: int, max_model_len: int):
        self.model = model
        self.num_draft_tokens = num_draft_tokens
        scheduler = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max(16, max_num_seqs * _CHUNK),
            max_model_len=max_model_len,
        )
        # Its own rollbacks reach back fewer than num_draft_tokens tokens: rings and recurrent
        # layers of a draft stack keep that many spare slots and checkpoints.
        self.backend = ContiguousBackend(
            model, CacheConfig(kind="contiguous"), scheduler, max_model_len, num_draft_tokens + 1
        )
        self._sequences: dict[Hashable, _DraftSequence] = {}
        self.compile_seconds = 0.0

    def _on_compile(self, seconds: float) -> None:
        self.compile_seconds += seconds

    def release(self, seq_id: Hashable) -> None:
        sequence = self._sequences.pop(seq_id, None)
        if sequence is not None:
            self.backend.release(sequence)

    def _follow(self, request: DraftRequest) -> _DraftSequence:
        """The draft row of ``request``'s sequence, holding a prefix of its tokens."""
        sequence = self._sequences.get(request.seq_id)
        if sequence is None:
            sequence = _DraftSequence(request.seq_id)
            self.backend.admit(sequence)
            self._sequences[request.seq_id] = sequence
        shared = _shared_prefix(sequence.tokens[: sequence.num_computed], request.tokens)
        if shared < sequence.num_computed:
            self.backend.rollback(sequence, shared)
            sequence.num_computed = shared
        sequence.tokens = [int(t) for t in request.tokens]
        return sequence

    def _run(self, plan: list[tuple[_DraftSequence, int]]) -> dict[Hashable, int]:
        """One draft step; the greedy next token of every row that computed its last token."""
        logits, rows = self.backend.run(plan, self._on_compile)
        best = fetch(jnp.argmax(logits, axis=-1))
        proposals = {}
        for (sequence, count), row in zip(plan, rows, strict=True):
            sequence.num_computed += count
            if sequence.num_computed == len(sequence.tokens):
                proposals[sequence.seq_id] = int(best[row])
        return proposals

    def propose(self, requests: Sequence[DraftRequest]) -> list[list[int]]:
        wanted = [r for r in requests if r.max_drafts > 0]
        drafts: dict[Hashable, list[int]] = {r.seq_id: [] for r in requests}
        sequences = [self._follow(r) for r in wanted]
        # Catch up: every row computes the tokens it has not seen, the last one included.
        pending = list(sequences)
        while pending:
            plan = [(s, min(len(s.tokens) - s.num_computed, _CHUNK)) for s in pending]
            for seq_id, token in self._run(plan).items():
                drafts[seq_id].append(token)
            pending = [s for s in pending if s.num_computed < len(s.tokens)]
        # Then one token at a time, each row while it wants more.
        limit = {r.seq_id: min(r.max_drafts, self.num_draft_tokens) for r in wanted}
        while True:
            growing = [s for s in sequences if len(drafts[s.seq_id]) < limit[s.seq_id]]
            if not growing:
                break
            for sequence in growing:
                sequence.tokens.append(drafts[sequence.seq_id][-1])
            for seq_id, token in self._run([(s, 1) for s in growing]).items():
                drafts[seq_id].append(token)
        return [drafts[r.seq_id][: r.max_drafts] for r in requests]


def make_drafter(
    config: SpeculativeConfig, vocab_size: int, max_num_seqs: int, max_model_len: int
) -> Drafter:
    """The drafter a ``SpeculativeConfig`` asks for, for an engine of ``max_num_seqs`` rows of
    ``max_model_len`` tokens (a draft model must share the target's vocabulary)."""
    if config.method == "ngram":
        return NgramDrafter(config.ngram_max, config.ngram_min)
    draft = config.draft_model
    if getattr(draft, "vocab_size", None) != vocab_size:
        raise ValueError(
            f"SpeculativeConfig: draft_model has vocab_size={getattr(draft, 'vocab_size', None)}, "
            f"expected the target's {vocab_size}"
        )
    return DraftModelDrafter(draft, config.num_draft_tokens, max_num_seqs, max_model_len)


__all__ = ["DraftModelDrafter", "make_drafter"]
