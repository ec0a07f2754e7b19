"""The dashboard and the alerts query only what the running sidecar and worker export."""

from __future__ import annotations

import ast
import asyncio
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from sidecar.app import RETRIEVE_ROUTES, create_app
from sidecar.metrics import Metrics
from sidecar.settings import Settings, load_settings
from tests.conftest import Emulator, Running, free_port
from tests.sidecar.test_retrieve import AUTH_A, KEY_A, get
from tests.worker.conftest import running_worker

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "bifrost-sidecar.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

#: Label values as documented (sidecar/metrics.py, deploy/grafana/README.md).
DOCUMENTED = {
    "outcome": {"hit", "stale", "stale_if_error", "negative", "miss", "bypass", "error"},
    "event": {"enqueued", "deduplicated", "succeeded", "failed", "retried", "skipped"},
    "caller": {"sidecar", "worker"},
    "scope": {"process", "replica"},
    "status_class": {"2xx", "3xx", "4xx", "5xx", "error"},
    "component": {"sidecar", "worker"},
}
#: Computed at scrape time, so registered by the running apps, not by ``Metrics``.
SCRAPE_TIME = {
    "sidecar": {"sidecar_upstream_backoff_seconds", "sidecar_redis_up",
                "sidecar_redis_fail_open_seconds_total", "sidecar_local_cache_entries"},
    "worker": {"sidecar_refresh_backlog", "sidecar_upstream_backoff_seconds", "sidecar_redis_up"},
}  # fmt: skip
#: Labels Prometheus gives every series it scrapes from a PodMonitor target.
TARGET_LABELS = {"namespace", "job", "instance", "pod", "container", "endpoint"}
#: The names a family's samples take, by type (a counter family's name drops ``_total``).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
}

