"""requirements/*.txt, the image's hashed lock files: true to pyproject.toml, and installable."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.support import BIN

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
RUNTIME_LOCK = REPO / "requirements" / "runtime.txt"
BUILD_LOCK = REPO / "requirements" / "build.txt"
#: The extras the image installs besides the dependencies (tracing, off unless OTEL_* is set).
IMAGE_EXTRAS = ("otel",)
#: The embedded store's packages: the image runs on a real Redis, never on these.
NOT_IN_THE_IMAGE = {"fakeredis", "lupa"}
#: Where the image runs: Linux, the Python of its base image.
IMAGE_ENVIRONMENT = {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
                     "python_version": "3.11", "python_full_version": "3.11.14"}  # fmt: skip
FIX = "run scripts/lock"


def locked(path: Path) -> dict[str, tuple[Requirement, list[str]]]:
    """Each locked package's requirement line and hashes, by canonical name."""
    text = re.sub(r"\\\n", " ", path.read_text())
    found: dict[str, tuple[Requirement, list[str]]] = {}
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        hashes = re.findall(r"--hash=(sha256:[0-9a-f]{64})", line)
        requirement = Requirement(re.sub(r"\s*--hash=\S+", "", line))
        name = canonicalize_name(requirement.name)
        assert name not in found, f"{path.name}: {name} is locked twice"
        found[name] = (requirement, hashes)
    return found


def _pinned(requirement: Requirement) -> Version:
    (spec,) = requirement.specifier
    assert spec.operator == "==", f"{requirement}: pin one version"
    return Version(spec.version)


def _image_requirements() -> list[Requirement]:
    project = PYPROJECT["project"]
    texts = [*project["dependencies"]]
    for extra in IMAGE_EXTRAS:
        texts += project["optional-dependencies"][extra]
    return [Requirement(text) for text in texts]


@pytest.mark.parametrize("lock", [RUNTIME_LOCK, BUILD_LOCK], ids=lambda p: p.name)
def test_every_locked_package_is_pinned_and_hashed(lock: Path) -> None:
    packages = locked(lock)
    assert packages, f"{lock.name} is empty: {FIX}"
    for name, (requirement, hashes) in packages.items():
        _pinned(requirement)
        assert hashes, f"{lock.name}: {name} has no --hash"
    assert "scripts/lock" in lock.read_text().partition("\n\n")[0], "say how it is made"


def test_every_runtime_dependency_is_locked_at_a_version_it_allows() -> None:
    packages = locked(RUNTIME_LOCK)
    for requirement in _image_requirements():
        if requirement.marker is not None and not requirement.marker.evaluate(IMAGE_ENVIRONMENT):
            continue
        name = canonicalize_name(requirement.name)
        assert name in packages, f"pyproject.toml needs {requirement} but the lock lacks it: {FIX}"
        version = _pinned(packages[name][0])
        assert requirement.specifier.contains(version, prereleases=True), (
            f"pyproject.toml needs {requirement}, the lock has {version}: {FIX}"
        )


def test_the_embedded_store_is_not_in_the_image() -> None:
    embedded = {canonicalize_name(Requirement(r).name)
                for r in PYPROJECT["project"]["optional-dependencies"]["embedded"]}  # fmt: skip
    assert embedded <= NOT_IN_THE_IMAGE
    assert not NOT_IN_THE_IMAGE & locked(RUNTIME_LOCK).keys()
    assert not any(canonicalize_name(r.name) in NOT_IN_THE_IMAGE for r in _image_requirements())


def test_the_build_backend_is_locked() -> None:
    packages = locked(BUILD_LOCK)
    for text in PYPROJECT["build-system"]["requires"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in packages, f"[build-system] needs {requirement}: {FIX}"
        assert requirement.specifier.contains(_pinned(packages[name][0])), f"{requirement}: {FIX}"


def test_the_locks_install_with_hashes_and_the_project_without_deps(tmp_path: Path) -> None:
    """What the Dockerfile's builder does, into a throwaway venv. With uv rather than pip (the
    same --require-hashes checks, in seconds rather than pip's 20 to 45 here)."""
    uv = BIN / "uv"
    assert uv.exists(), f"{uv}: install uv==0.13.9 into the venv (bash scripts/test does)"
    venv, source = tmp_path / "venv", tmp_path / "src"
    source.mkdir()
    for part in ("pyproject.toml", "README.md"):  # the Dockerfile's COPYs
        shutil.copy(REPO / part, source / part)
    for part in ("sidecar", "worker"):
        shutil.copytree(REPO / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"

    def run(*args: str | Path) -> None:
        command = [uv, "pip", *map(str, args), "--python", python]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{' '.join(map(str, command))}:\n{done.stdout}{done.stderr}"

    run("install", "--require-hashes", "-r", RUNTIME_LOCK, "-r", BUILD_LOCK)
    run("install", "--no-deps", "--no-build-isolation", source)
    run("check")
    # The production code imports without the embedded store's packages.
    done = subprocess.run([python, "-c", "import sidecar.app, sidecar.cli, worker.main, worker.cli"],
                          cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for package in NOT_IN_THE_IMAGE:
        assert not list((venv / "lib").glob(f"python*/site-packages/{package}")), package
