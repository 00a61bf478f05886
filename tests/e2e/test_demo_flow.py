"""End to end, on the real local platform: the `make demo` flow with fewer training steps.

FineTuneJob (real QLoRA training of SmolLM2-135M in a pod run by the pod runner, artifacts in
MinIO) -> AdapterDeployment (offline gate, canary TGI stand-in, online evaluation Job, promotion)
-> answers from the promoted server with and without the adapter.
"""

import json

import pytest

from ragtune_local.demo import run_flow

pytestmark = [pytest.mark.slow, pytest.mark.platform]


@pytest.mark.timeout(3600)  # real QLoRA steps on CPU: a shared 2-core machine takes far longer than 900 s
def test_finetunejob_to_served_adapter(platform, namespace, tmp_path):
    result = run_flow(platform, namespace, tmp_path, quick=True)

    ftj = result["finetunejob"]["status"]
    assert ftj["phase"] == "Succeeded"
    assert len(ftj["adapter"]["sha256"]) == 64 and ftj["adapter"]["uri"].startswith("s3://ragtune-demo/runs/")
    assert ftj["metrics"]["adapter"]["samples"] > 0 and ftj["metrics"]["base"]["samples"] > 0
    conditions = {c["type"]: c for c in ftj["conditions"]}
    assert conditions["Succeeded"]["status"] == "True"

    # The manifest in S3 is the one the status pins, and it lists the adapter files TGI needs.
    s3 = platform.s3_client()
    bucket, prefix = ftj["adapter"]["uri"][len("s3://"):].split("/", 1)
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())
    paths = {f["path"] for f in manifest["files"]}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= paths

    ad = result["adapterdeployment"]["status"]
    assert ad["phase"] == "Ready"
    assert [a["name"] for a in ad["serving"]] == ["support-rag"]
    assert ad["serving"][0]["sha256"] == ftj["adapter"]["sha256"]
    assert ad["history"][0]["outcome"] == "Promoted"
    canaries = platform.kubectl("-n", namespace, "get", "deployments", "-o", "name")
    assert "canary" not in canaries, "the canary must be removed after promotion"

    answers = result["answers"]
    assert answers and all(a["base"] is not None and a["adapter"] is not None for a in answers)
    assert any(a["base"] != a["adapter"] for a in answers), "the served adapter must change the answers"
