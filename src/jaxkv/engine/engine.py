"""The serving engine: continuous batching of many requests over one KV cache.

``Engine(model, CacheConfig(...), SchedulerConfig(...))`` takes requests at any time
(``add_request``) and runs them a step at a time (``step``). Each step packs, under a token
budget, one token of every running sequence (decodes first) and then prefill chunks of waiting
ones, so a long prompt is prefilled across steps and never stalls the running decodes. A
finished or aborted request frees its cache at once, and waiting requests take its place in the
same step.

On the paged backend (the default):

* prefix caching across requests: a page enters the prefix cache as soon as its tokens are
  computed, and a request whose prompt starts with cached pages skips them (per-request
  ``cache_salt`` keeps tenants apart);
* ``n > 1`` choices share the prompt's pages: the prompt is prefilled once, up to its last token,
  and then forked with copy-on-write;
* out of pages, the most recently admitted running sequence is preempted: its pages are freed
  and it is recomputed later from its tokens, so it still ends with the output it would have had
  alone.

With ``speculative=SpeculativeConfig(...)`` (see ``jaxkv.engine.speculative``), a step in which
every scheduled sequence decodes becomes a verification step: each sequence also computes the
tokens its drafter proposes, keeps those the model agrees with and one token of its own, and
rolls the rest back. The output is the output of plain decoding (greedy, or sampled with the
same seed), in fewer steps when the drafts are good.

With ``mesh=...`` (a ``jax.sharding.Mesh`` of ``AxisType.Auto`` axes ``"data"`` and/or
``"tensor"``, e.g. ``jaxkv.engine.placement.make_mesh("data=2,tensor=4")``), the engine runs on
every device of the mesh (``jaxkv.engine.placement``): the weights are split for tensor
parallelism, the cache is built in its shards (contiguous rows over ``"data"``, KV heads over
``"tensor"``; a page pool by KV heads only) and stays there through every step. The output is
the single-device output (greedy tokens alike; logits up to float rounding).

Step shapes come from a fixed, small set (see ``jaxkv.engine.backends``); ``warmup()`` compiles
them all, so nothing compiles once tokens flow. Sampling runs in its own jitted function
(``jaxkv.engine.sampler``) with per-row settings.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv import sharding
from jaxkv.compilation import enable_compilation_cache
from jaxkv.engine.backends import make_backend
from jaxkv.engine.draft_model import make_drafter
from jaxkv.engine.model import ENGINE_MODELS, Model
from jaxkv.engine.outputs import RowProgress
from jaxkv.engine.placement import Placement, fetch, with_hint
from jaxkv.engine.prefix_store import (
    PrefixFile,
    directory_stats,
    load_prefix_file,
    load_row_prefix,
    save_prefix_file,
    save_row_prefix,
)
from jaxkv.engine.requests import (
    CacheConfig,
    CompletionOutput,
    EngineStats,
    QueueFullError,
    RequestError,
    RequestMetrics,
    RequestOutput,
    SchedulerConfig,
    TokenLogprob,
    UnknownRequestError,
)
from jaxkv.engine.sampler import sample_rows
from jaxkv.engine.sampling import SamplingParams
from jaxkv.engine.speculative import DraftRequest, SpeculativeConfig, accepted_length

Prompt = str | Sequence[int] | Sequence[Mapping[str, Any]]
"""Text, token ids, or chat messages ``[{"role": ..., "content": ...}, ...]``."""

Progress = Callable[[str], None]

_DEFAULT_MAX_MODEL_LEN = 8192


class _Choice:
    """One sequence in the cache: one choice of a request."""

    def __init__(self, request: _Request, index: int, tokens: list[int], text: RowProgress):
        self.request = request
        self.index = index
        self.seq_id = f"{request.request_id}#{index}"
        self.tokens = tokens  # prompt + generated, all known tokens
        self.num_computed = 0
        self.text = text
        self.generated: list[int] = []
        self.logprobs: list[TokenLogprob] | None = None if request.sampling.logprobs is None else []
        self.logits: list[np.ndarray] | None = [] if request.output_logits else None
        self.emitted_text = ""
        self.reported_text = 0
        self.reported_tokens = 0
        self.drafts: list[int] = []  # this step's draft tokens (the tail of ``tokens``)

    @property
    def cache_salt(self) -> str | None:
        return self.request.cache_salt

    @property
    def finished(self) -> bool:
        return self.text.finish_reason is not None

    @property
    def target(self) -> int:
        """Tokens to compute before the next draw: all known ones, or, for a request that will
        fork, all but the prompt's last (each choice then computes that one itself)."""
        if self.request.will_fork:
            return len(self.tokens) - 1
        return len(self.tokens)


