"""The chart's NetworkPolicies: ragtune's pods (the operator, and the trainer, TGI server with its
adapter fetcher and online evaluator the operator starts) may not reach cloud-metadata or
link-local addresses; on by default, per served namespace, configurable and schema-checked. vLLM
server pods take requests on the serving port from anyone, on the sidecar's status port only
from the operator."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
import yaml

from ragtune.api.keys import LABEL_MANAGED_BY, MANAGED_BY

from .chartlib import CHART

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
METADATA_RANGES = {"169.254.0.0/16", "100.100.100.200/32", "192.0.0.192/32", "168.63.129.16/32"}
METADATA_RANGES_V6 = {"fe80::/10", "fd00:ec2::254/128"}


def _errors(path: str, value) -> list:
    values = copy.deepcopy(VALUES)
    *parents, leaf = path.split(".")
    node = values
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return list(jsonschema.Draft7Validator(SCHEMA).iter_errors(values))


def test_on_by_default_with_the_metadata_ranges():
    policy = VALUES["networkPolicy"]
    assert policy["enabled"] is True
    assert set(policy["deniedCIDRs"]) == METADATA_RANGES | METADATA_RANGES_V6
    assert VALUES["s3AllowLoopback"] is False


@pytest.mark.parametrize("path, value", [
    ("networkPolicy.enabled", "yes"),
    ("networkPolicy.deniedCIDRs", ["169.254.169.254"]),      # not a CIDR
    ("networkPolicy.deniedCIDRs", ["metadata.google.internal/32"]),
    ("networkPolicy.deniedCIDRs", "169.254.0.0/16"),
    ("networkPolicy.extraEgress", [1]),
    ("networkPolicy.namespaces", ["Bad_NS"]),
    ("networkPolicy.deny", []),                               # unknown key
    ("s3AllowLoopback", "true"),
])
def test_schema_refuses_bad_values(path, value):
    errs = _errors(path, value)
    assert errs, f"{path}={value!r} accepted"


def test_workload_selector_is_the_label_on_every_pod_ragtune_starts():
    from ragtune.finetunejob.render import labels_for

    assert labels_for({"name": "x", "namespace": "ns", "uid": "u"}, 1, "r1")[LABEL_MANAGED_BY] == MANAGED_BY


def _policies(values=None, namespace="ragtune-system"):
    from .chartlib import render

    return {(p["metadata"]["namespace"], p["metadata"]["name"]): p
            for p in render(values or {}, namespace=namespace).of_kind("NetworkPolicy")}


def _denied(policy: dict) -> set[str]:
    blocks = [peer["ipBlock"] for rule in policy["spec"]["egress"] for peer in rule.get("to", []) if "ipBlock" in peer]
    assert {b["cidr"] for b in blocks} == {"0.0.0.0/0", "::/0"}
    return {c for b in blocks for c in b.get("except", [])}


@pytest.mark.platform
def test_default_render_denies_metadata_egress_for_operator_and_workloads():
    policies = {k: v for k, v in _policies().items() if k[1].endswith("-egress")}
    assert set(policies) == {("ragtune-system", "ragtune-operator-egress"), ("ragtune-system", "ragtune-workloads-egress")}
    operator = policies[("ragtune-system", "ragtune-operator-egress")]
    assert operator["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    workloads = policies[("ragtune-system", "ragtune-workloads-egress")]
    assert workloads["spec"]["podSelector"] == {"matchLabels": {LABEL_MANAGED_BY: MANAGED_BY}}
    for policy in policies.values():
        assert policy["spec"]["policyTypes"] == ["Egress"]
        assert _denied(policy) == METADATA_RANGES | METADATA_RANGES_V6
        v4 = next(p["ipBlock"] for r in policy["spec"]["egress"] for p in r.get("to", [])
                  if p.get("ipBlock", {}).get("cidr") == "0.0.0.0/0")
        assert set(v4["except"]) == METADATA_RANGES  # each family's exceptions inside its own block
        assert {"namespaceSelector": {}} in [p for r in policy["spec"]["egress"] for p in r["to"]]


@pytest.mark.platform
def test_every_served_namespace_gets_the_workload_policy():
    policies = _policies({"watch.namespaces": ["team-a", "team-b"]})
    assert {ns for ns, name in policies if name.endswith("workloads-egress")} == {"team-a", "team-b"}
    cluster = _policies({"watch.mode": "cluster", "networkPolicy.namespaces": ["ml"]})
    assert {ns for ns, name in cluster if name.endswith("workloads-egress")} == {"ml"}
    assert set(_policies({"watch.mode": "cluster"})) == {("ragtune-system", "ragtune-operator-egress")}
    assert {ns for ns, name in policies if name.endswith("vllm-ingress")} == {"team-a", "team-b"}


@pytest.mark.platform
def test_disabled_extra_egress_and_custom_ranges():
    assert _policies({"networkPolicy.enabled": False}) == {}
    extra = {"to": [{"ipBlock": {"cidr": "169.254.20.10/32"}}], "ports": [{"port": 53, "protocol": "UDP"}]}
    policies = _policies({"networkPolicy.extraEgress": [extra], "networkPolicy.deniedCIDRs": ["169.254.0.0/16"]})
    for key, policy in policies.items():
        if key[1].endswith("vllm-ingress"):
            continue
        assert policy["spec"]["egress"][-1] == extra
        blocks = [p["ipBlock"] for r in policy["spec"]["egress"][:-1] for p in r["to"] if "ipBlock" in p]
        assert {b["cidr"]: b.get("except") for b in blocks} == {"0.0.0.0/0": ["169.254.0.0/16"], "::/0": None}


@pytest.mark.platform
def test_loopback_allowance_reaches_the_operator():
    from .chartlib import render

    for value, expected in ((False, "false"), (True, "true")):
        env = {e["name"]: e.get("value") for e in render({"s3AllowLoopback": value}).container["env"]}
        assert env["RAGTUNE_S3_ALLOW_LOOPBACK"] == expected


@pytest.mark.platform
def test_vllm_pods_take_requests_on_the_serving_port_and_the_status_port_only_from_the_operator():
    """The names the policy uses are the ones the operator renders (port names, pod labels)."""
    from ragtune.adapterdeployment import render as ad_render
    from ragtune.api.adapterdeployment import AdapterDeploymentSpec

    policy = _policies({"watch.namespaces": ["team-a"]})[("team-a", "ragtune-vllm-ingress")]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    serving, status = policy["spec"]["ingress"]
    assert serving == {"ports": [{"port": "http", "protocol": "TCP"}]}  # every client
    assert status["ports"] == [{"port": "ragtune-sync", "protocol": "TCP"}]
    (peer,) = status["from"]
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "ragtune-system"}}
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"

    spec = AdapterDeploymentSpec.model_validate({
        "baseModel": {"id": "m", "revision": "r"}, "server": {"backend": "vllm"},
        "adapters": [{"name": "a", "uri": "s3://models/r/", "sha256": "a" * 64}]})
    dep = ad_render.deployment(spec, [], ad_render.Owner("chat", "team-a", "u"), canary=False, operator_image="i")
    template = dep["spec"]["template"]
    assert all(template["metadata"]["labels"][k] == v for k, v in policy["spec"]["podSelector"]["matchLabels"].items())
    ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
    assert ports == {"http", "ragtune-sync"}, "vLLM's own port is not a container port: loopback only"
