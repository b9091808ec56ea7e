"""Prometheus metrics of the HTTP API, served at GET /metrics.

Request-level numbers (counts by status, latency, time to first token, inter-token latency, tokens)
are measured in the router, where every request passes and where the timings are those a client
sees. Engine gauges (queue depth, running batch size, KV-cache usage) live in the model replicas:
each replica attaches a snapshot of its engine to the events it streams, and answers a stats call
at scrape time; the router exports the latest snapshot per replica and forgets replicas it has not
heard from for `STALE_AFTER_S` (scaled down or restarted).

Names follow Prometheus conventions: `lmforge_` prefix, base units (seconds), `_total` counters.

| metric | type | labels |
|---|---|---|
| lmforge_http_requests_total | counter | endpoint, status |
| lmforge_http_request_duration_seconds | histogram | endpoint |
| lmforge_time_to_first_token_seconds | histogram | model |
| lmforge_inter_token_latency_seconds | histogram | model |
| lmforge_generated_tokens_total | counter | model |
| lmforge_prompt_tokens_total | counter | model |
| lmforge_sequences_finished_total | counter | model, reason (stop, length, cancelled) |
| lmforge_engine_queue_depth | gauge | variant, model, replica |
| lmforge_engine_running_sequences | gauge | variant, model, replica |
| lmforge_engine_slots | gauge | variant, model, replica |
| lmforge_engine_kv_cache_usage_ratio | gauge | variant, model, replica |
| lmforge_engine_requests_aborted_total | counter | variant, model, replica (client disconnects) |
| lmforge_model_reloads_total | counter | variant, model (the version swapped in) |
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STALE_AFTER_S = 120.0
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class EngineStatsCollector(Collector):
    """Exports the latest engine snapshot of each model replica as gauges."""

    def __init__(self) -> None:
        self._latest: dict[tuple[str, str], tuple[float, dict]] = {}  # (variant, replica) -> (time, stats)
        self._lock = threading.Lock()

    def update(self, variant: str, stats: dict) -> None:
        replica = str(stats.get("replica", "local"))
        with self._lock:
            self._latest[(variant, replica)] = (time.monotonic(), dict(stats))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = time.monotonic()
        with self._lock:
            for key in [k for k, (t, _) in self._latest.items() if now - t > STALE_AFTER_S]:
                del self._latest[key]
            snapshot = sorted(self._latest.items())
        families = {
            "queue_depth": GaugeMetricFamily(
                "lmforge_engine_queue_depth",
                "Requests waiting for an engine slot",
                labels=["variant", "model", "replica"],
            ),
            "running": GaugeMetricFamily(
                "lmforge_engine_running_sequences",
                "Sequences in the running batch (busy engine slots)",
                labels=["variant", "model", "replica"],
            ),
            "num_slots": GaugeMetricFamily(
                "lmforge_engine_slots",
                "Engine slots (KV-cache rows) of the replica",
                labels=["variant", "model", "replica"],
            ),
            "kv_cache_usage": GaugeMetricFamily(
                "lmforge_engine_kv_cache_usage_ratio",
                "Share of the preallocated KV cache reserved by running sequences (busy slots / slots)",
                labels=["variant", "model", "replica"],
            ),
        }
        aborted = CounterMetricFamily(
            "lmforge_engine_requests_aborted",
            "Requests cancelled because the client went away (slots freed at once)",
            labels=["variant", "model", "replica"],
        )
        for (variant, replica), (_, stats) in snapshot:
            labels = [variant, str(stats.get("model", "")), replica]
            for name, family in families.items():
                if name in stats:
                    family.add_metric(labels, float(stats[name]))
            if "aborted" in stats:
                aborted.add_metric(labels, float(stats["aborted"]))
        yield from families.values()
        yield aborted

    def describe(self) -> list:
        return []  # samples vary at run time; no fixed description needed for registration


class ServingMetrics:
    """All metrics of one router, in their own registry (several apps in one process never clash)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lmforge_http_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "lmforge_http_request_duration_seconds",
            "Time from request arrival to the last byte of the response",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "lmforge_time_to_first_token_seconds",
            "Time from request arrival to the first generated token (queueing + prefill)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "lmforge_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one sequence",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter(
            "lmforge_generated_tokens", "Tokens generated (all choices)", ["model"], registry=r
        )
        self.prompt_tokens = Counter(
            "lmforge_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.sequences_finished = Counter(
            "lmforge_sequences_finished",
            "Finished sequences by finish reason",
            ["model", "reason"],
            registry=r,
        )
        self.model_reloads = Counter(
            "lmforge_model_reloads",
            "Model versions swapped in while serving",
            ["variant", "model"],
            registry=r,
        )
        self.engine = EngineStatsCollector()
        r.register(self.engine)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class SequenceTimer:
    """Time to first token and inter-token latency for one sequence, fed as its tokens arrive."""

    def __init__(self, metrics: ServingMetrics, model: str, start: float) -> None:
        self.metrics, self.model, self.start = metrics, model, start
        self.last: float | None = None

    def tokens(self, count: int, now: float | None = None) -> None:
        if count <= 0:
            return
        now = time.perf_counter() if now is None else now
        if self.last is None:
            self.metrics.time_to_first_token.labels(self.model).observe(now - self.start)
            count -= 1
        elif count:
            gap = (now - self.last) / count  # a delta can carry several tokens (held back text)
            for _ in range(count):
                self.metrics.inter_token_latency.labels(self.model).observe(gap)
        self.last = now
