"""The OpenAI-compatible HTTP API over an ``EngineRunner``: ``create_app`` builds the FastAPI app.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both streaming as server-sent
events when ``stream`` is true), ``GET /v1/models``, ``GET /v1/models/{model}``, ``GET /health``
and ``GET /metrics`` (Prometheus). With an API key, every route but ``/health`` needs
``Authorization: Bearer <key>``.

Every error is OpenAI's JSON, ``{"error": {"message", "type", "param", "code"}}``: 400 for a
body that is not JSON, an unknown field, a bad value or a prompt the engine refuses; 401 for a
missing or wrong key; 404 for an unknown model or route; 413 for a body over the size limit;
429 when the engine's queue is full; 500 if the engine fails while running the request.

A client that disconnects (mid-stream or while waiting for a whole response) has its request
aborted at once, so its KV pages return to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxkv.engine import (
    CompletionOutput,
    QueueFullError,
    RequestError,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from jaxkv.serve import protocol
from jaxkv.serve.async_engine import (
    EngineRunner,
    EngineStepError,
    RequestAborted,
    RequestStream,
    RunnerStoppedError,
)
from jaxkv.serve.metrics import CONTENT_TYPE, ServerMetrics

MAX_BODY_BYTES = 4 << 20
"""Default limit on a request body (a prompt of the longest context is far smaller)."""

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` for completions; chat fills the context by default."""

_ENDPOINTS = frozenset(
    ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
)
_ENGINE_PREFIXES = ("add_request: ", "SamplingParams: ")  # owners the API user did not call
_Body = TypeVar("_Body", bound=BaseModel)


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code

    def response(self) -> JSONResponse:
        body = protocol.error_body(self.message, self.kind, param=self.param, code=self.code)
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


