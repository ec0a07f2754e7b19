"""Chaos: the sidecar and its workers under load while Redis, the upstream and the workers fail.

    .venv/bin/python bench/chaos.py [--phases baseline,redis-kill,...] [--clients 32]
        [--containers 400] [--sidecars 1] [--workers 2] [--latency-ms 50] [--fresh-ttl 5]
        [--interval 0.05] [--scale 1.0] [--worker-kill-observe 40] [--slow-clients N]
        [--env SIDECAR_X=V] [--keep-logs]

Everything runs on loopback: a redis-server on a free port, the emulator (``sidecar emulate``,
standing for OpenAI: it keeps the containers) behind a small pass-through process standing for
the Bifrost gateway (the "upstream" the sidecar calls, which a phase kills and restarts),
``sidecar serve`` and ``sidecar-worker`` processes. 32 clients poll hundreds of containers of two
projects with five credentials (the workers' service credential belongs to the first), a
container and a credential chosen at random per request; one request in twenty asks for another
project's container (a legitimate 404; a 200 there is counted as a leak).

Phases, each once the previous one has healed (dead processes restarted, faults cleared, and
up to 12 s for answers to look like the baseline's again): baseline; redis-kill (SIGKILL,
restarted on the same port, empty); redis-hang (SIGSTOP ~5 s, SIGCONT); worker-kill (a worker
SIGKILLed while refreshes are in flight, restarted a second later); upstream-5xx (the emulator
answers 503 to everything); worker-redis (Redis killed under the workers: do they survive and
resume); upstream-kill (the gateway process SIGKILLed, restarted); slow-clients (pass-through
POSTs announcing 1 MB and sending a byte every 5 s, as many as the sidecar's upstream pool,
while no-cache retrieves, lists and /readyz are probed); redis-resume (SIGSTOP 6 s: how long
until every polled container is answered fresh again); lock-holder-kill (an extra sidecar
SIGKILLed while it holds 32 fetch locks: how long the other sidecar's waiters stall);
upstream-heal (503 on everything for 11 s: from healing to the first 200 for containers nobody
has a copy of). Every phase prints one row: requests and errors (non-2xx other than legitimate
404s, and connection errors) from the fault's start to the phase's end, latency while the fault
lasts, upstream calls/s as the emulator counts them and call attempts/s as the sidecars and
workers count them (while the fault lasts), and the time to recover; notes below a row give
the phase's own measurements. A whole default run takes about five minutes and stops by itself;
Ctrl-C stops it early. Processes are cleaned up either way; their logs are kept with
``--keep-logs``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import BIN, create_containers, descendants, free_port

KEYS_A = ("sk-bf-chaos-a1", "sk-bf-chaos-a2", "sk-bf-chaos-a3")
KEYS_B = ("sk-bf-chaos-b1", "sk-bf-chaos-b2")
SERVICE_KEY = "sk-bf-chaos-service"  # in project A, as a deployment's service key would be
BUCKET_S = 1.0
# The default order keeps after-effects apart: worker-redis (Redis restarted empty) comes
# between the two upstream outages, whose failure back-offs would otherwise run into each other.
PHASES = ("baseline", "redis-kill", "redis-hang", "worker-kill", "upstream-5xx",
          "worker-redis", "upstream-kill", "slow-clients", "redis-resume", "lock-holder-kill",
          "upstream-heal")  # fmt: skip


# -- processes -------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Child setup: its own process group, and SIGKILL when the benchmark dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Proc:
    """One process of the stack, restartable with the same command line; its log in a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log = logs / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        with self.log.open("ab") as sink:
            sink.write(f"---- start {self.starts + 1} at {time.strftime('%X')}\n".encode())
            sink.flush()
            self.popen = subprocess.Popen(
                self.args, env=self.env, stdout=sink, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        self.starts += 1

    def signal(self, sig: int) -> None:
        """Signal its whole process group (a server may have forked workers)."""
        if self.popen is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(5)

    def stop(self) -> None:
        if self.popen is None:
            return
        self.signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        self.signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self.signal(signal.SIGKILL)  # and whatever it forked
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def tracebacks(self) -> int:
        return self.log.read_text(errors="replace").count("Traceback") if self.log.exists() else 0


async def until(probe: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await probe():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout_s:.0f}s")
        await asyncio.sleep(0.05)


class Stack:
    """Redis, the emulator, the gateway in front of it, sidecars and workers."""

    def __init__(self, args: argparse.Namespace, logs: Path) -> None:
        self.args = args
        self.logs = logs
        self.redis_port, self.emulator_port, self.gateway_port = (
            free_port(),
            free_port(),
            free_port(),
        )
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.emulator_url = f"http://127.0.0.1:{self.emulator_port}"
        self.gateway_url = f"http://127.0.0.1:{self.gateway_port}"
        base = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        self.redis = Proc("redis", [shutil.which("redis-server") or "redis-server", "--port",
                          str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", str(logs)], base, logs)  # fmt: skip
        projects = ["--project", ",".join((*KEYS_A, SERVICE_KEY)), "--project", ",".join(KEYS_B)]
        self.emulator = Proc("emulator", [str(BIN / "sidecar"), "emulate", "--port",
                             str(self.emulator_port), "--latency-ms", str(args.latency_ms),
                             *projects], base, logs)  # fmt: skip
        self.gateway = Proc("gateway", [sys.executable, __file__, "--serve-gateway",
                            str(self.gateway_port), self.emulator_url], base, logs)  # fmt: skip
        env = {
            **base,
            "SIDECAR_UPSTREAM_URL": self.gateway_url,
            "SIDECAR_REDIS_URL": self.redis_url,
            "SIDECAR_KEY_SECRET": "chaos-bench",
            "SIDECAR_SERVICE_API_KEY": SERVICE_KEY,
            "SIDECAR_FRESH_TTL_S": str(args.fresh_ttl),
            "SIDECAR_QUEUE_NAME": "chaos:queue",
            "SIDECAR_ACCESS_LOG": "false",
            "SIDECAR_HOST": "127.0.0.1",
            **dict(item.split("=", 1) for item in args.env),
        }
        self.env = env
        self.sidecar_urls = []
        self.sidecars = []
        self.extras: list[Proc] = []
        """Processes a phase starts for itself (stopped at the end, never restarted)."""
        for i in range(args.sidecars):
            port = free_port()
            self.sidecar_urls.append(f"http://127.0.0.1:{port}")
            self.sidecars.append(Proc(f"sidecar{i}", [str(BIN / "sidecar"), "serve"],
                                      {**env, "SIDECAR_PORT": str(port)}, logs))  # fmt: skip
        self.worker_urls = []
        self.workers = []
        for i in range(args.workers):
            port = free_port()
            self.worker_urls.append(f"http://127.0.0.1:{port}")
            self.workers.append(Proc(f"worker{i}", [str(BIN / "sidecar-worker")],
                                     {**env, "SIDECAR_WORKER_METRICS_PORT": str(port)}, logs))  # fmt: skip
        self.http: aiohttp.ClientSession | None = None

    @property
    def all(self) -> list[Proc]:
        return [*self.workers, *self.sidecars, self.gateway, self.emulator, self.redis]

    async def get(self, url: str, timeout_s: float = 1.0) -> tuple[int, bytes]:
        assert self.http is not None
        async with self.http.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            return response.status, await response.read()

    async def answers(self, url: str) -> bool:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            await self.get(url)
            return True
        return False

    async def start_redis(self) -> None:
        self.redis.start()

        async def up() -> bool:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.redis_port)
                writer.close()
                return True
            return False

        await until(up, 10, "redis-server")

    async def start_gateway(self) -> None:
        self.gateway.start()
        await until(lambda: self.answers(f"{self.gateway_url}/_gateway/healthz"), 15, "gateway")

    async def start_sidecar(self, i: int) -> None:
        self.sidecars[i].start()
        await until(lambda: self.answers(f"{self.sidecar_urls[i]}/healthz"), 30, f"sidecar{i}")

    async def start_extra_sidecar(self, name: str) -> tuple[Proc, str]:
        """Another ``sidecar serve`` on the same Redis and upstream, outside the load."""
        port = free_port()
        proc = Proc(name, [str(BIN / "sidecar"), "serve"], {**self.env, "SIDECAR_PORT": str(port)},
                    self.logs)  # fmt: skip
        self.extras.append(proc)
        proc.start()
        url = f"http://127.0.0.1:{port}"
        await until(lambda: self.answers(f"{url}/healthz"), 30, name)
        return proc, url

    async def start_worker(self, i: int) -> None:
        self.workers[i].start()
        await until(lambda: self.answers(f"{self.worker_urls[i]}/healthz"), 30, f"worker{i}")

    async def start(self) -> None:
        self.http = aiohttp.ClientSession()
        await self.start_redis()
        self.emulator.start()
        await until(lambda: self.answers(f"{self.emulator_url}/_emulator/healthz"), 15, "emulator")
        await self.start_gateway()
        await asyncio.gather(*(self.start_sidecar(i) for i in range(len(self.sidecars))),
                             *(self.start_worker(i) for i in range(len(self.workers))))  # fmt: skip

    async def heal(self) -> list[str]:
        """Restart whatever died; clear faults. Returns what had to be done."""
        done = []
        self.redis.signal(signal.SIGCONT)
        if not self.redis.alive():
            done.append("redis restarted")
            await self.start_redis()
        await self.emulator_control("DELETE", "/_emulator/faults")
        if not self.gateway.alive():
            done.append("gateway restarted")
            await self.start_gateway()
        for i, proc in enumerate(self.sidecars):
            if not proc.alive():
                done.append(f"sidecar{i} restarted")
                await self.start_sidecar(i)
        for i, proc in enumerate(self.workers):
            if not proc.alive():
                done.append(f"worker{i} restarted")
                await self.start_worker(i)
        return done

    async def emulator_control(self, method: str, path: str, body: Any = None) -> Any:
        assert self.http is not None
        async with self.http.request(method, self.emulator_url + path, json=body,
                                     timeout=aiohttp.ClientTimeout(total=5)) as response:  # fmt: skip
            return await response.json()

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()

    def stop(self) -> None:
        for proc in [*self.extras, *self.all]:
            proc.stop()


# -- the gateway stand-in --------------------------------------------------------------------------

_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "upgrade", "host",
                  "content-length", "content-encoding", "te", "trailer"})  # fmt: skip


