"""The relay beside nginx: what the sidecar adds to requests it does not answer from its cache.

    .venv/bin/python bench/relay.py [--full] [--requests 2000] [--bytes-mib 256]

One run, one small local aiohttp upstream, three ways to it: direct, through nginx as a reverse
proxy (``proxy_buffering off``, ``proxy_request_buffering off``, HTTP/1.1 keep-alive to the
upstream, one worker) and through a ``sidecar serve`` process (one process, embedded store, its
default access log). Prints: the latency a small JSON POST gains on each path (p50, p99 over
``--requests`` calls, the paths taken in turn), the delay added to server-sent events (each
event carries the upstream's monotonic send time, read at arrival), upload and download
throughput (``--bytes-mib``, 1 GiB with ``--full``), and the sidecar's resident memory before
and at its peak during the upload. Targets (issue 16): added p50 <= 0.5 ms, p99 <= 2 ms, SSE
<= 1 ms, throughput >= half nginx's, RSS growth < 16 MiB for a 1 GiB upload.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import BIN, free_port, process, wait_http

AUTH = {"Authorization": "Bearer sk-bf-bench"}
CHUNK = b"\x5a" * (1 << 18)
NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream app {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


# -- the upstream (run in its own process: ``--serve-upstream PORT``)


async def _small(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"id": "chatcmpl-1", "object": "chat.completion", "ok": True})


async def _events(request: web.Request) -> web.StreamResponse:
    count, gap_s = int(request.query["n"]), int(request.query["gap_ms"]) / 1000
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for _ in range(count):
        await response.write(f"data: {time.monotonic_ns()}\n\n".encode())
        await asyncio.sleep(gap_s)
    await response.write_eof()
    return response


async def _upload(request: web.Request) -> web.Response:
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
    return web.json_response({"bytes": size})


async def _download(request: web.Request) -> web.StreamResponse:
    left = int(request.query["bytes"])
    response = web.StreamResponse(headers={"Content-Length": str(left)})
    await response.prepare(request)
    while left > 0:
        await response.write(CHUNK[: min(left, len(CHUNK))])
        left -= len(CHUNK)
    await response.write_eof()
    return response


def serve_upstream(port: int) -> None:
    """The upstream: a small JSON answer, events, an upload sink, a download source."""
    app = web.Application(client_max_size=1 << 20)
    app.router.add_post("/v1/chat/completions", _small)
    app.router.add_get("/v1/events", _events)
    app.router.add_post("/v1/files", _upload)
    app.router.add_get("/v1/download", _download)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# -- the three paths


@contextlib.contextmanager
def paths() -> Iterator[tuple[dict[str, str], int]]:
    """Direct, nginx and sidecar base URLs, and the sidecar's process id."""
    upstream_port, nginx_port = free_port(), free_port()
    with contextlib.ExitStack() as stack:
        stack.enter_context(process([sys.executable, __file__, "--serve-upstream",
                                     str(upstream_port)]))  # fmt: skip
        direct = f"http://127.0.0.1:{upstream_port}"
        wait_http(f"{direct}/v1/download?bytes=1")
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, upstream=upstream_port, port=nginx_port))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        stack.enter_context(process([nginx, "-c", str(conf), "-p", tmp]))
        wait_http(f"http://127.0.0.1:{nginx_port}/v1/download?bytes=1")
        sidecar_port = free_port()
        sidecar = stack.enter_context(process([str(BIN / "sidecar"), "serve"], {
            "SIDECAR_UPSTREAM_URL": direct, "SIDECAR_PORT": str(sidecar_port),
            "SIDECAR_HOST": "127.0.0.1", "SIDECAR_SERVE_PROCESSES": "1"}))  # fmt: skip
        wait_http(f"http://127.0.0.1:{sidecar_port}/healthz")
        yield {"direct": direct, "nginx": f"http://127.0.0.1:{nginx_port}",
               "sidecar": f"http://127.0.0.1:{sidecar_port}"}, sidecar.pid  # fmt: skip


# -- measurements


