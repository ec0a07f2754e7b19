"""The tests' kustomize: the features deploy/ relies on, and refusal of what it does not render."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.kustomize import KustomizeError, build


def _write(directory: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)


CONFIG_MAP = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {A: '1', B: '2'}\n"
DEPLOYMENT = """apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
spec:
  template:
    spec:
      initContainers: [{name: side, image: sidecar, args: [serve]}]
      containers: [{name: app, image: "registry:5000/app:1", env: [{name: X, value: "1"}]}]
"""


def test_overlay_merges_deletes_and_sets_images(tmp_path: Path) -> None:
    _write(tmp_path, {
        "base/kustomization.yaml": "resources: [settings.yaml, app.yaml]\nimages: [{name: sidecar, newName: r/sidecar, newTag: '2'}]\n",
        "base/settings.yaml": CONFIG_MAP,
        "base/app.yaml": DEPLOYMENT,
        "overlay/kustomization.yaml": "resources: [../base]\npatches: [{path: cm.yaml}, {path: app.yaml}, {path: gone.yaml}]\n",
        "overlay/cm.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {B: '3', C: '4'}\n",
        "overlay/app.yaml": "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: app}\nspec: {template: {spec: {initContainers: [{name: side, resources: {limits: {cpu: '1'}}}], containers: [{name: app, env: [{name: Y, value: '2'}]}]}}}\n",
        "overlay/gone.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\n$patch: delete\n",
    })  # fmt: skip
    (deployment,) = build(tmp_path / "overlay")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["initContainers"] == [
        {
            "name": "side",
            "image": "r/sidecar:2",
            "args": ["serve"],
            "resources": {"limits": {"cpu": "1"}},
        }
    ]
    assert pod["containers"][0]["image"] == "registry:5000/app:1"
    assert pod["containers"][0]["env"] == [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]


def test_config_map_patch_merges_data(tmp_path: Path) -> None:
    _write(tmp_path, {
        "kustomization.yaml": "resources: [settings.yaml]\npatches: [{path: cm.yaml}]\n",
        "settings.yaml": CONFIG_MAP,
        "cm.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {B: '3', A: null}\n",
    })  # fmt: skip
    (config_map,) = build(tmp_path)
    assert config_map["data"] == {"B": "3"}


@pytest.mark.parametrize(
    ("files", "error"),
    [
        ({"kustomization.yaml": "resources: [../outside.yaml]\n"}, "load restrictor"),
        (
            {
                "kustomization.yaml": "configMapGenerator: [{name: d, files: [../outside.yaml], options: {disableNameSuffixHash: true}}]\n"
            },
            "load restrictor",
        ),
        (
            {"kustomization.yaml": "configMapGenerator: [{name: d, literals: [A=1]}]\n"},
            "disableNameSuffixHash",
        ),
        ({"kustomization.yaml": "namePrefix: x-\n"}, "unsupported kustomization fields"),
        (
            {
                "kustomization.yaml": "resources: [s.yaml]\npatches: [{path: p.yaml}]\n",
                "s.yaml": CONFIG_MAP,
                "p.yaml": CONFIG_MAP + "---\n" + CONFIG_MAP,
            },
            "one patch a file",
        ),
        (
            {
                "kustomization.yaml": "resources: [s.yaml, t.yaml]\n",
                "s.yaml": CONFIG_MAP,
                "t.yaml": CONFIG_MAP,
            },
            "declared twice",
        ),
        (
            {
                "kustomization.yaml": "resources: [s.yaml]\npatches: [{path: p.yaml}]\n",
                "s.yaml": CONFIG_MAP,
                "p.yaml": CONFIG_MAP.replace("settings", "other"),
            },
            "no .* to patch",
        ),
    ],
)
def test_refuses_what_kustomize_would_refuse_or_it_does_not_render(
    tmp_path: Path, files: dict[str, str], error: str
) -> None:
    (tmp_path / "outside.yaml").write_text(CONFIG_MAP)
    _write(tmp_path / "k", files)
    with pytest.raises(KustomizeError, match=error):
        build(tmp_path / "k")
