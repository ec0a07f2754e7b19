"""Prometheus metrics of one process (a sidecar or a worker), counted in plain integers.

The hot path pays an attribute increment per event; the families are made at scrape time, with
the names, labels and values prometheus-client's own types would export. Every label child is
created at start-up, at 0, so the first rare event (a 429, a failed refresh) shows in
``increase()``. Label values come only from closed sets: an unconfigured provider is ``other``.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric

from sidecar import __version__

__all__ = [
    "CONTENT_TYPE",
    "OUTCOMES",
    "REFRESH_EVENTS",
    "Metrics",
    "counter",
    "gauge",
    "process_gauges",
    "status_class",
]

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                    2.5, 5, 10)  # fmt: skip
# Relayed exchanges run from a millisecond (a small JSON call) to an hour (a realtime session).
_RELAY_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_AGE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)

#: The closed label sets.
OUTCOMES = ("hit", "stale", "stale_if_error", "negative", "miss", "bypass", "error")
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", "error")
CALLERS = ("sidecar", "worker")
REFRESH_EVENTS = ("enqueued", "deduplicated", "succeeded", "failed", "retried", "skipped")
COLLAPSE_SCOPES = ("process", "replica")
#: What a relayed request is about, from its path (``sidecar.relay.family``).
RELAY_FAMILIES = ("chat", "completions", "responses", "embeddings", "files", "audio", "images",
                  "models", "containers", "batches", "realtime", "other")  # fmt: skip
#: A relayed answer's status class: a websocket's is ``1xx`` (101); ``error`` when the relay
#: itself failed or the client left before an answer.
RELAY_STATUS_CLASSES = ("1xx", *STATUS_CLASSES)
OTHER_PROVIDER = "other"


def status_class(status: int | None) -> str:
    """``2xx``..``5xx`` for an HTTP status; ``error`` when there was none."""
    if not status or not 200 <= status < 600:
        return "error"
    return STATUS_CLASSES[status // 100 - 2]


class CounterChild:
    """One labelled counter."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount``."""
        self.value += amount


