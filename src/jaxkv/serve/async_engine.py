"""The engine behind an asyncio server: one thread owns the ``Engine`` and steps it; coroutines
submit requests and read their outputs from per-request queues.

The engine is not thread-safe, so every call on it (``add_request``, ``abort``, ``step``,
``stats``, and the tokenizer's encoding) happens on the engine thread. Coroutines talk to it
through an inbox of commands::

    event loop                                  engine thread
    ----------                                  -------------
    submit() --- _Add -----> inbox ---------->  add_request   -> accepted future (id or error)
    stream.cancel() -- _Abort --> inbox ----->  abort
                                                step()        -> RequestOutput
    stream.__anext__() <-- asyncio.Queue <----  loop.call_soon_threadsafe(queue.put_nowait, ...)

The thread sleeps on a condition variable while the engine has no work and the inbox is empty.
An exception inside ``step()`` fails every request in flight with ``EngineStepError`` (the
engine cannot say which ones the failed step touched), aborts them so their pages return, and
the thread goes on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from jaxkv.engine import Engine, EngineStats, RequestOutput, SamplingParams, UnknownRequestError

logger = logging.getLogger("jaxkv.serve")

_FAILURE_BACKOFF_S = 0.1  # pause after a failed step that left work behind


class EngineStepError(RuntimeError):
    """The engine raised while running a request; the request is over (aborted)."""


class RequestAborted(RuntimeError):
    """The request was cancelled (``RequestStream.cancel``) before it finished."""


class RunnerStoppedError(RuntimeError):
    """The runner is not running (never started, or stopped)."""


class RequestStream:
    """The outputs of one submitted request, as an async iterator of ``RequestOutput``.

    Iteration ends after the output with ``finished=True``. It raises ``EngineStepError`` if
    the engine failed while running the request, ``RunnerStoppedError`` if the runner stopped
    first, and ``RequestAborted`` after ``cancel()``.
    """

    def __init__(self, runner: EngineRunner, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self._runner = runner
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._done = False

    @property
    def done(self) -> bool:
        """The request finished, failed or was cancelled: no more outputs will come."""
        return self._done

    def cancel(self) -> None:
        """Abort the request in the engine (its pages return) and end the iteration with
        ``RequestAborted``. Call from the event loop; a no-op once the stream is done."""
        if self._done:
            return
        self._runner.abort(self.request_id)
        self._queue.put_nowait(RequestAborted(f"request {self.request_id!r} was cancelled"))

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finished:
            self._done = True
        return item

    def _deliver(self, item: RequestOutput | BaseException) -> bool:
        """Hand ``item`` to the stream's event loop (from any thread); False if that loop is
        closed (its consumer is gone)."""
        return _call_in_loop(self._loop, self._queue.put_nowait, item)


@dataclasses.dataclass
class _Add:
    """Add a request; resolve ``accepted`` with its id, or with the engine's exception."""

    stream: RequestStream
    prompt: Any
    sampling: SamplingParams
    cache_salt: str | None
    fit_max_tokens: bool
    accepted: asyncio.Future[str]


@dataclasses.dataclass
class _Abort:
    request_id: str


def _call_in_loop(loop: asyncio.AbstractEventLoop, function: Any, *args: Any) -> bool:
    """Schedule ``function(*args)`` on ``loop`` from another thread; False if the loop is
    closed (whoever waited there is gone)."""
    try:
        loop.call_soon_threadsafe(function, *args)
    except RuntimeError:
        return False
    return True


