"""Hit-path benchmark: ``sidecar serve`` on a hot set against a bare aiohttp handler, same run.

    .venv/bin/python bench/hit_path.py [--containers 1000] [--credentials 8] [--duration 10]
        [--connections 64] [--threads 1] [--rounds 1] [--processes 1] [--scaling]
        [--bare-loop uvloop] [--profile FILE]

A hot set of containers (default 1,000) is read with several credentials of one project
(default 8). Every (container, credential) pair is warmed first, so every measured request is a
hit: the share is checked on the sidecar's ``/metrics`` and on the emulator's call count.
wrk (``bench/hit_path.lua``) then picks a random container and credential per request, against
``sidecar serve`` and against ``bench/bare_server.py`` (aiohttp + uvloop answering the same
number of bytes), each with the same number of processes. Targets: throughput >= 0.8x the bare
handler's, p99 <= 2x the bare handler's, max < 50 ms. ``--scaling`` measures 1 and 2 processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    BIN,
    cpu_seconds,
    create_containers,
    descendants,
    emulator_retrieves,
    emulator_with,
    free_port,
    listening,
    print_profile,
    process,
    profiling,
    redis_server,
    rss_kib,
    sidecar_server,
    wait_http,
)

HERE = Path(__file__).resolve().parent
PREFIX = "/openai/v1/containers/"
# The targets of the performance issue, against the bare handler of the same run.
TARGET_THROUGHPUT = 0.8
TARGET_P99 = 2.0
TARGET_MAX_MS = 50.0


class Load(NamedTuple):
    """What wrk measured against one server."""

    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    requests: int
    errors: int
    cpu_s: float
    """CPU time the server's processes used meanwhile (robust to other load on the machine)."""

    @property
    def per_cpu_s(self) -> float:
        """Requests answered per CPU-second of the server."""
        return self.requests / self.cpu_s if self.cpu_s else 0.0


class Run(NamedTuple):
    """One side-by-side measurement at some number of processes."""

    processes: int
    listening: int
    """Sidecar processes seen listening on its port."""
    bare: Load
    sidecar: Load
    hits: float
    answers: float
    upstream_calls: int
    redis_commands: int
    """Commands Redis processed during the sidecar's measurement (local copies spare them)."""
    rss_mib: float
    body_bytes: int
    load: float
    """1-minute load average before the measurement (others' work skews a 2-core machine)."""


