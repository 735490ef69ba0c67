"""The OpenAI wire format: request bodies as strict pydantic models, their translation into the
engine's ``SamplingParams`` and prompts, and the JSON of responses and stream chunks.

Request models refuse unknown fields and values of the wrong JSON type (no coercion of
``"5"`` into 5 or ``true`` into 1); value ranges that the engine defines (temperature >= 0,
top_p in (0, 1] ...) are checked by ``SamplingParams`` so that there is one source of truth.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from jaxkv.engine import CompletionOutput, RequestOutput, SamplingParams, TokenLogprob

MAX_SEED = 2**31 - 1
"""Largest seed: the engine keys its PRNG with int32 seeds."""

MAX_LOGPROBS = 20
"""Most alternatives per token a request may ask for."""

_FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}
_LOWEST_LOGPROB = -9999.0  # what OpenAI reports for a token of probability 0 (JSON has no -inf)


def _brief(value: Any) -> str:
    return f"{type(value).__name__} {value!r:.60}"


def _finite_logprob(logprob: float) -> float:
    return logprob if logprob >= _LOWEST_LOGPROB else _LOWEST_LOGPROB  # NaN fails `>=` too


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(item, int) and not isinstance(item, bool) for item in value
    )


# -- requests -------------------------------------------------------------------------------


class _Body(BaseModel):
    """A request body: unknown fields and loosely typed values are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class _GenerationRequest(_Body):
    """The fields completions and chat completions share."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: tuple[str, ...] = ()
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None  # accepted and ignored
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # Extensions beyond OpenAI's API.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = False
    cache_salt: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
        raise ValueError(f"expected a string or a list of strings, got {_brief(value)}")

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, *, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The engine's settings for this request.

        Raises:
            TypeError, ValueError: a value ``SamplingParams`` refuses (the message names it).
        """

        def given(value: Any, default: Any) -> Any:
            return default if value is None else value

        return SamplingParams(
            temperature=given(self.temperature, 1.0),
            top_k=self.top_k,
            top_p=given(self.top_p, 1.0),
            seed=self.seed,
            min_p=given(self.min_p, 0.0),
            repetition_penalty=given(self.repetition_penalty, 1.0),
            presence_penalty=given(self.presence_penalty, 0.0),
            frequency_penalty=given(self.frequency_penalty, 0.0),
            max_tokens=max_tokens,
            stop=self.stop,
            ignore_eos=bool(self.ignore_eos),
            logprobs=logprobs,
            n=given(self.n, 1),
        )


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``.

    ``prompt`` is a string or a list of token ids (or a list holding exactly one of those);
    several prompts in one request are refused: send one request per prompt, the server
    batches concurrent requests anyway.
    """

    prompt: str | list[int]
    max_tokens: int | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> str | list[int]:
        if isinstance(value, str) or _is_token_ids(value):
            return value
        if isinstance(value, list) and all(isinstance(p, str) or _is_token_ids(p) for p in value):
            if len(value) == 1:
                return value[0]
            raise ValueError(
                f"got a list of {len(value)} prompts; this server takes one prompt per "
                "request (send several requests: they are batched together)"
            )
        raise ValueError(f"expected a string or a list of token ids (ints), got {_brief(value)}")


class ChatMessage(_Body):
    """One message; ``content`` is a string or a list of text parts (joined by newlines)."""

    role: Annotated[str, Field(min_length=1)]
    content: str
    name: str | None = None  # accepted and ignored

    @field_validator("content", mode="before")
    @classmethod
    def _text_content(cls, value: Any) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            texts = []
            for index, part in enumerate(value):
                if (
                    not isinstance(part, dict)
                    or part.keys() != {"type", "text"}
                    or part["type"] != "text"
                    or not isinstance(part["text"], str)
                ):
                    raise ValueError(
                        f"part {index}: only text parts {{'type': 'text', 'text': str}} are "
                        f"supported, got {_brief(part)}"
                    )
                texts.append(part["text"])
            return "\n".join(texts)
        raise ValueError(f"expected a string or a list of text parts, got {_brief(value)}")

    def for_engine(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's current name) or ``max_tokens``.

        Raises:
            ValueError: both are given and differ.
        """
        new, old = self.max_completion_tokens, self.max_tokens
        if new is not None and old is not None and new != old:
            raise ValueError(
                f"max_completion_tokens={new} and max_tokens={old} disagree; give one of them"
            )
        return new if new is not None else old

    def requested_logprobs(self) -> int | None:
        """The engine's ``logprobs``: None when off, else the number of alternatives.

        Raises:
            ValueError: ``top_logprobs`` without ``logprobs: true``.
        """
        if not self.logprobs:
            if self.top_logprobs is not None:
                raise ValueError("top_logprobs requires logprobs: true")
            return None
        return self.top_logprobs or 0


