"""Everything the cache does not answer is relayed to the upstream as the app sent it: bytes,
headers, bodies both ways, streams, disconnects, redirects, slow clients, a bounded pool."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.relay_routes import family
from tests.conftest import Running, free_port, start_app, stop_app
from tests.sidecar.conftest import Upstream
from tests.support import AUTH_A, KEY_A, get


async def raw(url: str, data: bytes, *, keep_open: bool = False) -> tuple[int, bytes, bytes]:
    """One request written as bytes on a socket: the status, the header block and the body."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    head = await reader.readuntil(b"\r\n\r\n")
    body = await reader.read(1 << 20)
    writer.close()
    return int(head.split(b" ", 2)[1]), head, body


def shape(body: bytes) -> dict[str, Any]:
    """A gateway-shaped error's fields the tests look at."""
    import json

    document = json.loads(body)
    assert isinstance(document["is_bifrost_error"], bool)
    return {"status_code": document["status_code"], "code": document["error"]["code"]}


async def test_query_and_path_bytes_reach_the_upstream_unchanged(
    relay: Running, upstream: Upstream
) -> None:
    target = "/t/q%2Fx/%E2%82%AC?a=%23b&c=%25zz&d=%2541&e=1+2&k=1&k=2&f=%2F&&g"
    status, _, _ = await raw(relay.url, f"GET {target} HTTP/1.1\r\nHost: x\r\n"
                                        "Connection: close\r\n\r\n".encode())  # fmt: skip
    assert status == 200
    assert [seen[1] for seen in upstream.seen] == [target]


async def test_hop_by_hop_headers_stop_at_the_sidecar_both_ways(
    relay: Running, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok", headers={
            "Connection": "X-Hop-Answer", "X-Hop-Answer": "1", "Keep-Alive": "timeout=5",
            "Proxy-Authenticate": "Basic", "X-End-Answer": "1", "Set-Cookie": "a=1"})  # fmt: skip

    upstream.handlers["hop"] = answer
    headers = {"Connection": "keep-alive, X-Hop", "X-Hop": "1", "Keep-Alive": "timeout=5",
               "TE": "trailers", "Proxy-Authorization": "Basic eA==", "X-End": "1",
               "Upgrade": "h2c", **AUTH_A}  # fmt: skip
    async with http.get(f"{relay.url}/t/hop", headers=headers) as response:
        assert response.status == 200
        got = response.headers
    sent = upstream.seen[-1][2]
    for name in ("X-Hop", "Keep-Alive", "TE", "Proxy-Authorization", "Upgrade"):
        assert name not in sent, name
    assert sent["X-End"] == "1"
    assert sent["Authorization"] == AUTH_A["Authorization"]
    assert "Accept-Encoding" not in sent or sent["Accept-Encoding"] == "gzip, deflate"
    for name in ("X-Hop-Answer", "Keep-Alive", "Proxy-Authenticate"):
        assert name not in got, name
    assert got["X-End-Answer"] == "1"
    assert got["Set-Cookie"] == "a=1"


