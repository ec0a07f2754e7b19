"""Shared fixtures: a real redis-server on a free port, the emulator, sidecars on port 0."""

from __future__ import annotations

import asyncio
import io
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from aiohttp import web

from emulator import EMULATOR_STATE, EmulatorConfig, create_emulator_app
from sidecar.app import create_app
from sidecar.runner import SidecarRunner
from sidecar.settings import Settings, load_settings


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A real redis-server process on loopback, started and stopped by the tests."""

    def __init__(self, workdir: Path, extra: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run the README's test command")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), *self.extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.close()
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole run (flushed before each test that uses it)."""
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisServer(Path(workdir)).start()
        yield server
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The shared real Redis, empty."""
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, which the test may stop."""
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@dataclass
class Running:
    """A server started on a free port."""

    url: str
    app: web.Application
    runner: web.AppRunner


async def start_app(app: web.Application) -> Running:
    # The sidecar's own runner: it answers what aiohttp's parser refuses in the gateway's shape.
    # Teardown waits for open connections at most 5 s (aiohttp's default is 60 s).
    runner = SidecarRunner(app, access_log=None, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return Running(f"http://{host}:{port}", app, runner)


async def stop_app(running: Running, within_s: float = 30.0) -> None:
    """Stop an app started by ``start_app``; past ``within_s`` fail, naming what still runs
    (a teardown that hangs must say where, not stall the suite)."""
    try:
        await asyncio.wait_for(running.runner.cleanup(), within_s)
    except TimeoutError:
        stacks = io.StringIO()
        for task in asyncio.all_tasks():
            task.print_stack(file=stacks)
        pytest.fail(f"{running.url} did not stop within {within_s:.0f} s:\n{stacks.getvalue()}")


@dataclass
class Emulator(Running):
    """The emulator, with its state at hand."""

    async def create(self, key: str, **body: Any) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{self.url}/v1/containers",
                json={"name": "test", **body},
                headers={"Authorization": f"Bearer {key}"},
            ) as response,
        ):
            assert response.status == 200, await response.text()
            result: dict[str, Any] = await response.json()
            return result

    def retrieves(self, container_id: str | None = None) -> int:
        stats = self.app[EMULATOR_STATE].stats()
        if container_id is None:
            return int(stats["calls"].get("retrieve", 0))
        return int(stats["retrieve_by_container"].get(container_id, 0))

    @property
    def state(self) -> Any:
        return self.app[EMULATOR_STATE]


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    return EmulatorConfig(projects=(("sk-bf-team-a", "sk-bf-team-a2"),))


@pytest.fixture
async def emulator(emulator_config: EmulatorConfig) -> AsyncIterator[Emulator]:
    running = await start_app(create_emulator_app(emulator_config))
    yield Emulator(running.url, running.app, running.runner)
    await stop_app(running)


@pytest.fixture
def make_settings(emulator: Emulator, redis_url: str) -> Callable[..., Settings]:
    """Settings for a sidecar in front of the emulator on the shared real Redis."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "upstream_kind": "bifrost",
            "upstream_url": emulator.url,
            "redis_url": redis_url,
            "key_secret": "test-secret",
            "upstream_timeout_s": 2.0,
        }
        values.update(overrides)
        return load_settings({}, **values)

    return make


@pytest.fixture
async def start_sidecar() -> AsyncIterator[Callable[..., Any]]:
    """Starts sidecars (stopped at the end of the test); returns their base URLs."""
    running: list[Running] = []

    async def start(settings: Settings, **kwargs: Any) -> Running:
        server = await start_app(create_app(settings, **kwargs))
        running.append(server)
        return server

    yield start
    for server in reversed(running):
        await stop_app(server)


@pytest.fixture
async def sidecar(
    start_sidecar: Callable[..., Any], make_settings: Callable[..., Settings]
) -> Running:
    """A sidecar in front of the emulator (gateway shape) on the shared real Redis."""
    running: Running = await start_sidecar(make_settings())
    return running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def spans() -> Iterator[Any]:
    """Tracing on for this test, its spans kept in memory (the SDK's in-memory exporter)."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from sidecar import tracing

    exporter = InMemorySpanExporter()
    assert tracing.setup_tracing("test-sidecar", exporter=exporter)
    yield exporter
    tracing.shutdown_tracing()
