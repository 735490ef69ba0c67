"""What generation gives back (``Generation``, ``GenerationResult``) and the host-side progress
of one row while it runs (``RowProgress``: tokens, streamed text, stop strings, finish reason)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class Generation:
    """One prompt's result.

    Attributes:
        prompt_ids: the prompt's token ids.
        token_ids: generated ids (the EOS token, if hit, excluded).
        text: the decoded continuation (cut before a stop string).
        finish_reason: ``"eos"``, ``"stop"`` (a stop string) or ``"length"``.
        logits: with ``output_logits=True``, float32 ``[steps, vocab]``: the logits each
            sampled token was drawn from (the EOS step included).
        time_to_first_token: seconds from the start of generation to this prompt's first token
            (waiting for a free row included), when known.
        seconds: seconds from the start of generation until this prompt finished, when known.
    """

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logits: np.ndarray | None = None
    time_to_first_token: float | None = None
    seconds: float | None = None


@dataclasses.dataclass
class GenerationResult:
    """All rows' generations plus timing.

    Attributes:
        generations: one per prompt, in the prompts' order.
        prefill_seconds: from the start until every prompt of the first batch had its first
            token (all prompts, unless ``generate``'s ``max_batch`` queued some).
        decode_seconds: the rest of the run.
        decode_steps: engine steps in ``decode_seconds``.
        compile_seconds: compilation before the run (not in the other times).
        prefill_tokens: prompt tokens of the first batch (those ``prefill_seconds`` covers).
        cached_tokens: prompt tokens loaded from ``generate``'s ``prompt_cache`` (not
            prefilled).
        prompt_cache_seconds: time spent loading and saving the prompt cache (not in the
            other times).
        engine_stats: the engine's counters at the end (steps, speculative drafts accepted).
    """

    generations: list[Generation]
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    compile_seconds: float = 0.0
    prefill_tokens: int | None = None
    cached_tokens: int = 0
    prompt_cache_seconds: float = 0.0
    engine_stats: Any = None

    @property
    def total_seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def time_to_first_token(self) -> float:
        """Seconds until the first prompt's first token."""
        known = [g.time_to_first_token for g in self.generations if g.time_to_first_token]
        return min(known, default=self.prefill_seconds)

    @property
    def prefill_tokens_per_second(self) -> float:
        tokens = self.prompt_tokens if self.prefill_tokens is None else self.prefill_tokens
        return tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def prompt_tokens(self) -> int:
        return sum(len(g.prompt_ids) for g in self.generations)

    @property
    def generated_tokens(self) -> int:
        return sum(len(g.token_ids) for g in self.generations)

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens produced per second by the decode steps (all rows together)."""
        produced = sum(max(len(g.token_ids) - 1, 0) for g in self.generations)
        return produced / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"prompt tokens {self.prompt_tokens}, generated tokens {self.generated_tokens}, "
            f"prefill {self.prefill_seconds:.3f} s, decode {self.decode_tokens_per_second:.1f} "
            f"tokens/s (compile {self.compile_seconds:.1f} s)"
        )


class RowProgress:
    """Host-side progress of one row: tokens, streamed text, stop handling."""

    def __init__(self, row, prompt_ids, tokenizer, eos_ids, stop, on_text, stop_token_ids=()):
        self.row = row
        self.stop_token_ids = frozenset(stop_token_ids)
        self.prompt_ids = list(prompt_ids)
        self.token_ids: list[int] = []
        self.decoder = tokenizer.stream_decoder()
        self.text = ""
        self.emitted = 0
        self.eos_ids = eos_ids
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.on_text = on_text
        self.finish_reason: str | None = None
        self.logits: list[np.ndarray] | None = None

    @property
    def active(self) -> bool:
        return self.finish_reason is None

    def push(self, token: int, max_new_tokens: int) -> None:
        if token in self.eos_ids:
            self._finish("eos")
            return
        if token in self.stop_token_ids:
            self.text += self.decoder.flush()
            self._finish("stop")
            return
        self.token_ids.append(token)
        self.text += self.decoder.feed(token)
        for stop in self.stop:
            at = self.text.find(stop)
            if at >= 0:
                self.text = self.text[:at]
                self._finish("stop")
                return
        if len(self.token_ids) >= max_new_tokens:
            self._finish("length")
            return
        self._emit(len(self.text) - self.hold)

    def finish(self, reason: str) -> None:
        """End the row now (``"abort"``, or ``"length"`` when its sequence is full)."""
        self._finish(reason)

    def _finish(self, reason: str) -> None:
        if reason not in ("stop", "abort"):
            self.text += self.decoder.flush()
        self.finish_reason = reason
        self._emit(len(self.text))

    def _emit(self, upto: int) -> None:
        if self.on_text is not None and upto > self.emitted:
            self.on_text(self.row, self.text[self.emitted : upto])
            self.emitted = upto

    def result(self) -> Generation:
        reason = self.finish_reason or "length"
        logits = None if self.logits is None else np.stack(self.logits)
        return Generation(self.prompt_ids, self.token_ids, self.text, reason, logits)

    def record(self, logits: np.ndarray) -> None:
        """Keep the logits of this step (when the caller asked for them)."""
        if self.logits is not None:
            self.logits.append(np.asarray(logits, np.float32))
