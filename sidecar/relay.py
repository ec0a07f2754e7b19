"""The relay: every request the cache does not answer goes to the upstream as the app sent it.

Method, path and query byte for byte, headers less the hop-by-hop ones, bodies streamed both
ways with back-pressure; the upstream's status, headers and body come back as sent (compressed
bodies and redirects too). An idle timeout each way, no total one; a client that goes away
cancels the upstream call. Its own bounded pool, so relayed traffic never takes the retrievals'
connections; its own failures are gateway-shaped and never counted against the upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar import relay_ws, tracing
from sidecar.admin import refuse_admin_token
from sidecar.credentials import Credential, check_forwardable, identity_header
from sidecar.errors import (
    Overloaded,
    RequestTimeout,
    SidecarError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from sidecar.flight import ConnectionSlots
from sidecar.metrics import Metrics, status_class
from sidecar.middleware import ACCESS_ROUTE, COUNTED, OUTCOME, ROUTE_GROUP, count_route
from sidecar.relay_routes import container_call, family, keep_cache_right, target
from sidecar.settings import Settings, upstream_base
from sidecar.state import SERVICES

__all__ = ["RELAY", "Relay", "add_route", "relay_ctx"]

log = logging.getLogger(__name__)

# RFC 9110 section 7.6.1 (and Proxy-*, and what a Connection header names).
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "te", "trailer", "transfer-encoding",
                         "upgrade"})  # fmt: skip
# Headers aiohttp's client would add (Accept-Encoding would make the upstream compress what the
# app never asked compressed): only what the app sent goes.
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
_CLIENT_LEFT = 499  # nginx's word for it, in the access log and the metrics
_WATCH_EVERY_S = 0.05
_SEED_MAX = 1 << 20  # a list answer holds at most 100 containers: far less


def _end_to_end(
    headers: CIMultiDictProxy[str], drop: frozenset[str] = frozenset()
) -> Iterator[tuple[str, str]]:
    """A message's headers less the hop-by-hop ones and ``drop`` (lower-case names)."""
    named = {t.lower() for t in relay_ws.header_list(headers, "Connection")}
    skip = _HOP_BY_HOP | named | drop
    for key, value in headers.items():
        name = key.lower()
        if name not in skip and not name.startswith("proxy-"):
            yield key, value


def _forward_headers(
    headers: CIMultiDictProxy[str], credential: Credential, kind: str, drop: frozenset[str]
) -> CIMultiDict[str]:
    """The client's headers as the upstream gets them: less the hop-by-hop ones, ``drop`` and
    ``Host``, the identity exactly as the credential was read (what the cache keys by)."""
    forwarded = CIMultiDict(
        (key, check_forwardable(key.lower(), value))
        for key, value in _end_to_end(headers, drop | {"host"})
        if not identity_header(kind, key.lower())
    )
    forwarded.extend(credential.headers)
    return forwarded


class Relay:
    """The relay's own pool of upstream connections and what watches its clients."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.metrics = metrics
        self.idle_s = settings.relay_idle_timeout_s
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=settings.relay_max_connections, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=settings.upstream_connect_timeout_s,
                sock_read=settings.relay_idle_timeout_s,
            ),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_NO_AUTO_HEADERS,
            read_bufsize=1 << 18,
            trace_configs=[*tracing.client_trace_configs(), relay_ws.no_redirects()],
        )
        self.base = upstream_base(settings)
        self.watcher = Watcher()
        self.slots = ConnectionSlots(
            settings.relay_max_connections, settings.relay_queue_timeout_s, "relay"
        )

    def count(self, route_family: str, status: int | None, started: float) -> None:
        """Count one relayed exchange, once, with its whole duration."""
        cls = "1xx" if status == 101 else status_class(status)
        self.metrics.relayed.labels(route_family, cls).inc()
        self.metrics.relay_seconds.labels(route_family).observe(time.perf_counter() - started)


RELAY: web.AppKey[Relay] = web.AppKey("relay", Relay)


async def relay_ctx(app: web.Application) -> AsyncIterator[None]:
    """The relay's pool for the application's life."""
    app[RELAY] = relay = Relay(app[SERVICES].settings, app[SERVICES].metrics)
    yield
    relay.watcher.close()
    await relay.session.close()


async def _defer_continue(request: web.Request) -> None:
    """``Expect: 100-continue`` goes to the upstream; its 100 reaches the client when it asks
    for the body (``_body``), and its refusal instead of one."""


def add_route(router: web.UrlDispatcher) -> None:
    """Register the relay for every method and path: last, after the sidecar's own routes."""
    router.add_route("*", "/{relayed:.*}", handle, expect_handler=_defer_continue)


