"""What the container API is asked through the sidecar is what the caller asked: the query
reaches the upstream with the same parameters (an escaped ``#`` or ``%`` included), so the
provider the upstream answers for is the one the cache files the answer under."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import MultiDict
from yarl import URL

from tests.conftest import Running, start_app, stop_app
from tests.support import AUTH_A

#: Queries whose parameters a decoding proxy would change: an escaped '#' (it would cut the
#: query short), an escaped '%' (decoded twice: another provider), an escaped '&' and '='.
QUERIES = ("provider=openai%23eu&limit=5", "provider=%2541zure&limit=5",
           "provider=open%26ai%3D1&limit=5", "limit=5&after=cntr%2523x&provider=openai")  # fmt: skip


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[list[MultiDict[str]], Running]]:
    """An upstream that answers every list with one container, and keeps each query it got."""
    seen: list[MultiDict[str]] = []

    async def list_containers(request: web.Request) -> web.Response:
        seen.append(MultiDict(request.query))
        item = {"id": "cntr_q", "object": "container", "name": "n", "created_at": 1,
                "status": "running", "last_active_at": 2}  # fmt: skip
        return web.json_response({"object": "list", "data": [item], "has_more": False})

    app = web.Application()
    for prefix in ("/openai/v1", "/v1"):
        app.router.add_get(f"{prefix}/containers", list_containers)
    running = await start_app(app)
    yield seen, running
    await stop_app(running)


@pytest.mark.parametrize("query", QUERIES)
async def test_a_list_reaches_the_upstream_with_the_callers_parameters(
    start_sidecar: Callable[..., Any],
    make_settings: Callable[..., Any],
    recorder: tuple[list[MultiDict[str]], Running],
    http: aiohttp.ClientSession,
    query: str,
) -> None:
    seen, upstream = recorder
    sidecar: Running = await start_sidecar(make_settings(upstream_url=upstream.url))
    url = URL(f"{sidecar.url}/openai/v1/containers?{query}", encoded=True)
    async with http.get(url, headers=AUTH_A) as response:
        assert response.status == 200
    assert seen == [MultiDict(url.query)]
