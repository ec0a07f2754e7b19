"""The conformance suite's fixtures: the official SDK drives the sidecar in front of the emulator.

Every test runs in each upstream mode (``openai``: the emulator's OpenAI API; ``bifrost``: its
gateway face), with a real Redis, and where it matters both with the cache warm and with every
request saying ``Cache-Control: no-cache``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from emulator import EmulatorConfig
from sidecar.settings import Settings
from tests.conformance.support import CUSTOM, KEY_A, KEY_A2, REVOKED, Kind, Stack
from tests.conftest import Emulator

MakeStack = Callable[..., Awaitable[Stack]]
MODES = [("openai", "warm"), ("openai", "no-cache"), ("bifrost", "warm"), ("bifrost", "no-cache")]


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    return EmulatorConfig(
        projects=((KEY_A, KEY_A2),),
        revoked_keys=frozenset({REVOKED}),
        custom_providers=((CUSTOM, "openai"),),
    )


@pytest.fixture(autouse=True)
def _frozen_clock(emulator: Emulator) -> None:
    """The emulator's clock stands still unless a test moves it: fields compare exactly."""
    emulator.state.freeze_clock()


@pytest.fixture
async def make_stack(
    emulator: Emulator, start_sidecar: Callable[..., Any], make_settings: Callable[..., Settings]
) -> AsyncIterator[MakeStack]:
    """Start a sidecar of a kind (settings overridable) and hand out SDK clients for it."""
    stacks: list[Stack] = []

    async def make(
        kind: Kind, cache: str = "warm", upstream: Emulator | None = None, **settings: Any
    ) -> Stack:
        upstream = upstream or emulator
        config = make_settings(upstream_kind=kind, upstream_url=upstream.url, **settings)
        stack = Stack(kind, cache, upstream, await start_sidecar(config))  # type: ignore[arg-type]
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        for client in stack.clients:
            await client.close()


@pytest.fixture(params=MODES, ids=["-".join(mode) for mode in MODES])
async def stack(request: pytest.FixtureRequest, make_stack: MakeStack) -> Stack:
    """Each upstream kind, with the cache warm or bypassed by ``Cache-Control: no-cache``."""
    kind, cache = request.param
    return await make_stack(kind, cache)


@pytest.fixture(params=["openai", "bifrost"])
async def kind_stack(request: pytest.FixtureRequest, make_stack: MakeStack) -> Stack:
    """Each upstream kind, cache warm."""
    return await make_stack(request.param)


@pytest.fixture
async def bifrost(make_stack: MakeStack) -> Stack:
    """The gateway kind, cache warm."""
    return await make_stack("bifrost")
