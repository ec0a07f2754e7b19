"""What tests share besides fixtures: the test credentials, a GET that answers status, body and
headers, and a wait on a condition (no test sleeps in place of one)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp

KEY_A = "sk-bf-team-a"
KEY_A2 = "sk-bf-team-a2"  # same project as KEY_A
KEY_B = "sk-bf-team-b"  # another project
AUTH_A = {"Authorization": f"Bearer {KEY_A}"}


async def get(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], Any]:
    """GET ``url`` (as KEY_A unless ``headers`` say otherwise): status, JSON body, headers."""
    async with http.get(url, headers=headers if headers is not None else AUTH_A) as response:
        return response.status, await response.json(), response.headers


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait until ``predicate()`` holds; fail the test after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