def serve_gateway(port: int, target: str) -> None:
    """A pass-through process in front of the emulator: the upstream a phase kills."""
    from aiohttp import web

    async def session_ctx(app: web.Application) -> Any:
        app["session"] = aiohttp.ClientSession(auto_decompress=False)
        yield
        await app["session"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        if request.path == "/_gateway/healthz":
            return web.json_response({"status": "ok"})
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        try:
            data = await request.read()
        except ConnectionResetError:  # its caller gave up on a body (slow-clients)
            return web.Response(status=400)
        async with request.app["session"].request(
            request.method, target + request.raw_path, headers=headers,
            data=data or None, allow_redirects=False,
        ) as upstream:  # fmt: skip
            body = await upstream.read()
            kept = [(k, v) for k, v in upstream.headers.items() if k.lower() not in _HOP]
            return web.Response(status=upstream.status, body=body, headers=kept)

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# -- load --------------------------------------------------------------------------------------------


@dataclass
class Answer:
    started: float
    ended: float
    kind: str
    """hit, stale, sie (stale-if-error), miss, 404 (legitimate), leak, or an error kind:
    bad404 (an own container answered 404), 4xx, 5xx, conn (connection error or timeout)."""
    age_s: float
    project: str
    cid: str
    detail: str = ""
    """For an error: its status and the start of its message."""


ERRORS = frozenset({"bad404", "4xx", "5xx", "conn"})


class Load:
    """Clients polling containers through the sidecars; every answer is recorded."""

    def __init__(
        self, stack: Stack, containers: dict[str, list[str]], args: argparse.Namespace
    ) -> None:
        self.stack = stack
        self.containers = containers
        self.args = args
        self.answers: list[Answer] = []
        self.t0 = time.monotonic()
        self.running = True

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def client(self, http: aiohttp.ClientSession, seed: int) -> None:
        rng = random.Random(seed)
        await asyncio.sleep(rng.uniform(0, self.args.interval))
        keys = [(key, "A") for key in KEYS_A] + [(key, "B") for key in KEYS_B]
        while self.running:
            key, project = rng.choice(keys)
            other = rng.random() < 0.05
            owner = ("B" if project == "A" else "A") if other else project
            cid = rng.choice(self.containers[owner])
            url = f"{rng.choice(self.stack.sidecar_urls)}/openai/v1/containers/{cid}"
            started = self.now()
            age = 0.0
            detail = ""
            try:
                async with http.get(url, headers={"Authorization": f"Bearer {key}"}) as response:
                    body = await response.read()
                    status = response.status
                    age = float(response.headers.get("Age") or 0)
                kind = classify(status, body, other)
                if kind in ERRORS:
                    detail = f"{status} {error_message(body)}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                kind = "conn"
                detail = type(exc).__name__
            self.answers.append(Answer(started, self.now(), kind, age, project, cid, detail))
            await asyncio.sleep(self.args.interval)

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            await asyncio.gather(*(self.client(http, i) for i in range(self.args.clients)))


def error_message(body: bytes) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:60].decode(errors="replace")
    return str(message)[:60]


