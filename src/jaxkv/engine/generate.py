"""Text generation with the reference Llama model through jaxkv caches.

``Model.load()`` reads a GGUF checkpoint (the bundled SmolLM2 by default) and its tokenizer;
``generate(model, prompts, ...)`` runs a batch of prompts of different lengths through a
contiguous or paged cache: one jitted prefill, then one jitted step per new token, with the cache
donated so every write is in place. ``ChatSession`` keeps a conversation's cache across turns and
prefills only what each new turn adds.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv import _validation as v
from jaxkv.caches import TransformerCache, TransformerCacheMetadata, TransformerMetadata
from jaxkv.engine.sampling import SamplingParams, sample_dynamic
from jaxkv.models.config import LlamaConfig
from jaxkv.models.llama import Params, forward, params_to_device
from jaxkv.quantization import CODECS

CacheKind = Literal["contiguous", "paged"]
CACHE_KINDS = ("contiguous", "paged")
TextCallback = Callable[[int, str], None]
"""``on_text(row, new_text)``: called as each row's text grows."""


def _next_power_of_two(n: int, minimum: int = 16) -> int:
    size = minimum
    while size < n:
        size *= 2
    return size


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded checkpoint: config, device params and tokenizer."""

    config: LlamaConfig
    params: Params
    tokenizer: Any
    path: str
    dtype: np.dtype

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, dtype: Any = "float32") -> Model:
        """Load a Llama-architecture GGUF (default: the bundled SmolLM2-135M-Instruct).

        Args:
            path: a GGUF file, or ``None`` for the default model.
            dtype: weight and activation dtype, ``"float32"`` or ``"bfloat16"``.
        """
        from jaxkv.io.gguf import default_model_path, load_gguf
        from jaxkv.io.tokenizer import Tokenizer

        resolved = default_model_path() if path is None else path
        dtype = v.require_float_dtype("Model.load", "dtype", dtype)
        config, params = load_gguf(resolved, dtype=np.float32)
        tokenizer = Tokenizer.from_gguf(resolved)
        return cls(config, params_to_device(params, dtype), tokenizer, str(resolved), dtype)


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
    """

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logits: np.ndarray | None = None


@dataclasses.dataclass
class GenerationResult:
    """All rows' generations plus timing: ``prefill_seconds`` (first token included),
    ``decode_seconds`` and the decode rate over the tokens after the first."""

    generations: list[Generation]
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    compile_seconds: float = 0.0

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


@functools.partial(jax.jit, static_argnames=("config", "greedy"), donate_argnames=("cache",))
def model_step(
    params, cache, token_ids, runtime, logits_indices, key, sampling, *, config, greedy
):
    """One jitted forward + sampling step: ``(next_tokens [rows], logits [rows, vocab], cache)``.

    ``sampling`` is ``(temperature, top_k, top_p)`` as arrays (ignored when ``greedy``)."""
    logits, cache = forward(
        params, config, token_ids, cache, runtime, logits_indices=logits_indices
    )
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits, cache
    temperature, top_k, top_p = sampling
    return sample_dynamic(logits, key, temperature, top_k, top_p), logits, cache


def sampling_arrays(sampling: SamplingParams, vocab_size: int) -> tuple[jax.Array, ...]:
    """``(temperature, top_k, top_p)`` as arrays for ``model_step``."""
    top_k = vocab_size if sampling.top_k is None else min(sampling.top_k, vocab_size)
    temperature = sampling.temperature if sampling.temperature > 0 else 1.0
    return (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(sampling.top_p))


_COMPILED: dict[Any, Any] = {}


def compiled_step(config: LlamaConfig, greedy: bool, *args: Any) -> tuple[Any, float]:
    """``model_step`` compiled ahead of time for these argument shapes, and the seconds spent
    compiling (0.0 when an earlier call already compiled it). Timings of generation then measure
    running, not compiling."""
    leaves, treedef = jax.tree_util.tree_flatten(args[1:])  # params are the same for a model
    signature = (
        config, greedy, id(args[0]), treedef,
        tuple((leaf.shape, leaf.dtype) for leaf in leaves),
    )
    if signature in _COMPILED:
        return _COMPILED[signature], 0.0
    start = time.perf_counter()
    compiled = model_step.lower(*args, config=config, greedy=greedy).compile()
    if len(_COMPILED) > 32:
        _COMPILED.clear()
    _COMPILED[signature] = compiled
    return compiled, time.perf_counter() - start


class _RowState:
    """Host-side progress of one row: tokens, streamed text, stop handling."""

    def __init__(self, row: int, prompt_ids, tokenizer, eos_ids, stop, on_text):
        self.row = row
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

    def _finish(self, reason: str) -> None:
        if reason != "stop":
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