def run_wrk(url: str, hot_set: Path, args: argparse.Namespace, pids: list[int]) -> Load:
    """wrk against ``url`` (served by ``pids``) with the hot-set script; its done() line."""
    command = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s",
               "--timeout", "5s", "-s", str(HERE / "hit_path.lua"), url, "--", str(hot_set)]  # fmt: skip
    cpu_before = cpu_seconds(pids)
    out = subprocess.run(
        command, capture_output=True, text=True, check=True, timeout=args.duration + 60
    ).stdout
    cpu_s = cpu_seconds(pids) - cpu_before
    line = next((ln for ln in out.splitlines() if ln.startswith("WRK_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    r = json.loads(line.removeprefix("WRK_RESULT "))
    errors = sum(r[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors"))
    return Load(
        rps=r["requests"] / (r["duration_us"] / 1e6),
        p50_ms=r["p50_us"] / 1000,
        p99_ms=r["p99_us"] / 1000,
        max_ms=r["max_us"] / 1000,
        requests=r["requests"],
        errors=errors + r["timeouts"],
        cpu_s=cpu_s,
    )


def write_hot_set(directory: Path, ids: list[str], keys: list[str], seed: int) -> Path:
    """The Lua data file bench/hit_path.lua reads: the ids and keys embedded."""
    path = directory / "hot_set.lua"
    ids_lua, keys_lua = (", ".join(json.dumps(v) for v in values) for values in (ids, keys))
    path.write_text(
        f"return {{prefix = {json.dumps(PREFIX)}, seed = {seed},\n"
        f"  ids = {{{ids_lua}}},\n  keys = {{{keys_lua}}}}}\n"
    )
    return path


async def read_all(
    base: str, ids: list[str], keys: list[str], concurrency: int
) -> tuple[int, list[bytes]]:
    """GET every (id, key) pair: how many were hits, and the bodies."""
    sem = asyncio.Semaphore(concurrency)
    hits = 0
    bodies: list[bytes] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:

        async def one(cid: str, key: str) -> None:
            nonlocal hits
            auth = {"Authorization": f"Bearer {key}"}
            async with sem, http.get(f"{base}{PREFIX}{cid}", headers=auth) as response:
                body = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"GET {cid}: {response.status} {body[:200]!r}")
                status = response.headers.get("Cache-Status", "")
                hits += "; hit" in status and "fwd=" not in status
                bodies.append(body)

        # One credential after another: the first reads (and stores) each record, the others
        # earn their grants for it.
        for key in keys:
            await asyncio.gather(*(one(cid, key) for cid in ids))
    return hits, bodies


def answers(base: str) -> tuple[float, float]:
    """Retrieval answers so far on the sidecar's /metrics: (hits, all outcomes)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    hits = total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != "sidecar_requests_total":
                continue
            if sample.labels.get("route") in ("passthrough", "admin", "unmatched"):
                continue
            total += sample.value
            hits += sample.value if sample.labels.get("outcome") == "hit" else 0
    return hits, total


def redis_commands(redis_url: str) -> int:
    """Commands Redis has processed so far."""
    client = redis.Redis.from_url(redis_url)
    try:
        stats: Any = client.info("stats")
        return int(stats["total_commands_processed"])
    finally:
        client.close()


def set_latency(upstream: str, latency_ms: float) -> None:
    """Change the emulator's latency."""
    body = json.dumps({"ms": latency_ms}).encode()
    request = urllib.request.Request(f"{upstream}/_emulator/latency", data=body, method="POST")
    urllib.request.urlopen(request, timeout=10).read()


def serve_options(processes: int) -> tuple[list[str], dict[str, str]]:
    """How this tree's ``sidecar serve`` is asked for N processes: its flag, its setting."""
    help_text = subprocess.run(
        [str(BIN / "sidecar"), "serve", "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    flag = ["--workers", str(processes)] if "--workers" in help_text else []
    try:
        from sidecar.settings import Settings

        has_setting = "serve_processes" in Settings.__struct_fields__
    except Exception:  # a tree mid-change: the flag may still do
        has_setting = False
    env = {"SIDECAR_SERVE_PROCESSES": str(processes)} if has_setting else {}
    if processes > 1 and not flag and not env:
        sys.exit("this tree's `sidecar serve` has neither --workers nor SIDECAR_SERVE_PROCESSES")
    return flag, env


@contextmanager
def bare_server(body: bytes, processes: int, loop: str) -> Iterator[tuple[str, list[int]]]:
    """bench/bare_server.py answering ``body``: its base URL and pids."""
    with tempfile.NamedTemporaryFile() as body_file:
        body_file.write(body)
        body_file.flush()
        port = free_port()
        command = [str(BIN / "python"), str(HERE / "bare_server.py"), str(port), body_file.name,
                   "--processes", str(processes), "--loop", loop]  # fmt: skip
        with process(command) as proc:
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}{PREFIX}ready")
            deadline = time.monotonic() + 10
            while len(listening([proc.pid, *descendants(proc.pid)], port)) < processes:
                if time.monotonic() > deadline:
                    raise RuntimeError("bare server processes did not all start")
                time.sleep(0.05)
            yield base, [proc.pid, *descendants(proc.pid)]


def measure(
    processes: int, args: argparse.Namespace, upstream: str, redis_url: str, ids: list[str],
    keys: list[str], workdir: Path,
) -> Run:  # fmt: skip
    """Warm the hot set in a fresh ``sidecar serve`` of N processes, then wrk both servers."""
    flag, serve_env = serve_options(processes)
    env = {
        "SIDECAR_UPSTREAM_URL": upstream,
        "SIDECAR_REDIS_URL": redis_url,
        "SIDECAR_KEY_SECRET": "bench",
        "SIDECAR_FRESH_TTL_S": "3600",
        "SIDECAR_GRANT_TTL_S": "3600",
        "SIDECAR_ACCESS_LOG": "false",
        "SIDECAR_LOG_LEVEL": "WARNING",
        **serve_env,
    }
    load = os.getloadavg()[0]
    with sidecar_server(env, flag) as (base, proc):
        port = int(base.rsplit(":", 1)[1])
        started = time.monotonic()
        # The upstream answers the warm-up at once (its latency only slows misses, and the
        # measurement has none), then at the set latency again.
        set_latency(upstream, 0)
        asyncio.run(read_all(base, ids, keys, 64))  # records and grants stored
        set_latency(upstream, args.latency_ms)
        checked = time.monotonic()
        hits, bodies = asyncio.run(read_all(base, ids, keys, 16))  # hits, local copies filled
        pairs = len(ids) * len(keys)
        print(f"  warmed {pairs:,} (container, credential) pairs in {checked - started:.1f}s; "
              f"second pass ({time.monotonic() - checked:.1f}s): {hits:,} hits of {pairs:,}",
              flush=True)  # fmt: skip
        sizes = sorted(len(b) for b in bodies)
        body = next(b for b in bodies if len(b) == sizes[len(sizes) // 2])
        hot_set = write_hot_set(workdir, ids, keys, seed=processes)
        profile = f"{args.profile}.{processes}" if args.profile and args.scaling else args.profile
        bare_profile = f"{profile}.bare" if profile else None
        pids = [proc.pid, *descendants(proc.pid)]
        hits_before, answers_before = answers(base)
        calls_before = emulator_retrieves(upstream)
        commands_before = redis_commands(redis_url)
        bares: list[Load] = []
        sidecars: list[Load] = []
        with bare_server(body, processes, args.bare_loop) as (bare_base, bare_pids):
            for turn in range(args.rounds):  # alternated: drifts in the machine's load hit both
                with profiling(bare_pids[0], bare_profile if turn == 0 else None, args.duration):
                    bares.append(run_wrk(bare_base, hot_set, args, bare_pids))
                with profiling(proc.pid, profile if turn == 0 else None, args.duration):
                    sidecars.append(run_wrk(base, hot_set, args, pids))
                print(f"  round {turn + 1}: bare {bares[-1].rps:,.0f} req/s, sidecar "
                      f"{sidecars[-1].rps:,.0f} req/s", flush=True)  # fmt: skip
        hits_after, answers_after = answers(base)
        calls = emulator_retrieves(upstream) - calls_before
        commands = redis_commands(redis_url) - commands_before
        serving = len(listening(pids, port))
        rss = rss_kib(pids) / 1024
    if profile and bare_profile:
        print_profile("bare handler", bare_profile, top=0)
        print_profile("sidecar", profile)
    return Run(processes, serving, combine(bares), combine(sidecars), hits_after - hits_before,
               answers_after - answers_before, calls, commands, rss, len(body), load)  # fmt: skip


def combine(loads: list[Load]) -> Load:
    """Rounds as one: medians of rate and percentiles, the worst max, totals of the rest."""
    return Load(
        rps=statistics.median(load.rps for load in loads),
        p50_ms=statistics.median(load.p50_ms for load in loads),
        p99_ms=statistics.median(load.p99_ms for load in loads),
        max_ms=max(load.max_ms for load in loads),
        requests=sum(load.requests for load in loads),
        errors=sum(load.errors for load in loads),
        cpu_s=sum(load.cpu_s for load in loads),
    )


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def print_run(run: Run, args: argparse.Namespace) -> None:
    print(f"\n{run.processes} process(es) each (sidecar processes listening: {run.listening}); "
          f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s; "
          f"{args.containers:,} containers x {args.credentials} credentials; "
          f"answers of {run.body_bytes} bytes")  # fmt: skip
    measured_s = args.duration * args.rounds
    if args.rounds > 1:
        print(f"{args.rounds} rounds, alternated: medians of req/s, p50 and p99; the worst max")
    if args.profile:
        print("the first round of each server ran under py-spy (which slows it)")
    print(f"{'':24}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'errors':>8}"
          f"{'CPU %':>8}{'req/CPU-s':>11}")  # fmt: skip
    for name, load in (
        ("bare aiohttp + " + args.bare_loop, run.bare),
        ("sidecar hit path", run.sidecar),
    ):
        print(f"{name:24}{load.rps:>10,.0f}{load.p50_ms:>9.2f}{load.p99_ms:>9.2f}"
              f"{load.max_ms:>9.1f}{load.errors:>8}{100 * load.cpu_s / measured_s:>8.0f}"
              f"{load.per_cpu_s:>11,.0f}")  # fmt: skip
    throughput = run.sidecar.rps / run.bare.rps
    p99 = run.sidecar.p99_ms / run.bare.p99_ms
    efficiency = run.sidecar.per_cpu_s / run.bare.per_cpu_s if run.bare.per_cpu_s else 0.0
    print(f"throughput ratio {throughput:.2f} (target >= {TARGET_THROUGHPUT}: "
          f"{verdict(throughput >= TARGET_THROUGHPUT)}); p99 ratio {p99:.2f} (target <= "
          f"{TARGET_P99}: {verdict(p99 <= TARGET_P99)}); max {run.sidecar.max_ms:.1f} ms "
          f"(target < {TARGET_MAX_MS:.0f}: {verdict(run.sidecar.max_ms < TARGET_MAX_MS)})")  # fmt: skip
    print(f"requests per server CPU-second, sidecar / bare: {efficiency:.2f} (CPU % is of one "
          f"core; the machine's load average before the run: {run.load:.1f})")  # fmt: skip
    share = run.hits / run.answers if run.answers else 0.0
    counted = "" if abs(run.answers - run.sidecar.requests) <= args.connections * args.rounds else (
        f"; /metrics counted {run.answers:,.0f} answers of wrk's {run.sidecar.requests:,}: "
        "it covers one process only"
    )  # fmt: skip
    valid = share >= 0.999 and run.upstream_calls == 0
    print(f"hits during the measurement: {share:.2%} ({run.hits:,.0f} of {run.answers:,.0f} "
          f"on /metrics){counted}; upstream retrieves meanwhile: {run.upstream_calls} -> "
          f"{'valid' if valid else 'NOT a pure hit-path measurement'}")  # fmt: skip
    print(f"Redis commands during the sidecar's measurement: {run.redis_commands:,} "
          f"({run.redis_commands / max(1, run.sidecar.requests):.3f} per answer)")  # fmt: skip
    print(f"sidecar resident memory after the run: {run.rss_mib:.0f} MiB "
          f"(all its processes)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containers", type=int, default=1000, help="hot set size")
    parser.add_argument("--credentials", type=int, default=8, help="keys of one project")
    parser.add_argument("--duration", type=int, default=10, help="seconds of wrk per server")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--latency-ms", type=float, default=50, help="emulator latency")
    parser.add_argument("--rounds", type=int, default=1, help="alternated wrk runs per server")
    parser.add_argument("--processes", type=int, default=1, help="processes of each server")
    parser.add_argument("--scaling", action="store_true", help="1 then 2 processes of each")
    parser.add_argument("--bare-loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument(
        "--profile", metavar="FILE", help="py-spy record the sidecar to FILE (FILE.bare: the bare)"
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")

    keys = [f"sk-bf-bench-{i}" for i in range(args.credentials)]
    counts = [1, 2] if args.scaling else [args.processes]
    runs = []
    with (
        tempfile.TemporaryDirectory() as workdir,
        redis_server() as redis_url,
        emulator_with(args.latency_ms, projects=[keys]) as upstream,
    ):
        ids = create_containers(upstream, keys[0], args.containers)
        for processes in counts:
            print(f"{processes} process(es):", flush=True)
            runs.append(measure(processes, args, upstream, redis_url, ids, keys, Path(workdir)))
    for run in runs:
        print_run(run, args)
    if len(runs) > 1:
        one, two = runs
        print(f"\nscaling 1 -> 2 processes: bare {two.bare.rps / one.bare.rps:.2f}x, "
              f"sidecar {two.sidecar.rps / one.sidecar.rps:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