def _resolve(future: asyncio.Future, result: Any = None, error: BaseException | None = None):
    """Set ``future``'s outcome unless it is already done (its waiter gave up). Runs on the
    future's loop."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _settle(command: _Add, result: str | None, error: BaseException | None = None) -> bool:
    """Resolve ``command.accepted`` from the engine thread; False if its loop is closed."""
    return _call_in_loop(command.stream._loop, _resolve, command.accepted, result, error)


class EngineRunner:
    """Runs an ``Engine`` in a background thread for asyncio callers (see the module docstring).

    Args:
        engine: the engine; from now on only the runner's thread may call it.
        name: the thread's name.
    """

    def __init__(self, engine: Engine, *, name: str = "jaxkv-engine"):
        if not isinstance(engine, Engine):
            raise TypeError(f"EngineRunner: engine must be a jaxkv Engine, got {engine!r:.60}")
        self.engine = engine
        self.max_model_len = engine.max_model_len
        self._name = name
        self._wakeup = threading.Condition()  # guards _inbox, _streams, _stopping
        self._inbox: list[_Add | _Abort] = []
        self._streams: dict[str, RequestStream] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stats = engine.stats()  # the latest snapshot, replaced whole by the engine thread

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the engine thread (a no-op if it runs already)."""
        with self._wakeup:
            if self._thread is not None:
                if self._stopping:
                    raise RunnerStoppedError("EngineRunner: a stopped runner cannot restart")
                return
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the engine thread: requests in flight are aborted and their streams fail with
        ``RunnerStoppedError``. Waits up to ``timeout`` seconds for the thread (it finishes the
        step it is in). Idempotent."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- the event-loop side ---------------------------------------------------------------

    async def submit(
        self,
        prompt: str | list[int] | list[Mapping[str, Any]],
        sampling: SamplingParams,
        *,
        request_id: str,
        cache_salt: str | None = None,
        fit_max_tokens: bool = False,
    ) -> RequestStream:
        """Add a request to the engine; its outputs stream from the returned ``RequestStream``.

        Args:
            prompt: text, token ids or chat messages, as ``Engine.add_request`` takes them.
            sampling: the request's sampling settings.
            request_id: a unique id for the request.
            cache_salt: requests with different salts never share cached pages.
            fit_max_tokens: treat ``sampling.max_tokens`` as a ceiling and lower it to what the
                context leaves after the prompt (for clients that did not ask for a length).

        Raises:
            whatever ``Engine.add_request`` raises (``RequestError``, ``QueueFullError``), and
            ``RunnerStoppedError`` when the runner is not running.
        """
        loop = asyncio.get_running_loop()
        stream = RequestStream(self, request_id, loop)
        accepted: asyncio.Future[str] = loop.create_future()
        command = _Add(stream, prompt, sampling, cache_salt, fit_max_tokens, accepted)
        with self._wakeup:
            if self._stopping or self._thread is None:
                raise RunnerStoppedError("EngineRunner: the engine is not running")
            self._inbox.append(command)
            self._wakeup.notify()
        try:
            await accepted
        except asyncio.CancelledError:
            # The caller went away before the engine took the request: drop it once added.
            self.abort(request_id)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (safe from any thread; unknown or finished ids are ignored). No
        output of it is delivered after this call."""
        with self._wakeup:
            self._streams.pop(request_id, None)
            self._inbox.append(_Abort(request_id))
            self._wakeup.notify()

    def stats(self) -> EngineStats:
        """The engine's counters as of its latest step (or command)."""
        return self._stats

    # -- the engine thread -----------------------------------------------------------------

    def _loop(self) -> None:
        busy = False
        while True:
            commands = self._next_commands(busy)
            if commands is None:
                break
            try:
                for command in commands:
                    self._run_command(command)
                if self.engine.has_unfinished() or commands:
                    self._step()
                busy = self.engine.has_unfinished()
            except Exception:  # never let the thread die: fail what is in flight and go on
                logger.exception("jaxkv serve: the engine thread failed")
                self._fail_all(EngineStepError("the engine failed; see the server log"))
                busy = False
        self._shut_down()

    def _next_commands(self, busy: bool) -> list[_Add | _Abort] | None:
        """The commands waiting in the inbox, after sleeping while there is nothing to do;
        None when the runner is stopping."""
        with self._wakeup:
            while not (self._inbox or self._stopping or busy):
                self._wakeup.wait()
            if self._stopping:
                return None
            commands, self._inbox = self._inbox, []
            return commands

    def _run_command(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            try:
                self.engine.abort(command.request_id)
            except UnknownRequestError:  # finished already, or never added
                pass
            return
        stream = command.stream
        try:
            sampling = command.sampling
            if command.fit_max_tokens:
                sampling = self._fitted(command.prompt, sampling)
            self.engine.add_request(
                command.prompt,
                sampling,
                request_id=stream.request_id,
                cache_salt=command.cache_salt,
            )
        except Exception as error:  # the caller decides what an engine error means
            _settle(command, None, error)
            return
        with self._wakeup:
            self._streams[stream.request_id] = stream
        if not _settle(command, stream.request_id):
            self.abort(stream.request_id)

    def _fitted(self, prompt: Any, sampling: SamplingParams) -> SamplingParams:
        """``sampling`` with ``max_tokens`` lowered to what the context leaves after ``prompt``
        (unchanged when the prompt cannot be measured: ``add_request`` then says why).

        The prompt is encoded here and again by ``add_request``: the engine has no way to take
        "as many tokens as fit", and encoding is cheap next to a step."""
        tokenizer = self.engine.tokenizer
        try:
            if isinstance(prompt, str):
                length = len(tokenizer.encode(prompt))
            elif prompt and isinstance(prompt[0], Mapping):
                length = len(tokenizer.encode_chat(list(prompt)))
            else:
                length = len(prompt)
        except Exception:  # add_request refuses this prompt with its own message
            return sampling
        # A prompt that leaves no room gets max_tokens=1, so add_request's error is about it.
        max_tokens = max(1, min(sampling.max_tokens, self.max_model_len - length))
        if max_tokens == sampling.max_tokens:
            return sampling
        return dataclasses.replace(sampling, max_tokens=max_tokens)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as error:
            logger.exception("jaxkv serve: engine step failed; failing the requests in flight")
            self._fail_all(EngineStepError(f"the engine failed: {type(error).__name__}: {error}"))
            if self.engine.has_unfinished():  # aborting did not clear it: do not spin
                time.sleep(_FAILURE_BACKOFF_S)
            return
        self._stats = self.engine.stats()  # as of these outputs, before anyone sees them
        for output in outputs:
            with self._wakeup:
                stream = self._streams.get(output.request_id)
                if stream is not None and output.finished:
                    del self._streams[output.request_id]
            if stream is not None and not stream._deliver(output):
                self._abort_quietly(output.request_id)

    def _fail_all(self, error: BaseException) -> None:
        """Abort every request in flight and end its stream with ``error``."""
        with self._wakeup:
            streams, self._streams = self._streams, {}
        for request_id in streams:
            self._abort_quietly(request_id)
        with contextlib.suppress(Exception):  # the stats of a broken engine may fail too
            self._stats = self.engine.stats()
        for stream in streams.values():
            stream._deliver(error)

    def _abort_quietly(self, request_id: str) -> None:
        try:
            self.engine.abort(request_id)
        except UnknownRequestError:
            pass
        except Exception:  # an engine already failing; the request is dropped either way
            logger.exception("jaxkv serve: aborting %s failed", request_id)

    def _shut_down(self) -> None:
        """Fail what is queued or in flight; runs on the engine thread as it exits."""
        with self._wakeup:
            commands, self._inbox = self._inbox, []
        stopped = RunnerStoppedError("the server is shutting down")
        for command in commands:
            if isinstance(command, _Add):
                _settle(command, None, stopped)
            else:  # its stream is gone already; the engine must still free the pages
                self._abort_quietly(command.request_id)
        self._fail_all(stopped)
        self._stats = self.engine.stats()


__all__ = [
    "EngineRunner",
    "EngineStepError",
    "RequestAborted",
    "RequestStream",
    "RunnerStoppedError",
]
