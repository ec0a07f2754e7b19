"""The application runner: what aiohttp answers before any handler runs, in the gateway's shape.

aiohttp's HTTP parser refuses some requests outright (a bad header character, an over-long
line, too many headers, a method that is not a token, an invalid URL) and answers them itself:
plain text, with a traceback per request in the log. Here such a request gets a 400 in the
gateway's error shape and one short WARNING line naming what was wrong, never a header value.
"""

from __future__ import annotations

import logging

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from sidecar.errors import MalformedRequest, SidecarError
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
            log.warning("refused a malformed request from %s (%d): %s", request.remote, status,
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


class SidecarRunner(web.AppRunner):
    """An ``AppRunner`` whose connections answer unreadable requests in the gateway's shape."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp offers no hook for its connection handler class: the server that makes them
        # is given one that does (same layout, one method more).
        server.__class__ = _GatewayServer
        server.sidecar_app = self.app  # type: ignore[attr-defined]
        return server
