"""Refresh throughput: how many refreshes one worker process makes per second at 50 ms upstream.

    .venv/bin/python bench/refresh_throughput.py [--jobs 5000] [--latency-ms 50] [--workers 1]

Caches M stale containers, queues one refresh job for each, starts the workers and times the
queue from the first upstream call to the last.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from arq.connections import create_pool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import create_containers, emulator, emulator_retrieves, redis_server, worker
from sidecar.keys import KeySpace
from sidecar.policy import Policy
from sidecar.queue import REFRESH_JOB, queue_redis_settings, refresh_job_id
from sidecar.records import Record
from sidecar.settings import load_settings
from sidecar.store import Breaker, CacheStore

KEY = "sk-bf-bench-service"


async def prepare(redis_url: str, ids: list[str]) -> None:
    """Stale records for every container, and one queued refresh job each."""
    import redis.asyncio as aioredis

    settings = load_settings({}, redis_url=redis_url, upstream_kind="openai")
    client = aioredis.Redis.from_url(redis_url)
    store = CacheStore(client, KeySpace(settings.key_prefix), Breaker(1.0))
    policy = Policy(settings)
    old = time.time_ns() // 1_000_000 - 20_000
    for cid in ids:
        record = Record(provider="openai", container_id=cid, status_code=200,
                        body=b'{"id":"%s"}' % cid.encode(), fetched_at_ms=old, status="running")  # fmt: skip
        await store.save(record, policy)
    pool = await create_pool(queue_redis_settings(settings))
    for cid in ids:
        await pool.enqueue_job(REFRESH_JOB, "openai", cid, old + 10_000,
                               _job_id=refresh_job_id("openai", cid),
                               _queue_name=settings.queue_name)  # fmt: skip
    await pool.aclose()
    await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    with redis_server() as redis_url, emulator(latency_ms=args.latency_ms) as upstream:
        ids = create_containers(upstream, KEY, args.jobs)
        asyncio.run(prepare(redis_url, ids))
        env = {
            "SIDECAR_UPSTREAM_URL": upstream,
            "SIDECAR_REDIS_URL": redis_url,
            "SIDECAR_SERVICE_API_KEY": KEY,
            "SIDECAR_KEY_SECRET": "bench",
            "SIDECAR_LOG_LEVEL": "WARNING",
        }
        with contextlib.ExitStack() as stack:
            for _ in range(args.workers):
                stack.enter_context(worker(env))
            pids = [
                int(p) for p in subprocess.check_output(["pgrep", "-f", "sidecar-worker"]).split()
            ]
            while emulator_retrieves(upstream) == 0:
                time.sleep(0.01)
            started, cpu_before = time.monotonic(), cpu_seconds(pids)
            while (done := emulator_retrieves(upstream)) < args.jobs:
                time.sleep(0.02)
                if time.monotonic() - started > 300:
                    break
            elapsed, cpu = time.monotonic() - started, cpu_seconds(pids) - cpu_before
            rss_mib = max(rss_kib(pid) for pid in pids) / 1024
    rate = done / elapsed
    print(f"{done} refreshes in {elapsed:.2f}s with {args.workers} worker process(es), upstream "
          f"{args.latency_ms:.0f} ms: {rate:,.0f} refreshes/s, {rate / args.workers:,.0f} per worker; "
          f"worker CPU {cpu:.2f}s ({cpu / elapsed / args.workers:.0%} of a core each), "
          f"{done / cpu:,.0f} refreshes per worker CPU-second; worker resident memory "
          f"{rss_mib:.0f} MiB")  # fmt: skip


def rss_kib(pid: int) -> int:
    """Resident memory of a process (Linux /proc)."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line.split()[1] for line in status if line.startswith("VmRSS:")))


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (Linux /proc)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
