"""Tracing: off and free unless OTEL_* configures it; when on, one trace from the request
through the upstream call, Redis commands inside it, and refresh jobs linked to it."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from sidecar import tracing
from sidecar.logs import ACCESS_LOGGER, AccessLogger, log_handler
from sidecar.tracing import TracingConfigError, tracing_exporters

UPSTREAM_SEEN: web.AppKey[list[dict[str, str]]] = web.AppKey("seen", list)


async def _start(app: web.Application, **options: Any) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, **{"access_log": None, **options})
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


def _upstream_app() -> web.Application:
    async def container(request: web.Request) -> web.Response:
        request.app[UPSTREAM_SEEN].append(dict(request.headers))
        return web.json_response({"id": request.match_info["container_id"]})

    app = web.Application()
    app[UPSTREAM_SEEN] = []
    app.router.add_get("/v1/containers/{container_id}", container)
    return app


def _front_app(upstream: str, session: aiohttp.ClientSession) -> web.Application:
    """A small app wired as the sidecar is: the tracing middlewares first."""

    async def retrieve(request: web.Request) -> web.Response:
        url = f"{upstream}/v1/containers/{request.match_info['container_id']}"
        async with session.get(url) as response:
            return web.Response(body=await response.read(), status=response.status)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(middlewares=tracing.server_middlewares())
    app.router.add_get("/openai/v1/containers/{container_id}", retrieve)
    app.router.add_get("/healthz", healthz)
    return app


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[web.Application, str]]:
    app = _upstream_app()
    runner, url = await _start(app)
    yield app, url
    await runner.cleanup()


def _by_kind(finished: tuple[ReadableSpan, ...], kind: SpanKind) -> list[ReadableSpan]:
    return [span for span in finished if span.kind == kind]


async def test_a_request_and_its_upstream_call_are_one_trace(
    spans: InMemorySpanExporter, upstream: tuple[web.Application, str]
) -> None:
    upstream_app, upstream_url = upstream
    stream = io.StringIO()
    access = logging.getLogger("tests.tracing.access")
    access.propagate, access.level = False, logging.INFO
    access.handlers[:] = [log_handler("json", stream)]
    async with aiohttp.ClientSession(trace_configs=tracing.client_trace_configs()) as session:
        runner, front = await _start(
            _front_app(upstream_url, session), access_log_class=AccessLogger, access_log=access
        )
        try:
            async with aiohttp.ClientSession() as caller:
                async with caller.get(f"{front}/openai/v1/containers/cntr_1") as response:
                    assert response.status == 200
                async with caller.get(f"{front}/healthz") as response:
                    assert response.status == 200
        finally:
            await runner.cleanup()
    access.handlers.clear()

    finished = spans.get_finished_spans()
    (server,) = _by_kind(finished, SpanKind.SERVER)  # none for /healthz
    (client,) = _by_kind(finished, SpanKind.CLIENT)
    assert server.name == "GET /openai/v1/containers/{container_id}"
    assert server.resource.attributes["service.name"] == "test-sidecar"
    assert server.context is not None
    assert client.context is not None
    assert client.context.trace_id == server.context.trace_id
    assert client.parent is not None
    assert client.parent.span_id == server.context.span_id
    (seen,) = upstream_app[UPSTREAM_SEEN]
    trace_id, span_id = f"{server.context.trace_id:032x}", f"{client.context.span_id:016x}"
    assert seen["traceparent"].startswith(f"00-{trace_id}-{span_id}-")  # version, ids, flags
    (line,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert line["logger"] == access.name != ACCESS_LOGGER
    assert line["trace_id"] == trace_id


async def test_a_refresh_job_runs_in_a_span_linked_to_the_request(
    spans: InMemorySpanExporter,
) -> None:
    tracer = tracing._state.tracer if tracing._state else None
    assert tracer is not None
    with tracer.start_as_current_span("GET /openai/v1/containers/{container_id}") as request:
        carrier = tracing.current_carrier()
        assert tracing.current_trace_id() == f"{request.get_span_context().trace_id:032x}"
    assert set(carrier) >= {"traceparent"}
    with tracing.job_span("refresh_batch", carrier, {"container.id": "cntr_1"}):
        assert tracing.current_carrier()["traceparent"] != carrier["traceparent"]
    job = next(span for span in spans.get_finished_spans() if span.name == "refresh_batch")
    assert job.kind == SpanKind.CONSUMER
    assert job.parent is None  # a trace of its own
    assert job.attributes is not None
    assert job.attributes["container.id"] == "cntr_1"
    (link,) = job.links
    assert link.context.span_id == request.get_span_context().span_id
    assert link.context.trace_id == request.get_span_context().trace_id
    # Without a carrier (refresh-ahead), a job is a root with no link.
    with tracing.job_span("refresh_ahead", None):
        pass
    ahead = next(span for span in spans.get_finished_spans() if span.name == "refresh_ahead")
    assert ahead.links == ()


async def test_redis_commands_are_traced_only_inside_a_request_or_job(
    spans: InMemorySpanExporter, redis_url: str
) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await client.set("polled", "1")  # like a queue poll or a periodic flush
        with tracing.job_span("refresh_batch", None):
            await client.get("polled")
    finally:
        await client.aclose()
    finished = spans.get_finished_spans()
    (command,) = _by_kind(finished, SpanKind.CLIENT)
    (job,) = _by_kind(finished, SpanKind.CONSUMER)
    assert command.name == "GET"
    assert command.parent is not None
    assert job.context is not None
    assert command.parent.span_id == job.context.span_id
    assert "polled" not in json.dumps(dict(command.attributes or {}))  # arguments are not sent


@pytest.mark.parametrize(
    ("env", "exporters"),
    [
        ({}, []),
        ({"OTEL_SERVICE_NAME": "sidecar"}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp_proto_http"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp_proto_http"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "console, otlp"}, ["console", "otlp_proto_http"]),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"},
         ["otlp_proto_http"]),
    ],
)  # fmt: skip
def test_tracing_is_on_only_when_otel_variables_say_so(
    env: dict[str, str], exporters: list[str]
) -> None:
    assert tracing_exporters(env) == exporters


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER: exporter 'zipkin'"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
         "exporter 'otlp_proto_grpc' is not installed"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_PROTOCOL": "udp"},
         "OTEL_EXPORTER_OTLP_PROTOCOL: unknown protocol 'udp'"),
    ],
)  # fmt: skip
def test_a_tracing_setup_that_cannot_work_is_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(TracingConfigError, match=message):
        tracing_exporters(env)


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SIDECAR_"))}
    return subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def test_with_nothing_configured_tracing_is_a_no_op_that_imports_nothing() -> None:
    result = _python(
        "import sys\n"
        "from sidecar import tracing, logs\n"
        "from sidecar.app import create_app\n"
        "from sidecar.settings import load_settings\n"
        "assert tracing.setup_tracing('sidecar') is False\n"
        "assert tracing.server_middlewares() == []\n"
        "assert tracing.client_trace_configs() == []\n"
        "assert tracing.current_carrier() == {} and tracing.current_trace_id() == ''\n"
        "with tracing.job_span('refresh_batch', {'traceparent': '00-' + '1' * 32 + '-' + "
        "'2' * 16 + '-01'}):\n"
        "    pass\n"
        "settings = load_settings({}, upstream_url='http://gw:8080', log_format='json')\n"
        "create_app(settings)\n"
        "logs.configure_logging(settings)\n"
        "tracing.shutdown_tracing()\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
    )
    assert result.returncode == 0, result.stderr


def test_standard_variables_name_the_service_and_choose_the_exporter() -> None:
    result = _python(
        "from sidecar import tracing\n"
        "assert tracing.setup_tracing('bifrost-container-sidecar')\n"
        "with tracing.job_span('refresh_batch', None):\n"
        "    pass\n"
        "tracing.shutdown_tracing()\n",
        OTEL_TRACES_EXPORTER="console",
        OTEL_SERVICE_NAME="team-a-sidecar",
    )
    assert result.returncode == 0, result.stderr
    assert '"name": "refresh_batch"' in result.stdout
    assert '"service.name": "team-a-sidecar"' in result.stdout


def test_without_opentelemetry_installed_tracing_stays_off_with_a_warning() -> None:
    result = _python(
        "import logging, sys\n"
        "logging.basicConfig()\n"
        "sys.modules['opentelemetry'] = None  # as if the otel extra were not installed\n"
        "from sidecar import tracing\n"
        "assert tracing.setup_tracing('sidecar') is False\n"
        "assert tracing.server_middlewares() == [] and tracing.current_carrier() == {}\n",
        OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4318",
    )
    assert result.returncode == 0, result.stderr
    assert "install the otel extra" in result.stderr
