"""The realtime websocket, ``GET /v1/realtime?model=...``, answering text-only sessions.

The key comes in ``Authorization`` (the SDKs' way) or in an ``openai-insecure-api-key.<key>``
subprotocol (the browser's), beside ``realtime``. The session opens with ``session.created``;
``session.update``, ``conversation.item.create`` and ``response.create`` are answered as OpenAI
does (a reply streamed as text deltas, then ``response.done``), with the beta's event names
when the client says ``OpenAI-Beta: realtime=v1``. Binary frames come back as they went.

For tests of a proxy: a client event ``{"type": "emulator.close", "code": 4001, "reason": ...}``
makes the emulator close with that code and reason, and every close (by whom, code, reason) is
kept in ``state.streams.closes``.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from emulator.gateway import ANSWER, Result
from emulator.inference import check_model, reply_to
from emulator.schema import ApiError
from emulator.state import EmulatorState
from emulator.streams import Streams

__all__ = ["realtime"]

# GA event names, and the beta's where they differ.
_BETA = {
    "conversation.item.added": "conversation.item.created",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
}


class _Session:
    """One websocket's conversation: what it sends and what it was told."""

    def __init__(self, ws: web.WebSocketResponse, streams: Streams, model: str, beta: bool) -> None:
        self.ws = ws
        self.streams = streams
        self.beta = beta
        self.last_text = ""
        self.session: dict[str, Any] = {
            "id": "sess_" + secrets.token_hex(12), "object": "realtime.session",
            "type": "realtime", "model": model, "output_modalities": ["text"],
            "instructions": "",
        }  # fmt: skip

    async def send(self, kind: str, **fields: Any) -> None:
        kind = _BETA.get(kind, kind) if self.beta else kind
        event = {"type": kind, "event_id": "event_" + secrets.token_hex(8), **fields}
        await self.ws.send_str(json.dumps(event))
        self.streams.note(self.streams.sent, "realtime")

    async def answer(self, event: dict[str, Any]) -> None:
        """Answer one client event."""
        kind = event.get("type")
        if kind == "session.update":
            self.session.update(event.get("session") or {})
            await self.send("session.updated", session=self.session)
        elif kind == "conversation.item.create":
            item = {"id": "item_" + secrets.token_hex(8), **(event.get("item") or {})}
            self.last_text = " ".join(
                str(part.get("text", "")) for part in item.get("content") or ()
                if isinstance(part, dict)
            )  # fmt: skip
            await self.send("conversation.item.added", previous_item_id=None, item=item)
        elif kind == "response.create":
            await self.respond()
        elif kind == "emulator.close":
            code, reason = int(event.get("code", 1000)), str(event.get("reason", ""))
            self.streams.closes.append({"by": "server", "code": code, "reason": reason})
            await self.ws.close(code=code, message=reason.encode())
        else:
            error = {
                "type": "invalid_request_error", "code": "unknown_event",
                "message": f"Unknown event type: {kind!r}.", "event_id": event.get("event_id"),
            }  # fmt: skip
            await self.send("error", error=error)

    async def respond(self) -> None:
        """A reply to the last conversation item, streamed as text deltas."""
        reply = reply_to(self.last_text)
        response: dict[str, Any] = {
            "id": "resp_" + secrets.token_hex(12), "object": "realtime.response",
            "status": "in_progress", "output": [],
        }  # fmt: skip
        await self.send("response.created", response=response)
        at = {
            "response_id": response["id"], "item_id": "item_" + secrets.token_hex(8),
            "output_index": 0, "content_index": 0,
        }  # fmt: skip
        for word in reply.split(" "):
            await self.send("response.output_text.delta", **at, delta=word + " ")
        await self.send("response.output_text.done", **at, text=reply)
        content = [{"type": "output_text", "text": reply}]
        item = {"id": at["item_id"], "type": "message", "role": "assistant", "content": content}
        await self.send("response.done", response=response | {"status": "completed"} | {
            "output": [item]
        })  # fmt: skip


async def realtime(
    state: EmulatorState, project: str, request: web.Request
) -> Result | web.StreamResponse:
    """``GET /v1/realtime``: the websocket, after the same checks as any other route."""
    model = request.query.get("model")
    if not model:
        missing = "Missing required parameter: 'model'."
        raise ApiError(400, missing, param="model", code="missing_required_parameter")
    check_model(request[ANSWER], model)
    ws = web.WebSocketResponse(protocols=("realtime",))
    if not ws.can_prepare(request).ok:
        raise ApiError(426, "The realtime API is a websocket: send an Upgrade request.")
    await ws.prepare(request)
    beta = request.headers.get("OpenAI-Beta", "").startswith("realtime")
    session = _Session(ws, state.streams, model, beta)
    await session.send("session.created", session=session.session)
    while True:
        message = await ws.receive()
        if message.type == WSMsgType.TEXT:
            try:
                event = json.loads(message.data)
            except ValueError:
                event = {"type": None}
            await session.answer(event if isinstance(event, dict) else {"type": None})
        elif message.type == WSMsgType.BINARY:
            await ws.send_bytes(message.data)
        else:
            break
    if message.type == WSMsgType.CLOSE:
        code, reason = message.data, message.extra or ""
        state.streams.closes.append({"by": "client", "code": code, "reason": reason})
    elif message.type == WSMsgType.ERROR:
        state.streams.closes.append({"by": "client", "code": WSCloseCode.ABNORMAL_CLOSURE})
    state.streams.changed()
    return ws
