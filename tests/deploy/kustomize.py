"""A small ``kustomize build`` for the tests: the subset of kustomize that deploy/ uses.

No kustomize or kubectl binary is at hand where the tests run, so this renders a kustomization
the way kustomize v5 does for these features, and refuses anything else rather than guess:

- ``resources``: files (in or below the kustomization's directory, kustomize's load restrictor)
  and directories holding a kustomization (anywhere);
- ``configMapGenerator`` with ``files`` and ``literals``, ``options.labels``/``annotations``
  and ``disableNameSuffixHash: true`` (hashed names would need kustomize's name references);
- ``patches`` with ``path``: one strategic-merge patch a file (what kubectl's embedded kustomize
  accepts), found by kind and name, including ``$patch: delete`` of a whole object;
- ``images``: ``newName``/``newTag`` for containers and init containers.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

__all__ = ["KustomizeError", "build", "load_documents", "strategic_merge"]

Object = dict[str, Any]

_KNOWN_FIELDS = {"apiVersion", "kind", "resources", "configMapGenerator", "patches", "images"}
_KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
# Lists merged item by item on these keys (the Kubernetes API's patchMergeKey); other lists
# are replaced whole, except those whose merge key depends on context, which are refused.
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}
_REFUSED_LISTS = {"ports"}


class KustomizeError(ValueError):
    """The kustomization uses something this renderer does not do, or kustomize would refuse."""


def load_documents(path: Path) -> list[Object]:
    """The non-empty YAML documents of a file."""
    with path.open() as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def build(directory: Path) -> list[Object]:
    """The objects ``kustomize build directory`` prints (in resource order, not kind order)."""
    directory = directory.resolve()
    kustomization = _kustomization(directory)
    unknown = set(kustomization) - _KNOWN_FIELDS
    if unknown:
        raise KustomizeError(f"{directory}: unsupported kustomization fields {sorted(unknown)}")
    objects: list[Object] = []
    for entry in kustomization.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            objects.extend(build(target))
        else:
            objects.extend(load_documents(_local_file(directory, entry)))
    for generator in kustomization.get("configMapGenerator", []):
        objects.append(_generate_config_map(directory, generator))
    _check_unique(directory, objects)
    for patch_entry in kustomization.get("patches", []):
        objects = _apply_patch(directory, patch_entry, objects)
    for image in kustomization.get("images", []):
        _set_image(objects, image)
    return objects


def _kustomization(directory: Path) -> Object:
    for name in _KUSTOMIZATION_NAMES:
        if (directory / name).is_file():
            (document,) = load_documents(directory / name)
            if document.get("kind", "Kustomization") != "Kustomization":
                raise KustomizeError(f"{directory / name}: not a Kustomization")
            return dict(document)
    raise KustomizeError(f"{directory}: no kustomization.yaml")


def _local_file(directory: Path, entry: str) -> Path:
    path = (directory / entry).resolve()
    if not path.is_relative_to(directory):
        raise KustomizeError(
            f"{directory}: {entry} is not in or below the kustomization's directory "
            "(kustomize's load restrictor refuses it)"
        )
    if not path.is_file():
        raise KustomizeError(f"{directory}: {entry} does not exist")
    return path


def _generate_config_map(directory: Path, generator: Object) -> Object:
    allowed = {"name", "files", "literals", "options"}
    if set(generator) - allowed:
        raise KustomizeError(f"{directory}: unsupported configMapGenerator fields in {generator}")
    options = generator.get("options", {})
    if set(options) - {"labels", "annotations", "disableNameSuffixHash"}:
        raise KustomizeError(f"{directory}: unsupported generator options {sorted(options)}")
    if options.get("disableNameSuffixHash") is not True:
        raise KustomizeError(
            f"{directory}: generator {generator['name']}: hashed names are not rendered here "
            "(set options.disableNameSuffixHash: true)"
        )
    data: dict[str, str] = {}
    for entry in generator.get("files", []):
        key, _, source = entry.partition("=") if "=" in entry else ("", "", entry)
        path = _local_file(directory, source)
        data[key or path.name] = path.read_text()
    for literal in generator.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    metadata: Object = {"name": generator["name"]}
    for field in ("labels", "annotations"):
        if field in options:
            metadata[field] = dict(options[field])
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def _identity(obj: Object) -> tuple[str, str, str]:
    metadata = obj.get("metadata", {})
    return obj["kind"], metadata.get("namespace", ""), metadata["name"]


def _check_unique(directory: Path, objects: list[Object]) -> None:
    seen: set[tuple[str, str, str]] = set()
    for obj in objects:
        identity = _identity(obj)
        if identity in seen:
            raise KustomizeError(f"{directory}: {identity} is declared twice")
        seen.add(identity)


def _apply_patch(directory: Path, entry: Object, objects: list[Object]) -> list[Object]:
    if set(entry) != {"path"}:
        raise KustomizeError(f"{directory}: only patches with a path alone are rendered: {entry}")
    documents = load_documents(_local_file(directory, entry["path"]))
    if len(documents) != 1:
        raise KustomizeError(
            f"{directory}: {entry['path']}: one patch a file (kubectl's kustomize refuses more)"
        )
    (patch,) = documents
    matches = [i for i, obj in enumerate(objects) if _identity(obj) == _identity(patch)]
    if not matches:
        raise KustomizeError(f"{directory}: {entry['path']}: no {_identity(patch)} to patch")
    (index,) = matches
    if patch.get("$patch") == "delete":
        return objects[:index] + objects[index + 1 :]
    patched = list(objects)
    patched[index] = strategic_merge(objects[index], patch)
    return patched


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """``patch`` merged into ``base`` the way a strategic-merge patch is (the parts used here)."""
    if isinstance(patch, dict) and isinstance(base, dict):
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            if key.startswith("$"):
                raise KustomizeError(f"unsupported patch directive {key}: {value}")
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = strategic_merge(None, value, key)
        return merged
    if isinstance(patch, list) and field in _MERGE_KEYS and isinstance(base, list):
        key = _MERGE_KEYS[field]
        merged_list = copy.deepcopy(base)
        for item in patch:
            names = [i for i, existing in enumerate(merged_list) if existing[key] == item[key]]
            if item.get("$patch") == "delete":
                merged_list = [x for i, x in enumerate(merged_list) if i not in names]
            elif names:
                merged_list[names[0]] = strategic_merge(merged_list[names[0]], item, field)
            else:
                merged_list.append(strategic_merge(None, item, field))
        return merged_list
    if isinstance(patch, list) and field in _REFUSED_LISTS and base is not None:
        raise KustomizeError(f"patching the list {field} is not rendered here")
    if isinstance(patch, dict):
        return strategic_merge({}, patch, field)
    return copy.deepcopy(patch)


def _set_image(objects: list[Object], image: Object) -> None:
    if set(image) - {"name", "newName", "newTag"}:
        raise KustomizeError(f"unsupported images entry {image}")
    for obj in objects:
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("initContainers", []) + pod.get("containers", []):
            name, tag = _split_image(container["image"])
            if name == image["name"]:
                name = image.get("newName", name)
                tag = ":" + image["newTag"] if "newTag" in image else tag
                container["image"] = name + tag


def _split_image(reference: str) -> tuple[str, str]:
    """``registry/name:tag`` as (``registry/name``, ``:tag``); digests stay with the tag."""
    at = reference.find("@")
    if at >= 0:
        return reference[:at], reference[at:]
    colon = reference.rfind(":")
    if colon > reference.rfind("/"):
        return reference[:colon], reference[colon:]
    return reference, ""
