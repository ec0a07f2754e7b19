"""A failure reaches only whom its cause concerns; what the upstream answers one caller is that
caller's alone (found by the second outside round: each failed on the code before the fix)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import Emulator, Running, start_app, stop_app
from tests.support import AUTH_A, KEY_A, KEY_B, get

AUTH_B = {"Authorization": f"Bearer {KEY_B}"}
#: What an upstream error names that only its caller may see (OpenAI's 429s name the org).
SECRET = "org-4f2a-of-caller-b"


class Scripted:
    """An upstream that answers retrievals as a test says, and records who asked."""

    def __init__(self) -> None:
        self.status = 200
        self.headers: dict[str, str] = {}
        self.calls: list[dict[str, str]] = []

    async def retrieve(self, request: web.Request) -> web.Response:
        self.calls.append(dict(request.headers))
        cid = request.match_info["cid"]
        if self.status == 200:
            body = {"id": cid, "object": "container", "name": "n", "created_at": 1,
                    "status": "running", "last_active_at": 2,
                    "extra_fields": {"request_type": "container_retrieve", "provider": "openai"}}  # fmt: skip
            return web.json_response(body)
        error = {"is_bifrost_error": False, "status_code": self.status,
                 "error": {"message": f"limit reached for {SECRET}", "type": "requests"}}  # fmt: skip
        return web.json_response(error, status=self.status, headers=self.headers)


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[Scripted, Running]]:
    upstream = Scripted()
    app = web.Application()
    app.router.add_get("/openai/v1/containers/{cid}", upstream.retrieve)
    running = await start_app(app)
    yield upstream, running
    await stop_app(running)


async def test_one_credentials_429_never_reaches_another_credential(
    start_sidecar: Callable[..., Any],
    make_settings: Callable[..., Any],
    emulator: Emulator,
    http: aiohttp.ClientSession,
) -> None:
    sidecar: Running = await start_sidecar(make_settings(local_ttl_s=0))
    cid = (await emulator.create(KEY_A))["id"]
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    assert (await get(http, url))[0] == 200  # A has it cached
    emulator.state.add_fault(kind="status", status=429, retry_after_s=3600, count=1)
    status, _, headers = await get(http, url, AUTH_B)
    assert (status, headers["Retry-After"]) == (429, "3600")  # B's own answer
    emulator.state.reset_stats()
    # A revalidates: the upstream is asked and answers A, not B's 429 from an hour's back-off.
    status, body, headers = await get(http, url, {**AUTH_A, "Cache-Control": "no-cache"})
    assert status == 200
    assert "Retry-After" not in headers
    assert body["id"] == cid
    assert emulator.state.stats()["calls"]["retrieve"] == 1


async def test_a_callers_upstream_error_is_never_served_to_another(
    start_sidecar: Callable[..., Any],
    make_settings: Callable[..., Any],
    scripted: tuple[Scripted, Running],
    http: aiohttp.ClientSession,
) -> None:
    upstream, running = scripted
    sidecar: Running = await start_sidecar(make_settings(upstream_url=running.url, local_ttl_s=0))
    url = f"{sidecar.url}/openai/v1/containers/cntr_shared"
    upstream.status = 503
    status, body, _ = await get(http, url, AUTH_B)
    assert status == 503
    assert SECRET in str(body)  # B sees its own answer
    calls = len(upstream.calls)
    # The upstream is failing: A is shielded from calling it, and told so by the sidecar.
    status, body, headers = await get(http, url, AUTH_A)
    assert status == 503
    assert SECRET not in str(body)
    assert body["error"]["code"] == "upstream_backing_off"
    assert 1 <= int(headers["Retry-After"]) <= 5
    assert len(upstream.calls) == calls


@pytest.mark.parametrize(
    "retry_after",
    ["inf", "1e300", "nan", "-5", "99999999999999999999999", "1.5", "x" * 8000,
     "Wed, 21 Oct 2099 07:28:00 GMT", "Wed, 99 Foo 2099 99:99:99 GMT"],
)  # fmt: skip
@pytest.mark.parametrize("status", [429, 503])
async def test_any_retry_after_an_upstream_sends_is_answered_and_capped(
    start_sidecar: Callable[..., Any],
    make_settings: Callable[..., Any],
    scripted: tuple[Scripted, Running],
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    status: int,
    retry_after: str,
) -> None:
    upstream, running = scripted
    settings = make_settings(upstream_url=running.url, retry_after_max_s=3, local_ttl_s=0,
                             error_backoff_s=1, error_backoff_max_s=1)  # fmt: skip
    sidecar: Running = await start_sidecar(settings)
    url = f"{sidecar.url}/openai/v1/containers/cntr_r"
    upstream.status, upstream.headers = status, {"Retry-After": retry_after}
    with caplog.at_level(logging.WARNING):
        assert (await get(http, url, AUTH_B))[0] == status
        answered, _, headers = await get(http, url, AUTH_A)
    assert answered in (status, 503)
    if answered == 503 and status == 503:  # shielded: the back-off is capped by the setting
        assert 1 <= int(headers["Retry-After"]) <= 3
    assert not [r for r in caplog.records if r.name.startswith("sidecar")], caplog.text


async def test_a_redirect_is_never_followed_with_the_callers_credential(
    start_sidecar: Callable[..., Any],
    make_settings: Callable[..., Any],
    scripted: tuple[Scripted, Running],
    http: aiohttp.ClientSession,
) -> None:
    elsewhere, other = scripted
    app = web.Application()

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"{other.url}{request.path_qs}")

    app.router.add_get("/openai/v1/containers/{cid}", redirect)
    redirecting = await start_app(app)
    try:
        sidecar: Running = await start_sidecar(make_settings(upstream_url=redirecting.url))
        url = f"{sidecar.url}/openai/v1/containers/cntr_moved"
        headers = {**AUTH_A, "x-bf-eh-openai-organization": "org-a"}
        status, body, _ = await get(http, url, headers)
        assert status == 502
        assert body["error"]["code"] == "upstream_malformed_response"
        # Nothing stored: the next caller is not answered from the cache (the upstream
        # misbehaved, so it is shielded for a while).
        status, body, _ = await get(http, url, headers)
        assert status == 503
        assert body["error"]["code"] == "upstream_backing_off"
        assert elsewhere.calls == []
    finally:
        await stop_app(redirecting)


async def test_whether_another_credential_has_a_container_cached_does_not_show(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    cid = (await emulator.create(KEY_A))["id"]
    assert (await get(http, f"{sidecar.url}/openai/v1/containers/{cid}"))[0] == 200
    _, _, cached = await get(http, f"{sidecar.url}/openai/v1/containers/{cid}", AUTH_B)
    _, _, unknown = await get(http, f"{sidecar.url}/openai/v1/containers/cntr_nobody", AUTH_B)
    assert "fwd=uri-miss" in cached["Cache-Status"]
    assert cached["Cache-Status"].replace("stored", "") == unknown["Cache-Status"].replace(
        "stored", ""
    )
