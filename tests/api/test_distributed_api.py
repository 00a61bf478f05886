"""resources.nodes and training.distributed: defaults, limits, and the combination that cannot work."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ragtune.api.finetunejob import DistributedStrategy, FineTuneJobSpec

BASE = {"baseModel": {"id": "tiny/model"}, "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/runs"}}


def _spec(**extra) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({**BASE, **extra})


def test_one_node_and_auto_by_default_and_left_out_of_the_wire_defaults():
    spec = _spec()
    assert spec.resources.nodes == 1 and spec.training.distributed.strategy == DistributedStrategy.AUTO
    # Defaults stay out of the spec hash's input, so existing runs keep their Job.
    wire = spec.model_dump(by_alias=True, exclude_defaults=True, exclude_none=True, mode="json")
    assert "resources" not in wire and "training" not in wire


def test_several_cpu_nodes_are_allowed():
    spec = _spec(resources={"nodes": 2, "gpus": 0}, training={"distributed": {"strategy": "ddp"}})
    assert (spec.resources.nodes, spec.resources.gpus) == (2, 0)


@pytest.mark.parametrize("nodes", [0, 65])
def test_nodes_out_of_range_names_the_field(nodes):
    with pytest.raises(ValidationError) as err:
        _spec(resources={"nodes": nodes})
    assert err.value.errors()[0]["loc"] == ("resources", "nodes")


def test_fsdp_cannot_shard_an_8bit_base():
    with pytest.raises(ValidationError, match="training.distributed.strategy fsdp cannot shard an 8-bit"):
        _spec(method="lora", quantization={"bits": 8}, training={"distributed": {"strategy": "fsdp"}})
    # 4-bit QLoRA and an unquantised LoRA base can be sharded.
    _spec(method="qlora", training={"distributed": {"strategy": "fsdp"}})
    _spec(method="lora", training={"distributed": {"strategy": "fsdp"}})


def test_the_crd_carries_the_rule_with_the_field_named():
    from ragtune.api.crdgen import build_crds

    crd = build_crds()["ragtune.dev_finetunejobs.yaml"]
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = {r.get("fieldPath"): r["rule"] for r in spec["x-kubernetes-validations"]}
    assert "quantization.bits != 8" in rules[".training.distributed.strategy"]
    nodes = spec["properties"]["resources"]["properties"]["nodes"]
    assert (nodes["minimum"], nodes["maximum"], nodes["default"]) == (1, 64, 1)