class HistogramChild:
    """One labelled histogram: a count per bucket (not cumulative) and the sum."""

    __slots__ = ("_bounds", "buckets", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.buckets[bisect.bisect_left(self._bounds, value)] += 1
        self.sum += value


class Family:
    """A counter or histogram with fixed label names; children created up front."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] | None = None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.label_names = tuple(labels)
        self.bounds = tuple(buckets) if buckets is not None else None
        self.children: dict[tuple[str, ...], Any] = {}
        if not labels:
            self.labels()

    def labels(self, *values: str) -> Any:
        """The child for these label values (created if new: callers pass closed sets only)."""
        child = self.children.get(values)
        if child is None:
            child = CounterChild() if self.bounds is None else HistogramChild(self.bounds)
            self.children[values] = child
        return child

    def create(self, *value_sets: Iterable[str]) -> None:
        """Create every child of the cross product of ``value_sets``, at 0."""
        for values in itertools.product(*value_sets):
            self.labels(*values)

    def inc(self, amount: float = 1.0) -> None:
        """Increment an unlabelled counter."""
        self.labels().inc(amount)

    def observe(self, value: float) -> None:
        """Observe into an unlabelled histogram."""
        self.labels().observe(value)

    def family(self) -> Metric:
        """The Prometheus family of the children's values."""
        name = self.name.removesuffix("_total")
        if self.bounds is None:
            counters = CounterMetricFamily(name, self.documentation, labels=self.label_names)
            for key, child in self.children.items():
                counters.add_metric(list(key), child.value)
            return counters
        histogram = HistogramMetricFamily(name, self.documentation, labels=self.label_names)
        edges = [*(str(float(bound)) for bound in self.bounds), "+Inf"]
        for key, child in self.children.items():
            cumulative = itertools.accumulate(child.buckets)
            histogram.add_metric(list(key), list(zip(edges, cumulative, strict=True)), child.sum)
        return histogram


class Metrics:
    """The metrics one process exports: ``providers`` label provider-labelled ones (anything
    else is ``other``); ``routes`` are the retrieval routes whose answers it counts."""

    def __init__(
        self,
        component: str,
        providers: Iterable[str] = ("openai",),
        routes: Iterable[str] = (),
    ) -> None:
        self.component = component
        self.providers = frozenset(providers)
        provider_labels = (*sorted(self.providers), OTHER_PROVIDER)
        self.requests = Family(
            "sidecar_requests_total",
            "Requests answered, by route and outcome "
            "(hit, stale, stale_if_error, negative, miss, bypass, error)",
            ["route", "outcome"],
        )
        self.request_seconds = Family(
            "sidecar_request_duration_seconds",
            "Time to answer a request, by route and outcome",
            ["route", "outcome"],
            buckets=_LATENCY_BUCKETS,
        )
        self.served_age = Family(
            "sidecar_served_data_age_seconds",
            "Age of the data in answers served from the cache",
            buckets=_AGE_BUCKETS,
        )
        self.upstream = Family(
            "sidecar_upstream_requests_total",
            "Calls to the upstream, by provider, status class and caller (sidecar or worker)",
            ["provider", "status_class", "caller"],
        )
        self.upstream_seconds = Family(
            "sidecar_upstream_request_duration_seconds",
            "Duration of upstream calls",
            ["provider", "caller"],
            buckets=_LATENCY_BUCKETS,
        )
        self.throttled = Family(
            "sidecar_upstream_throttled_total",
            "429 answers from the upstream, each starting a back-off for the provider",
            ["provider"],
        )
        self.collapsed = Family(
            "sidecar_collapsed_requests_total",
            "Requests that waited for a fetch another request started "
            "(scope: process = same process, replica = another replica via the Redis lock)",
            ["scope"],
        )
        self.refresh_jobs = Family(
            "sidecar_refresh_jobs_total",
            "Refresh jobs: enqueued, deduplicated, succeeded, failed, retried, skipped",
            ["event"],
        )
        self.redis_errors = Family("sidecar_redis_errors_total", "Redis commands that failed")
        self.relayed = Family(
            "sidecar_relayed_requests_total",
            "Requests relayed to the upstream, by route family and the status class answered",
            ["family", "status_class"],
        )
        self.relay_seconds = Family(
            "sidecar_relay_duration_seconds",
            "Duration of relayed exchanges, a stream or websocket counted once, whole",
            ["family"],
            buckets=_RELAY_BUCKETS,
        )
        self.upstream.create(provider_labels, STATUS_CLASSES, CALLERS)
        self.upstream_seconds.create(provider_labels, CALLERS)
        self.throttled.create(provider_labels)
        self.collapsed.create(COLLAPSE_SCOPES)
        self.refresh_jobs.create(REFRESH_EVENTS)
        if component == "sidecar":
            self.relayed.create(RELAY_FAMILIES, RELAY_STATUS_CLASSES)
            self.relay_seconds.create(RELAY_FAMILIES)
        self._answers: dict[tuple[str, str], tuple[CounterChild, HistogramChild]] = {}
        for route in routes:
            self.route(route, OUTCOMES)
        self._watchers: list[Callable[[], Iterable[Metric]]] = []

    def provider(self, name: str) -> str:
        """The label value of a provider: its name if configured, else ``other``."""
        return name if name in self.providers else OTHER_PROVIDER

    def route(self, route: str, outcomes: Iterable[str]) -> None:
        """Create the children of a route's answers (at start-up: the first answer counts)."""
        for outcome in outcomes:
            self._answers[(route, outcome)] = (
                self.requests.labels(route, outcome),
                self.request_seconds.labels(route, outcome),
            )

    def answered(self, route: str, outcome: str, seconds: float) -> None:
        """Count one answer."""
        children = self._answers.get((route, outcome))
        if children is None:
            self.route(route, (outcome,))
            children = self._answers[(route, outcome)]
        children[0].value += 1
        children[1].observe(seconds)

    def watch(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Export values computed at scrape time (Redis state, back-offs, queue length)."""
        self._watchers.append(collect)

    def collect(self) -> Iterator[Metric]:
        """The families, then the gauges computed now."""
        info = GaugeMetricFamily(
            "sidecar_build_info", "Version of the running code", labels=["version", "component"]
        )
        info.add_metric([__version__, self.component], 1)
        yield info
        for family in vars(self).values():  # every Family attribute, in declaration order
            if isinstance(family, Family):
                yield family.family()
        for watcher in self._watchers:
            yield from watcher()

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self)


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


def process_gauges(redis_up: bool, backoffs: dict[str, float]) -> list[Metric]:
    """The gauges a sidecar and a worker both export: Redis usable, 429 back-offs left."""
    return [
        gauge("sidecar_redis_up", "1 while this process can use Redis", int(redis_up)),
        gauge(
            "sidecar_upstream_backoff_seconds",
            "Seconds left of a provider's 429 back-off, as this process knows it",
            backoffs,
            label="provider",
        ),
    ]
