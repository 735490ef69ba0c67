"""Run a workload and time every request: against the in-process engine (``run_engine``), a
running ``jaxkv serve`` over HTTP (``run_server``) or HF transformers in another interpreter
(``run_hf``). Each gives back a ``RunResult``: one ``RequestRecord`` per request, in seconds
since the start of the run, plus the backend's counters.

How times are taken:

* engine: the runner adds each request once its arrival offset has passed (between steps, so a
  request that arrives during a step waits for it, as it would in a server). Its arrival is the
  scheduled one, ``start + request.arrival``; token times are the engine's
  ``RequestMetrics.token_times`` (the end of the step that produced each token).
* server: client side, ``time.perf_counter()`` when each SSE chunk is read. See ``run_server``
  for how chunks are counted as tokens.
* HF: inside the worker (``jaxkv.bench.hf``), a streamer stamps every generated step.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import IO, Any

from jaxkv.bench.workload import BenchRequest, Workload

Progress = Callable[[int, int], None]
"""Called with (requests finished, requests in total) as requests finish."""


@dataclasses.dataclass
class RequestRecord:
    """One request's timings, in seconds since the start of the run.

    Attributes:
        index: the request's index in the workload.
        prompt_len: prompt tokens.
        output_len: tokens it was asked to generate.
        num_generated: tokens it generated.
        arrival: when it arrived (its scheduled arrival).
        first_token: when its first token was ready (``None``: none came).
        finished: when its last token was ready.
        token_times: when each token (server: each counted chunk) was ready.
        num_cached_tokens: prompt tokens served by the prefix cache, when the backend says.
        error: why it failed, or ``None``.
    """

    index: int
    prompt_len: int
    output_len: int
    num_generated: int = 0
    arrival: float = 0.0
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)
    num_cached_tokens: int | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        """Time to first token: first token - arrival (queueing and prefill included)."""
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def e2e(self) -> float | None:
        """End-to-end latency: last token - arrival."""
        return None if self.finished is None else self.finished - self.arrival

    @property
    def itls(self) -> list[float]:
        """Inter-token latencies: the gaps between consecutive token times."""
        times = self.token_times
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (last - first token) / (tokens - 1)."""
        if self.first_token is None or self.finished is None or self.num_generated < 2:
            return None
        return (self.finished - self.first_token) / (self.num_generated - 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclasses.dataclass
class RunResult:
    """A backend's run of a workload.

    Attributes:
        backend: ``"jaxkv"`` (in-process engine), ``"server"`` or ``"hf"``.
        label: the column heading in reports.
        records: one per request, in workload order.
        wall_seconds: from the start of the run (the first arrival) to the last token.
        stats: the backend's counters over the run (``peak_kv_pages``, ``prefix_hit_rate``,
            ``preemptions``, ...); absent keys are unknown for that backend.
        info: configuration and versions, for the JSON report.
    """

    backend: str
    label: str
    records: list[RequestRecord]
    wall_seconds: float
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "label": self.label,
            "wall_seconds": self.wall_seconds,
            "stats": self.stats,
            "info": self.info,
            "requests": [record.to_dict() for record in self.records],
        }


