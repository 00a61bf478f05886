"""S3 outages during a run (issue 15 fault scenarios): the local platform's MinIO is stopped and
restarted (same port, same data dir: `LocalPlatform.stop_part("minio")` / `start_s3()`) while the
real trainer trains a tiny model, and while it evaluates. Each time the attempt fails
(S3Unreachable), the Job retries once MinIO is back, the retry resumes from the newest complete
checkpoint and the run succeeds with exactly `maxSteps` steps. No manifest appears for the failed
attempt, the manifest of the good one matches the objects it lists, and the Events announce
exactly the one retry that happened.

Timing is driven by what the run shows, not by sleeps: the outage starts when checkpoint-2's
COMPLETE marker is in S3 (training), or when the trainer's log says it is evaluating (the final
checkpoint is then complete); MinIO comes back once the first pod has failed, before the Job
controller's 10 s retry backoff ends."""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from ragtune.api.pods import TRAINER_IMAGE, run_prefix

from .conftest import OperatorProcess, events, get_json, jobs_of, pods_of, wait_status

pytestmark = [pytest.mark.platform, pytest.mark.slow]

BUCKET = "ftj-s3-outage"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_model(texts: list[str], out: Path) -> None:
    """A random 2-layer Llama with a word-level tokenizer over `texts` (words it never saw are
    <unk>: enough to train and evaluate, which is all these tests need)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t)})
    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation("isolated")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=fast.pad_token_id,
        eos_token_id=fast.eos_token_id, bos_token_id=None, tie_word_embeddings=True))
    model.generation_config.pad_token_id = fast.pad_token_id
    model.generation_config.eos_token_id = fast.eos_token_id
    model.save_pretrained(out)


@pytest.fixture(scope="module")
def tiny_run_inputs(platform):
    """A tiny Llama and a synthetic RAG dataset, uploaded to MinIO."""
    from ragtune_trainer.synthetic import generate

    if platform.local is None:
        pytest.fail("the S3 outage tests stop and restart the local platform's MinIO: run them on the local platform")
    records = generate(80, seed=0)
    texts = [t for r in records for t in [r.question, r.answer] + [c.text for c in r.contexts]]
    s3 = platform.s3_client()
    platform.bucket(BUCKET)
    with tempfile.TemporaryDirectory() as tmp:
        _tiny_model(texts + ["system user assistant Contexts Question"], Path(tmp))
        for path in Path(tmp).iterdir():
            s3.upload_file(str(path), BUCKET, f"models/tiny/{path.name}")
    s3.put_object(Bucket=BUCKET, Key="data/train.jsonl",
                  Body="".join(json.dumps(r.to_dict()) + "\n" for r in records).encode())
    return {"model": f"s3://{BUCKET}/models/tiny/", "train": f"s3://{BUCKET}/data/train.jsonl"}


@pytest.fixture(scope="module")
def real_trainer_operator(platform, crds, tmp_path_factory):
    op = OperatorProcess(platform.kubeconfig, tmp_path_factory.mktemp("operator-s3") / "operator.log",
                         extra_env={"RAGTUNE_TRAINER_IMAGE": f"{TRAINER_IMAGE}:dev"})
    op.start()
    try:
        yield op
    finally:
        op.stop()


def _manifest(name: str, namespace: str, platform, inputs: dict, max_steps: int, evaluation: dict) -> dict:
    spec = {
        "baseModel": {"id": "test/tiny-llama", "revision": "main", "uri": inputs["model"]},
        "dataset": {"train": inputs["train"], "evalSplit": 0.2, "raft": {"distractors": 1, "unanswerableFraction": 0.25}},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8},
        "training": {"maxSteps": max_steps, "batchSize": 4, "learningRate": 0.01, "maxSeqLength": 512,
                     "checkpointIntervalSteps": 2},
        "evaluation": {**evaluation, "thresholds": {"maxFalseRefusalRate": 1.0}},
        "output": {"uri": f"s3://{BUCKET}/runs"},
        "s3": {"endpoint": platform.s3_endpoint, "credentialsSecretRef": {"name": "s3-credentials"}},
        "resources": {"gpus": 0, "cpu": "1", "memory": "3Gi", "shmSize": "64Mi",
                      "nodeSelector": {"kubernetes.io/hostname": "ragtune-local"}},
        "backoffLimit": 3,
    }
    return {"apiVersion": "ragtune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def _keys(s3, prefix: str) -> dict[str, str]:
    """key (relative to `prefix`) -> ETag of every object under it."""
    out: dict[str, str] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix):]] = obj["ETag"]
    return out


def _run_key_prefix(platform, namespace: str, name: str) -> str:
    status = wait_status(platform, namespace, name, lambda s: s.get("runId"), timeout=120, what="runId")
    uri = run_prefix(f"s3://{BUCKET}/runs", namespace, name, status["runId"])
    return uri[len(f"s3://{BUCKET}/"):]


def _wait(check, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what}: not reached in {timeout} s")


def _only_pod(platform, namespace: str, name: str) -> dict:
    jobs = jobs_of(platform, namespace, name)
    pods = pods_of(platform, namespace, jobs[0]["metadata"]["name"]) if jobs else []
    return pods[0] if len(pods) == 1 else {}


def _failed_pods(platform, namespace: str, name: str) -> list[dict]:
    job = jobs_of(platform, namespace, name)[0]["metadata"]["name"]
    return [p for p in pods_of(platform, namespace, job) if p["status"].get("phase") == "Failed"]


def _outage_until_first_pod_fails(platform, namespace: str, name: str) -> dict:
    """Stops MinIO, waits for the running pod to fail, restarts MinIO; returns the failed pod's result."""
    platform.local.stop_part("minio")
    try:
        failed = _wait(lambda: _failed_pods(platform, namespace, name), 600, "the first pod failing during the outage",
                       interval=0.5)
    finally:
        platform.local.start_s3()
    assert len(failed) == 1, [p["metadata"]["name"] for p in failed]
    terminated = failed[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    return json.loads(terminated["message"])


def _check_the_good_run(platform, namespace: str, name: str, prefix: str, max_steps: int) -> dict:
    status = wait_status(platform, namespace, name, lambda s: s["phase"] in ("Succeeded", "Failed"), timeout=600,
                         what="the run's end")
    assert status["phase"] == "Succeeded", status
    assert status["attempts"] == 2 and status["observedGeneration"] == 1, status
    assert f"trained {max_steps} steps" in status["message"], status["message"]
    s3 = platform.s3_client()
    keys = _keys(s3, prefix)
    steps = {int(k.split("/")[1].removeprefix("checkpoint-")) for k in keys if k.startswith("checkpoints/checkpoint-")}
    assert max(steps) == max_steps, f"never more steps than asked: checkpoints {sorted(steps)}"
    # The manifest (written last) is the one the status pins, and it lists only what is there, byte for byte.
    body = s3.get_object(Bucket=BUCKET, Key=prefix + "manifest.json")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == status["adapter"]["sha256"]
    for f in json.loads(body)["files"]:
        data = s3.get_object(Bucket=BUCKET, Key=prefix + f["path"])["Body"].read()
        assert hashlib.sha256(data).hexdigest() == f["sha256"], f["path"]
    # Events: the one retry that happened is announced once; nothing announces another.
    posted = Counter(e["reason"] for e in events(platform, namespace, name))
    assert posted["Retrying"] == 1 and posted["Completed"] == 1, posted
    assert "Failed" not in posted, posted
    return status


def test_s3_outage_during_training_resumes_from_the_checkpoint(platform, namespace, real_trainer_operator,
                                                               tiny_run_inputs):
    name, max_steps = "outage-train", 12
    platform.apply(_manifest(name, namespace, platform, tiny_run_inputs, max_steps,
                             {"maxSamples": 6, "maxNewTokens": 6}))
    prefix = _run_key_prefix(platform, namespace, name)
    s3 = platform.s3_client()
    _wait(lambda: "checkpoints/checkpoint-2/COMPLETE" in _keys(s3, prefix), 300, "checkpoint-2 in S3", interval=0.1)
    result = _outage_until_first_pod_fails(platform, namespace, name)
    assert result["outcome"] == "Failed" and result["reason"] == "S3Unreachable", result
    keys = _keys(s3, prefix)
    assert "manifest.json" not in keys and not any(k.startswith("adapter/") for k in keys), sorted(keys)
    done = [int(k.split("/")[1].removeprefix("checkpoint-")) for k in keys if k.endswith("/COMPLETE")]
    assert done and max(done) < max_steps, f"the outage must hit training: complete checkpoints {done}"
    _check_the_good_run(platform, namespace, name, prefix, max_steps)


def test_s3_outage_during_evaluation_publishes_without_training_again(platform, namespace, real_trainer_operator,
                                                                     tiny_run_inputs):
    name, max_steps = "outage-eval", 4
    # Enough generation (16 held-out items x 48 new tokens, base and adapter: seconds) that the
    # outage, started when the trainer says it evaluates, lands before the upload.
    platform.apply(_manifest(name, namespace, platform, tiny_run_inputs, max_steps,
                             {"maxSamples": 16, "maxNewTokens": 48}))
    prefix = _run_key_prefix(platform, namespace, name)

    def evaluating() -> bool:
        pod = _only_pod(platform, namespace, name)
        if not pod or pod["status"].get("phase") != "Running":
            return False
        log = platform.kubectl("-n", namespace, "logs", pod["metadata"]["name"], check=False)
        return '"stage":"evaluating"' in log

    _wait(evaluating, 300, "the trainer evaluating", interval=0.2)
    result = _outage_until_first_pod_fails(platform, namespace, name)
    assert result["outcome"] == "Failed" and result["reason"] == "S3Unreachable", result
    s3 = platform.s3_client()
    keys = _keys(s3, prefix)
    assert f"checkpoints/checkpoint-{max_steps}/COMPLETE" in keys, sorted(keys)
    assert "manifest.json" not in keys, "no manifest for the attempt the outage ended"
    status = _check_the_good_run(platform, namespace, name, prefix, max_steps)
    # The retry went straight to evaluation: its pod trained nothing (resumed at the end).
    assert f"checkpoints/checkpoint-{max_steps + 1}/COMPLETE" not in _keys(s3, prefix), status
    assert get_json(platform, "-n", namespace, "finetunejob", name)["status"]["phase"] == "Succeeded"
