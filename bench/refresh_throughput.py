"""Refresh throughput: how many refreshes one worker process makes per second at 50 ms upstream.

    .venv/bin/python bench/refresh_throughput.py [--jobs 8000] [--latency-ms 50] [--workers 1]
                                                 [--paths batch,single] [--connections 200]
                                                 [--runs 1]

Caches N stale containers, then times the workers renewing them all, from the first upstream
call to the last, on each path:

- ``batch``: refresh-ahead's. The containers were read recently (hot): the workers' refresh-ahead
  plans them all at its first tick and renews them with batch jobs (one job, 100 containers).
  (The table's CPU is the worker's; the emulator and Redis share the machine: on a machine that
  is busy with other work, their answers slow down and so does the rate.)
- ``single``: a stale read's. Each container claimed and queued as a batch of one, as a sidecar
  does on a stale read.

At 50 ms a call, 3,000 refreshes a second need 150 calls in flight: more than the default
connection pool (``SIDECAR_UPSTREAM_MAX_CONNECTIONS``, 100), hence ``--connections``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path

from arq.connections import create_pool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    cpu_seconds,
    create_containers,
    emulator,
    emulator_reset,
    emulator_retrieves,
    redis_server,
    rss_kib,
    worker_process,
)  # fmt: skip
from sidecar.keys import KeySpace
from sidecar.metrics import Metrics
from sidecar.policy import Policy
from sidecar.queue import Batch, enqueue_batch, queue_redis_settings, refresh_stale
from sidecar.records import Record
from sidecar.settings import load_settings
from sidecar.store import Breaker, CacheStore

KEY = "sk-bf-bench-service"


async def prepare(redis_url: str, ids: list[str], path: str) -> None:
    """Stale records for every container: read recently (batch), or each with a stale read's
    job (single)."""
    import redis.asyncio as aioredis

    settings = load_settings({}, redis_url=redis_url, upstream_kind="openai")
    client = aioredis.Redis.from_url(redis_url)
    store = CacheStore(client, KeySpace(settings.key_prefix), Breaker(1.0))
    policy = Policy(settings)
    old = time.time_ns() // 1_000_000 - 20_000
    sem = asyncio.Semaphore(64)

    async def save(cid: str) -> None:
        record = Record(provider="openai", container_id=cid, status_code=200,
                        body=b'{"id":"%s"}' % cid.encode(), fetched_at_ms=old, status="running")  # fmt: skip
        async with sem:
            await store.save(record, policy, read=path == "batch")

    await asyncio.gather(*(save(cid) for cid in ids))
    if path == "single":
        pool = await create_pool(queue_redis_settings(settings))
        due_ms = old + int(settings.fresh_ttl_s * 1000)
        metrics = Metrics("bench")

        async def enqueue(batch: Batch, carrier: object) -> bool:
            await enqueue_batch(pool, settings, batch)
            return True

        for cid in ids:
            await refresh_stale(store, settings, metrics, enqueue, ("openai", cid, due_ms))
        await pool.aclose()
    await store.close()
    await client.aclose()


def measure(args: argparse.Namespace, upstream: str, ids: list[str], path: str) -> str:
    with redis_server() as redis_url:
        asyncio.run(prepare(redis_url, ids, path))
        emulator_reset(upstream)
        env = {
            "SIDECAR_UPSTREAM_URL": upstream,
            "SIDECAR_REDIS_URL": redis_url,
            "SIDECAR_SERVICE_API_KEY": KEY,
            "SIDECAR_KEY_SECRET": "bench",
            "SIDECAR_LOG_LEVEL": "WARNING",
            "SIDECAR_UPSTREAM_MAX_CONNECTIONS": str(args.connections),
        }
        with contextlib.ExitStack() as stack:
            pids = [stack.enter_context(worker_process(env))[1].pid for _ in range(args.workers)]
            while emulator_retrieves(upstream) == 0:
                time.sleep(0.005)
            started, cpu_before = time.monotonic(), cpu_seconds(pids)
            while (done := emulator_retrieves(upstream)) < len(ids):
                time.sleep(0.02)
                if time.monotonic() - started > 300:
                    break
            elapsed, cpu = time.monotonic() - started, cpu_seconds(pids) - cpu_before
            rss_mib = rss_kib(pids) / 1024 / args.workers
    rate = done / elapsed / args.workers
    return (f"{path:>6} {done:>9,} {elapsed:>7.2f}s {rate:>14,.0f} {cpu / elapsed / args.workers:>13.0%} "
            f"{done / cpu:>14,.0f} {rss_mib:>8.0f} MiB")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8000, help="containers to refresh")
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--paths", default="batch,single")
    parser.add_argument("--connections", type=int, default=200,
                        help="SIDECAR_UPSTREAM_MAX_CONNECTIONS of each worker")  # fmt: skip
    parser.add_argument("--runs", type=int, default=1, help="measurements of each path")
    args = parser.parse_args()
    # The emulator is the upstream under test's load: no access log of its own to write.
    os.environ.update(SIDECAR_ACCESS_LOG="false", SIDECAR_LOG_LEVEL="WARNING")
    with emulator(latency_ms=args.latency_ms) as upstream:
        ids = create_containers(upstream, KEY, args.jobs)
        print(f"{args.jobs:,} stale containers, {args.workers} worker process(es), upstream "
              f"{args.latency_ms:.0f} ms, {args.connections} upstream connections a worker")  # fmt: skip
        print(f"{'path':>6} {'refreshes':>9} {'time':>8} {'/s per worker':>14} "
              f"{'CPU a worker':>13} {'per CPU-second':>14} {'RSS':>12}")  # fmt: skip
        for path in args.paths.split(","):
            for _ in range(args.runs):
                print(measure(args, upstream, ids, path), flush=True)


if __name__ == "__main__":
    main()
