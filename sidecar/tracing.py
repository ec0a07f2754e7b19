"""OpenTelemetry tracing, off unless the standard ``OTEL_*`` variables turn it on.

On when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``, any installed one) or,
without it, when ``OTEL_EXPORTER_OTLP_ENDPOINT``/``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set;
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` keep it off. Everything else (the
service name, sampler, batching, endpoint, headers, propagators) is read by the SDK itself.
``otlp`` sends OTLP over HTTP (``http/protobuf``, the protocol the ``otel`` extra installs).

While off, nothing here imports OpenTelemetry and every function is a no-op: the hit path pays
nothing. While on: a SERVER span per request (the official aiohttp-server middleware; not for
probes and metrics), a CLIENT span per upstream call whose ``traceparent`` goes upstream (the
official aiohttp-client trace config), Redis commands as children of the request or job that
sent them (never as traces of their own: queue polls and periodic flushes are not traced), and
refresh jobs in spans linked to the request that enqueued them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from sidecar import OPS_PATHS, __version__

if TYPE_CHECKING:
    from aiohttp.typedefs import Handler, Middleware
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

__all__ = [
    "SIDECAR_SERVICE",
    "TRACE_ID",
    "WORKER_SERVICE",
    "TracingConfigError",
    "client_trace_configs",
    "current_carrier",
    "current_trace_id",
    "instrument_redis",
    "is_enabled",
    "job_span",
    "server_middlewares",
    "setup_tracing",
    "shutdown_tracing",
    "tracing_exporters",
]

log = logging.getLogger(__name__)

#: The traces' ``service.name`` of each command, unless ``OTEL_SERVICE_NAME`` says otherwise.
SIDECAR_SERVICE = "bifrost-container-sidecar"
WORKER_SERVICE = "bifrost-container-sidecar-worker"
#: The request's trace id (32 hex digits), for its access line.
TRACE_ID: web.RequestKey[str] = web.RequestKey("trace_id", str)
_EXPORTER_GROUP = "opentelemetry_traces_exporter"
_OTLP_BY_PROTOCOL = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}


class TracingConfigError(ValueError):
    """The ``OTEL_*`` variables ask for something that cannot be; the message names it."""


@dataclass(slots=True)
class _Tracing:
    provider: TracerProvider
    tracer: Tracer
    child_only: TracerProvider
    """Samples only spans under a sampled parent: for Redis commands."""
    server_middleware: Any
    redis_instrumented: bool = False


_state: _Tracing | None = None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def tracing_exporters(env: Mapping[str, str] | None = None) -> list[str]:
    """The span exporters' entry-point names the environment asks for; empty: tracing off.

    Raises :class:`TracingConfigError` for an exporter or OTLP protocol that is not installed.
    Imports no OpenTelemetry module.
    """
    env = os.environ if env is None else env
    if _truthy(env.get("OTEL_SDK_DISABLED")):
        return []
    names = [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        names = ["otlp"] if endpoint else []
    if "none" in names:
        return []
    installed = {point.name for point in entry_points(group=_EXPORTER_GROUP)}
    resolved = []
    for name in names:
        if name == "otlp":
            protocol = (
                env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf"
            ).strip()
            if protocol not in _OTLP_BY_PROTOCOL:
                raise TracingConfigError(
                    f"OTEL_EXPORTER_OTLP_PROTOCOL: unknown protocol {protocol!r} "
                    "(http/protobuf or grpc)"
                )
            name = _OTLP_BY_PROTOCOL[protocol]
        if name not in installed:
            raise TracingConfigError(
                f"OTEL_TRACES_EXPORTER: exporter {name!r} is not installed (installed: "
                f"{', '.join(sorted(installed)) or 'none: install the otel extra'})"
            )
        resolved.append(name)
    return resolved


def setup_tracing(service_name: str, *, exporter: SpanExporter | None = None) -> bool:
    """Start tracing in this process if the environment asks for it (or ``exporter`` is given,
    for tests: spans are exported as they end); True when on. Call once per process, after any
    fork, before the app and its sessions are created."""
    global _state
    if _state is not None:
        return True
    names = tracing_exporters()
    if exporter is None and not names:
        return False
    try:
        _state = _start(service_name, names, exporter)
    except ImportError as exc:
        log.warning(
            "tracing is configured (OTEL_*) but OpenTelemetry is not installed (%s): install "
            "the otel extra; running without tracing",
            exc,
        )
        return False
    log.info("tracing on: %s", ", ".join(names) if exporter is None else type(exporter).__name__)
    return True


def _start(service_name: str, names: list[str], exporter: SpanExporter | None) -> _Tracing:
    from opentelemetry import trace
    from opentelemetry.instrumentation.aiohttp_server import (
        AioHttpServerInstrumentor,
        create_aiohttp_middleware,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

    resource = Resource.create({"service.version": __version__})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": service_name}))
    processors: list[SpanProcessor] = []
    if exporter is not None:
        processors.append(SimpleSpanProcessor(exporter))
    for name in names:
        (point,) = entry_points(group=_EXPORTER_GROUP, name=name)
        processors.append(BatchSpanProcessor(point.load()()))
    provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER
    child_only = TracerProvider(
        resource=resource, sampler=ParentBased(root=ALWAYS_OFF), shutdown_on_exit=False
    )
    for processor in processors:
        provider.add_span_processor(processor)
        child_only.add_span_processor(processor)
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)  # for anything else that traces in this process
    # The instrumentor initialises the middleware's module state, and also swaps aiohttp's
    # Application class for a subclass (which aiohttp deprecates) so that every app gets the
    # middleware. We add it to the sidecar's own app only (not the worker's probes, not the
    # demo's emulator): the subclass is discarded and the class put back.
    application = web.Application
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        AioHttpServerInstrumentor().instrument(tracer_provider=provider)
    web.Application = application  # type: ignore[misc]
    return _Tracing(
        provider=provider,
        tracer=provider.get_tracer(__name__, __version__),
        child_only=child_only,
        server_middleware=create_aiohttp_middleware(tracer_provider=provider),
    )


def shutdown_tracing() -> None:
    """Export what is pending and stop tracing (undoing the instrumentations)."""
    global _state
    state, _state = _state, None
    if state is None:
        return
    from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor

    application = web.Application
    AioHttpServerInstrumentor().uninstrument()
    web.Application = application  # type: ignore[misc]
    if state.redis_instrumented:
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        RedisInstrumentor().uninstrument()
    state.provider.shutdown()


def is_enabled() -> bool:
    """True while this process traces."""
    return _state is not None


def server_middlewares() -> list[Middleware]:
    """The middlewares that trace the sidecar's requests (first in the app's list): empty
    while tracing is off."""
    state = _state
    if state is None:
        return []
    from opentelemetry import trace

    traced = state.server_middleware

    async def remember_trace_id(request: web.Request, *, handler: Handler) -> web.StreamResponse:
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            request[TRACE_ID] = format(span_context.trace_id, "032x")
        return await handler(request)

    @web.middleware
    async def trace_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPS_PATHS:
            return await handler(request)
        response: web.StreamResponse = await traced(
            request, functools.partial(remember_trace_id, handler=handler)
        )
        return response

    return [trace_middleware]


def client_trace_configs() -> list[aiohttp.TraceConfig]:
    """Trace configs for an upstream ``ClientSession``: a CLIENT span per call and the
    ``traceparent`` header sent along. Empty while tracing is off."""
    state = _state
    if state is None:
        return []
    from opentelemetry.instrumentation.aiohttp_client import create_trace_config

    return [create_trace_config(tracer_provider=state.provider)]


def instrument_redis() -> None:
    """Trace redis-py commands (every client in this process) as children of the request or
    job that sends them; commands outside one are not traced. No-op while tracing is off."""
    state = _state
    if state is None or state.redis_instrumented:
        return
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    RedisInstrumentor().instrument(tracer_provider=state.child_only)
    state.redis_instrumented = True


def current_carrier() -> dict[str, str]:
    """The current trace context as W3C headers (``traceparent``, ``tracestate``), to send
    with an enqueued job; empty while tracing is off or outside a span."""
    if _state is None:
        return {}
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def current_trace_id() -> str:
    """The current span's trace id (32 hex digits); empty while off or outside a span."""
    if _state is None:
        return ""
    from opentelemetry import trace

    span_context = trace.get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else ""


@contextlib.contextmanager
def job_span(
    name: str,
    carrier: Mapping[str, str] | None,
    attributes: Mapping[str, str | int] | None = None,
) -> Iterator[None]:
    """Run a background job in a span of its own trace, linked to the span that enqueued it
    (``carrier``, from :func:`current_carrier`). No-op while tracing is off."""
    state = _state
    if state is None:
        yield
        return
    from opentelemetry import propagate, trace
    from opentelemetry.context import Context

    links = []
    if carrier:
        linked = trace.get_current_span(propagate.extract(carrier)).get_span_context()
        if linked.is_valid:
            links.append(trace.Link(linked))
    with state.tracer.start_as_current_span(
        name,
        context=Context(),  # a root: the job is not part of the request's trace, only linked
        kind=trace.SpanKind.CONSUMER,
        links=links,
        attributes=dict(attributes or {}),
    ):
        yield
