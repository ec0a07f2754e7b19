"""Logging, configured once per entry point: readable text or one JSON object a line on stderr,
one access line per request, and no credential in any line.

``SIDECAR_LOG_FORMAT=json`` lines carry ``time``, ``level``, ``logger``, ``message`` and, for
access lines (logger ``sidecar.access``), ``method``, ``route`` (the route template, never the raw
path), ``status``, ``outcome``, ``duration_ms``, ``request_id`` and, while tracing, ``trace_id``.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TextIO, cast

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from pythonjsonlogger.msgspec import MsgspecFormatter

from sidecar import OPS_PATHS, tracing

if TYPE_CHECKING:
    from aiohttp.web_request import BaseRequest

    from sidecar.settings import Settings

__all__ = [
    "ACCESS_LOGGER",
    "REQUEST_ID",
    "AccessLogger",
    "JsonFormatter",
    "RedactingFilter",
    "TextFormatter",
    "access_log_options",
    "configure_logging",
    "configure_logging_basic",
    "log_handler",
    "redact",
    "request_id",
]

ACCESS_LOGGER = "sidecar.access"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Where a request's id is kept once known, so every line about the request shows the same one.
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)

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
_MASK = "[REDACTED]"
_SAFE_TYPES = (int, float, bool, type(None))


def _mask(match: re.Match[str]) -> str:
    groups = match.groupdict()
    prefix = groups["header"] or groups["bearer"] or groups["key"] or groups["userinfo"]
    return f"{prefix}{_MASK}{groups['at'] or ''}"


def printable(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit``, every unprintable character escaped (``\\u001b``): a caller's
    bytes (a decoded path) never forge a log line or drive a terminal."""
    text = text[:limit]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)


def redact(text: str) -> str:
    """``text`` with anything that looks like a credential replaced by ``[REDACTED]``."""
    return _SECRET.sub(_mask, text)


class _Redacted:
    """An argument whose str and repr had a credential in them, shown redacted either way."""

    __slots__ = ("_repr", "_str")

    def __init__(self, value: object) -> None:
        self._str = redact(str(value))
        self._repr = redact(repr(value))

    def __str__(self) -> str:
        return self._str

    def __repr__(self) -> str:
        return self._repr


def _suspect(text: str) -> bool:
    """Whether ``text`` may hold a credential at all: ten times cheaper than the pattern."""
    lower = text.lower()
    return (
        "sk-" in lower
        or "bearer" in lower
        or "://" in lower
        or "authoriz" in lower
        or "api-key" in lower
        or "x-bf-vk" in lower
    )


def _clean(value: object) -> object:
    if isinstance(value, _SAFE_TYPES):
        return value
    if isinstance(value, str):
        return redact(value) if _suspect(value) and _SECRET.search(value) else value
    text, shown = str(value), repr(value)
    if (_suspect(text) and _SECRET.search(text)) or (_suspect(shown) and _SECRET.search(shown)):
        return _Redacted(value)
    return value


class RedactingFilter(logging.Filter):
    """Defence in depth: redacts credentials from a record's message, arguments, traceback and
    stack before any handler formats it; adds the current trace id while tracing."""

    def __init__(self) -> None:
        super().__init__()
        self._clean_formats: set[str] = set()
        """Format strings known to hold no credential (most are constants)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if isinstance(msg, str) and msg not in self._clean_formats:
            if _suspect(msg) and _SECRET.search(msg):
                # The format itself holds one (or a credential header's name before its
                # placeholder): redact the whole message, placeholders filled in.
                try:
                    record.msg, record.args = redact(record.getMessage()), None
                except (TypeError, ValueError):  # a broken format: its handler will say so
                    record.msg = redact(msg)
            elif record.args and len(self._clean_formats) < 4096:
                self._clean_formats.add(msg)  # a format string, most likely a constant
        elif isinstance(msg, dict):  # python-json-logger takes a dict as the fields
            record.msg = {key: _clean(value) for key, value in msg.items()}
        elif not isinstance(msg, str):
            record.msg = _clean(msg)
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(_clean(arg) for arg in args)
        elif isinstance(args, Mapping):
            record.args = {key: _clean(value) for key, value in args.items()}
        if record.exc_info:
            # Exceptions may carry request headers (aiohttp's RequestInfo): render, then redact.
            if not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text and _suspect(record.exc_text):
            record.exc_text = redact(record.exc_text)
        if record.stack_info and _suspect(record.stack_info):
            record.stack_info = redact(record.stack_info)
        if "trace_id" not in record.__dict__ and (trace_id := tracing.current_trace_id()):
            record.trace_id = trace_id
        return True


class _UtcTimes(logging.Formatter):
    """Times in UTC, ISO 8601 with milliseconds; the seconds part made once a second."""

    _second = -1
    _second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._second_text}.{int(record.msecs):03d}Z"


class TextFormatter(_UtcTimes):
    """``<time> <LEVEL> <logger>: <message>``, one line (a traceback follows on its own)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)