def classify(status: int, body: bytes, other: bool) -> str:
    if status == 200:
        if other:
            return "leak"
        debug = json.loads(body).get("extra_fields", {}).get("cache_debug", {})
        if not debug.get("cache_hit"):
            return "miss"
        if debug.get("hit_type") == "stale_if_error":
            return "sie"
        return "hit" if debug.get("similarity", 1.0) >= 1.0 else "stale"
    if status == 404:
        return "404" if other else "bad404"
    return "5xx" if status >= 500 else "4xx"


class Sampler:
    """Counters sampled twice a second: emulator calls, sidecar and worker upstream attempts,
    worker refreshes (per process, restarts accounted for)."""

    def __init__(self, stack: Stack, load: Load) -> None:
        self.stack = stack
        self.load = load
        self.names = ("attempts", "attempts_sidecar", "attempts_worker", "refreshed",
                      "deduplicated_worker", "failed_worker")  # fmt: skip
        self.series: dict[str, list[tuple[float, float]]] = {
            n: [] for n in ("emulator", *self.names)
        }
        self._last: dict[tuple[str, str], float] = {}
        self._total: dict[str, float] = dict.fromkeys(self.names, 0.0)

    async def scrape(self, url: str, worker: bool = False) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        _, text = await self.stack.get(f"{url}/metrics", timeout_s=0.5)
        values = dict.fromkeys(self.names, 0.0)
        for family in text_string_to_metric_families(text.decode()):
            for sample in family.samples:
                if sample.name == "sidecar_upstream_requests_total":
                    values["attempts"] += sample.value
                    caller = sample.labels.get("caller")
                    if caller in ("sidecar", "worker"):
                        values[f"attempts_{caller}"] += sample.value
                elif sample.name == "sidecar_refresh_jobs_total":
                    event = sample.labels.get("event")
                    if event == "succeeded":
                        values["refreshed"] += sample.value
                    elif worker and event in ("deduplicated", "failed"):
                        values[f"{event}_worker"] += sample.value
        return values

    def add(self, source: str, name: str, value: float) -> None:
        """Accumulate a per-process counter (a restarted process starts again from 0)."""
        last = self._last.get((source, name))
        self._total[name] += value if last is None or value < last else value - last
        self._last[(source, name)] = value

    async def run(self) -> None:
        while self.load.running:
            now = self.load.now()
            with contextlib.suppress(Exception):
                stats = await self.stack.emulator_control("GET", "/_emulator/stats")
                self.series["emulator"].append((now, float(stats["total"])))
            for source in [*self.stack.sidecar_urls, *self.stack.worker_urls]:
                with contextlib.suppress(Exception):
                    scraped = await self.scrape(source, source in self.stack.worker_urls)
                    for name, value in scraped.items():
                        self.add(source, name, value)
            for name in self.names:
                self.series[name].append((now, self._total[name]))
            await asyncio.sleep(0.5)

    def rate(self, name: str, start: float, end: float) -> float | None:
        """Increase per second of a sampled counter between two instants."""
        points = self.series[name]
        before = [v for t, v in points if t <= start]
        after = [v for t, v in points if t >= end]
        if not before or not after or end <= start:
            inside = [(t, v) for t, v in points if start <= t <= end]
            if len(inside) < 2:
                return None
            (t1, v1), (t2, v2) = inside[0], inside[-1]
            return (v2 - v1) / (t2 - t1) if t2 > t1 else None
        return (after[0] - before[-1]) / (end - start)

    def first_increase(self, name: str, after: float) -> float | None:
        points = [(t, v) for t, v in self.series[name] if t >= after]
        for (_, v1), (t2, v2) in itertools.pairwise(points):
            if v2 > v1:
                return t2
        return None


