"""The application runner: what aiohttp answers before any handler runs, in the gateway's shape,
and the hit lane (``sidecar.lane``) in front of the application's routing.

aiohttp's HTTP parser refuses some requests outright (a bad header character, an over-long
line, too many headers, a method that is not a token, an invalid URL) and answers them itself:
plain text, with a traceback per request in the log. Here such a request gets a 400 in the
gateway's error shape and one short WARNING line naming what was wrong, never a header value.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import HttpVersion11, http_exceptions, web
from aiohttp.web import BaseRequest, RequestHandler

from sidecar import tracing
from sidecar.app import SETTINGS
from sidecar.errors import MalformedRequest, SidecarError, UnsupportedVersion
from sidecar.lane import hit_lane
from sidecar.state import SERVICES
from sidecar.wire import error_body

__all__ = ["SidecarRunner"]

log = logging.getLogger("sidecar.http")

# Most specific first. What a refused request had wrong, in words that quote nothing of it.
_REASONS = (
    (http_exceptions.LineTooLong, "a line of the request is too long"),
    (http_exceptions.InvalidHeader, "a header of the request is malformed"),
    (http_exceptions.BadHttpMethod, "the request's method is not a valid token"),
    (http_exceptions.InvalidURLError, "the request's URL is invalid"),
    (http_exceptions.BadStatusLine, "the request line is malformed"),
    (http_exceptions.BadHttpMessage, "the request is malformed"),
)


def _reason(exc: BaseException | None) -> str:
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return reason
    return "the request could not be read"


class _GatewayRequestHandler(RequestHandler):
    """aiohttp's connection handler with the sidecar's own answer to unreadable requests."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The gateway-shaped answer to a request aiohttp could not hand to the application."""
        if request.writer.output_size > 0:  # part of an answer is out: the connection is lost
            raise ConnectionError("response already started; cannot send an error")
        if status >= 500:
            log.error("internal error answering %s", request.remote, exc_info=exc)
            error = SidecarError("internal error in the sidecar")
            error.status = status
        else:
            reason = _reason(exc)
            # One short line: no traceback, no header values (a credential may be among them).
            log.info("refused a malformed request from %s (%d): %s", request.remote, status,
                        reason)  # fmt: skip
            error = MalformedRequest(f"malformed request: {reason}")
            error.status = status
            self._count()
        response = web.Response(
            body=error_body(error, "", request_type=""),
            status=status,
            content_type="application/json",
        )
        response.force_close()
        return response

    def _count(self) -> None:
        app = getattr(self._manager, "sidecar_app", None)
        if app is not None and SERVICES in app:
            app[SERVICES].metrics.answered("unmatched", "error", 0.0)


class _GatewayServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _GatewayRequestHandler(self, loop=self._loop, **self._kwargs)


#: The HTTP version a request came with, when it is not 1.x (it is answered 505).
_ASKED_VERSION: web.RequestKey[tuple[int, int]] = web.RequestKey("asked_version", tuple)


def _answer_1x_only(factory: Callable[..., BaseRequest]) -> Callable[..., BaseRequest]:
    """Requests that say HTTP/2.0 or later over HTTP/1 get a 1.1 answer: a 505."""

    def make(message: Any, *args: Any) -> BaseRequest:
        if message.version.major == 1:
            return factory(message, *args)
        request = factory(message._replace(version=HttpVersion11, should_close=True), *args)
        request[_ASKED_VERSION] = (message.version.major, message.version.minor)
        return request

    return make


def _refuse_other_versions(
    handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]],
) -> Callable[[BaseRequest], Awaitable[web.StreamResponse]]:
    async def handle(request: BaseRequest) -> web.StreamResponse:
        if _ASKED_VERSION not in request:
            return await handler(request)
        error = UnsupportedVersion("this server speaks HTTP/1.0 and HTTP/1.1 only")
        major, minor = request[_ASKED_VERSION]
        log.info("refused an HTTP/%d.%d request from %s (505)", major, minor, request.remote)
        return web.Response(
            body=error_body(error, "", request_type=""),
            status=error.status,
            content_type="application/json",
        )

    return handle


class SidecarRunner(web.AppRunner):
    """An ``AppRunner`` whose connections answer unreadable requests in the gateway's shape and
    give a client ``SIDECAR_CLIENT_HEADER_TIMEOUT_S`` to send a request's head."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        if SETTINGS in app:
            # aiohttp's keep-alive timer runs from a connection's start and from each answer,
            # and closes a connection still waiting for a whole request head when it fires:
            # a header timeout, whatever bytes trickle in meanwhile.
            kwargs.setdefault("keepalive_timeout", app[SETTINGS].client_header_timeout_s)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp offers no hook for its connection handler class: the server that makes them
        # is given one that does (same layout, one method more).
        server.__class__ = _GatewayServer
        server.sidecar_app = self.app  # type: ignore[attr-defined]
        # aiohttp answers in the version a request says it speaks, "HTTP/2.0 200" included.
        server.request_factory = _answer_1x_only(server.request_factory)
        server.request_handler = _refuse_other_versions(server.request_handler)
        if SERVICES in self.app and not tracing.is_enabled():
            server.request_handler = hit_lane(self.app, server.request_handler)
        return server
