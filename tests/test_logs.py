"""Logs as an operator reads them: JSON or text lines, one access line per request, levels that
mean something, and never a credential."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.app import create_app
from sidecar.logs import (
    ACCESS_LOGGER,
    AccessLogger,
    access_log_options,
    log_handler,
    redact,
)
from sidecar.runner import SidecarRunner
from sidecar.settings import Settings
from tests.conftest import Emulator, free_port
from tests.support import wait_for

KEY = "sk-bf-team-a"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Captured:
    """What the root logger wrote while the test ran, as the process would print it."""

    def __init__(self, fmt: str) -> None:
        self.stream = io.StringIO()
        self.handler = log_handler(fmt, self.stream)

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines()]

    def access(self) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line["logger"] == ACCESS_LOGGER]


@pytest.fixture
def capture() -> Iterator[Callable[[str], Captured]]:
    root = logging.getLogger()
    made: list[Captured] = []
    level = root.level

    def start(fmt: str) -> Captured:
        captured = Captured(fmt)
        root.addHandler(captured.handler)
        root.setLevel(logging.DEBUG)
        made.append(captured)
        return captured

    yield start
    for captured in made:
        root.removeHandler(captured.handler)
    root.setLevel(level)


@pytest.fixture
async def serve(
    make_settings: Callable[..., Settings],
) -> AsyncIterator[Callable[..., Any]]:
    """Starts the sidecar app with the production runner and access logger; returns its base
    URL (hits on a copy are answered by the hit lane)."""
    runners: list[web.AppRunner] = []

    async def start(**overrides: Any) -> str:
        settings = make_settings(**overrides)
        runner = SidecarRunner(create_app(settings), **access_log_options(settings))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_json_access_lines_say_what_happened_without_credentials(
    serve: Callable[..., Any],
    emulator: Emulator,
    http: aiohttp.ClientSession,
    capture: Callable[[str], Captured],
) -> None:
    logs = capture("json")
    base = await serve()
    container = await emulator.create(KEY)
    url = f"{base}/openai/v1/containers/{container['id']}"
    for request_id in ("req-1", "bad id with spaces", "sk-proj-abcdefghijkl"):
        async with http.get(url, headers={**AUTH, "X-Request-Id": request_id}) as response:
            assert response.status == 200
    for path in ("/healthz", "/readyz", "/metrics"):
        async with http.get(base + path) as response:
            assert response.status == 200
    async with http.get(f"{base}/openai/v1/containers/nope!") as response:
        assert response.status == 400

    miss, hit, hit_again, client_error = logs.access()
    assert miss["message"].startswith("GET /openai/v1/containers/{container_id} 200 miss ")
    assert {
        k: miss[k] for k in ("level", "method", "route", "status", "outcome", "request_id")
    } == {
        "level": "INFO",
        "method": "GET",
        "route": "/openai/v1/containers/{container_id}",
        "status": 200,
        "outcome": "miss",
        "request_id": "req-1",
    }
    assert miss["time"].endswith("Z")
    assert "T" in miss["time"]
    assert miss["duration_ms"] > 0
    assert (hit["outcome"], hit_again["outcome"]) == ("hit", "hit")
    assert hit["duration_ms"] < miss["duration_ms"]
    # An implausible id, or one that looks like a key, is replaced by one made here.
    assert hit["request_id"] not in ("bad id with spaces", "")
    assert not hit_again["request_id"].startswith("sk-")
    assert hit["request_id"] != hit_again["request_id"]
    assert (client_error["status"], client_error["outcome"]) == (400, "error")
    assert client_error["route"] == "/openai/v1/containers/{container_id}"
    assert KEY not in logs.text
    assert container["id"] not in json.dumps(logs.access())  # the template, not the path
    assert not [line for line in logs.lines() if line["level"] in ("WARNING", "ERROR")]


async def test_a_relayed_request_gets_one_access_line_naming_its_family(
    serve: Callable[..., Any], http: aiohttp.ClientSession, capture: Callable[[str], Captured]
) -> None:
    logs = capture("json")
    base = await serve()
    async with http.post(f"{base}/openai/v1/chat/completions?secret-ish=x", json={},
                         headers=AUTH) as response:  # fmt: skip
        await response.read()
    # The relay's own error (an ambiguous credential, refused before anything goes) names the
    # same family.
    twice = [("Authorization", AUTH["Authorization"]), ("Authorization", "Bearer sk-bf-other")]
    async with http.post(f"{base}/openai/v1/chat/completions", json={}, headers=twice) as refused:
        assert refused.status == 400
    line, own_error = logs.access()
    assert (line["method"], line["route"]) == ("POST", "relay:chat")
    assert line["status"] == response.status
    assert (own_error["route"], own_error["status"]) == ("relay:chat", 400)
    assert "secret-ish" not in logs.text  # a family, never the path


async def test_text_access_lines_are_readable(
    serve: Callable[..., Any],
    emulator: Emulator,
    http: aiohttp.ClientSession,
    capture: Callable[[str], Captured],
) -> None:
    logs = capture("text")
    base = await serve()
    container = await emulator.create(KEY)
    async with http.get(
        f"{base}/v1/containers/{container['id']}?provider=openai",
        headers={**AUTH, "X-Request-Id": "abc-123"},
    ) as response:
        assert response.status == 200
    (line,) = [line for line in logs.text.splitlines() if f" {ACCESS_LOGGER}: " in line]
    assert " INFO sidecar.access: GET /v1/containers/{container_id} 200 miss " in line
    assert line.endswith("ms id=abc-123")


async def test_levels_mean_something(
    serve: Callable[..., Any],
    emulator: Emulator,
    http: aiohttp.ClientSession,
    capture: Callable[[str], Captured],
) -> None:
    logs = capture("json")
    base = await serve()
    container = await emulator.create(KEY)
    url = f"{base}/openai/v1/containers/{container['id']}"
    # A normal answer: only-if-cached and nothing cached yet.
    async with http.get(url, headers={**AUTH, "Cache-Control": "only-if-cached"}) as response:
        assert response.status == 504
    # The caller's mistakes.
    async with http.get(url) as response:
        assert response.status == 401
    async with http.get(f"{base}/v1/containers/{container['id']}") as response:
        assert response.status == 400
    assert not [line for line in logs.lines() if line["level"] not in ("DEBUG", "INFO")]

    # The upstream failing is worth a warning.
    down = await serve(upstream_url=f"http://127.0.0.1:{free_port()}")
    async with http.get(f"{down}/openai/v1/containers/{container['id']}", headers=AUTH) as r:
        assert r.status == 502
    warnings = [line for line in logs.lines() if line["level"] == "WARNING"]
    assert warnings
    assert all(KEY not in json.dumps(line) for line in warnings)
    assert logs.access()[-1]["status"] == 502


async def test_a_request_refused_before_routing_gets_an_access_line_too(
    serve: Callable[..., Any], capture: Callable[[str], Captured]
) -> None:
    logs = capture("json")
    base = await serve()
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"GET /openai/v1/containers/cntr_1 HTTP/1.1\r\nBad Header: sk-abcdefghijkl\r\n\r\n"
    )
    await writer.drain()
    assert (await reader.read(12)).endswith(b" 400")
    writer.close()
    await wait_for(lambda: bool(logs.access()))  # the access line, written after the answer
    (line,) = logs.access()
    assert (line["route"], line["status"], line["outcome"]) == ("unmatched", 400, "error")
    assert not [line for line in logs.lines() if line["logger"] == ACCESS_LOGGER
                and line["level"] != "INFO"]  # fmt: skip
    assert "abcdefghijkl" not in logs.text


def test_no_access_line_when_the_access_logger_is_quiet() -> None:
    logger = logging.getLogger("tests.quiet-access")
    logger.setLevel(logging.WARNING)
    assert not AccessLogger(logger, "").enabled
    logger.setLevel(logging.INFO)
    assert AccessLogger(logger, "").enabled


@pytest.mark.parametrize(
    ("written", "leaked"),
    [
        ("Authorization: Bearer abc.def-ghi", "abc.def-ghi"),
        ("authorization=Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
        ("{'api-key': 'azure0123456789'}", "azure0123456789"),
        ('"x-bf-vk": "vk-team-a-1234"', "vk-team-a-1234"),
        ("calling with bearer eyJhbGciOi.eyJzdWIi.sig", "eyJhbGciOi"),
        ("key sk-proj-AbCdEf123456 refused", "AbCdEf123456"),
        ("key sk-bf-demo-key refused", "demo-key"),
        ("redis://:hunter2@redis:6379/0", "hunter2"),
        ("rediss://default:s3cret@cache/1", "s3cret"),
    ],
)  # fmt: skip
def test_credentials_never_reach_a_line(written: str, leaked: str) -> None:
    assert leaked not in redact(written)
    assert "[REDACTED]" in redact(written)


def test_ordinary_text_is_left_alone() -> None:
    for text in ("GET /openai/v1/containers/{container_id} 200 hit 0.4ms id=req-1",
                 "cache on Redis redis://redis:6379/0", "task-123 skipped", "risk-free"):  # fmt: skip
        assert redact(text) == text


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_the_filter_redacts_messages_arguments_and_tracebacks(fmt: str) -> None:
    stream = io.StringIO()
    logger = logging.getLogger(f"tests.redaction.{fmt}")
    logger.propagate = False
    logger.addHandler(log_handler(fmt, stream))
    try:
        logger.warning("with Authorization: %s, %d tries", "Bearer tok-1234567", 3)
        logger.warning("key %s and %r", "sk-abcdef123456", {"authorization": "Bearer tok-7654321"})
        logger.warning({"event": "refused", "key": "sk-abcdef654321"})
        logger.warning("api-key: %s %s", "only-one-argument-for-two")  # a broken format
        try:
            raise ValueError("headers were {'Authorization': 'Bearer tok-in-exception'}")
        except ValueError:
            logger.exception("upstream call failed")
    finally:
        logger.handlers.clear()
    written = stream.getvalue()
    for secret in ("tok-1234567", "sk-abcdef123456", "tok-7654321", "sk-abcdef654321",
                   "tok-in-exception"):  # fmt: skip
        assert secret not in written
    assert "3 tries" in written
    assert "ValueError" in written
    if fmt == "json":
        lines = [json.loads(line) for line in written.splitlines()]
        assert lines[2]["event"] == "refused"
        assert "Traceback" in lines[-1]["exc_info"]