class JsonFormatter(_UtcTimes, MsgspecFormatter):
    """One JSON object a line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    then the record's extra fields (``exc_info`` for a traceback)."""

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


def log_handler(fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """A handler writing ``fmt`` (``text`` or ``json``) lines to ``stream`` (stderr),
    credentials redacted."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())
    return handler


def configure_logging_basic(level: str = "INFO", fmt: str = "text") -> None:
    """Log to stderr at ``level`` in ``fmt`` (``text`` or ``json``), credentials redacted;
    replaces any earlier configuration. Usable before the settings are loaded."""
    logging.basicConfig(level=level, handlers=[log_handler(fmt)], force=True)
    # No format here shows a thread or multiprocessing name; not looking them up makes every
    # record (an access line per request) cheaper, as the logging HOWTO suggests.
    logging.logThreads = False
    logging.logMultiprocessing = False


def configure_logging(settings: Settings) -> None:
    """Logging as the settings say (``SIDECAR_LOG_LEVEL``, ``SIDECAR_LOG_FORMAT``)."""
    configure_logging_basic(settings.log_level, settings.log_format)


def access_log_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of ``web.AppRunner``/``web.run_app`` for the access log
    (``SIDECAR_ACCESS_LOG``)."""
    return {
        "access_log_class": AccessLogger,
        "access_log": logging.getLogger(ACCESS_LOGGER) if settings.access_log else None,
    }


# -- request ids

_SANE_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
_ids = itertools.count(1)
_id_prefix = os.urandom(3).hex()


def _new_process() -> None:
    global _ids, _id_prefix
    _ids = itertools.count(1)
    _id_prefix = os.urandom(3).hex()


os.register_at_fork(after_in_child=_new_process)


def request_id(request: BaseRequest) -> str:
    """The request's id: its ``X-Request-Id`` when that is a plausible id (and no credential),
    else a short one made here (``<process>-<counter>``); the same for every call."""
    known: str | None = request.get(REQUEST_ID)
    if known is not None:
        return known
    given = request.headers.get("X-Request-Id")
    if given is not None and _SANE_ID.fullmatch(given) and not _SECRET.search(given):
        known = given
    else:
        known = f"{_id_prefix}-{next(_ids):x}"
    request[REQUEST_ID] = known
    return known


# -- the access log

_from_middleware: Any = None


def _middleware() -> Any:
    # Imported on first use: the middleware module pulls in the app's state, which the
    # worker's entry point (also configured here) does not need.
    global _from_middleware
    if _from_middleware is None:
        from sidecar import middleware

        _from_middleware = middleware
    return _from_middleware


class AccessLogger(AbstractAccessLogger):
    """One INFO line per answered request, none for probes and metrics; no header values but a
    plausible ``X-Request-Id``. aiohttp makes one per connection and checks ``enabled`` then."""

    __slots__ = ("_label", "_outcome", "_route", "_traced")

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        middleware = _middleware()
        self._outcome = middleware.OUTCOME
        self._route = middleware.ACCESS_ROUTE
        self._label = middleware.outcome_label
        self._traced = tracing.is_enabled()

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
            rid = request_id(request)
            method = request.method
            extra = {
                "method": method,
                "route": route,
                "status": status,
                "outcome": outcome,
                "duration_ms": duration_ms,
                "request_id": rid,
            }
            if self._traced and (trace_id := request.get(tracing.TRACE_ID)):
                extra["trace_id"] = trace_id
            # makeRecord and handle, not info(): no search of the stack for the caller; the
            # line made here: the redacting filter checks one string, not six arguments.
            logger = self.logger
            record = logger.makeRecord(
                logger.name,
                logging.INFO,
                __file__,
                0,
                f"{method} {route} {status} {outcome} {duration_ms:.1f}ms id={rid}",
                (),
                None,
            )
            record.__dict__.update(extra)
            logger.handle(record)
        except Exception:
            self.logger.exception("access log line failed")
