"""OpenTelemetry tracing, off (importing nothing, costing nothing) unless the standard ``OTEL_*``
variables turn it on; the SDK reads the rest (service name, sampler, endpoint, propagators).

While on: a SERVER span per request (not probes or metrics), a CLIENT span per upstream call
sending ``traceparent`` on, Redis commands as children of the request or job that sent them
(never traces of their own), and refresh jobs in traces linked to the request that enqueued them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, NamedTuple

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


class _Tracing(NamedTuple):
    provider: TracerProvider
    tracer: Tracer
    server_middleware: Any


_state: _Tracing | None = None


def tracing_exporters(env: Mapping[str, str] | None = None) -> list[str]:
    """The exporters' entry-point names the environment asks for (``OTEL_TRACES_EXPORTER``, else
    ``otlp`` if an OTLP endpoint is set); empty: off. Imports no OpenTelemetry module.

    Raises :class:`TracingConfigError` for an exporter or OTLP protocol that is not installed.
    """
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    endpoints = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    if not names and any(env.get(name) for name in endpoints):
        names = ["otlp"]
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
    for tests); True when on. Call once per process, before creating the app."""
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
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

    resource = Resource.create({"service.version": __version__})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": service_name}))
    # A test's exporter sends each span as it ends.
    processors: list[SpanProcessor] = [SimpleSpanProcessor(exporter)] if exporter else []
    points = entry_points(group=_EXPORTER_GROUP)
    processors += [BatchSpanProcessor(points[name].load()()) for name in names]
    provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER
    # Redis commands are sampled only under a sampled parent: queue polls make no traces.
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
    RedisInstrumentor().instrument(tracer_provider=child_only)
    return _Tracing(
        provider,
        provider.get_tracer(__name__, __version__),
        create_aiohttp_middleware(tracer_provider=provider),
    )


def shutdown_tracing() -> None:
    """Export what is pending and stop tracing (undoing the instrumentations)."""
    global _state
    state, _state = _state, None
    if state is None:
        return
    from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    AioHttpServerInstrumentor().uninstrument()  # puts back the class it found: aiohttp's own
    RedisInstrumentor().uninstrument()
    state.provider.shutdown()


def is_enabled() -> bool:
    """True while this process traces."""
    return _state is not None


def server_middlewares() -> list[Middleware]:
    """The middlewares that trace the sidecar's requests (first in the app's list): empty
    while tracing is off."""
    if _state is None:
        return []
    traced = _state.server_middleware

    @web.middleware
    async def trace_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPS_PATHS:
            return await handler(request)

        async def remember_trace_id(request: web.Request) -> web.StreamResponse:
            if trace_id := current_trace_id():
                request[TRACE_ID] = trace_id
            return await handler(request)

        response: web.StreamResponse = await traced(request, remember_trace_id)
        return response

    return [trace_middleware]


def client_trace_configs() -> list[aiohttp.TraceConfig]:
    """Trace configs for an upstream ``ClientSession``: a CLIENT span per call and the
    ``traceparent`` header sent along. Empty while tracing is off."""
    if _state is None:
        return []
    from opentelemetry.instrumentation.aiohttp_client import create_trace_config

    return [create_trace_config(tracer_provider=_state.provider)]


def current_carrier() -> dict[str, str]:
    """The current trace context as W3C headers (``traceparent``, ``tracestate``), to send
    with an enqueued job; empty while tracing is off or outside a span."""
    carrier: dict[str, str] = {}
    if _state is not None:
        from opentelemetry import propagate

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
    if _state is None:
        yield
        return
    from opentelemetry import propagate, trace
    from opentelemetry.context import Context

    linked = trace.get_current_span(propagate.extract(carrier or {})).get_span_context()
    with _state.tracer.start_as_current_span(
        name,
        context=Context(),  # a root: the job is not part of the request's trace, only linked
        kind=trace.SpanKind.CONSUMER,
        links=[trace.Link(linked)] if linked.is_valid else [],
        attributes=dict(attributes or {}),
    ):
        yield
