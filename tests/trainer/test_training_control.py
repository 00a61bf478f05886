"""Training control (issue 17 item 5): a validation split carved from the training items, the
best checkpoint by validation loss as the published adapter (also across a resume), early
stopping, the optimiser knobs reaching the optimiser, LoRA bias, and TensorBoard event files.
Real runs on the tiny random Llama (seconds each)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
from pydantic import ValidationError

from ragtune.api.crdgen import build_crds
from ragtune.api.finetunejob import FineTuneJobSpec
from ragtune.cli import main

from .conftest import write_jsonl
from .test_train_run import job_spec

BASE = {"baseModel": {"id": "tiny/model"}, "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/runs"}}

# 20 records: 4 held out for the test, 4 of the other 16 for validation, 12 trained on for 40 steps
# at a high constant rate: the validation loss falls until step 15 and rises from there (these
# seeds, CPU), so the best checkpoint is not the last.
OVERFIT = {"dataset.validationSplit": 0.25, "training.maxSteps": 40, "training.learningRate": 0.03,
           "training.lrScheduler": "constant", "training.warmupRatio": 0, "training.evalIntervalSteps": 5,
           "training.checkpointIntervalSteps": 50, "lora.r": 16, "lora.alpha": 32, "lora.dropout": 0,
           "evaluation.maxSamples": 4, "evaluation.maxNewTokens": 4}


# --- Admission (the pydantic model; the CRD carries the same rules as CEL) ---------------------


def test_defaults_leave_training_as_it_was():
    t = FineTuneJobSpec.model_validate(BASE)
    assert t.dataset.validation_split == 0 and t.training.early_stopping is None and t.training.report_to == []
    assert (t.training.optimizer, t.training.weight_decay, t.training.max_grad_norm, t.lora.bias) == \
        ("adamw_torch_fused", 0.0, 1.0, "none")  # transformers' own defaults, now explicit
    es = FineTuneJobSpec.model_validate(dict(BASE, dataset={"train": "s3://data/t.jsonl", "validationSplit": 0.1},
                                             training={"earlyStopping": {}})).training.early_stopping
    assert es.to_wire() == {"metric": "evalLoss", "patience": 3, "minDelta": 0.0}


def test_early_stopping_without_a_validation_split_is_refused_naming_the_field():
    with pytest.raises(ValidationError, match=r"training.earlyStopping needs a validation split: set "
                                              r"dataset.validationSplit above 0"):
        FineTuneJobSpec.model_validate(dict(BASE, training={"earlyStopping": {"patience": 2}}))


@pytest.mark.parametrize("spec, message", [
    ({"training": {"optimizer": "paged_adamw_8bit"}, "resources": {"gpus": 0}}, "training.optimizer paged_adamw_8bit"),
    ({"method": "ia3", "lora": {"bias": "all"}}, "lora.bias is for LoRA-based methods"),
])
def test_knobs_that_cannot_work_are_refused(spec, message):
    with pytest.raises(ValidationError, match=message):
        FineTuneJobSpec.model_validate(dict(BASE, **spec))


@pytest.mark.parametrize("training", [{"reportTo": ["mlflow"]}, {"optimizer": "lion"}, {"earlyStopping":
                                                                                      {"metric": "f1"}}])
def test_values_not_offered_are_refused(training):
    with pytest.raises(ValidationError):
        FineTuneJobSpec.model_validate(dict(BASE, dataset={"train": "s3://data/t.jsonl", "validationSplit": 0.1},
                                            training=training))


def test_crd_carries_the_rules_with_field_paths():
    crd = build_crds()["ragtune.dev_finetunejobs.yaml"]
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = {v["fieldPath"]: v for v in schema["x-kubernetes-validations"]}
    assert "self.dataset.validationSplit > 0.0" in rules[".training.earlyStopping"]["rule"]
    assert "gpus > 0" in rules[".training.optimizer"]["rule"] and "ia3" in rules[".lora.bias"]["rule"]
    training = schema["properties"]["training"]["properties"]
    assert training["reportTo"]["items"]["enum"] == ["tensorboard"]
    assert schema["properties"]["dataset"]["properties"]["validationSplit"]["default"] == 0.0


# --- Real runs --------------------------------------------------------------------------------


def local_run(tiny_model_dir, train_file, tmp_path, run_id="r1", **overrides) -> tuple[int, Path]:
    job = tmp_path / f"job-{run_id}.json"
    job.write_text(json.dumps({"apiVersion": "ragtune.dev/v1alpha1", "kind": "FineTuneJob",
                               "metadata": {"name": "local", "namespace": "dev"},
                               "spec": job_spec(tiny_model_dir, str(train_file), tmp_path / "out", **overrides)}))
    return main(["train", "-f", str(job), "--run-id", run_id]), tmp_path / "out/dev/local" / run_id


@pytest.fixture
def small_train(tmp_path, records) -> Path:
    return write_jsonl(tmp_path / "data" / "small.jsonl", [r.to_dict() for r in records[:20]])


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def eval_points(report: dict) -> list[tuple[int, float]]:
    return [(e["step"], e["eval_loss"]) for e in report["lossHistory"] if "eval_loss" in e]


@pytest.mark.slow
def test_the_published_adapter_is_the_best_checkpoint_not_the_last(monkeypatch, tiny_model_dir, small_train,
                                                                    tmp_path):
    from ragtune_trainer import checkpoints

    monkeypatch.setattr(checkpoints, "KEEP_REMOTE_CHECKPOINTS", 1000)  # keep the best step's own checkpoint
    # checkpointIntervalSteps 50: the best step's checkpoint exists because a new best forces one.
    code, run = local_run(tiny_model_dir, small_train, tmp_path, **OVERFIT)
    assert code == 0
    report = json.loads((run / "eval/report.json").read_text())
    points = eval_points(report)
    best_step, best_loss = min(points, key=lambda p: p[1])
    t = report["training"]
    assert t["evalLossOn"] == "validation" and t["stopReason"] == "maxSteps" and t["steps"] == 40
    assert (t["bestStep"], t["bestEvalLoss"]) == (best_step, best_loss) and best_step < 40, points
    assert [p[0] for p in points] == list(range(5, 41, 5))  # every evalIntervalSteps, and the last step
    assert t["validationItems"] == 4 and report["stages"][0]["items"] == 12
    published = tensors(run / "adapter/adapter_model.safetensors")
    assert same_weights(published, tensors(run / f"checkpoints/checkpoint-{best_step}/adapter_model.safetensors"))
    assert not same_weights(published, tensors(run / "checkpoints/checkpoint-40/adapter_model.safetensors"))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"][0] | {"bestStep": best_step, "stopReason": "maxSteps"} == manifest["stages"][0]
    page = (run / "eval/report.html").read_text()
    assert "validation loss" in page and f"best checkpoint by validation loss: <b>step {best_step}</b>" in page
    assert '<img alt="loss curve"' in page


@pytest.mark.slow
def test_a_resumed_run_still_knows_the_best_so_far(monkeypatch, tiny_model_dir, small_train, tmp_path):
    """Attempt 1 is preempted at step 18, after the best point (15); attempt 2 resumes there and
    must keep step 15 as the best, although it never saw a loss that low itself."""
    from transformers import TrainerCallback

    from ragtune_trainer import checkpoints, sft

    monkeypatch.setattr(checkpoints, "KEEP_REMOTE_CHECKPOINTS", 1000)
    original = sft.make_callbacks

    def preempt_at_18(ctx, state, total_steps):
        class Preempt(TrainerCallback):
            def on_step_end(self, args, st, control, **kw):
                if st.global_step == 18:
                    state.preempt_requested = True  # what SIGTERM does

        return [Preempt()] + original(ctx, state, total_steps)

    monkeypatch.setattr(sft, "make_callbacks", preempt_at_18)
    code, run = local_run(tiny_model_dir, small_train, tmp_path, **OVERFIT)
    assert code != 0 and (run / "checkpoints/checkpoint-18/COMPLETE").is_file()
    control = json.loads((run / "checkpoints/checkpoint-18/ragtune-control.json").read_text())
    assert control["best_step"] == 15
    monkeypatch.setattr(sft, "make_callbacks", original)
    code, run = local_run(tiny_model_dir, small_train, tmp_path, **OVERFIT)
    assert code == 0
    report = json.loads((run / "eval/report.json").read_text())
    points = eval_points(report)
    assert report["training"]["bestStep"] == min(points, key=lambda p: p[1])[0] == 15, points
    assert min(v for s, v in points if s > 18) > report["training"]["bestEvalLoss"]
    assert same_weights(tensors(run / "adapter/adapter_model.safetensors"),
                        tensors(run / "checkpoints/checkpoint-15/adapter_model.safetensors"))


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Tag -> [(step, value)] of every event file under `folder` (TFRecord framing, Event protos)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


@pytest.mark.slow
def test_early_stopping_stops_when_the_validation_loss_stops_improving(tiny_model_dir, small_train, tmp_path):
    # No point improves on the first by more than 1.0: patience 2 stops at the third point.
    code, run = local_run(tiny_model_dir, small_train, tmp_path, **OVERFIT,
                          **{"training.earlyStopping": {"patience": 2, "minDelta": 1.0},
                             "training.reportTo": ["tensorboard"]})
    assert code == 0
    report = json.loads((run / "eval/report.json").read_text())
    t = report["training"]
    assert (t["stopReason"], t["steps"]) == ("earlyStopping", 15) and [p[0] for p in eval_points(report)] == [5, 10, 15]
    assert t["bestStep"] == min(eval_points(report), key=lambda p: p[1])[0]
    assert json.loads((run / "checkpoints/checkpoint-15/ragtune-control.json").read_text())["stopped_early"] is True
    assert "stopped early at step 15" in (run / "eval/report.html").read_text()
    # reportTo tensorboard: event files next to the run, listed in the manifest, with the curves in them.
    events = sorted((run / "tracking/tensorboard/sft").glob("events.out.tfevents.*"))
    assert events
    listed = {f["path"] for f in json.loads((run / "manifest.json").read_text())["files"]}
    assert {p.relative_to(run).as_posix() for p in events} <= listed
    scalars = tensorboard_scalars(run / "tracking/tensorboard")
    assert [s for s, _ in scalars["eval/loss"]] == [5, 10, 15] and scalars["train/loss"]
    assert all(math.isclose(v, loss, rel_tol=1e-5) for (_, v), (_, loss) in zip(scalars["eval/loss"],
                                                                               eval_points(report)))

    # A retry after a later failure (the run's manifest gone, say) takes the stopped run as finished.
    (run / "manifest.json").unlink()
    code, run = local_run(tiny_model_dir, small_train, tmp_path, **OVERFIT,
                          **{"training.earlyStopping": {"patience": 2, "minDelta": 1.0},
                             "training.reportTo": ["tensorboard"]})
    manifest = json.loads((run / "manifest.json").read_text())
    assert code == 0 and manifest["stages"][0]["steps"] == 15 and manifest["stages"][0]["seconds"] == 0.0
    assert manifest["stages"][0]["stopReason"] == "earlyStopping"


@pytest.mark.slow
def test_early_stopping_lets_an_improving_run_train_to_max_steps(tiny_model_dir, train_file, tmp_path):
    code, run = local_run(tiny_model_dir, train_file, tmp_path,
                          **{"dataset.validationSplit": 0.2, "training.maxSteps": 12, "training.learningRate": 0.5,
                             "training.lrScheduler": "constant", "training.warmupRatio": 0,
                             "training.evalIntervalSteps": 2, "training.earlyStopping": {"patience": 1},
                             "evaluation.maxSamples": 4, "evaluation.maxNewTokens": 4})
    assert code == 0
    report = json.loads((run / "eval/report.json").read_text())
    losses = [v for _, v in eval_points(report)]
    assert losses == sorted(losses, reverse=True) and len(losses) == 6  # every point improved
    assert (report["training"]["stopReason"], report["training"]["steps"], report["training"]["bestStep"]) == \
        ("maxSteps", 12, 12)
    assert not (run / "tracking").exists()  # reportTo is off by default


# --- Optimiser knobs and LoRA bias reach torch and peft -----------------------------------------


def build(tmp_path, tiny_model_dir, train_file, **overrides):
    from ragtune_trainer.base_model import detect_plan, load_model, load_tokenizer
    from ragtune_trainer.control import ControlState
    from ragtune_trainer.rows import prepare_data
    from ragtune_trainer.run import RunContext, RunState
    from ragtune_trainer.sft import build_trainer

    spec = FineTuneJobSpec.model_validate(job_spec(tiny_model_dir, train_file.as_uri(), tmp_path / "out",
                                                           **overrides))
    ctx = RunContext(spec=spec, run_id="r", run_uri=(tmp_path / "out").as_uri() + "/", work_dir=tmp_path / "work")
    state = RunState(control=ControlState())
    plan = detect_plan(spec)
    tokenizer = load_tokenizer(str(tiny_model_dir), "main")
    prepared = prepare_data(ctx, tokenizer)
    model = load_model(str(tiny_model_dir), "main", spec, plan)
    steps = spec.training.max_steps
    return build_trainer(ctx, state, plan, model, tokenizer, prepared.train, prepared.loss_rows, steps,
                         ctx.work_dir / "checkpoints")


@pytest.mark.parametrize("optimizer, cls", [("sgd", "SGD"), ("adafactor", "Adafactor"), ("adamw_torch", "AdamW")])
def test_optimizer_and_weight_decay_reach_the_optimizer(tmp_path, tiny_model_dir, train_file, optimizer, cls):
    trainer = build(tmp_path, tiny_model_dir, train_file, **{"training.optimizer": optimizer,
                                                             "training.weightDecay": 0.1, "lora.bias": "lora_only"})
    opt = trainer.create_optimizer()
    assert type(getattr(opt, "optimizer", opt)).__name__ == cls
    decayed = [g for g in opt.param_groups if g["weight_decay"] == 0.1]
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert decayed and all("lora_" in names[id(p)] for g in decayed for p in g["params"])
    assert trainer.model.peft_config["default"].bias == "lora_only"


@pytest.mark.parametrize("max_grad_norm", [1e-3, 0.0])
def test_max_grad_norm_clips_the_update(tmp_path, tiny_model_dir, train_file, max_grad_norm):
    """Plain SGD at lr 1, one step: the update is the (clipped) gradient, so its norm is
    maxGradNorm when the gradient is longer; with clipping off (0) it is the whole gradient."""
    trainer = build(tmp_path, tiny_model_dir, train_file, **{
        "training.optimizer": "sgd", "training.learningRate": 1.0, "training.lrScheduler": "constant",
        "training.warmupRatio": 0, "training.maxSteps": 1, "training.maxGradNorm": max_grad_norm})
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    update = math.sqrt(sum(float((after[n].detach() - b).pow(2).sum()) for n, b in before.items()))
    assert trainer.args.max_grad_norm == max_grad_norm
    if max_grad_norm:
        grad_norm = next(e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e)
        assert grad_norm > 10 * max_grad_norm and update == pytest.approx(max_grad_norm, rel=1e-3)
    else:
        assert update > 10 * 1e-3  # the same step unclipped


@pytest.mark.slow
def test_the_preference_stage_continues_the_best_adapter_and_logs_its_own_curves(monkeypatch, tiny_model_dir,
                                                                                   records, tmp_path):
    from ragtune_trainer import control

    from .test_preference import with_rejected

    restored = []
    original = control.restore_best
    monkeypatch.setattr(control, "restore_best", lambda model, best: restored.append(best) or original(model, best))
    train = write_jsonl(tmp_path / "data" / "pairs.jsonl", with_rejected(records[:20]))
    code, run = local_run(tiny_model_dir, train, tmp_path, **OVERFIT,
                          **{"training.preference": {"enabled": True, "steps": 3},
                             "training.reportTo": ["tensorboard"]})
    assert code == 0
    manifest = json.loads((run / "manifest.json").read_text())
    sft, pref = manifest["stages"]
    assert (sft["name"], sft["bestStep"], pref["name"], pref["steps"]) == ("sft", 15, "preference", 3)
    assert len(restored) == 1  # the SFT model got the best weights back before DPO started from it
    scalars = {stage: tensorboard_scalars(run / "tracking/tensorboard" / stage) for stage in ("sft", "preference")}
    assert scalars["sft"]["eval/loss"] and [s for s, _ in scalars["preference"]["train/loss"]] == [1, 2, 3]
    listed = {f["path"] for f in manifest["files"]}
    assert any(p.startswith("tracking/tensorboard/preference/events.out.tfevents.") for p in listed)
