"""training.preference (the DPO stage): defaults, ranges and the rag-only rule, in the pydantic
model and in the generated CRD (the API server's side is tests/finetunejob/test_admission.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ragtune.api.crdgen import build_crds
from ragtune.api.finetunejob import FineTuneJobSpec

BASE = {"baseModel": {"id": "tiny/model"}, "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/runs"}}


def spec(**training) -> dict:
    return dict(BASE, training=training)


def test_the_stage_is_off_by_default_and_documented_defaults_apply():
    pref = FineTuneJobSpec.model_validate(BASE).training.preference
    assert (pref.enabled, pref.beta, pref.steps, pref.learning_rate, pref.batch_size) == (False, 0.1, 50, 5e-5, None)
    on = FineTuneJobSpec.model_validate(spec(preference={"enabled": True, "beta": 0.3, "steps": 7, "batchSize": 2}))
    assert on.training.preference.to_wire() == {"enabled": True, "beta": 0.3, "steps": 7, "learningRate": 5e-5,
                                                "batchSize": 2, "maxPairs": 10000, "automaticPairs": 0}


@pytest.mark.parametrize("pref, field", [({"beta": 0}, "beta"), ({"steps": 0}, "steps"), ({"automaticPairs": -1},
                                                                                         "automaticPairs"),
                                         ({"learningRate": 2}, "learningRate"), ({"epochs": 1}, "epochs")])
def test_out_of_range_values_name_the_field(pref, field):
    with pytest.raises(ValidationError) as err:
        FineTuneJobSpec.model_validate(spec(preference=pref))
    assert ("training", "preference", field) in [e["loc"] for e in err.value.errors()]


def test_preference_needs_rag_records():
    bad = dict(spec(preference={"enabled": True}), dataset={"train": "s3://data/t.jsonl", "format": "messages"})
    with pytest.raises(ValidationError, match="training.preference needs dataset.format rag"):
        FineTuneJobSpec.model_validate(bad)
    bad["training"]["preference"]["enabled"] = False  # configured but off: nothing to refuse
    FineTuneJobSpec.model_validate(bad)


def test_crd_carries_the_fields_defaults_ranges_and_the_cel_rule():
    crd = build_crds()["ragtune.dev_finetunejobs.yaml"]
    spec_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    pref = spec_schema["properties"]["training"]["properties"]["preference"]
    assert pref["default"] == {} and pref["description"]
    props = pref["properties"]
    assert props["enabled"]["default"] is False
    assert props["beta"]["exclusiveMinimum"] is True and props["beta"]["minimum"] == 0
    assert props["steps"]["minimum"] == 1 and all(p.get("description") for p in props.values())
    rule = next(v for v in spec_schema["x-kubernetes-validations"] if "preference" in v["rule"])
    assert rule["fieldPath"] == ".training.preference.enabled" and "dataset.format == 'rag'" in rule["rule"]
