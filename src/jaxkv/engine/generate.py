"""Text generation with the reference Llama model through jaxkv caches.

``Model.load()`` reads a GGUF checkpoint (the bundled SmolLM2 by default) and its tokenizer;
``generate(model, prompts, ...)`` runs a batch of prompts of different lengths through a
contiguous or paged cache: one jitted prefill, then one jitted step per new token, with the cache
donated so every write is in place. ``ChatSession`` keeps a conversation's cache across turns and
prefills only what each new turn adds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv import _validation as v
from jaxkv._sizes import next_power_of_two
from jaxkv.caches import TransformerCache, TransformerCacheMetadata, TransformerRuntimeMetadata
from jaxkv.engine.contiguous import ContiguousRunner
from jaxkv.engine.model import Model
from jaxkv.engine.outputs import GenerationResult, RowProgress
from jaxkv.engine.paged import PagedRunner
from jaxkv.engine.sampling import SamplingParams
from jaxkv.engine.step import compiled_step, sampling_arrays
from jaxkv.quantization import CODECS

CacheKind = Literal["contiguous", "paged"]
CACHE_KINDS = ("contiguous", "paged")
TextCallback = Callable[[int, str], None]
"""``on_text(row, new_text)``: called as each row's text grows."""


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
        bad = [
            t
            for t in ids
            if not isinstance(t, int | np.integer) or not 0 <= t < model.config.vocab_size
        ]
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
    v.require_int("generate", "page_size", page_size, minimum=1)
    if isinstance(stop, str) or not isinstance(stop, Iterable):
        raise ValueError(f"generate: stop must be a list of non-empty strings, got {stop!r}")
    stop = tuple(stop)  # a generator is read once, here
    if any(not isinstance(s, str) or not s for s in stop):
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
        RowProgress(i, ids, model.tokenizer, eos_ids, tuple(stop), on_text)
        for i, ids in enumerate(prompt_ids)
    ]
    if output_logits:
        for row in rows:
            row.logits = []
    runner = ContiguousRunner if cache == "contiguous" else PagedRunner
    return runner(model, sampling, page_size=page_size, kv_quantization=kv_quantization).run(
        rows, max_new_tokens
    )


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
            1,
            min(max_length, config.max_position_embeddings),
            config.num_layers,
            config.num_kv_heads,
            config.head_dim,
            dtype=model.dtype,
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
        v.require_int("ChatSession.send", "max_new_tokens", max_new_tokens, minimum=1)
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
        bucket = next_power_of_two(len(new), 16)
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, : len(new)] = new
        knobs = sampling_arrays(self.sampling, config.vocab_size)
        greedy = self.sampling.greedy
        self.key, subkey = jax.random.split(self.key)
        args = (
            model.params,
            self.cache,
            jnp.asarray(tokens),
            TransformerRuntimeMetadata.create([len(new)]),
            jnp.asarray([len(new) - 1]),
            subkey,
            knobs,
        )
        prefill, _ = compiled_step(config, greedy, *args)
        next_token, _, self.cache = prefill(*args)
        one = jnp.ones((1,), jnp.int32)
        zero = jnp.zeros((1,), jnp.int32)
        decode, _ = compiled_step(
            config,
            greedy,
            model.params,
            self.cache,
            jnp.zeros((1, 1), jnp.int32),
            TransformerRuntimeMetadata.create(one),
            zero,
            subkey,
            knobs,
        )
        eos_ids = frozenset(model.tokenizer.eos_token_ids) | frozenset(config.eos_token_ids)
        row = RowProgress(
            0, ids, model.tokenizer, eos_ids, (), (lambda _, t: on_text(t)) if on_text else None
        )
        fed = list(ids)
        token = int(np.asarray(next_token)[0])
        row.push(token, max_new_tokens)
        while row.active:
            if not greedy:
                self.key, subkey = jax.random.split(self.key)
            next_token, _, self.cache = decode(
                model.params,
                self.cache,
                jnp.asarray([[token]], jnp.int32),
                TransformerRuntimeMetadata.create(one),
                zero,
                subkey,
                knobs,
            )
            fed.append(token)
            token = int(np.asarray(next_token)[0])
            row.push(token, max_new_tokens)
        self.cached_ids = fed
        reply = row.result().text
        self.messages = [*messages, {"role": "assistant", "content": reply}]
        return reply