async def test_compressed_bodies_are_relayed_as_they_came(
    relay: Running, upstream: Upstream
) -> None:
    packed = gzip.compress(b'{"token": "x"}' * 5000)

    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(body=packed, headers={"Content-Encoding": "gzip",
                                                  "Content-Type": "application/json"})  # fmt: skip

    upstream.handlers["gz"] = answer
    async with (
        aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=["Accept-Encoding"]) as http,
        http.get(f"{relay.url}/t/gz", headers={"Accept-Encoding": "gzip", **AUTH_A}) as response,
    ):
        assert response.headers["Content-Encoding"] == "gzip"
        assert await response.read() == packed
    assert upstream.seen[-1][2]["Accept-Encoding"] == "gzip"
    # A client that asks for nothing compressed gets nothing asked for on its behalf.
    await raw(relay.url, b"GET /t/plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert "Accept-Encoding" not in upstream.seen[-1][2]


async def test_each_event_of_a_stream_reaches_the_client_before_the_next_is_sent(
    relay: Running, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sent: list[int] = []
    received = [asyncio.Event() for _ in range(4)]

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for n in range(4):
            await response.write(f"data: {n}\n\n".encode())
            sent.append(n)
            await received[n].wait()  # the next event only once the client has this one
        await response.write_eof()
        return response

    upstream.handlers["sse"] = stream
    async with asyncio.timeout(20), http.post(f"{relay.url}/t/sse", json={"stream": True},
                                               headers=AUTH_A) as response:  # fmt: skip
        for n in range(4):
            assert await response.content.readuntil(b"\n\n") == f"data: {n}\n\n".encode()
            assert sent == list(range(n + 1))
            received[n].set()
        assert await response.read() == b""


async def test_a_client_that_goes_away_cancels_the_upstream_call(
    relay: Running, upstream: Upstream
) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    upstream.handlers["hang"] = hang
    host, port = relay.url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /t/hang HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    await asyncio.wait_for(started.wait(), 10)
    writer.close()
    await asyncio.wait_for(cancelled.wait(), 10)


async def test_redirects_are_relayed_never_followed(
    relay: Running, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    async def redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": f"{upstream.url}/t/elsewhere"})

    upstream.handlers["moved"] = redirect
    async with http.get(f"{relay.url}/t/moved", headers=AUTH_A, allow_redirects=False) as r:
        assert r.status == 302
        assert r.headers["Location"] == f"{upstream.url}/t/elsewhere"
    assert [seen[1] for seen in upstream.seen] == ["/t/moved"]


async def test_a_body_that_stalls_gets_408_and_the_upstream_call_is_cancelled(
    start_sidecar: Any, make_settings: Any, upstream: Upstream
) -> None:
    sidecar = await start_sidecar(make_settings(upstream_url=upstream.url,
                                                relay_idle_timeout_s=0.3))  # fmt: skip
    reading, cancelled = asyncio.Event(), asyncio.Event()

    async def read_all(request: web.Request) -> web.StreamResponse:
        reading.set()
        try:
            await request.read()
        except (asyncio.CancelledError, ConnectionError):
            cancelled.set()
            raise
        raise AssertionError("the body cannot have arrived")

    upstream.handlers["upload"] = read_all
    status, _, body = await raw(sidecar.url, b"POST /t/upload HTTP/1.1\r\nHost: x\r\n"
                                             b"Content-Length: 1000\r\n\r\n" + b"x" * 10)  # fmt: skip
    assert status == 408
    assert shape(body) == {"status_code": 408, "code": "request_timeout"}
    await asyncio.wait_for(cancelled.wait(), 10)


async def test_a_full_relay_pool_is_a_503_while_retrievals_still_answer(
    start_sidecar: Any, make_settings: Any, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sidecar = await start_sidecar(make_settings(
        upstream_url=upstream.url, relay_max_connections=1, relay_queue_timeout_s=0.2))  # fmt: skip
    started, release = asyncio.Event(), asyncio.Event()

    async def hold(request: web.Request) -> web.StreamResponse:
        started.set()
        await release.wait()
        return web.Response(text="done")

    upstream.handlers["hold"] = hold
    holding = asyncio.create_task(http.get(f"{sidecar.url}/t/hold", headers=AUTH_A))
    await asyncio.wait_for(started.wait(), 10)
    async with http.get(f"{sidecar.url}/t/other", headers=AUTH_A) as response:
        assert response.status == 503
        assert shape(await response.read()) == {"status_code": 503, "code": "sidecar_overloaded"}
    cid = await upstream.create(KEY_A)
    status, body, _ = await get(http, f"{sidecar.url}/openai/v1/containers/{cid}")
    assert (status, body["id"]) == (200, cid)
    release.set()
    async with await holding as response:
        assert await response.text() == "done"
    async with http.get(f"{sidecar.url}/readyz") as response:
        assert response.status == 200  # the sidecar's own limit is no upstream failure


async def test_expect_100_continue_asks_the_upstream_before_the_body_goes(
    relay: Running, upstream: Upstream
) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        return web.Response(body=await request.read())

    upstream.handlers["echo"] = echo
    host, port = relay.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /t/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                 b"Expect: 100-continue\r\nConnection: close\r\n\r\n")  # fmt: skip
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"hello")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert await reader.read() == b"hello"
    writer.close()
    assert upstream.seen[-1][2]["Expect"] == "100-continue"


async def test_a_large_upload_is_streamed_through_whole(
    relay: Running, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    async def count(request: web.Request) -> web.StreamResponse:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        return web.json_response({"bytes": size})

    upstream.handlers["count"] = count
    chunk, chunks = b"\xa5" * (1 << 20), 64

    async def body() -> AsyncIterator[bytes]:
        for _ in range(chunks):
            yield chunk

    async with http.post(f"{relay.url}/t/count", data=body(), headers=AUTH_A) as response:
        assert await response.json() == {"bytes": chunks * len(chunk)}


async def test_ambiguous_credentials_are_refused_before_anything_is_relayed(
    relay: Running, upstream: Upstream
) -> None:
    status, _, body = await raw(relay.url, b"GET /t/x HTTP/1.1\r\nHost: x\r\nConnection: close"
                                           b"\r\nAuthorization: Bearer sk-bf-a\r\n"
                                           b"Authorization: Bearer sk-bf-b\r\n\r\n")  # fmt: skip
    assert status == 400
    assert shape(body) == {"status_code": 400, "code": "ambiguous_credential"}
    assert upstream.seen == []


async def test_the_relays_own_failures_are_gateway_shaped_and_no_upstream_failure(
    start_sidecar: Any, make_settings: Any, http: aiohttp.ClientSession
) -> None:
    sidecar = await start_sidecar(make_settings(upstream_url=f"http://127.0.0.1:{free_port()}"))
    async with http.post(f"{sidecar.url}/openai/v1/chat/completions", json={},
                         headers=AUTH_A) as response:  # fmt: skip
        assert response.status == 502
        assert shape(await response.read()) == {"status_code": 502,
                                                 "code": "upstream_unavailable"}  # fmt: skip
    async with http.get(f"{sidecar.url}/readyz") as response:
        assert response.status == 200


async def test_a_change_to_a_container_through_the_relay_revalidates_it(
    relay: Running, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    cid = await upstream.create(KEY_A)
    url = f"{relay.url}/openai/v1/containers/{cid}"
    await get(http, url)
    _, body, _ = await get(http, url)
    assert body["extra_fields"]["cache_debug"]["cache_hit"] is True
    form = aiohttp.FormData()
    form.add_field("file", b"data", filename="a.txt")
    async with http.post(f"{url}/files", data=form, headers=AUTH_A) as response:
        assert response.status == 200
    _, body, _ = await get(http, url)
    assert body["extra_fields"]["cache_debug"]["cache_hit"] is False


async def test_an_unknown_route_is_the_upstreams_to_answer(
    relay: Running, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    async with http.delete(f"{upstream.url}/nothing/here", headers=AUTH_A) as direct:
        expected = (direct.status, await direct.read())
    async with http.delete(f"{relay.url}/nothing/here", headers=AUTH_A) as response:
        assert (response.status, await response.read()) == expected  # relayed as it came
    assert expected[0] == 404


async def test_relayed_requests_are_counted_by_family_and_logged_once(
    relay: Running, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    async with http.get(f"{relay.url}/t/x", headers=AUTH_A) as response:
        await response.read()
    async with http.get(f"{relay.url}/metrics") as response:
        text = await response.text()
    assert 'sidecar_relayed_requests_total{family="other",status_class="2xx"} 1.0' in text
    assert 'sidecar_relay_duration_seconds_count{family="other"} 1.0' in text
    assert 'sidecar_requests_total{outcome="bypass",route="passthrough"} 1.0' in text


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/v1/chat/completions", "chat"), ("/openai/v1/responses/r_1/cancel", "responses"),
     ("/openai/deployments/gpt-4o/chat/completions", "chat"), ("/anthropic/v1/messages", "chat"),
     ("/v1/audio/transcriptions", "audio"), ("/openai/v1/realtime", "realtime"),
     ("/openai/files", "files"), ("/genai/v1beta/models/x:generate", "models"),
     ("/openai_passthrough/v1/images/edits", "images"), ("/healthz/x", "other"),
     ("/v1/containers/c/files", "containers"), ("/v1/unheard-of", "other"), ("/", "other")],
)  # fmt: skip
def test_route_families_come_from_a_closed_set(path: str, expected: str) -> None:
    assert family(path) == expected


async def test_an_answer_the_upstream_breaks_off_reaches_the_client_broken_off(
    relay: Running, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    async def break_off(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"partial")
        assert request.transport is not None
        request.transport.close()
        return response

    upstream.handlers["broken"] = break_off
    async with http.get(f"{relay.url}/t/broken", headers=AUTH_A) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


async def test_straight_against_openai_every_prefix_is_v1(
    start_sidecar: Any, make_settings: Any, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sidecar = await start_sidecar(make_settings(upstream_url=upstream.url, upstream_kind="openai"))
    for prefix in ("/openai/v1", "/openai", "/v1"):
        async with http.get(f"{sidecar.url}{prefix}/t/x?a=%2B", headers=AUTH_A) as response:
            assert response.status == 200
    assert [seen[1] for seen in upstream.seen] == ["/v1/t/x?a=%2B"] * 3


async def test_the_sidecars_admin_token_is_never_relayed(
    start_sidecar: Any, make_settings: Any, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    # Found: an admin call with a typo in its path (a trailing slash, another method) reached
    # the upstream with the sidecar's admin token.
    sidecar = await start_sidecar(make_settings(upstream_url=upstream.url, admin_token="admintok"))
    for method, path in [("POST", "/api/cache/stats"), ("GET", "/api/cache/stats/"),
                         ("GET", "/t/anything"), ("GET", "/metrics/")]:  # fmt: skip
        headers = {"Authorization": "Bearer admintok"}
        async with http.request(method, f"{sidecar.url}{path}", headers=headers) as response:
            assert response.status == 403, path
            body = await response.json()
        assert body["error"]["code"] == "forbidden"
        assert "request_type" not in body["extra_fields"]  # it is no container_retrieve
        assert "admintok" not in str(body)
    assert upstream.seen == []


async def test_a_deleted_container_is_gone_from_the_cache_before_the_delete_is_answered(
    start_sidecar: Any, make_settings: Any, http: aiohttp.ClientSession
) -> None:
    # Found: a client that acted on a DELETE's status line, before its body, could be served
    # the deleted container from the cache by another replica.
    body_sent = asyncio.Event()

    async def retrieve(request: web.Request) -> web.Response:
        return web.json_response({"id": request.match_info["cid"], "object": "container",
                                  "name": "n", "created_at": 1, "status": "running"})  # fmt: skip

    async def delete(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await body_sent.wait()  # the body comes later: only the status line is out
        await response.write(b'{"deleted": true}')
        return response

    app = web.Application()
    app.router.add_get("/openai/v1/containers/{cid}", retrieve)
    app.router.add_delete("/openai/v1/containers/{cid}", delete)
    gateway = await start_app(app)
    try:
        sidecar = await start_sidecar(make_settings(upstream_url=gateway.url))
        other = await start_sidecar(make_settings(upstream_url=gateway.url))
        url = "/openai/v1/containers/cntr_gone"
        assert (await get(http, sidecar.url + url))[0] == 200
        assert (await get(http, other.url + url))[0] == 200
        async with http.delete(sidecar.url + url, headers=AUTH_A) as response:
            assert response.status == 200  # the head only
            cached = {**AUTH_A, "Cache-Control": "only-if-cached, max-stale=600"}
            for replica in (sidecar, other):
                assert (await get(http, replica.url + url, cached))[0] == 504
            body_sent.set()
            await response.read()
    finally:
        body_sent.set()
        await stop_app(gateway)
