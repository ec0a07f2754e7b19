"""Soak: thousands of ids and credentials through one sidecar until every in-process bound is
reached, with its resident memory, its /metrics size and each bounded map's size sampled.

    .venv/bin/python bench/soak.py [--ids 20000] [--credentials 1000] [--step 10000]
        [--after 8] [--one-off 0.05] [--random-provider 0.05] [--trace] [--max-requests N]

Each credential is a project of its own on the emulator and owns ids/credentials containers;
a request reads one of its own containers (a 200, cached for it) or, one time in five, someone
else's (a 404, cached as a negative entry for it). Some requests come from a credential never
seen before (``--one-off``: fills the credential cache) or name a random provider (fills the
cache-id memo). Once the local copies are full, a burst of ``no-cache`` reads of distinct
containers meets an upstream answering 503 (fills the failure memo). The soak runs in steps of
``--step`` requests until every bound is reached, then ``--after`` steps more: the RSS printed
when each bound is reached and over those last steps is the plateau (or what grows).

The sidecar runs under this script (``--serve-debug``, the same ``sidecar serve`` in one
process): on SIGUSR1 it writes the sizes of its bounded maps (found with ``gc``, read from
private attributes: a debugging aid, not an API) and, with ``--trace``, a tracemalloc snapshot;
the soak then prints the allocation sites that grew from all bounds reached to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import BIN, emulator, free_port, process, redis_server, scrape_total, wait_http


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def upstream_5xx(url: str) -> float:
    """Upstream calls the sidecar made that failed with a 5xx (each one enters the memo)."""
    return scrape_total(url, "sidecar_upstream_requests_total", status_class="5xx")


def metrics_size(url: str) -> int:
    return len(urllib.request.urlopen(f"{url}/metrics", timeout=10).read())


def bounds() -> dict[str, int]:
    """Each bounded map of a serving process, and its bound (from the code's own constants)."""
    from sidecar import credentials, keys, service
    from sidecar.settings import Settings

    local = Settings().local_max_entries
    return {
        "local copies": local, "local grants": local, "credentials": credentials._CACHE_MAX,
        "failures": service._MAX_FAILURES,
        "cache ids": keys.cache_id_for.cache_info().maxsize or 0,
        "key tags": keys._tag_of.cache_info().maxsize or 0,
    }  # fmt: skip


# -- the server under the soak ------------------------------------------------------------------


def serve_debug(directory: str, trace: bool) -> None:
    """``sidecar serve`` in this process; SIGUSR1 writes the maps' sizes (and a snapshot)."""
    import gc
    import tracemalloc

    from sidecar import cli, keys
    from sidecar.credentials import CredentialReader
    from sidecar.service import ContainerService

    if trace:
        tracemalloc.start(1)
    taken = 0

    def dump(signum: int, frame: object) -> None:
        nonlocal taken
        taken += 1
        sizes: dict[str, int] = {"cache ids": keys.cache_id_for.cache_info().currsize,
                                 "key tags": keys._tag_of.cache_info().currsize}  # fmt: skip
        for obj in gc.get_objects():
            if isinstance(obj, ContainerService):
                sizes |= {"local copies": len(obj.local._records),
                          "local grants": len(obj.local._grants),
                          "failures": len(obj._failures),
                          "throttle providers": len(obj.throttle._known)}  # fmt: skip
            elif isinstance(obj, CredentialReader):
                sizes["credentials"] = len(obj._known)
        if trace:
            tracemalloc.take_snapshot().dump(f"{directory}/snap-{taken}")
        Path(f"{directory}/tasks.txt").write_text(waiting_tasks())
        sizes["taken"] = taken
        Path(f"{directory}/sizes.tmp").write_text(json.dumps(sizes))
        os.replace(f"{directory}/sizes.tmp", f"{directory}/sizes.json")

    signal.signal(signal.SIGUSR1, dump)
    sys.exit(cli.main(["serve"]))


def waiting_tasks() -> str:
    """The server's asyncio tasks, grouped by where each waits (innermost frames last)."""
    import collections
    import gc

    # A signal handler runs outside the loop's context: find the loop itself.
    loops = [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop)]
    running = [loop for loop in loops if loop.is_running()]
    if not running:
        return ""
    tasks = asyncio.all_tasks(running[0])
    where: collections.Counter[str] = collections.Counter()
    for task in tasks:
        chain: list[str] = []
        awaited: Any = task.get_coro()
        while awaited is not None:  # down the awaits: where the task waits, not only its top
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            if frame is not None:
                chain.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        where[" > ".join(chain)] += 1
    return "\n".join(f"{n:>6} {stack}" for stack, n in where.most_common())