# -- phases ----------------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    target: str
    fault_start: float = 0.0
    fault_end: float = 0.0
    end: float = 0.0
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class Chaos:
    def __init__(
        self, stack: Stack, load: Load, sampler: Sampler, args: argparse.Namespace
    ) -> None:
        self.stack, self.load, self.sampler, self.args = stack, load, sampler, args

    def s(self, seconds: float) -> float:
        return float(seconds * self.args.scale)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(self.s(seconds))

    async def settle(self, base: dict[str, float]) -> str | None:
        """Wait (2 s, at most 12 s) until the last second of answers looks like the baseline,
        so that a phase does not inherit the previous one's after-effects."""
        started = self.load.now()
        await self.sleep(2)
        while True:
            now = self.load.now()
            recent = buckets(self.load.answers, now - BUCKET_S, now)[0]
            if healthy(recent, base):
                return None
            if now - started > self.s(12):
                return f"not settled after {now - started:.0f}s (previous phase's after-effects)"
            await asyncio.sleep(0.5)

    async def baseline(self, phase: Phase) -> None:
        phase.fault_start = self.load.now()
        await self.sleep(15)
        phase.fault_end = self.load.now()

    async def redis_kill(self, phase: Phase) -> None:
        phase.fault_start = self.load.now()
        self.stack.redis.kill()
        await self.sleep(4)
        await self.stack.start_redis()
        phase.fault_end = self.load.now()
        await self.sleep(10)

    async def redis_hang(self, phase: Phase) -> None:
        phase.fault_start = self.load.now()
        self.stack.redis.signal(signal.SIGSTOP)
        await self.sleep(5)
        self.stack.redis.signal(signal.SIGCONT)
        phase.fault_end = self.load.now()
        await self.sleep(8)

    async def upstream_5xx(self, phase: Phase) -> None:
        phase.fault_start = self.load.now()
        await self.stack.emulator_control("POST", "/_emulator/faults",
                                          {"kind": "status", "status": 503, "route": "*"})  # fmt: skip
        await self.sleep(10)
        await self.stack.emulator_control("DELETE", "/_emulator/faults")
        phase.fault_end = self.load.now()
        await self.sleep(6)

    async def upstream_kill(self, phase: Phase) -> None:
        phase.fault_start = self.load.now()
        self.stack.gateway.kill()
        await self.sleep(8)
        await self.stack.start_gateway()
        phase.fault_end = self.load.now()
        await self.sleep(6)

    async def worker_kill(self, phase: Phase) -> None:
        """SIGKILL worker0 mid-refresh and restart it a second later.

        The upstream is slowed to 1 s for 1.5 s first, so that the worker has refreshes in
        flight when it dies (at 50 ms a call it would have one or two).
        """
        await self.stack.emulator_control("POST", "/_emulator/latency", {"ms": 1000})
        await asyncio.sleep(1.5)
        marked = await self.in_progress()
        phase.fault_start = self.load.now()
        self.stack.workers[0].kill()
        await self.stack.emulator_control(
            "POST", "/_emulator/latency", {"ms": self.args.latency_ms}
        )
        phase.notes.append(
            "upstream slowed to 1 s for 1.5 s before the kill"
            + (f"; arq in-progress keys at the kill: {marked}" if marked else "")
        )
        await asyncio.sleep(1)
        await self.stack.start_worker(0)
        observe_until = phase.fault_start + self.s(self.args.worker_kill_observe)
        await asyncio.sleep(max(0.0, observe_until - self.load.now()))
        phase.extra["recover_from"] = phase.fault_start  # the fault lasts to the end of the phase

    async def in_progress(self) -> int:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(self.stack.redis_url, socket_timeout=0.5)
        try:
            return len(await client.keys("arq:in-progress:*"))
        except Exception:
            return 0
        finally:
            await client.aclose()

    async def worker_redis(self, phase: Phase) -> None:
        pids = [w.pid for w in self.stack.workers]
        phase.fault_start = self.load.now()
        self.stack.redis.kill()
        await self.sleep(4)
        await self.stack.start_redis()
        phase.fault_end = self.load.now()
        await self.sleep(12)
        alive = [
            w.alive() and w.pid == pid for w, pid in zip(self.stack.workers, pids, strict=True)
        ]
        phase.extra["workers_alive"] = alive
        resumed = self.sampler.first_increase("refreshed", phase.fault_end)
        phase.extra["resumed_s"] = None if resumed is None else resumed - phase.fault_end
        survived = ", ".join(f"worker{i} {'yes' if a else 'NO'}" for i, a in enumerate(alive))
        resumed_text = (
            f"{phase.extra['resumed_s']:.1f}s after Redis came back" if resumed else "never"
        )
        phase.notes.append(f"worker PIDs survived: {survived}; refreshes resumed {resumed_text}")

    # -- the second round's phases (issue 15) -----------------------------------------------------

    async def probe(
        self, url: str, results: list[tuple[float, float, int]], **headers: str
    ) -> None:
        """One GET; ``(started, seconds, status)`` appended (status 0: no answer in 15 s)."""
        assert self.stack.http is not None
        started = self.load.now()
        status = 0
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with self.stack.http.get(
                url, headers=headers, timeout=aiohttp.ClientTimeout(total=15)
            ) as response:
                await response.read()
                status = response.status
        results.append((started, self.load.now() - started, status))

    async def slow_clients(self, phase: Phase) -> None:
        """``--slow-clients`` connections (default: 100 per serving process of the sidecar, the
        size of its upstream pool) each announcing a 1 MB pass-through POST and sending a byte
        every 5 s, while the clients poll; no-cache retrieves, lists and /readyz probed twice a
        second."""
        url = self.stack.sidecar_urls[0]
        host, port = url.removeprefix("http://").split(":")
        auth = {"Authorization": f"Bearer {KEYS_A[0]}"}
        head = (f"POST /openai/v1/containers HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Authorization: Bearer {KEYS_A[0]}\r\nContent-Type: application/json\r\n"
                f"Content-Length: 1000000\r\n\r\n{{").encode()  # fmt: skip
        ended: list[float] = []  # when the sidecar answered or closed a slow connection

        async def slow() -> None:
            reader, writer = await asyncio.open_connection(host, int(port))
            started = self.load.now()
            answered: asyncio.Future[bytes] | None = None
            try:
                writer.write(head)
                answered = asyncio.ensure_future(reader.read(1))
                while not answered.done():
                    await asyncio.wait([answered], timeout=5)
                    writer.write(b" ")
                    await writer.drain()
                ended.append(self.load.now() - started)
            except (OSError, asyncio.IncompleteReadError):
                ended.append(self.load.now() - started)
            finally:
                if answered is not None:
                    answered.cancel()
                writer.close()

        retrieves: list[tuple[float, float, int]] = []
        lists: list[tuple[float, float, int]] = []
        ready: list[tuple[int, str]] = []

        async def readyz() -> None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                status, body = await self.stack.get(f"{url}/readyz", timeout_s=5)
                ready.append((status, str(json.loads(body).get("upstream"))))
                return
            ready.append((0, "no answer"))

        async def upstream_failures() -> float:
            """The sidecar's upstream calls that failed (5xx or no answer), from its /metrics."""
            from prometheus_client.parser import text_string_to_metric_families

            _, text = await self.stack.get(f"{url}/metrics", timeout_s=5)
            return sum(
                sample.value
                for family in text_string_to_metric_families(text.decode())
                for sample in family.samples
                if sample.name == "sidecar_upstream_requests_total"
                and sample.labels.get("caller") == "sidecar"
                and sample.labels.get("status_class") in ("5xx", "error")
            )

        failures_before = await upstream_failures()
        phase.fault_start = self.load.now()
        # The upstream pool is per serving process: 100 each by default, as many as the pool.
        processes = max(1, len(descendants(self.stack.sidecars[0].pid or 0)))
        count = self.args.slow_clients or 100 * processes
        conns = [asyncio.ensure_future(slow()) for _ in range(count)]
        probes: set[asyncio.Future[None]] = set()
        rng = random.Random(7)
        while self.load.now() - phase.fault_start < self.s(20):
            cid = rng.choice(self.load.containers["A"])
            for probe in (
                self.probe(
                    f"{url}/openai/v1/containers/{cid}",
                    retrieves,
                    **auth,
                    **{"Cache-Control": "no-cache"},
                ),
                self.probe(f"{url}/openai/v1/containers?limit=5", lists, **auth),
                readyz(),
            ):
                task = asyncio.ensure_future(probe)
                probes.add(task)
                task.add_done_callback(probes.discard)
            await asyncio.sleep(0.5)
        phase.fault_end = self.load.now()
        for conn in conns:
            conn.cancel()
        await asyncio.gather(*conns, return_exceptions=True)
        await asyncio.gather(*probes, return_exceptions=True)
        for name, results in (("no-cache retrieves", retrieves), ("lists", lists)):
            took = [t * 1000 for _, t, _ in results]
            codes = collections.Counter(code for _, _, code in results)
            phase.notes.append(
                f"{name} during it: {len(results)}, statuses {dict(sorted(codes.items()))}, "
                f"p50 {pct(took, 0.5):.0f} ms, max {max(took, default=0):.0f} ms"
            )
        not_ready = sum(status != 200 for status, _ in ready)
        failing = sum(upstream != "ok" for _, upstream in ready)
        # /readyz reports an upstream failure for 30 s: after an upstream phase it says
        # "failing" for a while whatever this phase does. The sidecar's own count of failed
        # upstream calls during the phase is what the slow clients must not raise.
        failed = await upstream_failures() - failures_before
        phase.notes.append(
            f"/readyz: {len(ready) - not_ready} of {len(ready)} ready (upstream reported failing "
            f"{failing} times); upstream calls failed during it: {failed:.0f}; slow connections "
            f"the sidecar answered or closed: {len(ended)} of {len(conns)}"
            + (f" (after {min(ended):.1f}-{max(ended):.1f}s)" if ended else "")
        )
        phase.extra["probes_ok"] = all(code == 200 for _, _, code in retrieves + lists)
        phase.extra["ready_ok"] = not_ready == 0 and failed == 0
        await self.sleep(4)

    async def lock_holder_kill(self, phase: Phase) -> None:
        """An extra sidecar SIGKILLed while it holds the fetch locks of 32 cold containers
        (their upstream calls hang); the same credential's no-cache reads of them, waiting on
        the other sidecar: how long after the kill are they answered."""
        cids = await asyncio.to_thread(create_containers, self.stack.emulator_url, KEYS_A[0], 32)
        victim, victim_url = await self.stack.start_extra_sidecar("sidecar-victim")
        for cid in cids:  # each container's first call hangs: the victim's
            await self.stack.emulator_control("POST", "/_emulator/faults",
                                              {"kind": "timeout", "container_id": cid, "count": 1})  # fmt: skip
        headers = {"Authorization": f"Bearer {KEYS_A[0]}", "Cache-Control": "no-cache"}
        held: list[tuple[float, float, int]] = []
        holders = [asyncio.ensure_future(self.probe(f"{victim_url}/openai/v1/containers/{cid}",
                                                    held, **headers)) for cid in cids]  # fmt: skip
        locks = await self.count_keys("*:l:*", at_least=len(cids), within_s=5)
        waited: list[tuple[float, float, int]] = []
        waiters = [asyncio.ensure_future(self.probe(
            f"{self.stack.sidecar_urls[0]}/openai/v1/containers/{cid}", waited, **headers))
            for cid in cids]  # fmt: skip
        await asyncio.sleep(0.5)  # the waiters wait on the victim's locks
        phase.fault_start = self.load.now()
        victim.kill()
        await asyncio.gather(*waiters, *holders, return_exceptions=True)
        phase.fault_end = self.load.now()
        stalls = [started + took - phase.fault_start for started, took, _ in waited]
        codes = collections.Counter(code for _, _, code in waited)
        phase.extra["stalls"] = stalls
        phase.notes.append(
            f"fetch locks held at the kill: {locks}; {len(waited)} waiters on the other sidecar "
            f"answered {dict(sorted(codes.items()))} {pct(stalls, 0.5):.2f}s (p50) and "
            f"{max(stalls, default=float('nan')):.2f}s (max) after the kill, their own upstream "
            f"call ({self.args.latency_ms:.0f} ms) included"
        )
        await self.stack.emulator_control("DELETE", "/_emulator/faults")
        await self.sleep(3)

    async def count_keys(self, pattern: str, at_least: int, within_s: float) -> int:
        """How many Redis keys match, once there are ``at_least`` or ``within_s`` passed."""
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(self.stack.redis_url, socket_timeout=1)
        deadline = time.monotonic() + within_s
        found = 0
        try:
            while True:
                found = len([k async for k in client.scan_iter(match=pattern, count=1000)])
                if found >= at_least or time.monotonic() > deadline:
                    return found
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    async def redis_resume(self, phase: Phase) -> None:
        """Redis SIGSTOPped 6 s (past every client timeout), SIGCONT; watched 36 s: how long
        until every polled container is answered fresh again."""
        phase.fault_start = self.load.now()
        self.stack.redis.signal(signal.SIGSTOP)
        await self.sleep(6)
        self.stack.redis.signal(signal.SIGCONT)
        phase.fault_end = self.load.now()
        phase.extra["fresh_ttl"] = self.args.fresh_ttl
        await self.sleep(36)
        dedup = self.sampler.rate("deduplicated_worker", phase.fault_end, self.load.now())
        failed = self.sampler.rate("failed_worker", phase.fault_start, self.load.now())
        span = self.load.now() - phase.fault_start
        if dedup is not None and failed is not None:
            phase.notes.append(
                f"worker refreshes after SIGCONT: {dedup * (self.load.now() - phase.fault_end):.0f}"
                f" refused as deduplicated; failed from the hang on: {failed * span:.0f}"
            )

    async def upstream_heal(self, phase: Phase) -> None:
        """The upstream answers 503 to everything for 11 s, then heals; 16 containers nobody
        has read yet polled every 0.25 s from the outage on (their first reads 5 s apart in
        all, so the heal meets their back-offs at every point): when is each answered 200."""
        cids = await asyncio.to_thread(create_containers, self.stack.emulator_url, KEYS_A[0], 16)
        url = self.stack.sidecar_urls[0]
        answers: list[tuple[float, float, int, str]] = []

        async def poll(cid: str, delay_s: float) -> None:
            results: list[tuple[float, float, int]] = []
            await asyncio.sleep(delay_s)  # first reads spread over a back-off's length
            while self.load.running:
                await self.probe(f"{url}/openai/v1/containers/{cid}", results,
                                 Authorization=f"Bearer {KEYS_A[1]}")  # fmt: skip
                started, took, status = results[-1]
                answers.append((started, took, status, cid))
                await asyncio.sleep(0.25)

        await self.stack.emulator_control("POST", "/_emulator/faults",
                                          {"kind": "status", "status": 503, "route": "*"})  # fmt: skip
        phase.fault_start = self.load.now()
        pollers = [
            asyncio.ensure_future(poll(cid, i * 5 / len(cids))) for i, cid in enumerate(cids)
        ]
        await self.sleep(11)
        await self.stack.emulator_control("DELETE", "/_emulator/faults")
        phase.fault_end = self.load.now()
        await self.sleep(8)
        for poller in pollers:
            poller.cancel()
        await asyncio.gather(*pollers, return_exceptions=True)
        first: dict[str, float] = {}
        for started, took, status, cid in sorted(answers):
            if status == 200 and started >= phase.fault_end and cid not in first:
                first[cid] = started + took - phase.fault_end
        during = collections.Counter(s for t, _, s, _ in answers if t < phase.fault_end)
        phase.extra["first_200"] = [first.get(cid) for cid in cids]
        waits = list(first.values())
        phase.notes.append(
            f"{len(cids)} containers with no cached copy, polled every 0.25 s: during the "
            f"outage {dict(sorted(during.items()))}; after healing, first 200 for "
            f"{len(first)} of {len(cids)}: p50 {pct(waits, 0.5):.1f}s, max "
            f"{max(waits, default=float('nan')):.1f}s"
        )


