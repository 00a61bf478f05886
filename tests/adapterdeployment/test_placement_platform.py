"""Placement and the PodDisruptionBudget on the real kube-apiserver: the CRD's admission rules of
`spec.server.affinity`/`priorityClassName` (they compile and refuse what they should), and the
stable server's PDB as the disruption controller sees it (it selects exactly the stable pods)."""

from __future__ import annotations

import copy
import json
import time

import pytest

from tests.adapterdeployment.test_integration import (  # noqa: F401 (fixtures)
    ad_body,
    finished,
    kube,
    operator,
    store,
    tiny,
    wait_status,
)

from .test_scheduling import AFFINITY

pytestmark = [pytest.mark.platform]

BODY = {"apiVersion": "ragtune.dev/v1alpha1", "kind": "AdapterDeployment", "metadata": {"name": "placed"},
        "spec": {"baseModel": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                 "adapters": [{"name": "support", "uri": "s3://models/runs/r1/", "sha256": "a" * 64}]}}


def dry_run(platform, namespace: str, server: dict) -> str:
    body = copy.deepcopy(BODY)
    body["metadata"]["namespace"] = namespace
    body["spec"]["server"] = server
    return platform.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(body), check=False)


@pytest.fixture(scope="module")
def crds(platform):
    platform.install_crds()


def node_terms(*requirements: dict) -> dict:
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": list(requirements)}]}}}


REFUSED = [
    ("in-without-values", {"affinity": node_terms({"key": "zone", "operator": "In"})},
     "In and NotIn need at least one value"),
    ("gt-not-an-integer", {"affinity": node_terms({"key": "mem", "operator": "Gt", "values": ["lots"]})},
     "Gt and Lt exactly one integer"),
    ("exists-with-values", {"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
        "labelSelector": {"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["x"]}]},
        "topologyKey": "kubernetes.io/hostname"}]}}}, "Exists and DoesNotExist none"),
    ("weight-zero", {"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 0, "preference": {"matchExpressions": [{"key": "a", "operator": "Exists"}]}}]}}}, "weight"),
    ("deploymentref", {"deploymentRef": {"name": "tgi"}, "priorityClassName": "serving-high"},
     "affinity and priorityClassName place ragtune's own server pods"),
]


def test_admission_accepts_a_full_placement(platform, namespace, crds):
    out = dry_run(platform, namespace, {"affinity": AFFINITY, "priorityClassName": "serving-high",
                                        "tolerations": [{"key": "gpu", "operator": "Exists"}]})
    assert "created (server dry run)" in out, out


@pytest.mark.parametrize("server, message", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_admission_refuses_bad_placement_naming_the_rule(platform, namespace, crds, server, message):
    out = dry_run(platform, namespace, server)
    assert "created" not in out and message in out, out


@pytest.mark.slow
def test_the_stable_servers_budget_covers_its_pods_and_goes_with_the_adapterdeployment(
        platform, namespace, operator, kube, tiny, store):  # noqa: F811 (fixtures)
    good = store("good", tiny["good"])
    body = ad_body(platform, namespace, tiny, [{"name": "support", **good}], store, strategy={"type": "Direct"},
                   gates={"requireOfflinePass": False}, server={"replicas": 2})
    platform.apply(body)
    status = wait_status(kube, namespace, finished(1))
    assert status["phase"] == "Ready", status
    pdb = kube.get("PodDisruptionBudget", namespace, "chat-tgi")
    assert pdb["spec"]["maxUnavailable"] == 1
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (pdb.get("status") or {}).get("currentHealthy") != 2:
        time.sleep(0.5)
        pdb = kube.get("PodDisruptionBudget", namespace, "chat-tgi")
    # the disruption controller counts exactly the two stable pods and allows one eviction
    assert (pdb["status"]["expectedPods"], pdb["status"]["currentHealthy"], pdb["status"]["disruptionsAllowed"]) == \
        (2, 2, 1), pdb["status"]
    platform.kubectl("-n", namespace, "delete", "adapterdeployment", "chat", "--wait=true", timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and kube.get("PodDisruptionBudget", namespace, "chat-tgi") is not None:
        time.sleep(0.5)
    assert kube.get("PodDisruptionBudget", namespace, "chat-tgi") is None  # garbage-collected with its owner
