"""S3 settings are validated at admission: metadata / link-local endpoints and malformed S3 URIs
are refused by the API server (CRD schema + CEL) and by the models, with the field named."""

from __future__ import annotations

import copy
import json

import pytest
from pydantic import ValidationError

from ragtune.api.finetunejob import FineTuneJobSpec

from ..chart.chartlib import finetunejob, kubectl

METADATA_ENDPOINTS = [
    "http://169.254.169.254",
    "http://169.254.169.254/latest/meta-data/",
    "http://user:pass@169.254.169.254/",  # userinfo must not hide the host
    "http://[fd00:ec2::254]",
    "http://[fe80::1]:9000",
    "http://metadata.google.internal",
    "https://metadata.google.internal/computeMetadata/v1/",
]
BAD_URIS = [
    ("dataset.train", "https://bucket/data.jsonl"),   # scheme
    ("dataset.train", "s3://Bad_Bucket/data.jsonl"),  # bucket naming rules
    ("dataset.train", "s3://ab/data.jsonl"),          # too short
    ("dataset.train", "s3://my..bucket/data.jsonl"),  # '..'
    ("output.uri", "s3://192.168.1.10/runs"),         # IP-like bucket
]
GOOD_ENDPOINTS = ["http://127.0.0.1:9000", "https://s3.eu-central-1.amazonaws.com", "http://minio.storage.svc:9000"]


def spec_with(path: str, value: str) -> dict:
    spec = copy.deepcopy(finetunejob("x", "ns", "http://127.0.0.1:9000")["spec"])
    node = spec
    *parents, leaf = path.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    return spec


@pytest.mark.parametrize("endpoint", METADATA_ENDPOINTS)
def test_models_refuse_metadata_endpoints(endpoint):
    with pytest.raises(ValidationError) as exc:
        FineTuneJobSpec.model_validate(spec_with("s3.endpoint", endpoint))
    assert ("s3", "endpoint") in [e["loc"][:2] for e in exc.value.errors()]


@pytest.mark.parametrize("path, uri", BAD_URIS)
def test_models_refuse_bad_s3_uris(path, uri):
    with pytest.raises(ValidationError) as exc:
        FineTuneJobSpec.model_validate(spec_with(path, uri))
    assert tuple(path.split(".")) in [e["loc"][:2] for e in exc.value.errors()]


@pytest.mark.parametrize("endpoint", GOOD_ENDPOINTS)
def test_models_accept_ordinary_endpoints(endpoint):
    assert FineTuneJobSpec.model_validate(spec_with("s3.endpoint", endpoint)).s3.endpoint == endpoint


def _server_dry_run(platform, namespace: str, spec: dict) -> tuple[bool, str]:
    obj = {"apiVersion": "ragtune.dev/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "admission-probe", "namespace": namespace}, "spec": spec}
    out = kubectl(platform.kubeconfig, "create", "--dry-run=server", "-f", "-", stdin=json.dumps(obj), check=False)
    return "created (server dry run)" in out, out


@pytest.mark.platform
@pytest.mark.slow
def test_api_server_refuses_metadata_endpoints_and_bad_uris(platform, namespace):
    platform.install_crds()
    for endpoint in METADATA_ENDPOINTS:
        accepted, out = _server_dry_run(platform, namespace, spec_with("s3.endpoint", endpoint))
        assert not accepted, f"API server accepted spec.s3.endpoint={endpoint}"
        assert "spec.s3.endpoint" in out, out
    for path, uri in BAD_URIS:
        accepted, out = _server_dry_run(platform, namespace, spec_with(path, uri))
        assert not accepted, f"API server accepted spec.{path}={uri}"
        assert f"spec.{path}" in out, out
    for endpoint in GOOD_ENDPOINTS:
        accepted, out = _server_dry_run(platform, namespace, spec_with("s3.endpoint", endpoint))
        assert accepted, out
