"""Prometheus metrics of the API and the node behind it, in the text exposition format.

Each app has its own registry (two nodes in one process, as in tests, do not share
counters). Request-driven figures are counted as requests run; the model cache's figures
are read from the backend at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from p2pedge.api.backend import BackendStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _NodeCollector(Collector):
    def __init__(self, stats: Callable[[], BackendStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        yield CounterMetricFamily(
            "p2pedge_cache_loads", "Models loaded into the cache", s.cache_loads
        )
        yield CounterMetricFamily(
            "p2pedge_cache_evictions", "Models evicted from the cache", s.cache_evictions
        )
        yield GaugeMetricFamily("p2pedge_cache_models", "Models warm in the cache", s.cache_models)
        yield GaugeMetricFamily("p2pedge_cache_bytes", "Bytes the warm models use", s.cache_bytes)
        yield GaugeMetricFamily(
            "p2pedge_inference_load", "How full the inference queues are, 0..1", s.load
        )
        yield GaugeMetricFamily(
            "p2pedge_peers", "Peers with a verified card, as last listed", s.peers
        )
        yield GaugeMetricFamily(
            "p2pedge_shard_sessions", "Shard sessions served for peers", s.shard_sessions
        )
        yield CounterMetricFamily(
            "p2pedge_bytes_served", "Model bytes served to peers", s.bytes_served
        )
        yield CounterMetricFamily(
            "p2pedge_bytes_pulled", "Verified model bytes pulled", s.bytes_pulled
        )


class ApiMetrics:
    def __init__(self, stats: Callable[[], BackendStats]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "p2pedge_api_requests", "API requests by endpoint and status", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "p2pedge_tokens_generated", "Tokens generated for API clients", ["route"], registry=r
        )
        self.ttft = Histogram(
            "p2pedge_ttft_seconds", "Time to first token from the request", ["route"],
            buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.per_token = Histogram(
            "p2pedge_token_seconds", "Time between two generated tokens", ["route"],
            buckets=TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.active = Gauge("p2pedge_active_sessions", "Generations running now", registry=r)
        self.waiting = Gauge(
            "p2pedge_queue_depth", "Requests admitted and waiting for a first token", registry=r
        )
        self.refusals = Counter(
            "p2pedge_refusals", "Requests refused, by reason", ["reason"], registry=r
        )
        self.cache = Counter(
            "p2pedge_cache_requests", "Local requests by whether the model was warm",
            ["result"], registry=r,
        )  # fmt: skip
        self.disconnects = Counter(
            "p2pedge_api_disconnects", "Generations stopped because the client left", registry=r
        )
        r.register(_NodeCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
