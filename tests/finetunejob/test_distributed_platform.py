"""A FineTuneJob with `resources.nodes: 2, gpus: 0` on the local platform (issue 16): the operator
renders the headless Service and the Indexed Job, both pods run torchrun, meet at index 0 through
the Service's names (c10d rendezvous, gloo), train with DDP and the run succeeds; rank 0 alone
publishes (one manifest, one result), every checkpoint holds both ranks' state, and the adapter
equals a one-process run with the same global batch and seed within the stated tolerance."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ragtune.api.pods import TRAINER_IMAGE, run_prefix

from .conftest import OperatorProcess, get_json, jobs_of, pods_of, wait_status
from .test_s3_outage_platform import _tiny_model

pytestmark = [pytest.mark.platform, pytest.mark.slow]

BUCKET = "ftj-distributed"
WEIGHT_TOLERANCE = 1e-4
"""Largest |two nodes - one process| over the adapter's weights (float32, 4 steps; they differ only
in summation order: tests/trainer/test_distributed_run.py measured 1.4e-7)."""


@pytest.fixture(scope="module")
def inputs(platform, tmp_path_factory):
    from ragtune_trainer.synthetic import generate

    records = generate(80, seed=0)
    texts = [t for r in records for t in [r.question, r.answer] + [c.text for c in r.contexts]]
    local = tmp_path_factory.mktemp("distributed-inputs")
    (local / "model").mkdir()
    _tiny_model(texts + ["system user assistant Contexts Question"], local / "model")
    (local / "train.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
    s3 = platform.s3_client()
    platform.bucket(BUCKET)
    for path in (local / "model").iterdir():
        s3.upload_file(str(path), BUCKET, f"models/tiny/{path.name}")
    s3.upload_file(str(local / "train.jsonl"), BUCKET, "data/train.jsonl")
    return {"model": f"s3://{BUCKET}/models/tiny/", "train": f"s3://{BUCKET}/data/train.jsonl", "local": local}


@pytest.fixture(scope="module")
def trainer_operator(platform, crds, tmp_path_factory):
    op = OperatorProcess(platform.kubeconfig, tmp_path_factory.mktemp("operator-dist") / "operator.log",
                         extra_env={"RAGTUNE_TRAINER_IMAGE": f"{TRAINER_IMAGE}:dev"})
    op.start()
    try:
        yield op
    finally:
        op.stop()


def _spec(model: str, train: str, output: str, batch: int) -> dict:
    return {
        "baseModel": {"id": "test/tiny-llama", "revision": "main", "uri": model},
        "dataset": {"train": train, "evalSplit": 0.2, "raft": {"distractors": 1, "unanswerableFraction": 0.25}},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},  # no dropout: the ranks' RNG streams differ
        "training": {"maxSteps": 4, "batchSize": batch, "learningRate": 0.01, "maxSeqLength": 512,
                     "checkpointIntervalSteps": 2, "packing": True},
        "evaluation": {"maxSamples": 2, "maxNewTokens": 4, "fewShot": 0, "thresholds": {"maxFalseRefusalRate": 1.0}},
        "output": {"uri": output},
        "resources": {"gpus": 0},
    }


def _one_process_adapter(inputs: dict, tmp_path: Path) -> dict:
    """The reference: `ragtune train -f` in one process, per-device batch 4 (= 2 nodes x 2)."""
    from safetensors.torch import load_file

    local = inputs["local"]
    job = tmp_path / "one.yaml"
    job.write_text(json.dumps({"kind": "FineTuneJob", "metadata": {"name": "one", "namespace": "ref"},
                               "spec": _spec((local / "model").as_uri(), (local / "train.jsonl").as_uri(),
                                             (tmp_path / "out").as_uri(), 4)}))
    done = subprocess.run([str(Path(sys.executable).with_name("ragtune")), "train", "-f", str(job), "--run-id", "r"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(tmp_path / "out/ref/one/r/adapter/adapter_model.safetensors")


def test_two_cpu_nodes_train_one_adapter(platform, namespace, trainer_operator, inputs, tmp_path):
    from safetensors.torch import load

    name = "ddp2"
    spec = _spec(inputs["model"], inputs["train"], f"s3://{BUCKET}/runs", 2)
    spec["s3"] = {"endpoint": platform.s3_endpoint, "credentialsSecretRef": {"name": "s3-credentials"}}
    spec["resources"].update({"nodes": 2, "cpu": "1", "memory": "3Gi", "shmSize": "64Mi",
                              "nodeSelector": {"kubernetes.io/hostname": "ragtune-local"}})
    spec["backoffLimit"] = 0  # the run must succeed on its first attempt
    platform.apply({"apiVersion": "ragtune.dev/v1alpha1", "kind": "FineTuneJob",
                    "metadata": {"name": name, "namespace": namespace}, "spec": spec})
    status = wait_status(platform, namespace, name, lambda s: s.get("phase") in ("Succeeded", "Failed"),
                         timeout=900, what="the run's end")
    assert status["phase"] == "Succeeded", (status, trainer_operator.log()[-3000:])
    assert status["attempts"] == 1 and "trained 4 steps" in status["message"], status

    (job,) = jobs_of(platform, namespace, name)
    js = job["spec"]
    assert (js["completionMode"], js["completions"], js["parallelism"]) == ("Indexed", 2, 2)
    svc = get_json(platform, "-n", namespace, "service", js["template"]["spec"]["subdomain"])
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"
    pods = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p
            for p in pods_of(platform, namespace, job["metadata"]["name"])}
    assert sorted(pods) == ["0", "1"] and all(p["status"]["phase"] == "Succeeded" for p in pods.values())
    # Rank 0 (index 0) wrote the result; rank 1 wrote none and said why.
    messages = {i: p["status"]["containerStatuses"][0]["state"]["terminated"].get("message", "")
                for i, p in pods.items()}
    assert json.loads(messages["0"])["reason"] == "Completed"
    assert '"outcome"' not in messages["1"]
    log1 = platform.kubectl("-n", namespace, "logs", pods["1"]["metadata"]["name"])
    assert "rank 1: trained 4 steps; rank 0 evaluates and publishes" in log1
    log0 = platform.kubectl("-n", namespace, "logs", pods["0"]["metadata"]["name"])
    assert "world size 2 (ddp), global batch 4 = 2 per device x 2 x 1 accumulation" in log0
    assert "RAGTUNE_PROGRESS" in log0 and "RAGTUNE_PROGRESS" not in log1

    s3 = platform.s3_client()
    prefix = run_prefix(f"s3://{BUCKET}/runs", namespace, name, status["runId"])[len(f"s3://{BUCKET}/"):]
    keys = [o["Key"][len(prefix):] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for o in page.get("Contents", [])]
    assert [k for k in keys if k.endswith("manifest.json")] == ["manifest.json"]
    manifest = s3.get_object(Bucket=BUCKET, Key=prefix + "manifest.json")["Body"].read()
    assert hashlib.sha256(manifest).hexdigest() == status["adapter"]["sha256"]
    for step in (2, 4):
        marker = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{prefix}checkpoints/checkpoint-{step}/COMPLETE")
                            ["Body"].read())
        assert marker["worldSize"] == 2 and "rng_state_1.pth" in marker["rankFiles"], marker

    two = load(s3.get_object(Bucket=BUCKET, Key=prefix + "adapter/adapter_model.safetensors")["Body"].read())
    one = _one_process_adapter(inputs, tmp_path)
    assert one.keys() == two.keys() and one
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    print(f"adapter max |2 nodes - 1 process| = {worst:.3g}")
    assert worst <= WEIGHT_TOLERANCE, f"adapter weights differ by {worst}"


def _trainer_pid(hostname: str) -> int:
    """The pid of the training worker (torchrun's child running `ragtune train`) of the pod with this
    hostname: pods are local processes on the local platform."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e)
        except OSError:
            continue
        if b"train" in cmdline and b"torchrun" not in b" ".join(cmdline) and b"RANK" in environ \
                and environ.get(b"HOSTNAME") == hostname.encode():
            return int(proc.name)
    return 0


def test_a_killed_rank_fails_the_attempt_and_every_rank_resumes(platform, namespace, trainer_operator, inputs):
    """SIGKILL on rank 1's process mid-run: both pods of the attempt fail (rank 0's collective
    breaks), the Job replaces both, the new ranks rendezvous again and resume from the newest
    COMPLETE checkpoint (step > 0), and the run succeeds with exactly maxSteps steps."""
    import signal
    import time

    name, max_steps = "ddp2-kill", 10
    spec = _spec(inputs["model"], inputs["train"], f"s3://{BUCKET}/runs", 2)
    spec["training"]["maxSteps"] = max_steps
    spec["s3"] = {"endpoint": platform.s3_endpoint, "credentialsSecretRef": {"name": "s3-credentials"}}
    spec["resources"].update({"nodes": 2, "cpu": "1", "memory": "3Gi", "shmSize": "64Mi",
                              "nodeSelector": {"kubernetes.io/hostname": "ragtune-local"}})
    spec["backoffLimit"] = 1
    platform.apply({"apiVersion": "ragtune.dev/v1alpha1", "kind": "FineTuneJob",
                    "metadata": {"name": name, "namespace": namespace}, "spec": spec})
    status = wait_status(platform, namespace, name, lambda s: s.get("runId"), timeout=120, what="runId")
    prefix = run_prefix(f"s3://{BUCKET}/runs", namespace, name, status["runId"])[len(f"s3://{BUCKET}/"):]
    s3 = platform.s3_client()

    def complete() -> list[int]:
        objs = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
                for o in page.get("Contents", [])]
        return sorted(int(k.split("/checkpoint-")[1].split("/")[0]) for k in objs if k.endswith("/COMPLETE"))

    deadline = time.monotonic() + 600
    while not complete():
        assert time.monotonic() < deadline, "no complete checkpoint in time"
        time.sleep(0.2)
    job = jobs_of(platform, namespace, name)[0]["metadata"]["name"]
    pid = _trainer_pid(f"{job}-1")
    assert pid, "rank 1's training process not found"
    os.kill(pid, signal.SIGKILL)
    killed_at = complete()
    assert killed_at and max(killed_at) < max_steps, f"the kill must hit training: complete checkpoints {killed_at}"

    status = wait_status(platform, namespace, name, lambda s: s.get("phase") in ("Succeeded", "Failed"),
                         timeout=900, what="the run's end")
    assert status["phase"] == "Succeeded", (status, trainer_operator.log()[-3000:])
    assert status["attempts"] == 2 and f"trained {max_steps} steps" in status["message"], status
    pods = pods_of(platform, namespace, job)
    failed = [p for p in pods if p["status"]["phase"] == "Failed"]
    assert sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in failed) == ["0", "1"]
    retry0 = next(p for p in pods if p["status"]["phase"] == "Succeeded"
                  and p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0")
    log = platform.kubectl("-n", namespace, "logs", retry0["metadata"]["name"])
    progress = [json.loads(line.split("RAGTUNE_PROGRESS ", 1)[1]) for line in log.splitlines() if "RAGTUNE_PROGRESS " in line]
    first = next(p for p in progress if p.get("stage") == "training")
    assert first["step"] >= min(killed_at) > 0, (first, killed_at)  # resumed, not from step 0
    assert max(complete()) == max_steps  # never a step past maxSteps
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for o in page.get("Contents", [])]
    assert [k for k in keys if k.endswith("manifest.json")] == [prefix + "manifest.json"]