class ProgressBar:
    """``label [#####-----] 12/64 requests 3.2 s`` rewritten in place with ``\\r`` on a stream
    (default stderr); silent when ``enabled`` is false. Use as the ``progress`` callable."""

    def __init__(
        self, label: str, stream: IO[str] | None = None, enabled: bool = True, width: int = 30
    ) -> None:
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.width = width
        self.start = time.perf_counter()
        self._last_write = -math.inf
        self._open = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if done < total and now - self._last_write < 0.1:  # at most 10 writes a second
            return
        self._last_write = now
        filled = self.width * done // max(total, 1)
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(
            f"\r{self.label} [{bar}] {done}/{total} requests {now - self.start:6.1f} s"
        )
        self.stream.flush()
        self._open = True
        if done >= total:
            self.close()

    def close(self) -> None:
        """End the line (once)."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


def _report(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


# -- the in-process engine ----------------------------------------------------------------------


@dataclasses.dataclass
class _Running:
    """A request the engine holds, with the times the runner saw its tokens (a fallback for
    engines whose metrics do not list every token)."""

    request: BenchRequest
    arrival: float  # absolute perf_counter seconds
    seen: list[float] = dataclasses.field(default_factory=list)


def _counter_delta(before: Any, after: Any, name: str) -> int:
    return int(getattr(after, name)) - int(getattr(before, name))


def run_engine(
    engine: Any,
    workload: Workload,
    *,
    progress: Progress | None = None,
    cache_salt: str | None = None,
    label: str = "jaxkv",
) -> RunResult:
    """Run ``workload`` on an in-process ``jaxkv.engine.Engine`` (greedy, ``ignore_eos``).

    Call ``engine.warmup()`` first: compilation is not excluded here, and the result's
    ``stats["compiled_during_run"]`` says whether any step shape was compiled while timing.

    Args:
        engine: the engine; it may already have run other work (its counters are diffed).
        workload: the requests.
        progress: called with (finished, total) as requests finish.
        cache_salt: passed to every request; a new salt per run keeps the prefix cache of an
            earlier run of the same workload from serving this one.
        label: the result's column heading.
    """
    from jaxkv.engine import QueueFullError, SamplingParams

    before = engine.stats()
    pending = collections.deque(workload.requests)
    running: dict[str, _Running] = {}
    records: dict[int, RequestRecord] = {}
    peak_pages = before.num_pages_used
    total = len(workload)
    _report(progress, 0, total)
    start = time.perf_counter()
    while pending or running:
        now = time.perf_counter()
        while pending and start + pending[0].arrival <= now:
            request = pending[0]
            params = SamplingParams(max_tokens=request.output_len, ignore_eos=True)
            try:
                request_id = engine.add_request(
                    list(request.prompt_token_ids), params, cache_salt=cache_salt
                )
            except QueueFullError:
                if not running:
                    raise
                break  # try again after the next step
            pending.popleft()
            running[request_id] = _Running(request, start + request.arrival)
        if not running:  # idle until the next arrival
            time.sleep(max(0.0, start + pending[0].arrival - time.perf_counter()))
            continue
        if not engine.has_unfinished():
            raise RuntimeError(
                f"run_engine: the engine has no unfinished request, but {len(running)} it "
                "accepted never finished"
            )
        outputs = engine.step()
        stepped = time.perf_counter()
        peak_pages = max(peak_pages, engine.stats().num_pages_used)
        for output in outputs:
            state = running.get(output.request_id)
            if state is None:
                continue
            completion = output.outputs[0]
            state.seen.extend([stepped] * len(completion.new_token_ids))
            if output.finished:
                del running[output.request_id]
                records[state.request.index] = _engine_record(state, output, start)
                _report(progress, len(records), total)
    wall = max((r.finished for r in records.values() if r.finished is not None), default=0.0)
    after = engine.stats()
    queried = _counter_delta(before, after, "prefix_query_tokens")
    hits = _counter_delta(before, after, "prefix_hit_tokens")
    stats = {
        "peak_kv_pages": peak_pages,
        "num_pages": after.num_pages,
        "prefix_query_tokens": queried,
        "prefix_hit_tokens": hits,
        "prefix_hit_rate": hits / queried if queried else 0.0,
        "preemptions": _counter_delta(before, after, "num_preemptions"),
        "steps": _counter_delta(before, after, "num_steps"),
        "compiled_during_run": _counter_delta(before, after, "num_compiled_shapes"),
    }
    ordered = [records[r.index] for r in workload.requests]
    return RunResult("jaxkv", label, ordered, wall, stats, {"cache_salt": cache_salt})


def _engine_record(state: _Running, output: Any, start: float) -> RequestRecord:
    completion = output.outputs[0]
    metrics = output.metrics
    num_generated = len(completion.token_ids)
    # The engine's own token times when it lists one per token, else the runner's.
    times = list(getattr(metrics, "token_times", None) or [])
    if len(times) != num_generated:
        times = state.seen
    token_times = [t - start for t in times]
    return RequestRecord(
        index=state.request.index,
        prompt_len=state.request.prompt_len,
        output_len=state.request.output_len,
        num_generated=num_generated,
        arrival=state.arrival - start,
        first_token=token_times[0] if token_times else None,
        finished=token_times[-1] if token_times else None,
        token_times=token_times,
        num_cached_tokens=output.num_cached_tokens,
        error=None if completion.finish_reason == "length" else completion.finish_reason,
    )


# -- a server over HTTP -------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)")


def parse_prometheus(text: str) -> dict[str, float]:
    """Samples of a Prometheus text exposition: ``name{labels}`` -> value (comments skipped)."""
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match and not line.startswith("#"):
            try:
                samples[match.group(1)] = float(match.group(2))
            except ValueError:
                continue
    return samples


def _metric(samples: dict[str, float], field: str) -> float | None:
    """The sample whose name (labels aside) ends with ``field`` (an ``EngineStats`` field),
    ``_total`` allowed; summed over label sets."""
    pattern = re.compile(rf"(?:^|[_:]){re.escape(field)}(?:_total)?$")
    found = [v for k, v in samples.items() if pattern.search(k.partition("{")[0])]
    return sum(found) if found else None


def _server_stats(
    before: dict[str, float], after: dict[str, float], peak_pages: float | None
) -> dict[str, Any]:
    """The counters of ``/metrics`` over the run: metrics named after ``EngineStats`` fields
    (``jaxkv_num_preemptions``, ``..._prefix_hit_tokens_total`` ...) are found, others not.
    ``peak_pages``: the most ``num_pages_used`` seen while polling, or ``None``."""
    stats: dict[str, Any] = {}

    def delta(field: str) -> float | None:
        start, end = _metric(before, field), _metric(after, field)
        return None if start is None or end is None else end - start

    queried, hits = delta("prefix_query_tokens"), delta("prefix_hit_tokens")
    if queried is not None and hits is not None:
        stats["prefix_query_tokens"] = int(queried)
        stats["prefix_hit_tokens"] = int(hits)
        stats["prefix_hit_rate"] = hits / queried if queried else 0.0
    preemptions = delta("num_preemptions")
    if preemptions is not None:
        stats["preemptions"] = int(preemptions)
    # A since-start peak gauge that rose during the run was reached in it; else the polls'.
    peak_before, peak_after = _metric(before, "peak_pages_used"), _metric(after, "peak_pages_used")
    if peak_before is not None and peak_after is not None and peak_after > peak_before:
        peak_pages = max(peak_pages or 0, peak_after)
    if peak_pages is not None:
        stats["peak_kv_pages"] = int(peak_pages)
    pages = _metric(after, "num_pages")
    if pages is not None:
        stats["num_pages"] = int(pages)
    return stats


async def _get_text(client: Any, url: str) -> str | None:
    try:
        response = await client.get(url)
    except Exception:
        return None
    return response.text if response.status_code == 200 else None


async def _model_name(client: Any, base_url: str) -> str:
    text = await _get_text(client, f"{base_url}/v1/models")
    try:
        return json.loads(text)["data"][0]["id"]
    except (TypeError, ValueError, KeyError, IndexError):
        return "default"


async def _stream_request(
    client: Any,
    base_url: str,
    model: str,
    request: BenchRequest,
    start: float,
    extra: dict[str, Any],
) -> RequestRecord:
    record = RequestRecord(request.index, request.prompt_len, request.output_len)
    record.arrival = request.arrival
    await asyncio.sleep(max(0.0, start + request.arrival - time.perf_counter()))
    body = {
        "model": model,
        "prompt": list(request.prompt_token_ids),
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    chunk_times: list[float] = []
    usage: dict[str, Any] | None = None
    try:
        async with client.stream("POST", f"{base_url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", "replace")
                record.error = f"HTTP {response.status_code}: {text[:200]}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    record.error = str(chunk["error"])[:200]
                    break
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or ():
                    # A trailing chunk that only carries the finish reason is not a token.
                    if choice.get("text") or choice.get("finish_reason") is None:
                        chunk_times.append(now)
    except Exception as error:  # a dropped connection fails this request, not the run
        record.error = f"{type(error).__name__}: {error}"[:200]
    if usage is not None:
        record.num_generated = int(usage.get("completion_tokens", len(chunk_times)))
        details = usage.get("prompt_tokens_details") or {}
        if details.get("cached_tokens") is not None:
            record.num_cached_tokens = int(details["cached_tokens"])
    else:
        record.num_generated = len(chunk_times)
    record.token_times = [t - start for t in chunk_times]
    if record.token_times:
        record.first_token = record.token_times[0]
        record.finished = record.token_times[-1]
    return record


async def _poll_pages(client: Any, base_url: str, every: float, peak: list[float]) -> None:
    while True:
        text = await _get_text(client, f"{base_url}/metrics")
        used = None if text is None else _metric(parse_prometheus(text), "num_pages_used")
        if used is not None:
            peak[0] = max(peak[0], used)
        await asyncio.sleep(every)


async def _run_server(
    base_url: str,
    workload: Workload,
    progress: Progress | None,
    label: str,
    extra: dict[str, Any],
    transport: Any,
) -> RunResult:
    import httpx

    total = len(workload)
    limits = httpx.Limits(max_connections=total + 4, max_keepalive_connections=total + 4)
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(None), limits=limits, transport=transport
    ) as client:
        model = await _model_name(client, base_url)
        before = parse_prometheus(await _get_text(client, f"{base_url}/metrics") or "")
        peak = [-math.inf]
        poller = asyncio.create_task(_poll_pages(client, base_url, 0.1, peak))
        _report(progress, 0, total)
        start = time.perf_counter()
        tasks = [
            asyncio.create_task(_stream_request(client, base_url, model, r, start, extra))
            for r in workload.requests
        ]
        records: dict[int, RequestRecord] = {}
        for finished in asyncio.as_completed(tasks):
            record = await finished
            records[record.index] = record
            _report(progress, len(records), total)
        poller.cancel()
        after = parse_prometheus(await _get_text(client, f"{base_url}/metrics") or "")
    ordered = [records[r.index] for r in workload.requests]
    wall = max((r.finished for r in ordered if r.finished is not None), default=0.0)
    exact = all(len(r.token_times) == r.num_generated for r in ordered if r.error is None)
    info = {
        "url": base_url,
        "model": model,
        "cache_salt": extra.get("cache_salt"),
        # "tokens": one SSE chunk per token, so token_times are per token; "chunks": chunks
        # carried several tokens, so inter-token latencies are per chunk.
        "token_timing": "tokens" if exact else "chunks",
    }
    stats = _server_stats(before, after, None if math.isinf(peak[0]) else peak[0])
    return RunResult("server", label, ordered, wall, stats, info)


def run_server(
    url: str,
    workload: Workload,
    *,
    progress: Progress | None = None,
    label: str = "server",
    cache_salt: str | None = None,
    transport: Any = None,
) -> RunResult:
    """Run ``workload`` against a running server's ``/v1/completions`` (token-id prompts,
    ``stream=true``, greedy, ``ignore_eos``), every request on its own connection at its
    arrival time.

    Times are taken client side when each SSE chunk is read. Each chunk with a choice counts
    as one token event, except a last chunk that only carries ``finish_reason`` with no text;
    the token count is the final ``usage.completion_tokens`` (``stream_options.include_usage``).
    When events and tokens agree (a server that sends one chunk per token), ``token_times`` are
    per token; otherwise inter-token latencies are per chunk, and ``info["token_timing"]`` says
    ``"chunks"``. Counters come from ``/metrics`` before and after the run (peak KV pages from
    polling it every 0.1 s, or from a ``peak_pages_used`` gauge that rose during the run).

    A server keeps its prefix cache between runs: a second run of the same workload finds its
    prompts cached (the prefix hit rate shows it) unless ``cache_salt`` is given, which is sent
    as the ``cache_salt`` extension field of every request (the server must accept it).
    ``transport``: an ``httpx`` async transport (tests pass a ``MockTransport``).
    """
    extra = {} if cache_salt is None else {"cache_salt": cache_salt}
    return asyncio.run(_run_server(url.rstrip("/"), workload, progress, label, extra, transport))


# -- HF transformers in another interpreter -----------------------------------------------------

HF_PROGRESS_PREFIX = "jaxkv-bench-progress"
"""Lines ``<prefix> <done> <total>`` on the HF worker's stderr report its progress."""


