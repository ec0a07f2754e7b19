"""Caller controls and the headers that say what the cache did."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.controls import Rules, parse_rules
from tests.conftest import Emulator, Running
from tests.support import AUTH_A, KEY_A, backdate, get


async def cached(sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession) -> str:
    cid = (await emulator.create(KEY_A))["id"]
    await get(http, f"{sidecar.url}/openai/v1/containers/{cid}")
    return cid


async def test_cache_status_and_age_on_miss_hit_and_collapsed_miss(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    cid = (await emulator.create(KEY_A))["id"]
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    emulator.state.set_latency(100)
    answers = await asyncio.gather(*(get(http, url) for _ in range(5)))
    statuses = sorted(headers["Cache-Status"] for _, _, headers in answers)
    assert statuses[0] == "bifrost-sidecar; fwd=uri-miss; fwd-status=200; stored"
    assert all(s.endswith("; collapsed") for s in statuses[1:])
    assert all("Age" not in headers for _, _, headers in answers)
    emulator.state.set_latency(0)
    _, _, headers = await get(http, url)
    assert headers["Cache-Status"].startswith("bifrost-sidecar; hit; ttl=")
    assert int(headers["Cache-Status"].rsplit("=", 1)[1]) in range(0, 11)
    assert headers["Age"] == "0"


async def test_stale_hit_has_a_negative_ttl(
    start_sidecar: Any, make_settings: Any, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(fresh_ttl_s=0.2, local_ttl_s=0)
    sidecar = await start_sidecar(settings)
    cid = await cached(sidecar, emulator, http)
    await backdate(settings, cid, 1.3)  # 1.1 s past its freshness
    _, body, headers = await get(http, f"{sidecar.url}/openai/v1/containers/{cid}",
                                 {**AUTH_A, "Cache-Control": "max-stale"})  # fmt: skip
    assert headers["Cache-Status"] == "bifrost-sidecar; hit; ttl=-2"
    assert headers["Age"] == "1"
    assert body["extra_fields"]["cache_debug"]["similarity"] < 1


async def test_no_cache_revalidates_and_is_counted_as_a_request_forward(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    cid = await cached(sidecar, emulator, http)
    for headers in ({"Cache-Control": "no-cache"}, {"Pragma": "no-cache"}):
        _, body, answer = await get(http, f"{sidecar.url}/openai/v1/containers/{cid}",
                                    {**AUTH_A, **headers})  # fmt: skip
        assert body["extra_fields"]["cache_debug"]["cache_hit"] is False
        assert answer["Cache-Status"].startswith("bifrost-sidecar; fwd=request; fwd-status=200")
    assert emulator.retrieves(cid) == 3


@pytest.mark.parametrize(
    ("headers", "hit"),
    [
        ({"Cache-Control": "max-age=0"}, False),
        ({"Cache-Control": "max-age=60"}, True),
        ({"Cache-Control": "min-fresh=3600"}, False),
        ({"Cache-Control": "min-fresh=1"}, True),
        ({"x-bf-cache-ttl": "1ms"}, False),
        ({"x-bf-cache-ttl": "5m"}, True),
        ({"x-bf-cache-type": "semantic"}, True),
        ({"x-bf-cache-threshold": "1"}, True),
        # What HTTP libraries send: revalidate, do not store, must-revalidate ignored.
        ({"Cache-Control": "no-cache, no-store, must-revalidate"}, False),
        ({"Cache-Control": "max-age=0, private"}, False),
        ({"Cache-Control": "max-age=soon"}, False),  # malformed: read as max-age=0
        ({"Cache-Control": "max-age=99999999999999999999, immutable"}, True),
        ({"x-bf-cache-ttl": "1h30m"}, True),
        ({"x-bf-cache-ttl": "forever"}, True),  # unreadable: ignored, as the gateway does
        ({"x-bf-cache-threshold": "abc"}, True),
        ({"x-bf-cache-type": "fuzzy"}, False),  # the gateway's cache does no lookup for it
    ],
)
async def test_freshness_requirements(
    sidecar: Running,
    emulator: Emulator,
    http: aiohttp.ClientSession,
    headers: dict[str, str],
    hit: bool,
) -> None:
    cid = await cached(sidecar, emulator, http)
    # Kept: 10 ms for the record to be older than the 1 ms of x-bf-cache-ttl (aging it would
    # take a wait for the sidecar's local copy to hear of it).
    await asyncio.sleep(0.01)
    status, body, _ = await get(http, f"{sidecar.url}/openai/v1/containers/{cid}",
                                {**AUTH_A, **headers})  # fmt: skip
    assert status == 200
    assert body["extra_fields"]["cache_debug"]["cache_hit"] is hit
    assert emulator.retrieves(cid) == (1 if hit else 2)


async def test_only_if_cached_on_a_cold_key_is_504_without_an_upstream_call(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    cid = (await emulator.create(KEY_A))["id"]
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    status, body, _ = await get(http, url, {**AUTH_A, "Cache-Control": "only-if-cached"})
    assert status == 504
    assert body["error"]["code"] == "only_if_cached"
    assert body["is_bifrost_error"] is False
    assert emulator.retrieves(cid) == 0
    await get(http, url)
    status, body, _ = await get(http, url, {**AUTH_A, "Cache-Control": "only-if-cached"})
    assert status == 200
    assert body["extra_fields"]["cache_debug"]["cache_hit"] is True


@pytest.mark.parametrize(
    "headers", [{"Cache-Control": "no-store"}, {"x-bf-cache-no-store": "true"}]
)
async def test_no_store_keeps_the_answer_out_of_the_cache(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    cid = (await emulator.create(KEY_A))["id"]
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    _, _, answer = await get(http, url, {**AUTH_A, **headers})
    assert "stored" not in answer["Cache-Status"]
    _, body, _ = await get(http, url)
    assert body["extra_fields"]["cache_debug"]["cache_hit"] is False
    assert emulator.retrieves(cid) == 2


LENIENT = [
    {"Cache-Control": "max-age=soon"},
    {"Cache-Control": "max-age"},
    {"Cache-Control": "max-stale=-1"},
    {"Cache-Control": "private, bogus-directive"},
    {"x-bf-cache-ttl": "0"},
    {"x-bf-cache-ttl": "forever"},
    {"x-bf-cache-ttl": "-5s"},
    {"x-bf-cache-no-store": "yes"},
    {"x-bf-cache-type": "fuzzy"},
    {"x-bf-cache-threshold": "nan"},
]


@pytest.mark.parametrize("headers", LENIENT)
async def test_values_the_gateway_or_the_rfc_ignore_are_answered_not_refused(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    cid = (await emulator.create(KEY_A))["id"]
    status, body, _ = await get(http, f"{sidecar.url}/openai/v1/containers/{cid}",
                                {**AUTH_A, **headers})  # fmt: skip
    assert status == 200
    assert body["id"] == cid


async def test_ignored_values_are_named_in_cache_status(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    cid = await cached(sidecar, emulator, http)
    headers = {**AUTH_A, "Cache-Control": "max-age=60, private", "x-bf-cache-ttl": "forever"}
    _, body, answer = await get(http, f"{sidecar.url}/openai/v1/containers/{cid}", headers)
    assert body["extra_fields"]["cache_debug"]["cache_hit"] is True
    assert answer["Cache-Status"].endswith('; detail="ignored:cache-control,x-bf-cache-ttl"')


def lines(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    """Headers as aiohttp hands them over: case-insensitive, repeated lines kept apart."""
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_a_request_without_controls_shares_one_rules_object() -> None:
    plain = lines(("Authorization", "Bearer sk-bf-x"), ("Accept", "application/json"))
    assert parse_rules(plain, 0.3) is parse_rules(lines(), 0.3)
    assert parse_rules(plain, 0.3) == Rules(threshold=0.3)


def test_a_plain_mapping_with_lower_case_names_works_too() -> None:
    assert parse_rules({"cache-control": "no-cache"}, 0.0) == Rules(no_cache=True)


@pytest.mark.parametrize(
    ("pairs", "rules"),
    [
        # Every line counts; the last one the gateway can read wins (ctx.go visits them all).
        ((("x-bf-cache-threshold", "0.2"), ("x-bf-cache-threshold", "0.7")), Rules(threshold=0.7)),
        ((("x-bf-cache-threshold", "0.2"), ("x-bf-cache-threshold", "x")),
         Rules(threshold=0.2, ignored=("x-bf-cache-threshold",))),
        ((("x-bf-cache-no-store", "no"), ("x-bf-cache-no-store", "true")),
         Rules(no_store=True, ignored=("x-bf-cache-no-store",))),
        ((("x-bf-cache-type", "fuzzy"), ("x-bf-cache-type", "direct")), Rules()),
        ((("x-bf-cache-ttl", "-1s"), ("x-bf-cache-ttl", "abc")), Rules(ignored=("x-bf-cache-ttl",))),
        # Go's ParseFloat: '_' between digits, hex floats; no sign on NaN, no spaces.
        ((("x-bf-cache-threshold", "0.2_5"),), Rules(threshold=0.25)),
        ((("x-bf-cache-threshold", "_0.25"),), Rules(ignored=("x-bf-cache-threshold",))),
        ((("x-bf-cache-threshold", "0.25_"),), Rules(ignored=("x-bf-cache-threshold",))),
        ((("x-bf-cache-threshold", "0x1P-2"),), Rules(threshold=0.25)),
        ((("x-bf-cache-threshold", "0x1"),), Rules(ignored=("x-bf-cache-threshold",))),
        ((("x-bf-cache-threshold", "-Infinity"),), Rules(threshold=0.0)),
        ((("x-bf-cache-threshold", "+nan"),), Rules(ignored=("x-bf-cache-threshold",))),
        ((("x-bf-cache-threshold", "1e-400"),), Rules(threshold=0.0)),
        ((("x-bf-cache-threshold", "\u0660.\u0665"),), Rules(ignored=("x-bf-cache-threshold",))),
        # Go's Atoi: leading zeros and a sign are fine, other digits than ASCII are not.
        ((("x-bf-cache-ttl", "0030"),), Rules(max_age_s=30.0)),
        ((("x-bf-cache-ttl", "+0"),), Rules(ignored=("x-bf-cache-ttl",))),
        ((("x-bf-cache-ttl", "\u0663\u0660"),), Rules(ignored=("x-bf-cache-ttl",))),
        # Pragma is a list too; only no-cache means something.
        ((("Pragma", "no-cache, x=1"),), Rules(no_cache=True, ignored=("pragma",))),
        ((("Pragma", "No-Cache"),), Rules(no_cache=True)),
    ],
)  # fmt: skip
def test_repeated_lines_and_go_syntax(pairs: tuple[tuple[str, str], ...], rules: Rules) -> None:
    assert parse_rules(lines(*pairs), 0.0) == rules


def test_huge_values_cost_no_more_than_their_length() -> None:
    # No int() of a 100,000-digit number (Python refuses past 4,300 digits anyway): max-age is
    # 2^31 (RFC 9111 1.2.2); Go's Atoi and ParseFloat fail on such numbers: ignored.
    rules = parse_rules(lines(("Cache-Control", "max-age=" + "9" * 100_000),
                              ("x-bf-cache-ttl", "9" * 100_000),
                              ("x-bf-cache-threshold", "9" * 100_000)), 0.0)  # fmt: skip
    assert rules == Rules(max_age_s=2.0**31, ignored=("x-bf-cache-ttl", "x-bf-cache-threshold"))
