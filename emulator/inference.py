"""The inference routes an app drives through the same base URL: models, chat completions,
responses (both streamed as server-sent events), audio transcriptions.

A stream's events go out at the pace :class:`~emulator.streams.Streams` sets; a client that
goes away mid-stream is noticed at the next event (the write, or the closed transport, says so),
and the stream stops, counted as cancelled.

No model behind them: a reply is ``You said: <the last user message>``, deterministic, split
into one event per word when streamed. On the gateway face a ``provider/`` prefix of the model
picks the provider, answers carry ``extra_fields`` and so does every streamed event.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

import msgspec
from aiohttp import web

from emulator.bodies import missing_file, receive_form
from emulator.faults import STOPPING
from emulator.gateway import ANSWER, Answer, GatewayRefusal, Result, body_of
from emulator.schema import ApiError, invalid_body
from emulator.state import EmulatorState
from emulator.streams import Streams

__all__ = ["MODELS", "ROUTES", "check_model", "reply_to", "send_events"]

#: The models the emulator knows.
MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-realtime", "gpt-4o-transcribe", "whisper-1")
_CREATED = 1_715_367_049  # a fixed "created" of every model
_MAX_AUDIO_BYTES = 25 * 1024 * 1024  # OpenAI's (and the gateway's) cap on transcriptions
_encoder = msgspec.json.Encoder()


class _Chat(msgspec.Struct):
    model: str
    messages: list[dict[str, Any]]
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class _Responses(msgspec.Struct):
    model: str
    input: str | list[dict[str, Any]] = ""
    instructions: str | None = None
    stream: bool = False


def _decode(raw: bytes, kind: type[_Chat] | type[_Responses]) -> Any:
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.DecodeError as exc:
        raise invalid_body(exc) from None


def check_model(answer: Answer, name: str) -> str:
    """The model asked for, known or OpenAI's 404; on the gateway face, ``provider/model``
    picks the provider (its native routes take no other form)."""
    if answer.native and "/" not in name:
        raise GatewayRefusal(400, "model should be in provider/model format")
    if answer.gateway and "/" in name:
        provider, _, name = name.partition("/")
        if answer.config.base_provider(provider) is None:
            message = f"failed to get config for provider {provider}: not found"
            raise GatewayRefusal(400, message)
        answer.provider = provider
    answer.model = name
    if name not in MODELS:
        message = f"The model `{name}` does not exist or you do not have access to it."
        raise ApiError(404, message, code="model_not_found")
    return name


def _text(content: Any) -> str:
    """The text of a message's content: a string, or the text of its parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def reply_to(text: str) -> str:
    """What the emulator answers to a user's ``text``."""
    return f"You said: {text.strip()}" if text.strip() else "Hello!"


def _words(reply: str) -> list[str]:
    return re.findall(r"\S+\s*", reply)


def _usage(prompt: str, reply: str, *, chat: bool) -> dict[str, int]:
    sizes = (len(prompt.split()), len(_words(reply)))
    names = ("prompt_tokens", "completion_tokens") if chat else ("input_tokens", "output_tokens")
    return {names[0]: sizes[0], names[1]: sizes[1], "total_tokens": sum(sizes)}


def _event(answer: Answer, index: int, payload: dict[str, Any], name: str = "") -> bytes:
    """One SSE frame; on the gateway face the payload carries the stream's ``extra_fields``."""
    if answer.gateway:
        payload["extra_fields"] = answer.stream_fields(index)
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + _encoder.encode(payload) + b"\n\n"


async def _models(state: EmulatorState, project: str, request: web.Request) -> Result:
    prefix = "openai/" if request[ANSWER].gateway else ""
    data = [_model_object(prefix + name) for name in MODELS]
    return {"object": "list", "data": data}


