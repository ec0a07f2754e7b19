"""The hit lane: a retrieval this process can answer from its own copy, answered before routing.

A poller's request is nearly always a hit on the process's own copy (``local``), and for it the
generic machinery (route resolution over every proxied path, the middleware chain, a
``web.Response`` with its header multidict, its serialisation) costs more than the answer.
The lane takes the request as aiohttp's server hands it over, recognises the common shape of a
retrieval (GET over HTTP/1.1 keep-alive, one of the three routes, a plain container id, no
query but ``provider``, no cache-control header) and, when ``ContainerService.local_hit`` has
the answer, writes the whole response in one piece: the same status, headers and body as the
routed path, counted the same way. Anything else, and every miss, goes the routed way
unchanged, so the lane can only make an answer faster, never different (tests/sidecar/
test_lane.py compares the two byte for byte).

Off while tracing is on (a span per request is the point there).
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import HttpVersion11, web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.web import BaseRequest

from sidecar.controls import parse_rules
from sidecar.errors import SidecarError
from sidecar.headers import cache_headers
from sidecar.middleware import OUTCOME, count_answer
from sidecar.outcomes import Query
from sidecar.settings import PROVIDER_NAME, cache_provider
from sidecar.state import SERVICES, Services
from sidecar.views import (
    CONTAINER_ID,
    RETRIEVE_ROUTES,
    hit_body,
    parse_provider,
    requires_provider,
)

__all__ = ["HitAnswer", "hit_lane"]

Handler = Callable[[BaseRequest], Awaitable[web.StreamResponse]]

_PROVIDER_QUERY = "provider="
_STATUS_LINES: dict[int, str] = {}
_SERVER = f"\r\nServer: {SERVER_SOFTWARE}\r\n\r\n"
_dates: list[tuple[int, str]] = [(0, "")]


def _http_date() -> str:
    """Now as an IMF-fixdate (RFC 9110 5.6.7), made once a second."""
    second = int(time.time())
    if _dates[0][0] != second:
        _dates[0] = (second, email.utils.formatdate(second, usegmt=True))
    return _dates[0][1]


class HitAnswer:
    """A hit's whole HTTP response, written in one piece: what aiohttp's connection handler and
    the access log need of a response, and no more."""

    __slots__ = ("_data", "_outcome", "body_length", "route", "status")

    keep_alive = True  # the lane serves keep-alive requests only

    def __init__(self, data: bytes, status: int, body_length: int, route: str, seen: Any) -> None:
        self._data = data
        self.status = status
        self.body_length = body_length
        self.route = route
        """The route template (the access log's ``route``)."""
        self._outcome = seen

    async def prepare(self, request: BaseRequest) -> None:
        """Write the response (status line, headers and body together)."""
        await request.writer.write_eof(self._data)

    async def write_eof(self, data: bytes = b"") -> None:
        """Nothing left to write."""

    def get(self, key: object, default: Any = None) -> Any:
        """What a handler would have left on its response (the access log reads ``OUTCOME``)."""
        return self._outcome if key is OUTCOME else default


def _status_line(status: int) -> str:
    line = _STATUS_LINES.get(status)
    if line is None:  # a record's status is one the upstream gave: a handful at most
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"
    return line


def hit_lane(app: web.Application, handler: Handler) -> Handler:
    """``handler`` (the application's), with the hits this process holds answered first."""
    services: Services = app[SERVICES]
    settings = services.settings
    plain = parse_rules({}, settings.freshness_threshold)
    routes = {
        template.rsplit("{", 1)[0]: (template, requires_provider(template, settings))
        for template in RETRIEVE_ROUTES
    }
    scan = services.credentials.scan
    local_hit = services.service.local_hit
    if not services.service.local.enabled:
        return handler

    def answer(request: BaseRequest) -> HitAnswer | None:
        started = time.perf_counter()
        if request.method != "GET" or request.version != HttpVersion11:
            return None
        target = request.raw_path
        slash = target.rfind("/")
        route = routes.get(target[: slash + 1])
        if route is None:
            return None
        container_id, _, query = target[slash + 1 :].partition("?")
        if not CONTAINER_ID.fullmatch(container_id):
            return None
        if query:
            if not query.startswith(_PROVIDER_QUERY):
                return None
            query = query[len(_PROVIDER_QUERY) :]
            if not PROVIDER_NAME.fullmatch(query):
                return None
        headers = request.headers
        if not request.keep_alive or "Expect" in headers:
            return None
        rules = parse_rules(headers, plain.threshold)
        if rules is not plain:
            return None
        template, provider_required = route
        try:
            provider = parse_provider(query, provider_required, settings)
            credential, passed = scan(headers.items())
        except SidecarError:
            return None  # the routed path answers it (the same error)
        keyed = cache_provider(settings, provider)
        outcome = local_hit(Query(keyed, container_id, credential, rules, passed))
        if outcome is None:
            return None
        record = outcome.record
        body = hit_body(outcome, provider, rules)
        head = [_status_line(record.status_code)]
        head.extend(
            f"{name}: {value}" for name, value in cache_headers(outcome, rules=rules).items()
        )
        head.append("Content-Type: application/json")
        head.append(f"Content-Length: {len(body)}")
        head.append(f"Date: {_http_date()}")
        data = ("\r\n".join(head) + _SERVER).encode() + body
        count_answer(services, template, outcome, rules, time.perf_counter() - started)
        return HitAnswer(data, record.status_code, len(body), template, (outcome, rules))

    async def lane(request: BaseRequest) -> web.StreamResponse:
        served = answer(request)
        if served is not None:
            return served  # type: ignore[return-value]  # duck-typed: see HitAnswer
        return await handler(request)

    return lane
