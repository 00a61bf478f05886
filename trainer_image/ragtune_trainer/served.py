"""Evaluate what is served (issue 12, item 6).

A QLoRA adapter is trained on a 4-bit base, but TGI and vLLM load it onto the unquantised base
(bf16/fp16 on a GPU). The LoRA weights are the same; the base under them is not, and the adapter's
behaviour can shift with it. So after QLoRA training the run scores the adapter once on the 4-bit
base it trained on (`quantized_adapter_metrics`), then loads the unquantised base at the compute
dtype, puts the trained adapter on it (`served_model`) and runs the whole evaluation — base,
adapter, foreign prompt, few-shot base — on that: the gates judge what will be served, and the
report shows the 4-bit figure beside it. The 4-bit model is dropped before the 16-bit one loads, so
peak memory is the larger of the two, not their sum.
"""

from __future__ import annotations

import gc
from pathlib import Path

from ragtune.api.common import EvalMetrics
from ragtune.api.finetunejob import FineTuneJobSpec
from ragtune.rag.metrics import score
from ragtune.rag.prompt import PromptContract, render_prompt
from ragtune.rag.records import RagRecord

from .base_model import Plan
from .run import TrainerFailure, one_line


def quantized_adapter_metrics(model, tokenizer, records: list[RagRecord], spec: FineTuneJobSpec) -> EvalMetrics:
    """The trained adapter on the quantised base it trained on, under the spec's prompt."""
    from .evaluate import generate_answers

    records = records[: spec.evaluation.max_samples]
    contract = PromptContract.from_spec(spec)
    prompts = [render_prompt(tokenizer, r, prompt=contract) for r in records]
    was_training = model.training
    model.eval()
    try:
        answers = generate_answers(model, tokenizer, prompts, spec.evaluation.max_new_tokens)
    finally:
        model.train(was_training)
    return score(records, answers, prompt=contract)


def served_model(trained, source: str, revision: str, plan: Plan, work_dir: Path):
    """The trained adapter on the unquantised base at the plan's compute dtype (what a server
    loads); `trained` is released. The result is a peft model in eval mode."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = work_dir / "served-adapter"
    trained.save_pretrained(adapter_dir, safe_serialization=True)
    del trained
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        base = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=getattr(torch, plan.dtype))
    except (OSError, ValueError) as exc:
        raise TrainerFailure("BaseModelNotFound", f"unquantised base model {source}@{revision} not loadable "
                                                  f"for the served-model evaluation: {one_line(exc)}")
    base.to(plan.device)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)
    model.eval()
    return model
