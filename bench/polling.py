"""Polling workload: K clients poll M containers through R sidecar replicas sharing one Redis,
with N workers refreshing in the background and an upstream that takes 50 ms a call.

    .venv/bin/python bench/polling.py [--clients 25,100,200] [--replicas 1,2,4]
                                      [--containers 100] [--seconds 60] [--workers 2]
                                      [--fresh-ttl 10] [--projects 1] [--cluster]

Each K x R pair is a run of its own (fresh Redis, emulator and processes). After a warm-up
(every container read once), it counts for T seconds: upstream calls against the ideal
M x T / fresh TTL (one call per container per refresh interval), the share of answers served
stale and their mean age, misses, and refreshes per second per worker.

``--projects N`` spreads containers and clients over N projects, each with its own API key;
the workers' service key belongs to the first. Refreshes of the other projects' containers are
refused (404) to the service key: the table adds the workers' refused calls (``worker 4xx``)
and the refresh jobs that ended in each event.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    create_containers,
    emulator_reset,
    emulator_retrieves,
    emulator_with,
    redis_server,
    scrape_total,
    sidecar,
    worker,
)  # fmt: skip

SERVICE_KEY = "sk-bf-bench-service"
EVENTS = ("succeeded", "failed", "skipped", "retried", "deduplicated")


def app_key(project: int) -> str:
    return f"sk-bf-bench-app-{project}"


@dataclass
class Tally:
    answers: int = 0
    stale: int = 0
    stale_age_s: float = 0.0
    misses: int = 0
    errors: int = 0
    read: set[str] = field(default_factory=set)


async def poll(replicas: list[str], projects: list[list[str]], clients: int, interval_s: float,
               seconds: float, zipf: float, tally: Tally) -> None:  # fmt: skip
    """K clients, each of one project (round robin), reading its containers (Zipf popularity)
    through a random replica with its project's key."""
    connector = aiohttp.TCPConnector(limit=clients)
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=connector) as http:

        async def client(number: int) -> None:
            rng = random.Random()
            project = number % len(projects)
            ids = projects[project]
            weights = [1 / (rank + 1) ** zipf for rank in range(len(ids))]
            rng.shuffle(weights)
            headers = {"Authorization": f"Bearer {app_key(project)}"}
            await asyncio.sleep(rng.uniform(0, interval_s))
            while time.monotonic() < deadline:
                cid = rng.choices(ids, weights)[0]
                url = f"{rng.choice(replicas)}/openai/v1/containers/{cid}"
                try:
                    async with http.get(url, headers=headers) as response:
                        body = await response.json()
                        age = response.headers.get("Age")
                except aiohttp.ClientError:
                    tally.errors += 1  # a replica that is gone: counted, not fatal
                    await asyncio.sleep(interval_s)
                    continue
                tally.answers += 1
                tally.read.add(cid)
                if response.status != 200:
                    tally.errors += 1
                    continue
                debug = body["extra_fields"]["cache_debug"]
                if not debug["cache_hit"]:
                    tally.misses += 1
                elif debug.get("similarity", 1.0) < 1.0:
                    tally.stale += 1
                    tally.stale_age_s += float(age or 0)
                await asyncio.sleep(interval_s)

        await asyncio.gather(*(client(n) for n in range(clients)))


def worker_counts(workers: list[str]) -> dict[str, float]:
    """Refresh job events and refused upstream calls, summed over the workers."""
    counts = {event: sum(scrape_total(w, "sidecar_refresh_jobs_total", event=event)
                         for w in workers) for event in EVENTS}  # fmt: skip
    counts["refused"] = sum(
        scrape_total(w, "sidecar_upstream_requests_total", caller="worker", status_class="4xx")
        for w in workers
    )
    return counts