def run_hf(
    python: str | os.PathLike[str],
    gguf_path: str | os.PathLike[str],
    workload: Workload,
    *,
    progress: Progress | None = None,
    batch_size: int = 8,
    threads: int = 2,
    label: str = "hf",
    log: IO[str] | None = None,
) -> RunResult:
    """Run ``workload`` through HF transformers ``generate`` in static batches of
    ``batch_size`` (float32, ``threads`` torch threads) in the interpreter ``python``, which
    needs torch, transformers, accelerate and gguf (not jaxkv: the worker script is run by its
    path). The workload goes to the worker as a JSON file and the records come back as one.

    Args:
        log: where the worker's other output goes (default: dropped, shown on failure).

    Raises:
        RuntimeError: the worker failed (the end of its output is in the message).
    """
    from jaxkv.bench import hf

    script = pathlib.Path(hf.__file__).resolve()
    total = len(workload)
    with tempfile.TemporaryDirectory(prefix="jaxkv-bench-") as folder:
        workload_file = pathlib.Path(folder, "workload.json")
        result_file = pathlib.Path(folder, "result.json")
        workload_file.write_text(json.dumps(workload.to_dict()))
        command = [
            os.fspath(python),
            str(script),
            "--gguf",
            os.fspath(pathlib.Path(gguf_path).resolve()),
            "--workload",
            str(workload_file),
            "--out",
            str(result_file),
            "--batch-size",
            str(batch_size),
            "--threads",
            str(threads),
        ]
        tail: collections.deque[str] = collections.deque(maxlen=40)
        _report(progress, 0, total)
        with subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        ) as worker:
            for line in worker.stdout:
                if line.startswith(HF_PROGRESS_PREFIX):
                    done, count = (int(x) for x in line.split()[1:3])
                    _report(progress, done, count)
                    continue
                tail.append(line)
                if log is not None:
                    log.write(line)
            status = worker.wait()
        if status != 0 or not result_file.exists():
            raise RuntimeError(
                f"the HF worker ({' '.join(command[:2])}) exited with status {status}:\n"
                + "".join(tail)
            )
        data = json.loads(result_file.read_text())
    records = [RequestRecord.from_dict(r) for r in data["records"]]
    return RunResult("hf", label, records, data["wall_seconds"], {}, data.get("info", {}))


