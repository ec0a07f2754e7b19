"""What a caller asks of the cache: ``Cache-Control`` (RFC 9111) and the gateway's own headers.

Nothing here refuses a request: the gateway silently drops an ``x-bf-cache-*`` value it cannot
read (``transports/bifrost-http/lib/ctx.go``) and RFC 9111 section 5.2 has a cache ignore what
it does not understand. Each value is read exactly as the gateway reads it (Go's ParseDuration,
ParseFloat, Atoi); what was not taken as written is listed in ``Rules.ignored``, which
``Cache-Status`` reports as ``detail``. Every header: docs/headers.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import msgspec
from multidict import istr

from sidecar.durations import DurationError, parse_duration
from sidecar.policy import Freshness, State

__all__ = ["CONTROL_HEADERS", "Rules", "parse_rules"]

#: RFC 9111 section 1.2.2: a delta-seconds too large to represent is taken as 2^31.
_DELTA_MAX = float(2**31)
_INT64_MAX = (1 << 63) - 1


class Rules(msgspec.Struct, frozen=True, gc=False):
    """One request's cache rules: the lowest freshness (``cache_debug.similarity``) accepted,
    RFC 9111's request directives (``x-bf-cache-ttl`` acts as a ``max-age``), and the control
    headers, in ``CONTROL_HEADERS`` order, with a value not taken as written."""

    threshold: float = 0.0
    no_cache: bool = False
    no_store: bool = False
    only_if_cached: bool = False
    max_age_s: float | None = None
    max_stale_s: float | None = None  # inf: max-stale without a value
    min_fresh_s: float | None = None
    ignored: tuple[str, ...] = ()

    def admits(self, freshness: Freshness) -> bool:
        """Whether a record this fresh may answer the request."""
        if freshness.similarity < self.threshold:
            return False
        if self.max_age_s is not None and freshness.age_s > self.max_age_s:
            return False
        if self.min_fresh_s is not None and freshness.ttl_s < self.min_fresh_s:
            return False
        return not (
            freshness.state is not State.FRESH
            and self.max_stale_s is not None
            and -freshness.ttl_s > self.max_stale_s
        )


_PLAIN: dict[float, Rules] = {}


def parse_rules(headers: Mapping[str, str], default_threshold: float) -> Rules:
    """The rules of a request's headers; never raises: what cannot be read is ignored and
    listed in ``Rules.ignored``."""
    for name in CONTROL_HEADERS:
        if name in headers:
            return _Draft(default_threshold).read(headers)
    # The hot path: no control header at all. One shared Rules per threshold (one setting).
    rules = _PLAIN.get(default_threshold)
    if rules is None:
        if len(_PLAIN) > 16:
            _PLAIN.clear()
        rules = _PLAIN[default_threshold] = Rules(default_threshold)
    return rules


class _Draft:
    """Rules being read from one request's headers (defaults as class attributes: a draft
    costs only what a request sets)."""

    no_cache = no_store = only_if_cached = False
    max_age_s: float | None = None
    max_stale_s: float | None = None
    min_fresh_s: float | None = None
    ignored: tuple[str, ...] = ()
    understood = False  # Cache-Control held a directive this cache understands

    def __init__(self, default_threshold: float) -> None:
        self.threshold = default_threshold

    def read(self, headers: Mapping[str, str]) -> Rules:
        # aiohttp keeps a header's repeated lines apart: read them all, in order.
        getall = getattr(headers, "getall", None)
        for name, reader in _READERS:
            if name in headers:
                reader(self, getall(name) if getall is not None else [headers[name]])
        return Rules(
            self.threshold,
            self.no_cache,
            self.no_store,
            self.only_if_cached,
            self.max_age_s,
            self.max_stale_s,
            self.min_fresh_s,
            self.ignored,
        )

    def _ignore(self, name: str) -> None:
        if name not in self.ignored:
            self.ignored += (name,)

    # RFC 9111 section 4.2.1: of repeated or conflicting directives, honour the most
    # restrictive (written for responses; the same reading keeps requests safe).
    def _max_age(self, seconds: float) -> None:
        self.max_age_s = seconds if self.max_age_s is None else min(self.max_age_s, seconds)

    def _max_stale(self, seconds: float) -> None:
        self.max_stale_s = seconds if self.max_stale_s is None else min(self.max_stale_s, seconds)

    def _min_fresh(self, seconds: float) -> None:
        self.min_fresh_s = seconds if self.min_fresh_s is None else max(self.min_fresh_s, seconds)

    def _cache_control(self, lines: list[str]) -> None:
        """RFC 9111 section 5.2.1: the request directives."""
        for line in lines:
            for member in _members(line):
                name, eq, raw = member.partition("=")
                name = name.strip().lower()
                if name:
                    if not self._directive(name, _unquote(raw.strip()) if eq else None):
                        self._ignore("cache-control")
                elif eq or raw.strip():  # "=5": not a directive
                    self._ignore("cache-control")
                # else an empty list element, which RFC 9110 section 5.6.1 has recipients skip

    def _directive(self, name: str, argument: str | None) -> bool:
        """Apply one directive; False when it (or its argument) was not taken as written."""
        if name == "no-cache":
            self.no_cache = self.understood = True
        elif name == "no-store":
            self.no_store = self.understood = True
        elif name == "only-if-cached":
            self.only_if_cached = self.understood = True
        elif name == "no-transform":
            # RFC 9110 section 7.7: the sidecar transforms no content; the directive holds.
            self.understood = True
        elif name == "max-age" or name == "min-fresh":
            self.understood = True
            seconds = _delta_seconds(argument)
            if seconds is None:
                # A malformed limit (max-age=soon, max-age=-1) is read as the strictest (RFC 9111
                # 4.2.1): the worst case is one upstream call, never data too old.
                if name == "max-age":
                    self._max_age(0.0)
                else:
                    self._min_fresh(_DELTA_MAX)
                return False
            if name == "max-age":
                self._max_age(seconds)
            else:
                self._min_fresh(seconds)
            return True
        elif name == "max-stale":
            self.understood = True
            if argument is None:  # 5.2.1.2: without a value, any staleness is accepted
                self._max_stale(math.inf)
                return True
            seconds = _delta_seconds(argument)
            if seconds is None:
                return False  # a malformed max-stale could only loosen the rules: ignore it
            self._max_stale(seconds)
            return True
        else:
            # 5.2: "A cache MUST ignore unrecognized cache directives": response directives,
            # RFC 5861's stale-if-error (the sidecar's own window applies), extensions.
            return False
        # no-cache, no-store, only-if-cached and no-transform take no argument (5.2.1.4-7):
        # one given is ignored, the directive still applies.
        return argument is None

    def _pragma(self, lines: list[str]) -> None:
        """RFC 7234 section 5.4: with no understood Cache-Control, ``Pragma: no-cache`` means
        ``Cache-Control: no-cache``; other pragmas are ignored."""
        if self.understood:
            return  # "When the Cache-Control header field is also present and understood"
        for line in lines:
            for member in _members(line):
                name, eq, _ = member.partition("=")
                name = name.strip().lower()
                if name == "no-cache" and not eq:
                    self.no_cache = True
                elif name or eq:
                    self._ignore("pragma")

    def _ttl(self, lines: list[str]) -> None:
        """ctx.go reads every line; the last one it can read wins. plugins/semanticcache
        (main.go, ``resolveTTL``) then ignores a TTL that is not > 0."""
        ttl_ns = None
        for line in lines:
            read = _gateway_ttl_ns(line)
            if read is None:
                self._ignore("x-bf-cache-ttl")
            else:
                ttl_ns = read
        if ttl_ns is not None and ttl_ns <= 0:
            self._ignore("x-bf-cache-ttl")
        elif ttl_ns is not None:
            # Records are shared: a TTL is the oldest data this caller accepts, like a max-age.
            self._max_age(ttl_ns / 1e9)

    def _threshold(self, lines: list[str]) -> None:
        """ctx.go: ``strconv.ParseFloat(value, 64)``, clamped to [0, 1]; unreadable: ignored."""
        for line in lines:
            value = _go_parse_float(line)
            if value is None:
                self._ignore("x-bf-cache-threshold")
            else:
                self.threshold = min(1.0, max(0.0, value))

    def _type(self, lines: list[str]) -> None:
        """ctx.go keeps the last line; plugins/semanticcache (``PreLLMHook``) looks up for
        exactly "direct" or "semantic" (here both are exact lookups), and not at all otherwise."""
        if lines[-1] not in ("direct", "semantic"):
            # No lookup, as in the gateway: fetched and stored. Reported: most likely a typo.
            self.no_cache = True
            self._ignore("x-bf-cache-type")

    def _no_store(self, lines: list[str]) -> None:
        """ctx.go: exactly "true" skips storing; any other value is ignored."""
        for line in lines:
            if line == "true":
                self.no_store = True
            elif line != "false":  # "false" asks for the default: nothing ignored
                self._ignore("x-bf-cache-no-store")

    def _key(self, lines: list[str]) -> None:
        """The semantic cache's namespace (ctx.go): a container's key is its id, so ignored."""
        self._ignore("x-bf-cache-key")


#: Each control header and its reader, in ``Rules.ignored`` order (``istr``: cheaper lookups).
_READERS = (
    (istr("cache-control"), _Draft._cache_control),
    (istr("pragma"), _Draft._pragma),
    (istr("x-bf-cache-ttl"), _Draft._ttl),
    (istr("x-bf-cache-threshold"), _Draft._threshold),
    (istr("x-bf-cache-type"), _Draft._type),
    (istr("x-bf-cache-no-store"), _Draft._no_store),
    (istr("x-bf-cache-key"), _Draft._key),
)
#: The request headers that control the cache.
CONTROL_HEADERS = tuple(name for name, _ in _READERS)


def _members(value: str) -> list[str]:
    """The members of a comma-separated list (RFC 9110 section 5.6.1), commas inside
    quoted strings (5.6.4) included in their member."""
    if '"' not in value:
        return value.split(",")
    members, start, quoted, escaped = [], 0, False, False
    for i, char in enumerate(value):
        if escaped:
            escaped = False
        elif quoted:
            escaped = char == "\\"
            quoted = char != '"'
        elif char == '"':
            quoted = True
        elif char == ",":
            members.append(value[start:i])
            start = i + 1
    members.append(value[start:])
    return members


_QUOTED_PAIR = re.compile(r"\\(.)")


def _unquote(argument: str) -> str:
    """A directive's argument: RFC 9111 section 5.2 has recipients accept the quoted-string
    form as well as the token form. A broken quoted string stays as it is (and fails)."""
    if len(argument) >= 2 and argument[0] == argument[-1] == '"':
        return _QUOTED_PAIR.sub(r"\1", argument[1:-1])
    return argument


def _delta_seconds(argument: str | None) -> float | None:
    """RFC 9111 section 1.2.2: ``1*DIGIT``; too large to represent is 2^31."""
    if not argument or not (argument.isascii() and argument.isdigit()):
        return None
    digits = argument.lstrip("0") or "0"
    return _DELTA_MAX if len(digits) > 10 else min(float(digits), _DELTA_MAX)


def _gateway_ttl_ns(value: str) -> int | None:
    """ctx.go: ``time.ParseDuration(value)``, else ``strconv.Atoi(value)`` seconds if > 0."""
    try:
        return parse_duration(value)
    except DurationError:
        pass
    seconds = _go_atoi(value)
    if seconds is None or seconds <= 0:
        return None
    # Go wraps past 292 years in int64; taken as written here (as good as no limit).
    return seconds * 1_000_000_000


def _go_atoi(value: str) -> int | None:
    """Go's ``strconv.Atoi``: ``[+-]?[0-9]+`` within int64."""
    body = value[1:] if value[:1] in ("+", "-") else value
    if not (body and body.isascii() and body.isdigit()):
        return None
    digits = body.lstrip("0") or "0"
    if len(digits) > 19:
        return None
    number = -int(digits) if value[0] == "-" else int(digits)
    return number if -_INT64_MAX - 1 <= number <= _INT64_MAX else None


