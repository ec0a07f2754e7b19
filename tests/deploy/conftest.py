"""The operators' tools the deploy tests run: kubectl's kustomize, promtool and Prometheus."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
#: Every kustomization an operator may apply or include, as ``kubectl kustomize`` takes them.
KUSTOMIZATIONS = sorted(p.parent.relative_to(REPO).as_posix()
                        for p in DEPLOY.rglob("kustomization.yaml"))  # fmt: skip

Object = dict[str, Any]


#: How to get each tool the tests run.
INSTALL = {
    "kubectl": "install kubectl 1.27 or later (it ships kustomize v5)",
    "promtool": "install Debian's prometheus package (bash scripts/test does)",
    "prometheus": "install Debian's prometheus package (bash scripts/test does)",
}


def tool(name: str) -> str:
    """The path of an operator's tool; fails (never skips) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: {INSTALL[name]}")
    return path


@functools.cache
def _kustomize(directory: str) -> str:
    kubectl = tool("kubectl")
    done = subprocess.run([kubectl, "kustomize", str(REPO / directory)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    if done.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory}: {done.stderr}")
    return done.stdout


def render(directory: str) -> list[Object]:
    """The objects ``kubectl kustomize`` renders for ``directory`` (relative to the repo)."""
    return [obj for obj in yaml.safe_load_all(_kustomize(directory)) if obj is not None]


def load_documents(path: Path) -> list[Object]:
    """The non-empty YAML documents of a file."""
    with path.open() as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]
