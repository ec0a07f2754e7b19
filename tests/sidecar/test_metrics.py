"""Metrics counted in plain integers export what prometheus-client's own types would."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from sidecar.metrics import _LATENCY_BUCKETS, OUTCOMES, REFRESH_EVENTS, Metrics

ROUTE = "/openai/v1/containers/{container_id}"


def _samples(text: bytes, prefixes: tuple[str, ...]) -> set[str]:
    return {
        line
        for line in text.decode().splitlines()
        if line.startswith(prefixes) and "_created" not in line
    }


def test_same_names_labels_and_values_as_prometheus_client() -> None:
    rng = random.Random(7)
    ours = Metrics("sidecar", ["openai"], [ROUTE])
    reference = CollectorRegistry()
    requests = Counter("sidecar_requests_total", "", ["route", "outcome"], registry=reference)
    seconds = Histogram(
        "sidecar_request_duration_seconds", "", ["route", "outcome"],
        buckets=_LATENCY_BUCKETS, registry=reference,
    )  # fmt: skip
    jobs = Counter("sidecar_refresh_jobs_total", "", ["event"], registry=reference)
    for outcome in OUTCOMES:  # what ours creates at start-up, the reference gets at 0 too
        requests.labels(ROUTE, outcome)
        seconds.labels(ROUTE, outcome)
    for event in REFRESH_EVENTS:
        jobs.labels(event)
    for _ in range(2_000):
        outcome = rng.choice(OUTCOMES)
        value = rng.choice([rng.random() / 100, 0.001, 0.5, 10.0, 11.0])
        ours.answered(ROUTE, outcome, value)
        requests.labels(ROUTE, outcome).inc()
        seconds.labels(ROUTE, outcome).observe(value)
        event = rng.choice(REFRESH_EVENTS)
        ours.refresh_jobs.labels(event).inc()
        jobs.labels(event).inc()
    prefixes = ("sidecar_requests_total", "sidecar_request_duration_seconds",
                "sidecar_refresh_jobs_total")  # fmt: skip
    expected = _samples(generate_latest(reference), prefixes)
    got = _samples(ours.render(), prefixes)
    assert got == expected


def test_every_label_child_exists_at_start_so_the_first_event_counts() -> None:
    text = Metrics("worker", ["openai", "my-openai-eu"]).render().decode()
    assert 'sidecar_refresh_jobs_total{event="failed"} 0.0' in text
    assert (
        'sidecar_upstream_requests_total{caller="worker",provider="my-openai-eu",'
        'status_class="5xx"} 0.0'
    ) in text
    assert 'sidecar_upstream_throttled_total{provider="other"} 0.0' in text
