"""The preference stage (`training.preference`): DPO through trl's `DPOTrainer` after SFT,
continuing the SFT adapter.

Pairs from the data: every training item (after the RAFT construction, so with the same distractors SFT saw)
whose record has a `rejected` answer, rendered with the prompt contract's grounded-answer prompt
(`PromptContract.messages`, as SFT renders it) and tokenised by the same code as the SFT rows
(`data.tokenize`), so both stages train on one prompt. `chosen` is the item's target: the answer,
or the refusal when the item is unanswerable (user-labelled, or made unanswerable by RAFT: then
`rejected` - a hallucinated answer - is exactly what refusing prevents). A pair longer than
`training.maxSeqLength` is dropped and counted.

Automatic pairs (`automaticPairs: N`): the first N training items without a `rejected` answer are
answered greedily by the SFT model under the same prompt; where that answer is wrong or ungrounded
(`wrong_answer`) it becomes `rejected` and the item's target `chosen`, so DPO pushes the model
away from its own mistakes.

Reference model: the SFT adapter as it is when the stage starts (trl copies the PeftModel's
`default` adapter to a frozen `ref` adapter; removed again after the stage, so the published
adapter is the one trained adapter). Dropout is off in this stage (trl's default: the policy and
reference log-probabilities of a pair must come from the same function). On a quantised (QLoRA)
base trl trains the adapter weights in bf16 (the QLoRA paper's practice); the published adapter is
float32 again, since a QLoRA adapter is published from the unquantised base (`served.py`).

The stage keeps no checkpoints: it is short, and its steps would collide with SFT's in
`checkpoints/`. SIGTERM stops it as `Preempted`; the retry resumes SFT from its final checkpoint
(`checkpoints.restore_finished`) and reruns this stage.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from ragtune.api.finetunejob import TrainingProgress
from ragtune.api.pods import StageSummary
from ragtune.clock import utc_now_iso
from ragtune.rag.metrics import f1_score, grounding_score, is_refusal, normalize_answer, strip_citations
from ragtune.rag.prompt import PromptContract, render_prompt
from ragtune.rag.records import RagRecord

from . import data as D
from . import tracking
from .base_model import Plan
from .run import Preempted, RunContext, RunState, TrainerFailure
from .sft import stage_trainer_args

STAGE = "preference"
AUTO_MIN_F1 = 0.5
"""An answer to an answerable item with a lower token F1 against the reference is wrong."""
AUTO_MIN_GROUNDING = 0.5
"""An answer with a smaller share of its content words in the item's contexts is ungrounded."""


@dataclass
class Pairs:
    rows: list[dict]
    """`{prompt_ids, chosen_ids, rejected_ids}` per pair (what trl's preference collator takes)."""
    counts: Counter = field(default_factory=Counter)
    """Pairs per item construction (`answerable`, `nearMiss`, ...) and `droppedOverLength`."""


def preference_pairs(records: list[RagRecord], tokenizer, prompt: PromptContract, max_seq_length: int,
                     max_pairs: Optional[int] = None) -> Pairs:
    """The pairs of `records` (those with a `rejected` answer), tokenised like SFT rows."""
    out = Pairs(rows=[])
    for record in records:
        if record.rejected is None or (max_pairs is not None and len(out.rows) >= max_pairs):
            continue
        messages = prompt.messages(record)
        chosen = D.tokenize(tokenizer, D.Example(messages, record.answer, record))
        rejected = D.tokenize(tokenizer, D.Example(messages, record.rejected, record))
        if max(len(chosen["input_ids"]), len(rejected["input_ids"])) > max_seq_length:
            out.counts["droppedOverLength"] += 1
            continue
        n_prompt = chosen["completion_mask"].index(1)
        out.rows.append({"prompt_ids": chosen["input_ids"][:n_prompt],
                         "chosen_ids": chosen["input_ids"][n_prompt:],
                         "rejected_ids": rejected["input_ids"][n_prompt:]})
        out.counts[record.construction or "answerable"] += 1
    return out