# -- reading requests -----------------------------------------------------------------------


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it passes ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the request body is larger than the limit of {limit} bytes")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _location(loc: tuple[Any, ...]) -> str:
    """``("messages", 0, "content")`` -> ``"messages[0].content"``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _validation_error(error: ValidationError) -> ApiError:
    """A 400 naming the first problem pydantic found (and how many more there are)."""
    problems = error.errors(include_url=False)
    first = problems[0]
    where, kind = _location(first["loc"]), first["type"]
    if kind == "json_invalid":
        message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
    elif kind == "model_type" and not where:
        message = f"the request body must be a JSON object, got {first['input']!r:.60}"
    elif kind == "extra_forbidden":
        message = f"unknown field {where!r}: this server does not support it"
    elif kind == "missing":
        message = f"{where} is required"
    elif kind == "value_error":
        message = f"{where}: {first['ctx']['error']}"
    else:
        message = f"{where}: {first['msg']}, got {first['input']!r:.60}"
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problems)"
    return ApiError(400, message, param=where or None)


def _parse(raw: bytes, model: type[_Body]) -> _Body:
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        raise _validation_error(error) from None


def _engine_message(error: BaseException) -> str:
    message = str(error)
    for prefix in _ENGINE_PREFIXES:
        message = message.removeprefix(prefix)
    return message


def _bad_value(error: Exception, body: BaseModel) -> ApiError:
    """A 400 for a value the engine refused; ``param`` is the field its message starts with."""
    message = _engine_message(error)
    leading = re.match(r"[a-z_]+", message)
    field = leading.group() if leading else None
    return ApiError(400, message, param=field if field in type(body).model_fields else None)


async def _watch_disconnect(request: Request, stream: RequestStream) -> None:
    """Cancel ``stream`` when the client disconnects (run as a task once the body is read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            stream.cancel()
            return


def _sse(payload: Any) -> str:
    return f"data: {_json(payload)}\n\n"


def _json(payload: Any) -> str:
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


# -- the two APIs' shapes -------------------------------------------------------------------


class _Sent:
    """What a stream has sent of one choice so far."""

    def __init__(self) -> None:
        self.logprobs = 0
        self.text_chars = 0
        self.started = False
        self.finished = False


def _reported_logprobs(choice: CompletionOutput) -> list[TokenLogprob]:
    """The logprobs of the tokens the choice reports (not of an EOS or stop token)."""
    return [] if choice.logprobs is None else choice.logprobs[: len(choice.token_ids)]


class _Format:
    """How one API writes its responses (completions or chat)."""

    id_prefix: str
    response_object: str
    chunk_object: str

    def __init__(self, tokens: protocol.TokenText):
        self.tokens = tokens

    def choice(self, choice: CompletionOutput) -> dict[str, Any]:
        raise NotImplementedError

    def delta(
        self,
        choice: CompletionOutput,
        text: str,
        entries: list[TokenLogprob],
        sent: _Sent,
        reason: str | None,
    ) -> dict[str, Any]:
        raise NotImplementedError


class _CompletionFormat(_Format):
    id_prefix = "cmpl"
    response_object = "text_completion"
    chunk_object = "text_completion"

    def _logprobs(self, choice: CompletionOutput, entries: list[TokenLogprob], offset: int):
        if choice.logprobs is None:
            return None
        return protocol.completion_logprobs(entries, self.tokens, offset)

    def choice(self, choice: CompletionOutput) -> dict[str, Any]:
        return {
            "index": choice.index,
            "text": choice.text,
            "logprobs": self._logprobs(choice, _reported_logprobs(choice), 0),
            "finish_reason": protocol.finish_reason(choice),
        }

    def delta(self, choice, text, entries, sent, reason):
        return {
            "index": choice.index,
            "text": text,
            "logprobs": self._logprobs(choice, entries, sent.text_chars),
            "finish_reason": reason,
        }


class _ChatFormat(_Format):
    id_prefix = "chatcmpl"
    response_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def _logprobs(self, choice: CompletionOutput, entries: list[TokenLogprob]):
        if choice.logprobs is None:
            return None
        return protocol.chat_logprobs(entries, self.tokens)

    def choice(self, choice: CompletionOutput) -> dict[str, Any]:
        return {
            "index": choice.index,
            "message": {"role": "assistant", "content": choice.text},
            "logprobs": self._logprobs(choice, _reported_logprobs(choice)),
            "finish_reason": protocol.finish_reason(choice),
        }

    def delta(self, choice, text, entries, sent, reason):
        delta: dict[str, str] = {} if sent.started else {"role": "assistant"}
        if text or not sent.started:
            delta["content"] = text
        return {
            "index": choice.index,
            "delta": delta,
            "logprobs": self._logprobs(choice, entries),
            "finish_reason": reason,
        }


def _delta_choice(form: _Format, choice: CompletionOutput, sent: _Sent) -> dict | None:
    """The chunk entry for what ``choice`` added since ``sent``; None if nothing."""
    if sent.finished:
        return None
    reported = _reported_logprobs(choice)
    entries = reported[sent.logprobs :]
    reason = protocol.finish_reason(choice)
    text = choice.new_text
    if not text and not entries and reason is None:
        return None
    entry = form.delta(choice, text, entries, sent, reason)
    sent.logprobs = len(reported)
    sent.text_chars += len(text)
    sent.started = True
    sent.finished = reason is not None
    return entry


# -- the routes -----------------------------------------------------------------------------


class _Service:
    """The route handlers, sharing the runner, the model name and the metrics."""

    def __init__(
        self, runner: EngineRunner, model_name: str, metrics: ServerMetrics, max_body_bytes: int
    ):
        self.runner = runner
        self.model_name = model_name
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        tokenizer = runner.engine.tokenizer
        self.tokens = protocol.TokenText(tokenizer.decode, tokenizer.token_bytes)

    # -- simple routes

    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "jaxkv",
            "max_model_len": self.runner.max_model_len,
        }

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, model: str) -> dict[str, Any]:
        self._check_model(model)
        return self._model_card()

    async def prometheus(self) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE)

    # -- generation routes

    async def completions(self, request: Request) -> Response:
        raw = await _read_body(request, self.max_body_bytes)
        body = _parse(raw, protocol.CompletionRequest)
        self._check_model(body.model)
        ceiling = COMPLETIONS_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        sampling = self._sampling(body, ceiling, body.logprobs)
        form = _CompletionFormat(self.tokens)
        return await self._generate(request, body, form, body.prompt, sampling, body.max_tokens)

    async def chat_completions(self, request: Request) -> Response:
        raw = await _read_body(request, self.max_body_bytes)
        body = _parse(raw, protocol.ChatCompletionRequest)
        self._check_model(body.model)
        try:
            max_tokens = body.requested_max_tokens()
            logprobs = body.requested_logprobs()
        except ValueError as error:
            raise ApiError(400, str(error)) from None
        ceiling = self.runner.max_model_len if max_tokens is None else max_tokens
        sampling = self._sampling(body, ceiling, logprobs)
        messages = [message.for_engine() for message in body.messages]
        form = _ChatFormat(self.tokens)
        return await self._generate(request, body, form, messages, sampling, max_tokens)

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def _sampling(self, body: Any, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The request's ``SamplingParams``; a 400 naming the value the engine refuses."""
        try:
            return body.sampling_params(max_tokens=max_tokens, logprobs=logprobs)
        except (TypeError, ValueError) as error:
            raise _bad_value(error, body) from None

    async def _generate(
        self,
        request: Request,
        body: Any,
        form: _Format,
        prompt: Any,
        sampling: SamplingParams,
        max_tokens: int | None,
    ) -> Response:
        """Submit the request, then answer it whole or as a stream of events."""
        response_id = f"{form.id_prefix}-{uuid.uuid4().hex}"
        try:
            stream = await self.runner.submit(
                prompt,
                sampling,
                request_id=response_id,
                cache_salt=body.cache_salt,
                fit_max_tokens=max_tokens is None,
            )
        except QueueFullError as error:
            raise ApiError(
                429, _engine_message(error), kind="rate_limit_error", code="queue_full"
            ) from None
        except RequestError as error:
            raise _bad_value(error, body) from None
        except RunnerStoppedError as error:
            raise ApiError(503, str(error), kind="server_error") from None
        watcher = asyncio.create_task(_watch_disconnect(request, stream))
        head = protocol.envelope(response_id, form.response_object, self.model_name)
        if body.stream:
            head["object"] = form.chunk_object
            events = self._events(stream, watcher, form, head, body.include_usage())
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        try:
            final = await self._final_output(stream)
        finally:
            watcher.cancel()
        if final is None:  # the client is gone: nobody reads this
            return Response(status_code=499)
        choices = [form.choice(choice) for choice in final.outputs]
        return JSONResponse({**head, "choices": choices, "usage": protocol.usage(final)})

    async def _final_output(self, stream: RequestStream) -> RequestOutput | None:
        """The request's last output; None if it was cancelled (the client disconnected)."""
        final = None
        try:
            async for output in stream:
                final = output
        except RequestAborted:
            self.metrics.observe_ended("abort")
            return None
        except (EngineStepError, RunnerStoppedError) as error:
            self.metrics.observe_ended("error")
            raise ApiError(500, str(error), kind="server_error") from None
        finally:
            stream.cancel()  # a no-op unless this coroutine itself was cancelled
        self._observe(final)
        return final

    def _observe(self, final: RequestOutput) -> None:
        reasons = {protocol.finish_reason(choice) for choice in final.outputs}
        self.metrics.observe_finished(final, reasons.pop() if len(reasons) == 1 else "mixed")

    async def _events(
        self,
        stream: RequestStream,
        watcher: asyncio.Task,
        form: _Format,
        head: dict[str, Any],
        include_usage: bool,
    ) -> AsyncIterator[str]:
        """The server-sent events of a streamed response, ending with ``data: [DONE]``."""
        sent: dict[int, _Sent] = {}
        extra = {"usage": None} if include_usage else {}
        ended = "abort"  # what to record if the stream stops early
        try:
            async for output in stream:
                entries = [
                    _delta_choice(form, choice, sent.setdefault(choice.index, _Sent()))
                    for choice in output.outputs
                ]
                choices = [entry for entry in entries if entry is not None]
                if choices:
                    yield _sse({**head, "choices": choices, **extra})
                if output.finished:
                    ended = ""
                    self._observe(output)
                    if include_usage:
                        yield _sse({**head, "choices": [], "usage": protocol.usage(output)})
        except RequestAborted:
            return
        except (EngineStepError, RunnerStoppedError) as error:
            ended = "error"
            yield _sse(protocol.error_body(str(error), "server_error"))
        finally:
            watcher.cancel()
            stream.cancel()
            if ended:
                self.metrics.observe_ended(ended)
        yield "data: [DONE]\n\n"


# -- the app --------------------------------------------------------------------------------


def _bearer_auth(api_key: str) -> Callable[[Request], Awaitable[None]]:
    """A dependency refusing requests without ``Authorization: Bearer <api_key>``."""
    expected = api_key.encode("utf-8")

    async def check(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Starlette decodes headers as latin-1: encoding back gives the bytes sent.
        given = token.strip().encode("latin-1")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, expected):
            raise ApiError(
                401,
                "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    return check


def _endpoint(path: str) -> str:
    """The ``endpoint`` label of a request path: a route, or ``"other"``."""
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return path if path in _ENDPOINTS else "other"


class _CountResponses:
    """ASGI middleware counting HTTP responses by endpoint and status (known paths only, so a
    scan of random URLs cannot grow the label set)."""

    def __init__(self, app: Any, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_record(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.http_responses.labels(_endpoint(scope["path"]), str(status)).inc()


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(_request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif error.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(error.detail)
        return ApiError(error.status_code, message).response()

    async def invalid_request(_request: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        where = _location(tuple(problems[0]["loc"])) if problems else ""
        message = f"{where}: {problems[0]['msg']}" if problems else "invalid request"
        return ApiError(400, message).response()

    async def unexpected(_request: Request, error: Exception) -> JSONResponse:
        message = f"internal server error: {type(error).__name__}"
        return ApiError(500, message, kind="server_error").response()

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(Exception, unexpected)


def create_app(
    engine_runner: EngineRunner,
    *,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The OpenAI-compatible app over ``engine_runner`` (see the module docstring).

    The app's lifespan starts the runner and stops it at shutdown.

    Args:
        engine_runner: the engine, run in its own thread.
        model_name: the name clients use in ``model`` (others get 404).
        api_key: if given, every route but ``/health`` requires ``Authorization: Bearer
            <api_key>``.
        max_body_bytes: largest request body accepted (413 beyond).
    """
    if not isinstance(engine_runner, EngineRunner):
        raise TypeError(
            f"create_app: engine_runner must be an EngineRunner, got {engine_runner!r:.60}"
        )
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"create_app: model_name must be a non-empty str, got {model_name!r}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("create_app: api_key must be a non-empty str or None")
    if (
        isinstance(max_body_bytes, bool)
        or not isinstance(max_body_bytes, int)
        or max_body_bytes < 1
    ):
        raise ValueError(f"create_app: max_body_bytes must be an int >= 1, got {max_body_bytes!r}")

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine_runner.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine_runner.stop)

    metrics = ServerMetrics(engine_runner.stats)
    service = _Service(engine_runner, model_name, metrics, max_body_bytes)
    # No /docs or /openapi.json: they would be the only routes an API key does not cover.
    app = FastAPI(title="jaxkv", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics
    _install_error_handlers(app)
    guarded = [] if api_key is None else [Depends(_bearer_auth(api_key))]
    routes = (
        ("/v1/completions", service.completions, "POST"),
        ("/v1/chat/completions", service.chat_completions, "POST"),
        ("/v1/models", service.models, "GET"),
        ("/v1/models/{model}", service.model, "GET"),
        ("/metrics", service.prometheus, "GET"),
    )
    for path, endpoint, method in routes:
        app.add_api_route(path, endpoint, methods=[method], dependencies=guarded)
    app.add_api_route("/health", service.health, methods=["GET"])
    app.add_middleware(_CountResponses, metrics=metrics)
    return app


__all__ = ["ApiError", "COMPLETIONS_DEFAULT_MAX_TOKENS", "MAX_BODY_BYTES", "create_app"]