# -- responses ------------------------------------------------------------------------------


def finish_reason(output: CompletionOutput) -> str | None:
    """OpenAI's name for why a choice ended (the engine's ``"eos"`` is ``"stop"``)."""
    if output.finish_reason is None:
        return None
    return _FINISH_REASONS.get(output.finish_reason, output.finish_reason)


def usage(output: RequestOutput) -> dict[str, int]:
    prompt_tokens = len(output.prompt_token_ids)
    completion_tokens = sum(len(choice.token_ids) for choice in output.outputs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class TokenText:
    """The text and UTF-8 bytes of single tokens, as logprobs report them.

    Args:
        decode: ``tokenizer.decode``.
        token_bytes: ``tokenizer.token_bytes``.
    """

    def __init__(self, decode: Callable[[list[int]], str], token_bytes: Callable[[int], bytes]):
        self._decode = decode
        self._token_bytes = token_bytes

    def text(self, token_id: int) -> str:
        return self._decode([token_id])

    def bytes(self, token_id: int) -> list[int]:
        return list(self._token_bytes(token_id))


def completion_logprobs(
    entries: Sequence[TokenLogprob], tokens: TokenText, text_offset: int
) -> dict[str, list]:
    """The completions API's ``logprobs`` object for ``entries``, whose first token starts at
    ``text_offset`` characters into the choice's text."""
    result: dict[str, list] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for entry in entries:
        text = tokens.text(entry.token_id)
        result["tokens"].append(text)
        result["token_logprobs"].append(_finite_logprob(entry.logprob))
        result["top_logprobs"].append({tokens.text(i): _finite_logprob(p) for i, p in entry.top})
        result["text_offset"].append(text_offset)
        text_offset += len(text)
    return result


def chat_logprobs(entries: Sequence[TokenLogprob], tokens: TokenText) -> dict[str, list]:
    """The chat API's ``logprobs`` object (``{"content": [...]}``) for ``entries``."""

    def token(token_id: int, logprob: float) -> dict[str, Any]:
        return {
            "token": tokens.text(token_id),
            "logprob": _finite_logprob(logprob),
            "bytes": tokens.bytes(token_id),
        }

    content = [
        {**token(e.token_id, e.logprob), "top_logprobs": [token(i, p) for i, p in e.top]}
        for e in entries
    ]
    return {"content": content}


def envelope(response_id: str, kind: str, model: str, created: int | None = None) -> dict:
    """The fields every response and chunk starts with."""
    return {
        "id": response_id,
        "object": kind,
        "created": int(time.time()) if created is None else created,
        "model": model,
    }


def error_body(
    message: str, kind: str, *, param: str | None = None, code: str | None = None
) -> dict[str, dict[str, str | None]]:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "MAX_SEED",
    "StreamOptions",
    "TokenText",
    "chat_logprobs",
    "completion_logprobs",
    "envelope",
    "error_body",
    "finish_reason",
    "usage",
]
