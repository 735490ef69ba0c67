"""Prometheus metrics of the server, on a private ``CollectorRegistry`` (two apps in one process,
as in tests, never clash).

Two kinds of series:

* the engine's own counters and gauges (running / waiting requests, KV pages, prefix-cache
  hits, preemptions, token totals), read from ``EngineRunner.stats()`` at scrape time by a
  custom collector, so they are never out of step with the engine;
* what only the server sees: finished requests by finish reason, HTTP responses by endpoint
  and status, and the time-to-first-token, inter-token and end-to-end latency histograms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from jaxkv.engine import EngineStats, RequestOutput

PREFIX = "jaxkv"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds; from a fast local decode step to a long queue wait.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _EngineCollector(Collector):
    """Series read from the engine's stats snapshot at each scrape."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        gauges = (
            ("num_requests_running", "Requests whose sequences are in the batch.", "num_running"),
            ("num_requests_waiting", "Requests waiting for admission.", "num_waiting"),
            ("kv_pages_total", "KV-cache pages in the pool.", "num_pages"),
            ("kv_pages_used", "KV-cache pages held by a sequence.", "num_pages_used"),
            ("kv_pages_free", "KV-cache pages free or evictable.", "num_pages_free"),
            ("kv_pages_peak_used", "Most KV-cache pages held at once.", "peak_pages_used"),
            ("prefix_cache_dir_files", "Page files in --prefix-cache-dir.", "prefix_dir_files"),
            (
                "prefix_cache_dir_bytes",
                "Bytes of page files in --prefix-cache-dir.",
                "prefix_dir_bytes",
            ),
        )
        for name, documentation, field in gauges:
            yield GaugeMetricFamily(f"{PREFIX}_{name}", documentation, getattr(stats, field))
        yield GaugeMetricFamily(
            f"{PREFIX}_prefix_cache_hit_rate",
            "Share of prompt tokens served by the prefix cache (since start).",
            stats.prefix_hit_rate,
        )
        counters = (
            ("preemptions", "Sequences preempted for lack of pages.", "num_preemptions"),
            ("prompt_tokens", "Prompt tokens of the requests added.", "num_prompt_tokens"),
            ("generation_tokens", "Tokens generated.", "num_generated_tokens"),
            ("engine_steps", "Engine steps run.", "num_steps"),
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             "prefix_query_tokens"),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", "prefix_hit_tokens"),
            ("prefix_cache_disk_hits", "Prompt tokens loaded back from --prefix-cache-dir.",
             "prefix_disk_hit_tokens"),
            ("prefix_cache_spilled_pages", "Prefix-cache pages written to --prefix-cache-dir.",
             "prefix_spilled_pages"),
            ("spec_verify_steps", "Speculative verification steps run.", "num_verify_steps"),
            ("spec_draft_tokens", "Draft tokens proposed for verification.", "num_draft_tokens"),
            ("spec_accepted_tokens", "Draft tokens the model accepted.", "num_accepted_tokens"),
        )  # fmt: skip
        for name, documentation, field in counters:
            yield CounterMetricFamily(f"{PREFIX}_{name}", documentation, getattr(stats, field))


class ServerMetrics:
    """The server's collectors and their exposition.

    Args:
        stats: returns the engine's latest ``EngineStats`` (``EngineRunner.stats``).
    """

    def __init__(self, stats: Callable[[], EngineStats]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats))
        self.requests_finished = Counter(
            f"{PREFIX}_requests_finished",
            "Requests that ended, by finish reason (stop, length, abort, error).",
            ["finish_reason"],
            registry=self.registry,
        )
        self.http_responses = Counter(
            f"{PREFIX}_http_responses",
            "HTTP responses, by endpoint and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "From a request's arrival to its first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Between consecutive generated tokens of a request (its first choice).",
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.request_latency = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "From a request's arrival to its last token.",
            buckets=_E2E_BUCKETS,
            registry=self.registry,
        )

    def observe_finished(self, output: RequestOutput, reason: str) -> None:
        """Record a finished request: its finish ``reason`` and its latencies."""
        self.requests_finished.labels(reason).inc()
        metrics = output.metrics
        if metrics.time_to_first_token is not None:
            self.time_to_first_token.observe(metrics.time_to_first_token)
        for latency in metrics.inter_token_latencies:
            self.inter_token_latency.observe(latency)
        if metrics.finished_time is not None:
            self.request_latency.observe(metrics.finished_time - metrics.arrival_time)

    def observe_ended(self, reason: str) -> None:
        """Record a request that ended without a final output (cancelled, failed)."""
        self.requests_finished.labels(reason).inc()

    def exposition(self) -> bytes:
        """The Prometheus text format of every series."""
        return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE", "ServerMetrics"]
