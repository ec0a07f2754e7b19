"""An emulator of the OpenAI Containers API, and of the Bifrost gateway's routes in front of it.

A real aiohttp server for local development, tests, benchmarks and demos: projects of API keys,
containers and their files, a movable clock, injectable faults and request counters.
"""

from __future__ import annotations

from sidecar.emulator.app import EMULATOR_STATE, create_emulator_app
from sidecar.emulator.schema import ApiError
from sidecar.emulator.state import EmulatorConfig, EmulatorState, Fault, FaultKind

__all__ = [
    "EMULATOR_STATE",
    "ApiError",
    "EmulatorConfig",
    "EmulatorState",
    "Fault",
    "FaultKind",
    "create_emulator_app",
]
