"""PEFT methods (`spec.method`): `dora` (LoRA with peft's use_dora) and `ia3` train, evaluate and
publish their adapter files; with the preference stage, DPO's reference is the SFT adapter of
either kind (IA3's vectors included)."""

from __future__ import annotations

import json

import pytest

from ragtune.api.finetunejob import FineTuneJobSpec
from ragtune.cli import main
from ragtune_trainer.methods import peft_config

from .conftest import write_jsonl
from .test_preference import with_rejected
from .test_train_run import job_spec

BASE = {"baseModel": {"id": "tiny/model"}, "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/runs"}, "lora": {"r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]}}


@pytest.mark.parametrize("method, kind, dora", [("lora", "LoraConfig", False), ("qlora", "LoraConfig", False),
                                                ("dora", "LoraConfig", True), ("ia3", "IA3Config", None)])
def test_each_method_is_its_peft_config(method, kind, dora):
    config = peft_config(FineTuneJobSpec.model_validate(dict(BASE, method=method)))
    assert type(config).__name__ == kind and set(config.target_modules) == {"q_proj", "v_proj"}
    if dora is not None:
        assert config.use_dora is dora and config.r == 4 and config.lora_alpha == 8


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_method_trains_publishes_and_continues_into_dpo(method, tiny_model_dir, records, tmp_path):
    from safetensors import safe_open

    train = write_jsonl(tmp_path / "data" / "train.jsonl", with_rejected(records[:24]))
    spec = job_spec(tiny_model_dir, str(train), tmp_path / "out", **{
        "method": method, "training.maxSteps": 2,
        "training.preference": {"enabled": True, "steps": 2, "learningRate": 0.01},
        "evaluation.maxSamples": 2, "evaluation.maxNewTokens": 2, "evaluation.fewShot": 0,
    })
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"apiVersion": "ragtune.dev/v1alpha1", "kind": "FineTuneJob",
                               "metadata": {"name": method, "namespace": "dev"}, "spec": spec}))
    assert main(["train", "-f", str(job), "--run-id", "r1"]) == 0
    run = tmp_path / "out/dev" / method / "r1"
    config = json.loads((run / "adapter/adapter_config.json").read_text())
    with safe_open(str(run / "adapter/adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    if method == "dora":
        assert config["peft_type"] == "LORA" and config["use_dora"] is True
        assert any("lora_magnitude_vector" in k for k in keys)
    else:
        assert config["peft_type"] == "IA3" and keys and all("ia3_l" in k for k in keys)
    assert not any(".ref" in k for k in keys)
    html = (run / "eval/report.html").read_text()
    assert ("(DoRA r=4, alpha=8)" if method == "dora" else "(IA3 on all-linear)") in html
    pref = json.loads((run / "eval/report.json").read_text())["stages"][1]
    first = next(e for e in pref["lossHistory"] if "rewards/margins" in e)
    # Scored before the first update: policy and reference are the same SFT adapter.
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)
