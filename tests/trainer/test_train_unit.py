import io
import json
from pathlib import Path

import pytest

from ragtune.api.finetunejob import FineTuneJobSpec, TrainingProgress
from ragtune.api.pods import EXIT_PERMANENT, EXIT_RETRYABLE, PROGRESS_PREFIX, TrainerResult
from ragtune.storage import Storage
from ragtune_trainer import base_model as B
from ragtune_trainer import cli
from ragtune_trainer import run as R
from ragtune_trainer import sft as S
from ragtune_trainer.checkpoints import COMPLETE_MARKER, latest_complete_checkpoint, upload_checkpoint


def spec(**training) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({
        "baseModel": {"id": "org/model"}, "dataset": {"train": "file:///d.jsonl"}, "output": {"uri": "file:///o"},
        "training": training,
    })


def test_device_aware_defaults():
    cpu = B.plan_for(spec(), cuda=False, bf16_ok=False, flash_attention=False)
    assert (cpu.device, cpu.dtype, cpu.gradient_checkpointing, cpu.padding_free, cpu.quantize_bits) == \
        ("cpu", "float32", False, False, 4)
    gpu = B.plan_for(spec(), cuda=True, bf16_ok=True, flash_attention=True)
    assert (gpu.dtype, gpu.gradient_checkpointing, gpu.padding_free) == ("bfloat16", True, True)
    assert not B.plan_for(spec(), cuda=True, bf16_ok=False, flash_attention=False).padding_free
    forced = B.plan_for(spec(packing=True, gradientCheckpointing=True), cuda=False, bf16_ok=False, flash_attention=False)
    assert forced.padding_free and forced.gradient_checkpointing
    with pytest.raises(R.TrainerFailure) as err:
        B.plan_for(spec(precision="bf16"), cuda=False, bf16_ok=False, flash_attention=False)
    assert err.value.reason == "InvalidSpec"


def test_planned_steps():
    assert S.planned_steps(spec(maxSteps=7), 1000) == 7
    assert S.planned_steps(spec(batchSize=4, gradientAccumulationSteps=2, epochs=2), 17) == 6  # ceil(ceil(17/4)/2)*2


def test_answer_only_loss_matches_full_cross_entropy(tiny_model_dir):
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    ids = torch.randint(4, 100, (2, 12))
    labels = ids.clone()
    labels[:, :8] = -100
    labels[1, 10:] = -100
    loss, n = S.answer_only_loss(model, {"input_ids": ids, "labels": labels})
    logits = model(input_ids=ids).logits[:, :-1]
    expected = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert n == 6 and torch.allclose(loss, expected, atol=1e-5)
    # padding-free: the two rows flattened into one, positions restarting, gives the same loss
    flat = {"input_ids": ids.reshape(1, -1), "labels": labels.reshape(1, -1),
            "position_ids": torch.arange(12).repeat(2)[None]}
    flat["labels"][0, 12] = -100
    loss_pf, n_pf = S.answer_only_loss(model, flat)
    assert n_pf == 6 and torch.allclose(loss_pf, expected, atol=1e-5)


def test_only_complete_checkpoints_are_resumed(tmp_path):
    run = (tmp_path / "run").as_uri() + "/"
    assert latest_complete_checkpoint(Storage(), run) is None
    for step, complete in ((5, True), (10, True), (15, False)):
        d = tmp_path / "run/checkpoints" / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "adapter_model.safetensors").write_bytes(b"x")
        if complete:
            (d / COMPLETE_MARKER).write_text("{}")
    step, uri = latest_complete_checkpoint(Storage(), run)
    assert step == 10 and uri.endswith("/checkpoints/checkpoint-10/")


def test_upload_checkpoint_writes_marker_and_keeps_two(tmp_path):
    run = (tmp_path / "run").as_uri() + "/"
    for step in (1, 2, 3):
        local = tmp_path / f"local-{step}"
        local.mkdir()
        (local / "optimizer.pt").write_bytes(bytes([step]))
        upload_checkpoint(Storage(), run, local, step)
    remote = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert remote == ["checkpoint-2", "checkpoint-3"]
    marker = json.loads((tmp_path / "run/checkpoints/checkpoint-3" / COMPLETE_MARKER).read_text())
    assert marker["step"] == 3 and set(marker["files"]) == {"optimizer.pt"}


