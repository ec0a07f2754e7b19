"""The hit lane: a retrieval this process can answer from its own copy, answered before routing.

For a poller's usual request (a hit on ``local``) route resolution, the middleware chain and a
``web.Response`` cost more than the answer. The lane takes only the common shape (GET over
HTTP/1.1 keep-alive, one of the retrieval routes, a plain container id, no query but
``provider``, no cache-control header) and writes the routed path's exact bytes in one piece,
counted the same way; anything else, and every miss, is routed (tests/sidecar/test_lane.py
compares the two byte for byte). Off while tracing is on (a span per request is the point there).
"""

from __future__ import annotations

import email.utils
import functools
import time
from collections.abc import Callable
from http import HTTPStatus

from aiohttp import HttpVersion11, web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.web import BaseRequest

from sidecar.controls import parse_rules
from sidecar.errors import SidecarError
from sidecar.headers import CACHE_NAME
from sidecar.middleware import ACCESS_ROUTE, OUTCOME, count_answer
from sidecar.outcomes import Query
from sidecar.settings import cache_provider
from sidecar.state import SERVICES, Services
from sidecar.views import CONTAINER_ID, RETRIEVE_ROUTES, hit_body, parse_provider, requires_provider

__all__ = ["HitAnswer", "hit_answers"]


_PROVIDER_QUERY = "provider="
_SERVER = f"\r\nServer: {SERVER_SOFTWARE}\r\n\r\n"


@functools.lru_cache(maxsize=1)
def _http_date(second: int) -> str:
    """A second as an IMF-fixdate (RFC 9110 5.6.7): made once a second."""
    return email.utils.formatdate(second, usegmt=True)


class HitAnswer(web.StreamResponse):
    """A hit's whole HTTP response, serialised once and written by ``prepare`` in one piece
    (``headers`` stays empty: they are in the bytes)."""

    def __init__(self, data: bytes, status: int, body_length: int) -> None:
        super().__init__(status=status)
        self._data = data
        self._length = body_length

    @property
    def keep_alive(self) -> bool:
        """The lane serves keep-alive requests only."""
        return True

    @property
    def body_length(self) -> int:
        """The body's bytes (the access log's size)."""
        return self._length

    async def prepare(self, request: BaseRequest) -> None:
        """Write the response (status line, headers and body together)."""
        await request.writer.write_eof(self._data)

    async def write_eof(self, data: bytes = b"") -> None:
        """Nothing left to write."""


@functools.cache  # a record's status is one the upstream gave: a handful at most
def _status_line(status: int) -> str:
    return f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"


def hit_answers(app: web.Application) -> Callable[[BaseRequest], HitAnswer | None] | None:
    """The lane (answering None to route a request), or None if this process keeps no copies."""
    services: Services = app[SERVICES]
    if not services.service.local.enabled:
        return None
    settings = services.settings
    plain = parse_rules({}, settings.freshness_threshold)
    routes = {
        template.rsplit("{", 1)[0]: (template, requires_provider(template, settings))
        for template in RETRIEVE_ROUTES
    }
    scan = services.credentials.scan
    local_hit = services.service.local_hit

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
        if query and not query.startswith(_PROVIDER_QUERY):
            return None
        headers = request.headers
        if not request.keep_alive or "Expect" in headers:
            return None
        rules = parse_rules(headers, plain.threshold)
        if rules is not plain:
            return None
        template, provider_required = route
        try:
            # Raw, so anything escaped fails here: a name may not hold '%', '&' or '+'.
            provider = parse_provider(query[len(_PROVIDER_QUERY) :], provider_required, settings)
            credential, passed = scan(headers.items())
        except SidecarError:
            return None  # the routed path answers it (the same error)
        keyed = cache_provider(settings, provider)
        outcome = local_hit(Query(keyed, container_id, credential, rules, passed))
        if outcome is None:
            return None
        record, freshness = outcome.record, outcome.freshness
        if freshness is None:  # every hit has one; the routed path would answer otherwise
            return None
        body = hit_body(outcome, provider, rules)
        # headers.cache_headers of a plain hit, formatted at once (test_lane compares the bytes)
        data = (
            f"{_status_line(record.status_code)}\r\nCache-Status: {CACHE_NAME}; hit; "
            f"ttl={int(freshness.ttl_s // 1)}\r\nAge: {int(freshness.age_s)}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Date: {_http_date(int(time.time()))}{_SERVER}"
        ).encode() + body
        count_answer(services, template, outcome, rules, time.perf_counter() - started)
        answer = HitAnswer(data, record.status_code, len(body))
        answer[OUTCOME] = (outcome, rules)
        request[ACCESS_ROUTE] = template
        return answer

    return answer
