"""The application runner: aiohttp's own answers in the gateway's shape, and the hit lane
(``sidecar.lane``) in front of routing, through the public low-level ``Server``.

aiohttp answers a request its parser refuses in plain text with a traceback per request and
offers no hook for it (aio-libs/aiohttp#3287), but writes that answer through the writer the
request factory gave the request: ours writes the gateway-shaped 400 instead, and the connection
log (a public ``LoggerAdapter``) makes the traceback one INFO line that quotes nothing of the
request. A request that says HTTP/2.0 (or 0.9) over HTTP/1 is answered 505.
"""

from __future__ import annotations

import email.utils
import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from http import HTTPStatus
from typing import Any

from aiohttp import HttpVersion11, http_exceptions, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.web import BaseRequest

from sidecar import tracing
from sidecar.app import SETTINGS
from sidecar.errors import MalformedRequest, SidecarError, UnsupportedVersion
from sidecar.lane import hit_answers
from sidecar.middleware import error_response
from sidecar.state import SERVICES
from sidecar.wire import error_body

__all__ = ["SidecarRunner"]

log = logging.getLogger("sidecar.http")

Handler = Callable[[BaseRequest], Awaitable[web.StreamResponse]]

# Most specific first. What a refused request had wrong, in words that quote nothing of it.
_REASONS = (
    (http_exceptions.LineTooLong, "a line of the request is too long"),
    (http_exceptions.InvalidHeader, "a header of the request is malformed"),
    (http_exceptions.BadHttpMethod, "the request's method is not a valid token"),
    (http_exceptions.InvalidURLError, "the request's URL is invalid"),
    (http_exceptions.BadStatusLine, "the request line is malformed"),
    (http_exceptions.BadHttpMessage, "the request is malformed"),
)

#: Why the request being answered was refused (set by the connection log, read by the writer).
_REFUSED: ContextVar[str] = ContextVar("refused", default="the request could not be read")

#: The HTTP version a request came with, when it is not 1.x (it is answered 505).
_ASKED_VERSION: web.RequestKey[tuple[int, int]] = web.RequestKey("asked_version", tuple)


class _ConnectionLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's connection log: a refused request is one INFO line, no traceback or header."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if not isinstance(exc, http_exceptions.HttpProcessingError):
            super().log(level, msg, *args, **kwargs)
            return
        reason = next((text for kind, text in _REASONS if isinstance(exc, kind)), _REFUSED.get())
        _REFUSED.set(reason)
        remote = args[0] if args else "?"
        self.logger.info("refused a malformed request from %s (%d): %s", remote, exc.code, reason)


class _GatewayShapedRefusal(AbstractStreamWriter):
    """A refused request's writer: the gateway-shaped error of aiohttp's status, then close."""

    def __init__(self, writer: AbstractStreamWriter, count: Callable[[], None]) -> None:
        self._writer = writer
        self._count = count

    async def write_headers(self, status_line: str, headers: Any) -> None:
        """Write the whole answer in place of aiohttp's."""
        status = HTTPStatus(int(status_line.split(" ", 2)[1]))
        error = MalformedRequest(f"malformed request: {_REFUSED.get()}")
        error.status = status
        body = error_body(error, "", request_type="")
        head = (f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                f"Date: {email.utils.formatdate(usegmt=True)}\r\nServer: {SERVER_SOFTWARE}"
                "\r\n\r\n")  # fmt: skip
        self.output_size = len(head) + len(body)
        self._count()
        await self._writer.write_eof(head.encode() + body)

    async def _ignore(self, *args: Any, **kwargs: Any) -> None:
        """aiohttp's own body and end: not sent (the whole answer went with the head)."""

    def _never(self, *args: Any, **kwargs: Any) -> None:
        """Neither compressed nor chunked."""

    write = write_eof = drain = _ignore
    enable_compression = enable_chunking = _never


def _requests(
    factory: Callable[..., BaseRequest], app: web.Application
) -> Callable[..., BaseRequest]:
    """The server's request factory, for refused requests and other HTTP versions than 1.x."""

    def count() -> None:
        if SERVICES in app:
            app[SERVICES].metrics.answered("unmatched", "error", 0.0)

    def make(message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> BaseRequest:
        if message.version.major == 1:
            if not isinstance(message.headers, dict):  # a dict: aiohttp's stand-in, refused
                return factory(message, payload, protocol, writer, task)
            return factory(message, payload, protocol, _GatewayShapedRefusal(writer, count), task)
        asked = message.version
        message = message._replace(version=HttpVersion11, should_close=True)
        request = factory(message, payload, protocol, writer, task)
        request[_ASKED_VERSION] = (asked.major, asked.minor)
        return request

    return make


def _front(app: web.Application, handler: Handler) -> Handler:
    """The server's handler: a 505 for another HTTP version, the hit lane, the application."""
    answer = hit_answers(app) if SERVICES in app and not tracing.is_enabled() else None

    async def front(request: BaseRequest) -> web.StreamResponse:
        try:
            if _ASKED_VERSION in request:
                major, minor = request[_ASKED_VERSION]
                log.info(
                    "refused an HTTP/%d.%d request from %s (505)", major, minor, request.remote
                )
                error = UnsupportedVersion("this server speaks HTTP/1.0 and HTTP/1.1 only")
                return error_response(error, "", "")
            if answer is not None and (served := answer(request)) is not None:
                return served
        except Exception:  # a bug: the answer is still in the gateway's shape
            log.exception("internal error before routing")
            return error_response(SidecarError("internal error in the sidecar"), "", "")
        return await handler(request)

    return front


class SidecarRunner(web.AppRunner):
    """An ``AppRunner`` whose connections answer unreadable requests in the gateway's shape and
    give a client ``SIDECAR_CLIENT_HEADER_TIMEOUT_S`` to send a request's head."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        if SETTINGS in app:
            # aiohttp's keep-alive timer runs from a connection's start and from each answer and
            # closes a connection still waiting for a whole request head: a header timeout.
            kwargs.setdefault("keepalive_timeout", app[SETTINGS].client_header_timeout_s)
        kwargs.setdefault("logger", _ConnectionLog(log))
        super().__init__(app, **kwargs)

    async def setup(self) -> None:
        """Set up the application, then put the sidecar's front on its server."""
        await super().setup()
        server = self.server
        assert server is not None
        server.request_factory = _requests(server.request_factory, self.app)
        server.request_handler = _front(self.app, server.request_handler)
