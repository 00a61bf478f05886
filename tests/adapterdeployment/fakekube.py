"""An in-memory API server for fast state-machine tests of the rollout (unit level only: the
integration tests run the same code against the real kube-apiserver of the local platform).

It keeps what the rollout relies on: resourceVersion conflicts, create conflicts (409),
`metadata.generation` bumps on spec changes, merge-patch of the status subresource, label
selection of pods. Controllers (Deployment, Job, kubelet) are played by the test through
`ready()`, `add_pod()` and friends.
"""

from __future__ import annotations

import copy
import itertools
import json
from typing import Any, Optional

from ragtune.adapterdeployment import render
from ragtune.runtime.kube import KubeError

_rv = itertools.count(1)


def _merge(target: dict, patch: dict) -> dict:
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge(target[k], v)
        else:
            target[k] = copy.deepcopy(v)
    return target


class FakeKube:
    def __init__(self):
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.events: list[tuple[str, str, str]] = []
        self.writes: list[tuple[str, str, str]] = []

    # --- the API the rollout uses ----------------------------------------------------------

    def get(self, kind: str, namespace: str, name: str) -> Optional[dict[str, Any]]:
        obj = self.objects.get((kind, namespace, name))
        return copy.deepcopy(obj) if obj else None

    def list(self, kind: str, namespace: str, selector: dict[str, str]) -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for (k, ns, _), o in sorted(self.objects.items())
                if k == kind and ns == namespace
                and all((o["metadata"].get("labels") or {}).get(a) == b for a, b in selector.items())]

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        if key in self.objects:
            return self.get(*key)
        obj = copy.deepcopy(obj)
        obj["metadata"].update(resourceVersion=str(next(_rv)), generation=1, uid=f"uid-{key[2]}",
                               creationTimestamp=self.now_stamp())
        self.objects[key] = obj
        self.writes.append(("create", obj["kind"], key[2]))
        return copy.deepcopy(obj)

    def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        current = self.objects.get(key)
        if current is None:
            raise KubeError.from_response(404, "PUT", str(key), "{}")
        if obj["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            raise KubeError.from_response(409, "PUT", str(key), json.dumps({"reason": "Conflict"}))
        new = copy.deepcopy(obj)
        new["metadata"]["generation"] = current["metadata"]["generation"] + (new.get("spec") != current.get("spec"))
        new["metadata"]["resourceVersion"] = str(next(_rv))
        new["metadata"]["creationTimestamp"] = current["metadata"]["creationTimestamp"]
        new["status"] = current.get("status", {})
        self.objects[key] = new
        self.writes.append(("replace", obj["kind"], key[2]))
        return copy.deepcopy(new)

    def merge_patch(self, kind: str, namespace: str, name: str, body: dict[str, Any], sub: Optional[str] = None):
        current = self.objects[(kind, namespace, name)]
        rv = body.get("metadata", {}).get("resourceVersion")
        if rv and rv != current["metadata"]["resourceVersion"]:
            raise KubeError.from_response(409, "PATCH", name, json.dumps({"reason": "Conflict"}))
        if sub == "status":
            current.setdefault("status", {})
            _merge(current["status"], body.get("status") or {})
        else:
            before = copy.deepcopy(current.get("spec"))
            _merge(current, {k: v for k, v in body.items() if k != "metadata"})
            if current.get("spec") != before:
                current["metadata"]["generation"] += 1
        current["metadata"]["resourceVersion"] = str(next(_rv))
        return copy.deepcopy(current)

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        found = self.objects.pop((kind, namespace, name), None) is not None
        if found:
            self.writes.append(("delete", kind, name))
            owned = [k for k, o in self.objects.items() if k[0] == "Pod" and
                     (o["metadata"].get("labels") or {}).get("owner") == name]
            for k in owned:
                del self.objects[k]
        return found

    def event(self, involved: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))

    # --- playing the controllers -----------------------------------------------------------

    clock = 1_800_000_000.0

    def now_stamp(self) -> str:
        import time

        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock))

    def ready(self, name: str, namespace: str = "ns") -> None:
        """The Deployment controller finished rolling `name` out."""
        dep = self.objects[("Deployment", namespace, name)]
        n = dep["spec"]["replicas"]
        dep["status"] = {"observedGeneration": dep["metadata"]["generation"], "replicas": n,
                         "updatedReplicas": n, "readyReplicas": n, "availableReplicas": n}

    def add_pod(self, deployment: str, namespace: str = "ns", *, init: Optional[dict] = None,
                container: Optional[dict] = None) -> dict[str, Any]:
        """A pod of the Deployment's current template with the given container statuses."""
        dep = self.objects[("Deployment", namespace, deployment)]
        template = dep["spec"]["template"]
        name = f"{deployment}-{next(_rv)}"
        pod = {"kind": "Pod", "metadata": {
            "name": name, "namespace": namespace,
            "labels": {**template["metadata"]["labels"], "owner": deployment},
            "annotations": dict(template["metadata"].get("annotations") or {})},
            "status": {"phase": "Pending",
                       "initContainerStatuses": [{"name": render.FETCH_CONTAINER, **(init or {})}],
                       "containerStatuses": [{"name": "text-generation-inference", "restartCount": 0,
                                              **(container or {})}]}}
        self.objects[("Pod", namespace, name)] = pod
        return pod

    def finish_job(self, name: str, message: str, exit_code: int = 0, namespace: str = "ns") -> None:
        """The evaluation Job's pod terminated with `message` as its termination message."""
        self.objects[("Pod", namespace, f"{name}-pod")] = {"kind": "Pod", "metadata": {
            "name": f"{name}-pod", "namespace": namespace, "labels": {"job-name": name, "owner": name}},
            "status": {"containerStatuses": [{"name": "online-eval", "state": {"terminated": {
                "exitCode": exit_code, "message": message}}}]}}

    def kinds(self, kind: str) -> list[str]:
        return sorted(n for k, _, n in self.objects if k == kind)
