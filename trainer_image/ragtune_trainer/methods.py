"""The PEFT method of a run (`spec.method`) as the peft config that `base_model.load_model` puts on
the base: LoRA for `lora` and `qlora` (the base's quantisation is the difference), DoRA for `dora`
(LoRA with peft's `use_dora`: the weight split into magnitude and direction, LoRA on the
direction), IA3 for `ia3` (one learned scaling vector per targeted layer: on the output of
attention projections, on the input of the feed-forward down projection, peft's per-architecture
default). `lora.targetModules` applies to all of them; rank, alpha, dropout and bias to LoRA and DoRA.

TGI and vLLM load LoRA adapters only (`SERVABLE_METHODS`): DoRA and IA3 adapters train and are
evaluated like any other, and an AdapterDeployment refuses them at resolution.
"""

from __future__ import annotations

from ragtune.api.finetunejob import FineTuneJobSpec, Method


def peft_config(spec: FineTuneJobSpec):
    from peft import IA3Config, LoraConfig

    targets = spec.lora.target_modules
    targets = "all-linear" if targets == ["all-linear"] else targets
    if spec.method == Method.IA3:
        return IA3Config(target_modules=targets, task_type="CAUSAL_LM")
    return LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                      target_modules=targets, use_dora=spec.method == Method.DORA, bias=spec.lora.bias,
                      task_type="CAUSAL_LM")
