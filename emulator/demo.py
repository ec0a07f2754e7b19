"""``sidecar demo``: the emulator, the sidecar and the embedded store on localhost, working."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import aiohttp
from aiohttp import web

from emulator import EmulatorConfig, create_emulator_app
from sidecar.app import create_app
from sidecar.logs import access_log_options
from sidecar.settings import Settings, load_settings
from worker.embedded import start_embedded_worker

__all__ = ["run_demo"]

DEMO_KEY = "sk-bf-demo-key"
DEMO_ADMIN_TOKEN = "demo-admin-token"  # the demo only: never a real token
EMULATOR_LATENCY_MS = 60.0


def run_demo(*, port: int = 8080, once: bool = False, log_settings: Settings | None = None) -> int:
    """Run the demo until Ctrl-C (or, with ``once``, until the requests are shown); the
    sidecar logs (access lines included) as ``log_settings`` say."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_demo(port, once, log_settings))
    return 0


async def _start(
    app: web.Application, port: int, **runner_options: Any
) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, **{"access_log": None, **runner_options})
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    return runner, runner.addresses[0][1]


async def _demo(port: int, once: bool, log_settings: Settings | None) -> None:
    emulator, emulator_port = await _start(
        create_emulator_app(EmulatorConfig(latency_ms=EMULATOR_LATENCY_MS)), 0
    )
    upstream = f"http://127.0.0.1:{emulator_port}"
    settings = load_settings(
        {},
        upstream_kind="bifrost",
        upstream_url=upstream,
        port=port,
        key_secret="demo-only",
        service_api_key=DEMO_KEY,
        admin_token=DEMO_ADMIN_TOKEN,
        access_log=log_settings.access_log if log_settings else True,
    )
    sidecar, sidecar_port = await _start(
        create_app(settings, embedded_worker=start_embedded_worker),
        port,
        **access_log_options(settings),
    )
    base = f"http://127.0.0.1:{sidecar_port}"
    auth = {"Authorization": f"Bearer {DEMO_KEY}"}
    try:
        async with aiohttp.ClientSession(headers=auth) as http:
            async with http.post(
                f"{upstream}/v1/containers", json={"name": "demo", "memory_limit": "1g"}
            ) as response:
                container_id = (await response.json())["id"]
            url = f"{base}/openai/v1/containers/{container_id}"
            print(f"\nemulator (a stand-in for the gateway, {EMULATOR_LATENCY_MS:.0f} ms a call)")
            print(f"  {upstream}  created container {container_id}")
            print(f"sidecar  {base}  (embedded store)\n")
            for attempt in ("first", "second"):
                started = time.perf_counter()
                async with http.get(url, headers={"X-Request-Id": f"demo-{attempt}"}) as response:
                    body = await response.json()
                elapsed_ms = (time.perf_counter() - started) * 1000
                debug = body["extra_fields"].get("cache_debug", {})
                print(
                    f"{attempt:>6} GET {url}\n"
                    f"        -> {response.status} in {elapsed_ms:.1f} ms, status "
                    f"{body.get('status')!r}, cache_debug {json.dumps(debug)}"
                )
        print("\nTry it yourself:")
        print(f"  curl -s -H 'Authorization: Bearer {DEMO_KEY}' {url}")
        print(f"  curl -s -H 'Authorization: Bearer sk-bf-someone-else' {url}   # 404")
        print(f"  curl -s '{base}/v1/containers/{container_id}'   # 401: no credential")
        chat = (
            '{"model": "gpt-4o-mini", "stream": true, '
            '"messages": [{"role": "user", "content": "hi"}]}'
        )
        print(f"  curl -sN -H 'Authorization: Bearer {DEMO_KEY}' "
              f"-H 'Content-Type: application/json' -d '{chat}' "
              f"{base}/openai/v1/chat/completions   # relayed, streamed")  # fmt: skip
        print(f"  curl -s {base}/metrics | grep ^sidecar_requests_total")
        print(f"  curl -s -H 'Authorization: Bearer {DEMO_ADMIN_TOKEN}' {base}/api/cache/stats")
        if not once:
            print("\nCtrl-C stops the demo.")
            await asyncio.Event().wait()
    finally:
        await sidecar.cleanup()
        await emulator.cleanup()
