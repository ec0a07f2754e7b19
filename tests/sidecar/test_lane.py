"""The hit lane answers what it takes exactly as the routed path would, and takes nothing else."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import HttpVersion10, web
from aiohttp.test_utils import make_mocked_request
from yarl import URL

from sidecar.lane import HitAnswer, hit_answers
from tests.conftest import Emulator, Running
from tests.support import KEY_A, KEY_A2, get

Head = list[tuple[str, str]]


async def raw_get(base: str, target: str, lines: tuple[str, ...] = ()) -> tuple[str, Head, bytes]:
    """One GET over its own connection, as bytes: status line, headers in order, body."""
    url = URL(base)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        request = "\r\n".join((f"GET {target} HTTP/1.1", f"Host: {url.host}", *lines))
        writer.write(request.encode() + b"\r\n\r\n")
        status = (await reader.readline()).decode().rstrip("\r\n")
        head: Head = []
        while (line := (await reader.readline()).decode().rstrip("\r\n")) != "":
            name, _, value = line.partition(": ")
            head.append((name, value))
        body = await reader.readexactly(int(dict(head)["Content-Length"]))
        return status, head, body
    finally:
        writer.close()


async def test_a_lane_hit_is_byte_for_byte_the_routed_hit(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    cid = (await emulator.create(KEY_A))["id"]
    await get(http, f"{sidecar.url}/openai/v1/containers/{cid}")  # miss: stored, copy kept
    auth = f"Authorization: Bearer {KEY_A}"
    for _ in range(3):  # Age and ttl are whole seconds: a pair may straddle a second's end
        lane = await raw_get(sidecar.url, f"/openai/v1/containers/{cid}", (auth,))
        # An unknown query parameter: the lane leaves the request to the router (it ignores it).
        path = f"/openai/v1/containers/{cid}?provider=openai&x=1"
        routed = await raw_get(sidecar.url, path, (auth,))
        if [kv for kv in lane[1] if kv[0] != "Date"] == [kv for kv in routed[1] if kv[0] != "Date"]:
            break
    assert lane[0] == routed[0] == "HTTP/1.1 200 OK"
    assert [name for name, _ in lane[1]] == [name for name, _ in routed[1]]
    assert [kv for kv in lane[1] if kv[0] != "Date"] == [kv for kv in routed[1] if kv[0] != "Date"]
    assert lane[2] == routed[2]
    assert dict(lane[1])["Cache-Status"].startswith("bifrost-sidecar; hit; ttl=")
    assert emulator.retrieves(cid) == 1


def _lane_for(sidecar: Running) -> tuple[Any, list[str]]:
    routed: list[str] = []

    async def router(request: Any) -> web.StreamResponse:
        routed.append(request.raw_path)
        return web.Response(status=299)

    answer = hit_answers(sidecar.app)
    assert answer is not None

    async def lane(request: Any) -> web.StreamResponse:
        return answer(request) or await router(request)

    return lane, routed


async def test_the_lane_takes_only_plain_hits_this_credential_may_see(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    cid = (await emulator.create(KEY_A))["id"]
    other = (await emulator.create(KEY_A))["id"]
    await get(http, f"{sidecar.url}/openai/v1/containers/{cid}")
    lane, routed = _lane_for(sidecar)
    bearer = {"Authorization": f"Bearer {KEY_A}"}

    async def takes(path: str, headers: Any = bearer, **options: Any) -> bool:
        request = make_mocked_request(options.pop("method", "GET"), path, headers, **options)
        return isinstance(await lane(request), HitAnswer)

    for path in (f"/openai/v1/containers/{cid}", f"/openai/containers/{cid}",
                 f"/v1/containers/{cid}?provider=openai"):  # fmt: skip
        assert await takes(path), path
    declined = [
        # not held, or not for this caller
        await takes(f"/openai/v1/containers/{other}"),
        await takes(f"/openai/v1/containers/{cid}", {"Authorization": f"Bearer {KEY_A2}"}),
        await takes(f"/openai/v1/containers/{cid}", {}),
        # the router's to answer (errors included)
        await takes(f"/v1/containers/{cid}"),  # provider required in front of the gateway
        await takes(f"/openai/v1/containers/{cid}?provider=anthropic"),
        await takes(f"/openai/v1/containers/{cid}?provider=openai&x=1"),
        await takes(f"/openai/v1/containers/{cid}?provider=open%61i"),
        await takes(f"/openai/v1/containers/%63{cid[1:]}"),
        await takes(f"/openai/v1/containers/{cid}/files"),
        await takes(f"/openai/v1//containers/{cid}"),
        await takes(f"/openai/v1/containers/{cid}", method="HEAD"),
        await takes(f"/openai/v1/containers/{cid}", method="DELETE"),
        await takes(f"/openai/v1/containers/{cid}", version=HttpVersion10),
        await takes(f"/openai/v1/containers/{cid}", closing=True),
        await takes(f"/openai/v1/containers/{cid}", {**bearer, "Cache-Control": "no-cache"}),
        await takes(f"/openai/v1/containers/{cid}", {**bearer, "Cache-Control": "max-age=1"}),
        await takes(f"/openai/v1/containers/{cid}", {**bearer, "x-bf-cache-threshold": "0.5"}),
        await takes(f"/openai/v1/containers/{cid}", {**bearer, "Expect": "100-continue"}),
        await takes(f"/openai/v1/containers/{cid}", {**bearer, "x-bf-vk": "sk-bf-other"}),
        await takes(
            f"/openai/v1/containers/{cid}",
            [("Authorization", f"Bearer {KEY_A}"), ("Authorization", "Bearer sk-bf-team-b")],
        ),
    ]
    assert not any(declined)
    assert len(routed) == len(declined)


async def test_lane_hits_are_counted_as_routed_hits_are(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    cid = (await emulator.create(KEY_A))["id"]
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    await get(http, url)
    before = await _hits(http, sidecar.url)
    for _ in range(5):
        await raw_get(
            sidecar.url, f"/openai/v1/containers/{cid}", (f"Authorization: Bearer {KEY_A}",)
        )
    for _ in range(3):
        status, body, _ = await get(http, url + "?provider=openai&x=1")
        assert (status, body["extra_fields"]["cache_debug"]["cache_hit"]) == (200, True)
    after = await _hits(http, sidecar.url)
    assert after["requests"] - before["requests"] == 8
    assert after["ages"] - before["ages"] == 8
    assert emulator.retrieves(cid) == 1


async def _hits(http: aiohttp.ClientSession, base: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    async with http.get(f"{base}/metrics") as response:
        text = await response.text()
    found = {"requests": 0.0, "ages": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "sidecar_requests_total" and sample.labels == {
                "route": "/openai/v1/containers/{container_id}",
                "outcome": "hit",
            }:
                found["requests"] += sample.value
            if sample.name == "sidecar_served_data_age_seconds_count":
                found["ages"] += sample.value
    return found


@pytest.mark.parametrize("connection", ["close", "keep-alive"])
async def test_a_lane_hit_keeps_the_connection_as_the_caller_asked(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession, connection: str
) -> None:
    cid = (await emulator.create(KEY_A))["id"]
    await get(http, f"{sidecar.url}/openai/v1/containers/{cid}")
    url = URL(sidecar.url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    request = (f"GET /openai/v1/containers/{cid} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
               f"{KEY_A}\r\nConnection: {connection}\r\n\r\n")  # fmt: skip
    try:
        answers = []
        for _ in range(2):
            writer.write(request.encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            answers.append((head, await reader.readexactly(length)))
            if connection == "close":
                assert b"Connection: close" in head
                assert await reader.read() == b""  # the sidecar closed it
                break
        assert all(b'"cache_hit":true' in body for _, body in answers)
    finally:
        writer.close()


async def test_a_failure_before_routing_is_still_answered_in_the_gateway_shape(
    sidecar: Running,
    emulator: Emulator,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cid = (await emulator.create(KEY_A))["id"]
    await get(http, f"{sidecar.url}/openai/v1/containers/{cid}")  # a copy: the lane takes it

    def broken(*args: Any) -> bytes:
        raise RuntimeError("a bug in the lane")

    monkeypatch.setattr("sidecar.lane.hit_body", broken)
    status, body, headers = await get(http, f"{sidecar.url}/openai/v1/containers/{cid}")
    assert status == 500
    assert headers["Content-Type"] == "application/json"
    assert body["is_bifrost_error"] is True
    assert body["error"]["message"] == "internal error in the sidecar"
    assert "a bug in the lane" in caplog.text  # logged with its traceback, for whoever fixes it
