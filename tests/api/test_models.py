"""The API models parse what users write and refuse bad input with the field named."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from ragtune.api import AdapterDeployment, FineTuneJob, FineTuneJobSpec
from ragtune.api.common import validate_artifact_uri, validate_endpoint

REPO = Path(__file__).resolve().parents[2]

MINIMAL = {
    "baseModel": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct"},
    "dataset": {"train": "s3://data/train.jsonl"},
    "output": {"uri": "s3://runs/out"},
}


def test_examples_parse():
    ftj = FineTuneJob.model_validate(yaml.safe_load((REPO / "examples/finetunejob.yaml").read_text()))
    assert ftj.spec.method.value == "qlora" and ftj.spec.lora.r == 16
    ad = AdapterDeployment.model_validate(yaml.safe_load((REPO / "examples/adapterdeployment.yaml").read_text()))
    assert ad.spec.adapters[0].fine_tune_job_ref.name == ftj.metadata["name"]


def test_the_gitops_retrain_loop_example_follows_its_finetunejob():
    loop = REPO / "examples/gitops/retrain-loop"
    ftj = FineTuneJob.model_validate(yaml.safe_load((loop / "finetunejob.yaml").read_text()))
    ad = AdapterDeployment.model_validate(yaml.safe_load((loop / "adapterdeployment.yaml").read_text()))
    (adapter,) = ad.spec.adapters
    assert adapter.fine_tune_job_ref.name == ftj.metadata["name"] and adapter.follow.value == "LatestSucceeded"
    assert ad.metadata["namespace"] == ftj.metadata["namespace"]
    assert ad.spec.base_model.id == ftj.spec.base_model.id and ad.spec.strategy.bake == "30m"


def test_defaults_fill_in_and_wire_form_is_camel_case():
    spec = FineTuneJobSpec.model_validate(MINIMAL)
    assert spec.training.learning_rate == 2e-4 and spec.quantization is None
    wire = spec.to_wire()
    assert wire["baseModel"]["revision"] == "main"
    assert "learningRate" in wire["training"] and "learning_rate" not in wire["training"]
    assert FineTuneJobSpec.model_validate(wire) == spec


@pytest.mark.parametrize(
    "uri, ok",
    [
        ("s3://my-bucket/prefix/x.jsonl", True),
        ("s3://my.bucket", True),
        ("file:///data/train.jsonl", True),
        ("s3://My-Bucket/x", False),  # uppercase
        ("s3://ab/x", False),  # too short
        ("s3://a..b/x", False),
        ("s3://192.168.1.1/x", False),  # IP-formatted bucket
        ("http://bucket/x", False),
        ("relative/path.jsonl", False),
    ],
)
def test_artifact_uri_rules(uri, ok):
    if ok:
        assert validate_artifact_uri(uri) == uri
    else:
        with pytest.raises(ValueError):
            validate_artifact_uri(uri)


@pytest.mark.parametrize(
    "endpoint",
    ["http://169.254.169.254", "http://169.254.170.2/creds", "http://[fd00:ec2::254]/", "http://metadata.google.internal", "ftp://s3"],
)
def test_metadata_and_non_http_endpoints_are_refused(endpoint):
    with pytest.raises(ValueError):
        validate_endpoint(endpoint)


def test_plain_endpoints_are_accepted():
    assert validate_endpoint("http://127.0.0.1:9000") == "http://127.0.0.1:9000"
    assert validate_endpoint("https://s3.eu-west-1.amazonaws.com")


def test_errors_name_the_field():
    bad = {**MINIMAL, "lora": {"r": 0}}
    with pytest.raises(ValidationError) as err:
        FineTuneJobSpec.model_validate(bad)
    assert err.value.errors()[0]["loc"] == ("lora", "r")
    with pytest.raises(ValidationError) as err:
        FineTuneJobSpec.model_validate({**MINIMAL, "trainng": {}})  # typo: unknown fields are refused
    assert err.value.errors()[0]["loc"] == ("trainng",)
