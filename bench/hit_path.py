"""Hit-path benchmark: ``sidecar serve`` against a bare aiohttp handler, same tools, same run.

    .venv/bin/python bench/hit_path.py [--duration 10] [--connections 32] [--rate 500]

Prints requests/s (wrk, closed loop), p50/p99 latency at a fixed offered rate (an open-loop
aiohttp client), their ratio, and the bytes one cached container takes in Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import BIN, emulator, free_port, process, redis_server, sidecar, wait_http

KEY = "sk-bf-bench"
AUTH = {"Authorization": f"Bearer {KEY}"}


def wrk(url: str, duration_s: int, connections: int) -> tuple[float, str, str]:
    """Closed-loop throughput: requests/s, p50, p99 as wrk prints them."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency",
         "-H", f"Authorization: Bearer {KEY}", url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"50%\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    if "Non-2xx" in out:
        raise RuntimeError(f"errors under load:\n{out}")
    return rps, p50, p99


async def fixed_rate(url: str, rate: float, duration_s: float) -> tuple[float, float, int]:
    """Open-loop latency at ``rate`` requests/s: p50 and p99 in ms, and errors."""
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector, headers=AUTH) as http:

        async def one() -> None:
            nonlocal errors
            started = time.perf_counter()
            async with http.get(url) as response:
                await response.read()
                if response.status != 200:
                    errors += 1
            latencies.append((time.perf_counter() - started) * 1000)

        for _ in range(50):  # warm the pool
            await one()
        latencies.clear()
        tasks = []
        start = time.perf_counter()
        total = int(rate * duration_s)
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one()))
        await asyncio.gather(*tasks)
    latencies.sort()
    return latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)], errors


def record_bytes(redis_url: str) -> tuple[int, int, int]:
    client = redis.Redis.from_url(redis_url)
    record_key = next(iter(client.scan_iter("*:rec")))
    value = client.get(record_key) or b""
    per_container = sum(client.memory_usage(k) or 0 for k in client.scan_iter("*"))
    return len(value), client.memory_usage(record_key) or 0, per_container


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=float, default=500)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")

    with redis_server() as redis_url, emulator() as upstream:
        request = urllib.request.Request(
            f"{upstream}/v1/containers", data=json.dumps({"name": "bench"}).encode(),
            headers={**AUTH, "Content-Type": "application/json"}, method="POST",
        )  # fmt: skip
        cid = json.load(urllib.request.urlopen(request))["id"]
        env = {
            "SIDECAR_UPSTREAM_URL": upstream,
            "SIDECAR_REDIS_URL": redis_url,
            "SIDECAR_KEY_SECRET": "bench",
            "SIDECAR_FRESH_TTL_S": "3600",
            "SIDECAR_GRANT_TTL_S": "3600",
            "SIDECAR_ACCESS_LOG": "false",
            "SIDECAR_LOG_LEVEL": "WARNING",
        }
        with sidecar(env) as base, tempfile.NamedTemporaryFile() as body_file:
            url = f"{base}/openai/v1/containers/{cid}"
            for _ in range(2):
                hit = urllib.request.urlopen(urllib.request.Request(url, headers=AUTH)).read()
            assert json.loads(hit)["extra_fields"]["cache_debug"]["cache_hit"] is True
            body_file.write(hit)
            body_file.flush()
            bare_port = free_port()
            with process([str(BIN / "python"), str(Path(__file__).parent / "bare_server.py"),
                          str(bare_port), body_file.name]):  # fmt: skip
                bare = f"http://127.0.0.1:{bare_port}/openai/v1/containers/{cid}"
                wait_http(bare)
                results = {}
                for name, target in (("bare aiohttp handler", bare), ("sidecar hit path", url)):
                    rps, wrk_p50, wrk_p99 = wrk(target, args.duration, args.connections)
                    p50, p99, errors = asyncio.run(fixed_rate(target, args.rate, args.duration))
                    results[name] = (rps, wrk_p50, wrk_p99, p50, p99, errors)
                sidecar_pid = int(
                    subprocess.check_output(["pgrep", "-f", "sidecar serve"]).split()[0]
                )
                status = Path(f"/proc/{sidecar_pid}/status").read_text().splitlines()
                rss_kib = int(next(ln.split()[1] for ln in status if ln.startswith("VmRSS:")))
        value_bytes, record_memory, all_memory = record_bytes(redis_url)

    print(f"\nhit path, {args.duration}s per measurement, response {len(hit)} bytes")
    print(f"{'':22} {'req/s (wrk -c' + str(args.connections) + ')':>20} {'wrk p50':>9} "
          f"{'wrk p99':>9} {'p50 @' + str(int(args.rate)) + '/s':>12} {'p99 @' + str(int(args.rate)) + '/s':>12}")  # fmt: skip
    for name, (rps, wp50, wp99, p50, p99, errors) in results.items():
        print(f"{name:22} {rps:>20,.0f} {wp50:>9} {wp99:>9} {p50:>10.2f}ms {p99:>10.2f}ms"
              + (f"  ({errors} errors)" if errors else ""))  # fmt: skip
    ratio = results["sidecar hit path"][0] / results["bare aiohttp handler"][0]
    print(f"sidecar / bare throughput: {ratio:.2f}")
    print(f"record value: {value_bytes} bytes (msgpack); Redis MEMORY USAGE of the record: "
          f"{record_memory} bytes; all keys of one cached container (record, grant, cache-id "
          f"index): {all_memory} bytes")  # fmt: skip
    print(f"sidecar resident memory after the run: {rss_kib / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
