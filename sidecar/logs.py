"""Logging, configured once per entry point: text or JSON lines on stderr, no credential in any
line, and one access line per request (``method``, ``route`` (the template, never the raw path),
``status``, ``outcome``, ``duration_ms``, ``request_id`` and, while tracing, ``trace_id``)."""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any, TextIO, cast

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from pythonjsonlogger.msgspec import MsgspecFormatter

from sidecar import OPS_PATHS, tracing
from sidecar.flight import remember

if TYPE_CHECKING:
    from aiohttp.web_request import BaseRequest

    from sidecar.settings import Settings

__all__ = [
    "ACCESS_LOGGER",
    "AccessLogger",
    "Every",
    "Outage",
    "access_log_options",
    "configure_logging",
    "log_handler",
    "printable",
    "redact",
]

ACCESS_LOGGER = "sidecar.access"

# Anything that looks like a credential: a bearer token, an OpenAI/Bifrost key (sk-, sk-proj-,
# sk-bf-...), the value of a credential header written out, a password in a URL.
_SECRET = re.compile(
    r"(?P<header>\b(?:authorization|proxy-authorization|api-key|x-api-key|x-bf-vk)"
    r"[\"']?\s*[:=]\s*[\"']?)[^\r\n,;\"'}]+"
    r"|(?P<bearer>\bbearer\s+)[A-Za-z0-9._~+/=-]+"
    r"|(?P<key>\bsk-)[A-Za-z0-9_-]{6,}"
    r"|(?P<userinfo>://[^/\s:@]*:)[^/\s@]+(?P<at>@)",
    re.IGNORECASE,
)

# What the pattern keeps around the secret (groups that did not match are empty).
_MASK = r"\g<header>\g<bearer>\g<key>\g<userinfo>[REDACTED]\g<at>"


def printable(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit``, unprintable characters escaped (``\\u001b``): a caller's bytes
    never forge a log line or drive a terminal."""
    text = text[:limit]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)


def redact(text: str) -> str:
    """``text`` with anything that looks like a credential replaced by ``[REDACTED]``."""
    return _SECRET.sub(_MASK, text)


def _clean(value: Any) -> Any:
    """``value``, or its text redacted if that may hold a credential."""
    text = str(value)
    lower = text.lower()
    # Ten times cheaper than the pattern, which runs only on a suspect.
    if (
        "sk-" in lower
        or "bearer" in lower
        or "://" in lower
        or "authoriz" in lower
        or "api-key" in lower
        or "x-bf-vk" in lower
    ):
        redacted = redact(text)
        return value if redacted == text else redacted
    return value


class _RedactingFilter(logging.Filter):
    """Defence in depth: redacts a record's message, traceback and stack before any handler
    formats it; adds the current trace id while tracing."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, dict):  # python-json-logger takes a dict as the fields
            record.msg = {key: _clean(value) for key, value in record.msg.items()}
        else:
            # Rendered here, so that a credential split between format and arguments is found.
            try:
                message = record.getMessage()
            except (TypeError, ValueError):  # a broken format: written as given
                message = f"{record.msg} {record.args!r}"
            record.msg, record.args = _clean(message), None
        if record.exc_info:
            # Exceptions may carry request headers (aiohttp's RequestInfo): render, then redact.
            if not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = _clean(record.exc_text)
        if record.stack_info:
            record.stack_info = _clean(record.stack_info)
        if "trace_id" not in record.__dict__ and (trace_id := tracing.current_trace_id()):
            record.trace_id = trace_id
        return True


class _UtcFormatter(logging.Formatter):
    """Times in UTC, ISO 8601 with milliseconds; the seconds part made once a second."""

    _second = -1
    _second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._second_text}.{int(record.msecs):03d}Z"


