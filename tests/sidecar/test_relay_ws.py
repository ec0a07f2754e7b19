"""Websockets through the relay: subprotocols, frames both ways, close codes either way."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from tests.conftest import Running
from tests.sidecar.conftest import Upstream
from tests.support import AUTH_A

KEY_PROTOCOL = "openai-insecure-api-key.sk-bf-team-a"


def echo_server(upstream: Upstream, closed: asyncio.Queue[int | None]) -> None:
    """An upstream websocket at /t/ws that echoes, and closes with 4001 when told to."""

    async def echo(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=("realtime",))
        await ws.prepare(request)
        async for message in ws:
            if message.type is WSMsgType.TEXT and message.data == "close":
                await ws.close(code=4001, message=b"bye")
            elif message.type is WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        closed.put_nowait(ws.close_code)
        return ws

    upstream.handlers["ws"] = echo


async def test_frames_and_the_upstreams_close_code_are_relayed(
    relay: Running, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    echo_server(upstream, asyncio.Queue())
    async with (
        asyncio.timeout(20),
        http.ws_connect(
            f"{relay.url}/t/ws", protocols=("realtime", KEY_PROTOCOL), autoping=False
        ) as ws,
    ):
        assert ws.protocol == "realtime"
        await ws.send_str("hello")
        assert (await ws.receive()).data == "hello"
        await ws.send_bytes(b"\x00\xff")
        assert (await ws.receive()).data == b"\x00\xff"
        await ws.ping(b"are you there")
        pong = await ws.receive()
        assert (pong.type, pong.data) == (WSMsgType.PONG, b"are you there")
        await ws.send_str("close")
        message = await ws.receive()
        assert (message.type, message.data, message.extra) == (WSMsgType.CLOSE, 4001, "bye")
    method, path, headers = upstream.seen[-1]
    offered = [p.strip() for p in headers["Sec-WebSocket-Protocol"].split(",")]
    assert (method, path, offered) == ("GET", "/t/ws", ["realtime", KEY_PROTOCOL])
    assert headers["Authorization"] == "Bearer sk-bf-team-a"  # the key the cache keys by


async def test_the_clients_close_code_reaches_the_upstream(
    relay: Running, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    closed: asyncio.Queue[int | None] = asyncio.Queue()
    echo_server(upstream, closed)
    async with asyncio.timeout(20):
        ws = await http.ws_connect(f"{relay.url}/t/ws", protocols=(KEY_PROTOCOL,))
        await ws.send_str("ping")
        assert (await ws.receive()).data == "ping"
        await ws.close(code=4002, message=b"done")
        assert await closed.get() == 4002


async def test_two_different_keys_on_a_websocket_are_refused(
    relay: Running, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    echo_server(upstream, asyncio.Queue())
    headers: Any = {"Authorization": "Bearer sk-bf-other"}
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(f"{relay.url}/t/ws", protocols=(KEY_PROTOCOL,), headers=headers)
    assert refused.value.status == 400
    assert upstream.seen == []


async def test_an_upstream_that_fails_closes_the_clients_websocket(
    relay: Running, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    async def drop(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()
        assert request.transport is not None
        request.transport.close()  # gone without a close frame
        return ws

    upstream.handlers["drop"] = drop
    async with (
        asyncio.timeout(20),
        http.ws_connect(f"{relay.url}/t/drop", protocols=(KEY_PROTOCOL,)) as ws,
    ):
        await ws.send_str("anything")
        message = await ws.receive()
        assert message.type is WSMsgType.CLOSE
        assert message.data == 1011  # the relay's word for a side that failed


async def test_a_broken_handshake_is_refused_before_the_upstream_is_called(
    relay: Running, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    # Found: a bad Sec-WebSocket-Key got aiohttp's plain-text 400, after the upstream's
    # websocket had been opened with the caller's key.
    headers = {**AUTH_A, "Upgrade": "websocket", "Connection": "Upgrade",
               "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "bad"}  # fmt: skip
    async with http.get(f"{relay.url}/t/socket", headers=headers) as response:
        assert response.status == 400
        body = await response.json()
    assert body["error"]["param"] == "sec-websocket-key"
    assert upstream.seen == []
