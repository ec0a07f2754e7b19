"""``parse_duration`` reads exactly what Go's ``time.ParseDuration`` reads (the gateway's TTL syntax).

The tables are Go's own (``src/time/time_test.go``: ``parseDurationTests``,
``parseDurationErrorTests``, ``TestParseDurationRoundTrip``); the properties check the port
against an exact reference and against Go's ``Duration.String``.
"""

from __future__ import annotations

import re
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.durations import DurationError, parse_duration

NS, US, MS, S = 1, 1_000, 1_000_000, 1_000_000_000
M, H = 60 * S, 3600 * S
MIN, MAX = -(1 << 63), (1 << 63) - 1

# Go's parseDurationTests, verbatim.
GO_PARSE_DURATION_TESTS = [
    # simple
    ("0", 0),
    ("5s", 5 * S),
    ("30s", 30 * S),
    ("1478s", 1478 * S),
    # sign
    ("-5s", -5 * S),
    ("+5s", 5 * S),
    ("-0", 0),
    ("+0", 0),
    # decimal
    ("5.0s", 5 * S),
    ("5.6s", 5 * S + 600 * MS),
    ("5.s", 5 * S),
    (".5s", 500 * MS),
    ("1.0s", 1 * S),
    ("1.00s", 1 * S),
    ("1.004s", 1 * S + 4 * MS),
    ("1.0040s", 1 * S + 4 * MS),
    ("100.00100s", 100 * S + 1 * MS),
    # different units
    ("10ns", 10 * NS),
    ("11us", 11 * US),
    ("12µs", 12 * US),  # U+00B5
    ("12μs", 12 * US),  # U+03BC
    ("13ms", 13 * MS),
    ("14s", 14 * S),
    ("15m", 15 * M),
    ("16h", 16 * H),
    # composite durations
    ("3h30m", 3 * H + 30 * M),
    ("10.5s4m", 4 * M + 10 * S + 500 * MS),
    ("-2m3.4s", -(2 * M + 3 * S + 400 * MS)),
    ("1h2m3s4ms5us6ns", 1 * H + 2 * M + 3 * S + 4 * MS + 5 * US + 6 * NS),
    ("39h9m14.425s", 39 * H + 9 * M + 14 * S + 425 * MS),
    # large value
    ("52763797000ns", 52763797000 * NS),
    # more than 9 digits after decimal point, see https://golang.org/issue/6617
    ("0.3333333333333333333h", 20 * M),
    # 9007199254740993 = 1<<53+1 cannot be stored precisely in a float64
    ("9007199254740993ns", ((1 << 53) + 1) * NS),
    # largest duration that can be represented by int64 in nanoseconds
    ("9223372036854775807ns", MAX),
    ("9223372036854775.807us", MAX),
    ("9223372036s854ms775us807ns", MAX),
    ("-9223372036854775808ns", MIN),
    ("-9223372036854775.808us", MIN),
    ("-9223372036s854ms775us808ns", MIN),
    # largest negative value
    ("-9223372036854775808ns", MIN),
    # largest negative round trip value, see https://golang.org/issue/48629
    ("-2562047h47m16.854775808s", MIN),
    # huge string; issue 15011.
    ("0.100000000000000000000h", 6 * M),
    # This value tests the first overflow check in leadingFraction.
    ("0.830103483285477580700h", 49 * M + 48 * S + 372539827 * NS),
]

# Go's parseDurationErrorTests, verbatim: Go's byte strings become surrogate escapes, the way
# a header's undecodable bytes reach Python.
GO_PARSE_DURATION_ERROR_TESTS = [
    # invalid
    ("", '""'),
    ("3", '"3"'),
    ("-", '"-"'),
    ("s", '"s"'),
    (".", '"."'),
    ("-.", '"-."'),
    (".s", '".s"'),
    ("+.s", '"+.s"'),
    ("1d", '"1d"'),
    ("\udc85\udc85", r'"\x85\x85"'),
    ("\udcffff", r'"\xffff"'),
    ("hello \udcffff world", r'"hello \xffff world"'),
    ("\ufffd", r'"\xef\xbf\xbd"'),  # utf8.RuneError
    ("\ufffd hello \ufffd world", r'"\xef\xbf\xbd hello \xef\xbf\xbd world"'),  # utf8.RuneError
    # overflow
    ("9223372036854775810ns", '"9223372036854775810ns"'),
    ("9223372036854775808ns", '"9223372036854775808ns"'),
    ("-9223372036854775809ns", '"-9223372036854775809ns"'),
    ("9223372036854776us", '"9223372036854776us"'),
    ("3000000h", '"3000000h"'),
    ("9223372036854775.808us", '"9223372036854775.808us"'),
    ("9223372036854ms775us808ns", '"9223372036854ms775us808ns"'),
]


@pytest.mark.parametrize(("text", "want"), GO_PARSE_DURATION_TESTS)
def test_gos_parse_duration_table(text: str, want: int) -> None:
    assert parse_duration(text) == want


