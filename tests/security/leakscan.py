"""Look for credentials where they must never be: object specs and statuses, Events, pod logs,
the operator's log, pod-runner state (logs, termination messages) and reports in S3.

Usable on any finished run: `scan(kubectl, namespaces, secrets, paths=..., s3_objects=...)` with the
secret values that were in play. A value is also looked for base64-encoded, since a leak through a
manifest or a header would appear that way.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

# What is read from the API in each namespace. Secrets themselves are excluded: they are where
# the values legitimately live.
API_KINDS = ("finetunejobs.ragtune.dev", "adapterdeployments.ragtune.dev", "jobs.batch", "pods",
             "deployments.apps", "services", "configmaps", "events")


@dataclass(frozen=True)
class Finding:
    where: str
    needle: str

    def __str__(self) -> str:
        return f"{self.needle} found in {self.where}"


def _needles(secrets: Iterable[str]) -> dict[str, str]:
    """value or its base64 -> a label that does not repeat the value."""
    out = {}
    for i, value in enumerate(s for s in secrets if s):
        assert len(value) >= 8, "scan for distinctive values only (short ones match by chance)"
        out[value] = f"secret #{i}"
        out[base64.b64encode(value.encode()).decode()] = f"secret #{i} (base64)"
    return out


def _search(text: str, where: str, needles: dict[str, str]) -> list[Finding]:
    return [Finding(where, label) for needle, label in needles.items() if needle in text]


def scan(kubectl: Callable[..., str], namespaces: Iterable[str], secrets: Iterable[str],
         paths: Iterable[Path] = (), s3_objects: Iterable[tuple[str, bytes]] = ()) -> list[Finding]:
    """`kubectl(*args) -> stdout`. `paths`: files or directories (searched recursively)."""
    needles = _needles(secrets)
    findings: list[Finding] = []
    for ns in namespaces:
        for kind in API_KINDS:
            findings += _search(kubectl("get", kind, "-n", ns, "-o", "json"), f"{kind} in {ns}", needles)
        pods = json.loads(kubectl("get", "pods", "-n", ns, "-o", "json"))["items"]
        for pod in pods:
            for container in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
                name = f"{pod['metadata']['name']}/{container['name']}"
                logs = kubectl("logs", "-n", ns, pod["metadata"]["name"], "-c", container["name"], check=False)
                findings += _search(logs, f"log of pod {ns}/{name}", needles)
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            if path.is_symlink() or not path.exists():
                continue
            findings += _search(path.read_bytes().decode("utf-8", "replace"), str(path), needles)
    for key, body in s3_objects:
        findings += _search(body.decode("utf-8", "replace"), f"S3 object {key}", needles)
    return findings