def _check_prompts(model: Model, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(
            f"generate: prompts must be a non-empty list of strings or token-id lists, "
            f"got {prompts!r}"
        )
    encoded = []
    for index, prompt in enumerate(prompts):
        ids = model.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError(f"generate: prompts[{index}] is empty")
        bad = [t for t in ids if not isinstance(t, int | np.integer) or not
               0 <= t < model.config.vocab_size]
        if bad:
            raise ValueError(
                f"generate: prompts[{index}] has token ids outside [0, "
                f"{model.config.vocab_size}): {bad[:5]}"
            )
        encoded.append([int(t) for t in ids])
    return encoded


def generate(
    model: Model,
    prompts: Sequence[str | Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int = 0,
    stop: Sequence[str] = (),
    cache: CacheKind = "contiguous",
    on_text: TextCallback | None = None,
    page_size: int = 16,
    ignore_eos: bool = False,
    output_logits: bool = False,
    kv_quantization: str = "none",
) -> GenerationResult:
    """Generate continuations of a batch of prompts.

    Args:
        model: from ``Model.load``.
        prompts: strings (tokenized without BOS, as the checkpoint says) or token-id lists;
            lengths may differ.
        max_new_tokens: most tokens generated per prompt.
        temperature, top_k, top_p, seed: sampling (``temperature=0``: greedy).
        stop: strings that end a row's generation (excluded from its text).
        cache: ``"contiguous"`` (one row per prompt) or ``"paged"`` (a shared page pool).
        on_text: streaming callback ``on_text(row, new_text)``.
        page_size: tokens per page of the paged cache.
        ignore_eos: keep generating past EOS tokens (benchmarks use this to produce exactly
            ``max_new_tokens`` tokens).
        output_logits: keep each step's logits in ``Generation.logits``.
        kv_quantization: KV storage codec, one of ``jaxkv.quantization.CODECS``.

    Returns:
        A ``GenerationResult`` with one ``Generation`` per prompt and timings.
    """
    v.require_int("generate", "max_new_tokens", max_new_tokens, minimum=1)
    v.require_choice("generate", "cache", cache, CACHE_KINDS)
    v.require_choice("generate", "kv_quantization", kv_quantization, CODECS)
    if isinstance(stop, str) or any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"generate: stop must be a list of non-empty strings, got {stop!r}")
    sampling = SamplingParams(temperature, top_k, top_p, seed)
    prompt_ids = _check_prompts(model, prompts)
    longest = max(len(p) for p in prompt_ids) + max_new_tokens
    if longest > model.config.max_position_embeddings:
        raise ValueError(
            f"generate: prompt + max_new_tokens = {longest} tokens exceeds the model's context "
            f"of {model.config.max_position_embeddings}"
        )
    eos_ids = frozenset(model.tokenizer.eos_token_ids) | frozenset(model.config.eos_token_ids)
    if ignore_eos:
        eos_ids = frozenset()
    rows = [
        _RowState(i, ids, model.tokenizer, eos_ids, tuple(stop), on_text)
        for i, ids in enumerate(prompt_ids)
    ]
    if output_logits:
        for row in rows:
            row.logits = []
    runner = _ContiguousRunner if cache == "contiguous" else _paged_runner()
    return runner(
        model, sampling, page_size=page_size, kv_quantization=kv_quantization
    ).run(rows, max_new_tokens)


class _ContiguousRunner:
    """Rows of a ``TransformerCache``; prompts right-padded to a power-of-two bucket."""

    def __init__(
        self, model: Model, sampling: SamplingParams, *, kv_quantization: str = "none", **_: Any
    ):
        self.model = model
        self.sampling = sampling
        self.kv_quantization = kv_quantization

    def run(self, rows: list[_RowState], max_new_tokens: int) -> GenerationResult:
        model, config = self.model, self.model.config
        batch = len(rows)
        lengths = np.array([len(r.prompt_ids) for r in rows], np.int32)
        bucket = _next_power_of_two(int(lengths.max()))
        # Power-of-two capacities: runs of similar sizes share one compiled step.
        capacity = _next_power_of_two(int(lengths.max()) + max_new_tokens, 256)
        metadata = TransformerCacheMetadata.create(
            batch, capacity, config.num_layers, config.num_kv_heads, config.head_dim,
            dtype=model.dtype, kv_quantization=self.kv_quantization,
        )
        cache = TransformerCache.init_cache(metadata)
        tokens = np.zeros((batch, bucket), np.int32)
        for i, r in enumerate(rows):
            tokens[i, : lengths[i]] = r.prompt_ids
        key, subkey = jax.random.split(jax.random.key(self.sampling.seed))
        knobs = sampling_arrays(self.sampling, config.vocab_size)
        greedy = self.sampling.greedy
        prefill_args = (
            model.params, cache, jnp.asarray(tokens), TransformerMetadata.create(lengths),
            jnp.asarray(lengths - 1), subkey, knobs,
        )
        prefill, compile_seconds = compiled_step(config, greedy, *prefill_args)
        active = jnp.ones((batch,), jnp.int32)
        zeros = jnp.zeros((batch,), jnp.int32)
        decode, seconds = compiled_step(
            config, greedy, model.params, cache, jnp.zeros((batch, 1), jnp.int32),
            TransformerMetadata.create(active), zeros, subkey, knobs,
        )
        compile_seconds += seconds

        start = time.perf_counter()
        next_tokens, logits, cache = prefill(*prefill_args)
        next_tokens = np.asarray(next_tokens)
        prefill_seconds = time.perf_counter() - start
        keep_logits = rows[0].logits is not None
        for r, token in zip(rows, next_tokens, strict=True):
            if keep_logits:
                r.record(logits[r.row])
            r.push(int(token), max_new_tokens)

        start = time.perf_counter()
        steps = 0
        while any(r.active for r in rows):
            active = np.array([r.active for r in rows], np.int32)
            if not greedy:  # greedy steps ignore the key: skip a dispatch per step
                key, subkey = jax.random.split(key)
            next_tokens, logits, cache = decode(
                model.params, cache, jnp.asarray(next_tokens[:, None]),
                TransformerMetadata.create(active), zeros, subkey, knobs,
            )
            next_tokens = np.asarray(next_tokens)
            steps += 1
            for r, token in zip(rows, next_tokens, strict=True):
                if r.active:
                    if keep_logits:
                        r.record(logits[r.row])
                    r.push(int(token), max_new_tokens)
        decode_seconds = time.perf_counter() - start
        cache.check_overflow()
        return GenerationResult(
            [r.result() for r in rows], prefill_seconds, decode_seconds, steps, compile_seconds
        )


def _paged_runner():
    from jaxkv.engine.paged import PagedRunner

    return PagedRunner


class ChatSession:
    """A conversation with the model that keeps its KV cache across turns.

    Each ``send`` renders the whole conversation with the checkpoint's chat template, keeps the
    cached prefix it shares with what is already in the cache, and prefills only the rest.
    """

    def __init__(
        self,
        model: Model,
        *,
        system: str | None = None,
        max_length: int = 4096,
        sampling: SamplingParams | None = None,
    ):
        v.require_int("ChatSession", "max_length", max_length, minimum=16)
        self.model = model
        self.sampling = sampling or SamplingParams()
        self.messages: list[dict[str, str]] = []
        if system:
            self.messages.append({"role": "system", "content": system})
        config = model.config
        metadata = TransformerCacheMetadata.create(
            1, min(max_length, config.max_position_embeddings), config.num_layers,
            config.num_kv_heads, config.head_dim, dtype=model.dtype,
        )
        self.cache = TransformerCache.init_cache(metadata)
        self.cached_ids: list[int] = []
        self.key = jax.random.key(self.sampling.seed)
        self.last_prefill_tokens = 0

    def send(
        self, text: str, *, max_new_tokens: int = 256, on_text: Callable[[str], None] | None = None
    ) -> str:
        """Add a user turn, generate the assistant's reply and return it."""
        if not isinstance(text, str):
            raise TypeError(f"ChatSession.send: text must be a str, got {type(text).__name__}")
        model, config = self.model, self.model.config
        messages = [*self.messages, {"role": "user", "content": text}]
        prompt = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = model.tokenizer.encode(prompt)
        capacity = self.cache[0].metadata.max_length
        if len(ids) + max_new_tokens > capacity:
            raise ValueError(
                f"ChatSession.send: the conversation ({len(ids)} tokens) plus max_new_tokens="
                f"{max_new_tokens} would pass the cache's max_length={capacity}"
            )
        shared = 0
        for a, b in zip(ids, self.cached_ids, strict=False):
            if a != b:
                break
            shared += 1
        shared = min(shared, len(ids) - 1)  # the last prompt token must be run for its logits
        self.cache = self.cache.truncate(jnp.asarray([shared], jnp.int32))
        new = ids[shared:]
        self.last_prefill_tokens = len(new)
        bucket = _next_power_of_two(len(new))
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, : len(new)] = new
        knobs = sampling_arrays(self.sampling, config.vocab_size)
        greedy = self.sampling.greedy
        self.key, subkey = jax.random.split(self.key)
        args = (
            model.params, self.cache, jnp.asarray(tokens),
            TransformerMetadata.create([len(new)]), jnp.asarray([len(new) - 1]), subkey, knobs,
        )
        prefill, _ = compiled_step(config, greedy, *args)
        next_token, _, self.cache = prefill(*args)
        one = jnp.ones((1,), jnp.int32)
        zero = jnp.zeros((1,), jnp.int32)
        decode, _ = compiled_step(
            config, greedy, model.params, self.cache, jnp.zeros((1, 1), jnp.int32),
            TransformerMetadata.create(one), zero, subkey, knobs,
        )
        eos_ids = frozenset(model.tokenizer.eos_token_ids) | frozenset(config.eos_token_ids)
        row = _RowState(0, ids, model.tokenizer, eos_ids, (), (lambda _, t: on_text(t))
                        if on_text else None)
        fed = list(ids)
        token = int(np.asarray(next_token)[0])
        row.push(token, max_new_tokens)
        while row.active:
            if not greedy:
                self.key, subkey = jax.random.split(self.key)
            next_token, _, self.cache = decode(
                model.params, self.cache, jnp.asarray([[token]], jnp.int32),
                TransformerMetadata.create(one), zero, subkey, knobs,
            )
            fed.append(token)
            token = int(np.asarray(next_token)[0])
            row.push(token, max_new_tokens)
        self.cached_ids = fed
        reply = row.result().text
        self.messages = [*messages, {"role": "assistant", "content": reply}]
        return reply
