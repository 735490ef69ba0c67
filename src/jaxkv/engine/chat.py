"""A conversation with the model: ``ChatSession`` keeps one paged engine with prefix caching
across turns. Each turn sends the whole conversation, and the pages of what was already computed
are reused, so only the new turn (and a partial page) is prefilled.
"""

from __future__ import annotations

from collections.abc import Callable

from jaxkv import _validation as v
from jaxkv._sizes import ceil_div, next_power_of_two
from jaxkv.engine.engine import Engine
from jaxkv.engine.model import Model
from jaxkv.engine.requests import CacheConfig, RequestError, SchedulerConfig
from jaxkv.engine.sampling import SamplingParams


class ChatSession:
    """A conversation with the model that keeps its KV cache across turns.

    Each ``send`` renders the whole conversation with the checkpoint's chat template (message
    contents encoded as text) and runs it on a paged engine with prefix caching: the pages of
    every earlier turn are still cached, so only the new turn is prefilled.

    Args:
        model: from ``Model.load``.
        system: an optional system prompt.
        max_length: the longest conversation, in tokens (at least 16).
        sampling: how replies are drawn (default greedy); its ``max_tokens`` is replaced by
            ``send``'s ``max_new_tokens``.
        page_size: tokens per page of the cache.
        kv_quantization: KV storage codec.
    """

    def __init__(
        self,
        model: Model,
        *,
        system: str | None = None,
        max_length: int = 4096,
        sampling: SamplingParams | None = None,
        page_size: int = 16,
        kv_quantization: str = "none",
    ):
        v.require_int("ChatSession", "max_length", max_length, minimum=16)
        self.model = model
        self.sampling = sampling or SamplingParams()
        self.messages: list[dict[str, str]] = []
        if system:
            self.messages.append({"role": "system", "content": system})
        max_length = min(max_length, model.config.max_position_embeddings)
        self.max_length = max_length
        self.engine = Engine(
            model,
            CacheConfig(
                page_size=page_size,
                # The conversation, its copy-on-write page, and the last turn's pages kept
                # cached while the next turn is admitted.
                num_pages=2 * ceil_div(max_length, page_size) + 2,
                kv_quantization=kv_quantization,
            ),
            SchedulerConfig(
                max_num_seqs=1,
                max_num_batched_tokens=min(512, next_power_of_two(max_length, 16)),
                max_prefill_seqs=1,
                max_model_len=max_length,
            ),
        )
        self.last_prefill_tokens = 0
        self.turns = 0
        self._cached: tuple[int, ...] = ()

    @property
    def cached_ids(self) -> list[int]:
        """Token ids of the conversation so far, as the model saw them."""
        return list(self._cached)

    def warmup(self, progress: Callable[[str], None] | None = None) -> None:
        """Compile every step shape now (the first ``send`` does it otherwise)."""
        self.engine.warmup(progress)

    def send(
        self, text: str, *, max_new_tokens: int = 256, on_text: Callable[[str], None] | None = None
    ) -> str:
        """Add a user turn, generate the assistant's reply and return it.

        Raises:
            TypeError: ``text`` is not a str.
            ValueError: the conversation plus ``max_new_tokens`` would not fit ``max_length``
                (the conversation is left as it was).
        """
        if not isinstance(text, str):
            raise TypeError(f"ChatSession.send: text must be a str, got {type(text).__name__}")
        v.require_int("ChatSession.send", "max_new_tokens", max_new_tokens, minimum=1)
        messages = [*self.messages, {"role": "user", "content": text}]
        ids = self.model.tokenizer.encode_chat(messages)
        if len(ids) + max_new_tokens > self.max_length:
            raise ValueError(
                f"ChatSession.send: the conversation ({len(ids)} tokens) plus max_new_tokens="
                f"{max_new_tokens} would pass the cache's max_length={self.max_length}"
            )
        self.engine.warmup()
        sampling = SamplingParams(
            **{**self.sampling.__dict__, "max_tokens": max_new_tokens, "n": 1}
        )
        try:
            request_id = self.engine.add_request(ids, sampling)
        except RequestError as err:
            raise ValueError(f"ChatSession.send: {err}") from err
        final = None
        for output in self.engine.stream(request_id):
            choice = output.outputs[0]
            if on_text is not None and choice.new_text:
                on_text(choice.new_text)
            final = output
        choice = final.outputs[0]
        self.last_prefill_tokens = len(ids) - final.num_cached_tokens
        self._cached = tuple(ids) + tuple(choice.token_ids)
        reply = choice.text
        self.messages = [*messages, {"role": "assistant", "content": reply}]
        self.turns += 1
        return reply