def run(args: argparse.Namespace, clients: int, replicas: int) -> dict[str, float]:
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(redis_server())
        projects = [[app_key(0), SERVICE_KEY]] + [[app_key(p)] for p in range(1, args.projects)]
        upstream = stack.enter_context(emulator_with(args.latency_ms, projects=projects))
        cache: dict[str, str] = {"SIDECAR_REDIS_URL": redis_url}
        if args.cluster:
            # The cache on a 3-master, 3-replica Redis Cluster; arq's queue on the plain Redis.
            from tests.cluster.conftest import Cluster

            cluster = Cluster(Path(stack.enter_context(tempfile.TemporaryDirectory()))).start()
            stack.callback(cluster.stop)
            cache = {"SIDECAR_REDIS_URL": cluster.url, "SIDECAR_REDIS_CLUSTER": "true",
                     "SIDECAR_QUEUE_REDIS_URL": redis_url}  # fmt: skip
        env = {
            "SIDECAR_UPSTREAM_URL": upstream,
            **cache,
            "SIDECAR_KEY_SECRET": "bench",
            "SIDECAR_SERVICE_API_KEY": SERVICE_KEY,
            "SIDECAR_FRESH_TTL_S": str(args.fresh_ttl),
            "SIDECAR_ACCESS_LOG": "false",
            "SIDECAR_LOG_LEVEL": "WARNING",
        }
        owned = [create_containers(upstream, app_key(p), len(range(p, args.containers,
                                                                  args.projects)))
                 for p in range(args.projects)]  # fmt: skip
        urls = [stack.enter_context(sidecar(env)) for _ in range(replicas)]
        workers = [stack.enter_context(worker(env)) for _ in range(args.workers)]

        async def warm() -> None:
            async with aiohttp.ClientSession() as http:
                for project, ids in enumerate(owned):
                    for cid in ids:
                        async with http.get(f"{urls[0]}/openai/v1/containers/{cid}",
                                            headers={"Authorization": f"Bearer {app_key(project)}"}
                                            ) as response:  # fmt: skip
                            await response.read()

        asyncio.run(warm())
        emulator_reset(upstream)
        before = worker_counts(workers)
        tally = Tally()
        asyncio.run(poll(urls, owned, clients, args.interval, args.seconds, args.zipf, tally))
        calls = emulator_retrieves(upstream)
        after = worker_counts(workers)
    done = {name: after[name] - before[name] for name in after}
    ideal = len(tally.read) * args.seconds / args.fresh_ttl
    return {
        "clients": clients,
        "replicas": replicas,
        "answers": tally.answers,
        "read": len(tally.read),
        "calls": calls,
        "ideal": ideal,
        "ratio": calls / ideal,
        "stale_share": tally.stale / max(1, tally.answers),
        "stale_age_s": tally.stale_age_s / tally.stale if tally.stale else 0.0,
        "misses": tally.misses,
        "errors": tally.errors,
        "refreshes_per_worker_s": done["succeeded"] / args.workers / args.seconds,
        **{f"jobs_{event}": done[event] for event in EVENTS},
        "refused": done["refused"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="25,100,200", help="K values (comma-separated)")
    parser.add_argument("--containers", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--interval", type=float, default=0.2, help="each client's pause (s)")
    parser.add_argument("--replicas", default="1,2,4", help="R values (comma-separated)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fresh-ttl", type=float, default=10)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--projects", type=int, default=1,
                        help="spread containers and clients over this many projects")  # fmt: skip
    parser.add_argument("--cluster", action="store_true", help="cache on a Redis Cluster")
    args = parser.parse_args()
    # The emulator stands for the upstream: no access log of its own to write.
    os.environ.update(SIDECAR_ACCESS_LOG="false", SIDECAR_LOG_LEVEL="WARNING")
    print(f"clients polling every {args.interval}s, M={args.containers} containers (Zipf "
          f"{args.zipf}) in {args.projects} project(s), T={args.seconds:.0f}s, N={args.workers} "
          f"workers, fresh TTL {args.fresh_ttl}s, upstream {args.latency_ms:.0f} ms"
          + (", cache on a Redis Cluster (3 masters + 3 replicas)" if args.cluster else ""))  # fmt: skip
    print(f"{'K':>4} {'R':>2} {'answers':>8} {'read':>5} {'calls':>7} {'ideal':>6} "
          f"{'calls/ideal':>11} {'stale':>6} {'stale age':>9} {'misses':>6} {'errors':>6} "
          f"{'refreshes/s/worker':>18} {'jobs ok/failed/skipped/retried/dedup':>36} "
          f"{'worker 4xx':>10}")  # fmt: skip
    for clients in (int(k) for k in args.clients.split(",")):
        for replicas in (int(r) for r in args.replicas.split(",")):
            r = run(args, clients, replicas)
            jobs = "/".join(f"{r[f'jobs_{event}']:.0f}" for event in EVENTS)
            print(f"{r['clients']:>4} {r['replicas']:>2} {r['answers']:>8,.0f} {r['read']:>5.0f} "
                  f"{r['calls']:>7,.0f} {r['ideal']:>6,.0f} {r['ratio']:>11.3f} "
                  f"{r['stale_share']:>6.1%} {r['stale_age_s']:>8.1f}s {r['misses']:>6.0f} "
                  f"{r['errors']:>6.0f} {r['refreshes_per_worker_s']:>18.1f} {jobs:>36} "
                  f"{r['refused']:>10.0f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