TARGETS = {
    "baseline": "reference",
    "redis-kill": "0 errors; hits again <= 5s",
    "redis-hang": "p99<300ms max<1s 0 errors",
    "upstream-5xx": "calls/s <= baseline",
    "upstream-kill": "attempts/s <= baseline calls/s",
    "worker-kill": "recovered <= 5s",
    "worker-redis": "workers survive; refresh resumes",
    "slow-clients": "0 errors; probes 200; ready",
    "redis-resume": "all fresh again <= 2 fresh TTLs",
    "lock-holder-kill": "waiters answered < 1s after",
    "upstream-heal": "first 200 <= 5s after healing",
}


# -- analysis ----------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Bucket:
    answers: int = 0
    errors: int = 0
    cached: int = 0
    stale: int = 0
    sie: int = 0
    own: int = 0


def stale_runs(answers: list[Answer]) -> list[tuple[str, float, float | None]]:
    """Per container, each span it was answered stale: (container, first stale answer, first
    fresh answer after it, or None while it is still stale)."""
    opened: dict[str, float] = {}
    runs: list[tuple[str, float, float | None]] = []
    for a in sorted(answers, key=lambda a: a.ended):
        if a.kind in ("stale", "sie"):
            opened.setdefault(a.cid, a.ended)
        elif a.kind in ("hit", "miss") and a.cid in opened:
            runs.append((a.cid, opened.pop(a.cid), a.ended))
    runs += [(cid, start, None) for cid, start in opened.items()]
    return runs


