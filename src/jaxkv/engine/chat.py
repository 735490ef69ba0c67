"""A conversation with the model: ``ChatSession`` keeps one engine across turns. On the paged
cache (the default) prefix caching keeps the pages of what was already computed, so each turn
prefills only itself (and a partial page); on the contiguous cache each turn prefills the whole
conversation again.

Besides ``send``, a session can stop a reply halfway (Ctrl-C), drop its oldest turns when the
conversation outgrows the cache, and save and load the conversation as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from jaxkv import _validation as v
from jaxkv._sizes import ceil_div, next_power_of_two
from jaxkv.engine.engine import Engine
from jaxkv.engine.model import ENGINE_MODELS, Model
from jaxkv.engine.requests import (
    CACHE_KINDS,
    CacheConfig,
    RequestError,
    RequestOutput,
    SchedulerConfig,
    UnknownRequestError,
)
from jaxkv.engine.sampling import SamplingParams
from jaxkv.quantization import CODECS

FILE_FORMAT = "jaxkv-chat"
"""The ``"format"`` field of a file ``ChatSession.save`` writes."""

FILE_VERSION = 1

MIN_LENGTH = 16
"""The smallest ``max_length`` a session takes."""

Message = dict[str, str]
"""``{"role": "system" | "user" | "assistant", "content": text}``."""


class ChatSession:
    """A conversation with the model that keeps its KV cache across turns.

    Each ``send`` renders the whole conversation with the checkpoint's chat template (message
    contents encoded as text) and runs it on the engine:

    * ``cache="paged"``: prefix caching keeps the pages of every earlier turn, so only the new
      turn is prefilled;
    * ``cache="contiguous"``: one cache row and no prefix reuse, so every turn prefills the
      whole conversation again (same greedy replies, more prefill work per turn).

    The conversation is ``messages``: an optional system message first, then complete turns
    (a user message and the assistant's reply).

    Args:
        model: from ``Model.load`` (or ``Model.tiny``); a ``HybridModel`` needs
            ``cache="contiguous"``.
        system: an optional system prompt.
        max_length: the longest conversation, in tokens (at least 16; at most the model's
            context).
        sampling: how replies are drawn (default greedy); its ``max_tokens`` is replaced by
            ``send``'s ``max_new_tokens``.
        cache: ``"paged"`` or ``"contiguous"``.
        page_size: tokens per page of the paged cache.
        kv_quantization: KV storage codec (``jaxkv.quantization.CODECS``).
        drop_old_turns: when the conversation plus ``max_new_tokens`` outgrows ``max_length``,
            drop the oldest turns (the system prompt stays) until it fits, instead of refusing
            the message; ``last_dropped_turns`` says how many went.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: an argument out of range (``max_length`` below 16, an unknown ``cache``
            or codec, ``page_size`` outside [1, 4096], a system prompt that is not valid
            UTF-8, a ``HybridModel`` on the paged cache).
    """

    def __init__(
        self,
        model: Model,
        *,
        system: str | None = None,
        max_length: int = 4096,
        sampling: SamplingParams | None = None,
        cache: str = "paged",
        page_size: int = 16,
        kv_quantization: str = "none",
        drop_old_turns: bool = False,
    ):
        owner = "ChatSession"
        if not isinstance(model, ENGINE_MODELS):
            raise TypeError(
                f"{owner}: model must be a jaxkv Model, Gemma3Model or HybridModel, got "
                f"{type(model).__name__}"
            )
        v.require_int(owner, "max_length", max_length, minimum=MIN_LENGTH)
        v.require_choice(owner, "cache", cache, CACHE_KINDS)
        v.require_int(owner, "page_size", page_size, minimum=1, maximum=4096)
        v.require_choice(owner, "kv_quantization", kv_quantization, CODECS)
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise TypeError(
                f"{owner}: sampling must be a SamplingParams or None, got {type(sampling).__name__}"
            )
        if not isinstance(drop_old_turns, bool):
            raise TypeError(f"{owner}: drop_old_turns must be a bool, got {drop_old_turns!r}")
        self.model = model
        self.sampling = sampling or SamplingParams()
        self.drop_old_turns = drop_old_turns
        self.messages: list[Message] = []
        if system:
            self.system = system
        max_length = min(max_length, model.context_length)
        self.max_length = max_length
        self.cache_kind = cache
        self.kv_quantization = kv_quantization
        self.engine = Engine(
            model,
            CacheConfig(
                kind=cache,
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
        self._warm = False
        self._cached: tuple[int, ...] = ()
        self.last_prefill_tokens = 0
        """Tokens the last ``send`` prefilled (the prompt less what the cache served)."""
        self.last_reused_tokens = 0
        """Prompt tokens of the last ``send`` served by the prefix cache (0 on contiguous)."""
        self.last_reply_tokens = 0
        """Tokens of the last reply."""
        self.last_decode_tokens_per_second: float | None = None
        """Decode speed of the last reply (None under two tokens)."""
        self.last_finish_reason: str | None = None
        """Why the last reply ended: ``"eos"``, ``"stop"``, ``"length"``, or ``"abort"`` (it
        was stopped: Ctrl-C)."""
        self.last_dropped_turns = 0
        """Oldest turns the last ``send`` dropped to fit ``max_length``."""

    # -- the conversation ------------------------------------------------------------------

    @property
    def cached_ids(self) -> list[int]:
        """Token ids of the conversation so far, as the model saw them."""
        return list(self._cached)

    @property
    def turns(self) -> int:
        """Complete turns (a user message and its reply) in the conversation."""
        return sum(message["role"] == "assistant" for message in self.messages)

    @property
    def system(self) -> str | None:
        """The system prompt, or None. Setting it replaces the system prompt (None or ``""``
        removes it) and keeps the turns.

        Raises:
            TypeError: the new value is not a str or None.
            ValueError: it is not valid UTF-8 text.
        """
        if self.messages and self.messages[0]["role"] == "system":
            return self.messages[0]["content"]
        return None

    @system.setter
    def system(self, text: str | None) -> None:
        if text is not None:
            _check_text("ChatSession", "system", text)
        turns = self.messages[1:] if self.system is not None else self.messages
        head = [{"role": "system", "content": text}] if text else []
        self.messages = [*head, *turns]
        self._cached = ()

    def reset(self) -> None:
        """Forget the conversation; keep the system prompt."""
        system = self.system
        self.messages = [] if system is None else [{"role": "system", "content": system}]
        self._cached = ()

    def settings(self) -> dict[str, Any]:
        """What shapes the replies, as ``save`` records it."""
        sampling = self.sampling
        return {
            "max_length": self.max_length,
            "cache": self.cache_kind,
            "kv_quantization": self.kv_quantization,
            "temperature": sampling.temperature,
            "top_k": sampling.top_k,
            "top_p": sampling.top_p,
            "seed": sampling.seed,
        }

    def save(self, path: str | os.PathLike, *, settings: Mapping[str, Any] | None = None) -> None:
        """Write the conversation to ``path`` as JSON: ``{"format": "jaxkv-chat", "version": 1,
        "settings": {...}, "messages": [...]}``. The file is replaced atomically (a temporary
        file beside it, then ``os.replace``): a failed save leaves any old file whole.

        Args:
            path: the file to write.
            settings: more settings to record beside ``settings()`` (JSON values).

        Raises:
            TypeError: ``path`` is not a str or path, or ``settings`` not a mapping of JSON
                values.
            OSError: the file cannot be written.
        """
        path = _check_path("ChatSession.save", path)
        recorded = self.settings()
        if settings is not None:
            if not isinstance(settings, Mapping):
                raise TypeError(
                    f"ChatSession.save: settings must be a mapping or None, got "
                    f"{type(settings).__name__}"
                )
            recorded.update(settings)
        document = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "settings": recorded,
            "messages": self.messages,
        }
        try:
            text = json.dumps(document, ensure_ascii=False, indent=2) + "\n"
        except (TypeError, ValueError) as err:
            raise TypeError(f"ChatSession.save: settings must hold JSON values: {err}") from err
        folder = os.path.dirname(os.path.abspath(path))
        handle, temporary = tempfile.mkstemp(
            dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
        )
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def load(self, path: str | os.PathLike) -> None:
        """Replace the conversation (system prompt included) with the one saved in ``path``.
        Only the messages are restored; the file's settings are a record for the reader.

        On any error the conversation is left as it was.

        Args:
            path: a file ``save`` wrote (or any JSON object with a ``"messages"`` list in the
                same shape).

        Raises:
            TypeError: ``path`` is not a str or path.
            OSError: the file cannot be read.
            ValueError: it is not UTF-8 JSON, or not a conversation: a JSON object whose
                ``"messages"`` are an optional system message, then user and assistant
                messages in turn, ending with an assistant's.
        """
        owner = "ChatSession.load"
        path = _check_path(owner, path)
        with open(path, "rb") as file:
            raw = file.read()
        try:
            document = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{owner}: {path} is not UTF-8 text (byte {err.start} is 0x{raw[err.start]:02X})"
            ) from None
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{owner}: {path} is not valid JSON ({err.msg} at line {err.lineno} column "
                f"{err.colno})"
            ) from None
        if not isinstance(document, dict) or "messages" not in document:
            raise ValueError(
                f"{owner}: {path} holds no conversation: expected a JSON object with a "
                f'"messages" list, got {_kind(document)}'
            )
        found = document.get("format", FILE_FORMAT)
        if found != FILE_FORMAT:
            raise ValueError(f'{owner}: {path} has "format": {found!r}, expected {FILE_FORMAT!r}')
        messages = _check_conversation(f"{owner}: {path}", document["messages"])
        self.messages = messages
        self._cached = ()

    # -- turns -----------------------------------------------------------------------------

    def warmup(self, progress: Callable[[str], None] | None = None) -> None:
        """Compile every step shape now (the first ``send`` does it otherwise).

        Args:
            progress: called with a line per shape compiled.
        """
        self.engine.warmup(progress)
        self._warm = True

    def send(
        self, text: str, *, max_new_tokens: int = 256, on_text: Callable[[str], None] | None = None
    ) -> str:
        """Add a user turn, generate the assistant's reply and return it.

        A Ctrl-C (``SIGINT``, or a ``KeyboardInterrupt`` raised by ``on_text``) while the reply
        is generated stops it: the engine request is aborted, the text so far is kept as the
        assistant's turn and returned, and ``last_finish_reason`` is ``"abort"``. A reply
        stopped before any token (or before it was sent) leaves the conversation as it was and
        returns ``""``. In the main thread the signal is held back for the whole call and acted
        on between steps, so it never lands halfway through the engine's bookkeeping.

        With ``drop_old_turns``, the oldest turns are dropped until the conversation fits
        (``last_dropped_turns``).

        Args:
            text: the user's message (valid UTF-8 text).
            max_new_tokens: most tokens of the reply (at least 1).
            on_text: called with each new piece of the reply as it is generated.

        Raises:
            TypeError: ``text`` is not a str.
            ValueError: ``max_new_tokens`` below 1, ``text`` not valid UTF-8, or the
                conversation plus ``max_new_tokens`` would not fit ``max_length`` (with
                ``drop_old_turns``: even with every earlier turn dropped). The conversation is
                left as it was.
        """
        if not isinstance(text, str):
            raise TypeError(f"ChatSession.send: text must be a str, got {type(text).__name__}")
        v.require_int("ChatSession.send", "max_new_tokens", max_new_tokens, minimum=1)
        sampling = SamplingParams(
            **{**self.sampling.__dict__, "max_tokens": max_new_tokens, "n": 1}
        )
        with _held_interrupts() as interrupts:
            kept, ids, dropped = self._fit(text, max_new_tokens)
            if not self._warm:
                self.warmup()
            if interrupts.pending:  # stopped before it was sent
                self.last_finish_reason, self.last_dropped_turns = "abort", 0
                return ""
            try:
                request_id = self.engine.add_request(ids, sampling)
            except RequestError as err:
                raise ValueError(f"ChatSession.send: {err}") from err
            self.last_dropped_turns = dropped
            final = self._generate(request_id, on_text, interrupts)
        choice = final.outputs[0]
        self.last_finish_reason = choice.finish_reason
        self.last_reused_tokens = final.num_cached_tokens
        self.last_prefill_tokens = len(ids) - final.num_cached_tokens
        self.last_reply_tokens = len(choice.token_ids)
        self.last_decode_tokens_per_second = _decode_speed(final)
        reply = choice.text
        if choice.finish_reason == "abort" and not choice.token_ids:
            return reply  # stopped before a token: nothing to keep
        user = {"role": "user", "content": text}
        self.messages = [*kept, user, {"role": "assistant", "content": reply}]
        self._cached = tuple(ids) + tuple(choice.token_ids)
        return reply

    def _fit(self, text: str, max_new_tokens: int) -> tuple[list[Message], list[int], int]:
        """(the conversation kept, token ids of it plus the new user turn, turns dropped)."""
        kept = list(self.messages)
        head = 1 if self.system is not None else 0
        dropped = 0
        while True:
            ids = self.model.tokenizer.encode_chat([*kept, {"role": "user", "content": text}])
            if len(ids) + max_new_tokens <= self.max_length:
                return kept, ids, dropped
            if not self.drop_old_turns or len(kept) - head < 2:
                alone = ", every earlier turn dropped" if self.drop_old_turns and dropped else ""
                raise ValueError(
                    f"ChatSession.send: the conversation ({len(ids)} tokens{alone}) plus "
                    f"max_new_tokens={max_new_tokens} would pass the cache's "
                    f"max_length={self.max_length}"
                )
            del kept[head : head + 2]  # the oldest user message and its reply
            dropped += 1

    def _generate(
        self,
        request_id: str,
        on_text: Callable[[str], None] | None,
        interrupts: _Interrupts,
    ) -> RequestOutput:
        """Run the request to its end, or until a Ctrl-C; its final output."""
        final = None
        stopped = False
        try:
            for output in self.engine.stream(request_id):
                final = output
                piece = output.outputs[0].new_text
                if on_text is not None and piece:
                    on_text(piece)
                if interrupts.pending and not output.finished:
                    stopped = True
                    break
        except KeyboardInterrupt:  # from on_text, or delivered while not held back
            stopped = True
        if stopped:
            with contextlib.suppress(UnknownRequestError):  # a failed step aborts it too
                self.engine.abort(request_id)
            # The aborted request's final output comes with the next step; it may carry the
            # text held back so far (an unfinished character), shown like the rest.
            for output in self.engine.step():
                if output.request_id == request_id:
                    final = output
            piece = final.outputs[0].new_text
            if on_text is not None and piece:
                with contextlib.suppress(KeyboardInterrupt):  # the reply is over anyway
                    on_text(piece)
        return final


def _check_conversation(owner: str, messages: Any) -> list[Message]:
    """``messages`` as a conversation a session holds: an optional system message first, then
    complete turns (a user message, then the assistant's).

    Args:
        owner: who checks, for the error message.
        messages: a list of ``{"role": ..., "content": ...}``.

    Returns:
        a copy: plain dicts with exactly ``role`` and ``content``.

    Raises:
        ValueError: anything else, naming the first message that is wrong and what was
            expected there.
    """
    if not isinstance(messages, list):
        raise ValueError(f"{owner}: messages must be a list, got {_kind(messages)}")
    checked: list[Message] = []
    for index, message in enumerate(messages):
        where = f"{owner}: messages[{index}]"
        if index == 0 and isinstance(message, dict) and message.get("role") == "system":
            expected = "system"
        else:
            turn = index - (1 if checked and checked[0]["role"] == "system" else 0)
            expected = "user" if turn % 2 == 0 else "assistant"
        if not isinstance(message, dict):
            raise ValueError(
                f'{where} must be an object with "role" and "content", got {_kind(message)}'
            )
        role, content = message.get("role"), message.get("content")
        if role != expected:
            raise ValueError(f"{where}: expected role {expected!r}, got {role!r:.40}")
        if not isinstance(content, str):
            raise ValueError(f'{where}: "content" must be a string, got {_kind(content)}')
        try:
            _check_text(where, "content", content)
        except (TypeError, ValueError) as err:
            raise ValueError(str(err)) from None
        checked.append({"role": role, "content": content})
    if checked and checked[-1]["role"] == "user":
        raise ValueError(
            f"{owner}: messages[{len(checked) - 1}] is a user message with no reply; expected "
            "the conversation to end with an assistant message"
        )
    return checked


# -- helpers ------------------------------------------------------------------------------


class _Interrupts:
    pending = False

    def hold(self, signum: int, frame: Any) -> None:
        self.pending = True


@contextlib.contextmanager
def _held_interrupts() -> Iterator[_Interrupts]:
    """Within the block, a SIGINT sets ``pending`` instead of raising ``KeyboardInterrupt``.

    Only in the main thread (the one signals reach), and only over Python's default handler:
    a handler of the program's own is left alone.
    """
    interrupts = _Interrupts()
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield interrupts
        return
    previous = signal.signal(signal.SIGINT, interrupts.hold)
    try:
        yield interrupts
    finally:
        signal.signal(signal.SIGINT, previous)


def _decode_speed(output: RequestOutput) -> float | None:
    """Tokens per second after the first token (which comes with the prefill)."""
    times = output.metrics.token_times
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) / (times[-1] - times[0])


def _check_text(owner: str, name: str, text: Any) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{owner}: {name} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{owner}: {name} is not valid UTF-8 text: position {err.start} holds the lone "
            f"surrogate U+{ord(text[err.start]):04X}"
        ) from None
    return text


def _check_path(owner: str, path: Any) -> str:
    if not isinstance(path, str | os.PathLike) or not os.fspath(path):
        raise TypeError(f"{owner}: path must be a non-empty str or path, got {path!r:.60}")
    return os.fspath(path)


def _kind(value: Any) -> str:
    """A JSON value named for an error message: its type and the start of it."""
    names = {dict: "an object", list: "a list", str: "a string", type(None): "null"}
    name = names.get(type(value), type(value).__name__)
    return f"{name} {json.dumps(value, ensure_ascii=False)[:40]}"


__all__ = ["ChatSession"]
