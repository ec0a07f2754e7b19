"""The realtime websocket: the SDK's session, the browser's key subprotocol, close codes."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI

from tests.emulator.support import KEY, Client, state_of
from tests.support import realtime_reply

SAY = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi you"}]}


def key_protocols(key: str = KEY) -> tuple[str, str]:
    return ("realtime", f"openai-insecure-api-key.{key}")


async def receive_json(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(await ws.receive_str(timeout=10))
    return event


@pytest.mark.parametrize("prefix", ["/v1", "/openai/v1", "/openai"])
async def test_the_sdk_holds_a_text_session(client: Client, prefix: str) -> None:
    sdk = AsyncOpenAI(api_key=KEY, base_url=str(client.make_url(prefix)), max_retries=0)
    async with sdk, sdk.realtime.connect(model="gpt-realtime") as connection:
        created = await connection.recv()
        assert created.type == "session.created"
        await connection.conversation.item.create(item=SAY)  # type: ignore[arg-type]
        await connection.response.create()
        reply = await realtime_reply(connection)
    assert reply.strip() == "You said: hi you"
    streams = state_of(client).streams
    await streams.wait_until(lambda s: len(s.closes) == 1)
    assert streams.closes == [{"by": "client", "code": 1000, "reason": ""}]


async def test_a_browser_sends_its_key_as_a_subprotocol(client: Client) -> None:
    url = client.make_url("/v1/realtime?model=gpt-realtime")
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, protocols=key_protocols()) as ws:
            assert ws.protocol == "realtime"
            assert (await receive_json(ws))["type"] == "session.created"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url, protocols=("realtime",))
        assert refused.value.status == 401
    (logged, _) = state_of(client).requests()
    protocol = logged["headers"]["sec-websocket-protocol"]
    assert protocol == "realtime, openai-insecure-api-key.sk-...0001"


async def test_close_codes_and_reasons_are_kept_and_sent(client: Client) -> None:
    url = client.make_url("/openai/v1/realtime?model=gpt-realtime")
    streams = state_of(client).streams
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, protocols=key_protocols()) as ws:
            await receive_json(ws)
            await ws.close(code=4000, message=b"client leaves")
        async with session.ws_connect(url, protocols=key_protocols()) as ws:
            await receive_json(ws)
            await ws.send_json({"type": "emulator.close", "code": 4001, "reason": "go away"})
            closing = await ws.receive(timeout=10)
            assert (closing.type, closing.data, closing.extra) == (
                aiohttp.WSMsgType.CLOSE, 4001, "go away",
            )  # fmt: skip
    await streams.wait_until(lambda s: len(s.closes) == 2)
    assert streams.closes == [
        {"by": "client", "code": 4000, "reason": "client leaves"},
        {"by": "server", "code": 4001, "reason": "go away"},
    ]


async def test_beta_names_binary_echo_and_unknown_events(client: Client) -> None:
    url = client.make_url("/v1/realtime?model=gpt-realtime")
    headers = {"OpenAI-Beta": "realtime=v1"}
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, protocols=key_protocols(), headers=headers) as ws,
    ):
        await receive_json(ws)
        await ws.send_json({"type": "conversation.item.create", "item": SAY})
        assert (await receive_json(ws))["type"] == "conversation.item.created"
        await ws.send_json({"type": "response.create"})
        kinds = [(await receive_json(ws))["type"] for _ in range(7)]
        assert kinds[:2] == ["response.created", "response.text.delta"]
        assert kinds[-2:] == ["response.text.done", "response.done"]
        await ws.send_bytes(b"\x00\x01binary")
        assert await ws.receive_bytes(timeout=10) == b"\x00\x01binary"
        await ws.send_json({"type": "no.such.event"})
        error = await receive_json(ws)
        assert (error["type"], error["error"]["code"]) == ("error", "unknown_event")


async def test_a_model_is_required_and_must_exist(client: Client) -> None:
    async with aiohttp.ClientSession() as session:
        for query, status in (("", 400), ("?model=gpt-nope", 404)):
            url = client.make_url("/v1/realtime" + query)
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(url, protocols=key_protocols())
            assert refused.value.status == status
