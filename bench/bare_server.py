"""The baseline: a bare aiohttp handler answering fixed bytes (what a hit costs at the least).

    python bench/bare_server.py PORT BODY_FILE [--processes N] [--loop uvloop|asyncio]

With ``--processes N`` it runs N processes on one port (SO_REUSEPORT), as ``sidecar serve``
does, so a scaling comparison is fair: this process serves too and stops the others on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import signal
import subprocess
import sys

from aiohttp import web

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the parent process dies (no orphaned servers after a kill -9)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("body_file")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    with open(args.body_file, "rb") as file:
        body = file.read()

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    if args.child:
        _die_with_parent()
    command = [sys.executable, __file__, str(args.port), args.body_file, "--loop", args.loop]
    children = [subprocess.Popen([*command, "--child"]) for _ in range(args.processes - 1)]
    app = web.Application()
    app.router.add_get("/openai/v1/containers/{container_id}", handler)
    try:
        web.run_app(
            app,
            host="127.0.0.1",
            port=args.port,
            access_log=None,
            print=None,
            reuse_port=True,
            loop=_loop(args.loop),
        )
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()


if __name__ == "__main__":
    main()
