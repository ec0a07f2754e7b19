"""``sidecar serve --workers N``: N processes on one port, coherent, counted together, stopped
together."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path

import aiohttp

from tests.conftest import Emulator, free_port
from tests.sidecar.test_retrieve import AUTH_A, KEY_A
from tests.test_lifecycle import BIN, env_for, spawn


async def _wait_up(url: str) -> None:
    deadline = time.monotonic() + 15
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(f"{url}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, "sidecar serve did not start"
            await asyncio.sleep(0.1)


async def _fresh_get(url: str, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
    """A GET on a new connection (so that any of the processes may answer it)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.get(url, headers=headers) as response,
    ):
        return response.status, await response.json()


async def test_processes_share_the_port_stay_coherent_add_up_and_stop_together(
    redis_url: str, emulator: Emulator, tmp_path: Path
) -> None:
    port = free_port()
    env = env_for(redis_url, emulator, SIDECAR_PORT=str(port), SIDECAR_HOST="127.0.0.1")
    env.pop("SIDECAR_SERVICE_API_KEY")
    log = tmp_path / "serve.log"
    server = spawn([str(BIN / "sidecar"), "serve", "--workers", "2"], env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        await _wait_up(url)
        for _ in range(100):
            if len(children := _children(server.pid)) == 2:
                break
            await asyncio.sleep(0.1)
        assert len(children) == 2, log.read_text()
        cid = (await emulator.create(KEY_A))["id"]
        retrieve = f"{url}/openai/v1/containers/{cid}"
        # Every process ends up with its own copy (new connections land on either).
        for _ in range(30):
            status, _ = await _fresh_get(retrieve, AUTH_A)
            assert status == 200
        # A delete through one process reaches the other's copy at once.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.delete(f"{url}/openai/v1/containers/{cid}", headers=AUTH_A) as response:
                assert response.status == 200
            # The announcement takes the channel's delivery time (milliseconds); from then on
            # no process serves its copy.
            waited = 0
            while waited < 100:
                waited += 1
                if (await _fresh_get(retrieve, AUTH_A))[0] == 404:
                    break
                await asyncio.sleep(0.02)
            for _ in range(20):
                status, _ = await _fresh_get(retrieve, AUTH_A)
                assert status == 404
            async with http.get(f"{url}/metrics") as response:
                text = await response.text()
        answered = sum(
            float(value)
            for value in re.findall(
                r'^sidecar_requests_total\{outcome="[^"]+",route="/openai/v1/containers/'
                r'\{container_id\}"\} (\S+)$',
                text,
                re.M,
            )
        )
        assert answered == 50 + waited  # whichever process answered /metrics counts both
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(20)
    assert code == 0, log.read_text()
    assert not any(_alive(child) for child in children)


async def test_a_second_server_on_a_port_in_use_stops_instead_of_sharing_it(
    redis_url: str, emulator: Emulator, tmp_path: Path
) -> None:
    port = free_port()
    env = env_for(redis_url, emulator, SIDECAR_PORT=str(port), SIDECAR_HOST="127.0.0.1")
    first = spawn([str(BIN / "sidecar"), "serve", "--workers", "2"], env, tmp_path / "1.log")
    try:
        await _wait_up(f"http://127.0.0.1:{port}")
        second = spawn([str(BIN / "sidecar"), "serve", "--workers", "2"], env, tmp_path / "2.log")
        code = await asyncio.to_thread(second.wait, 15)
    finally:
        first.send_signal(signal.SIGTERM)
        await asyncio.to_thread(first.wait, 20)
    assert code == 1
    assert "cannot listen on" in (tmp_path / "2.log").read_text()


def _children(pid: int) -> list[int]:
    found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in found]


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()
