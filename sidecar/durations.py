"""Go's ``time.ParseDuration``, exactly: the syntax of the gateway's ``x-bf-cache-ttl``.

A port of ``ParseDuration``, ``leadingInt``, ``leadingFraction`` and ``quote`` in Go's
``src/time/format.go``, check for check, so that the sidecar reads a value exactly when the
gateway does: ``300ms``, ``-1.5h``, ``2h45m``, ``+.5us``, ``0``; units ns, us, µs (U+00B5),
μs (U+03BC), ms, s, m, h; no unit only for ``0``. Go's unsigned 64-bit arithmetic is kept
where it shows: the same overflow checks, and the same wraparound of the running total.
"""

from __future__ import annotations

import re

__all__ = ["DurationError", "parse_duration"]

_UNITS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign
    "μs": 1_000,  # U+03BC Greek small letter mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
#: One term: Go's leadingInt, then leadingFraction after a '.', then the unit up to the next term.
_TERM = re.compile(r"([0-9]*)(?:\.([0-9]*))?([^0-9.]*)")
_TOP = 1 << 63  # Go's 1<<63: one past the largest Duration, and the smallest's magnitude
_UINT64 = (1 << 64) - 1


class DurationError(ValueError):
    """A string Go's ``time.ParseDuration`` refuses; the message is Go's own."""


def parse_duration(text: str) -> int:
    """The duration ``text`` denotes, in nanoseconds, as Go's ``time.ParseDuration`` reads it."""
    s = text
    neg = False
    if s and s[0] in "+-":
        neg = s[0] == "-"
        s = s[1:]
    if s == "0":  # Go's special case: a bare zero needs no unit
        return 0
    if not s:
        raise _invalid(text)
    total = 0
    i = 0
    while i < len(s):
        term = _TERM.match(s, i)
        assert term is not None  # every group may be empty
        i = term.end()
        digits, decimals, name = term.groups()
        # leadingInt fails once its running value passes 1<<63, so iff the whole number does
        # (1<<63 has 19 digits: no int() of a long string).
        significant = digits.lstrip("0") or "0"
        if len(significant) > 19:
            raise _invalid(text)
        whole = int(significant)
        if whole > _TOP:
            raise _invalid(text)
        # leadingFraction silently drops the digits past uint64 precision.
        fraction, scale = 0, 1.0
        for digit in decimals or "":
            nxt = fraction * 10 + int(digit)
            if fraction > (_TOP - 1) // 10 or nxt > _TOP:
                break
            fraction, scale = nxt, scale * 10
        if not digits and not decimals:  # no digits, e.g. ".s", "-.s" or "s"
            raise _invalid(text)
        if not name:
            raise DurationError(f"time: missing unit in duration {_quote(text)}")
        unit = _UNITS.get(name)
        if unit is None:
            raise DurationError(f"time: unknown unit {_quote(name)} in duration {_quote(text)}")
        if whole > _TOP // unit:
            raise _invalid(text)
        whole *= unit
        if fraction > 0:
            # Go computes this in float64 ("to be nanosecond accurate for fractions of hours"),
            # then truncates to uint64: Python floats are the same IEEE doubles.
            whole += int(float(fraction) * (float(unit) / scale))
            if whole > _TOP:
                raise _invalid(text)
        # Go's total is a uint64: two terms of exactly 1<<63 wrap it around to 0.
        total = (total + whole) & _UINT64
        if total > _TOP:
            raise _invalid(text)
    if neg:
        return -total
    if total > _TOP - 1:
        raise _invalid(text)
    return total


def _invalid(text: str) -> DurationError:
    return DurationError(f"time: invalid duration {_quote(text)}")


def _quote(text: str) -> str:
    """Go's ``time.quote``: double-quoted, every byte of a non-ASCII or control character as
    ``\\xNN`` (raw bytes arrive as surrogate escapes, the way HTTP headers are decoded)."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    out = ['"']
    for byte in raw:
        if byte >= 0x80 or byte < 0x20:
            out.append(f"\\x{byte:02x}")
        elif byte in (0x22, 0x5C):  # '"' and '\\'
            out.append("\\" + chr(byte))
        else:
            out.append(chr(byte))
    out.append('"')
    return "".join(out)
