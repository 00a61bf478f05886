"""FSDP on CPU (gloo), no Kubernetes: 2 processes under torchrun train a LoRA adapter with
`training.distributed.strategy: fsdp` (FSDP2 through transformers/accelerate); rank 0 alone
publishes (one result, one manifest), the adapter is a full state dict that peft loads on the base
model, and it equals a one-process run with the same global batch and seed within the stated
tolerance (sharding changes where the parameters live, not the arithmetic); a retry resumes both
ranks from the newest complete checkpoint and ends with the same adapter."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from .test_distributed_run import RAGTUNE, _adapter, _answer_tokens, _job, _losses, _run

pytestmark = pytest.mark.slow

WEIGHT_TOLERANCE = 1e-4
"""Largest |FSDP - one process| over the adapter's weights after 4 steps (float32; measured
~1e-7 on this machine, like DDP: only the summation order differs)."""
LOSS_TOLERANCE = 1e-4


def _fsdp_job(tmp_path: Path, tiny_model_dir, train_file) -> Path:
    path = _job(tmp_path, tiny_model_dir, train_file, 2)
    job = json.loads(path.read_text())
    job["spec"]["training"]["distributed"] = {"strategy": "fsdp"}
    path.write_text(json.dumps(job))
    return path


def test_fsdp_on_cpu_trains_the_one_process_adapter_and_rank_0_alone_writes_it(tiny_model_dir, train_file, tmp_path):
    single = _run([RAGTUNE, "train", "-f", str(_job(tmp_path, tiny_model_dir, train_file, 4)), "--run-id", "one",
                   "--work-dir", str(tmp_path / "w1")], tmp_path)
    torchrun = [RAGTUNE, "torchrun", "--standalone", "--nnodes=1", "--nproc-per-node=2", "--max-restarts=0",
                "--no-python", RAGTUNE, "train", "-f", str(_fsdp_job(tmp_path, tiny_model_dir, train_file)),
                "--run-id", "fsdp"]
    fsdp = _run(torchrun + ["--work-dir", str(tmp_path / "w2")], tmp_path)
    runs = tmp_path / "out/dev/dist"
    assert "world size 2 (fsdp), global batch 4 = 2 per device x 2 x 1 accumulation" in fsdp.stderr
    assert "world size 1 (one process), global batch 4" in single.stderr
    assert "Passing `fsdp` as a string is deprecated" not in fsdp.stderr

    # Only rank 0 publishes: one result document, one manifest, one adapter.
    assert fsdp.stdout.count('"outcome"') == 1
    result = json.loads(fsdp.stdout[fsdp.stdout.index("{"):])
    assert (result["outcome"], result["steps"]) == ("Succeeded", 4)
    assert len(list((runs / "fsdp").rglob("manifest.json"))) == 1
    assert len(list((runs / "fsdp").glob("adapter/adapter_model.safetensors"))) == 1
    marker = json.loads((runs / "fsdp/checkpoints/checkpoint-4/COMPLETE").read_text())
    assert marker["worldSize"] == 2 and "rng_state_1.pth" in marker["rankFiles"]

    # A full (gathered) adapter: the one-process run's tensors, shapes and values.
    a, b = _adapter(runs / "one"), _adapter(runs / "fsdp")
    assert a.keys() == b.keys() and a
    assert all(a[k].shape == b[k].shape for k in a)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float(v.abs().max()) for k, v in b.items() if "lora_B" in k)
    one, two = _losses(runs / "one"), _losses(runs / "fsdp")
    print(f"adapter max |FSDP - one| {worst:.3g} (largest lora_B {moved:.3g}); losses {one} vs {two}")
    assert moved > 10 * WEIGHT_TOLERANCE  # it trained (lora_B starts at zero)
    assert worst <= WEIGHT_TOLERANCE, f"adapter weights differ by {worst}"
    assert len(two) == 4 and max(abs(x - y) for x, y in zip(one, two)) <= LOSS_TOLERANCE, (one, two)
    assert 0 < _answer_tokens(runs / "one") == _answer_tokens(runs / "fsdp")  # every rank's

    # peft loads it on the base model and it changes the logits.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = base(ids).logits.clone()
        tuned = PeftModel.from_pretrained(base, str(runs / "fsdp/adapter"))
        after = tuned(ids).logits
    assert not torch.allclose(before, after)

    # A retry of an attempt that died after checkpoint 2 (no checkpoint 4, nothing published):
    # both ranks resume at step 2 from the gathered checkpoint and end with the same adapter.
    run = runs / "fsdp"
    shutil.rmtree(run / "checkpoints/checkpoint-4")
    for published in ("adapter", "eval"):
        shutil.rmtree(run / published)
    (run / "manifest.json").unlink()
    retry = _run(torchrun + ["--work-dir", str(tmp_path / "w3")], tmp_path)
    started = min(int(n) for n in re.findall(r"training:.*?\b(\d)/4\b", retry.stderr))
    assert started == 2, retry.stderr[-3000:]
    again = _adapter(run)
    assert max(float((b[k] - again[k]).abs().max()) for k in b) <= WEIGHT_TOLERANCE
