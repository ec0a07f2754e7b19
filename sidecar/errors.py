"""The sidecar's errors, each mapped to the gateway's error shape in one place (``wire``).

SidecarError                      an answer that is not a container
├── RequestError                  the caller's mistake (4xx, ``is_bifrost_error: false``)
│   ├── MissingCredential         401: no credential header
│   ├── AmbiguousCredential       400: an identity header twice, or two different keys
│   ├── InvalidParameter          400: a bad path, query or header value, naming it
│   ├── UnsupportedOperation      400: the provider has no containers API
│   ├── Forbidden                 403: a wrong admin token
│   ├── NotFound                  404: no such route, or no such cache entry (admin)
│   ├── MethodNotAllowed          405: the route takes other methods
│   ├── MalformedRequest          400: the HTTP parser refused the request
│   ├── RequestTimeout            408: the request's body stalled (relay)
│   ├── UnsupportedVersion        505: not HTTP/1.x
│   └── NotCached                 504: ``only-if-cached`` and nothing usable cached
├── UpstreamReplyError            the upstream answered this caller an error: relayed as it came
├── UpstreamBackingOff            503: the upstream failed lately; not asked again yet
├── Overloaded                    503: the sidecar's own upstream connections are all in use
└── UpstreamFailure               the upstream could not be reached or made no sense
    ├── UpstreamTimeout           504
    ├── UpstreamUnavailable       502: connection refused, reset, DNS...
    └── UpstreamMalformed         502: a 200 that is not a container, or a redirect

StoreUnavailable                  Redis failed; never reaches a caller (fail-open)
"""

from __future__ import annotations

__all__ = [
    "AmbiguousCredential",
    "Forbidden",
    "InvalidParameter",
    "MalformedRequest",
    "MethodNotAllowed",
    "MissingCredential",
    "NotCached",
    "NotFound",
    "Overloaded",
    "RequestError",
    "RequestTimeout",
    "SidecarError",
    "StoreUnavailable",
    "UnsupportedOperation",
    "UnsupportedVersion",
    "UpstreamBackingOff",
    "UpstreamFailure",
    "UpstreamMalformed",
    "UpstreamReplyError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]


class SidecarError(Exception):
    """An error answered in the gateway's ``BifrostError`` shape; subclasses set that shape with
    class keywords (``status``, ``type``, ``code``)."""

    status = 500
    type = ""
    code = ""
    param = ""
    is_bifrost_error = True
    retry_after: str | None = None
    """A ``Retry-After`` to answer with."""

    def __init_subclass__(cls, *, status: int = 0, type: str = "", code: str = "") -> None:
        super().__init_subclass__()
        if status:
            cls.status = status
        if type:
            cls.type = type
        if code:
            cls.code = code

    def __init__(self, message: str, *, param: str = "") -> None:
        super().__init__(message)
        self.message = message
        if param:
            self.param = param


class RequestError(SidecarError, status=400, type="invalid_request_error"):
    """The caller's mistake: a 4xx that is never cached and never reaches the upstream."""

    is_bifrost_error = False


class MissingCredential(
    RequestError, status=401, type="authentication_error", code="missing_credential"
):
    """No credential header."""


class AmbiguousCredential(RequestError, type="authentication_error", code="ambiguous_credential"):
    """An identity header sent twice, or two different virtual keys: nothing is forwarded."""


class InvalidParameter(RequestError, code="invalid_parameter"):
    """A path, query or header value that cannot be right, named in the message."""


class UnsupportedOperation(RequestError, code="unsupported_operation"):
    """The provider has no containers API (the gateway answers 500 on /openai/...)."""


class Forbidden(RequestError, status=403, type="authentication_error", code="forbidden"):
    """A credential that is not allowed here (the admin token)."""


class NotFound(RequestError, status=404, code="not_found"):
    """No such route, or no such resource (a cache entry to purge)."""


class MethodNotAllowed(RequestError, status=405, code="method_not_allowed"):
    """A route that exists, with another method."""


class MalformedRequest(RequestError, code="malformed_request"):
    """A request the HTTP parser refused (bad header, over-long line, bad method...)."""


class RequestTimeout(RequestError, status=408, code="request_timeout"):
    """A relayed request's body stalled longer than ``SIDECAR_RELAY_IDLE_TIMEOUT_S``."""


class UnsupportedVersion(RequestError, status=505, code="http_version_not_supported"):
    """A request in an HTTP version other than 1.x, answered as Go's server (the gateway) does."""


class NotCached(RequestError, status=504, type="cache_miss", code="only_if_cached"):
    """``Cache-Control: only-if-cached`` and nothing usable is cached (RFC 9111 5.2.1.7)."""


class UpstreamReplyError(SidecarError):
    """The upstream answered with an error: relayed with its status and gateway-shaped body."""

    def __init__(self, status: int, body: bytes, *, retry_after: str | None = None) -> None:
        super().__init__(f"upstream answered HTTP {status}")
        self.status = status
        self.body = body
        """The error in the gateway's shape, ready JSON."""
        self.retry_after = retry_after


class UpstreamBackingOff(
    SidecarError, status=503, type="upstream_error", code="upstream_backing_off"
):
    """The upstream failed for this container lately (for whoever asked): answered with the time
    left of its back-off, never another caller's answer."""

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after = str(retry_after_s)


class Overloaded(SidecarError, status=503, type="server_error", code="sidecar_overloaded"):
    """Every upstream connection of a pool (retrievals', or the relay's) stayed busy past its
    wait: the sidecar's own limit, never counted against the upstream."""

    retry_after = "1"


class UpstreamFailure(SidecarError, status=502, type="upstream_error"):
    """The upstream could not be reached or made no sense: the gateway's own fault."""


class UpstreamTimeout(UpstreamFailure, status=504, code="upstream_timeout"):
    """The upstream took longer than ``SIDECAR_UPSTREAM_TIMEOUT_S``."""


class UpstreamUnavailable(UpstreamFailure, code="upstream_unavailable"):
    """The upstream could not be reached."""


class UpstreamMalformed(UpstreamFailure, code="upstream_malformed_response"):
    """The upstream answered 200 with something that is not a container, or a redirect."""


class StoreUnavailable(Exception):
    """Redis failed or is being skipped after a failure; callers serve from upstream."""
