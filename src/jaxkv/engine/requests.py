"""What the serving engine takes and gives back: its configuration, the per-step outputs of a
request, and the errors a bad request gets."""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

from jaxkv import _validation as v
from jaxkv.quantization import CODECS

CacheKind = Literal["paged", "contiguous"]
DEFAULT_PREFIX_DIR_MAX_BYTES = 4 << 30
"""Default bound of ``CacheConfig.prefix_cache_dir`` (4 GiB)."""
CACHE_KINDS = ("paged", "contiguous")


class RequestError(ValueError):
    """A request the engine refuses (empty prompt, prompt longer than the context, a bad
    sampling value, a duplicate id); nothing running is disturbed."""


class QueueFullError(RuntimeError):
    """The engine already holds ``SchedulerConfig.max_waiting`` waiting requests."""


class UnknownRequestError(KeyError):
    """No request of that id is known to the engine (never added, or already finished)."""

    def __str__(self) -> str:  # KeyError quotes its argument; the message reads better plain
        return str(self.args[0]) if self.args else ""


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """The KV cache an engine runs on.

    Attributes:
        kind: ``"paged"`` (one page pool shared by every sequence: prefix caching, forks,
            preemption) or ``"contiguous"`` (one ``max_model_len`` row per sequence slot).
        page_size: tokens per page (paged).
        num_pages: pages in the pool (paged); ``None`` sizes the pool to ``memory_bytes``, at
            most what ``max_num_seqs`` full-length sequences need.
        memory_bytes: KV memory the default pool may take (paged).
        enable_prefix_caching: reuse the computed pages of identical prompt prefixes (paged).
        kv_quantization: KV storage codec, one of ``jaxkv.quantization.CODECS``.
        prefix_cache_dir: a directory the prefix cache spills evicted pages to and loads them
            back from on a miss, across restarts (paged, with prefix caching); ``None``: none.
        prefix_cache_dir_max_bytes: most bytes of page files kept there (least recently used
            removed first).
    """

    kind: CacheKind = "paged"
    page_size: int = 16
    num_pages: int | None = None
    memory_bytes: int = 1 << 30
    enable_prefix_caching: bool = True
    kv_quantization: str = "none"
    prefix_cache_dir: str | None = None
    prefix_cache_dir_max_bytes: int = DEFAULT_PREFIX_DIR_MAX_BYTES

    def __post_init__(self) -> None:
        owner = "CacheConfig"
        v.require_choice(owner, "kind", self.kind, CACHE_KINDS)
        v.require_int(owner, "page_size", self.page_size, minimum=1, maximum=4096)
        v.require_optional_int(owner, "num_pages", self.num_pages, minimum=1)
        v.require_int(owner, "memory_bytes", self.memory_bytes, minimum=1)
        if not isinstance(self.enable_prefix_caching, bool):
            raise TypeError(
                f"{owner}: enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}"
            )
        v.require_choice(owner, "kv_quantization", self.kv_quantization, CODECS)
        v.require_int(
            owner, "prefix_cache_dir_max_bytes", self.prefix_cache_dir_max_bytes, minimum=1
        )
        if self.prefix_cache_dir is not None:
            directory = self.prefix_cache_dir
            if isinstance(directory, os.PathLike):
                directory = os.fspath(directory)
                object.__setattr__(self, "prefix_cache_dir", directory)
            if not isinstance(directory, str) or not directory:
                raise TypeError(
                    f"{owner}: prefix_cache_dir must be a directory path or None, got "
                    f"{self.prefix_cache_dir!r}"
                )
            if self.kind != "paged" or not self.enable_prefix_caching:
                raise ValueError(
                    f"{owner}: prefix_cache_dir keeps pages of the prefix cache, so it needs "
                    f"kind='paged' and enable_prefix_caching=True, got kind={self.kind!r}, "
                    f"enable_prefix_caching={self.enable_prefix_caching}"
                )


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """How the engine packs each step.

    Attributes:
        max_num_seqs: most sequences (choices) running at once; the row count of every step.
        max_num_batched_tokens: token budget of one step (running decodes first, then prefill
            chunks of waiting requests): a long prompt is prefilled in chunks and never stalls
            the decodes.
        max_prefill_seqs: most sequences that prefill a chunk in one step (paged); attention lays
            those out at full chunk width and the others at one token.
        max_model_len: longest sequence (prompt + output); ``None``: the model's context, at
            most 8,192.
        max_waiting: most requests waiting for admission; more raise ``QueueFullError``.
        prefill_buckets: the token counts a step that prefills is padded to (each compiles
            once), ending with ``max_num_batched_tokens``; ``None``: the budget and a quarter
            of it (a short prefill then does not pay for a full budget of matmuls).
    """

    max_num_seqs: int = 8
    max_num_batched_tokens: int = 256
    max_prefill_seqs: int = 2
    max_model_len: int | None = None
    max_waiting: int = 1024
    prefill_buckets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        owner = "SchedulerConfig"
        v.require_int(owner, "max_num_seqs", self.max_num_seqs, minimum=1, maximum=1024)
        v.require_int(
            owner, "max_num_batched_tokens", self.max_num_batched_tokens, minimum=16, maximum=65536
        )
        v.require_int(owner, "max_prefill_seqs", self.max_prefill_seqs, minimum=1, maximum=1024)
        v.require_optional_int(owner, "max_model_len", self.max_model_len, minimum=2)
        v.require_int(owner, "max_waiting", self.max_waiting, minimum=1)
        if self.prefill_buckets is not None:
            buckets = tuple(self.prefill_buckets)
            for index, bucket in enumerate(buckets):
                v.require_int(owner, f"prefill_buckets[{index}]", bucket, minimum=1)
            if (
                not buckets
                or list(buckets) != sorted(set(buckets))
                or (buckets[-1] != self.max_num_batched_tokens)
            ):
                raise ValueError(
                    f"{owner}: prefill_buckets must rise strictly and end with "
                    f"max_num_batched_tokens={self.max_num_batched_tokens}, got {buckets}"
                )
            object.__setattr__(self, "prefill_buckets", buckets)
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"{owner}: max_num_batched_tokens={self.max_num_batched_tokens} must be at least "
                f"max_num_seqs={self.max_num_seqs} (every running sequence decodes each step)"
            )


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely alternatives at its step."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclasses.dataclass
class CompletionOutput:
    """One choice of a request, as of the latest step.

    Attributes:
        index: the choice's index (``0 .. n - 1``).
        text: the whole text so far (cut before a stop string; held back while it might still
            turn into one).
        token_ids: every generated token id so far (an EOS or stop token excluded).
        new_text: text added since the previous output of this request.
        new_token_ids: token ids added since the previous output.
        finish_reason: ``None`` while running; ``"eos"``, ``"stop"`` (a stop string or stop
            token), ``"length"`` or ``"abort"``.
        logprobs: with ``SamplingParams.logprobs``, one entry per generated token.
    """

    index: int
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    new_text: str = ""
    new_token_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestMetrics:
    """Wall-clock times (``time.perf_counter()``) of a request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def inter_token_latencies(self) -> list[float]:
        times = self.token_times
        return [b - a for a, b in zip(times, times[1:], strict=False)]


@dataclasses.dataclass
class RequestOutput:
    """A request's state after a step (or its final state once ``finished``).

    Attributes:
        request_id: the id ``add_request`` returned.
        prompt_token_ids: the prompt as the model saw it.
        outputs: one ``CompletionOutput`` per choice.
        finished: every choice has finished.
        num_cached_tokens: prompt tokens served by the prefix cache (first admission).
        metrics: timings.
        logits: with ``add_request(output_logits=True)``, per choice the float32
            ``[steps, vocab]`` logits each token was drawn from (filled when finished).
    """

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int
    metrics: RequestMetrics
    logits: list | None = None


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's counters (the server's ``/metrics`` reads these).

    ``num_computed_tokens`` counts the tokens the model ran (prefill and decode; a prefix hit
    is not run). The ``prefix_disk``/``prefix_dir`` counters describe
    ``CacheConfig.prefix_cache_dir``: prompt tokens loaded back from it, pages written to it,
    and the files and bytes it holds now.
    """

    num_running: int
    num_waiting: int
    num_pages: int
    num_pages_used: int
    num_pages_free: int
    prefix_query_tokens: int
    prefix_hit_tokens: int
    num_preemptions: int
    num_steps: int
    num_finished: int
    num_prompt_tokens: int
    num_generated_tokens: int
    num_compiled_shapes: int
    peak_pages_used: int
    num_verify_steps: int = 0
    num_verified_sequences: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_computed_tokens: int = 0
    prefix_disk_hit_tokens: int = 0
    prefix_spilled_pages: int = 0
    prefix_dir_files: int = 0
    prefix_dir_bytes: int = 0

    @property
    def draft_acceptance_rate(self) -> float:
        """Share of proposed draft tokens the model accepted (speculative decoding)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def tokens_per_verification(self) -> float:
        """Output tokens one sequence got from one verification, on average: its accepted
        drafts plus the model's own token (1.0: speculation gained nothing)."""
        if not self.num_verified_sequences:
            return 0.0
        return 1.0 + self.num_accepted_tokens / self.num_verified_sequences

    @property
    def prefix_hit_rate(self) -> float:
        if not self.prefix_query_tokens:
            return 0.0
        return self.prefix_hit_tokens / self.prefix_query_tokens