def wrong_answer(record: RagRecord, answer: str, prompt: PromptContract) -> Optional[str]:
    """Why `answer` is a wrong answer to `record` (`answeredUnanswerable`, `falseRefusal`, `wrong`,
    `ungrounded`), or None when it is acceptable."""
    refused = is_refusal(answer, prompt.refusal)
    if not record.answerable:
        return None if refused else "answeredUnanswerable"
    if refused:
        return "falseRefusal"
    if f1_score(strip_citations(answer, prompt.citation), strip_citations(record.answer, prompt.citation)) \
            < AUTO_MIN_F1:
        return "wrong"
    grounding = grounding_score(answer, [c.text for c in record.contexts], prompt.citation)
    if grounding is not None and grounding < AUTO_MIN_GROUNDING:
        return "ungrounded"
    return None


def automatic_pair_records(model, tokenizer, records: list[RagRecord], prompt: PromptContract, n: int,
                           max_new_tokens: int) -> tuple[list[RagRecord], Counter]:
    """Copies of the first `n` records without a `rejected` answer whose SFT answer is wrong, with
    that answer as `rejected`; and how many were wrong in which way (`automatic.<why>`, plus
    `automatic.answered`: how many were answered)."""
    from dataclasses import replace

    from .evaluate import generate_answers

    candidates = [r for r in records if r.rejected is None][:n]
    counts: Counter = Counter({"automatic.answered": len(candidates)})
    if not candidates:
        return [], counts
    was_training = model.training
    model.eval()  # greedy and dropout-free: the answer the model would give
    try:
        answers = generate_answers(model, tokenizer, [render_prompt(tokenizer, r, prompt=prompt) for r in candidates],
                                   max_new_tokens)
    finally:
        model.train(was_training)
    out = []
    for record, answer in zip(candidates, answers):
        why = wrong_answer(record, answer, prompt)
        if why and answer.strip() and normalize_answer(answer) != normalize_answer(record.answer):
            out.append(replace(record, rejected=answer))
            counts[f"automatic.{why}"] += 1
    return out, counts


def make_dpo_trainer_class():
    from trl import DPOTrainer

    class RagDPOTrainer(DPOTrainer):
        """DPOTrainer on rows tokenised by `preference_pairs` (the SFT tokenisation), not trl's own."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return RagDPOTrainer


def build_dpo_config(ctx: RunContext, plan: Plan, out_dir, has_eval: bool):
    from trl import DPOConfig

    t, pref = ctx.spec.training, ctx.spec.training.preference
    batch = pref.batch_size or t.batch_size
    return DPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=pref.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        max_steps=pref.steps,
        beta=pref.beta,
        loss_type=["sigmoid"],
        max_length=None,  # pairs over maxSeqLength were dropped; nothing to truncate
        remove_unused_columns=False,
        eval_strategy="no",  # held-out pairs are scored once, after the last step
        save_strategy="no",
        **stage_trainer_args(ctx.spec, plan, pref.steps),
    )


def make_callbacks(ctx: RunContext, state: RunState, total_steps: int):
    from transformers import TrainerCallback

    class PreferenceCallback(TrainerCallback):
        """SIGTERM -> stop (no checkpoint, see the module docstring); progress as stage `preference`."""

        def on_step_end(self, args, st, control, **kw):
            if state.preempt_requested:
                control.should_training_stop = True
            if ctx.progress:
                losses = [e["loss"] for e in st.log_history if "loss" in e]
                ctx.progress(TrainingProgress(
                    step=st.global_step, total_steps=total_steps, loss=round(losses[-1], 4) if losses else None,
                    percent=int(100 * st.global_step / total_steps), stage=STAGE, updated_at=utc_now_iso()))

    return [PreferenceCallback()]


def sync_reference(model) -> int:
    """Make the frozen `ref` adapter an exact copy of `default` (the SFT adapter); returns how many
    tensors it holds. trl copies the parameters whose names contain `.default.`; IA3 names its
    vectors `...ia3_l.default`, which that misses (its `ref` would be the identity: the base)."""
    params = dict(model.named_parameters())
    copied = 0
    for name, param in params.items():
        parts = name.split(".")
        ref = ".".join("ref" if p == "default" else p for p in parts) if "default" in parts else None
        if ref in params:
            params[ref].data.copy_(param.data)
            copied += 1
    return copied


@dataclass
class PreferenceResult:
    model: object
    log_history: list[dict]
    """trl's log entries: loss, rewards/{chosen,rejected,margins,accuracies}, ... per logged step,
    and the held-out pairs' `eval_*` entry after the last step."""
    summary: StageSummary
    counts: dict[str, int]


