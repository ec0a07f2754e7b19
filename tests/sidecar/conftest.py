"""Fixtures of the relay's tests: an upstream with routes a test defines, a sidecar before it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from emulator import EmulatorConfig, create_emulator_app
from tests.conftest import Emulator, Running

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Upstream:
    """The emulator (for the routes the cache answers) plus routes a test defines under /t/."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.url = ""
        self.runner: web.AppRunner = web.AppRunner(app, handler_cancellation=True,
                                                   shutdown_timeout=1)  # fmt: skip
        self.handlers: dict[str, Handler] = {}
        self.seen: list[tuple[str, str, Any]] = []  # method, raw path, headers
        for prefix in ("/t", "/v1/t"):
            app.router.add_route("*", prefix + "/{name:.*}", self._dispatch)

    async def create(self, key: str) -> str:
        """A container made straight on the upstream: its id."""
        return str((await Emulator(self.url, self.app, self.runner).create(key))["id"])

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.raw_path, request.headers.copy()))
        name = request.match_info["name"].split("/")[0]
        handler = self.handlers.get(name)
        if handler is None:
            return web.json_response({"path": request.raw_path})
        return await handler(request)


@pytest.fixture
async def upstream(emulator_config: EmulatorConfig) -> AsyncIterator[Upstream]:
    """The emulator with a test's own routes under /t/, its handlers cancelled like Go's."""
    served = Upstream(create_emulator_app(emulator_config))
    # Cancelled handlers, as the gateway cancels its provider call when its client goes away.
    runner = served.runner
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    served.url = f"http://{host}:{port}"
    yield served
    await runner.cleanup()


@pytest.fixture
async def relay(start_sidecar: Any, make_settings: Any, upstream: Upstream) -> Running:
    """A sidecar in front of ``upstream``."""
    running: Running = await start_sidecar(make_settings(upstream_url=upstream.url))
    return running
