"""The operator image holds only `operator/ragtune` and the `operator` extra (operator/Dockerfile).
Every import in that package, lazy ones included (any code path may run in the image: the
operator, the adapter fetcher, the online evaluator), must be satisfied there: the standard
library, `ragtune` itself, or a distribution the base + `operator` dependencies pull in."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys

import tomllib
from packaging.requirements import Requirement

from .chartlib import REPO_ROOT

PACKAGE = REPO_ROOT / "operator" / "ragtune"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _image_distributions() -> set[str]:
    """Distributions installed by `pip install .[operator]`: direct requirements from pyproject,
    then their requirements (from the installed metadata), recursively."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["operator"]]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = _normalise(req.name)
        if name in seen:
            continue
        seen.add(name)
        for raw in md.requires(req.name) or []:
            sub = Requirement(raw)
            wanted = [e for e in req.extras] or [""]
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in wanted):
                todo.append(sub)
    return seen


def _imports(path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node.lineno))
    return found


def test_every_import_of_the_operator_package_is_in_the_operator_image():
    available = _image_distributions()
    providers = md.packages_distributions()
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for module, line in _imports(path):
            if module in sys.stdlib_module_names or module == "ragtune":
                continue
            dists = {_normalise(d) for d in providers.get(module, [])}
            if module.startswith("ragtune") or not dists & available:
                missing.append(f"{path.relative_to(REPO_ROOT)}:{line}: import {module}")
    assert missing == [], ("not in the operator image (only operator/ragtune + the `operator` extra):\n"
                           + "\n".join(missing))


def test_operator_constraints_pin_the_operator_dependencies():
    pins = {}
    for line in (REPO_ROOT / "operator" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            specs = list(req.specifier)
            assert len(specs) == 1 and specs[0].operator == "==", f"operator/constraints.txt: {line!r} is not a == pin"
            pins[_normalise(req.name)] = specs[0].version
    # Direct dependencies strictly; transitive ones drift with PyPI, so a pin may go stale or be
    # missing until the file is regenerated (pip -c tolerates both).
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    for raw in project["dependencies"] + project["optional-dependencies"]["operator"]:
        req = Requirement(raw)
        assert _normalise(req.name) in pins, f"operator/constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pins[_normalise(req.name)]), f"pin of {req.name} breaks pyproject's {raw!r}"
