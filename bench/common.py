"""Processes for benchmarks: redis-server, the emulator, sidecars, workers, all on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def process(
    args: list[str], env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        args,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir, process(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
         "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir]
    ):  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"


@contextlib.contextmanager
def emulator(latency_ms: float = 0.0) -> Iterator[str]:
    port = free_port()
    with process(
        [str(BIN / "sidecar"), "emulate", "--port", str(port), "--latency-ms", str(latency_ms)]
    ):
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/_emulator/healthz")
        yield url


@contextlib.contextmanager
def sidecar(env: Mapping[str, str]) -> Iterator[str]:
    port = free_port()
    with process([str(BIN / "sidecar"), "serve"], {**env, "SIDECAR_PORT": str(port),
                                                    "SIDECAR_HOST": "127.0.0.1"}):  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/openai/v1/containers/warmup")
        yield url


@contextlib.contextmanager
def worker(env: Mapping[str, str]) -> Iterator[str]:
    """A ``sidecar-worker`` process; yields the base URL of its metrics endpoint."""
    port = free_port()
    with process([str(BIN / "sidecar-worker")], {**env, "SIDECAR_WORKER_METRICS_PORT": str(port),
                                                 "SIDECAR_HOST": "127.0.0.1"}):  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz")
        yield url


def scrape(url: str, name: str, **labels: str) -> float:
    """One sample's value from a ``/metrics`` endpoint (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def create_containers(upstream: str, key: str, count: int) -> list[str]:
    """``count`` containers on the emulator, created concurrently."""
    import asyncio

    import aiohttp

    async def run() -> list[str]:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
            sem = asyncio.Semaphore(64)

            async def one(i: int) -> str:
                async with sem, http.post(f"{upstream}/v1/containers",
                                          json={"name": f"bench-{i}"}) as response:  # fmt: skip
                    return str((await response.json())["id"])

            return await asyncio.gather(*(one(i) for i in range(count)))

    return asyncio.run(run())


def emulator_retrieves(upstream: str) -> int:
    stats = json.loads(urllib.request.urlopen(f"{upstream}/_emulator/stats").read())
    return int(stats["calls"].get("retrieve", 0))


def emulator_reset(upstream: str) -> None:
    request = urllib.request.Request(f"{upstream}/_emulator/stats/reset", method="POST", data=b"")
    urllib.request.urlopen(request).read()
