"""The server's Prometheus metrics (prometheus-client), one registry per app.

Counters and histograms are updated as requests are served; the gauges that describe the engine
(queue depth, running requests, KV blocks) are read from `engine.stats()` when scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class _EngineGauges(Collector):
    def __init__(self, stats: Callable[[], dict[str, Any]], admitted: Callable[[], int]) -> None:
        self._stats, self._admitted = stats, admitted

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            s = self._stats()
        except Exception:  # a closed engine still lets /metrics answer
            s = {}
        for name, key, doc in [
            ("llama_requests_running", "requests_running", "Requests in the running batch."),
            ("llama_requests_waiting", "requests_waiting",
             "Requests the engine's scheduler has queued (the queue depth)."),
            ("llama_kv_blocks_used", "kv_blocks_used", "KV cache blocks in use."),
            ("llama_kv_blocks_total", "kv_blocks_total", "KV cache blocks in all."),
            ("llama_sessions_active", "sessions_active", "Open sessions."),
        ]:
            yield GaugeMetricFamily(name, doc, value=float(s.get(key, 0)))
        yield GaugeMetricFamily("llama_requests_admitted",
                                "Requests the server has admitted and not yet answered.",
                                value=float(self._admitted()))


class Metrics:
    """What /metrics reports."""

    def __init__(self, stats: Callable[[], dict[str, Any]], admitted: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("llama_requests", "Requests answered, by endpoint and status.",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("llama_prompt_tokens", "Prompt tokens processed.",
                                     registry=self.registry)
        self.completion_tokens = Counter("llama_completion_tokens", "Tokens generated.",
                                         registry=self.registry)
        self.ttft = Histogram("llama_time_to_first_token_seconds",
                              "Seconds from a request's arrival to its first token.",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("llama_inter_token_latency_seconds",
                             "Seconds between a request's successive tokens.",
                             buckets=_ITL_BUCKETS, registry=self.registry)
        self.registry.register(_EngineGauges(stats, admitted))

    def text(self) -> bytes:
        return generate_latest(self.registry)
