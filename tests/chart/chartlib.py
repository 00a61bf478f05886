"""Helpers shared by the chart and security tests: render the chart with the platform's helm."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "ragtune"
# Offline rendering has no cluster to ask; this is the local platform's Kubernetes minor.
KUBE_VERSION = "1.36.0"


def helm_binary() -> Path:
    from ragtune_local.paths import binary

    path = binary("helm")
    if not path.exists():
        raise FileNotFoundError(f"helm not built at {path}: run `make platform` (localplatform/build.sh helm)")
    return path


def helm(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def set_args(values: dict[str, Any]) -> list[str]:
    """`--set-json key=<json>` for each dotted key (keeps types exact, unlike --set)."""
    out: list[str] = []
    for key, value in values.items():
        out += ["--set-json", f"{key}={json.dumps(value)}"]
    return out


@dataclass
class Rendered:
    docs: list[dict]

    def of_kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d.get("kind") == kind]

    def one(self, kind: str) -> dict:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, got {len(found)}"
        return found[0]

    @property
    def container(self) -> dict:
        return self.one("Deployment")["spec"]["template"]["spec"]["containers"][0]


def render(values: dict[str, Any] | None = None, namespace: str = "ragtune-system",
           release: str = "ragtune", include_crds: bool = False) -> Rendered:
    args = ["template", release, str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION]
    if include_crds:
        args.append("--include-crds")
    text = helm(*args, *set_args(values or {})).stdout
    return Rendered([d for d in yaml.safe_load_all(text) if d])


def rbac_rules(rendered: Rendered) -> list[dict]:
    """Every rule of every Role/ClusterRole the chart renders."""
    return [r for kind in ("Role", "ClusterRole") for obj in rendered.of_kind(kind) for r in obj["rules"]]


def permissions(rules: list[dict]) -> set[tuple[str, str, str]]:
    """Rules flattened to (apiGroup, resource[/subresource], verb)."""
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def kubectl(kubeconfig: str | Path, *args: str, stdin: str | None = None, check: bool = True) -> str:
    """Run the platform's kubectl; returns stdout (raises with stderr on failure when `check`)."""
    from ragtune_local.paths import kubectl_binary

    proc = subprocess.run([kubectl_binary(), f"--kubeconfig={kubeconfig}", *args], input=stdin,
                          capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout if proc.returncode == 0 else proc.stdout + proc.stderr


def wait_for(what: str, check, timeout: float = 120.0, interval: float = 1.0):
    """Poll `check()` until it returns something truthy; fail naming `what` and the last value."""
    import time

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


# The pod runner's test double of the trainer (localplatform/ragtune_local/testdoubles/fake_trainer.py): its behaviour is
# picked by the dataset URI, e.g. `s3://fake-trainer/succeed/2` succeeds after 2 s of progress.
FAKE_TRAINER_IMAGE = "ragtune.test/fake-trainer:dev"


def finetunejob(name: str, namespace: str, s3_endpoint: str, secret: str = "s3-credentials",
                image: str | None = None, train: str = "s3://ragtune-test/data/train.jsonl") -> dict:
    """A small, valid FineTuneJob (CPU, tiny step count)."""
    spec: dict[str, Any] = {
        "baseModel": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "main"},
        "dataset": {"train": train},
        "method": "lora",
        "training": {"maxSteps": 2},
        "output": {"uri": "s3://ragtune-test/runs"},
        "s3": {"endpoint": s3_endpoint, "credentialsSecretRef": {"name": secret}},
        "backoffLimit": 0,
        # Small enough for the local runner node (no GPU).
        "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi", "shmSize": "64Mi"},
    }
    if image:
        spec["resources"]["image"] = image
    return {"apiVersion": "ragtune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}