async def handle(request: web.Request) -> web.StreamResponse:
    """Relay one request the sidecar does not answer itself."""
    request[ROUTE_GROUP] = "passthrough"
    services = request.app[SERVICES]
    relay = request.app[RELAY]
    settings = services.settings
    raw = request.raw_path if request.raw_path.startswith("/") else request.rel_url.raw_path_qs
    path, mark, query = raw.partition("?")
    route_family = family(path)
    request[ACCESS_ROUTE] = f"relay:{route_family}"  # its own answers and its errors alike
    call = container_call(path)
    websocket = relay_ws.is_upgrade(request)
    identity = relay_ws.identity(request) if websocket else request.headers.items()
    refuse_admin_token(request, settings)
    credential = services.credentials.read(identity)  # refused here, before anything goes
    kind = settings.upstream_kind
    url = URL(relay.base + target(path, mark, query, call, kind), encoded=True)
    started = time.perf_counter()

    # A change to one container is in force before the client has its status line (another
    # replica asked at once must not serve the deleted container); a list or a create seeds
    # from the answer's body, before the client has the last byte of it.
    changes_one = call is not None and call.container_id != "" and request.method != "GET"

    async def before(status: int) -> None:
        if changes_one and 200 <= status < 300:
            assert call is not None
            await keep_cache_right(services.service, settings, request.method, call, query,
                                   credential, None)  # fmt: skip

    async def finish(response: web.StreamResponse, body: bytes | None) -> None:
        # Before the client has the whole answer: nor may a scrape miss the count.
        if call is not None and not changes_one and 200 <= response.status < 300:
            await keep_cache_right(services.service, settings, request.method, call, query,
                                   credential, body)  # fmt: skip
        label = "bypass" if response.status < 400 else "error"
        response[OUTCOME], response[COUNTED] = label, True
        count_route(services, "passthrough", label, time.perf_counter() - started)
        relay.count(route_family, response.status, started)

    drop = relay_ws.HANDSHAKE_HEADERS if websocket else frozenset()
    try:
        headers = _forward_headers(request.headers, credential, kind, drop)
        async with relay.slots.hold():
            if websocket:
                response = await relay_ws.relay(request, relay.session, url, headers)
            else:
                keep = call is not None and not call.container_id and request.method != "DELETE"
                response = await _forward(
                    request, relay, url, headers, keep=keep, hold=call is not None,
                    before=before, finish=finish,
                )  # fmt: skip
    except SidecarError as exc:
        if isinstance(exc, Overloaded):
            log.warning("relay: all %d connections busy", settings.relay_max_connections)
        relay.count(route_family, None, started)
        raise
    if COUNTED not in response:  # a websocket, or an answer cut short
        await finish(response, None)
    return response


