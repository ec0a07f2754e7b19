"""README.md's "Attach to an app": the pod after the injector is what the injector makes of the
pod before."""

from __future__ import annotations

import re
from typing import Any

import jsonpatch
import yaml

from sidecar.inject import Template, decide
from tests.inject.support import REPO, Object, deployment_review, validate_pod


def _section_yaml() -> list[Any]:
    text = (REPO / "README.md").read_text()
    section = text.partition("## Attach to an app\n")[2].partition("\n## ")[0]
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", section, re.S)]


def _assert_holds(shown: Any, actual: Any, where: str = "pod") -> None:
    """Everything ``shown`` says is in ``actual`` (lists: by item, in order, of the same length)."""
    if isinstance(shown, dict):
        for key, value in shown.items():
            assert isinstance(actual, dict), where
            assert key in actual, f"{where}.{key}: the README shows it, the injector does not"
            _assert_holds(value, actual[key], f"{where}.{key}")
    elif isinstance(shown, list):
        assert isinstance(actual, list), where
        assert len(shown) == len(actual), (
            f"{where}: {len(actual)} items, the README shows {len(shown)}"
        )
        for i, (item, real) in enumerate(zip(shown, actual, strict=True)):
            _assert_holds(item, real, f"{where}[{i}]")
    else:
        assert shown == actual, (
            f"{where}: the README shows {shown!r}, the injector makes {actual!r}"
        )


def test_readme_shows_the_pod_before_and_after_as_the_injector_makes_it(
    template: Template,
) -> None:
    annotation, before, after = _section_yaml()
    pod: Object = deployment_review()["request"]["object"]
    pod["metadata"]["annotations"] = annotation["spec"]["template"]["metadata"]["annotations"]
    (app,) = before["spec"]["containers"]
    pod["spec"]["containers"][0]["env"] = app["env"]
    decision = decide(pod, template, namespace_enabled=False)
    assert decision.outcome == "injected"
    injected = jsonpatch.apply_patch(pod, decision.patch)
    validate_pod(injected)
    _assert_holds(after["metadata"], injected["metadata"], "metadata")
    for field in ("terminationGracePeriodSeconds", "initContainers", "containers"):
        _assert_holds(after["spec"][field], injected["spec"][field], f"spec.{field}")
    assert after["spec"]["volumes"][0] in injected["spec"]["volumes"]
