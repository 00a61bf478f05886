"""Every valid AdapterDeployment name gives valid child objects: the names and label values derived
from it are checked by rules here and, on the real API server, by a server-side dry run."""

from __future__ import annotations

import re

import pytest
import yaml

from ragtune import workloads
from ragtune.adapterdeployment import render
from ragtune.api.adapterdeployment import AdapterDeploymentSpec, ResolvedAdapter

# Valid object names (DNS-1123 subdomains) that were not valid in every child: a dot, a digit first,
# 60 characters (the suffixes push past 63), the longest allowed name.
NAMES = ["chat", "my.ad", "9lives", "a" * 60, "b" * 63, "c" * 200 + ".d" * 26]
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def _spec() -> AdapterDeploymentSpec:
    return AdapterDeploymentSpec.model_validate({
        "baseModel": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "main"},
        "adapters": [{"name": "support", "uri": "s3://models/runs/r1/", "sha256": "a" * 64}],
        "s3": {"endpoint": "http://minio.storage:9000", "credentialsSecretRef": {"name": "s3-credentials"}},
    })


def _children(name: str, namespace: str = "team-a") -> list[dict]:
    owner = render.Owner(name, namespace, "0b5c7d1e-0000-4000-8000-000000000001")
    adapters = [ResolvedAdapter(name="support", uri="s3://models/runs/r1/", sha256="a" * 64)]
    spec = _spec()
    vllm = AdapterDeploymentSpec.model_validate({**spec.to_wire(), "server": {"backend": "vllm"}})
    return [render.deployment(spec, adapters, owner, canary=canary, operator_image="op:1") for canary in (False, True)] \
        + [render.service(spec, owner, canary=canary) for canary in (False, True)] \
        + [render.eval_job(spec, owner, 3, {"candidates": []}, "op:1")] \
        + [render.deployment(vllm, adapters, owner, canary=canary, operator_image="op:1") for canary in (False, True)] \
        + [render.service(vllm, owner, canary=canary) for canary in (False, True)] \
        + [render.adapter_set_configmap(vllm, adapters, owner, canary=canary, generation=3) for canary in (False, True)]


def _labels(obj: dict) -> list[str]:
    template = (obj.get("spec") or {}).get("template") or {}
    return list(obj["metadata"].get("labels", {}).values()) + list((template.get("metadata") or {}).get(
        "labels", {}).values())


@pytest.mark.parametrize("name", NAMES, ids=lambda n: n[:12] + f"..{len(n)}")
def test_children_have_valid_names_and_label_values(name):
    for obj in _children(name):
        assert len(obj["metadata"]["name"]) <= 63 and DNS_1035.fullmatch(obj["metadata"]["name"]), obj["metadata"]
        for value in _labels(obj):
            assert len(value) <= 63 and LABEL_VALUE.fullmatch(value), value
    # The full name travels in an annotation (the label may be shortened).
    assert all(o["metadata"]["annotations"]["ragtune.dev/adapterdeployment-name"] == name
               for o in _children(name) if o["kind"] != "Service")


def test_derived_names_are_deterministic_distinct_and_unchanged_when_they_fit():
    assert render.stable_name("chat") == "chat-tgi" and render.canary_name("chat") == "chat-tgi-canary"
    assert render.eval_job_name("chat", 2) == "chat-eval-g2"
    assert (render.stable_name("chat", "vllm"), render.canary_name("chat", "vllm")) == ("chat-server", "chat-server-canary")
    assert (render.adapter_set_name("chat", False), render.adapter_set_name("chat", True)) == \
        ("chat-server-adapters", "chat-server-canary-adapters")
    long_a, long_b = "x" * 62 + "a", "x" * 62 + "b"
    assert render.stable_name(long_a) != render.stable_name(long_b)
    assert render.stable_name(long_a) == render.stable_name(long_a)
    assert render.stable_name("my.ad") != render.stable_name("my-ad")  # the dot is not simply dropped
    assert workloads.label_value("x" * 100) != workloads.label_value("x" * 99 + "y")
    assert workloads.label_value("support") == "support"


@pytest.mark.parametrize("name", NAMES, ids=lambda n: n[:12] + f"..{len(n)}")
def test_the_api_server_accepts_every_child(platform, namespace, name):
    objs = _children(name, namespace)
    for obj in objs:
        obj["metadata"].pop("ownerReferences")  # the owner does not exist in this dry run
    platform.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(objs))
