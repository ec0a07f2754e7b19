"""The dashboard and the alerts, asked of a real Prometheus that scrapes a real sidecar and worker.

A module fixture starts redis-server, the emulator (``sidecar emulate``), ``sidecar serve`` and
``sidecar-worker`` as processes, and ``prometheus`` scraping both every second with the alert
rules loaded; it drives a miss, a hit and a 404 and waits for a few scrapes. Every dashboard
query and every part of every alert must then be valid PromQL that returns series: every
metric, label and label value they read is really exported.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.app import RETRIEVE_ROUTES, create_app
from sidecar.settings import load_settings
from tests.conftest import RedisServer, free_port
from tests.deploy.conftest import tool
from tests.support import BIN

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "bifrost-sidecar.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
KEY = "sk-bf-monitoring"
NAMESPACE = "shop"
#: What Grafana puts in place of the dashboard's variables ($job: "All", as its description asks).
VARIABLES = {"$namespace": NAMESPACE, "$job": ".*", "$__rate_interval": "1m"}
#: Label values as documented (sidecar/metrics.py, deploy/grafana/README.md).
DOCUMENTED = {
    "outcome": {"hit", "stale", "stale_if_error", "negative", "miss", "bypass", "error"},
    "event": {"enqueued", "deduplicated", "succeeded", "failed", "retried", "skipped"},
    "caller": {"sidecar", "worker"},
    "scope": {"process", "replica"},
    "status_class": {"2xx", "3xx", "4xx", "5xx", "error"},
    "component": {"sidecar", "worker"},
}
#: A label matcher with a double-quoted value, as the dashboard and the alerts write them.
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')

# --- what the assets query ------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def load_rules() -> list[dict[str, Any]]:
    (document,) = yaml.safe_load_all(ALERTS.read_text())
    return [rule for group in document["spec"]["groups"] for rule in group["rules"]]


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target, with the variables as Grafana fills them in."""
    found = []
    for panel in panels(load_dashboard()):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"panel {panel['title']!r}: a variable the test does not set"
            found.append((f"panel {panel['title']!r} ({target.get('legendFormat', '')})", expr))
    return found


def variable_queries() -> list[tuple[str, str, str]]:
    """(name, series selector, label) of the dashboard's ``label_values(...)`` variables."""
    found = []
    for variable in load_dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        text = variable["query"]
        text = text["query"] if isinstance(text, dict) else text
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", text)
        assert match, f"variable {variable['name']}: {text!r} is not label_values(selector, label)"
        selector = match.group(1).replace("$namespace", NAMESPACE)
        found.append((variable["name"], selector, match.group(2)))
    return found


_COMPARISON = re.compile(
    r"(?:==|!=|>=|<=|>|<)(?:\s*bool)?|(?:and|or|unless)\b"
    r"(?:\s*(?:on|ignoring)\s*\([^)]*\))?(?:\s*group_(?:left|right)\s*(?:\([^)]*\))?)?"
)


def operands(expr: str) -> list[str]:
    """The parts of ``expr`` that its top-level comparisons and ``and``/``or``/``unless`` join,
    less number literals: what an alert measures, before its thresholds filter it."""
    parts, start, depth, i = [], 0, 0, 0
    while i < len(expr):
        char = expr[i]
        if char in "\"'`":  # a string: skip to its closing quote
            i += 1
            while expr[i] != char:
                i += 2 if expr[i] == "\\" else 1
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0 and (i == 0 or not expr[i - 1].isalnum()):
            match = _COMPARISON.match(expr, i)
            if match:
                parts.append(expr[start:i])
                start = i = match.end()
                continue
        i += 1
    parts.append(expr[start:])
    return [" ".join(part.split()) for part in parts if not _is_number(part)]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def matchers() -> list[tuple[str, str, str, str]]:
    """(where, label, operator, value) of every label matcher in the assets."""
    exprs = [(where, expr) for where, expr in dashboard_queries()]
    exprs += [(f"variable {name}", selector) for name, selector, _ in variable_queries()]
    exprs += [(f"alert {rule['alert']}", rule["expr"]) for rule in load_rules()]
    return [(where, *m) for where, expr in exprs for m in _MATCHER.findall(expr)]


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("(a / b) < 0.5 and c > 1", ["(a / b)", "c"]),
        ('x{a!="b>c"} > bool 2 unless on (namespace) count by (namespace) (y == 0)',
         ['x{a!="b>c"}', "count by (namespace) (y == 0)"]),
        ("max by (n) (m) >= 1000 or on () group_left vector(1)", ["max by (n) (m)", "vector(1)"]),
        ("sum(rate(unless_x[5m]))", ["sum(rate(unless_x[5m]))"]),
    ],
)  # fmt: skip
def test_operands_are_what_comparisons_and_set_operators_join(
    expr: str, expected: list[str]
) -> None:
    assert operands(expr) == expected


# --- the assets' own shape ------------------------------------------------------------------


