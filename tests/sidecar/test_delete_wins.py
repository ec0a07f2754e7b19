"""A DELETE answered through the sidecar wins: once its answer has arrived, nobody gets the
deleted container from the cache, whatever was under way (a list that began before it, a
DELETE whose own body is still coming), on this replica or another."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from emulator import EmulatorConfig, create_emulator_app
from tests.conftest import Emulator, Running, start_app, stop_app
from tests.support import AUTH_A, KEY_A, KEY_A2, get

ANYTHING_STORED = "only-if-cached, max-stale=600"


def asking(key: str, cache_control: str = ANYTHING_STORED) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Cache-Control": cache_control}


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 answer with a Content-Length or chunked body: its status and body."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)
    }
    if b"content-length" in headers:
        return status, await reader.readexactly(int(headers[b"content-length"]))
    body = b""
    while size := int((await reader.readline()).strip(), 16):
        body += await reader.readexactly(size)
        await reader.readline()
    await reader.readline()
    return status, body


async def test_a_delete_whose_body_is_still_coming_is_in_force_once_answered(
    start_sidecar: Callable[..., Any],
    make_settings: Callable[..., Any],
    emulator: Emulator,
    http: aiohttp.ClientSession,
) -> None:
    local: Running = await start_sidecar(make_settings())
    other: Running = await start_sidecar(make_settings(local_ttl_s=0))  # reads Redis only
    cid = (await emulator.create(KEY_A))["id"]
    for replica in (local, other):
        url = f"{replica.url}/openai/v1/containers/{cid}"
        assert (await get(http, url))[0] == 200
        assert (await get(http, url, asking(KEY_A)))[0] == 200  # cached
    parts = urlsplit(local.url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        # A DELETE whose body is not all sent: the upstream answers it without reading the
        # rest, and the caller has its answer while its request is still open.
        writer.write(f"DELETE /openai/v1/containers/{cid} HTTP/1.1\r\nHost: a\r\n"
                     f"Authorization: Bearer {KEY_A}\r\nContent-Length: 10\r\n\r\n{{}}".encode())  # fmt: skip
        status, body = await asyncio.wait_for(read_answer(reader), 10)
        assert status == 200, body
        for replica in (local, other):
            url = f"{replica.url}/openai/v1/containers/{cid}"
            status, answer, _ = await get(http, url, asking(KEY_A))
            assert status == 504, answer
    finally:
        writer.close()


async def test_a_list_that_began_before_a_delete_seeds_nothing_after_it(
    start_sidecar: Callable[..., Any],
    make_settings: Callable[..., Any],
    http: aiohttp.ClientSession,
) -> None:
    listed, release = asyncio.Event(), asyncio.Event()
    container = {"id": "cntr_listed", "object": "container", "name": "n", "created_at": 1,
                 "status": "running", "last_active_at": 2}  # fmt: skip

    async def list_containers(request: web.Request) -> web.Response:
        listed.set()
        await release.wait()  # made before the delete, on its way while it happens
        return web.json_response({"object": "list", "data": [container], "has_more": False})

    async def retrieve(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "No such container"}}, status=404)

    async def delete(request: web.Request) -> web.Response:
        return web.json_response({"id": request.match_info["cid"], "deleted": True})

    app = web.Application()
    app.router.add_get("/openai/v1/containers", list_containers)
    app.router.add_get("/openai/v1/containers/{cid}", retrieve)
    app.router.add_delete("/openai/v1/containers/{cid}", delete)
    upstream = await start_app(app)
    try:
        sidecars = [await start_sidecar(make_settings(upstream_url=upstream.url)),
                    await start_sidecar(make_settings(upstream_url=upstream.url, local_ttl_s=0))]  # fmt: skip
        lister = asyncio.create_task(
            http.get(f"{sidecars[0].url}/openai/v1/containers", headers=AUTH_A)
        )
        await asyncio.wait_for(listed.wait(), 5)
        url = f"{sidecars[0].url}/openai/v1/containers/cntr_listed"
        async with http.delete(url, headers=AUTH_A) as response:
            assert response.status == 200
        release.set()
        async with await lister as response:
            assert response.status == 200  # the lister gets what the upstream answered it
            assert [item["id"] for item in (await response.json())["data"]] == ["cntr_listed"]
        for sidecar in sidecars:
            for key in (KEY_A, KEY_A2):
                url = f"{sidecar.url}/openai/v1/containers/cntr_listed"
                # Nothing cached, or the upstream's 404 cached: never the container.
                status, body, _ = await get(http, url, asking(key))
                assert status in (404, 504), body
                status, body, _ = await get(http, url, asking(key, "max-stale=600"))
                assert status == 404, body
    finally:
        await stop_app(upstream)


async def test_a_delete_under_another_name_of_the_same_upstream_drops_the_entry(
    start_sidecar: Callable[..., Any],
    make_settings: Callable[..., Any],
    http: aiohttp.ClientSession,
) -> None:
    # A gateway operator's custom provider built on openai (another region's name, one
    # account): the gateway deletes the very container the "openai" entry holds.
    config = EmulatorConfig(projects=((KEY_A, KEY_A2),),
                            custom_providers=(("my-openai-eu", "openai"),))  # fmt: skip
    running = await start_app(create_emulator_app(config))
    try:
        emulator = Emulator(running.url, running.app, running.runner)
        sidecar: Running = await start_sidecar(make_settings(upstream_url=emulator.url))
        cid = (await emulator.create(KEY_A))["id"]
        url = f"{sidecar.url}/openai/v1/containers/{cid}"
        assert (await get(http, url))[0] == 200
        async with http.delete(f"{url}?provider=my-openai-eu", headers=AUTH_A) as response:
            assert response.status == 200
        async with http.get(f"{emulator.url}/v1/containers/{cid}", headers=AUTH_A) as response:
            assert response.status == 404  # gone upstream
        status, body, _ = await get(http, url, asking(KEY_A))
        assert status != 200, body["extra_fields"]["cache_debug"]
    finally:
        await stop_app(running)
