"""The upstream (a Bifrost gateway or an OpenAI-compatible API), answered in the gateway's shape:
transport failures become ``Upstream*`` errors here, an answered error a gateway-shaped reply."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import aiohttp
import msgspec
from multidict import CIMultiDict

from sidecar import __version__
from sidecar.errors import UpstreamMalformed, UpstreamTimeout, UpstreamUnavailable
from sidecar.flight import ConnectionSlots
from sidecar.metrics import Metrics, status_class
from sidecar.records import Record
from sidecar.settings import Settings, upstream_base
from sidecar.stats import FleetStats
from sidecar.wire import (
    Container,
    gateway_error_from_openai,
    openai_answer,
    predicted_expiry,
    split_gateway_answer,
)

__all__ = ["Upstream", "UpstreamReply", "create_session"]


log = logging.getLogger(__name__)
USER_AGENT = f"bifrost-container-sidecar/{__version__}"


class UpstreamReply(msgspec.Struct, frozen=True, gc=False):
    """What the upstream answered: a container (status 200) or a gateway-shaped error."""

    status: int
    body: bytes
    """The container's gateway JSON without extra_fields, or the error's gateway JSON."""
    container: Container | None = None
    retry_after: str | None = None
    extra: bytes = b""
    """The answer's ``extra_fields`` members (see ``Record.extra``)."""

    def record(self, provider: str, container_id: str, fetched_at_ms: int) -> Record:
        """The cache record of this answer (a container, or a 404 as a negative entry)."""
        container = self.container
        if container is None:
            return Record(
                provider=provider,
                container_id=container_id,
                status_code=self.status,
                body=self.body,
                fetched_at_ms=fetched_at_ms,
            )
        return Record(
            provider=provider,
            container_id=container_id,
            status_code=200,
            body=self.body,
            fetched_at_ms=fetched_at_ms,
            status=container.status,
            last_active_at=container.last_active_at,
            expires_at=predicted_expiry(container),
            extra=self.extra,
        )


def create_session(
    settings: Settings, trace_configs: list[aiohttp.TraceConfig] | None = None
) -> aiohttp.ClientSession:
    """The pooled HTTP client for upstream calls."""
    return aiohttp.ClientSession(
        trace_configs=trace_configs,
        # One session serves every caller: a cookie the upstream set for one must never go out
        # with another's request (and a jar costs every call a lookup).
        cookie_jar=aiohttp.DummyCookieJar(),
        connector=aiohttp.TCPConnector(limit=settings.upstream_max_connections, ttl_dns_cache=300),
        timeout=aiohttp.ClientTimeout(
            total=settings.upstream_timeout_s, sock_connect=settings.upstream_connect_timeout_s
        ),
        headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
        raise_for_status=False,
    )


class Upstream:
    """Retrieves containers from the configured upstream."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: Settings,
        metrics: Metrics,
        caller: str,
        stats: FleetStats,
    ) -> None:
        self._session = session
        self._kind = settings.upstream_kind
        self._base = upstream_base(settings)
        self._timeout_s = settings.upstream_timeout_s
        # The session's pool, counted here: a call that cannot get a connection in time is the
        # sidecar's own exhaustion (Overloaded), never taken for an upstream failure.
        self._slots = ConnectionSlots(
            settings.upstream_max_connections, settings.upstream_connect_timeout_s, "upstream"
        )
        self._metrics = metrics
        self._caller = caller
        self._stats = stats
        self.last_failure: float | None = None
        """When the upstream last failed to answer (monotonic), for readiness reports."""

    def url(self, provider: str, container_id: str) -> str:
        """The upstream URL of a container (ids are validated to URL-safe characters)."""
        if self._kind == "bifrost":
            return f"{self._base}/openai/v1/containers/{container_id}?provider={provider}"
        return f"{self._base}/v1/containers/{container_id}"

    async def retrieve(
        self, provider: str, container_id: str, credential_headers: Iterable[tuple[str, str]]
    ) -> UpstreamReply:
        """One upstream retrieve with the given credential headers."""
        url = self.url(provider, container_id)
        started = time.perf_counter()
        status: int | None = None
        # A multidict: each header once, exactly as given (the caller's Credential has no
        # duplicates); a dict built from repeated headers would silently keep the last.
        headers = CIMultiDict(credential_headers)
        async with self._slots.hold():  # Overloaded when none comes free: no call, not counted
            try:
                # Never a redirect: the caller's credential goes to the configured upstream only.
                async with self._session.get(url, headers=headers, allow_redirects=False) as got:
                    raw = await got.read()
                    status = got.status
                    retry_after = got.headers.get("Retry-After")
            except TimeoutError as exc:
                raise UpstreamTimeout(
                    f"the upstream did not answer within {self._timeout_s:g}s"
                ) from exc
            except aiohttp.ClientError as exc:
                # The exception's text names the upstream's address: logged, never answered.
                log.info("upstream call for %s failed: %s: %s", provider, type(exc).__name__, exc)
                raise UpstreamUnavailable(
                    f"the upstream is unreachable ({type(exc).__name__})"
                ) from exc
            finally:
                self._observe(provider, status, time.perf_counter() - started)
        if 300 <= status < 400:
            raise UpstreamMalformed(
                f"the upstream answered a redirect (HTTP {status}); redirects are not followed"
            )
        if status == 200:
            if self._kind == "bifrost":
                body, extra, container = split_gateway_answer(raw)
            else:
                body, extra, container = openai_answer(raw, provider)
            if container.id != container_id:
                raise UpstreamMalformed(
                    f"upstream answered container {container.id!r} for {container_id!r}"
                )
            return UpstreamReply(200, body, container, extra=extra)
        return UpstreamReply(status, self._error_body(status, raw, provider), None, retry_after)

    def _observe(self, provider: str, status: int | None, seconds: float) -> None:
        """Count one retrieval's upstream call (the relay counts its own, apart)."""
        if status is None or status >= 500:
            self.last_failure = time.monotonic()
        self._stats.add(f"upstream.{self._caller}")
        label = self._metrics.provider(provider)
        self._metrics.upstream.labels(label, status_class(status), self._caller).inc()
        self._metrics.upstream_seconds.labels(label, self._caller).observe(seconds)
        if status == 429:
            self._metrics.throttled.labels(label).inc()

    def _error_body(self, status: int, raw: bytes, provider: str) -> bytes:
        if self._kind == "bifrost" and _is_gateway_error(raw):
            return raw
        return gateway_error_from_openai(status, raw, provider)


def _is_gateway_error(raw: bytes) -> bool:
    try:
        document = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return False
    return isinstance(document, dict) and "is_bifrost_error" in document