# --- a PromQL reader: just enough to find selectors and grouping labels ---------------------

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    | (?P<range>\[[^\]]*\])
    | (?P<number>\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)
    | (?P<name>[A-Za-z_:][\w:]*)
    | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=(){},])
    )""",
    re.X,
)
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str
    value: str

    def selects(self, value: str) -> bool:
        """Whether a series with ``value`` for this label is selected (regexes are anchored)."""
        if self.op in ("=", "!="):
            return (value == self.value) == (self.op == "=")
        return bool(re.fullmatch(self.value, value)) == (self.op == "=~")


@dataclass
class Query:
    where: str
    selectors: list[tuple[str, list[Matcher]]] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)


def tokenize(expr: str) -> list[tuple[str, str]]:
    """PromQL tokens as (kind, text); raises on anything it cannot read."""
    tokens: list[tuple[str, str]] = []
    pos, expr = 0, expr.rstrip()
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None or match.lastgroup is None:
            raise ValueError(f"cannot read PromQL at {expr[pos : pos + 40]!r}")
        tokens.append((match.lastgroup, match.group(match.lastgroup)))
        pos = match.end()
    return tokens


def parse(where: str, expr: str) -> Query:
    """The ``sidecar_*`` selectors (with their matchers) and the grouping labels of ``expr``."""
    tokens = tokenize(expr)
    for left, right in ("()", "{}"):
        texts = [text for _, text in tokens]
        assert texts.count(left) == texts.count(right), f"{where}: unbalanced {left}{right}"
    query, i = Query(where), 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "name" and text in _GROUPING and following == "(":
            i += 2
            while tokens[i][1] != ")":
                if tokens[i][0] == "name":
                    query.grouping.add(tokens[i][1])
                i += 1
        elif kind == "name" and text.startswith("sidecar_") and following != "(":
            matchers = []
            if following == "{":
                i += 2
                while tokens[i][1] != "}":
                    (_, label), (_, op), (value_kind, value) = tokens[i : i + 3]
                    assert value_kind == "string", f"{where}: {label}{op} wants a string"
                    matchers.append(Matcher(label, op, _unquote(value)))
                    i += 4 if tokens[i + 3][1] == "," else 3
            query.selectors.append((text, matchers))
        i += 1
    return query


def _unquote(literal: str) -> str:
    return literal[1:-1] if literal.startswith("`") else str(ast.literal_eval(literal))


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


def queries() -> list[Query]:
    dashboard = load_dashboard()
    found = [
        parse(f"panel {panel['title']!r}", target["expr"])
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            text = variable["query"]
            text = text["query"] if isinstance(text, dict) else text
            found.append(parse(f"variable {variable['name']}", text))
    found += [parse(f"alert {rule['alert']}", rule["expr"]) for rule in load_rules()]
    return found


def test_every_query_reads_and_selects_a_sidecar_metric() -> None:
    found = queries()
    assert len(found) > 30
    for query in found:
        assert query.selectors, f"{query.where}: no sidecar_* metric"


# --- what the code exports ------------------------------------------------------------------


@dataclass
class Exported:
    names: dict[str, str] = field(default_factory=dict)  # queryable name -> family
    labels: dict[str, set[str]] = field(default_factory=dict)  # family -> labels on samples

    def add(self, families: Iterable[Metric]) -> Exported:
        for family in families:
            for suffix in _SUFFIXES.get(family.type, ("",)):
                self.names[family.name + suffix] = family.name
            seen = self.labels.setdefault(family.name, set())
            for sample in family.samples:
                self.names[sample.name] = family.name
                seen.update(sample.labels)
        return self


def registered() -> Exported:
    """What ``Metrics`` registers for each process, before any app adds its scrape-time ones."""
    exported = Exported()
    for component in ("sidecar", "worker"):
        exported.add(Metrics(component).registry.collect())
    return exported


def test_queries_name_registered_or_scrape_time_metrics() -> None:
    known = registered().names.keys() | set().union(*SCRAPE_TIME.values())
    for query in queries():
        for name, _ in query.selectors:
            assert name in known, f"{query.where}: {name} is exported by neither process"


def test_label_values_are_documented_ones() -> None:
    for query in queries():
        for name, matchers in query.selectors:
            for m in matchers:
                if m.label not in DOCUMENTED:
                    continue
                values = {m.value}
                if m.op in ("=~", "!~"):
                    assert re.fullmatch(r"[\w|]+", m.value), f"{query.where}: {m.value!r}"
                    values = set(m.value.split("|"))
                unknown = values - DOCUMENTED[m.label]
                assert not unknown, f"{query.where}: {name}{{{m.label}}} has no value {unknown}"


def test_route_selectors_pick_the_retrieval_routes_only() -> None:
    settings = load_settings({}, upstream_url="http://upstream.invalid", key_secret="s")
    routes = {resource.canonical for resource in create_app(settings).router.resources()}
    routes |= {"passthrough", "admin", "unmatched"}  # route words besides the templates
    retrievals = set(RETRIEVE_ROUTES)
    assert retrievals < routes
    for query in queries():
        for name, matchers in query.selectors:
            for m in (m for m in matchers if m.label == "route"):
                chosen = {route for route in routes if m.selects(route)}
                assert chosen == retrievals, f"{query.where}: {name}{{{m.label}{m.op}{m.value!r}}}"


# --- the running sidecar and worker ---------------------------------------------------------


async def scrape(http: aiohttp.ClientSession, url: str) -> list[Metric]:
    async with http.get(url) as response:
        assert response.status == 200, f"GET {url}: {response.status}"
        return list(text_string_to_metric_families(await response.text()))


async def scrape_worker(http: aiohttp.ClientSession, url: str) -> list[Metric]:
    """The worker's metrics once it has finished a refresh job."""
    for _ in range(200):
        try:
            families = await scrape(http, url)
        except aiohttp.ClientConnectionError:
            families = []  # its endpoint is not up yet
        jobs = [s for f in families for s in f.samples if s.name == "sidecar_refresh_jobs_total"]
        if any(s.labels["event"] == "succeeded" and s.value for s in jobs):
            return families
        await asyncio.sleep(0.05)
    raise AssertionError(f"no refresh job succeeded, or no metrics at {url}")