def test_local_job_overrides_and_bare_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "job.yaml"
    job.write_text("""
apiVersion: ragtune.dev/v1alpha1
kind: FineTuneJob
metadata: {name: demo}
spec:
  baseModel: {id: org/m, uri: models/m}
  dataset: {train: data/train.jsonl}
  output: {uri: s3://bucket/runs}
""")
    s, meta = cli.load_local_job(str(job), "out", ["training.maxSteps=3", "lora.r=4"])
    assert s.dataset.train == (tmp_path / "data/train.jsonl").as_uri()
    assert s.base_model.uri == (tmp_path / "models/m").as_uri() and s.output.uri == (tmp_path / "out").as_uri()
    assert s.training.max_steps == 3 and s.lora.r == 4 and meta["name"] == "demo"
    with pytest.raises(SystemExit, match="invalid spec"):
        cli.load_local_job(str(job), None, ["training.maxSteps=-1"])


def test_progress_printer_is_rate_limited_but_reports_stage_changes():
    out = io.StringIO()
    p = cli.ProgressPrinter(interval=60, stream=out)
    p(TrainingProgress(stage="training", step=1))
    p(TrainingProgress(stage="training", step=2))  # within the interval: dropped
    p(TrainingProgress(stage="evaluating", step=2))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and all(line.startswith(PROGRESS_PREFIX) for line in lines)
    assert json.loads(lines[1][len(PROGRESS_PREFIX):]) == {"step": 2, "stage": "evaluating"}


def test_progress_printer_reports_a_stages_first_step_at_once():
    """A short stage (e.g. the preference stage's few steps) is seen under way, not only its start."""
    out = io.StringIO()
    p = cli.ProgressPrinter(interval=60, stream=out)
    for progress in [TrainingProgress(stage="preference", step=0), TrainingProgress(stage="preference", step=1),
                     TrainingProgress(stage="preference", step=2), TrainingProgress(stage="evaluating", step=2),
                     TrainingProgress(stage="evaluating", step=3)]:
        p(progress)
    steps = [(d["stage"], d["step"]) for d in (json.loads(line[len(PROGRESS_PREFIX):])
                                               for line in out.getvalue().splitlines())]
    assert steps == [("preference", 0), ("preference", 1), ("evaluating", 2)]


@pytest.mark.parametrize("reason, code", [
    ("Completed", 0), ("GateFailed", EXIT_PERMANENT), ("InvalidDataset", EXIT_PERMANENT),
    ("S3Unreachable", EXIT_RETRYABLE), ("Preempted", EXIT_RETRYABLE), ("OutOfMemory", EXIT_PERMANENT),
    ("S3AddressForbidden", EXIT_PERMANENT),
])
def test_exit_codes(reason, code):
    outcome = "Succeeded" if reason == "Completed" else "Failed"
    assert R.exit_code(TrainerResult(outcome=outcome, reason=reason)) == code


def test_length_grouped_order_is_seeded_near_random_and_low_padding():
    import random

    lengths = [random.Random(i).randint(50, 400) for i in range(130)]
    order = S.length_grouped_order(lengths, batch_size=4, seed=1)
    assert sorted(order) == list(range(130)) and order == S.length_grouped_order(lengths, 4, seed=1)
    assert order != S.length_grouped_order(lengths, 4, seed=2)
    batches = [order[i:i + 4] for i in range(0, 128, 4)]
    padded = sum(4 * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)
    rand = list(range(130))
    random.Random(0).shuffle(rand)
    padded_random = sum(4 * max(lengths[i] for i in b) - sum(lengths[i] for i in b)
                        for b in (rand[i:i + 4] for i in range(0, 128, 4)))
    assert padded < padded_random / 2
    # the first half of the order is a spread sample, not just the longest items
    first = sorted(lengths[i] for i in order[:64])
    assert first[0] < sorted(lengths)[65]