class _Request:
    def __init__(self, request_id, prompt_ids, sampling, cache_salt, seed, output_logits):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.cache_salt = cache_salt
        self.seed = seed
        self.output_logits = output_logits
        self.choices: list[_Choice] = []
        self.will_fork = sampling.n > 1
        self.num_cached_tokens: int | None = None
        self.metrics = RequestMetrics(arrival_time=time.perf_counter())

    @property
    def finished(self) -> bool:
        return len(self.choices) == self.request_seqs and all(c.finished for c in self.choices)

    @property
    def request_seqs(self) -> int:
        return self.sampling.n


class Engine:
    """Continuous batching over one KV cache (see the module docstring).

    Not thread-safe: call it from one thread (the server runs it in its own).

    Args:
        model: from ``Model.load`` (or ``Model.tiny``).
        cache_config: the cache (paged by default).
        scheduler_config: the step budget and limits.
        speculative: speculative decoding (off by default; a draft model runs on one device).
        mesh: run on this device mesh (``AxisType.Auto`` axes; ``None``: one device).
        sharding_rules: logical axis -> mesh axis (default ``jaxkv.sharding.DEFAULT_RULES``);
            only with ``mesh``.
        indivisible: what a size that does not divide over its mesh axes gets (SmolLM2's 9
            heads and 3 KV heads on ``tensor=2/4/8``; ``max_num_seqs`` rows of a contiguous
            cache on ``"data"``): ``"error"`` (the default: refused with a ``ValueError``
            naming the array, the size and the axis, so nothing is replicated unasked) or
            ``"replicate"`` (that dimension is held whole on every device: correct, but it
            saves no memory and splits no work). ``jaxkv generate/serve --mesh-indivisible``
            passes the choice through.
    """

    def __init__(
        self,
        model: Model,
        cache_config: CacheConfig | None = None,
        scheduler_config: SchedulerConfig | None = None,
        speculative: SpeculativeConfig | None = None,
        *,
        mesh: Any = None,
        sharding_rules: Mapping[str, Any] | None = None,
        indivisible: str = "error",
    ):
        if not isinstance(model, ENGINE_MODELS):
            raise TypeError(
                "Engine: model must be a jaxkv Model, Gemma3Model or HybridModel, got "
                f"{type(model).__name__}"
            )
        cache_config = CacheConfig() if cache_config is None else cache_config
        scheduler_config = SchedulerConfig() if scheduler_config is None else scheduler_config
        for name, value, kind in (
            ("cache_config", cache_config, CacheConfig),
            ("scheduler_config", scheduler_config, SchedulerConfig),
        ):
            if not isinstance(value, kind):
                raise TypeError(
                    f"Engine: {name} must be a {kind.__name__}, got {type(value).__name__}"
                )
        enable_compilation_cache()  # a second run of the same shapes compiles nothing
        self.placement = self._placement(
            cache_config, scheduler_config, mesh, sharding_rules, indivisible
        )
        self.mesh = mesh
        if self.placement is not None:
            model = self._place_model(model)
        self.model = model
        self.tokenizer = model.tokenizer
        self.cache_config = cache_config
        self.scheduler_config = scheduler_config
        if cache_config.kind == "paged" and not model.supports_paged:
            raise ValueError(
                f"Engine: {type(model).__name__} cannot run on the paged cache: "
                f"{model.paged_refusal}; use CacheConfig(kind='contiguous')"
            )
        context = model.context_length
        max_model_len = scheduler_config.max_model_len
        if max_model_len is None:
            max_model_len = min(context, _DEFAULT_MAX_MODEL_LEN)
        if max_model_len > context:
            raise ValueError(
                f"Engine: max_model_len={max_model_len} exceeds the model's context of {context}"
            )
        self.max_model_len = max_model_len
        self.speculative = self._check_speculative(speculative)
        self.drafter = None
        if speculative is not None:
            self.drafter = make_drafter(
                speculative, model.vocab_size, scheduler_config.max_num_seqs, max_model_len
            )
        verify_width = 0 if speculative is None else speculative.verify_width
        self.backend = make_backend(
            model, cache_config, scheduler_config, max_model_len, verify_width, self.placement
        )
        self.eos_ids = model.eos_token_ids
        self._requests: dict[str, _Request] = {}
        self._waiting: collections.deque[_Choice] = collections.deque()
        self._running: list[_Choice] = []
        self._changed: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._compiled: set[tuple[int, int]] = set()
        self._counters = collections.Counter()
        self._peak_pages = 0
        self.compile_seconds = 0.0

    @staticmethod
    def _placement(
        cache_config: CacheConfig,
        scheduler_config: SchedulerConfig,
        mesh: Any,
        rules: Mapping[str, Any] | None,
        indivisible: str,
    ) -> Placement | None:
        if mesh is None:
            if rules is not None:
                raise ValueError("Engine: sharding_rules needs a mesh; got mesh=None")
            return None
        if rules is None:
            rules = sharding.DEFAULT_RULES
        placement = Placement(mesh, rules, indivisible)  # checks the mesh, rules and policy
        target = rules.get("batch")
        axes = () if target is None else (target,) if isinstance(target, str) else target
        split = math.prod(int(mesh.shape.get(axis, 1)) for axis in axes)
        rows = scheduler_config.max_num_seqs
        if cache_config.kind == "contiguous" and rows % split and indivisible == "error":
            raise ValueError(
                with_hint(
                    f"Engine: max_num_seqs={rows} rows do not divide over mesh axes "
                    f"{tuple(axes)} of size {split}; expected a multiple of {split}, or "
                    f"indivisible='replicate' to hold every row on every device"
                )
            )
        return placement

    def _place_model(self, model: Any) -> Any:
        """``model`` with its weights on the mesh (split for tensor parallelism)."""
        params = self.placement.place_params(model.params, model.config)
        return dataclasses.replace(model, params=params)

    def _check_speculative(self, speculative: SpeculativeConfig | None) -> SpeculativeConfig | None:
        if speculative is None:
            return None
        if not isinstance(speculative, SpeculativeConfig):
            raise TypeError(
                f"Engine: speculative must be a SpeculativeConfig or None, got "
                f"{type(speculative).__name__}"
            )
        width = speculative.verify_width
        if (
            self.scheduler_config.max_num_seqs * width
            > self.scheduler_config.max_num_batched_tokens
        ):
            raise ValueError(
                f"Engine: a verification step of max_num_seqs={self.scheduler_config.max_num_seqs}"
                f" rows of num_draft_tokens + 1 = {width} tokens exceeds max_num_batched_tokens="
                f"{self.scheduler_config.max_num_batched_tokens}; raise the budget or draft fewer"
            )
        return speculative

    # -- requests --------------------------------------------------------------------------

    def add_request(
        self,
        prompt: Prompt,
        sampling: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        cache_salt: str | None = None,
        output_logits: bool = False,
    ) -> str:
        """Queue a request; returns its id.

        Args:
            prompt: text (tokenized without BOS, as the checkpoint says), token ids, or chat
                messages (rendered with the checkpoint's chat template; their content is
                encoded as text, so it can never forge a special token).
            sampling: how to pick tokens and when to stop (default: greedy, 64 tokens).
            request_id: an id of your own (default: a fresh one).
            cache_salt: requests with different salts never share cached pages.
            output_logits: keep the logits of every drawn token (``RequestOutput.logits``).

        Raises:
            RequestError: an empty or malformed prompt, one longer than ``max_model_len`` with
                its ``max_tokens``, a token id outside the vocabulary, ``n`` above
                ``max_num_seqs``, a duplicate id, a salt that is not a string.
            QueueFullError: ``max_waiting`` requests are already waiting.
        """
        sampling = SamplingParams() if sampling is None else sampling
        if not isinstance(sampling, SamplingParams):
            raise RequestError(
                f"add_request: sampling must be a SamplingParams, got {type(sampling).__name__}"
            )
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if not isinstance(request_id, str) or not request_id:
            raise RequestError(
                f"add_request: request_id must be a non-empty str, got {request_id!r}"
            )
        if request_id in self._requests:
            raise RequestError(f"add_request: request_id={request_id!r} is already in use")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise RequestError(f"add_request: cache_salt must be a str or None, got {cache_salt!r}")
        if not isinstance(output_logits, bool):
            raise RequestError(f"add_request: output_logits must be a bool, got {output_logits!r}")
        prompt_ids = self._encode(prompt)
        total = len(prompt_ids) + sampling.max_tokens
        if total > self.max_model_len:
            raise RequestError(
                f"add_request: the prompt ({len(prompt_ids)} tokens) plus max_tokens="
                f"{sampling.max_tokens} is {total} tokens, more than max_model_len="
                f"{self.max_model_len}"
            )
        if sampling.n > self.scheduler_config.max_num_seqs:
            raise RequestError(
                f"add_request: n={sampling.n} exceeds max_num_seqs="
                f"{self.scheduler_config.max_num_seqs}"
            )
        waiting_requests = self._num_waiting_requests()
        if waiting_requests >= self.scheduler_config.max_waiting:
            raise QueueFullError(
                f"add_request: {waiting_requests} requests are waiting "
                f"(max_waiting={self.scheduler_config.max_waiting}); try again later"
            )
        # Seeds enter the device as int32: any int maps onto one of 2**31 streams.
        seed = sampling.seed % 2**31 if sampling.seed is not None else secrets.randbits(31)
        request = _Request(request_id, prompt_ids, sampling, cache_salt, seed, output_logits)
        request.choices.append(self._new_choice(request, 0, list(prompt_ids)))
        self._requests[request_id] = request
        self._waiting.append(request.choices[0])
        self._counters["prompt_tokens"] += len(prompt_ids)
        return request_id

    def _new_choice(self, request: _Request, index: int, tokens: list[int]) -> _Choice:
        sampling = request.sampling
        eos = frozenset() if sampling.ignore_eos else self.eos_ids
        text = RowProgress(
            index,
            request.prompt_ids,
            self.tokenizer,
            eos,
            sampling.stop,
            None,
            stop_token_ids=sampling.stop_token_ids,
        )
        choice = _Choice(request, index, tokens, text)

        def on_text(_row: int, piece: str) -> None:
            choice.emitted_text += piece

        text.on_text = on_text
        return choice

    def _encode(self, prompt: Prompt) -> list[int]:
        owner = "add_request"
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError(f"{owner}: prompt is an empty string")
            try:
                ids = self.tokenizer.encode(prompt)
            except (TypeError, ValueError) as err:
                raise RequestError(f"{owner}: prompt: {err}") from err
        elif isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], Mapping):
            try:
                ids = self.tokenizer.encode_chat(list(prompt))
            except (TypeError, ValueError) as err:
                raise RequestError(f"{owner}: messages: {err}") from err
        elif isinstance(prompt, Sequence | np.ndarray) and not isinstance(prompt, bytes):
            ids = list(prompt)
            vocab = self.model.vocab_size
            for index, token in enumerate(ids):
                if isinstance(token, bool) or not isinstance(token, int | np.integer):
                    raise RequestError(
                        f"{owner}: prompt[{index}] must be an int token id, got {token!r:.40}"
                    )
                if not 0 <= token < vocab:
                    raise RequestError(
                        f"{owner}: prompt[{index}]={token} is outside the vocabulary [0, {vocab})"
                    )
            ids = [int(t) for t in ids]
        else:
            raise RequestError(
                f"{owner}: prompt must be a str, a list of token ids or a list of chat "
                f"messages, got {type(prompt).__name__} {prompt!r:.60}"
            )
        if not ids:
            raise RequestError(f"{owner}: the prompt has no tokens")
        return ids

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its cache; its final output (``finish_reason="abort"``)
        comes with the next ``step()``.

        Raises:
            UnknownRequestError: no unfinished request has that id.
        """
        request = self._requests.get(request_id)
        if request is None:
            raise UnknownRequestError(f"abort: no unfinished request has id {request_id!r}")
        for choice in request.choices:
            self._drop(choice)
            if not choice.finished:
                choice.text.finish("abort")
        # Choices never forked are reported as aborted too.
        for index in range(len(request.choices), request.request_seqs):
            choice = self._new_choice(request, index, list(request.prompt_ids))
            choice.text.finish("abort")
            request.choices.append(choice)
        self._finish_request(request)

    def _drop(self, choice: _Choice) -> None:
        """Take a sequence out of the queues and the cache."""
        if choice in self._running:
            self._running.remove(choice)
        if choice in self._waiting:
            self._waiting.remove(choice)
        self.backend.release(choice)
        if self.drafter is not None:
            self.drafter.release(choice.seq_id)

    def _finish_request(self, request: _Request) -> None:
        request.metrics.finished_time = time.perf_counter()
        self._requests.pop(request.request_id, None)
        self._changed[request.request_id] = request
        self._counters["finished"] += 1

    def _num_waiting_requests(self) -> int:
        """Requests with a sequence waiting for admission (a preempted choice counts its
        request once)."""
        return len({choice.request.request_id for choice in self._waiting})

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    # -- scheduling ------------------------------------------------------------------------

    def _preempt(self, choice: _Choice) -> None:
        self._running.remove(choice)
        self.backend.release(choice)
        if self.drafter is not None:
            self.drafter.release(choice.seq_id)
        choice.num_computed = 0
        self._waiting.appendleft(choice)
        self._counters["preemptions"] += 1

    def _schedule(self) -> list[tuple[_Choice, int]]:
        backend = self.backend
        budget = backend.budget
        plan: list[tuple[_Choice, int]] = []
        prefills = 0
        preempted = False
        index = 0
        while index < len(self._running) and budget > 0:
            choice = self._running[index]
            count = min(choice.target - choice.num_computed, budget, backend.max_row_tokens)
            if count <= 0 or (count > 1 and prefills >= backend.max_prefill_rows):
                index += 1
                continue
            while not backend.fits([*plan, (choice, count)]):
                preempted = True
                victim = self._running[-1]
                self._preempt(victim)
                if victim is choice:
                    break
            else:
                plan.append((choice, count))
                budget -= count
                prefills += count > 1
                index += 1
        rows = self.scheduler_config.max_num_seqs
        while self._waiting and budget > 0 and not preempted:
            choice = self._waiting[0]
            request = choice.request
            seats = request.request_seqs if request.will_fork else 1
            if len(self._running) + seats > rows or prefills >= backend.max_prefill_rows:
                break
            if self._prefix_in_flight(choice):
                break  # admitted next step, it hits the pages being computed now
            cached = backend.admit(choice)
            choice.num_computed = cached
            if request.num_cached_tokens is None:
                request.num_cached_tokens = cached
            if request.will_fork and choice.num_computed >= choice.target:
                self._waiting.popleft()
                self._running.append(choice)
                self._fork(request)
                continue
            count = min(choice.target - choice.num_computed, budget, backend.max_row_tokens)
            if not backend.fits([*plan, (choice, count)]):
                backend.release(choice)
                choice.num_computed = 0
                break
            self._waiting.popleft()
            self._running.append(choice)
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = time.perf_counter()
            plan.append((choice, count))
            budget -= count
            prefills += count > 1
        # Rows that prefill come first: attention lays them out at full width.
        plan.sort(key=lambda entry: entry[1] == 1)
        if self.drafter is not None and plan and not preempted:
            plan = self._speculate(plan)
        return plan

    def _speculate(self, plan: list[tuple[_Choice, int]]) -> list[tuple[_Choice, int]]:
        """Turn a step in which every sequence decodes into a verification step: each gets the
        drafts its drafter proposes (at most ``num_draft_tokens``, none past its ``max_tokens``
        or ``max_model_len``, all within the step's token budget). Unchanged when a sequence
        prefills or no drafter proposes anything."""
        if any(
            count != 1 or choice.num_computed + 1 != len(choice.tokens) for choice, count in plan
        ):
            return plan
        k = self.speculative.num_draft_tokens
        spare = self.backend.budget - len(plan)
        asks = []
        for choice, _ in plan:
            left = choice.request.sampling.max_tokens - len(choice.generated) - 1
            room = self.max_model_len - len(choice.tokens)
            asks.append(DraftRequest(choice.seq_id, choice.tokens, max(0, min(k, left, room))))
        proposals = self.drafter.propose(asks)
        verify = []
        for (choice, _), ask, drafts in zip(plan, asks, proposals, strict=True):
            drafts = [int(t) for t in drafts[: min(ask.max_drafts, spare)]]
            spare -= len(drafts)
            verify.append((choice, drafts))
        if not any(drafts for _, drafts in verify):
            return plan
        vocab = self.model.vocab_size
        for _, drafts in verify:
            if any(not 0 <= t < vocab for t in drafts):
                raise ValueError(
                    f"Engine: the drafter proposed token ids outside [0, {vocab}): {drafts}"
                )
        for choice, drafts in verify:
            if drafts:
                self.backend.speculate(choice, drafts)
                choice.tokens.extend(drafts)
                choice.drafts = drafts
        planned = [(choice, 1 + len(drafts)) for choice, drafts in verify]
        if self.backend.fits(planned):
            return planned
        for choice, drafts in verify:  # no pages for the drafts: decode plainly
            if drafts:
                self._forget_drafts(choice, len(choice.tokens) - len(drafts))
        return plan

    def _forget_drafts(self, choice: _Choice, keep: int) -> None:
        """The sequence keeps its first ``keep`` tokens (``keep`` at least its tokens before
        this step's drafts)."""
        self.backend.rollback(choice, keep)
        del choice.tokens[keep:]
        choice.num_computed = min(choice.num_computed, keep)
        choice.drafts = []

    def _prefix_in_flight(self, choice: _Choice) -> bool:
        """Whether a running sequence is still computing the first page of ``choice``'s
        prompt (same tokens, same salt): admitted a step later, it gets that page from the
        prefix cache instead of computing it again."""
        backend = self.backend
        size = getattr(backend, "page_size", 0)
        if not size or not backend.prefix_caching or len(choice.tokens) <= size:
            return False
        head = choice.tokens[:size]
        return any(
            other.num_computed < size
            and other.cache_salt == choice.cache_salt
            and other.tokens[:size] == head
            for other in self._running
        )

    def _fork(self, request: _Request) -> None:
        """The prompt is computed up to its last token: start the other choices from it."""
        parent = request.choices[0]
        request.will_fork = False
        position = self._running.index(parent) + 1
        for index in range(1, request.request_seqs):
            child = self._new_choice(request, index, list(parent.tokens))
            child.num_computed = parent.num_computed
            self.backend.fork(parent, child)
            request.choices.append(child)
            self._running.insert(position, child)
            position += 1

    # -- steps -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; the outputs of every request that changed (new tokens, finished,
        aborted)."""
        plan = self._schedule()
        if plan:
            self._run(plan)
        pages = self.backend.pages_used
        self._peak_pages = max(self._peak_pages, pages)
        changed = list(self._changed.values())
        self._changed.clear()
        return [self._output(request) for request in changed]

    def _on_compile(self, seconds: float) -> None:
        self.compile_seconds += seconds
        self._counters["compiled"] += 1

    def _run(self, plan: list[tuple[_Choice, int]]) -> None:
        verify = any(choice.drafts for choice, _ in plan)
        try:
            logits, rows = self.backend.run(plan, self._on_compile, verify=verify)
        except BaseException:
            # The step's sequences may be half written: their requests end as aborted (their
            # outputs come with the next step) and the error goes to the caller.
            for request in {id(c.request): c.request for c, _ in plan}.values():
                if request.request_id in self._requests:
                    self.abort(request.request_id)
            raise
        self._counters["steps"] += 1
        self._counters["verify_steps"] += verify
        draws: list[tuple[_Choice, int]] = []
        forks: list[_Request] = []
        for (choice, count), row in zip(plan, rows, strict=True):
            choice.num_computed += count
            self._counters["computed_tokens"] += count
            if choice.num_computed == len(choice.tokens):
                draws.append((choice, row))
            elif choice.request.will_fork and choice.num_computed == choice.target:
                forks.append(choice.request)
        for request in forks:
            self._fork(request)
        if draws:
            self._draw(logits, draws)

    @staticmethod
    def _positions(draws: list[tuple[_Choice, int]]) -> list[tuple[_Choice, int, int]]:
        """``(choice, logits row, offset)`` of every token to draw: one per choice, or in a
        verification step one after its last token and after each of its drafts."""
        return [
            (choice, row + offset, offset)
            for choice, row in draws
            for offset in range(len(choice.drafts) + 1)
        ]

    def _knobs(self, draws: list[tuple[_Choice, int, int]], rows: int) -> dict[str, jax.Array]:
        vocab = self.model.vocab_size
        arrays = {
            "temperature": np.zeros(rows, np.float32),
            "top_k": np.full(rows, vocab, np.int32),
            "top_p": np.ones(rows, np.float32),
            "min_p": np.zeros(rows, np.float32),
            "repetition": np.ones(rows, np.float32),
            "presence": np.zeros(rows, np.float32),
            "frequency": np.zeros(rows, np.float32),
            "seed": np.zeros(rows, np.int32),
            "choice": np.zeros(rows, np.int32),
            "counter": np.zeros(rows, np.int32),
        }
        for choice, row, offset in draws:
            s = choice.request.sampling
            arrays["temperature"][row] = s.temperature
            arrays["top_k"][row] = vocab if s.top_k is None else min(s.top_k, vocab)
            arrays["top_p"][row] = s.top_p
            arrays["min_p"][row] = s.min_p
            arrays["repetition"][row] = s.repetition_penalty
            arrays["presence"][row] = s.presence_penalty
            arrays["frequency"][row] = s.frequency_penalty
            arrays["seed"][row] = choice.request.seed
            arrays["choice"][row] = choice.index
            # The i-th token after a verification's last computed token is output token
            # len(generated) + i: the PRNG stream plain decoding would draw it with.
            arrays["counter"][row] = len(choice.generated) + offset
        return {name: jnp.asarray(array) for name, array in arrays.items()}

    def _history(self, draws: list[tuple[_Choice, int, int]], rows: int) -> tuple[jax.Array, ...]:
        vocab = self.model.vocab_size
        seen = np.zeros((rows, vocab), bool)
        counts = np.zeros((rows, vocab), np.int32)
        for choice, row, offset in draws:
            if choice.request.sampling.uses_penalties:
                # What plain decoding would have seen: everything before this draft position.
                known = len(choice.tokens) - len(choice.drafts) + offset
                seen[row, choice.tokens[:known]] = True
                output = choice.generated + choice.drafts[:offset]
                if output:
                    counts[row] = np.bincount(output, minlength=vocab)
        return jnp.asarray(seen), jnp.asarray(counts)

    def _draw(self, logits: jax.Array, draws: list[tuple[_Choice, int]]) -> None:
        rows = logits.shape[0]
        positions = self._positions(draws)
        settings = [choice.request.sampling for choice, _ in draws]
        penalties = any(s.uses_penalties for s in settings)
        wanted = [s.logprobs for s in settings if s.logprobs is not None]
        num_logprobs = None if not wanted else max(wanted)
        tokens, logprobs = sample_rows(
            logits,
            self._knobs(positions, rows),
            self._history(positions, rows) if penalties else None,
            penalties=penalties,
            num_logprobs=num_logprobs,
            any_sampled=any(not s.greedy for s in settings),
        )
        tokens = fetch(tokens)
        if logprobs is not None:
            logprobs = [fetch(a) for a in logprobs]
        if any(choice.logits is not None for choice, _ in draws):
            logits = fetch(logits)
        now = time.perf_counter()
        for choice, row in draws:
            drafts = choice.drafts
            sampled = [int(t) for t in tokens[row : row + len(drafts) + 1]]
            accepted = accepted_length(sampled, drafts)
            if drafts:
                # Keep the drafts the model agrees with; the rest are rolled back.
                self._counters["verified_sequences"] += 1
                self._counters["draft_tokens"] += len(drafts)
                self._counters["accepted_tokens"] += accepted
                self._forget_drafts(choice, len(choice.tokens) - len(drafts) + accepted)
            for offset, token in enumerate(sampled[: accepted + 1]):
                self._emit(choice, token, row + offset, logits, logprobs, now)
                if choice.finished:
                    self._drop(choice)
                    break
                if offset == accepted:  # the model's own token: not computed yet
                    choice.tokens.append(token)
                    self.backend.append(choice, token)
            if choice.request.finished:
                self._finish_request(choice.request)

    def _emit(
        self,
        choice: _Choice,
        token: int,
        row: int,
        logits: Any,
        logprobs: list[np.ndarray] | None,
        now: float,
    ) -> None:
        """Record one drawn token (drawn from ``logits[row]``) as the choice's next output."""
        request = choice.request
        if choice.logits is not None:
            choice.logits.append(np.asarray(logits[row], np.float32))
        if choice.logprobs is not None and logprobs is not None:
            chosen, top_ids, top_values = logprobs
            n = request.sampling.logprobs
            pairs = zip(top_ids[row, :n], top_values[row, :n], strict=True)
            top = tuple((int(i), float(p)) for i, p in pairs)
            choice.logprobs.append(TokenLogprob(token, float(chosen[row]), top))
        choice.generated.append(token)
        self._counters["generated_tokens"] += 1
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
        if choice.index == 0:
            request.metrics.token_times.append(now)
        choice.text.push(token, request.sampling.max_tokens)
        self._changed[request.request_id] = request

    def _output(self, request: _Request) -> RequestOutput:
        outputs = []
        for choice in request.choices:
            text = choice.emitted_text
            tokens = choice.text.token_ids
            outputs.append(
                CompletionOutput(
                    index=choice.index,
                    text=text,
                    token_ids=list(tokens),
                    new_text=text[choice.reported_text :],
                    new_token_ids=list(tokens[choice.reported_tokens :]),
                    finish_reason=choice.text.finish_reason,
                    logprobs=None if choice.logprobs is None else list(choice.logprobs),
                )
            )
            choice.reported_text = len(text)
            choice.reported_tokens = len(tokens)
        finished = request.finished
        logits = None
        if finished and request.output_logits:
            logits = [
                np.stack(c.logits) if c.logits else np.zeros((0, self.model.vocab_size))
                for c in request.choices
            ]
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=list(request.prompt_ids),
            outputs=outputs,
            finished=finished,
            num_cached_tokens=request.num_cached_tokens or 0,
            metrics=request.metrics,
            logits=logits,
        )

    # -- conveniences ----------------------------------------------------------------------

    def stream(self, request_id: str) -> Iterator[RequestOutput]:
        """Run steps until ``request_id`` finishes, yielding each of its outputs (other
        requests advance too; their outputs are dropped here)."""
        if request_id not in self._requests:
            raise UnknownRequestError(f"stream: no unfinished request has id {request_id!r}")
        while True:
            for output in self.step():
                if output.request_id == request_id:
                    yield output
                    if output.finished:
                        return

    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run ``prompts`` to completion (beside whatever else is queued); their final outputs
        in order."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise RequestError(f"generate: prompts must be a non-empty list, got {prompts!r:.60}")
        if sampling is None or isinstance(sampling, SamplingParams):
            sampling = [sampling] * len(prompts)
        if len(sampling) != len(prompts):
            raise RequestError(
                f"generate: {len(sampling)} sampling settings for {len(prompts)} prompts"
            )
        ids = [self.add_request(p, s) for p, s in zip(prompts, sampling, strict=True)]
        wanted = set(ids)
        results: dict[str, RequestOutput] = {}
        while wanted - results.keys():
            for output in self.step():
                if output.request_id in wanted and output.finished:
                    results[output.request_id] = output
        return [results[i] for i in ids]

    def warmup(self, progress: Progress | None = None) -> float:
        """Compile every step shape (and the sampler's common forms) now; seconds spent."""
        shapes = self.backend.shapes()
        start = time.perf_counter()
        for number, shape in enumerate(shapes, 1):
            if progress is not None:
                progress(f"compiling step shape {number}/{len(shapes)} ({shape[0]} tokens)")
            seconds = self.backend.warm(shape)
            if seconds:
                self._on_compile(seconds)
        rows = self.backend.rows
        widths = [1] if self.speculative is None else [1, self.speculative.verify_width]
        for width in widths:
            logits = jnp.zeros((rows * width, self.model.vocab_size), jnp.float32)
            knobs = self._knobs([], rows * width)
            for any_sampled in (False, True):
                sample_rows(
                    logits, knobs, None, penalties=False, num_logprobs=None, any_sampled=any_sampled
                )[0].block_until_ready()
        return time.perf_counter() - start

    # -- prefixes on disk ------------------------------------------------------------------

    def _prefix_backend(self, owner: str) -> Any:
        backend = self.backend
        if backend.kind == "paged" and not backend.prefix_caching:
            raise ValueError(
                f"{owner}: a saved prompt is loaded into the prefix cache of the paged backend; "
                "this engine runs CacheConfig(enable_prefix_caching=False)"
            )
        return backend

    def load_prefix(
        self, path: str | os.PathLike[str], prompt: Prompt | None = None, *, cache_salt=None
    ) -> PrefixFile:
        """Load a prompt cache file (``save_prefix``) so that requests whose prompt starts like
        the saved one (with the same ``cache_salt``) prefill only the rest.

        Paged: the file's full pages that ``prompt`` starts with (all of them for ``None``)
        become cached prefix pages, reused by normal prefix matching; pages already cached are
        kept, pages the pool cannot take are not loaded. Contiguous: the saved row is held, and
        a request admitted later starts from a copy of it cut to the prefix it shares with the
        saved prompt. Either way the last prompt token is computed again (its logits are drawn
        from), and the output is what it would have been without the file.

        Returns:
            A ``PrefixFile``: the tokens saved, and those ``prompt`` shares with them that can be
            reused (paged: in whole pages now cached).

        Raises:
            ValueError: a paged engine without prefix caching, or a malformed prompt.
            FileNotFoundError: no such file.
            jaxkv.io.CacheFileError: the file is damaged or truncated
                (``CacheFileCorruptedError``), of a newer layout, saved for another model,
                tokenizer, chat template, dtype, codec or page size
                (``FingerprintMismatchError``) or from another cache layout
                (``CacheTargetMismatchError``); nothing changes.
        """
        backend = self._prefix_backend("load_prefix")
        ids = None if prompt is None else self._encode(prompt)
        load = load_prefix_file if backend.kind == "paged" else load_row_prefix
        return load(backend, backend.fingerprint, os.fspath(path), ids, cache_salt)

    def save_prefix(
        self, path: str | os.PathLike[str], prompt: Prompt, *, cache_salt=None
    ) -> PrefixFile:
        """Save the KV of ``prompt``, computed by a request that ran it, to ``path``
        (atomically) for ``load_prefix`` in a later run: paged, its cached full pages;
        contiguous, the row of the last request with that prompt cut to the prompt. Saves
        nothing (and leaves ``path`` alone) when no such pages or row remain.

        Raises:
            ValueError: a paged engine without prefix caching, or a malformed prompt.
            OSError: the file cannot be written (``path`` is left as it was).
        """
        backend = self._prefix_backend("save_prefix")
        save = save_prefix_file if backend.kind == "paged" else save_row_prefix
        return save(backend, backend.fingerprint, os.fspath(path), self._encode(prompt), cache_salt)

    def persist_prefix_cache(self) -> int:
        """With ``CacheConfig(prefix_cache_dir=...)``: write every page of the prefix cache not
        yet on disk there (a server does this when it stops, so a restart finds them); pages
        written (0 without a directory)."""
        persist = getattr(self.backend, "persist_prefixes", None)
        return 0 if persist is None else persist()

    def stats(self) -> EngineStats:
        backend = self.backend
        manager = getattr(backend, "manager", None)
        page_stats = manager.stats() if manager is not None else None
        directory = getattr(backend, "directory", None)
        return EngineStats(
            num_running=len(self._running),
            num_waiting=self._num_waiting_requests(),
            num_pages=manager.num_pages if manager is not None else 0,
            num_pages_used=manager.num_used_pages if manager is not None else 0,
            num_pages_free=manager.num_available_pages if manager is not None else 0,
            prefix_query_tokens=page_stats.prefix_query_tokens if page_stats else 0,
            prefix_hit_tokens=page_stats.prefix_hit_tokens if page_stats else 0,
            num_preemptions=self._counters["preemptions"],
            num_steps=self._counters["steps"],
            num_finished=self._counters["finished"],
            num_prompt_tokens=self._counters["prompt_tokens"],
            num_generated_tokens=self._counters["generated_tokens"],
            num_compiled_shapes=self._counters["compiled"],
            peak_pages_used=self._peak_pages,
            num_verify_steps=self._counters["verify_steps"],
            num_verified_sequences=self._counters["verified_sequences"],
            num_draft_tokens=self._counters["draft_tokens"],
            num_accepted_tokens=self._counters["accepted_tokens"],
            num_computed_tokens=self._counters["computed_tokens"],
            **directory_stats(directory, getattr(backend, "page_size", 0)),
        )


__all__ = ["Engine"]
