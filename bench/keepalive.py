"""Keep-alive: what the sidecar's refreshes mean for a container's expiry.

    .venv/bin/python bench/keepalive.py [--read-for 90] [--hot-window 20]

OpenAI refreshes a container's ``last_active_at`` on every operation, retrieval included, and
expires it after ``expires_after.minutes`` of inactivity (the emulator does the same). Two
containers expire after one idle minute: A is read through the sidecar every 2 s for
``--read-for`` seconds, then no more; B is never read. A worker refreshes what is read (fresh
TTL 10 s, refresh-ahead for ``--hot-window`` s after the last read). The emulator is observed
without touching the containers. Expected: A stays ``running`` while it is read (its
refreshes keep it alive, as direct polling would) and expires about hot window + 1 minute after
the last read; B expires one minute after its creation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import emulator, redis_server, sidecar, worker

SERVICE_KEY = "sk-bf-service"


def call(url: str, method: str = "GET", body: object = None, key: str = SERVICE_KEY) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {key}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def peek(upstream: str, cid: str) -> dict:
    """The container as the emulator holds it, without touching it."""
    return call(f"{upstream}/_emulator/containers/{cid}", "PATCH", {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--read-for", type=float, default=90.0)
    parser.add_argument("--hot-window", type=float, default=20.0)
    parser.add_argument("--watch-for", type=float, default=150.0)
    args = parser.parse_args()
    with redis_server() as redis_url, emulator(latency_ms=20) as upstream:
        env = {
            "SIDECAR_UPSTREAM_URL": upstream, "SIDECAR_REDIS_URL": redis_url,
            "SIDECAR_KEY_SECRET": "keepalive", "SIDECAR_SERVICE_API_KEY": SERVICE_KEY,
            "SIDECAR_ACCESS_LOG": "false", "SIDECAR_HOT_WINDOW_S": str(args.hot_window),
        }  # fmt: skip
        expires = {"anchor": "last_active_at", "minutes": 1}
        a = call(f"{upstream}/v1/containers", "POST", {"name": "A", "expires_after": expires})["id"]
        b = call(f"{upstream}/v1/containers", "POST", {"name": "B", "expires_after": expires})["id"]
        with sidecar(env) as url, worker(env):
            started = time.monotonic()
            rows = []
            last_read = None
            expired_at: dict[str, float] = {}
            next_sample = 0.0
            while (now := time.monotonic() - started) < args.read_for + args.watch_for:
                if now < args.read_for:
                    call(f"{url}/openai/v1/containers/{a}")
                    last_read = now
                if now >= next_sample:
                    views = {name: peek(upstream, cid) for name, cid in (("A", a), ("B", b))}
                    for name, view in views.items():
                        if view["status"] == "expired":
                            expired_at.setdefault(name, now)
                    idle = time.time() - views["A"]["last_active_at"]
                    rows.append((now, views["A"]["status"], idle, views["B"]["status"]))
                    next_sample += 10
                if len(expired_at) == 2:
                    break
                time.sleep(2)
    print("| t (s) | A (read until "
          f"{args.read_for:.0f} s) | A idle for (s) | B (never read) |")  # fmt: skip
    print("| --- | --- | --- | --- |")
    for now, a_status, idle, b_status in rows:
        print(f"| {now:.0f} | {a_status} | {idle:.0f} | {b_status} |")
    print(f"B expired at {expired_at.get('B', float('nan')):.0f} s (created at 0, never read)")
    if last_read is not None and "A" in expired_at:
        print(f"A expired {expired_at['A'] - last_read:.0f} s after its last read "
              f"(hot window {args.hot_window:.0f} s + 60 s idle)")  # fmt: skip
    else:
        print("A did not expire while watched")


if __name__ == "__main__":
    main()
