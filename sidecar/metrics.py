"""Prometheus metrics of one process (a sidecar or a worker), in a registry of its own.

Every process serves its own ``/metrics``; sum counters across pods in queries. Gauges that
describe shared state (``sidecar_refresh_backlog``) are exported by every worker: use ``max``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from sidecar import __version__

__all__ = ["CONTENT_TYPE", "Metrics", "counter", "gauge", "status_class"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                    2.5, 5, 10)  # fmt: skip
_AGE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)


def status_class(status: int | None) -> str:
    """``2xx``..``5xx`` for an HTTP status; ``error`` when there was none."""
    return f"{status // 100}xx" if status else "error"


class Metrics:
    """The metrics one process exports."""

    def __init__(self, component: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        Gauge("sidecar_build_info", "Version of the running code", ["version", "component"],
              registry=r).labels(__version__, component).set(1)  # fmt: skip
        self.requests = Counter(
            "sidecar_requests_total",
            "Requests answered, by route and outcome "
            "(hit, stale, stale_if_error, negative, miss, bypass, error)",
            ["route", "outcome"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "sidecar_request_duration_seconds",
            "Time to answer a request, by route and outcome",
            ["route", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.served_age = Histogram(
            "sidecar_served_data_age_seconds",
            "Age of the data in answers served from the cache",
            buckets=_AGE_BUCKETS,
            registry=r,
        )
        self.upstream = Counter(
            "sidecar_upstream_requests_total",
            "Calls to the upstream, by provider, status class and caller (sidecar or worker)",
            ["provider", "status_class", "caller"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "sidecar_upstream_request_duration_seconds",
            "Duration of upstream calls",
            ["provider", "caller"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.throttled = Counter(
            "sidecar_upstream_throttled_total",
            "429 answers from the upstream, each starting a back-off for the provider",
            ["provider"],
            registry=r,
        )
        self.collapsed = Counter(
            "sidecar_collapsed_requests_total",
            "Requests that waited for a fetch another request started "
            "(scope: process = same process, replica = another replica via the Redis lock)",
            ["scope"],
            registry=r,
        )
        self.refresh_jobs = Counter(
            "sidecar_refresh_jobs_total",
            "Refresh jobs: enqueued, deduplicated, succeeded, failed, retried, skipped",
            ["event"],
            registry=r,
        )
        self._answers: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.redis_errors = Counter(
            "sidecar_redis_errors_total", "Redis commands that failed", registry=r
        )

    def answered(self, route: str, outcome: str, seconds: float) -> None:
        """Count one answer (the labelled children are looked up once, off the hot path)."""
        children = self._answers.get((route, outcome))
        if children is None:
            children = (self.requests.labels(route, outcome),
                        self.request_seconds.labels(route, outcome))  # fmt: skip
            self._answers[(route, outcome)] = children
        children[0].inc()
        children[1].observe(seconds)

    def watch(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Export values computed at scrape time (Redis state, back-offs, queue length)."""
        self.registry.register(_Callback(collect))

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)


class _Callback(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


def gauge(
    name: str, documentation: str, values: dict[str, float] | float, label: str = ""
) -> Metric:
    """A gauge computed at scrape time: one value, or one per ``label`` value."""
    if isinstance(values, dict):
        family = GaugeMetricFamily(name, documentation, labels=[label])
        for key, value in values.items():
            family.add_metric([key], value)
        return family
    return GaugeMetricFamily(name, documentation, value=values)


def counter(name: str, documentation: str, value: float) -> Metric:
    """A counter computed at scrape time (``name`` without ``_total``)."""
    return CounterMetricFamily(name, documentation, value=value)
