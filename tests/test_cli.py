"""The commands as a user runs them."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.conftest import free_port
from tests.support import clean_env, run, wait_until


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` as JSON: fails on a line that is not."""
    return [json.loads(line) for line in text.splitlines() if line]


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


def test_python_dash_m_is_the_sidecar_command() -> None:
    result = run("python", "-m", "sidecar", "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: sidecar ")
    for name in ("serve", "emulate", "demo"):
        assert name in result.stdout
    serve = run("python", "-m", "sidecar", "serve", "--help")
    assert serve.returncode == 0
    for flag in ("--host", "--port"):
        assert flag in serve.stdout


def test_the_demo_logs_json_lines_on_stderr_and_prints_for_people_on_stdout() -> None:
    result = run("python", "-m", "sidecar", "demo", "--once", "--port", "0",
                 env={"SIDECAR_LOG_FORMAT": "json"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert '"cache_hit": true' in result.stdout
    lines = json_lines(result.stderr)
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    access = [line for line in lines if line["logger"] == "sidecar.access"]
    assert [(line["request_id"], line["outcome"], line["status"]) for line in access] == [
        ("demo-first", "miss", 200),
        ("demo-second", "hit", 200),
    ]
    assert {line["route"] for line in access} == {"/openai/v1/containers/{container_id}"}
    assert "sk-bf-demo-key" not in result.stderr


@pytest.mark.parametrize(
    ("command", "env", "message"),
    [
        ("serve", {"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER: exporter 'zipkin'"),
        ("demo", {"SIDECAR_LOG_FORMAT": "xml"}, "SIDECAR_LOG_FORMAT:"),
    ],
)
def test_logging_and_tracing_mistakes_stop_start_up(
    command: str, env: dict[str, str], message: str
) -> None:
    result = run("sidecar", command, env={"SIDECAR_UPSTREAM_URL": "http://gw:8080", **env})
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def _get(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_serve_takes_its_port_from_the_command_line_and_logs_each_request() -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=clean_env(SIDECAR_UPSTREAM_URL="http://127.0.0.1:9", SIDECAR_LOG_FORMAT="json",
                      SIDECAR_PORT="1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:

        def serving() -> bool:
            try:
                status = _get(f"http://127.0.0.1:{port}/healthz")
            except OSError:
                assert process.poll() is None, process.communicate()[1]
                return False
            assert status == 200
            return True

        wait_until(serving, 20, "sidecar serve starting")
        bearer = {"Authorization": "Bearer sk-bf-never-logged", "X-Request-Id": "cli-1"}
        assert _get(f"http://127.0.0.1:{port}/openai/v1/containers/cntr!", bearer) == 400
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    assert process.returncode == 0, stderr
    lines = json_lines(stderr)
    (access,) = [line for line in lines if line["logger"] == "sidecar.access"]  # not /healthz
    assert (access["request_id"], access["status"], access["outcome"]) == ("cli-1", 400, "error")
    assert "sk-bf-never-logged" not in stderr


def test_serve_on_a_port_in_use_stops_naming_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("python", "-m", "sidecar", "serve", "--host", "127.0.0.1", "--port",
                     str(port), env={"SIDECAR_UPSTREAM_URL": "http://127.0.0.1:9"})  # fmt: skip
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_the_retired_process_count_setting_says_what_to_do_instead() -> None:
    result = run("python", "-m", "sidecar", "serve",
                 env={"SIDECAR_UPSTREAM_URL": "http://127.0.0.1:9",
                      "SIDECAR_SERVE_PROCESSES": "2"})  # fmt: skip
    assert result.returncode == 2
    assert "SIDECAR_SERVE_PROCESSES: removed" in result.stderr
