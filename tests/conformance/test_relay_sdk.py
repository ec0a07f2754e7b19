"""One base URL: everything an app does with the official SDK works through the sidecar.

The app points the SDK at the sidecar, as it would at the gateway, and streams chat completions
and responses, uploads a large file, transcribes audio, lists models and holds a realtime
session, in each upstream mode, while its container lookups are still answered from the cache.
Streams are paced by the emulator, one event at a time, so that a test sees each event reach the
app before the next one is even sent: a relay that buffered would hang the test, not pass it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import pytest

from emulator import EmulatorConfig, create_emulator_app
from emulator.inference import MODELS
from tests.conformance.conftest import MakeStack
from tests.conformance.support import Stack, cache_hit, extra_fields
from tests.conftest import Emulator, start_app, stop_app
from tests.support import paced_chat_text, realtime_reply

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["openai", "bifrost"])
async def kind_stack(
    request: pytest.FixtureRequest, make_stack: MakeStack, emulator_config: EmulatorConfig
) -> AsyncIterator[Stack]:
    """Each upstream kind; the gateway is a gateway alone, its /v1 routes the native ones."""
    if request.param == "openai":
        yield await make_stack("openai")
        return
    config = msgspec.structs.replace(emulator_config, v1_face="gateway")
    running = await start_app(create_emulator_app(config))
    yield await make_stack("bifrost", upstream=Emulator(running.url, running.app, running.runner))
    await stop_app(running)


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "stream me please"}]}
SAY = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}


@pytest.mark.parametrize("prefix", ["/openai/v1", "/openai", "/v1"])
async def test_chat_completion_events_arrive_one_by_one(kind_stack: Stack, prefix: str) -> None:
    streams = kind_stack.emulator.state.streams
    streams.pace()
    client = kind_stack.sdk(base_url=kind_stack.sidecar.url + prefix)
    # The gateway's native routes take provider/model names only.
    model = (
        "openai/gpt-4o-mini" if kind_stack.kind == "bifrost" and prefix == "/v1" else CHAT["model"]
    )
    stream = await client.chat.completions.create(**CHAT | {"model": model}, stream=True)  # type: ignore[call-overload]
    # The emulator holds the next event until this one has reached the app.
    assert await paced_chat_text(stream, streams) == "You said: stream me please"
    assert (streams.completed["chat"], streams.cancelled["chat"]) == (1, 0)


async def test_an_app_that_stops_reading_cancels_the_upstream_stream(kind_stack: Stack) -> None:
    streams = kind_stack.emulator.state.streams
    streams.set_delay(20)
    # A long answer (about 5 s of events), so the cancellation has time to travel up.
    long = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "word " * 250}]}
    stream = await kind_stack.sdk().chat.completions.create(**long, stream=True)  # type: ignore[call-overload]
    async for _ in stream:
        break  # the first event is enough
    await stream.close()
    async with asyncio.timeout(10):
        await streams.wait_until(lambda s: s.cancelled["chat"] == 1)
    assert streams.completed["chat"] == 0


async def test_responses_stream_event_by_event(kind_stack: Stack) -> None:
    streams = kind_stack.emulator.state.streams
    streams.pace()
    client = kind_stack.sdk()
    stream = await client.responses.create(model="gpt-4o", input="two words", stream=True)
    kinds: list[str] = []
    text = ""
    async with asyncio.timeout(10):
        async for event in stream:
            assert streams.sent["responses"] == len(kinds) + 1
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
            streams.release()
    assert (kinds[0], kinds[-1]) == ("response.created", "response.completed")
    assert text == "You said: two words"
    assert (await client.responses.create(model="gpt-4o", input="hi")).output_text == "You said: hi"


async def test_a_large_upload_arrives_whole(kind_stack: Stack, tmp_path: Path) -> None:
    path, digest = tmp_path / "big.jsonl", hashlib.sha256()
    block = b'{"prompt": "a line of a batch file"}\n' * 1800  # 64 KiB and a little
    with path.open("wb") as out:
        for _ in range(1000):  # about 64 MiB
            digest.update(block)
            out.write(block)
    client = kind_stack.sdk()
    client = client.with_options(timeout=120)
    with path.open("rb") as upload:
        stored = await client.files.create(file=upload, purpose="batch")
    seen = kind_stack.emulator.state.peek_upload(stored.id)
    assert (stored.bytes, seen.size, seen.sha256) == (len(block) * 1000,) * 2 + (
        digest.hexdigest(),
    )
    assert stored.id in [f.id async for f in client.files.list()]
    assert (await client.files.retrieve(stored.id)).filename == "big.jsonl"
    downloaded = hashlib.sha256()
    async with client.files.with_streaming_response.content(stored.id) as response:
        async for piece in response.iter_bytes():
            downloaded.update(piece)
    assert downloaded.hexdigest() == digest.hexdigest()


async def test_audio_is_transcribed(kind_stack: Stack) -> None:
    audio = b"RIFF" + bytes(range(256)) * 64
    result = await kind_stack.sdk().audio.transcriptions.create(
        model="whisper-1", file=("meeting.wav", audio)
    )
    assert result.text == f"{len(audio)} bytes of audio in meeting.wav."


async def test_models_are_listed(kind_stack: Stack) -> None:
    ids = [model.id async for model in kind_stack.sdk().models.list()]
    prefix = "openai/" if kind_stack.kind == "bifrost" else ""
    assert ids == [prefix + name for name in MODELS]


async def test_a_realtime_session(kind_stack: Stack) -> None:
    client = kind_stack.sdk()
    async with client.realtime.connect(model="gpt-realtime") as connection:
        assert (await connection.recv()).type == "session.created"
        await connection.conversation.item.create(item=SAY)  # type: ignore[arg-type]
        await connection.response.create()
        reply = await realtime_reply(connection)
    assert reply.strip() == "You said: hello"
    streams = kind_stack.emulator.state.streams
    async with asyncio.timeout(10):
        await streams.wait_until(lambda s: len(s.closes) == 1)
    assert streams.closes[0]["by"] == "client"


async def test_a_browser_realtime_session_and_its_close_code(kind_stack: Stack) -> None:
    url = kind_stack.base_url.replace("http", "ws", 1) + "/realtime?model=gpt-realtime"
    protocols = ("realtime", "openai-insecure-api-key.sk-bf-team-a")
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, protocols=protocols) as ws,
    ):
        assert ws.protocol == "realtime"
        assert json.loads(await ws.receive_str(timeout=10))["type"] == "session.created"
        await ws.send_json({"type": "emulator.close", "code": 4001, "reason": "session over"})
        closing = await ws.receive(timeout=10)
        assert (closing.type, closing.data, closing.extra) == (
            aiohttp.WSMsgType.CLOSE, 4001, "session over",
        )  # fmt: skip


async def test_container_lookups_are_still_answered_from_the_cache(kind_stack: Stack) -> None:
    client = kind_stack.sdk()
    chat = await client.chat.completions.with_raw_response.create(**CHAT)  # type: ignore[call-overload]
    assert chat.parse().choices[0].message.content == "You said: stream me please"
    if kind_stack.kind == "bifrost":
        assert extra_fields(chat)["request_type"] == "chat_completion"
    container = await client.containers.create(name="beside-inference")
    first = await client.containers.with_raw_response.retrieve(container.id)
    second = await client.containers.with_raw_response.retrieve(container.id)
    assert first.parse().id == second.parse().id == container.id
    assert cache_hit(second) is True
