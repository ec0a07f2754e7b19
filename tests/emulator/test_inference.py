"""Models, chat completions, responses and transcriptions, with the SDK and over raw HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI, AuthenticationError, NotFoundError, RateLimitError

from emulator.inference import MODELS
from tests.emulator.support import KEY, Client, MakeClient, bearer, state_of
from tests.support import paced_chat_text

PREFIXES = ["/v1", "/openai/v1", "/openai"]
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "one two three"}]}


@pytest.fixture
async def sdk(client: Client) -> AsyncIterator[Callable[..., AsyncOpenAI]]:
    """SDK clients pointed straight at the emulator, under a prefix."""
    made: list[AsyncOpenAI] = []

    def make(prefix: str = "/v1", key: str = KEY) -> AsyncOpenAI:
        url = str(client.make_url(prefix))
        made.append(AsyncOpenAI(api_key=key, base_url=url, max_retries=0, timeout=10))
        return made[-1]

    yield make
    for sdk_client in made:
        await sdk_client.close()


def events(text: str) -> list[dict[str, Any]]:
    """The JSON payloads of an SSE body, ``[DONE]`` left out."""
    datas = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    return [json.loads(data) for data in datas if data != "[DONE]"]


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_models_are_listed_and_retrieved(
    sdk: Callable[..., AsyncOpenAI], prefix: str
) -> None:
    client = sdk(prefix)
    listed = [model.id async for model in client.models.list()]
    gateway = prefix != "/v1"
    assert listed == [("openai/" if gateway else "") + name for name in MODELS]
    assert (await client.models.retrieve("gpt-4o")).id == "gpt-4o"
    with pytest.raises(NotFoundError, match="does not exist"):
        await client.models.retrieve("gpt-nope")


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_a_chat_completion_echoes_the_last_user_message(
    sdk: Callable[..., AsyncOpenAI], prefix: str
) -> None:
    completion = await sdk(prefix).chat.completions.create(**CHAT)
    assert completion.choices[0].message.content == "You said: one two three"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_each_chunk_reaches_the_client_before_the_next_is_sent(
    client: Client, sdk: Callable[..., AsyncOpenAI], prefix: str
) -> None:
    streams = state_of(client).streams
    streams.pace()
    stream = await sdk(prefix).chat.completions.create(**CHAT, stream=True)
    # Held by the pace: the emulator has sent each chunk and not the next one yet.
    assert await paced_chat_text(stream, streams) == "You said: one two three"
    assert (streams.completed["chat"], streams.cancelled["chat"]) == (1, 0)


async def test_gateway_chunks_carry_extra_fields_and_the_stream_ends_with_done(
    client: Client,
) -> None:
    response = await client.post(
        "/openai/v1/chat/completions", json={**CHAT, "stream": True}, headers=bearer(KEY)
    )
    assert response.headers["Content-Type"] == "text/event-stream"
    body = await response.text()
    assert body.endswith("data: [DONE]\n\n")
    chunks = events(body)
    assert [chunk["extra_fields"]["chunk_index"] for chunk in chunks] == list(range(len(chunks)))
    extra = chunks[0]["extra_fields"]
    assert (extra["request_type"], extra["provider"]) == ("chat_completion_stream", "openai")
    plain = events(await (await client.post(
        "/v1/chat/completions", json={**CHAT, "stream": True}, headers=bearer(KEY)
    )).text())  # fmt: skip
    assert all("extra_fields" not in chunk for chunk in plain)


async def test_a_client_that_goes_away_cancels_the_stream(client: Client) -> None:
    streams = state_of(client).streams
    streams.set_delay(20)
    # A long answer (about 5 s of events): the cancellation has time to be seen.
    long = {**CHAT, "messages": [{"role": "user", "content": "word " * 250}], "stream": True}
    async with aiohttp.ClientSession() as session:
        url = client.make_url("/v1/chat/completions")
        async with session.post(url, json=long, headers=bearer(KEY)) as response:
            await response.content.readline()  # the first event has arrived
            response.close()  # and the client leaves
    async with asyncio.timeout(10):
        await streams.wait_until(lambda s: s.cancelled["chat"] == 1)
    assert streams.completed["chat"] == 0
    assert streams.sent["chat"] < 250  # it stopped long before the end


async def test_the_stream_delay_is_a_control_knob(client: Client) -> None:
    response = await client.post("/_emulator/streams", json={"delay_ms": 15, "paced": True})
    assert (await response.json())["delay_ms"] == 15
    assert state_of(client).streams.stats()["paced"] is True
    response = await client.post("/_emulator/streams", json={"paced": False, "release": 1})
    assert response.status == 400  # nothing to release once unpaced
    assert (await client.post("/_emulator/streams", json={"delay_ms": -1})).status == 400


@pytest.mark.parametrize("prefix", ["/v1", "/openai/v1"])
async def test_responses_stream_their_events_with_event_lines(
    client: Client, sdk: Callable[..., AsyncOpenAI], prefix: str
) -> None:
    response = await sdk(prefix).responses.create(model="gpt-4o-mini", input="hello there")
    assert response.output_text == "You said: hello there"

    stream = await sdk(prefix).responses.create(model="gpt-4o-mini", input="hi", stream=True)
    seen = [event async for event in stream]
    kinds = [event.type for event in seen]
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    deltas = [e.delta for e in seen if e.type == "response.output_text.delta"]
    assert "".join(deltas) == "You said: hi"
    assert [event.sequence_number for event in seen] == list(range(len(seen)))

    raw = await client.post(
        prefix + "/responses", json={"model": "gpt-4o", "input": "x", "stream": True},
        headers=bearer(KEY),
    )  # fmt: skip
    frames = (await raw.text()).strip("\n").split("\n\n")
    for frame in frames:
        name, data = frame.split("\n")
        assert name.removeprefix("event: ") == json.loads(data.removeprefix("data: "))["type"]
    assert "data: [DONE]" not in frames


async def test_a_transcription_reads_the_uploaded_audio(sdk: Callable[..., AsyncOpenAI]) -> None:
    audio = bytes(range(256)) * 100
    for prefix in PREFIXES:
        result = await sdk(prefix).audio.transcriptions.create(
            model="whisper-1", file=("hello.wav", audio)
        )
        assert result.text == f"{len(audio)} bytes of audio in hello.wav."


async def test_a_transcription_needs_a_file_and_a_model(client: Client) -> None:
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("model", "whisper-1")
    response = await client.post("/v1/audio/transcriptions", data=form, headers=bearer(KEY))
    assert (response.status, (await response.json())["error"]["param"]) == (400, "file")
    form = aiohttp.FormData()
    form.add_field("file", b"RIFF", filename="a.wav")
    response = await client.post("/v1/audio/transcriptions", data=form, headers=bearer(KEY))
    assert (response.status, (await response.json())["error"]["param"]) == (400, "model")


async def test_inference_routes_check_keys_like_every_route(
    client: Client, sdk: Callable[..., AsyncOpenAI]
) -> None:
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status == 401
    response = await client.post("/openai/v1/chat/completions", json=CHAT)
    assert (response.status, (await response.json())["type"]) == (401, "virtual_key_required")
    with pytest.raises(AuthenticationError):
        await sdk(key="sk-revoked-secret-xyz9").models.list()


async def test_the_gateway_takes_the_provider_from_the_model(client: Client) -> None:
    body = {**CHAT, "model": "azure/gpt-4o"}
    response = await client.post("/openai/v1/chat/completions", json=body, headers=bearer(KEY))
    extra = (await response.json())["extra_fields"]
    assert (extra["provider"], extra["model_requested"]) == ("azure", "gpt-4o")
    body["model"] = "nowhere/gpt-4o"
    response = await client.post("/openai/v1/chat/completions", json=body, headers=bearer(KEY))
    assert response.status == 400
    assert "failed to get config for provider nowhere" in (await response.text())


async def test_v1_can_be_the_gateways_native_face(make_client: MakeClient) -> None:
    client = await make_client(v1_face="gateway")
    response = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(KEY))
    assert response.status == 400
    assert (await response.json())["error"]["message"] == "model should be in provider/model format"
    body = {**CHAT, "model": "openai/gpt-4o-mini"}
    response = await client.post("/v1/chat/completions", json=body, headers=bearer(KEY))
    assert (await response.json())["extra_fields"]["request_type"] == "chat_completion"
    response = await client.post("/v1/chat/completions", json=body)
    assert (await response.json())["type"] == "virtual_key_required"

    container = await (await client.post(
        "/v1/containers", json={"name": "box", "provider": "openai"}, headers=bearer(KEY)
    )).json()  # fmt: skip
    path = f"/v1/containers/{container['id']}"
    response = await client.get(path, headers=bearer(KEY))
    assert (response.status, (await response.json())["error"]["message"]) == (
        400, "provider query parameter is required",
    )  # fmt: skip
    response = await client.get(path + "?provider=openai", headers=bearer(KEY))
    assert (await response.json())["extra_fields"]["request_type"] == "container_retrieve"
    response = await client.get("/v1/nowhere", headers=bearer(KEY))
    assert (response.status, (await response.json())["is_bifrost_error"]) == (404, False)


async def test_faults_hit_inference_routes_by_name(
    client: Client, sdk: Callable[..., AsyncOpenAI]
) -> None:
    state_of(client).add_fault("status", status=429, route="chat", count=1)
    with pytest.raises(RateLimitError):
        await sdk().chat.completions.create(**CHAT)
    assert (await sdk().chat.completions.create(**CHAT)).choices[0].message.content
    assert state_of(client).stats()["calls"]["chat"] == 2


async def test_bodies_the_api_refuses_are_400s(client: Client) -> None:
    for path, body in (
        ("/v1/chat/completions", {"model": "gpt-4o"}),
        ("/v1/chat/completions", {"model": "gpt-4o", "messages": "hi"}),
        ("/v1/responses", {"input": "hi"}),
    ):
        response = await client.post(path, json=body, headers=bearer(KEY))
        assert (response.status, (await response.json())["error"]["type"]) == (
            400, "invalid_request_error",
        ), body  # fmt: skip
    response = await client.post(
        "/v1/responses", json={"model": "gpt-4o", "input": []}, headers=bearer(KEY)
    )
    assert (await response.json())["output"][0]["content"][0]["text"] == "Hello!"
