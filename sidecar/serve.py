"""``sidecar serve``: one server process per CPU on one port, on uvloop, stopped gracefully.

With more than one process the parent only supervises: it forks the server processes, each
binding the port with ``SO_REUSEPORT`` (the kernel spreads connections over them), restarts one
that dies, and on SIGTERM (or SIGINT) passes the signal on and waits for every one to drain.
Each process keeps its own copies of records, kept coherent by the change announcements every
process hears; ``/metrics`` answered by any of them adds up every process's counters, fetched
from each over a Unix socket in a private directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from sidecar import __version__
from sidecar.settings import Settings

__all__ = ["PEERS", "Peers", "cpu_limit", "run_server"]

log = logging.getLogger("sidecar")
_PEER_TIMEOUT_S = 0.5
_RESTART_DELAY_S = (0.5, 10.0)


def cpu_limit() -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup CPU quota if any."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota else max(1, cpus)


def _cgroup_quota() -> float | None:
    """CPUs granted by the cgroup (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), if limited."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 else None
    return None


class Peers:
    """The other server processes of this pod, as far as metrics go."""

    def __init__(self, directory: Path, index: int, count: int) -> None:
        self.directory = directory
        self.index = index
        self.count = count

    def socket(self, index: int) -> Path:
        """Where process ``index`` answers with its metrics."""
        return self.directory / f"p{index}.sock"

    async def serve(self, snapshot: Callable[[], dict[str, Any]]) -> asyncio.AbstractServer:
        """Answer every connection on this process's socket with its metrics, then close."""

        async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = {name: list(values.items()) for name, values in snapshot().items()}
            writer.write(msgspec.msgpack.encode(data))
            with contextlib.suppress(OSError):
                await writer.drain()
            writer.close()

        path = self.socket(self.index)
        path.unlink(missing_ok=True)
        return await asyncio.start_unix_server(answer, path=str(path))

    async def snapshots(self) -> list[dict[str, Any]]:
        """The other processes' metrics (a process that does not answer in time is left out)."""
        others = [i for i in range(self.count) if i != self.index]
        answers = await asyncio.gather(*(self._fetch(i) for i in others))
        return [answer for answer in answers if answer is not None]

    async def _fetch(self, index: int) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(_PEER_TIMEOUT_S):
                reader, writer = await asyncio.open_unix_connection(str(self.socket(index)))
                data = await reader.read()
                writer.close()
        except (OSError, TimeoutError):
            return None
        raw = msgspec.msgpack.decode(data)
        return {name: {tuple(k): v for k, v in values} for name, values in raw.items()}


PEERS: web.AppKey[Peers] = web.AppKey("peers", Peers)


def run_server(settings: Settings) -> int:
    """Serve until SIGTERM: ``SIDECAR_SERVE_PROCESSES`` processes (0: one per CPU)."""
    count = settings.serve_processes or cpu_limit()
    if count > 1 and not settings.redis_url:
        log.warning("the embedded store lives in one process: serving with 1, not %d", count)
        count = 1
    if count == 1:
        return _run(_serve(settings, None))
    return _supervise(settings, count)


def _run(main: Coroutine[Any, Any, None]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover (installed with the package where it exists)
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main)
    return 0


async def _serve(settings: Settings, peers: Peers | None) -> None:
    from sidecar import tracing

    if tracing.setup_tracing(tracing.SIDECAR_SERVICE):  # in each serving process, after a fork
        tracing.instrument_redis()
    try:
        await _serve_traced(settings, peers)
    finally:
        tracing.shutdown_tracing()


async def _serve_traced(settings: Settings, peers: Peers | None) -> None:
    from sidecar.app import create_app
    from sidecar.logs import access_log_options
    from sidecar.runner import SidecarRunner
    from sidecar.state import LIFECYCLE, SERVICES

    embedded = None
    if not settings.redis_url:
        from worker.embedded import start_embedded_worker  # the embedded default's worker

        embedded = start_embedded_worker
    app = create_app(settings, embedded_worker=embedded)
    if peers is not None:
        app[PEERS] = peers
    runner = SidecarRunner(
        app, shutdown_timeout=settings.shutdown_timeout_s, **access_log_options(settings)
    )
    await runner.setup()
    snapshot_server = None
    if peers is not None:
        snapshot_server = await peers.serve(app[SERVICES].metrics.snapshot)
    site = web.TCPSite(runner, settings.host, settings.port, reuse_port=peers is not None)
    await site.start()
    if peers is None or peers.index == 0:
        log.info("sidecar %s: %s upstream %s, listening on %s:%d", __version__,
                 settings.upstream_kind, settings.upstream_url or "https://api.openai.com",
                 settings.host, settings.port)  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if _stop_requested:  # a SIGTERM that came while this process was starting
        stop.set()
    await stop.wait()
    # Readiness fails at once; the listener closes; in-flight requests get shutdown_timeout_s.
    app[LIFECYCLE].draining = True
    await runner.cleanup()
    if snapshot_server is not None:
        snapshot_server.close()


def _port_in_use(host: str, port: int) -> OSError | None:
    """Whether someone listens on the port already: ``SO_REUSEPORT`` would let the server
    processes join another server's port (another sidecar started by mistake) and silently
    share its traffic, so the port is first bound once without it."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return exc
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.bind(address)
            except OSError as exc:
                return exc
    return None


def _supervise(settings: Settings, count: int) -> int:
    """Fork ``count`` server processes, keep them running, stop them all on SIGTERM."""
    if (error := _port_in_use(settings.host, settings.port)) is not None:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, error)
        return 1
    # Imported once before forking: the processes start at once and share the code's memory.
    import sidecar.app  # noqa: F401

    directory = Path(tempfile.mkdtemp(prefix="sidecar-"))
    context = multiprocessing.get_context("fork")
    stopping = False

    def start(index: int) -> multiprocessing.process.BaseProcess:
        process = context.Process(
            target=_child, args=(settings, Peers(directory, index, count)), name=f"server-{index}"
        )
        process.start()
        return process

    def stop(signum: int, _: object) -> None:
        nonlocal stopping
        stopping = True
        for process in processes.values():
            if process.pid is not None and process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)

    processes = {index: start(index) for index in range(count)}
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("serving with %d processes (SO_REUSEPORT)", count)
    delay = _RESTART_DELAY_S[0]
    try:
        while not stopping:
            time.sleep(0.2)
            for index, process in list(processes.items()):
                if process.exitcode is None or stopping:
                    continue
                log.error("server process %d exited (%s): restarting it in %.1fs", index,
                          process.exitcode, delay)  # fmt: skip
                time.sleep(delay)
                delay = min(delay * 2, _RESTART_DELAY_S[1])
                if not stopping:
                    processes[index] = start(index)
        deadline = time.monotonic() + settings.shutdown_timeout_s + 5
        for process in processes.values():
            process.join(max(0.1, deadline - time.monotonic()))
            if process.exitcode is None:
                log.error("server process %s did not stop in time: killing it", process.name)
                process.kill()
                process.join(5)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0 if all(process.exitcode == 0 for process in processes.values()) else 1


_stop_requested = False


def _note_stop(signum: int, frame: object) -> None:
    global _stop_requested
    _stop_requested = True


def _child(settings: Settings, peers: Peers) -> None:
    # Until its loop handles them, a stop is noted (and honoured once it is up), never fatal.
    signal.signal(signal.SIGTERM, _note_stop)
    signal.signal(signal.SIGINT, _note_stop)
    _run(_serve(settings, peers))
