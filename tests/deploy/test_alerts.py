"""deploy/prometheus/alerts.yaml, checked by promtool and unit-tested with deploy/prometheus/tests."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import load_documents, tool

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"
UNIT_TESTS = sorted((REPO / "deploy" / "prometheus" / "tests").glob("*.yaml"))
#: The plain rule file the unit tests load: the PrometheusRule's spec (its rule groups).
RULE_FILE = "bifrost-sidecar.rules.yaml"


def rules() -> list[dict[str, Any]]:
    (document,) = load_documents(ALERTS)
    return [rule for group in document["spec"]["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def rules_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rule groups as a plain rule file, beside copies of the unit tests that load it."""
    directory = tmp_path_factory.mktemp("rules")
    (document,) = load_documents(ALERTS)
    (directory / RULE_FILE).write_text(yaml.safe_dump(document["spec"], sort_keys=False))
    for test in UNIT_TESTS:
        shutil.copy(test, directory / test.name)
    return directory


def promtool(*args: str | Path, cwd: Path) -> str:
    done = subprocess.run([tool("promtool"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, f"promtool {' '.join(map(str, args))}:\n{done.stdout}{done.stderr}"
    return done.stdout


def test_alerts_are_one_prometheus_rule_with_for_severity_and_summary() -> None:
    (document,) = load_documents(ALERTS)
    assert document["apiVersion"] == "monitoring.coreos.com/v1"
    assert document["kind"] == "PrometheusRule"
    assert document["metadata"]["name"] == "bifrost-sidecar"
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in rules():
        assert re.fullmatch(r"(\d+[smh])+", rule.get("for", "")), f"{rule['alert']}: for"
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"].get("summary"), rule["alert"]
        assert rule["annotations"].get("description"), rule["alert"]


def test_promtool_checks_the_rules(rules_dir: Path) -> None:
    output = promtool("check", "rules", RULE_FILE, cwd=rules_dir)
    assert f"SUCCESS: {len(rules())} rules found" in output


def test_promtool_unit_tests_pass(rules_dir: Path) -> None:
    assert UNIT_TESTS
    promtool("test", "rules", *(test.name for test in UNIT_TESTS), cwd=rules_dir)


def test_every_alert_has_unit_tests_where_it_fires_and_where_it_stays_silent() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for path in UNIT_TESTS:
        (document,) = load_documents(path)
        assert document["rule_files"] == [RULE_FILE], path.name
        for test in document["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    names = {rule["alert"] for rule in rules()}
    assert names <= firing, f"no test where {sorted(names - firing)} fire"
    assert names <= silent, f"no test where {sorted(names - silent)} stay silent"
    assert firing | silent <= names, f"tests of unknown alerts {sorted((firing | silent) - names)}"
