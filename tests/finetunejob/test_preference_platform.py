"""A real FineTuneJob with the preference stage on the local platform: the operator runs the real
trainer on a tiny Llama and rag records with `rejected` answers from MinIO; the run goes SFT ->
DPO -> evaluation -> publish, the status message names both stages, and the manifest the status
pins lists them."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import pytest

from ragtune.api.pods import TRAINER_IMAGE, run_prefix

from ..trainer.test_preference import with_rejected
from .conftest import OperatorProcess, wait_status
from .test_s3_outage_platform import _tiny_model

pytestmark = [pytest.mark.platform, pytest.mark.slow]

BUCKET = "ftj-preference"


@pytest.fixture(scope="module")
def inputs(platform):
    from ragtune_trainer.synthetic import generate

    records = generate(40, seed=0)
    texts = [t for r in records for t in [r.question, r.answer] + [c.text for c in r.contexts]]
    s3 = platform.s3_client()
    platform.bucket(BUCKET)
    with tempfile.TemporaryDirectory() as tmp:
        _tiny_model(texts + ["system user assistant Contexts Question It is"], Path(tmp))
        for path in Path(tmp).iterdir():
            s3.upload_file(str(path), BUCKET, f"models/tiny/{path.name}")
    s3.put_object(Bucket=BUCKET, Key="data/train.jsonl",
                  Body="".join(json.dumps(r) + "\n" for r in with_rejected(records)).encode())
    return {"model": f"s3://{BUCKET}/models/tiny/", "train": f"s3://{BUCKET}/data/train.jsonl"}


@pytest.fixture(scope="module")
def real_trainer_operator(platform, crds, tmp_path_factory):
    op = OperatorProcess(platform.kubeconfig, tmp_path_factory.mktemp("operator-dpo") / "operator.log",
                         extra_env={"RAGTUNE_TRAINER_IMAGE": f"{TRAINER_IMAGE}:dev"})
    op.start()
    try:
        yield op
    finally:
        op.stop()


def test_finetunejob_runs_sft_then_dpo_and_names_both_stages(platform, namespace, real_trainer_operator, inputs):
    name = "dpo"
    spec = {
        "baseModel": {"id": "test/tiny-llama", "revision": "main", "uri": inputs["model"]},
        "dataset": {"train": inputs["train"], "evalSplit": 0.2, "raft": {"distractors": 1, "unanswerableFraction": 0.25}},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8},
        "training": {"maxSteps": 2, "batchSize": 4, "learningRate": 0.01, "maxSeqLength": 512,
                     "preference": {"enabled": True, "steps": 3, "beta": 0.5, "learningRate": 0.01}},
        "evaluation": {"maxSamples": 2, "maxNewTokens": 4, "fewShot": 0, "thresholds": {"maxFalseRefusalRate": 1.0}},
        "output": {"uri": f"s3://{BUCKET}/runs"},
        "s3": {"endpoint": platform.s3_endpoint, "credentialsSecretRef": {"name": "s3-credentials"}},
        "resources": {"gpus": 0, "cpu": "1", "memory": "3Gi", "shmSize": "64Mi",
                      "nodeSelector": {"kubernetes.io/hostname": "ragtune-local"}},
    }
    platform.apply({"apiVersion": "ragtune.dev/v1alpha1", "kind": "FineTuneJob",
                    "metadata": {"name": name, "namespace": namespace}, "spec": spec})
    status = wait_status(platform, namespace, name, lambda s: s.get("phase") in ("Succeeded", "Failed"),
                         timeout=900, what="the run's end")
    assert status["phase"] == "Succeeded", status
    assert "trained 2 sft + 3 preference steps" in status["message"], status["message"]
    prefix = run_prefix(f"s3://{BUCKET}/runs", namespace, name, status["runId"])[len(f"s3://{BUCKET}/"):]
    body = platform.s3_client().get_object(Bucket=BUCKET, Key=prefix + "manifest.json")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == status["adapter"]["sha256"]
    stages = json.loads(body)["stages"]
    assert [(s["name"], s["steps"]) for s in stages] == [("sft", 2), ("preference", 3)]
    assert stages[1]["items"] > 0
