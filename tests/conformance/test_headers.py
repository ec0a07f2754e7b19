"""The header table (docs/headers.md) holds: ``parse_rules`` and ``Cache-Status`` do what it says.

Pure functions, no servers: the rows are requests' header lines, read the way aiohttp hands them
over (a case-insensitive multidict keeping repeated lines apart).
"""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.controls import Rules, parse_rules
from sidecar.headers import cache_headers
from sidecar.outcomes import Outcome
from sidecar.policy import Freshness, State
from sidecar.records import Record
from tests.conformance import header_table
from tests.conformance.header_table import Row

ROWS = header_table.rows()
IDS = [" + ".join(f"{n}: {v}" for n, v in row.lines) or "no headers" for row in ROWS]


@pytest.fixture(autouse=True)
def _frozen_clock() -> None:
    """Overrides the suite's clock fixture: these tests start no emulator."""


def headers_of(row: Row) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(row.lines))


def expected(row: Row, default_threshold: float) -> Rules:
    fields = {"threshold": default_threshold, **(row.rules or {})}
    return Rules(**fields)  # type: ignore[arg-type]


def outcome(kind: str = "hit") -> Outcome:
    record = Record(provider="openai", container_id="cntr_1", status_code=200, body=b"{}",
                    fetched_at_ms=0)  # fmt: skip
    stale = kind == "stale_if_error"
    freshness = Freshness(State.STALE_IF_ERROR if stale else State.FRESH, 0.0 if stale else 1.0,
                          -70.0 if stale else 7.0, 80.0 if stale else 3.0)  # fmt: skip
    return Outcome(kind=kind, record=record, cache_id="id", freshness=freshness,
                   upstream_status=503 if stale else None)  # fmt: skip


def test_docs_headers_md_is_the_rendered_table() -> None:
    text = header_table.DOC.read_text()
    block = text.partition(header_table.BEGIN)[2].partition(header_table.END)[0]
    assert header_table.BEGIN + block + header_table.END == header_table.render_tables(), (
        "docs/headers.md is out of date: run .venv/bin/python -m tests.conformance.header_table "
        "--write"
    )


def test_every_control_header_has_rows() -> None:
    names = {name.lower() for row in ROWS if row.rules is not None for name, _ in row.lines}
    assert names == {"cache-control", "pragma", "x-bf-cache-ttl", "x-bf-cache-threshold",
                     "x-bf-cache-type", "x-bf-cache-no-store", "x-bf-cache-key"}  # fmt: skip


@pytest.mark.parametrize("default_threshold", [0.0, 0.5])
@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_parse_rules_reads_each_row_as_the_table_says(row: Row, default_threshold: float) -> None:
    assert parse_rules(headers_of(row), default_threshold) == expected(row, default_threshold)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_cache_status_reports_what_was_ignored(row: Row) -> None:
    rules = parse_rules(headers_of(row), 0.0)
    status = cache_headers(outcome(), rules=rules)["Cache-Status"]
    ignored = (row.rules or {}).get("ignored")
    if ignored:
        assert isinstance(ignored, tuple)
        assert status == f'bifrost-sidecar; hit; ttl=7; detail="ignored:{",".join(ignored)}"'
    else:
        assert status == "bifrost-sidecar; hit; ttl=7"


def test_one_detail_carries_stale_if_error_and_what_was_ignored() -> None:
    assert cache_headers(outcome("stale_if_error"))["Cache-Status"] == (
        "bifrost-sidecar; fwd=stale; fwd-status=503; ttl=-70; detail=stale-if-error"
    )
    rules = parse_rules(CIMultiDictProxy(CIMultiDict({"x-bf-cache-ttl": "soon",
                                                      "Cache-Control": "private"})), 0.0)  # fmt: skip
    assert cache_headers(outcome("stale_if_error"), rules=rules)["Cache-Status"] == (
        "bifrost-sidecar; fwd=stale; fwd-status=503; ttl=-70; "
        'detail="stale-if-error ignored:cache-control,x-bf-cache-ttl"'
    )


def test_the_detail_never_echoes_a_callers_value() -> None:
    rules = parse_rules(CIMultiDictProxy(CIMultiDict({"Cache-Control": 'x="\\"; evil=1"',
                                                      "x-bf-cache-ttl": 'a"b'})), 0.0)  # fmt: skip
    status = cache_headers(outcome(), rules=rules)["Cache-Status"]
    assert status == 'bifrost-sidecar; hit; ttl=7; detail="ignored:cache-control,x-bf-cache-ttl"'