def buckets(answers: list[Answer], start: float, end: float) -> list[Bucket]:
    out = [Bucket() for _ in range(max(1, int((end - start) / BUCKET_S + 0.999)))]
    for a in answers:
        if start <= a.ended < end:
            b = out[min(len(out) - 1, int((a.ended - start) / BUCKET_S))]
            b.answers += 1
            b.errors += a.kind in ERRORS
            own = a.kind not in ("404", "leak")
            b.own += own
            b.cached += a.kind in ("hit", "stale")
            b.stale += a.kind == "stale"
            b.sie += a.kind == "sie"
    return out


def healthy(b: Bucket, base: dict[str, float]) -> bool:
    """Answers as good as in the baseline: no errors, from cache, fresh."""
    return (
        b.own > 0
        and b.errors == 0
        and b.sie == 0
        and b.cached / b.own >= 0.9 * base["cached_share"]
        and b.stale / b.own <= 0.02
    )


def analyse(phase: Phase, load: Load, sampler: Sampler, base: dict[str, float]) -> dict[str, Any]:
    window = [a for a in load.answers if phase.fault_start <= a.started < phase.end]
    during_end = phase.fault_end if phase.fault_end > phase.fault_start else phase.end
    during = [a for a in window if a.started < during_end]
    latencies = [(a.ended - a.started) * 1000 for a in during]
    row: dict[str, Any] = {
        "requests": len(window),
        "errors": sum(a.kind in ERRORS for a in window),
        "leaks": sum(a.kind == "leak" for a in window),
        "p50": pct(latencies, 0.50),
        "p99": pct(latencies, 0.99),
        "max": max(latencies, default=float("nan")),
        "stale": sum(a.kind in ("stale", "sie") for a in window) / max(1, len(window)),
        "max_age": max((a.age_s for a in window), default=0.0),
        "calls": sampler.rate("emulator", phase.fault_start, during_end),
        "attempts": sampler.rate("attempts", phase.fault_start, during_end),
        "recover": None,
    }
    if phase.name.startswith("upstream") or phase.name == "baseline":
        by = [
            sampler.rate(f"attempts_{c}", phase.fault_start, during_end)
            for c in ("sidecar", "worker")
        ]
        if None not in by:
            phase.notes.append(f"tries/s by caller: sidecars {by[0]:.1f}, workers {by[1]:.1f}")
    details: dict[str, int] = {}
    for a in window:
        if a.kind in ERRORS:
            key = re.sub(r"cntr_\w+", "cntr_...", a.detail) if a.detail else a.kind
            details[key] = details.get(key, 0) + 1
    if details:
        top = sorted(details.items(), key=lambda kv: -kv[1])[:3]
        phase.notes.append("errors: " + "; ".join(f"{n} x {d!r}" for d, n in top))
    if phase.name == "baseline":
        own = [a for a in window if a.kind not in ("404", "leak")]
        for project in ("A", "B"):
            mine = [a for a in own if a.project == project]
            share = sum(a.kind in ("hit", "stale") for a in mine) / max(1, len(mine))
            phase.notes.append(f"project {project}: {share:.1%} of its answers from cache")
        return row
    recover_from = phase.extra.get("recover_from", during_end)
    after = buckets(load.answers, recover_from, phase.end)
    if phase.name == "worker-kill":
        # Containers answered stale for longer than any did in the baseline: left unrefreshed.
        longer = max(base["stale_run_s"] + BUCKET_S, 3.0)  # the slowed upstream's own delay
        hit = []
        for _, start, end in stale_runs(load.answers):
            if end is not None and end <= recover_from:
                continue
            until_s = (end if end is not None else phase.end) - max(start, recover_from)
            if until_s > longer:
                hit.append(((end if end is not None else phase.end) - recover_from, end is None))
        if not hit:
            row["recover"] = 0.0
        elif any(still for _, still in hit):
            row["recover"] = f">{phase.end - recover_from:.0f}"
        else:
            row["recover"] = max(t for t, _ in hit)
        phase.notes.append(
            f"containers left stale longer than in the baseline ({longer:.1f}s): {len(hit)}"
            + (f", the last refreshed {max(t for t, _ in hit):.1f}s after the kill" if hit else "")
        )
        return row
    if phase.name == "worker-redis":
        row["recover"] = phase.extra.get("resumed_s")
        return row
    if phase.name == "lock-holder-kill":
        stalls = phase.extra.get("stalls", [])
        row["recover"] = max(stalls) if stalls else None
        return row
    if phase.name == "upstream-heal":
        first = phase.extra.get("first_200", [])
        done = [t for t in first if t is not None]
        row["recover"] = (
            max(done) if first and len(done) == len(first) else f">{phase.end - during_end:.0f}"
        )
        return row
    if phase.name == "redis-resume":
        return resumed(phase, load, row)
    good = [healthy(b, base) for b in after]
    for i in range(len(good) - 1):
        if good[i] and good[i + 1]:
            row["recover"] = i * BUCKET_S
            break
    else:
        row["recover"] = f">{phase.end - during_end:.0f}"
    if phase.name == "redis-hang":
        later = [(a.ended - a.started) * 1000 for a in window if a.started >= during_end]
        if later:
            phase.notes.append(
                f"after SIGCONT: p99 {pct(later, 0.99):.0f} ms, max {max(later):.0f} ms"
            )
    return row