async def small_posts(http: aiohttp.ClientSession, bases: dict[str, str], count: int,
                      ) -> dict[str, list[float]]:  # fmt: skip
    """Sequential small JSON POSTs, the paths taken in turn (the machine's noise shared)."""
    seconds: dict[str, list[float]] = {name: [] for name in bases}
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
    headers = {**AUTH, "Content-Type": "application/json"}
    for n in range(count + 200):
        for name, base in bases.items():
            started = time.perf_counter()
            async with http.post(f"{base}/v1/chat/completions", data=body,
                                 headers=headers) as response:  # fmt: skip
                await response.read()
            if n >= 200:  # warm-up
                seconds[name].append(time.perf_counter() - started)
    return seconds


async def event_delays(http: aiohttp.ClientSession, base: str, count: int) -> list[float]:
    """Each event's delay from the upstream's write to its arrival here, in seconds."""
    delays = []
    async with http.get(f"{base}/v1/events?n={count}&gap_ms=5", headers=AUTH) as response:
        while line := await response.content.readline():
            if line.startswith(b"data: "):
                delays.append((time.monotonic_ns() - int(line[6:])) / 1e9)
    return delays


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak(pid: int) -> None:
    """Make the process's peak RSS its current RSS (Linux: clear_refs 5), so that the peak
    read after the upload is the upload's."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


async def upload(http: aiohttp.ClientSession, base: str, size: int) -> float:
    """MiB/s of one streamed upload of ``size`` bytes (checked whole at the upstream)."""

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // len(CHUNK)):
            yield CHUNK

    started = time.perf_counter()
    async with http.post(f"{base}/v1/files", data=body(), headers=AUTH) as response:
        got = (await response.json())["bytes"]
    assert got == size, f"{base}: the upstream got {got} of {size} bytes"
    return size / (1 << 20) / (time.perf_counter() - started)


async def download(http: aiohttp.ClientSession, base: str, size: int) -> float:
    """MiB/s of one streamed download of ``size`` bytes."""
    started = time.perf_counter()
    got = 0
    async with http.get(f"{base}/v1/download?bytes={size}", headers=AUTH) as response:
        async for chunk in response.content.iter_any():
            got += len(chunk)
    assert got == size
    return size / (1 << 20) / (time.perf_counter() - started)


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values``."""
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 1000) - 1]


async def run(args: argparse.Namespace) -> None:
    size = (1 << 30) if args.full else args.bytes_mib << 20
    with paths() as (bases, sidecar_pid):
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as http:
            latency = await small_posts(http, bases, args.requests)
            print(f"small JSON POST, {args.requests} calls each, ms:")
            direct = latency["direct"]
            for name in ("direct", "nginx", "sidecar"):
                p50, p99 = pct(latency[name], 0.5) * 1e3, pct(latency[name], 0.99) * 1e3
                added = ""
                if name != "direct":
                    added = (f"  added p50 {p50 - pct(direct, 0.5) * 1e3:+.3f}"
                             f"  p99 {p99 - pct(direct, 0.99) * 1e3:+.3f}")  # fmt: skip
                print(f"  {name:8} p50 {p50:.3f}  p99 {p99:.3f}{added}")
            print("SSE event delay, 400 events 5 ms apart, ms:")
            delays = {name: await event_delays(http, base, 400) for name, base in bases.items()}
            for name, values in delays.items():
                added = ""
                if name != "direct":
                    added = (f"  added p50 {(pct(values, .5) - pct(delays['direct'], .5)) * 1e3:+.3f}"
                             f"  p99 {(pct(values, .99) - pct(delays['direct'], .99)) * 1e3:+.3f}")  # fmt: skip
                print(f"  {name:8} p50 {pct(values, 0.5) * 1e3:.3f}  "
                      f"p99 {pct(values, 0.99) * 1e3:.3f}{added}")  # fmt: skip
            print(f"throughput of {size >> 20} MiB, MiB/s:")
            rss_before = _rss_kib(sidecar_pid, "VmRSS")
            _reset_peak(sidecar_pid)
            for name, base in bases.items():
                up = await upload(http, base, size)
                if name == "sidecar":
                    rss_peak = _rss_kib(sidecar_pid, "VmHWM")
                down = await download(http, base, size)
                print(f"  {name:8} upload {up:8.1f}  download {down:8.1f}")
            print(f"sidecar RSS: {rss_before / 1024:.1f} MiB before the upload, peak during it "
                  f"{rss_peak / 1024:.1f} MiB (growth {(rss_peak - rss_before) / 1024:+.1f} MiB)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="1 GiB transfers")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--bytes-mib", type=int, default=256)
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