@pytest.mark.parametrize(("text", "expect"), GO_PARSE_DURATION_ERROR_TESTS)
def test_gos_parse_duration_error_table(text: str, expect: str) -> None:
    with pytest.raises(DurationError) as error:
        parse_duration(text)
    assert expect in str(error.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1", 'time: missing unit in duration "1"'),
        ("1.5", 'time: missing unit in duration "1.5"'),
        ("30S", 'time: unknown unit "S" in duration "30S"'),
        ("1µ", r'time: unknown unit "\xc2\xb5" in duration "1\xc2\xb5"'),
        ('1"s', r'time: unknown unit "\"s" in duration "1\"s"'),
        (" 1s", 'time: invalid duration " 1s"'),
        ("1s ", 'time: unknown unit "s " in duration "1s "'),
        ("1.5.5s", 'time: missing unit in duration "1.5.5s"'),
        ("٣s", r'time: invalid duration "\xd9\xa3s"'),  # only ASCII digits are digits
        ("--1s", 'time: invalid duration "--1s"'),
    ],
)
def test_error_messages_are_gos(text: str, message: str) -> None:
    with pytest.raises(DurationError, match="^" + re.escape(message) + "$"):
        parse_duration(text)


def test_round_trip_of_the_extremes() -> None:
    # TestParseDurationRoundTrip: Duration(math.MaxInt64).String() and MinInt64 parse back.
    assert parse_duration("2562047h47m16.854775807s") == MAX
    assert parse_duration("-2562047h47m16.854775808s") == MIN


def test_the_running_total_wraps_like_gos_uint64() -> None:
    # Go adds each term to a uint64 and checks for > 1<<63 after the addition: two terms of
    # exactly 1<<63 wrap it to 0 and pass. Nobody sends this; it shows the port is literal.
    assert parse_duration("9223372036854775808ns9223372036854775808ns") == 0
    assert parse_duration("-9223372036854775808ns9223372036854775808ns1s") == -S
    with pytest.raises(DurationError):
        parse_duration("9223372036854775808ns1ns")


def go_string(d: int) -> str:
    """Go's ``Duration.String`` (``src/time/time.go``), for the round-trip property."""
    if d == 0:
        return "0s"
    sign, u = ("-" if d < 0 else ""), abs(d)
    if u < S:
        if u < US:
            return f"{sign}{u}ns"
        prec, unit = (3, "µs") if u < MS else (6, "ms")
        return f"{sign}{_fixed(u, prec)}{unit}"
    seconds, text = divmod(u, S)
    out = _fixed(seconds % 60 * S + text, 9) + "s"
    minutes = seconds // 60
    if minutes:
        out = f"{minutes % 60}m{out}"
        if minutes // 60:
            out = f"{minutes // 60}h{out}"
    return sign + out


def _fixed(value: int, prec: int) -> str:
    whole, frac = divmod(value, 10**prec)
    digits = f"{frac:0{prec}d}".rstrip("0")
    return f"{whole}.{digits}" if digits else str(whole)


@given(st.integers(min_value=MIN, max_value=MAX))
def test_every_duration_round_trips_through_gos_string(d: int) -> None:
    assert parse_duration(go_string(d)) == d


_UNIT_NS = {"ns": NS, "us": US, "µs": US, "μs": US, "ms": MS, "s": S, "m": M, "h": H}
_term = st.tuples(
    st.text("0123456789", max_size=12),
    st.one_of(st.none(), st.text("0123456789", max_size=12)),
    st.sampled_from(sorted(_UNIT_NS)),
).filter(lambda t: bool(t[0] or t[1]))


@given(st.sampled_from(["", "+", "-"]), st.lists(_term, min_size=1, max_size=4))
def test_well_formed_strings_parse_to_their_exact_value(
    sign: str, terms: list[tuple[str, str | None, str]]
) -> None:
    text = sign + "".join(w + ("" if f is None else "." + f) + u for w, f, u in terms)
    exact = sum(
        ((int(w or "0") + Fraction(int(f or "0"), 10 ** len(f or ""))) * _UNIT_NS[u]
         for w, f, u in terms),
        Fraction(0),
    )  # fmt: skip
    # Go computes each fraction in float64 and truncates it: within a nanosecond per term.
    slack = len(terms)
    if exact > (1 << 63) + slack:
        with pytest.raises(DurationError):
            parse_duration(text)
    elif exact <= MAX - slack:
        got = parse_duration(text)
        assert abs(abs(got) - exact) <= slack
        assert got == (-abs(got) if sign == "-" else abs(got))


@given(st.text(max_size=16))
def test_anything_accepted_is_in_range_and_carries_units(text: str) -> None:
    try:
        value = parse_duration(text)
    except DurationError:
        return
    assert MIN <= value <= MAX
    body = text[1:] if text[:1] in "+-" else text
    assert body == "0" or body[-1] in "smh"