def resumed(phase: Phase, load: Load, row: dict[str, Any]) -> dict[str, Any]:
    """After Redis resumed: per container answered stale from then on, how long until it was
    answered fresh again (to the end of the phase while it still is not)."""
    resume = phase.fault_end
    waits: list[float] = []
    still = 0
    for _, start, end in stale_runs([a for a in load.answers if a.started < phase.end]):
        if end is not None and end <= resume:
            continue
        if end is None:
            still += 1
        waits.append((end if end is not None else phase.end) - max(resume, start)
                     + max(0.0, start - resume))  # fmt: skip
    limit = 2 * phase.extra["fresh_ttl"]
    row["recover"] = max(waits) if not still else f">{phase.end - resume:.0f}"
    after = [a for a in load.answers if a.started >= resume and a.started < phase.end]
    phase.notes.append(
        f"containers answered stale after SIGCONT: {len(waits)}; fresh again in p50 "
        f"{pct(waits, 0.5):.1f}s, max {max(waits, default=0):.1f}s; stale longer than 2 fresh "
        f"TTLs ({limit:.0f}s): {sum(w > limit for w in waits)}; max Age after SIGCONT "
        f"{max((a.age_s for a in after), default=0):.0f}s"
    )
    return row


def verdict(phase: Phase, row: dict[str, Any], base: dict[str, float]) -> str:
    recover = row["recover"]
    recovered_in = recover if isinstance(recover, float) else None
    ok: bool
    if phase.name == "baseline":
        return ""
    if phase.name == "redis-kill":
        ok = row["errors"] == 0 and recovered_in is not None and recovered_in <= 5
    elif phase.name == "redis-hang":
        ok = row["errors"] == 0 and row["p99"] < 300 and row["max"] < 1000
    elif phase.name == "upstream-5xx":
        ok = row["calls"] is not None and row["calls"] <= base["calls"] * 1.05
    elif phase.name == "upstream-kill":
        ok = row["attempts"] is not None and row["attempts"] <= base["calls"] * 1.05
    elif phase.name == "worker-kill":
        ok = recovered_in is not None and recovered_in <= 5
    elif phase.name == "slow-clients":
        ok = row["errors"] == 0 and phase.extra["probes_ok"] and phase.extra["ready_ok"]
    elif phase.name == "redis-resume":
        ok = recovered_in is not None and recovered_in <= 2 * phase.extra["fresh_ttl"]
    elif phase.name == "lock-holder-kill":
        ok = recovered_in is not None and recovered_in < 1.0
    elif phase.name == "upstream-heal":
        ok = recovered_in is not None and recovered_in <= 5
    else:
        ok = all(phase.extra.get("workers_alive", [False])) and recovered_in is not None
    return "MET" if ok and row["leaks"] == 0 else "MISSED"


def fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)


HEADER = (f"{'phase':<13} {'window':>6} {'requests':>8} {'errors':>6} {'leaks':>5} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'max ms':>7} {'stale':>6} {'max age':>7} {'calls/s':>7} "
          f"{'tries/s':>7} {'recover':>7}  {'target':<32} verdict")  # fmt: skip