def _model_object(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": _CREATED, "owned_by": "system"}


async def _model_retrieve(state: EmulatorState, project: str, request: web.Request) -> Result:
    answer = request[ANSWER]
    name = request.match_info["model"]
    check_model(answer, name)
    return _model_object(name)


async def _chat(
    state: EmulatorState, project: str, request: web.Request
) -> Result | web.StreamResponse:
    answer = request[ANSWER]
    body: _Chat = _decode(await body_of(request), _Chat)
    model = check_model(answer, body.model)
    users = [m for m in body.messages if m.get("role") == "user"]
    prompt = _text(users[-1].get("content")) if users else ""
    reply = reply_to(prompt)
    head = {"id": "chatcmpl-" + secrets.token_hex(12), "created": state.now(), "model": model}
    if not body.stream:
        message = {"role": "assistant", "content": reply, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
        usage = _usage(prompt, reply, chat=True)
        return {**head, "object": "chat.completion", "choices": [choice], "usage": usage}
    answer.request_type = "chat_completion_stream"
    usage_chunk = bool((body.stream_options or {}).get("include_usage"))

    def chunks() -> Iterator[bytes]:
        deltas: list[tuple[dict[str, Any], str | None]] = [({"role": "assistant"}, None)]
        deltas += [({"content": word}, None) for word in _words(reply)]
        deltas.append(({}, "stop"))
        for index, (delta, finish) in enumerate(deltas):
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            chunk = {**head, "object": "chat.completion.chunk", "choices": [choice]}
            yield _event(answer, index, chunk)
        if usage_chunk:
            chunk = {**head, "object": "chat.completion.chunk", "choices": []}
            yield _event(answer, len(deltas), chunk | {"usage": _usage(prompt, reply, chat=True)})
        yield b"data: [DONE]\n\n"

    return await send_events(request, state.streams, "chat", chunks())


def _response(
    body: _Responses, rid: str, now: int, message: dict[str, Any] | None
) -> dict[str, Any]:
    """A Response object: in progress (no message yet) or completed."""
    return {
        "id": rid, "object": "response", "created_at": now,
        "status": "completed" if message else "in_progress", "model": body.model,
        "output": [message] if message else [], "instructions": body.instructions,
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "metadata": {},
        "error": None, "incomplete_details": None, "temperature": 1.0, "top_p": 1.0,
    }  # fmt: skip


async def _responses(
    state: EmulatorState, project: str, request: web.Request
) -> Result | web.StreamResponse:
    answer = request[ANSWER]
    body: _Responses = _decode(await body_of(request), _Responses)
    body.model = check_model(answer, body.model)
    if isinstance(body.input, str):
        prompt = body.input
    else:
        prompt = _text(body.input[-1].get("content")) if body.input else ""
    reply = reply_to(prompt)
    rid, mid, now = "resp_" + secrets.token_hex(16), "msg_" + secrets.token_hex(16), state.now()
    part = {"type": "output_text", "text": reply, "annotations": []}
    message: dict[str, Any] = {"type": "message", "id": mid, "status": "completed"}
    message |= {"role": "assistant", "content": [part]}
    completed = _response(body, rid, now, message) | {"usage": _usage(prompt, reply, chat=False)}
    if not body.stream:
        return completed
    answer.request_type = "responses_stream"
    at = {"item_id": mid, "output_index": 0, "content_index": 0}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": _response(body, rid, now, None)},
        {"type": "response.output_item.added", "output_index": 0,
         "item": message | {"status": "in_progress", "content": []}},
        {"type": "response.content_part.added", **at, "part": part | {"text": ""}},
    ]  # fmt: skip
    events += [
        {"type": "response.output_text.delta", **at, "delta": word, "logprobs": []}
        for word in _words(reply)
    ]
    events += [
        {"type": "response.output_text.done", **at, "text": reply, "logprobs": []},
        {"type": "response.content_part.done", **at, "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": message},
        {"type": "response.completed", "response": completed},
    ]
    frames = (
        _event(answer, seq, event | {"sequence_number": seq}, event["type"])
        for seq, event in enumerate(events)
    )
    return await send_events(request, state.streams, "responses", frames)


async def _transcribe(state: EmulatorState, project: str, request: web.Request) -> Result:
    fields, received = await receive_form(request)
    if received is None:
        raise missing_file()
    if not fields.get("model"):
        message = "Missing required parameter: 'model'."
        raise ApiError(400, message, param="model", code="missing_required_parameter")
    check_model(request[ANSWER], fields["model"])
    if received.size > _MAX_AUDIO_BYTES:
        message = f"Maximum content size limit ({_MAX_AUDIO_BYTES}) exceeded ({received.size})."
        raise ApiError(413, message)
    return {"text": f"{received.size} bytes of audio in {received.filename}."}


def _gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


async def send_events(
    request: web.Request, streams: Streams, route: str, events: Iterable[bytes]
) -> web.StreamResponse:
    """Answer ``text/event-stream`` with ``events`` (each a whole ``...\\n\\n`` frame), paced;
    stop, counted as cancelled, once the client has gone."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    try:
        for index, event in enumerate(events):
            if index and await streams.next_event(request.app[STOPPING]):
                return response  # the server is stopping
            if _gone(request):
                streams.note(streams.cancelled, route)
                return response
            await response.write(event)
            streams.note(streams.sent, route)
        await response.write_eof()
    except ConnectionResetError:  # aiohttp's "Cannot write to closing transport" is one
        streams.note(streams.cancelled, route)
        return response
    except asyncio.CancelledError:
        # A server that cancels handlers when their client goes away (handler_cancellation).
        streams.note(streams.cancelled, route)
        raise
    streams.note(streams.completed, route)
    return response


Operation = Callable[[EmulatorState, str, web.Request], Awaitable[Result | web.StreamResponse]]
# (method, path, route name, the gateway's request_type, operation)
ROUTES: tuple[tuple[str, str, str, str, Operation], ...] = (
    ("GET", "/models", "models", "list_models", _models),
    ("GET", "/models/{model:.+}", "model", "list_models", _model_retrieve),
    ("POST", "/chat/completions", "chat", "chat_completion", _chat),
    ("POST", "/responses", "responses", "responses", _responses),
    ("POST", "/audio/transcriptions", "transcription", "transcription", _transcribe),
)
