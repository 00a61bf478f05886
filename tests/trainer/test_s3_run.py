"""The trainer against a real S3 server (the local platform's MinIO): data and base model read
from S3, checkpoints and artifacts written there, manifest last; wrong credentials fail clearly."""

import json

import pytest

from ragtune.api.common import S3Config
from ragtune.storage import Storage, sha256_bytes

from .test_train_run import in_cluster, job_spec

pytestmark = [pytest.mark.slow, pytest.mark.platform]


@pytest.fixture
def s3_env(platform, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", platform.s3_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", platform.s3_secret_key)
    return Storage(S3Config(endpoint=platform.s3_endpoint))


def test_s3_run_reads_data_and_model_and_publishes_manifest_last(platform, s3_env, monkeypatch, tmp_path,
                                                                 tiny_model_dir, records):
    bucket = platform.bucket("trainer-s3-run")
    s3_env.put_bytes(f"s3://{bucket}/data/train.jsonl",
                     "".join(json.dumps(r.to_dict()) + "\n" for r in records).encode())
    s3_env.upload_dir(tiny_model_dir, f"s3://{bucket}/models/tiny/")
    spec = job_spec(tiny_model_dir, f"s3://{bucket}/data/train.jsonl", tmp_path, s3={"endpoint": platform.s3_endpoint},
                    **{"training.maxSteps": 4, "training.checkpointIntervalSteps": 2})
    spec["baseModel"]["uri"] = f"s3://{bucket}/models/tiny/"
    spec["output"]["uri"] = f"s3://{bucket}/runs"
    monkeypatch.setenv("RAGTUNE_MODEL_CACHE", str(tmp_path / "model-cache"))
    code, result = in_cluster(monkeypatch, tmp_path, spec, uid="0123456789ab")
    assert code == 0 and result["reason"] == "Completed", result
    run = f"s3://{bucket}/runs/ns/job/01234567-g1/"
    assert result["adapterUri"] == run
    keys = {o.uri[len(run):] for o in s3_env.list(run)}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "eval/report.json",
            "manifest.json", "checkpoints/checkpoint-4/COMPLETE"} <= keys
    manifest = s3_env.get_bytes(run + "manifest.json")
    assert sha256_bytes(manifest) == result["manifestSha256"]
    datasets = json.loads(manifest)["datasets"]
    assert datasets[0]["uri"] == f"s3://{bucket}/data/train.jsonl" and datasets[0]["etag"]
    # The held-out split, where the online evaluator reads it, digest-checked against the result.
    from ragtune.pods.online_eval import load_records

    assert result["evalSetUri"] == run + "eval/heldout.jsonl"
    split = load_records(s3_env, result["evalSetUri"], sha256=result["evalSetSha256"])
    assert split and all(r["construction"] for r in split)


def test_wrong_credentials_are_access_denied(platform, monkeypatch, tmp_path, tiny_model_dir):
    bucket = platform.bucket("trainer-s3-denied")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret-at-all")
    spec = job_spec(tiny_model_dir, f"s3://{bucket}/data/train.jsonl", tmp_path, s3={"endpoint": platform.s3_endpoint})
    code, result = in_cluster(monkeypatch, tmp_path, spec)
    assert code == 2 and result["reason"] == "S3AccessDenied" and "credentials" in result["message"]