def print_row(phase: Phase, row: dict[str, Any], verdict_text: str) -> None:
    window = phase.end - phase.fault_start
    print(f"{phase.name:<13} {window:>5.0f}s {row['requests']:>8,} {row['errors']:>6,} "
          f"{row['leaks']:>5} {fmt(row['p50'], '.1f'):>7} {fmt(row['p99'], '.1f'):>7} "
          f"{fmt(row['max'], '.0f'):>7} {row['stale']:>6.1%} {row['max_age']:>6.0f}s "
          f"{fmt(row['calls'], '.1f'):>7} {fmt(row['attempts'], '.1f'):>7} "
          f"{fmt(row['recover'], '.1f'):>6}{'s' if row['recover'] is not None else ' '}  "
          f"{phase.target:<32} {verdict_text}", flush=True)  # fmt: skip
    for note in phase.notes:
        print(f"{'':<15}{note}", flush=True)


# -- main --------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, stack: Stack) -> None:
    phases = [p.strip() for p in args.phases.split(",")] if args.phases != "all" else list(PHASES)
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(
            f"unknown phase(s): {', '.join(sorted(unknown))}; choose from {', '.join(PHASES)}"
        )
    if phases[0] != "baseline":
        phases.insert(0, "baseline")  # the reference for every target
    await stack.start()
    per_project = {"A": args.containers * 3 // 4, "B": args.containers - args.containers * 3 // 4}
    containers = {
        "A": await asyncio.to_thread(create_containers, stack.emulator_url, KEYS_A[0], per_project["A"]),
        "B": await asyncio.to_thread(create_containers, stack.emulator_url, KEYS_B[0], per_project["B"]),
    }  # fmt: skip
    load = Load(stack, containers, args)
    sampler = Sampler(stack, load)
    chaos = Chaos(stack, load, sampler, args)
    print(f"{args.clients} clients every {args.interval}s, {args.containers} containers in 2 projects, "
          f"5 credentials, {args.sidecars} sidecar(s), {args.workers} worker(s), fresh TTL "
          f"{args.fresh_ttl}s, upstream {args.latency_ms:.0f} ms; logs in {stack.logs}", flush=True)  # fmt: skip
    tasks = [asyncio.create_task(load.run()), asyncio.create_task(sampler.run())]
    try:
        await asyncio.sleep(chaos.s(8))  # warm-up: every container read, refresh-ahead running
        print(HEADER, flush=True)
        base: dict[str, float] = {}
        for name in phases:
            healed = await stack.heal()
            phase = Phase(name, TARGETS[name])
            if name != "baseline":
                settled = await chaos.settle(base)
                if settled is not None:
                    healed.append(settled)
            if healed:
                phase.notes.append("before the phase: " + "; ".join(healed))
            await getattr(chaos, name.replace("-", "_"))(phase)
            phase.end = load.now()
            died = [f"{p.name} (exit {p.popen.returncode})" for p in stack.all
                    if p.popen is not None and p.popen.poll() is not None]  # fmt: skip
            if died:
                phase.notes.append("died during the phase: " + ", ".join(died))
            await asyncio.sleep(0.6)  # a counter sample after the phase's end
            if name == "baseline":
                window = [a for a in load.answers if phase.fault_start <= a.started < phase.end]
                own = [a for a in window if a.kind not in ("404", "leak")]
                base = {
                    "calls": sampler.rate("emulator", phase.fault_start, phase.end) or 0.0,
                    "cached_share": sum(a.kind in ("hit", "stale") for a in own) / max(1, len(own)),
                    "stale_run_s": max((end - start for _, start, end in stale_runs(window)
                                        if end is not None), default=0.0),
                }  # fmt: skip
                phase.notes.append(f"longest a container was answered stale: "
                                   f"{base['stale_run_s']:.1f}s")  # fmt: skip
            row = analyse(phase, load, sampler, base)
            print_row(phase, row, verdict(phase, row, base))
    finally:
        load.running = False
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    print(f"{'':<15}window: from the fault to the end of the phase (errors, stale, max age); latency "
          f"and calls/s while the fault lasts; tries/s: upstream calls the sidecars and workers "
          f"attempted; recover: from the fault's end to hits again (worker-kill: from the kill "
          f"until the last container it left stale is refreshed; worker-redis: from Redis's "
          f"restart to the workers' first refresh)", flush=True)  # fmt: skip
    print(f"{'':<15}load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"({os.cpu_count()} CPUs; other work on the machine skews latencies)", flush=True)  # fmt: skip
    traces = {p.name: p.tracebacks() for p in stack.all if p.tracebacks()}
    if traces:
        print(
            f"{'':<15}tracebacks in the logs: " + ", ".join(f"{k} {v}" for k, v in traces.items())
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--phases", default="all", help=f"comma-separated, from {', '.join(PHASES)}"
    )
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--containers", type=int, default=400)
    parser.add_argument("--interval", type=float, default=0.05, help="each client's pause (s)")
    parser.add_argument("--sidecars", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--fresh-ttl", type=float, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every phase's durations")
    parser.add_argument("--worker-kill-observe", type=float, default=40,
                        help="seconds watched after the worker kill (a lapsed lease takes ~32s)")  # fmt: skip
    parser.add_argument("--slow-clients", type=int, default=0,
                        help="connections of the slow-clients phase (0: 100 per serving process)")  # fmt: skip
    parser.add_argument("--env", action="append", default=[], metavar="SIDECAR_X=V",
                        help="extra setting for the sidecars and workers (repeatable)")  # fmt: skip
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    parser.add_argument("--serve-gateway", nargs=2, metavar=("PORT", "URL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_gateway:
        serve_gateway(int(args.serve_gateway[0]), args.serve_gateway[1])
        return
    if args.workers < 1 or args.sidecars < 1:
        raise SystemExit("--workers and --sidecars must be at least 1")
    logs = Path(tempfile.mkdtemp(prefix="chaos-"))
    stack = Stack(args, logs)
    signal.signal(signal.SIGTERM, _interrupt)
    budget_s = (350 + args.worker_kill_observe) * args.scale + 120
    try:
        asyncio.run(asyncio.wait_for(_run_and_close(args, stack), budget_s))
    except KeyboardInterrupt:
        print("interrupted: stopping every process", flush=True)
    except TimeoutError:
        print(f"gave up after {budget_s:.0f}s: stopping every process", flush=True)
    finally:
        stack.stop()
        if args.keep_logs:
            print(f"logs kept in {logs}")
        else:
            shutil.rmtree(logs, ignore_errors=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


async def _run_and_close(args: argparse.Namespace, stack: Stack) -> None:
    try:
        await run(args, stack)
    finally:
        await stack.close()


if __name__ == "__main__":
    main()