def warm_run(engine: Any, num_requests: int = 2, prompt_len: int = 8, output_len: int = 3) -> None:
    """An untimed run of a few short requests on ``engine``, after ``engine.warmup()``.

    ``warmup`` compiles every step shape but runs none, and the first steps executed after it
    cost extra (about 0.1 s on a CPU, mostly once per process, some once per shape): this run
    pays that before anything is timed. It uses its own cache salt, so it leaves no prefix
    for a timed run to hit.
    """
    from jaxkv.bench.workload import WorkloadSpec, make_workload, tokenizer_token_ids

    spec = WorkloadSpec(num_requests, (prompt_len, prompt_len), (output_len, output_len))
    workload = make_workload(spec, tokenizer_token_ids(engine.model.tokenizer))
    run_engine(engine, workload, cache_salt="jaxkv-bench-warm-run")


# -- composed measurements ----------------------------------------------------------------------


@dataclasses.dataclass
class PrefixProbe:
    """TTFTs of requests alone on the engine: ``cold`` ones whose ``prefix_len``-token prefix
    was never seen, and ``hit`` ones right after, sharing that prefix (seconds, one per
    repetition), with the prompt tokens the prefix cache served each hit."""

    prefix_len: int
    suffix_len: int
    cold: list[float]
    hit: list[float]
    hit_cached_tokens: list[int]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def measure_prefix_ttft(
    engine: Any,
    token_ids: Any,
    *,
    prefix_len: int = 1024,
    suffix_len: int = 32,
    output_len: int = 4,
    repeats: int = 3,
    seed: int = 0,
) -> PrefixProbe:
    """Per repetition: a request with a new random ``prefix_len``-token prefix (plus its own
    ``suffix_len`` tokens) alone on ``engine`` (cold), then one with the same prefix and other
    suffix tokens alone (a prefix-cache hit). ``engine`` must be warmed up and idle."""
    from jaxkv.bench.workload import prefix_probe

    cold, hit, cached = [], [], []
    for repeat in range(repeats):
        first, second = prefix_probe(token_ids, prefix_len, suffix_len, output_len, seed + repeat)
        cold.append(run_engine(engine, first).records[0].ttft)
        record = run_engine(engine, second).records[0]
        hit.append(record.ttft)
        cached.append(record.num_cached_tokens or 0)
    return PrefixProbe(prefix_len, suffix_len, cold, hit, cached)