class _JsonFormatter(_UtcFormatter, MsgspecFormatter):
    """``time``, ``level``, ``logger``, ``message``, then the record's extra fields."""

    def __init__(self) -> None:
        MsgspecFormatter.__init__(
            self,
            ["asctime", "levelname", "name", "message"],
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        """The library's fields, less its per-key ``hasattr``: a third of an access line's cost."""
        log_data["time"] = record.asctime
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        log_data["message"] = record.message
        log_data.update(message_dict)
        skip = self._skip_fields
        for key, value in record.__dict__.items():
            if key not in skip and not key.startswith("_"):
                log_data[key] = value


class Every:
    """Log lines of a kind at most every ``every_s`` per key (at most ``limit`` keys kept)."""

    def __init__(self, every_s: float, limit: int = 256) -> None:
        self.every_s = every_s
        self._limit = limit
        self._keys: dict[str, tuple[float, int]] = {}  # key -> (next line due, lines held back)

    def due(self, key: str) -> int | None:
        """None: hold this line back; else write it, and this many were held back before it."""
        now = time.monotonic()
        due_at, held = self._keys.get(key, (0.0, 0))
        if now < due_at:
            self._keys[key] = (due_at, held + 1)
            return None
        remember(self._keys, key, (now + self.every_s, 0), self._limit)
        return held


class Outage:
    """The outages of something this process needs: a WARNING when one starts (again at most
    every ``every_s`` while it lasts or flaps), an INFO line when it ends."""

    def __init__(self, logger: logging.Logger, what: str, meanwhile: str, every_s: float = 30.0):
        self._log, self._what, self._meanwhile = logger, what, meanwhile
        self._every = Every(every_s, limit=1)
        self.since: float | None = None
        self.total_s = 0.0
        self._logged = False

    def failed(self, exc: BaseException) -> bool:
        """Note a failure; True if it starts an outage."""
        starts = self.since is None
        if starts:
            self.since = time.monotonic()
        if self._every.due("") is not None:
            self._logged = True
            kind = type(exc).__name__
            self._log.warning("%s unavailable (%s: %s): %s", self._what, kind, exc, self._meanwhile)
        return starts

    def seconds(self) -> float:
        """Seconds spent in outages so far, the current one included."""
        current = time.monotonic() - self.since if self.since is not None else 0.0
        return self.total_s + current

    def recovered(self) -> None:
        """Note a success: the end of an outage."""
        if self.since is None:
            return
        lasted_s = time.monotonic() - self.since
        self.total_s += lasted_s
        self.since = None
        if self._logged:
            self._logged = False
            self._log.info("%s reachable again after %.1fs", self._what, lasted_s)


def log_handler(fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """A handler writing ``fmt`` (``text`` or ``json``) lines to ``stream`` (stderr),
    credentials redacted."""
    handler = logging.StreamHandler(stream)
    text = _UtcFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(_JsonFormatter() if fmt == "json" else text)
    handler.addFilter(_RedactingFilter())
    return handler


def configure_logging(settings: Settings) -> None:
    """Log to stderr as ``SIDECAR_LOG_LEVEL`` and ``SIDECAR_LOG_FORMAT`` say, replacing any
    earlier configuration."""
    logging.basicConfig(
        level=settings.log_level, handlers=[log_handler(settings.log_format)], force=True
    )
    # No format shows a thread or process name: not looking them up makes every record cheaper.
    logging.logThreads = False
    logging.logMultiprocessing = False


def access_log_options(settings: Settings) -> dict[str, Any]:
    """``web.AppRunner``/``web.run_app`` keyword arguments for the access log
    (``SIDECAR_ACCESS_LOG``)."""
    return {
        "access_log_class": AccessLogger,
        "access_log": logging.getLogger(ACCESS_LOGGER) if settings.access_log else None,
    }


_SANE_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
_ids = itertools.count(1)
_id_prefix = os.urandom(3).hex()  # one server process per container: no fork to follow


def _request_id(request: BaseRequest) -> str:
    """The caller's ``X-Request-Id`` when plausible (and no credential), else ``<process>-<n>``."""
    given = request.headers.get("X-Request-Id", "")
    if _SANE_ID.fullmatch(given) and not _SECRET.search(given):
        return given
    return f"{_id_prefix}-{next(_ids):x}"


class AccessLogger(AbstractAccessLogger):
    """One INFO line per answered request, none for probes and metrics; no header values but a
    plausible ``X-Request-Id``. aiohttp makes one per connection and checks ``enabled`` then."""

    __slots__ = ("_label", "_outcome", "_route")

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        # Imported here: the middleware pulls in the app's state, which the worker does not need.
        from sidecar import middleware

        self._outcome = middleware.OUTCOME
        self._route = middleware.ACCESS_ROUTE
        self._label = middleware.outcome_label

    @property
    def enabled(self) -> bool:
        """Whether an access line would be written at all."""
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        """Write the request's line."""
        try:
            if request.path in OPS_PATHS:
                return
            # A hit lane answer names its route; a relayed one its family.
            route = request.get(self._route)
            if route is None:
                try:
                    resource = cast("web.Request", request).match_info.route.resource
                except (AttributeError, AssertionError):  # refused by aiohttp's parser
                    resource = None
                route = resource.canonical if resource is not None else "unmatched"
            status = response.status
            outcome = self._label(response.get(self._outcome), status)
            duration_ms = round(time * 1000, 3)
            rid = _request_id(request)
            method = request.method
            message = f"{method} {route} {status} {outcome} {duration_ms:.1f}ms id={rid}"
            # makeRecord and handle, not info(): no search of the stack for the caller.
            logger = self.logger
            record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, message, (), None)
            record.__dict__.update(
                method=method,
                route=route,
                status=status,
                outcome=outcome,
                duration_ms=duration_ms,
                request_id=rid,
            )
            if trace_id := request.get(tracing.TRACE_ID):
                record.trace_id = trace_id
            logger.handle(record)
        except Exception:
            self.logger.exception("access log line failed")
