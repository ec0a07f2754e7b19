"""The injector's answer time and memory: ``sidecar inject`` over TLS, fed the Deployment pod's
AdmissionReview of tests/inject (annotated, so every answer is a full injection).

    .venv/bin/python bench/inject.py [--reviews 2000] [--concurrency 1 8]

Prints, per concurrency, reviews a second and the answer time (p50, p99) as the client sees it,
then the process's resident memory and CPU time. The API server waits at most the webhook's
timeoutSeconds (5 s) for an answer; the Deployment requests 64Mi and limits at 128Mi.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import BIN, cpu_seconds, free_port, process, rss_kib

REPO = Path(__file__).resolve().parent.parent
REVIEW = REPO / "tests" / "inject" / "reviews" / "deployment-pod.json"
TEMPLATE = REPO / "deploy" / "kubernetes" / "injector" / "sidecar.json"


async def _ready(url: str, context: ssl.SSLContext, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url + "/readyz", ssl=context) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.05)


async def _run(url: str, context: ssl.SSLContext, reviews: int, concurrency: int) -> None:
    body = REVIEW.read_bytes()
    latencies: list[float] = []
    queue = iter(range(reviews))

    async def client(http: aiohttp.ClientSession) -> None:
        for _ in queue:
            started = time.perf_counter()
            async with http.post(url + "/mutate", data=body, ssl=context,
                                 headers={"Content-Type": "application/json"}) as response:  # fmt: skip
                answer = json.loads(await response.read())
            latencies.append(time.perf_counter() - started)
            assert answer["response"]["patchType"] == "JSONPatch"

    async with aiohttp.ClientSession() as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=100)
    print(f"concurrency {concurrency:2d}: {reviews / elapsed:7.0f} reviews/s, "
          f"p50 {cuts[49] * 1e3:.2f} ms, p99 {cuts[98] * 1e3:.2f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reviews", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        cert, key = Path(directory) / "tls.crt", Path(directory) / "tls.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
             "-addext", "subjectAltName=DNS:localhost"],
            check=True, capture_output=True,
        )  # fmt: skip
        port = free_port()
        command = [str(BIN / "sidecar"), "inject", "--host", "127.0.0.1", "--port", str(port),
                   "--cert-file", str(cert), "--key-file", str(key), "--template", str(TEMPLATE)]  # fmt: skip
        with process(command) as proc:
            url, context = f"https://localhost:{port}", ssl.create_default_context(cafile=str(cert))
            asyncio.run(_ready(url, context))
            print(f"started: {rss_kib([proc.pid]) / 1024:.1f} MiB resident")
            for concurrency in args.concurrency:
                asyncio.run(_run(url, context, args.reviews, concurrency))
            print(f"after: {rss_kib([proc.pid]) / 1024:.1f} MiB resident, "
                  f"{cpu_seconds([proc.pid]):.1f} s CPU")  # fmt: skip


if __name__ == "__main__":
    main()