def test_qlora_on_cpu_matches_a_dequantised_reference(tiny_model_dir):
    """bitsandbytes' 4-bit kernels on CPU: the QLoRA model's loss and LoRA gradients equal those of
    an fp32 model holding the dequantised weights and the same adapter (the backward pass through the
    frozen 4-bit layers is exact, not an approximation)."""
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import dequantize_4bit
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    qspec = FineTuneJobSpec.model_validate({
        "baseModel": {"id": "tiny"}, "dataset": {"train": "file:///d.jsonl"}, "output": {"uri": "file:///o"},
        "method": "qlora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    })
    plan = B.plan_for(qspec, cuda=False, bf16_ok=False, flash_attention=False)
    assert plan.quantize_bits == 4
    torch.manual_seed(0)
    qlora = B.load_model(str(tiny_model_dir), "main", qspec, plan)
    quantised = {name.removesuffix(".base_layer"): m for name, m in qlora.get_base_model().named_modules()
                 if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantised) == 2 * 7  # all linear layers of both blocks (the LM head stays unquantised)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter's path contribute
        for name, p in qlora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, m in quantised.items():
            w = dequantize_4bit(m.weight.data, m.weight.quant_state).float()
            reference.get_submodule(name).weight.copy_(w)
    reference = get_peft_model(reference, qlora.peft_config["default"])
    reference.load_state_dict({k: v for k, v in qlora.state_dict().items() if "lora_" in k}, strict=False)

    ids = torch.randint(4, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :10] = -100
    grads = []
    for model in (qlora, reference):
        model.train()
        loss, _ = S.answer_only_loss(model, {"input_ids": ids, "labels": labels})
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (q_loss, q_grads), (r_loss, r_grads) = grads
    assert torch.allclose(q_loss, r_loss, atol=1e-5)
    assert q_grads.keys() == r_grads.keys() and len(q_grads) == 2 * 2 * 7
    for name in q_grads:
        assert q_grads[name].abs().max() > 0, name
        assert torch.allclose(q_grads[name], r_grads[name], rtol=1e-4, atol=1e-6), name


def test_batches_are_grouped_by_length_only_when_random_ones_would_be_mostly_padding():
    import random

    cpu = B.plan_for(spec(), cuda=False, bf16_ok=False, flash_attention=False)
    similar = [random.Random(i).randint(190, 220) for i in range(200)]  # like the synthetic RAG items
    varied = [random.Random(i).choice([120, 900]) for i in range(200)]  # 1 vs 10 retrieved passages
    similar_padding, varied_padding = S.random_batch_padding(similar, 8, 0), S.random_batch_padding(varied, 8, 0)
    assert similar_padding < 0.1 < 0.4 < varied_padding
    assert S.sampling_strategy(cpu, similar_padding) == "random"
    assert S.sampling_strategy(cpu, varied_padding) == "group_by_length"
    packed = B.plan_for(spec(packing=True), cuda=False, bf16_ok=False, flash_attention=False)
    assert S.sampling_strategy(packed, varied_padding) == "random"  # padding-free rows have no padding
    config = S.build_sft_config(spec(), cpu, Path("/tmp/unused"), 10, has_eval=False, sampling="group_by_length")
    assert config.train_sampling_strategy == "group_by_length"


@pytest.mark.parametrize("fmt", ["rag", "prompt-completion"])
def test_each_item_is_tokenised_once(monkeypatch, tmp_path, tiny_tokenizer, records, fmt):
    """Validation's length check, RAFT's fit check and the training rows share one tokenisation of
    each item (the RAFT items are new texts: each of them is tokenised once too)."""
    from ragtune_trainer import data as D
    from ragtune_trainer import rows as Rows

    from .conftest import write_jsonl

    lines = [r.to_dict() if fmt == "rag" else {"prompt": r.question, "completion": r.answer} for r in records[:30]]
    train = write_jsonl(tmp_path / "train.jsonl", lines)
    seen = []
    real = D.tokenize

    def counting(tokenizer, example):
        seen.append(json.dumps([example.prompt, example.completion]))
        return real(tokenizer, example)

    monkeypatch.setattr(D, "tokenize", counting)
    job = FineTuneJobSpec.model_validate({
        "baseModel": {"id": "tiny"}, "dataset": {"train": train.as_uri(), "format": fmt, "evalSplit": 0.2},
        "output": {"uri": (tmp_path / "out").as_uri()}, "training": {"maxSeqLength": 512},
    })
    prepared = Rows.prepare_data(R.RunContext(spec=job, run_id="r", run_uri="file:///unused/"), tiny_tokenizer)
    assert len(prepared.train) + len(prepared.eval) == 30
    assert len(seen) == len(set(seen))
    row = prepared.train[0]
    assert row["length"] == len(row["input_ids"]) == len(row["labels"]) and -100 in row["labels"]
