"""The Dockerfile (no Docker engine here): parsed, and checked against the repository it builds."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sidecar.cli import main as sidecar_main

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
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
                    else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
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
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert {"pyproject.toml", project["readme"]} <= copied
    packages = {script.partition(".")[0] for script in SCRIPTS.values()}
    assert packages <= copied, f"the console scripts' packages {packages} are copied"
