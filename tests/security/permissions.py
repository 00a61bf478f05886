"""The operator's permissions: exactly the API calls its code makes (the README's table is this
list; the chart's Roles/ClusterRole must equal it).

`used_by` says which code path makes the call, so the audit-log test knows which entries a
FineTuneJob run must exercise and which belong to other paths:
`kopf` (framework, every run), `finetunejob` (finetunejob/, runtime/kube.py),
`adapterdeployment` (adapterdeployment/), `leader` (runtime/leader.py), `kueue` (finetunejob/kueue.py:
only while a run with `spec.queueName` waits), `admission` (needed only on
clusters running the OwnerReferencesPermissionEnforcement admission plugin).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Permission:
    group: str
    resource: str
    verb: str
    used_by: str
    why: str


def _many(group: str, resource: str, verbs: str, used_by: str, why: str) -> list[Permission]:
    return [Permission(group, resource, v, used_by, why) for v in verbs.split()]


PERMISSIONS: list[Permission] = [
    *_many("ragtune.dev", "finetunejobs", "list watch", "kopf", "watch FineTuneJobs"),
    *_many("ragtune.dev", "finetunejobs", "get", "adapterdeployment", "resolve `fineTuneJobRef` adapters"),
    *_many("ragtune.dev", "adapterdeployments", "list watch", "kopf", "watch AdapterDeployments"),
    *_many("ragtune.dev", "adapterdeployments", "patch", "adapterdeployment",
           "kopf adds/removes its finalizer and progress annotations on each AdapterDeployment"),
    *_many("ragtune.dev", "adapterdeployments", "get", "adapterdeployment", "re-read before a status write"),
    *_many("ragtune.dev", "finetunejobs/status", "patch", "finetunejob", "phase, conditions, progress, results"),
    *_many("ragtune.dev", "adapterdeployments/status", "patch", "adapterdeployment", "rollout state"),
    *_many("ragtune.dev", "finetunejobs/finalizers", "update", "admission",
           "blockOwnerDeletion on the Jobs it owns (OwnerReferencesPermissionEnforcement)"),
    *_many("ragtune.dev", "adapterdeployments/finalizers", "update", "admission",
           "blockOwnerDeletion on the Deployments/Services/Jobs it owns"),
    *_many("batch", "jobs", "list watch", "kopf", "watch the training Jobs it created (label selector)"),
    *_many("batch", "jobs", "create patch delete", "finetunejob", "create, suspend/resume, clean up training Jobs"),
    *_many("batch", "jobs", "get", "adapterdeployment", "online-evaluation Job of a canary"),
    *_many("", "pods", "list watch", "kopf", "trainer pod status: failures and termination messages"),
    *_many("", "pods/log", "get", "finetunejob", "sample RAGTUNE_PROGRESS lines from the trainer log"),
    *_many("apps", "deployments", "create get update delete", "adapterdeployment", "TGI stable and canary Deployments"),
    *_many("", "services", "create get delete", "adapterdeployment", "TGI stable and canary Services (get: adopt one that exists)"),
    *_many("policy", "poddisruptionbudgets", "create get update delete", "adapterdeployment",
           "the PodDisruptionBudget of the stable server (replicas > 1; update: replicas changed, delete: one replica)"),
    *_many("", "configmaps", "create get update delete", "adapterdeployment",
           "the desired adapter set of a vLLM server and canary (its sidecars load it; update: a new set, no restart)"),
    *_many("gateway.networking.k8s.io", "httproutes", "create get update delete", "adapterdeployment",
           "the HTTPRoute of a `Canary` strategy: weights of the stable and canary Services"),
    *_many("kueue.x-k8s.io", "workloads", "list", "kueue",
           "why a run with spec.queueName waits (listed only while one is queued)"),
    *_many("", "events", "create", "kopf", "an Event on every transition"),
    *_many("coordination.k8s.io", "leases", "create get update", "leader",
           "leader election between replicas (release namespace only; get/update only the Lease ragtune-operator)"),
]


def flatten(perms: list[Permission] = PERMISSIONS) -> set[tuple[str, str, str]]:
    return {(p.group, p.resource, p.verb) for p in perms}