def require_pairs(ctx: RunContext, train_records: list[RagRecord]) -> None:
    """Fail before any training when the stage is on, builds no automatic pairs, and no training
    item has a `rejected` answer."""
    if not ctx.spec.training.preference.automatic_pairs and not any(r.rejected is not None for r in train_records):
        raise TrainerFailure("InvalidDataset", f"{ctx.spec.dataset.train}: training.preference is enabled but no "
                                               "training record has a 'rejected' answer (the preference pairs)")


def run_preference(ctx: RunContext, state: RunState, plan: Plan, model, tokenizer,
                   train_records: list[RagRecord], eval_records: list[RagRecord]) -> PreferenceResult:
    """DPO on the pairs of the training items, continuing `model`'s (the SFT) adapter."""
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback

    spec = ctx.spec
    pref = spec.training.preference
    prompt = PromptContract.from_spec(spec)
    max_len = spec.training.max_seq_length
    pairs = preference_pairs(train_records, tokenizer, prompt, max_len, pref.max_pairs)
    if pref.automatic_pairs and len(pairs.rows) < pref.max_pairs:
        ctx.report(STAGE, step=0, total_steps=pref.steps)
        auto, counts = automatic_pair_records(model, tokenizer, train_records, prompt, pref.automatic_pairs,
                                              spec.evaluation.max_new_tokens)
        built = preference_pairs(auto, tokenizer, prompt, max_len, pref.max_pairs - len(pairs.rows))
        pairs.rows += built.rows
        pairs.counts.update(counts)
        pairs.counts["automatic"] += len(built.rows)
        pairs.counts["droppedOverLength"] += built.counts["droppedOverLength"]
    if not pairs.rows:
        why = (f"{pairs.counts['droppedOverLength']} pair(s) longer than maxSeqLength {max_len}"
               if pairs.counts["droppedOverLength"] else
               "the SFT model answered all of its automaticPairs items acceptably"
               if pref.automatic_pairs else "no training record has a 'rejected' answer")
        raise TrainerFailure("InvalidDataset", f"{spec.dataset.train}: training.preference is enabled but there are "
                                               f"no preference pairs ({why})")
    held_out = preference_pairs(eval_records, tokenizer, prompt, max_len, 64)
    print(f"ragtune train: preference stage: {len(pairs.rows)} pairs ({dict(pairs.counts)}), "
          f"{len(held_out.rows)} held-out pairs, {pref.steps} DPO steps, beta {pref.beta}", file=sys.stderr, flush=True)
    trainer = make_dpo_trainer_class()(
        model=model,
        args=build_dpo_config(ctx, plan, ctx.work_dir / STAGE, bool(held_out.rows)),
        train_dataset=Dataset.from_list(pairs.rows),
        eval_dataset=Dataset.from_list(held_out.rows) if held_out.rows else None,
        processing_class=tokenizer,
        callbacks=make_callbacks(ctx, state, pref.steps) + tracking.callbacks(ctx, STAGE),
    )
    trainer.remove_callback(PrinterCallback)
    sync_reference(trainer.model)
    started = time.monotonic()
    state.training = True
    try:
        trainer.train()
    finally:
        state.training = False
    seconds = round(time.monotonic() - started, 2)
    steps = trainer.state.global_step
    if state.preempt_requested:
        raise Preempted(f"SIGTERM at step {steps} of the preference stage; a retry takes the finished SFT adapter "
                        "over and reruns the stage")
    if held_out.rows:
        trainer.evaluate()  # logged into log_history as eval_loss, eval_rewards/margins, ...
    log_history = list(trainer.state.log_history)
    model = trainer.model
    del trainer
    if "ref" in model.peft_config:
        model.delete_adapter("ref")
    model.set_adapter("default")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    counts = dict(pairs.counts) | {"heldOut": len(held_out.rows)}
    return PreferenceResult(model=model, log_history=log_history, counts=counts,
                            summary=StageSummary(name=STAGE, steps=steps, seconds=seconds, items=len(pairs.rows)))
