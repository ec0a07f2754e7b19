"""Websockets through the relay (the realtime API): the upgrade with the client's subprotocols,
frames both ways as they come (text, binary, ping, pong), close codes and reasons; either
side's close or failure closes the other."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.errors import InvalidParameter, SidecarError, UpstreamTimeout, UpstreamUnavailable

__all__ = ["HANDSHAKE_HEADERS", "header_list", "identity", "is_upgrade", "no_redirects", "relay"]

log = logging.getLogger(__name__)

#: What each side's handshake makes for itself: never forwarded.
HANDSHAKE_HEADERS = frozenset({"sec-websocket-key", "sec-websocket-version",
                               "sec-websocket-extensions", "sec-websocket-protocol"})  # fmt: skip
# A browser cannot set headers on a websocket: OpenAI's SDKs send the key as a subprotocol.
_KEY_PROTOCOL = "openai-insecure-api-key."
_ABNORMAL = 1011  # a side failed without a close frame: the other is told of an error


def no_redirects() -> aiohttp.TraceConfig:
    """A trace config that refuses to follow a redirect: ``ws_connect`` has no
    ``allow_redirects``, and a handshake sent elsewhere would take the caller's credential."""

    async def refuse(*_: object) -> None:
        raise UpstreamUnavailable("the upstream redirected the websocket: not followed")

    config = aiohttp.TraceConfig()
    config.on_request_redirect.append(refuse)
    return config


def is_upgrade(request: web.Request) -> bool:
    """Whether a request asks for a websocket."""
    return request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"


def header_list(headers: CIMultiDictProxy[str], name: str) -> list[str]:
    """The items of a comma-separated header, over all its lines."""
    return [i.strip() for value in headers.getall(name, ()) for i in value.split(",") if i.strip()]


def _protocols(request: web.Request) -> list[str]:
    return header_list(request.headers, "Sec-WebSocket-Protocol")


def identity(request: web.Request) -> list[tuple[str, str]]:
    """The headers a websocket's credential is read from: its own, plus a key sent as a
    subprotocol, as the ``Authorization`` it stands for (a different one is two credentials)."""
    headers = list(request.headers.items())
    given = request.headers.get("Authorization", "").strip()
    for protocol in _protocols(request):
        if protocol.startswith(_KEY_PROTOCOL):
            bearer = "Bearer " + protocol[len(_KEY_PROTOCOL) :]
            if bearer != given:
                headers.append(("Authorization", bearer))
    return headers


async def relay(
    request: web.Request, session: aiohttp.ClientSession, url: URL, headers: CIMultiDict[str]
) -> web.StreamResponse:
    """Open the upstream's websocket with the client's subprotocols, then the client's with the
    one the upstream chose, and relay frames until either side closes or fails."""
    if not web.WebSocketResponse(protocols=_protocols(request)).can_prepare(request).ok:
        # Checked before the upstream is called with the caller's credential for nothing.
        raise InvalidParameter(
            "not a valid websocket handshake (Sec-WebSocket-Key, -Version, Connection: Upgrade)",
            param="sec-websocket-key",
        )
    try:
        upstream = await session.ws_connect(
            url, protocols=_protocols(request), headers=headers, autoclose=False,
            autoping=False, max_msg_size=0,
        )  # fmt: skip
    except aiohttp.WSServerHandshakeError as exc:
        error = SidecarError(f"the upstream refused the websocket (HTTP {exc.status})")
        error.status = exc.status if exc.status >= 400 else 502
        error.type = "upstream_error"
        raise error from None
    except TimeoutError as exc:
        raise UpstreamTimeout("the upstream did not open the websocket in time") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailable(f"the upstream is unreachable ({type(exc).__name__})") from exc
    client = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (),
        autoclose=False,
        autoping=False,
        max_msg_size=0,
    )
    try:
        await client.prepare(request)
        pumps = [asyncio.create_task(_pump(client, upstream)),
                 asyncio.create_task(_pump(upstream, client))]  # fmt: skip
        try:
            done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        code, reason = next(iter(done)).result()
        # The side that closed gets its close answered; the other is told the same code.
        for side in (client, upstream):
            with contextlib.suppress(Exception):
                await side.close(code=code, message=reason)
    finally:
        await upstream.close()
    return client


Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def _pump(source: Socket, sink: Socket) -> tuple[int, bytes]:
    """Relay ``source``'s frames to ``sink`` until ``source`` closes; its close code and reason."""
    try:
        while True:
            message = await source.receive()
            kind = message.type
            if kind is WSMsgType.TEXT:
                await sink.send_str(message.data)
            elif kind is WSMsgType.BINARY:
                await sink.send_bytes(message.data)
            elif kind is WSMsgType.PING:
                await sink.ping(message.data)
            elif kind is WSMsgType.PONG:
                await sink.pong(message.data)
            elif kind is WSMsgType.CLOSE:
                return int(message.data), (message.extra or "").encode()
            else:  # CLOSING, CLOSED, ERROR: gone without a close frame
                return _ABNORMAL, b""
    except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
        log.debug("websocket relay ended: %s", type(exc).__name__)
        return _ABNORMAL, b""
