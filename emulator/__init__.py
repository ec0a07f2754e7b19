"""An emulator of the OpenAI Containers API, and of the Bifrost gateway's routes in front of it.

A real aiohttp server for local development, tests, benchmarks and demos: projects of API keys,
containers and their files, the Files API (uploads streamed to disk), what an app drives through
the same base URL (models, chat completions and responses streamed as server-sent events at a
pace a test sets, audio transcriptions, the realtime websocket), a movable clock, injectable
faults, request counters and a log of what requests carried; its gateway face has
configurable providers (custom ones included) and optional or mandatory virtual keys.
"""

from __future__ import annotations

from emulator.app import EMULATOR_STATE, create_emulator_app
from emulator.config import EmulatorConfig
from emulator.knobs import Fault, FaultKind
from emulator.schema import ApiError
from emulator.state import EmulatorState

__all__ = [
    "EMULATOR_STATE",
    "ApiError",
    "EmulatorConfig",
    "EmulatorState",
    "Fault",
    "FaultKind",
    "create_emulator_app",
]