async def sizes_of(pid: int, directory: str, taken: int) -> dict[str, int]:
    """Ask the server for its maps' sizes (sample number ``taken``)."""
    os.kill(pid, signal.SIGUSR1)
    path = Path(directory) / "sizes.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if path.exists():
            sizes: dict[str, int] = json.loads(path.read_text())
            if sizes["taken"] >= taken:
                return sizes
        await asyncio.sleep(0.05)
    raise RuntimeError("the server did not write its sizes")


# -- load -----------------------------------------------------------------------------------------


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


class Soak:
    """The requests, in steps, and what was sampled after each."""

    def __init__(self, args: argparse.Namespace, url: str, upstream: str, pid: int) -> None:
        self.args, self.url, self.upstream, self.pid = args, url, upstream, pid
        self.rng = random.Random(1)
        self.done = 0
        self.one_offs = 0
        self.started = time.monotonic()
        self.failed_pairs = 0
        self.unanswered = 0

    async def step(self, http: aiohttp.ClientSession, owned: dict[str, list[str]]) -> None:
        keys, everyone = list(owned), [cid for ids in owned.values() for cid in ids]
        rng, args = self.rng, self.args

        async def client(count: int) -> None:
            for _ in range(count):
                key = rng.choice(keys)
                cid = rng.choice(owned[key]) if rng.random() < 0.8 else rng.choice(everyone)
                if rng.random() < args.one_off:
                    self.one_offs += 1
                    key = f"sk-bf-soak-x{self.one_offs:07d}"
                provider = "openai"
                if rng.random() < args.random_provider:
                    provider = f"p{rng.randrange(10**6)}"
                await self.get(http, cid, provider, key)
                self.done += 1

        await asyncio.gather(*(client(args.step // 32) for _ in range(32)))

    async def get(
        self, http: aiohttp.ClientSession, cid: str, provider: str, key: str, **headers: str
    ) -> int:
        try:
            async with http.get(
                f"{self.url}/openai/v1/containers/{cid}?provider={provider}",
                headers={"Authorization": f"Bearer {key}", **headers},
                timeout=aiohttp.ClientTimeout(total=30),
            ) as response:
                await response.read()
                return response.status
        except TimeoutError:
            self.unanswered += 1
            return 0

    async def failures(
        self, http: aiohttp.ClientSession, owned: dict[str, list[str]]
    ) -> dict[int, int]:
        """``no-cache`` reads of distinct containers while the upstream answers 503 (each burst
        other containers); how many got each status."""
        fault = {"kind": "status", "status": 503, "route": "*"}
        async with http.post(f"{self.upstream}/_emulator/faults", json=fault):
            pass
        pairs = [(key, cid) for key, ids in owned.items() for cid in ids]
        random.Random(2).shuffle(pairs)
        count = bounds()["failures"] + 500
        pairs = (pairs * 3)[self.failed_pairs : self.failed_pairs + count]
        self.failed_pairs += count
        statuses: dict[int, int] = {}
        sem = asyncio.Semaphore(32)

        async def one(key: str, cid: str) -> None:
            async with sem:
                status = await self.get(http, cid, "openai", key, **{"Cache-Control": "no-cache"})
                statuses[status] = statuses.get(status, 0) + 1

        try:
            await asyncio.gather(*(one(key, cid) for key, cid in pairs))
        finally:
            async with http.delete(f"{self.upstream}/_emulator/faults"):
                pass
        self.done += len(pairs)
        return statuses


def print_growth(directory: str, first: int, last: int, top: int = 15) -> None:
    """The allocation sites that grew most between two snapshots."""
    import tracemalloc

    before = tracemalloc.Snapshot.load(f"{directory}/snap-{first}")
    after = tracemalloc.Snapshot.load(f"{directory}/snap-{last}")
    diff = after.compare_to(before, "lineno")
    print(f"\ntracemalloc, sample {first} (every bound reached) to sample {last}: "
          f"{sum(d.size_diff for d in diff) / 2**20:+.2f} MiB traced in all; top sites")  # fmt: skip
    for stat in diff[:top]:
        frame = stat.traceback[0]
        print(f"  {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+8,} blocks  "
              f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}")  # fmt: skip


async def drive(args: argparse.Namespace, url: str, upstream: str, pid: int, directory: str,
                owned: dict[str, list[str]]) -> None:  # fmt: skip
    limits = bounds()
    soak = Soak(args, url, upstream, pid)
    reached: dict[str, int] = {}
    sizes: dict[str, int] = {}
    unanswered = 0
    after = 0
    taken = 0
    print("| requests | seconds | sidecar RSS (MiB) | /metrics (bytes) | local copies | "
          "local grants | credentials | failures | cache ids | unanswered |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
        while after < args.after and soak.done < args.max_requests:
            note = ""
            if "local copies" in reached and "failures" not in reached:
                # The memo is pruned to the back-offs still running whenever it is full: a
                # sample after the burst shows what is left, the 5xx count that it filled up.
                failed = upstream_5xx(url)
                statuses = await soak.failures(http, owned)
                if upstream_5xx(url) - failed >= limits["failures"]:
                    reached["failures"] = taken + 1
                    print(f"  bound reached: failures ({limits['failures']:,}) during the "
                          f"burst, RSS {rss_mib(pid):.1f} MiB", flush=True)  # fmt: skip
                note = f" (no-cache reads of other containers against a 503 upstream: {statuses})"
            else:
                await soak.step(http, owned)
            taken += 1
            sizes = await sizes_of(pid, directory, taken)
            rss = rss_mib(pid)
            print(f"| {soak.done:,} | {time.monotonic() - soak.started:.0f} | {rss:.1f} | "
                  f"{metrics_size(url):,} | {sizes.get('local copies', 0):,} | "
                  f"{sizes.get('local grants', 0):,} | {sizes.get('credentials', 0):,} | "
                  f"{sizes.get('failures', 0):,} | "
                  f"{sizes.get('cache ids', 0):,} | {soak.unanswered} |{note}", flush=True)  # fmt: skip
            if soak.unanswered > unanswered:  # where the server holds them, while it does
                unanswered = soak.unanswered
                for line in (Path(directory) / "tasks.txt").read_text().splitlines()[:6]:
                    print(f"  waiting: {line[:300]}", flush=True)
            for name, bound in limits.items():
                if name not in reached and sizes.get(name, 0) >= bound:
                    reached[name] = taken
                    print(f"  bound reached: {name} ({bound:,}) at {soak.done:,} requests, "
                          f"RSS {rss:.1f} MiB", flush=True)  # fmt: skip
            if all(name in reached for name in limits):
                after += 1
                reached.setdefault("all", taken)
    print(f"requests not answered within 30 s: {soak.unanswered}")
    tasks = (Path(directory) / "tasks.txt").read_text().splitlines()
    print("the server's tasks at the last sample, by where they wait:")
    for line in tasks[:8]:
        print(f"  {line[:400]}")
    missing = [name for name in limits if name not in reached]
    print(f"bounds not reached: {', '.join(missing) or 'none'}; other maps at the end: "
          f"{ {k: v for k, v in sizes.items() if k not in limits and k != 'taken'} }")  # fmt: skip
    if args.trace and "all" in reached and taken > reached["all"]:
        print_growth(directory, reached["all"], taken)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", type=int, default=20_000)
    parser.add_argument("--credentials", type=int, default=1_000)
    parser.add_argument("--step", type=int, default=10_000, help="requests between samples")
    parser.add_argument("--after", type=int, default=8, help="steps once every bound is reached")
    parser.add_argument("--one-off", type=float, default=0.05,
                        help="share of requests from a credential never seen before")  # fmt: skip
    parser.add_argument("--random-provider", type=float, default=0.05,
                        help="share of requests naming a random provider")  # fmt: skip
    parser.add_argument("--max-requests", type=int, default=3_000_000)
    parser.add_argument("--trace", action="store_true", help="tracemalloc in the server")
    parser.add_argument("--serve-debug", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_debug:
        serve_debug(args.serve_debug, args.trace)
        return
    signal.signal(signal.SIGTERM, _interrupt)  # the processes it started are stopped
    keys = [f"sk-bf-soak-{n:05d}" for n in range(args.credentials)]
    with tempfile.TemporaryDirectory() as directory, redis_server() as redis_url, emulator(
        latency_ms=2
    ) as upstream:  # fmt: skip
        owned = asyncio.run(create_all(upstream, keys, max(1, args.ids // args.credentials)))
        port = free_port()
        env = {
            "SIDECAR_UPSTREAM_URL": upstream, "SIDECAR_REDIS_URL": redis_url,
            "SIDECAR_KEY_SECRET": "soak", "SIDECAR_ACCESS_LOG": "false",
            "SIDECAR_PORT": str(port),
            "SIDECAR_HOST": "127.0.0.1",
        }  # fmt: skip
        command = [str(BIN / "python"), __file__, "--serve-debug", directory]
        with process(command + (["--trace"] if args.trace else []), env) as proc:
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/healthz", timeout_s=30)
            print(f"soak: {sum(map(len, owned.values())):,} ids, {len(keys):,} credentials, "
                  f"{args.one_off:.0%} of requests from a new credential, "
                  f"{args.random_provider:.0%} with a random provider name"
                  f"{', tracemalloc on' if args.trace else ''}", flush=True)  # fmt: skip
            asyncio.run(drive(args, url, upstream, proc.pid, directory, owned))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