def test_dashboard_has_its_uid_a_datasource_variable_and_every_panel_uses_it() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "bifrost-sidecar"
    assert dashboard["title"] == "Bifrost container sidecar"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dashboard):
        if panel["type"] == "row":
            assert "targets" not in panel, panel["title"]
            continue
        where = f"panel {panel['title']!r}"
        assert panel["type"] in {"timeseries", "stat"}, where
        assert panel["datasource"] == DATASOURCE, where
        assert panel["targets"], where
        assert all(t["datasource"] == DATASOURCE for t in panel["targets"]), where
        assert panel.get("description"), f"{where}: say what it shows"
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{where}: give it a unit"
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, where


def test_label_values_are_documented_ones() -> None:
    found = matchers()
    assert len(found) > 50
    for where, label, op, value in found:
        if label not in DOCUMENTED or op in ("!=", "!~"):
            continue
        assert re.fullmatch(r"\w+(\|\w+)*", value), f"{where}: {label}{op}{value!r}"
        unknown = set(value.split("|")) - DOCUMENTED[label]
        assert not unknown, f"{where}: {label} has no value {unknown}"


def test_route_selectors_pick_the_retrieval_routes_only() -> None:
    settings = load_settings({}, upstream_url="http://upstream.invalid", key_secret="s")
    routes = {resource.canonical for resource in create_app(settings).router.resources()}
    routes |= {"passthrough", "admin", "unmatched"}  # route words besides the templates
    retrievals = set(RETRIEVE_ROUTES)
    assert retrievals < routes
    route_matchers = [m for m in matchers() if m[1] == "route"]
    assert route_matchers
    for where, _, op, value in route_matchers:
        assert op == "=~", f"{where}: route{op}{value!r}"
        chosen = {route for route in routes if re.fullmatch(value, route)}
        assert chosen == retrievals, f"{where}: route=~{value!r} picks {sorted(chosen)}"


# --- a real Prometheus scraping a real sidecar and worker -----------------------------------


@dataclass
class Prometheus:
    """Prometheus' HTTP API."""

    url: str

    def get(self, path: str, **params: str) -> Any:
        """The ``data`` of an API answer; raises AssertionError with Prometheus' error."""
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as exc:
            answer = json.load(exc)
        assert answer["status"] == "success", f"{answer.get('errorType')}: {answer.get('error')}"
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The series of an instant query, now."""
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data["resultType"]
        result: list[dict[str, Any]] = data["result"]
        return result


def _spawn(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        return subprocess.Popen(args, env=env, stdout=sink, stderr=subprocess.STDOUT)


def _wait_until_serving(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            pytest.fail(f"{process.args} exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{url} did not answer 200 within 30 s:\n{log.read_text()}")
        time.sleep(0.05)


def _http(method: str, url: str, body: dict[str, Any] | None = None) -> int:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _create_container(emulator: str) -> str:
    request = urllib.request.Request(
        f"{emulator}/v1/containers", data=b'{"name": "monitoring"}', method="POST",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as response:
        container_id: str = json.load(response)["id"]
        return container_id


def _prometheus_config(sidecar_port: int, worker_port: int) -> dict[str, Any]:
    """Two scrape jobs named and labelled the way the Prometheus Operator does for PodMonitors."""

    def job(monitor: str, port: int, pod: str, container: str) -> dict[str, Any]:
        labels = {"namespace": NAMESPACE, "pod": pod, "container": container}
        return {"job_name": f"{NAMESPACE}/{monitor}",
                "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": labels}]}  # fmt: skip

    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": ["bifrost-sidecar.rules.yaml"],
        "scrape_configs": [
            job("bifrost-sidecar", sidecar_port, "example-app-0", "bifrost-sidecar"),
            job("bifrost-sidecar-worker", worker_port, "bifrost-sidecar-worker-0", "worker"),
        ],
    }


def _wait_for(prometheus: Prometheus, expr: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + 30
    while not prometheus.query(expr):
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
            pytest.fail(f"Prometheus never had {expr} within 30 s\n{tails}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Prometheus with the alert rules, scraping a sidecar and a worker that saw some traffic."""
    prometheus_binary = tool("prometheus")
    workdir = tmp_path_factory.mktemp("monitoring")
    redis = RedisServer(workdir).start()
    processes: list[subprocess.Popen[bytes]] = []
    logs = {
        name: workdir / f"{name}.log" for name in ("emulator", "sidecar", "worker", "prometheus")
    }
    try:
        emulator_port, sidecar_port, worker_port, prometheus_port = (free_port() for _ in range(4))
        emulator = f"http://127.0.0.1:{emulator_port}"
        processes.append(_spawn([str(BIN / "sidecar"), "emulate", "--port", str(emulator_port)],
                                logs["emulator"]))  # fmt: skip
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "OTEL_"))},
            "SIDECAR_HOST": "127.0.0.1",
            "SIDECAR_PORT": str(sidecar_port),
            "SIDECAR_WORKER_METRICS_PORT": str(worker_port),
            "SIDECAR_REDIS_URL": redis.url,
            "SIDECAR_UPSTREAM_URL": emulator,
            "SIDECAR_KEY_SECRET": "monitoring-secret",
            "SIDECAR_SERVICE_API_KEY": KEY,
            "SIDECAR_QUEUE_NAME": "test:monitoring",
            # Short freshness: the worker's refresh-ahead renews the read container at once.
            "SIDECAR_FRESH_TTL_S": "1",
            "SIDECAR_ACCESS_LOG": "false",
        }
        processes.append(_spawn([str(BIN / "sidecar"), "serve"], logs["sidecar"], env))
        processes.append(_spawn([str(BIN / "sidecar-worker")], logs["worker"], env))
        rules = yaml.safe_load(ALERTS.read_text())["spec"]
        (workdir / "bifrost-sidecar.rules.yaml").write_text(yaml.safe_dump(rules))
        config = workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(_prometheus_config(sidecar_port, worker_port)))
        processes.append(_spawn([
            prometheus_binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}", "--log.level=warn",
        ], logs["prometheus"]))  # fmt: skip
        sidecar = f"http://127.0.0.1:{sidecar_port}"
        ready = [f"{emulator}/_emulator/healthz", f"{sidecar}/readyz",
                 f"http://127.0.0.1:{worker_port}/readyz",
                 f"http://127.0.0.1:{prometheus_port}/-/ready"]  # fmt: skip
        for url, process, log in zip(ready, processes, logs.values(), strict=True):
            _wait_until_serving(url, process, log)

        api = Prometheus(f"http://127.0.0.1:{prometheus_port}")
        # Scraped once before any traffic: every counter has its start-up 0 in Prometheus.
        _wait_for(api, "count(up == 1) == 2", list(logs.values()))
        container_id = _create_container(emulator)
        retrieve = f"{sidecar}/openai/v1/containers/{container_id}"
        assert _http("GET", retrieve) == 200  # a miss
        assert _http("GET", retrieve) == 200  # a hit
        assert _http("GET", f"{sidecar}/openai/v1/containers/cntr_missing") == 404
        # The first events show in increase(), as on the dashboard; the worker's refresh-ahead
        # has renewed the container.
        for expr in (
            'sum(increase(sidecar_requests_total{outcome="hit"}[1m])) > 0',
            'sum(increase(sidecar_requests_total{outcome="miss"}[1m])) > 0',
            'sum(increase(sidecar_upstream_requests_total{status_class="4xx"}[1m])) > 0',
            'sum(increase(sidecar_upstream_requests_total{caller="worker"}[1m])) > 0',
        ):
            _wait_for(api, expr, list(logs.values()))  # fmt: skip
        yield api
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        redis.stop()


