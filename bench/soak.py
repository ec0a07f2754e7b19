"""Soak: thousands of ids and credentials through one sidecar, memory and /metrics size sampled.

    .venv/bin/python bench/soak.py [--ids 20000] [--credentials 1000] [--requests 100000]

Each credential is a project of its own on the emulator and owns ids/credentials containers;
a request reads one of its own containers (a 200, cached for it) or, one time in five, someone
else's (a 404, cached as a negative entry for it). Every in-process map is bounded, so the
sidecar's resident memory and the size of its /metrics must level off once the bounds are
reached, however many distinct ids, credentials and provider names it sees.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import BIN, emulator, free_port, process, redis_server, wait_http


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def metrics_size(url: str) -> int:
    return len(urllib.request.urlopen(f"{url}/metrics", timeout=10).read())


async def create_all(upstream: str, keys: list[str], per_key: int) -> dict[str, list[str]]:
    owned: dict[str, list[str]] = {key: [] for key in keys}
    sem = asyncio.Semaphore(64)
    async with aiohttp.ClientSession() as http:

        async def one(key: str, i: int) -> None:
            async with sem, http.post(
                f"{upstream}/v1/containers", json={"name": f"soak-{i}"},
                headers={"Authorization": f"Bearer {key}"},
            ) as response:  # fmt: skip
                owned[key].append(str((await response.json())["id"]))

        await asyncio.gather(*(one(key, i) for key in keys for i in range(per_key)))
    return owned


async def drive(
    url: str, owned: dict[str, list[str]], total: int, pid: int, samples: int
) -> list[tuple[int, float, int, float]]:
    rng = random.Random(1)
    keys = list(owned)
    everyone = [cid for ids in owned.values() for cid in ids]
    rows: list[tuple[int, float, int, float]] = []
    done = 0
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:

        async def client(count: int) -> None:
            nonlocal done
            for _ in range(count):
                key = rng.choice(keys)
                cid = rng.choice(owned[key]) if rng.random() < 0.8 else rng.choice(everyone)
                provider = "openai" if rng.random() < 0.99 else f"p{rng.randrange(10**6)}"
                async with http.get(
                    f"{url}/openai/v1/containers/{cid}?provider={provider}",
                    headers={"Authorization": f"Bearer {key}"},
                ) as response:
                    await response.read()
                done += 1

        step = total // samples
        for _ in range(samples):
            await asyncio.gather(*(client(step // 32) for _ in range(32)))
            rows.append((done, rss_mib(pid), metrics_size(url), time.monotonic() - started))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", type=int, default=20_000)
    parser.add_argument("--credentials", type=int, default=1_000)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=10)
    args = parser.parse_args()
    keys = [f"sk-bf-soak-{n:05d}" for n in range(args.credentials)]
    with redis_server() as redis_url, emulator(latency_ms=2) as upstream:
        owned = asyncio.run(create_all(upstream, keys, max(1, args.ids // args.credentials)))
        port = free_port()
        env = {
            "SIDECAR_UPSTREAM_URL": upstream, "SIDECAR_REDIS_URL": redis_url,
            "SIDECAR_KEY_SECRET": "soak", "SIDECAR_ACCESS_LOG": "false",
            "SIDECAR_SERVE_PROCESSES": "1", "SIDECAR_PORT": str(port),
            "SIDECAR_HOST": "127.0.0.1",
        }  # fmt: skip
        with process([str(BIN / "sidecar"), "serve"], env) as proc:
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/healthz")
            rows = asyncio.run(drive(url, owned, args.requests, proc.pid, args.samples))
    print(f"soak: {sum(map(len, owned.values())):,} ids, {len(keys):,} credentials, "
          f"1 % of requests with a random provider name")  # fmt: skip
    print("| requests | seconds | sidecar RSS (MiB) | /metrics (bytes) |")
    print("| --- | --- | --- | --- |")
    for done, rss, size, seconds in rows:
        print(f"| {done:,} | {seconds:.0f} | {rss:.1f} | {size:,} |")
    half = rows[len(rows) // 2 :]
    growth = half[-1][1] - half[0][1]
    print(f"second half: RSS {growth:+.1f} MiB, /metrics {half[-1][2] - half[0][2]:+,} bytes")


if __name__ == "__main__":
    main()
