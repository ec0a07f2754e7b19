"""The commands as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], env={**clean, **(env or {})}, capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip


def test_the_demo_shows_a_miss_then_a_hit() -> None:
    result = run("sidecar", "demo", "--once", "--port", "0")
    assert result.returncode == 0, result.stderr
    assert '"cache_hit": false' in result.stdout
    assert '"cache_hit": true' in result.stdout
    assert "curl -s -H 'Authorization: Bearer sk-bf-demo-key'" in result.stdout
    assert "embedded in-process store" in result.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "SIDECAR_UPSTREAM_URL: required"),
        ({"SIDECAR_UPSTREAM_URL": "http://gw:8080", "SIDECAR_FRESH_TTL_S": "soon"},
         "SIDECAR_FRESH_TTL_S:"),
        ({"SIDECAR_UPSTREAM_URL": "http://gw:8080", "SIDECAR_TYPO": "1"}, "SIDECAR_TYPO: unknown"),
    ],
)  # fmt: skip
def test_serve_stops_at_start_up_naming_the_bad_setting(env: dict[str, str], message: str) -> None:
    result = run("sidecar", "serve", env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_the_worker_needs_a_service_credential() -> None:
    result = run("sidecar-worker", env={"SIDECAR_UPSTREAM_URL": "http://gw:8080",
                                        "SIDECAR_REDIS_URL": "redis://127.0.0.1:1/0"})  # fmt: skip
    assert result.returncode == 2
    assert "SIDECAR_SERVICE_API_KEY: required" in result.stderr


def test_help_explains_the_commands() -> None:
    result = run("sidecar", "--help")
    assert result.returncode == 0
    for command in ("serve", "emulate", "demo"):
        assert command in result.stdout
    assert "SIDECAR_" in result.stdout
    assert run("sidecar-worker", "--help").returncode == 0
