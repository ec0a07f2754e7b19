"""Polling workload: K clients poll M containers through R sidecar replicas sharing one Redis,
with N workers refreshing in the background and an upstream that takes 50 ms a call.

    .venv/bin/python bench/polling.py [--clients 100] [--containers 100] [--seconds 60]
                                      [--replicas 1,2,4] [--workers 2] [--fresh-ttl 10]

After a warm-up (every container read once), it counts for T seconds: upstream calls against
the ideal M x T / fresh TTL (one call per container per refresh interval), the share of answers
served stale and their mean age, and refresh jobs per second per worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
    emulator,
    emulator_reset,
    emulator_retrieves,
    redis_server,
    scrape,
    sidecar,
    worker,
)  # fmt: skip

KEY = "sk-bf-bench-app"


@dataclass
class Tally:
    answers: int = 0
    stale: int = 0
    stale_age_s: float = 0.0
    misses: int = 0
    errors: int = 0
    read: set[str] = field(default_factory=set)


async def poll(replicas: list[str], ids: list[str], weights: list[float], clients: int,
               interval_s: float, seconds: float, tally: Tally) -> None:  # fmt: skip
    """K clients, each reading a container (Zipf popularity) through a random replica."""
    connector = aiohttp.TCPConnector(limit=clients)
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=connector,
                                     headers={"Authorization": f"Bearer {KEY}"}) as http:  # fmt: skip

        async def client() -> None:
            rng = random.Random()
            await asyncio.sleep(rng.uniform(0, interval_s))
            while time.monotonic() < deadline:
                cid = rng.choices(ids, weights)[0]
                url = f"{rng.choice(replicas)}/openai/v1/containers/{cid}"
                async with http.get(url) as response:
                    body = await response.json()
                    age = response.headers.get("Age")
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

        await asyncio.gather(*(client() for _ in range(clients)))


def run(args: argparse.Namespace, replicas: int) -> dict[str, float]:
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(redis_server())
        upstream = stack.enter_context(emulator(latency_ms=args.latency_ms))
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
            "SIDECAR_SERVICE_API_KEY": KEY,
            "SIDECAR_FRESH_TTL_S": str(args.fresh_ttl),
            "SIDECAR_ACCESS_LOG": "false",
            "SIDECAR_LOG_LEVEL": "WARNING",
        }
        ids = create_containers(upstream, KEY, args.containers)
        urls = [stack.enter_context(sidecar(env)) for _ in range(replicas)]
        workers = [stack.enter_context(worker(env)) for _ in range(args.workers)]
        weights = [1 / (rank + 1) ** args.zipf for rank in range(len(ids))]
        random.shuffle(weights)

        async def warm() -> None:
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
                for cid in ids:
                    async with http.get(f"{urls[0]}/openai/v1/containers/{cid}") as response:
                        await response.read()

        asyncio.run(warm())
        emulator_reset(upstream)
        jobs_before = [scrape(w, "sidecar_refresh_jobs_total", event="succeeded") for w in workers]
        tally = Tally()
        asyncio.run(poll(urls, ids, weights, args.clients, args.interval, args.seconds, tally))
        calls = emulator_retrieves(upstream)
        jobs = [scrape(w, "sidecar_refresh_jobs_total", event="succeeded") - before
                for w, before in zip(workers, jobs_before, strict=True)]  # fmt: skip
    ideal = len(tally.read) * args.seconds / args.fresh_ttl
    return {
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
        "jobs_per_worker_s": sum(jobs) / len(jobs) / args.seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--containers", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--interval", type=float, default=0.2, help="each client's pause (s)")
    parser.add_argument("--replicas", default="1,2,4")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fresh-ttl", type=float, default=10)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--cluster", action="store_true", help="cache on a Redis Cluster")
    args = parser.parse_args()
    print(f"K={args.clients} clients polling every {args.interval}s, M={args.containers} "
          f"containers (Zipf {args.zipf}), T={args.seconds:.0f}s, N={args.workers} workers, "
          f"fresh TTL {args.fresh_ttl}s, upstream {args.latency_ms:.0f} ms"
          + (", cache on a Redis Cluster (3 masters + 3 replicas)" if args.cluster else ""))  # fmt: skip
    print(f"{'R':>2} {'answers':>8} {'read':>5} {'upstream calls':>15} {'ideal':>7} "
          f"{'calls/ideal':>11} {'stale share':>11} {'stale age':>9} {'misses':>6} "
          f"{'errors':>6} {'refreshes/s/worker':>18}")  # fmt: skip
    for replicas in (int(r) for r in args.replicas.split(",")):
        r = run(args, replicas)
        print(f"{r['replicas']:>2} {r['answers']:>8,.0f} {r['read']:>5.0f} {r['calls']:>15,.0f} "
              f"{r['ideal']:>7,.0f} {r['ratio']:>11.3f} {r['stale_share']:>11.2%} "
              f"{r['stale_age_s']:>8.1f}s {r['misses']:>6.0f} {r['errors']:>6.0f} "
              f"{r['jobs_per_worker_s']:>18.1f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
