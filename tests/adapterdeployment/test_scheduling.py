"""Placement of the serving pods (spec.server: nodeSelector, tolerations, affinity,
priorityClassName) and the stable server's PodDisruptionBudget: rendered objects and validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ragtune.adapterdeployment import render
from ragtune.api.finetunejob import ResourcesSpec

from .test_render import ADAPTERS, IMAGE, OWNER, make_spec

AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In", "values": ["H100", "A100"]}]}]},
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 10, "preference": {"matchExpressions": [{"key": "gpu.mem", "operator": "Gt", "values": ["40"]}]}}],
    },
    "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": {
        "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "chat"},
                          "matchExpressions": [{"key": "ragtune.dev/track", "operator": "Exists"}]},
        "topologyKey": "kubernetes.io/hostname"}}]},
}
PLACED = {"nodeSelector": {"pool": "gpu"}, "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
          "affinity": AFFINITY, "priorityClassName": "serving-high"}


@pytest.mark.parametrize("backend", ["tgi", "vllm"])
def test_stable_and_canary_pods_carry_the_placement_as_given(backend):
    spec = make_spec(server={"backend": backend, **PLACED})
    for canary in (False, True):
        pod = render.deployment(spec, ADAPTERS[:1], OWNER, canary=canary, operator_image=IMAGE)["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"pool": "gpu"}
        assert pod["tolerations"] == PLACED["tolerations"]
        assert pod["affinity"] == AFFINITY  # the core/v1 wire form, unchanged
        assert pod["priorityClassName"] == "serving-high"


def test_no_placement_renders_no_placement_fields():
    pod = render.deployment(make_spec(), ADAPTERS, OWNER, canary=False, operator_image=IMAGE)["spec"]["template"]["spec"]
    assert not {"nodeSelector", "tolerations", "affinity", "priorityClassName"} & set(pod)
    job = render.eval_job(make_spec(), OWNER, 1, {"candidates": []}, IMAGE)["spec"]["template"]["spec"]
    assert "priorityClassName" not in job


def test_a_placement_change_rolls_the_pods():
    before = render.deployment(make_spec(), ADAPTERS, OWNER, canary=False, operator_image=IMAGE)
    after = render.deployment(make_spec(server={"priorityClassName": "serving-high"}), ADAPTERS, OWNER,
                              canary=False, operator_image=IMAGE)
    assert render.live_template_hash(before) != render.live_template_hash(after)


def test_the_evaluator_gets_the_priority_but_not_the_gpu_placement():
    job = render.eval_job(make_spec(server=PLACED), OWNER, 3, {"candidates": []}, IMAGE)
    pod = job["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "serving-high"
    assert not {"nodeSelector", "tolerations", "affinity"} & set(pod)


BAD = [
    ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "In"}]}]}}}}, "needs at least one value"),
    ({"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "preference": {
        "matchExpressions": [{"key": "mem", "operator": "Gt", "values": ["lots"]}]}}]}}}, "exactly one integer"),
    ({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
        "labelSelector": {"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["x"]}]},
        "topologyKey": "kubernetes.io/hostname"}]}}}, "takes no values"),
    ({"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
        "labelSelector": {"matchLabels": {"bad key!": "x"}}, "topologyKey": "kubernetes.io/hostname"}]}}},
     "matchLabels key"),
    ({"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
        "labelSelector": {}, "topologyKey": "kubernetes.io/hostname", "namespaces": ["other"]}]}}}, "namespaces"),
    ({"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 0, "preference": {
        "matchExpressions": [{"key": "a", "operator": "Exists"}]}}]}}}, "weight"),
    ({"priorityClassName": "Not_A_Name"}, "priorityClassName"),
    ({"deploymentRef": {"name": "tgi"}, "priorityClassName": "serving-high"}, "deploymentRef"),
    ({"deploymentRef": {"name": "tgi"}, "affinity": {}}, "deploymentRef"),
]


@pytest.mark.parametrize("server, message", BAD, ids=[m for _, m in BAD])
def test_bad_placement_is_refused_naming_what_is_wrong(server, message):
    with pytest.raises(ValidationError) as err:
        make_spec(server=server)
    assert message in str(err.value)


def test_finetunejob_and_adapterdeployment_share_one_toleration_type():
    from ragtune.api import adapterdeployment, common

    assert ResourcesSpec.model_fields["tolerations"].annotation == list[common.Toleration]
    assert adapterdeployment.ServerSpec.model_fields["tolerations"].annotation == list[common.Toleration]


# --- the stable server's PodDisruptionBudget ------------------------------------------------


@pytest.mark.parametrize("backend, name", [("tgi", "chat-tgi"), ("vllm", "chat-server")])
def test_the_budget_selects_exactly_the_stable_pods_one_at_a_time(backend, name):
    spec = make_spec(server={"backend": backend, "replicas": 3})
    pdb = render.pod_disruption_budget(spec, OWNER)
    assert pdb["apiVersion"] == "policy/v1" and pdb["metadata"]["name"] == name
    assert pdb["metadata"]["ownerReferences"] == [OWNER.reference()]  # deleted with the AdapterDeployment
    assert pdb["spec"]["maxUnavailable"] == 1 and pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    stable = render.deployment(spec, ADAPTERS[:1], OWNER, canary=False, operator_image=IMAGE)
    canary = render.deployment(spec, ADAPTERS[:1], OWNER, canary=True, operator_image=IMAGE)
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selector == stable["spec"]["selector"]["matchLabels"]
    labels = canary["spec"]["template"]["metadata"]["labels"]
    assert not all(labels.get(k) == v for k, v in selector.items())  # the canary is not protected


@pytest.mark.parametrize("server", [{"replicas": 1}, {"replicas": 0}, {"replicas": 4, "deploymentRef": {"name": "tgi"}}])
def test_no_budget_for_one_replica_or_someone_elses_deployment(server):
    assert render.pod_disruption_budget(make_spec(server=server), OWNER) is None


def test_the_controller_creates_updates_and_removes_the_budget():
    from .fakekube import FakeKube
    from .test_rollout import ad, edit, ftj, tick

    kube = FakeKube()
    ftj(kube, "ftj1")
    ad(kube, server={"gpus": 0, "replicas": 2}, strategy={"type": "Direct"})
    tick(kube)
    assert kube.kinds("PodDisruptionBudget") == []  # nothing serves yet
    kube.ready("chat-tgi")
    assert tick(kube).phase == "Ready"
    pdb = kube.get("PodDisruptionBudget", "ns", "chat-tgi")
    assert pdb["spec"]["maxUnavailable"] == 1 and pdb["metadata"]["ownerReferences"][0]["uid"] == "uid-chat"
    writes = len(kube.writes)
    tick(kube)
    assert len(kube.writes) == writes  # in place: not written again
    # someone edits it: put back
    kube.objects[("PodDisruptionBudget", "ns", "chat-tgi")]["spec"]["maxUnavailable"] = 2
    tick(kube)
    assert kube.get("PodDisruptionBudget", "ns", "chat-tgi")["spec"]["maxUnavailable"] == 1
    edit(kube, server={"gpus": 0, "replicas": 1})
    tick(kube)
    kube.ready("chat-tgi")
    assert tick(kube).phase == "Ready"
    assert kube.kinds("PodDisruptionBudget") == []


def test_a_budget_of_that_name_that_is_not_ours_is_left_alone():
    from .fakekube import FakeKube
    from .test_rollout import ad, ftj, tick

    kube = FakeKube()
    ftj(kube, "ftj1")
    theirs = {"kind": "PodDisruptionBudget", "metadata": {"name": "chat-tgi", "namespace": "ns"},
              "spec": {"minAvailable": 1}}
    kube.create(theirs)
    ad(kube, server={"gpus": 0, "replicas": 1}, strategy={"type": "Direct"})
    tick(kube)
    kube.ready("chat-tgi")
    assert tick(kube).phase == "Ready"
    assert kube.get("PodDisruptionBudget", "ns", "chat-tgi")["spec"] == {"minAvailable": 1}


def test_a_backend_switch_moves_the_budget_to_the_new_server():
    from .test_vllm_dynamic import V1, Cluster, _adapter

    c = Cluster(replicas=2)
    c.ad([_adapter("support", V1)])
    c.kube.objects[("AdapterDeployment", "ns", "chat")]["spec"]["server"] = {"gpus": 0, "replicas": 2}  # TGI
    c.tick()
    c.kube.ready("chat-tgi")
    assert c.tick().phase == "Ready" and c.kube.kinds("PodDisruptionBudget") == ["chat-tgi"]
    c.kube.merge_patch("AdapterDeployment", "ns", "chat", {"spec": {"server": {
        "backend": "vllm", "gpus": 0, "replicas": 2, "vllm": {"maxLoras": 2}}}})
    c.tick()
    assert c.kube.kinds("PodDisruptionBudget") == ["chat-tgi"]  # TGI serves until vLLM does
    c.start_pods()
    for pod in ("chat-server-0", "chat-server-1"):
        c.serve(pod, {"support": V1})
    s = c.tick()
    assert s.phase == "Ready" and s.deployment_name == "chat-server"
    assert c.kube.kinds("PodDisruptionBudget") == ["chat-server"]
    selector = c.kube.get("PodDisruptionBudget", "ns", "chat-server")["spec"]["selector"]["matchLabels"]
    assert selector == c.kube.get("Deployment", "ns", "chat-server")["spec"]["selector"]["matchLabels"]
