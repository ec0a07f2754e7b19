"""Processes for benchmarks: redis-server, the emulator, sidecars, workers, all on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def process(
    args: list[str], env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        args,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir, process(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
         "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir]
    ):  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"


@contextlib.contextmanager
def emulator(latency_ms: float = 0.0) -> Iterator[str]:
    port = free_port()
    with process(
        [str(BIN / "sidecar"), "emulate", "--port", str(port), "--latency-ms", str(latency_ms)]
    ):
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/_emulator/healthz")
        yield url


@contextlib.contextmanager
def sidecar(env: Mapping[str, str]) -> Iterator[str]:
    port = free_port()
    with process([str(BIN / "sidecar"), "serve"], {**env, "SIDECAR_PORT": str(port),
                                                    "SIDECAR_HOST": "127.0.0.1"}):  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/openai/v1/containers/warmup")
        yield url


@contextlib.contextmanager
def worker(env: Mapping[str, str]) -> Iterator[str]:
    """A ``sidecar-worker`` process; yields the base URL of its metrics endpoint."""
    port = free_port()
    with process([str(BIN / "sidecar-worker")], {**env, "SIDECAR_WORKER_METRICS_PORT": str(port),
                                                 "SIDECAR_HOST": "127.0.0.1"}):  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz")
        yield url


def scrape(url: str, name: str, **labels: str) -> float:
    """One sample's value from a ``/metrics`` endpoint (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def create_containers(upstream: str, key: str, count: int) -> list[str]:
    """``count`` containers on the emulator, created concurrently."""
    import asyncio

    import aiohttp

    async def run() -> list[str]:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
            sem = asyncio.Semaphore(64)

            async def one(i: int) -> str:
                async with sem, http.post(f"{upstream}/v1/containers",
                                          json={"name": f"bench-{i}"}) as response:  # fmt: skip
                    return str((await response.json())["id"])

            return await asyncio.gather(*(one(i) for i in range(count)))

    return asyncio.run(run())


def emulator_retrieves(upstream: str) -> int:
    stats = json.loads(urllib.request.urlopen(f"{upstream}/_emulator/stats").read())
    return int(stats["calls"].get("retrieve", 0))


def emulator_reset(upstream: str) -> None:
    request = urllib.request.Request(f"{upstream}/_emulator/stats/reset", method="POST", data=b"")
    urllib.request.urlopen(request).read()


@contextlib.contextmanager
def emulator_with(
    latency_ms: float = 0.0, *, projects: list[list[str]] | None = None
) -> Iterator[str]:
    """The emulator with ``projects`` (groups of API keys sharing containers)."""
    port = free_port()
    args = [str(BIN / "sidecar"), "emulate", "--port", str(port), "--latency-ms", str(latency_ms)]
    for keys in projects or ():
        args += ["--project", ",".join(keys)]
    with process(args):
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/_emulator/healthz")
        yield url


@contextlib.contextmanager
def sidecar_server(
    env: Mapping[str, str], args: list[str] | None = None, timeout_s: float = 30.0
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``sidecar serve [args]`` on a free port: its base URL and its process (for pids, RSS).

    Processes it forks and leaves behind when it stops are killed on the way out.
    """
    port = free_port()
    children: set[tuple[int, str]] = set()
    env = {**env, "SIDECAR_PORT": str(port), "SIDECAR_HOST": "127.0.0.1"}
    try:
        with process([str(BIN / "sidecar"), "serve", *(args or [])], env) as proc:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"sidecar serve exited with status {proc.returncode}")
                try:
                    wait_http(f"{url}/healthz", timeout_s=1.0)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
            children.update((pid, _started(pid)) for pid in descendants(proc.pid))
            try:
                yield url, proc
            finally:
                children.update((pid, _started(pid)) for pid in descendants(proc.pid))
    finally:
        for pid, started in children:  # the same process (start time), not a reused pid
            if started and _started(pid) == started:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def _stat_fields(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` after the command name (field 3 onwards); [] when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat[stat.rindex(")") + 2 :].split()


def _started(pid: int) -> str:
    fields = _stat_fields(pid)
    return fields[19] if len(fields) > 19 else ""


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children...)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and len(fields := _stat_fields(int(entry.name))) > 1:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def listening(pids: list[int], port: int) -> list[int]:
    """Which of these processes hold a socket listening on ``port`` (SO_REUSEPORT servers)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    found = []
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        found.append(pid)
                        break
    return found


def rss_kib(pids: list[int]) -> int:
    """Resident memory of these processes together (KiB; vanished ones count 0)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, StopIteration):
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
            total += int(next(ln.split()[1] for ln in status if ln.startswith("VmRSS:")))
    return total


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) these processes have used so far (vanished ones count 0)."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if len(fields) > 12:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def worker_process(env: Mapping[str, str]) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A ``sidecar-worker`` process: the base URL of its metrics endpoint, and the process."""
    port = free_port()
    with process([str(BIN / "sidecar-worker")], {**env, "SIDECAR_WORKER_METRICS_PORT": str(port),
                                                 "SIDECAR_HOST": "127.0.0.1"}) as proc:  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz")
        yield url, proc


@contextlib.contextmanager
def profiling(pid: int, path: str | None, duration_s: int) -> Iterator[None]:
    """py-spy record of a server (and its processes) while the block runs, if asked."""
    if path is None:
        yield
        return
    spy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if spy is None:
        sys.exit("--profile needs py-spy: .venv/bin/pip install py-spy")
    command = [spy, "record", "--pid", str(pid), "--subprocesses", "--format",
               "raw", "--rate", "100", "--duration", str(duration_s), "--output", path]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        try:
            proc.wait(duration_s + 30)
        except subprocess.TimeoutExpired:
            proc.kill()


def read_profile(path: str) -> tuple[int, list[list[str]], list[int]]:
    """py-spy's raw output: total samples, each stack's frames (outermost first), its count."""
    stacks, counts = [], []
    for line in Path(path).read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if stack and count_text.isdigit():
            stacks.append([f for f in stack.split(";") if not f.startswith("process ")])
            counts.append(int(count_text))
    return sum(counts), stacks, counts


def package_of(frame: str) -> str:
    """Where a frame's code lives: ``sidecar``, ``aiohttp``, ``asyncio/uvloop``..."""
    function, _, where = frame.rpartition(" (")
    if function in ("Runner.run", "run_app", "run_until_complete", "run_forever"):
        return "event loop (C)"  # uvloop's own time shows as the frame that started it
    return where.split("/")[0].split(".")[0].split(":")[0].strip(")")


def print_profile(name: str, path: str, top: int = 20) -> None:
    """Where a server spent its samples: by package, then the top functions (self, inclusive)."""
    import collections

    total, stacks, counts = read_profile(path)
    if not total:
        print(f"profile of the {name}: no samples")
        return
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    for frames, count in zip(stacks, counts, strict=True):
        if frames:
            own[frames[-1]] += count
            packages[package_of(frames[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count
    print(f"\nprofile of the {name} under load ({total} samples; {path})")
    print("self time by package: " + ", ".join(
        f"{package} {100 * count / total:.0f}%" for package, count in packages.most_common(8)
    ))  # fmt: skip
    if top == 0:
        return
    print(f"{'self':>6}  function (file:line)")
    for frame, count in own.most_common(top):
        print(f"{100 * count / total:>5.1f}%  {frame}")
    print(f"{'incl.':>6}  function (file:line)")
    for frame, count in inclusive.most_common(top):
        print(f"{100 * count / total:>5.1f}%  {frame}")


def scrape_total(url: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples at a ``/metrics`` endpoint that carry these labels."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )
