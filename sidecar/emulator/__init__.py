"""An emulator of the OpenAI Containers API, and of the Bifrost gateway's routes in front of it.

A real aiohttp server for local development, tests, benchmarks and demos: projects of API keys,
containers and their files, the Files API, a movable clock, injectable faults, request counters
and a log of what requests carried; its gateway face has configurable providers (custom ones
included) and optional or mandatory virtual keys.
"""

from __future__ import annotations

from sidecar.emulator.app import EMULATOR_STATE, create_emulator_app
from sidecar.emulator.config import EmulatorConfig
from sidecar.emulator.knobs import Fault, FaultKind
from sidecar.emulator.schema import ApiError
from sidecar.emulator.state import EmulatorState

__all__ = [
    "EMULATOR_STATE",
    "ApiError",
    "EmulatorConfig",
    "EmulatorState",
    "Fault",
    "FaultKind",
    "create_emulator_app",
]