async def test_running_sidecar_and_worker_export_what_the_assets_query(
    start_sidecar: Any,
    make_settings: Any,
    emulator: Emulator,
    http: aiohttp.ClientSession,
) -> None:
    common = {"service_api_key": KEY_A, "fresh_ttl_s": 0.3, "local_ttl_s": 0,
              "queue_name": "test:monitoring"}  # fmt: skip
    settings: Settings = make_settings(**common)
    sidecar: Running = await start_sidecar(settings)
    cid = (await emulator.create(KEY_A))["id"]
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    emulator.state.set_latency(50)
    await asyncio.gather(*(get(http, url) for _ in range(3)))  # a miss and two collapsed
    emulator.state.set_latency(0)
    await get(http, url)  # a hit
    await asyncio.sleep(0.35)
    await get(http, url)  # stale: a refresh job is enqueued
    async with http.get(f"{sidecar.url}/openai/v1/containers", headers=AUTH_A) as response:
        assert response.status == 200  # pass-through
    port = free_port()
    async with running_worker(make_settings(**common, worker_metrics_port=port, host="127.0.0.1")):
        worker = await scrape_worker(http, f"http://127.0.0.1:{port}/metrics")
    other = (await emulator.create(KEY_A))["id"]
    emulator.state.add_fault(kind="status", status=429, retry_after_s=30, count=1)
    await get(http, f"{sidecar.url}/openai/v1/containers/{other}")  # a 429: a back-off
    scraped = {"sidecar": await scrape(http, f"{sidecar.url}/metrics"), "worker": worker}

    for component, families in scraped.items():
        (info,) = (s for f in families for s in f.samples if s.name == "sidecar_build_info")
        assert info.labels["component"] == component
        missing = SCRAPE_TIME[component] - Exported().add(families).names.keys()
        assert not missing, f"the running {component} does not export {missing}"
    exported = registered()
    for families in scraped.values():
        exported.add(families)
    for query in queries():
        selected: set[str] = set()
        for name, matchers in query.selectors:
            assert name in exported.names, f"{query.where}: nobody exports {name}"
            family = exported.names[name]
            selected.add(family)
            for m in matchers:
                assert m.label in TARGET_LABELS | exported.labels[family], (
                    f"{query.where}: {name} has no label {m.label!r} "
                    f"(labels seen: {sorted(exported.labels[family])})"
                )
        labels = TARGET_LABELS.union(*(exported.labels[f] for f in selected))
        assert query.grouping <= labels, f"{query.where}: no label {query.grouping - labels}"


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


def test_alerts_are_one_prometheus_rule_with_for_severity_and_summary() -> None:
    (document,) = yaml.safe_load_all(ALERTS.read_text())
    assert document["apiVersion"] == "monitoring.coreos.com/v1"
    assert document["kind"] == "PrometheusRule"
    assert document["metadata"]["name"] == "bifrost-sidecar"
    rules = load_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in rules:
        assert re.fullmatch(r"(\d+[smh])+", rule.get("for", "")), f"{rule['alert']}: for"
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"].get("summary"), rule["alert"]
        assert rule["annotations"].get("description"), rule["alert"]


@pytest.mark.parametrize(
    ("expr", "selectors", "grouping"),
    [
        ('sum by (le, outcome) (rate(sidecar_x_bucket{route=~"a|b", job=~"$job"}[$__rate_interval]))',
         [("sidecar_x_bucket", [("route", "=~", "a|b"), ("job", "=~", "$job")])], {"le", "outcome"}),
        ("(1 - sidecar_up) * on (job, instance) group_left (component) sidecar_info",
         [("sidecar_up", []), ("sidecar_info", [])], {"job", "instance", "component"}),
        ("histogram_quantile(0.99, sidecar_y) > 1e3 unless sidecar_z{a!='x,}'}",
         [("sidecar_y", []), ("sidecar_z", [("a", "!=", "x,}")])], set()),
    ],
)  # fmt: skip
def test_the_reader_finds_selectors_and_grouping(
    expr: str, selectors: list[Any], grouping: set[str]
) -> None:
    query = parse("example", expr)
    found = [(name, [(m.label, m.op, m.value) for m in ms]) for name, ms in query.selectors]
    assert found == selectors
    assert query.grouping == grouping
