"""The sidecar's errors, each mapped to the gateway's error shape in one place (``wire``).

SidecarError                      an answer that is not a container
├── RequestError                  the caller's mistake (4xx, ``is_bifrost_error: false``)
│   ├── MissingCredential         401: no credential header
│   ├── AmbiguousCredential       400: an identity header twice, or two different keys
│   ├── InvalidParameter          400: a bad path, query or header value, naming it
│   ├── UnsupportedOperation      400: the provider has no containers API
│   ├── Forbidden                 403: a wrong admin token
│   ├── RouteNotFound             404: no such route
│   ├── NotFound                  404: no such cache entry (admin)
│   ├── MethodNotAllowed          405: the route takes other methods
│   ├── MalformedRequest          400: the HTTP parser refused the request
│   ├── RequestTimeout            408: the request's body stalled (relay)
│   ├── UnsupportedVersion        505: not HTTP/1.x
│   └── NotCached                 504: ``only-if-cached`` and nothing usable cached
├── UpstreamReplyError            the upstream answered an error: relayed as it came
├── Overloaded                    503: no relay connection came free in time
└── UpstreamFailure               the upstream could not be reached or made no sense
    ├── UpstreamTimeout           504
    ├── UpstreamUnavailable       502: connection refused, reset, DNS...
    └── UpstreamMalformed         502: a 200 whose body is not a container

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
    "RouteNotFound",
    "SidecarError",
    "StoreUnavailable",
    "UnsupportedOperation",
    "UnsupportedVersion",
    "UpstreamFailure",
    "UpstreamMalformed",
    "UpstreamReplyError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]


class SidecarError(Exception):
    """An error answered in the gateway's ``BifrostError`` shape."""

    status = 500
    type = ""
    code = ""
    param = ""
    is_bifrost_error = True

    def __init__(self, message: str, *, param: str = "", code: str = "") -> None:
        super().__init__(message)
        self.message = message
        if param:
            self.param = param
        if code:
            self.code = code


class RequestError(SidecarError):
    """The caller's mistake: a 4xx that is never cached and never reaches the upstream."""

    status = 400
    type = "invalid_request_error"
    is_bifrost_error = False


class MissingCredential(RequestError):
    """No credential header: 401."""

    status = 401
    type = "authentication_error"
    code = "missing_credential"


class AmbiguousCredential(RequestError):
    """An identity header sent twice, or two different virtual keys: 400, nothing forwarded."""

    type = "authentication_error"
    code = "ambiguous_credential"


class InvalidParameter(RequestError):
    """A path, query or header value that cannot be right: 400 naming it."""

    code = "invalid_parameter"


class UnsupportedOperation(RequestError):
    """The provider has no containers API: 400 (the gateway answers 500 on /openai/...)."""

    code = "unsupported_operation"


class RouteNotFound(RequestError):
    """No such route: 404."""

    status = 404
    code = "not_found"


class MethodNotAllowed(RequestError):
    """A route that exists, with another method: 405."""

    status = 405
    code = "method_not_allowed"


class MalformedRequest(RequestError):
    """A request the HTTP parser refused (bad header, over-long line, bad method...): 400."""

    code = "malformed_request"


class RequestTimeout(RequestError):
    """A relayed request's body stalled longer than ``SIDECAR_RELAY_IDLE_TIMEOUT_S``: 408."""

    status = 408
    code = "request_timeout"


class UnsupportedVersion(RequestError):
    """A request in an HTTP version other than 1.x: 505, as Go's server (the gateway) answers."""

    status = 505
    code = "http_version_not_supported"


class NotCached(RequestError):
    """``Cache-Control: only-if-cached`` and nothing usable is cached: 504 (RFC 9111 5.2.1.7)."""

    status = 504
    type = "cache_miss"
    code = "only_if_cached"


class UpstreamReplyError(SidecarError):
    """The upstream answered with an error: relayed with its status and gateway-shaped body."""

    def __init__(self, status: int, body: bytes, *, retry_after: str | None = None) -> None:
        super().__init__(f"upstream answered HTTP {status}")
        self.status = status
        self.body = body
        """The error in the gateway's shape, ready JSON."""
        self.retry_after = retry_after


class Overloaded(SidecarError):
    """Every relay connection stayed busy past ``SIDECAR_RELAY_QUEUE_TIMEOUT_S``: 503. The
    sidecar's own limit, never counted against the upstream."""

    status = 503
    type = "server_error"
    code = "relay_overloaded"


class UpstreamFailure(SidecarError):
    """The upstream could not be reached or made no sense: the gateway's own fault."""

    status = 502
    type = "upstream_error"


class UpstreamTimeout(UpstreamFailure):
    """The upstream took longer than ``SIDECAR_UPSTREAM_TIMEOUT_S``: 504."""

    status = 504
    code = "upstream_timeout"


class UpstreamUnavailable(UpstreamFailure):
    """The upstream could not be reached: 502."""

    code = "upstream_unavailable"


class UpstreamMalformed(UpstreamFailure):
    """The upstream answered 200 with something that is not a container: 502."""

    code = "upstream_malformed_response"


class StoreUnavailable(Exception):
    """Redis failed or is being skipped after a failure; callers serve from upstream."""


class Forbidden(RequestError):
    """A credential that is not allowed here (the admin token): 403."""

    status = 403
    type = "authentication_error"
    code = "forbidden"


class NotFound(RequestError):
    """No such resource (a cache entry to purge): 404."""

    status = 404
    code = "not_found"
