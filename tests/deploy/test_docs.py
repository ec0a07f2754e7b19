"""deploy/README.md: its settings table and its sidecar snippet say what the code and manifests do."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import yaml

from sidecar.settings import Settings
from tests.deploy.conftest import render

REPO = Path(__file__).resolve().parents[2]
README = REPO / "deploy" / "README.md"
SNIPPET = re.compile(
    r"<!-- sidecar-snippet: begin[^>]*-->\n```yaml\n(.*?)```\n<!-- sidecar-snippet: end -->", re.S
)


def _settings_table() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "settings_table", REPO / "deploy" / "settings_table.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_setting_has_a_docstring() -> None:
    docs = _settings_table().field_docs()
    undocumented = [name for name in Settings.__struct_fields__ if not docs.get(name)]
    assert not undocumented, f"Settings fields without a docstring: {undocumented}"


def test_readme_lists_every_setting() -> None:
    table = _settings_table()
    text = README.read_text()
    block = text.partition(table.BEGIN)[2].partition(table.END)[0]
    listed = set(re.findall(r"^\| `(\w+)` \| `(SIDECAR_[A-Z0-9_<>]+)` \|", block, re.M))
    missing = [f for f in Settings.__struct_fields__ if (f, table.env_name(f)) not in listed]
    assert not missing, f"deploy/README.md lacks {missing}: run deploy/settings_table.py --write"
    assert block.strip() == table.render_table().strip(), (
        "deploy/README.md's settings table is out of date: run "
        ".venv/bin/python deploy/settings_table.py --write"
    )


def test_readme_snippet_is_the_example_apps_sidecar() -> None:
    (match,) = SNIPPET.findall(README.read_text())
    snippet = yaml.safe_load(match)["spec"]["template"]
    rendered = {o["metadata"]["name"]: o for o in render("deploy/kubernetes/overlays/single-redis")}
    template = rendered["example-app"]["spec"]["template"]
    (sidecar,) = template["spec"]["initContainers"]
    expected = yaml.safe_dump(sidecar, sort_keys=False)
    assert snippet["spec"]["initContainers"] == [sidecar], (
        f"update deploy/README.md's snippet; the sidecar is now:\n{expected}"
    )
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    for mount in sidecar["volumeMounts"]:
        assert volumes[mount["name"]] in snippet["spec"]["volumes"]
    labels = snippet["metadata"]["labels"]
    assert labels.items() <= template["metadata"]["labels"].items()
    for field in ("terminationGracePeriodSeconds", "enableServiceLinks"):
        assert snippet["spec"][field] == template["spec"][field], field