_DIGITS = frozenset("0123456789_")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF_")


def _go_float_mantissa(value: str) -> tuple[str, bool] | None:
    """The mantissa of a Go float literal as ParseFloat reads it (atof.go ``readFloat``) and
    whether it is hexadecimal; None if ``value`` is not one. A scanner, not a regex: a
    backtracking pattern took seconds on 8 KB of caller-controlled digits."""
    end = len(value)
    i = 1 if value[:1] in ("+", "-") else 0
    hexadecimal = value[i : i + 2] in ("0x", "0X")
    if hexadecimal:
        i += 2
    digits = _HEX_DIGITS if hexadecimal else _DIGITS
    start = i
    while i < end and value[i] in digits:
        i += 1
    if i < end and value[i] == ".":
        i += 1
        while i < end and value[i] in digits:
            i += 1
    mantissa = value[start:i]
    if i < end and value[i] in ("pP" if hexadecimal else "eE"):
        i += 1
        if i < end and value[i] in "+-":
            i += 1
        if not (i < end and "0" <= value[i] <= "9"):
            return None
        while i < end and value[i] in _DIGITS:
            i += 1
    elif hexadecimal:
        return None
    return (mantissa, hexadecimal) if i == end else None


def _go_parse_float(value: str) -> float | None:
    """Go's ``strconv.ParseFloat(value, 64)``; None where Go fails, and for NaN."""
    body = value[1:] if value[:1] in ("+", "-") else value
    if body.lower() in ("inf", "infinity"):  # atof.go ``special``: signed, any case
        return -math.inf if value[0] == "-" else math.inf
    # Go also reads "NaN", which would admit everything: no one means that, so it is ignored.
    parts = _go_float_mantissa(value)
    if parts is None:
        return None
    mantissa, hexadecimal = parts
    if not mantissa.strip("._") or ("_" in value and not _go_underscores_ok(value)):
        return None
    plain = value.replace("_", "")
    try:
        number = float.fromhex(plain) if hexadecimal else float(plain)
    except OverflowError:
        return None
    # Go answers ±Inf with ErrRange for a finite literal beyond float64, which ctx.go ignores.
    return None if math.isinf(number) else number


def _go_underscores_ok(value: str) -> bool:
    """Go's ``underscoreOK`` (strconv/atoi.go): '_' only between digits, or after '0x'."""
    text = value[1:] if value[:1] in ("+", "-") else value
    saw, i, hexadecimal = "^", 0, False
    if len(text) >= 2 and text[0] == "0" and text[1] in "bBoOxX":
        saw, i, hexadecimal = "0", 2, text[1] in "xX"
    for char in text[i:]:
        if "0" <= char <= "9" or (hexadecimal and char in "abcdefABCDEF"):
            saw = "0"
        elif char == "_":
            if saw != "0":
                return False
            saw = "_"
        elif saw == "_":
            return False
        else:
            saw = "!"
    return saw != "_"
