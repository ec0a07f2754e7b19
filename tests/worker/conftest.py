"""Fixtures for the refresh path: sidecars with a service credential and real arq workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from sidecar.keys import KeySpace, member
from sidecar.metrics import Metrics
from sidecar.policy import Policy
from sidecar.records import Record, decode_record
from sidecar.settings import Settings
from sidecar.store import DUE_MARKS, Breaker, CacheStore, now_ms, read_by_ms
from tests.conftest import Emulator, free_port
from tests.support import BIN, request_refresh, wait_for
from worker.main import run_worker

SERVICE_KEY = "sk-bf-team-a"  # the service credential lives in the same project as the callers


@pytest.fixture
def refresh_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    """Settings with background refresh on and short windows."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "service_api_key": SERVICE_KEY,
            "fresh_ttl_s": 0.3,
            "max_stale_s": 30,
            "local_ttl_s": 0,
            "queue_name": "test:queue",
            "worker_metrics_port": 0,
        }
        values.update(overrides)
        return make_settings(**values)

    return make


async def run_worker_burst(settings: Settings, metrics: Metrics | None = None) -> int:
    """A real arq worker: run the refresh jobs queued now, then stop (no refresh-ahead); the
    number of jobs it ran."""
    return await run_worker(settings, burst=True, metrics=metrics)


class RunningWorker:
    """A worker running in a test; ``jobs``: the jobs it ran (known once it stopped)."""

    def __init__(self, settings: Settings) -> None:
        self.metrics = Metrics("worker", providers=settings.container_providers)
        self.jobs = 0


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[RunningWorker]:
    """A real arq worker running in the background of the test, refresh-ahead included."""
    stopping = asyncio.Event()
    running = RunningWorker(settings)
    task = asyncio.create_task(run_worker(settings, stopping=stopping, metrics=running.metrics))
    try:
        yield running
    finally:
        stopping.set()
        running.jobs = await asyncio.wait_for(task, 15)


def queued_jobs(redis_server: Any, queue: str = "test:queue") -> int:
    """Jobs waiting in the arq queue."""
    return int(redis_server.client().zcard(queue))


class WorkerProcess:
    """A real ``sidecar-worker`` process; its log goes to ``log`` (read it when a test fails)."""

    def __init__(self, settings: Settings, log: Path, **env: str) -> None:
        self.port = free_port()
        self.log = log
        variables = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")},
            "SIDECAR_REDIS_URL": settings.redis_url,
            "SIDECAR_UPSTREAM_URL": settings.upstream_url,
            "SIDECAR_KEY_SECRET": "test-secret",
            "SIDECAR_SERVICE_API_KEY": SERVICE_KEY,
            "SIDECAR_QUEUE_NAME": settings.queue_name,
            "SIDECAR_WORKER_METRICS_PORT": str(self.port),
            "SIDECAR_HOST": "127.0.0.1",
            "SIDECAR_FRESH_TTL_S": str(settings.fresh_ttl_s),
            "SIDECAR_UPSTREAM_TIMEOUT_S": str(settings.upstream_timeout_s),
            "SIDECAR_SHUTDOWN_TIMEOUT_S": "5",
            **env,
        }
        with log.open("ab") as sink:
            self.process = subprocess.Popen(
                [str(BIN / "sidecar-worker")], env=variables, stdout=sink, stderr=subprocess.STDOUT
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    async def ready(self, timeout_s: float = 15) -> None:
        """Wait for the worker's start-up to finish."""
        await wait_for(lambda: any("worker ready" in line for line in self.lines()), timeout_s)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(5)


@pytest.fixture
def worker_process(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Starts ``sidecar-worker`` processes, stopped at the end of the test."""
    started: list[WorkerProcess] = []

    def start(settings: Settings, **env: str) -> WorkerProcess:
        process = WorkerProcess(settings, tmp_path / f"worker{len(started)}.log", **env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.process.kill()
        process.process.wait(5)


@contextlib.asynccontextmanager
async def cache_store(settings: Settings) -> AsyncIterator[CacheStore]:
    """The cache store the sidecars and workers of ``settings`` share (real Redis)."""
    client = aioredis.Redis.from_url(settings.redis_url)
    store = CacheStore(client, KeySpace(settings.key_prefix), Breaker(1.0))
    try:
        yield store
    finally:
        await store.close()
        await client.aclose()


async def cache_container(
    settings: Settings, container_id: str, age_s: float, *, read: bool = False
) -> Record:
    """Cache a running container as fetched ``age_s`` ago (``read``: as a caller's read,
    which refresh-ahead keeps fresh); the record stored."""
    record = Record(
        provider="openai", container_id=container_id, status_code=200,
        body=b'{"id":"%s","object":"container","status":"running"}' % container_id.encode(),
        fetched_at_ms=time.time_ns() // 1_000_000 - int(age_s * 1000), status="running",
    )  # fmt: skip
    async with cache_store(settings) as store:
        await store.save(record, Policy(settings), read=read)
    return record


async def cached(settings: Settings, container_id: str) -> Record | None:
    """The record of a container as stored now."""
    async with cache_store(settings) as store:
        raw, _ = (await store.read_many([("openai", container_id)]))[0]
        return decode_record(raw) if raw is not None else None


async def indexed(settings: Settings, container_id: str) -> tuple[int | None, int | None]:
    """The container's entry in the due set: when it is due (unix ms) and the latest time its
    last read may have been (unix ms; None: no read noted); (None, None) when not indexed."""
    async with cache_store(settings) as store:
        score = await store.redis.zscore(store.keys.due, member("openai", container_id))
        if score is None:
            return None, None
        due_ms, mark = divmod(int(score), DUE_MARKS)
        return due_ms, read_by_ms(mark, now_ms())


async def enqueue_refresh(settings: Settings, container_id: str, due_ms: int) -> None:
    """A stale read's refresh, as a sidecar asks for it."""
    assert await request_refresh(settings, container_id, due_ms)


async def scrape(url: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of one metric at ``url``/metrics, by label set."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
        text = await response.text()
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


__all__ = [
    "SERVICE_KEY",
    "Emulator",
    "WorkerProcess",
    "cache_container",
    "cached",
    "enqueue_refresh",
    "indexed",
    "queued_jobs",
    "run_worker_burst",
    "running_worker",
    "scrape",
    "wait_for",
]
