"""values.yaml and values.schema.json: documented, valid, and strict (fast, no helm)."""

from __future__ import annotations

import copy
import json
import re

import jsonschema
import pytest
import yaml

from ragtune.api import pods as contract

from .chartlib import CHART, REPO_ROOT

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES_TEXT = (CHART / "values.yaml").read_text()
VALUES = yaml.safe_load(VALUES_TEXT)
# Children of these keys are Kubernetes objects documented by the Kubernetes API, not by us.
K8S_OBJECT_KEYS = {"resources", "podSecurityContext", "securityContext"}


def errors(values: dict) -> list[jsonschema.ValidationError]:
    return list(jsonschema.Draft7Validator(SCHEMA).iter_errors(values))


def test_default_values_match_schema():
    assert errors(VALUES) == []


def with_value(path: str, value) -> dict:
    values = copy.deepcopy(VALUES)
    *parents, leaf = path.split(".")
    node = values
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return values


@pytest.mark.parametrize("path, value", [
    ("watch.mode", "sideways"),
    ("watch.namespaces", ["Not_A_Namespace"]),
    ("metrics.port", "8080"),
    ("metrics.port", 70000),
    ("healthPort", 0),
    ("image.digest", "latest"),
    ("image.tag", "has spaces"),
    ("logFormat", "xml"),
    ("replicaCount", 2),  # unknown key: the operator runs without peering, one replica
    ("podSecurityContext.runAsNonRoot", False),
    ("securityContext.allowPrivilegeEscalation", True),
    ("securityContext.privileged", True),
    ("metrics.serviceMonitor.interval", "often"),
    ("resources.limits.memory", "lots"),
])
def test_schema_rejects_wrong_value_naming_the_key(path, value):
    found = errors(with_value(path, value))
    assert found, f"{path}={value!r} was accepted"
    named = {".".join(str(p) for p in e.absolute_path) for e in found} | {
        m for e in found for m in re.findall(r"'(\w+)' was unexpected", e.message)}
    leaf = path.split(".")[-1]
    assert any(n == path or n.startswith(path + ".") or n == leaf for n in named), (path, [e.message for e in found])


def _keys_with_comment_state(text: str):
    """Yield (dotted path, documented?) for each mapping key line of values.yaml."""
    stack: list[tuple[int, str]] = []
    previous = ""
    for line in text.splitlines():
        match = re.match(r"^(\s*)([A-Za-z][\w-]*):", line)
        if match:
            indent = len(match.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, match.group(2)))
            yield ".".join(k for _, k in stack), previous.strip().startswith("#")
        if line.strip():
            previous = line


def test_every_value_is_documented():
    undocumented = [path for path, documented in _keys_with_comment_state(VALUES_TEXT)
                    if not documented and path.split(".")[0] not in K8S_OBJECT_KEYS - {path}]
    assert undocumented == [], f"values.yaml keys without a comment above them: {undocumented}"


def test_image_defaults_follow_the_pod_contract_and_app_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert VALUES["image"]["repository"] == contract.OPERATOR_IMAGE
    assert VALUES["trainer"]["image"]["repository"] == contract.TRAINER_IMAGE
    assert VALUES["image"]["tag"] == "" and VALUES["trainer"]["image"]["tag"] == "", "tags default to appVersion"
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, flags=re.M).group(1)
    assert chart["appVersion"] == version, "image tag (appVersion) must be the package version"


def test_default_security_context_is_restricted():
    pod, container = VALUES["podSecurityContext"], VALUES["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["allowPrivilegeEscalation"] is False
    assert container["readOnlyRootFilesystem"] is True
    assert container["capabilities"]["drop"] == ["ALL"]


def test_readme_permission_table_is_the_permission_list():
    from ..security.permissions import flatten

    readme = (CHART / "README.md").read_text()
    table = readme.split("## Permissions", 1)[1].split("\n\n`*/finalizers", 1)[0]
    documented = set()
    for group, resource, verbs in re.findall(r"^\| `([^`]*)` \| `([^`]*)` \| ([a-z ]+) \|", table, flags=re.M):
        documented |= {("" if group == "core" else group, resource, v) for v in verbs.split()}
    assert documented == flatten(), (
        f"README lists {sorted(documented - flatten())} extra, misses {sorted(flatten() - documented)}")