def test_prometheus_scrapes_both_processes(prometheus: Prometheus) -> None:
    targets = prometheus.get("/api/v1/targets")["activeTargets"]
    assert len(targets) == 2
    for target in targets:
        assert target["health"] == "up", f"{target['scrapeUrl']}: {target['lastError']}"
    components = {s["metric"]["component"] for s in prometheus.query("sidecar_build_info")}
    assert components == {"sidecar", "worker"}


def test_every_dashboard_query_returns_series(prometheus: Prometheus) -> None:
    queries = dashboard_queries()
    assert len(queries) > 25
    empty = [f"{where}: {expr}" for where, expr in queries if not prometheus.query(expr)]
    assert not empty, "no series for:\n" + "\n".join(empty)


def test_every_dashboard_variable_has_values(prometheus: Prometheus) -> None:
    values = {
        name: prometheus.get(f"/api/v1/label/{label}/values", **{"match[]": selector})
        for name, selector, label in variable_queries()
    }
    assert values == {
        "namespace": [NAMESPACE],
        "job": [f"{NAMESPACE}/bifrost-sidecar", f"{NAMESPACE}/bifrost-sidecar-worker"],
    }


def test_every_alert_is_valid_and_what_it_measures_returns_series(prometheus: Prometheus) -> None:
    empty = []
    for rule in load_rules():
        prometheus.query(rule["expr"])  # valid: Prometheus answers it
        parts = operands(rule["expr"])
        assert parts, rule["alert"]
        empty += [f"alert {rule['alert']}: {part}" for part in parts if not prometheus.query(part)]
    assert not empty, "no series for:\n" + "\n".join(empty)


def test_prometheus_evaluates_every_rule_without_error(prometheus: Prometheus) -> None:
    (group,) = prometheus.get("/api/v1/rules")["groups"]
    assert [rule["name"] for rule in group["rules"]] == [r["alert"] for r in load_rules()]
    for rule in group["rules"]:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
        assert rule["lastEvaluation"] > "2000", f"{rule['name']} was never evaluated"


def test_every_label_value_the_assets_select_is_exported(prometheus: Prometheus) -> None:
    exported: dict[str, set[str]] = {}
    missing = []
    for where, label, op, value in matchers():
        if label not in DOCUMENTED or op not in ("=", "=~"):
            continue
        if label not in exported:
            values = prometheus.get(f"/api/v1/label/{label}/values",
                                    **{"match[]": '{__name__=~"sidecar_.+"}'})  # fmt: skip
            exported[label] = set(values)
        missing += [f"{where}: {label}={v!r}" for v in value.split("|") if v not in exported[label]]
    assert not missing, "not exported:\n" + "\n".join(sorted(set(missing)))
