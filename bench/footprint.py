"""Redis memory of one cached container with all its keys, cached the way a real app does.

    .venv/bin/python bench/footprint.py [--containers 2000] [--credentials 1 3]

For each credential count C: a fresh redis-server, the emulator and ``sidecar serve`` (with a
service credential, so the refresh-ahead index is kept as in production). Each of N containers is
read through the sidecar by C credentials of one project (a miss that stores the record and the
first grant, the others' grants), then once more by each (hits, which mark it read). Prints the
``INFO memory`` growth per container over the last nine tenths (fixed costs and client buffers
left out) and ``MEMORY USAGE`` of every key kind, per key and per container. Target: under 600
bytes a container with one credential.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import create_containers, emulator_with, redis_server, sidecar_server
from bench.hit_path import PREFIX, serve_options

TARGET_BYTES = 600
KEY_PREFIX = "bcs"
# A container's keys: "<prefix>:{<cache id>}:<kind>[:<fingerprint>]" (sidecar/keys.py).
_CONTAINER_KEY = re.compile(rf"^{KEY_PREFIX}:\{{[^}}]+\}}:(?P<kind>[a-z]+)")
_KIND_NAMES = {"r": "record", "g": "grant", "n": "negative (404)", "l": "fetch lock",
               "f": "failure marker"}  # fmt: skip


def memory(client: redis.Redis) -> dict[str, int]:
    """The ``INFO memory`` and ``MEMORY STATS`` figures this benchmark reads."""
    info: Any = client.info("memory")
    stats: Any = client.memory_stats()
    db = stats.get("db.0", {})
    return {
        "used": int(info["used_memory"]),
        "clients": int(stats.get("clients.normal", 0)) + int(stats.get("clients.slaves", 0)),
        "scripts": int(stats.get("lua.caches", 0)) + int(stats.get("functions.caches", 0)),
        "main": int(db.get("overhead.hashtable.main", 0)),
        "expires": int(db.get("overhead.hashtable.expires", 0)),
    }


def kind_of(key: str) -> str:
    """Which kind of key this is: a container's own (record, grant...) or a shared one."""
    match = _CONTAINER_KEY.match(key)
    if match:
        return _KIND_NAMES.get(match["kind"], f"container :{match['kind']}")
    shared = key.removeprefix(f"{KEY_PREFIX}:")
    return f"shared {shared}" if shared != key else f"other {key.split(':')[0]}"


async def read_through(base: str, ids: list[str], keys: list[str]) -> int:
    """Each credential reads every container twice through the sidecar; the hits counted."""
    sem = asyncio.Semaphore(32)
    hits = 0
    async with aiohttp.ClientSession() as http:

        async def one(cid: str, key: str) -> None:
            nonlocal hits
            auth = {"Authorization": f"Bearer {key}"}
            async with sem, http.get(f"{base}{PREFIX}{cid}", headers=auth) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"GET {cid}: {response.status}")
                status = response.headers.get("Cache-Status", "")
                hits += "; hit" in status and "fwd=" not in status

        for _ in range(2):  # a miss (or a grant's proof), then a hit
            for key in keys:
                await asyncio.gather(*(one(cid, key) for cid in ids))
    return hits


def measure(containers: int, credentials: int, all_keys: list[str]) -> None:
    keys = all_keys[:credentials]
    with (
        redis_server() as redis_url,
        emulator_with(0, projects=[all_keys]) as upstream,
    ):
        ids = create_containers(upstream, keys[0], containers)
        flag, serve_env = serve_options(1)
        env = {
            "SIDECAR_UPSTREAM_URL": upstream,
            "SIDECAR_REDIS_URL": redis_url,
            "SIDECAR_KEY_SECRET": "bench",
            "SIDECAR_KEY_PREFIX": KEY_PREFIX,
            "SIDECAR_SERVICE_API_KEY": all_keys[0],  # refresh on: the index is kept
            "SIDECAR_FRESH_TTL_S": "300",  # nothing goes stale (and is queued) meanwhile
            "SIDECAR_ACCESS_LOG": "false",
            "SIDECAR_LOG_LEVEL": "WARNING",
            **serve_env,
        }
        client = redis.Redis.from_url(redis_url)
        with sidecar_server(env, flag) as (base, _):
            # A tenth first: the connection pools, script caches and shared keys reach their
            # size, so the growth over the rest is what each further container costs.
            first = max(1, containers // 10)
            hits = asyncio.run(read_through(base, ids[:first], keys))
            time.sleep(1.5)  # the read tracker's and the stats' flushes (every 0.5 s)
            before = memory(client)
            hits += asyncio.run(read_through(base, ids[first:], keys))
            time.sleep(1.5)
            after = memory(client)
            by_kind: dict[str, list[int]] = defaultdict(list)
            value_bytes: list[int] = []
            for raw_key in client.scan_iter(count=1000):
                key = raw_key.decode()
                usage: Any = client.memory_usage(key, samples=0)
                by_kind[kind_of(key)].append(int(usage or 0))
                if key.endswith(":r"):
                    length: Any = client.strlen(key)
                    value_bytes.append(int(length))
            request = urllib.request.Request(
                f"{base}{PREFIX}{ids[0]}", headers={"Authorization": f"Bearer {keys[0]}"}
            )
            hit_body = len(urllib.request.urlopen(request, timeout=10).read())
        client.close()

    delta = {name: after[name] - before[name] for name in after}
    data = (delta["used"] - delta["clients"] - delta["scripts"]) / (containers - first)
    print(f"\n{containers:,} containers, each read by {credentials} credential(s) "
          f"(reads that were hits: {hits:,} of {2 * containers * credentials:,})")  # fmt: skip
    print(f"{'key kind':34}{'keys':>8}{'bytes/key':>11}{'bytes/container':>17}")
    total = 0
    for kind in sorted(by_kind, key=lambda k: (k.startswith(("shared", "other")), k)):
        sizes = by_kind[kind]
        per_container = sum(sizes) / containers
        total += sum(sizes)
        print(f"{kind:34}{len(sizes):>8,}{sum(sizes) / len(sizes):>11,.0f}{per_container:>17,.1f}")
    print(f"{'sum of MEMORY USAGE':34}{'':>8}{'':>11}{total / containers:>17,.1f}")
    print(f"{'INFO used_memory growth':34}{'':>8}{'':>11}{data:>17,.1f}   "
          f"(over the last {containers - first:,} containers; client buffers and script caches "
          f"left out: {delta['clients'] + delta['scripts']:+,} bytes)")  # fmt: skip
    print(f"  of which the key tables (entries and buckets): main "
          f"{delta['main'] / (containers - first):.1f}, expiries "
          f"{delta['expires'] / (containers - first):.1f}")  # fmt: skip
    if value_bytes:
        print(f"record value: {sum(value_bytes) / len(value_bytes):.0f} bytes stored on average "
              f"(the answer it makes: {hit_body} bytes of JSON)")  # fmt: skip
    if credentials == 1:
        verdict = "ok" if data < TARGET_BYTES else "MISSED"
        print(f"target: under {TARGET_BYTES} bytes a container with one credential: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containers", type=int, default=2000)
    parser.add_argument("--credentials", type=int, nargs="+", default=[1, 3])
    args = parser.parse_args()
    all_keys = [f"sk-bf-footprint-{i}" for i in range(max(args.credentials))]
    for credentials in args.credentials:
        measure(args.containers, credentials, all_keys)


if __name__ == "__main__":
    main()