async def _forward(
    request: web.Request, relay: Relay, url: URL, headers: CIMultiDict[str], *, keep: bool,
    hold: bool, before: Callable[[int], Awaitable[None]],
    finish: Callable[[web.StreamResponse, bytes | None], Awaitable[None]],
) -> web.StreamResponse:  # fmt: skip
    """One exchange: the body streamed up, ``before`` called with the upstream's status before
    the client has it, the answer streamed down, ``finish`` called before its end is sent (with
    a small 200 answer's body if ``keep``). With ``hold`` the last chunk waits for ``finish``
    too: with a Content-Length the client has all it needs at the last byte."""
    stalled: list[bool] = []
    data = _body(request, relay.idle_s, stalled) if request.body_exists else None
    response: web.StreamResponse | None = None
    task = asyncio.current_task()
    assert task is not None
    relay.watcher.add(task, request)
    try:
        async with relay.session.request(
            request.method, url, headers=headers, data=data, allow_redirects=False
        ) as upstream:
            # Shielded: a client that leaves now cannot cut what a change upstream means here.
            await asyncio.shield(before(upstream.status))
            response = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=CIMultiDict(_end_to_end(upstream.headers)),
            )
            await response.prepare(request)
            seed = keep and upstream.status == 200
            kept, held = bytearray(), b""
            async for chunk in upstream.content.iter_any():
                seed = seed and len(kept) + len(chunk) <= _SEED_MAX
                if seed:
                    kept += chunk
                if hold:
                    chunk, held = held, chunk
                async with asyncio.timeout(relay.idle_s):  # a client that stopped reading
                    await response.write(chunk)
        if relay.watcher.discard(task):
            # The client left just now and its cancellation is still pending: taken here, it
            # cannot cut what the cache must do for a change that did happen upstream.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0)
            task.uncancel()
        await finish(response, bytes(kept) if seed else None)
        async with asyncio.timeout(relay.idle_s):
            await response.write(held)
            await response.write_eof()
        return response
    except asyncio.CancelledError:
        if not relay.watcher.discard(task):
            raise
        task.uncancel()  # the watcher's own cancellation: the client went away
        return response or web.Response(status=_CLIENT_LEFT)
    except (TimeoutError, aiohttp.ClientError) as exc:
        if stalled:
            raise RequestTimeout(f"the request's body stalled for {relay.idle_s:g}s") from exc
        transport = request.transport
        if response is not None or transport is None or transport.is_closing():
            # The client left, or the answer is under way: cut it, so the client sees it cut.
            if transport is not None:
                transport.close()
            return response or web.Response(status=_CLIENT_LEFT)
        if isinstance(exc, TimeoutError):
            raise UpstreamTimeout(f"the upstream sent nothing for {relay.idle_s:g}s") from exc
        log.info("relay: upstream unreachable: %s: %s", type(exc).__name__, exc)
        raise UpstreamUnavailable(f"the upstream is unreachable ({type(exc).__name__})") from exc
    finally:
        relay.watcher.discard(task)


async def _body(request: web.Request, idle_s: float, stalled: list[bool]) -> AsyncIterator[bytes]:
    """The client's body as it arrives; a silence of ``idle_s`` ends it (``stalled``)."""
    if request.headers.get("Expect", "").lower() == "100-continue":
        # The upstream asked for the body: now the client may send it (aiohttp's own way).
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
    content = request.content
    while True:
        try:
            async with asyncio.timeout(idle_s):
                chunk = await content.readany()
        except TimeoutError:
            stalled.append(True)
            raise
        if not chunk:
            return
        yield chunk


class Watcher:
    """Cancels the relays whose client went away: aiohttp cancels no handler when its client
    leaves (``handler_cancellation`` stays off for the retrievals' sake), so one timer checks
    every watched transport every 50 ms while any relay waits on the upstream."""

    def __init__(self) -> None:
        self._watched: dict[asyncio.Task[object], web.Request] = {}
        self._left: set[asyncio.Task[object]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, task: asyncio.Task[object], request: web.Request) -> None:
        """Watch ``request``'s client while ``task`` relays it."""
        self._watched[task] = request
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(_WATCH_EVERY_S, self._check)

    def discard(self, task: asyncio.Task[object]) -> bool:
        """Stop watching; whether ``task`` was cancelled here."""
        self._watched.pop(task, None)
        left = task in self._left
        self._left.discard(task)
        return left

    def close(self) -> None:
        """Stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        for task, request in self._watched.items():
            transport = request.transport
            if (transport is None or transport.is_closing()) and task not in self._left:
                self._left.add(task)
                task.cancel()
        if self._watched:
            self._timer = asyncio.get_running_loop().call_later(_WATCH_EVERY_S, self._check)
