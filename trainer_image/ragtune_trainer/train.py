"""One training run, start to finish:

    base model + tokenizer -> training rows (validated, RAFT, tokenised once) -> LoRA model
    -> train (resuming from the newest complete checkpoint; checkpoints to S3, SIGTERM-safe; with a
       validation split: the best checkpoint by validation loss, early stopping, `control.py`)
    -> preference stage (optional: DPO on chosen/rejected pairs, continuing the same adapter)
    -> evaluate base vs adapter -> gates -> adapter, report, upload, manifest.json LAST -> TrainerResult

Each stage lives in its own module: `run` (context, SIGTERM, failure classification), `base_model`
(device plan, model and tokenizer), `rows` (training rows), `sft` (loss, sampler, trainer, config,
callbacks), `preference` (the DPO stage), `publish` (adapter, report, manifest). Every fault
ends as `TrainerFailure(reason, message)`; the CLI turns it into the termination message and a non-zero exit.

Speed on CPU comes from four things, each measured by `bench/train_speed.py`: fp32 without gradient
checkpointing, an LM head applied only to the answer positions (`sft.answer_only_loss`), LoRA
dropout masks drawn from random bits (`lora_dropout.py`), and length-grouped batches when random
ones would be >= 20% padding (or padding-free rows).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from ragtune.api.common import EvalMetrics
from ragtune.api.gates import describe_failures, evaluate_gates, prompt_gap
from ragtune.api.pods import StageSummary, TrainerResult
from ragtune.storage import StorageError

from . import distributed, tracking
from .base_model import detect_plan, load_model, load_tokenizer, resolve_base_model
from .checkpoints import latest_complete_checkpoint, restore_finished
from .control import ControlState, resume_best
from .publish import publish_run
from .rows import prepare_data
from .run import Preempted, RunContext, RunState, TrainerFailure, sigterm_guard
from .sft import build_trainer, planned_steps

__all__ = ["RunContext", "TrainerFailure", "run"]


def run(ctx: RunContext) -> TrainerResult:
    """Execute the whole run; raises TrainerFailure on any fault (incl. Preempted). An allocation
    failure propagates as it is: the CLI reports it as OutOfMemory once its frames are released."""
    state = RunState()
    with sigterm_guard(state):
        try:
            return _run(ctx, state)
        except StorageError as err:
            raise TrainerFailure(err.reason, str(err)) from err


def _run(ctx: RunContext, state: RunState) -> TrainerResult:
    from transformers import set_seed

    spec = ctx.spec
    ctx.report("loading")
    set_seed(spec.training.seed)
    plan = detect_plan(spec)
    source, revision = resolve_base_model(ctx), spec.base_model.revision
    tokenizer = load_tokenizer(source, revision)
    prepared = prepare_data(ctx, tokenizer)
    if spec.training.preference.enabled:
        from .preference import require_pairs

        require_pairs(ctx, prepared.train_records)
    model = load_model(source, revision, spec, plan)

    # --- train ---
    total = planned_steps(spec, len(prepared.train))
    checkpoint_dir = ctx.work_dir / "checkpoints"
    resume_dir = None
    resume = latest_complete_checkpoint(ctx.storage, ctx.run_uri)
    if resume:
        resume_dir = checkpoint_dir / f"checkpoint-{resume[0]}"
        ctx.storage.download_prefix(resume[1], resume_dir)
        state.start_step = resume[0]
        tracking.resume_tracking(ctx)
    state.control = resume_best(resume_dir, ctx.work_dir / "best") if resume_dir else ControlState()
    ctx.report("training", step=state.start_step, total_steps=total)
    if resume_dir and (state.start_step >= total or state.control.stopped_early):
        # An earlier attempt finished training (or stopped it early) and failed later (e.g. S3
        # down while evaluating or uploading). The Trainer checks its step limit only after a
        # step, so resuming it here would train one step past maxSteps: take the finished adapter.
        log_history = restore_finished(model, resume_dir)
        steps, train_seconds = state.start_step, 0.0
    else:
        model, log_history, steps, train_seconds = _train(ctx, state, plan, model, tokenizer, prepared, total,
                                                          checkpoint_dir, resume_dir)
    sft = StageSummary(name="sft", steps=steps, seconds=train_seconds, items=len(prepared.train),
                       stop_reason=state.control.stop_reason)
    if prepared.validation:
        _keep_best(ctx, state.control, model, steps)
        sft.best_step, sft.best_eval_loss = state.control.best_step, state.control.best_eval_loss
        sft.validation_items = len(prepared.validation)
    stages = [sft]
    # answerTokens: what this attempt trained on, over all ranks (eval/report.json only).
    stage_reports = [dict(stages[0].to_wire(), answerTokens=state.answer_tokens, lossHistory=log_history)]
    if spec.training.preference.enabled:
        from .preference import STAGE, run_preference

        ctx.report(STAGE, step=0, total_steps=spec.training.preference.steps)
        pref = run_preference(ctx, state, plan, model, tokenizer, prepared.train_records, prepared.eval_records)
        model = pref.model
        stages.append(pref.summary)
        stage_reports.append(dict(pref.summary.to_wire(), lossHistory=pref.log_history, pairs=pref.counts))

    if not distributed.world().main:  # rank 0 alone evaluates and publishes; the CLI waits for it
        return distributed.follower_result(ctx.run_id, steps, train_seconds)

    # --- evaluate ---
    ctx.report("evaluating", step=steps, total_steps=total)
    outcome, quantized = None, None
    if prepared.eval_records:
        from .evaluate import evaluate_run

        if plan.quantize_bits:  # gate on what servers load: the adapter on the unquantised base
            from .served import quantized_adapter_metrics, served_model

            quantized = quantized_adapter_metrics(model, tokenizer, prepared.eval_records, spec)
            model = served_model(model, source, revision, plan, ctx.work_dir)
        outcome = evaluate_run(model, tokenizer, prepared.eval_records, spec,
                               progress=lambda done, n: ctx.report("evaluating", step=steps, total_steps=total,
                                                                   percent=int(100 * done / max(n, 1))),
                               few_shot=prepared.few_shot)
        outcome.quantized_adapter = quantized
    base_m = outcome.base if outcome else EvalMetrics()
    adapter_m = outcome.adapter if outcome else EvalMetrics()
    foreign_m = outcome.foreign if outcome else None
    gates = evaluate_gates(spec.evaluation.thresholds, adapter_m, base_m, foreign_m,
                           intervals=outcome.intervals if outcome else None)
    passed = all(g.passed for g in gates)

    # --- publish ---
    ctx.report("uploading", step=steps, total_steps=total)
    published = publish_run(ctx, model, tokenizer, outcome, log_history, gates, prepared.datasets, passed,
                            construction=prepared.construction, stages=stages, stage_reports=stage_reports,
                            eval_records=prepared.eval_records, data_hygiene=prepared.hygiene)
    return TrainerResult(
        outcome="Succeeded" if passed else "Failed",
        reason="Completed" if passed else "GateFailed",
        message=f"trained {_stages_text(stages)}; "
                + ("all gates passed" if passed else "gates failed: " + describe_failures(gates)),
        run_id=ctx.run_id, adapter_uri=ctx.run_uri, manifest_sha256=published.manifest_sha256,
        adapter_size_bytes=published.adapter_size_bytes, report_uri=published.report_uri,
        prompt_sha256=published.prompt_sha256,
        eval_set_uri=published.eval_set_uri, eval_set_sha256=published.eval_set_sha256,
        base=base_m, adapter=adapter_m, foreign_prompt=foreign_m, foreign_prompt_gap=prompt_gap(adapter_m, foreign_m),
        passed=passed, gates=gates, steps=sum(s.steps for s in stages),
        train_seconds=round(sum(s.seconds or 0.0 for s in stages), 2), stages=stages,
    )


def _stages_text(stages: list[StageSummary]) -> str:
    if len(stages) == 1:
        return f"{stages[0].steps} steps"
    return " + ".join(f"{s.steps} {s.name}" for s in stages) + " steps"


def _train(ctx: RunContext, state: RunState, plan, model, tokenizer, prepared, total: int, checkpoint_dir: Path,
           resume_dir: Optional[Path]):
    """Train to `total` steps (from `resume_dir` when given) -> (model, log history, steps, seconds)."""
    import torch

    trainer = build_trainer(ctx, state, plan, model, tokenizer, prepared.train, prepared.loss_rows, total,
                            checkpoint_dir)
    started = time.monotonic()
    state.training = True
    try:
        trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    finally:
        state.training = False
    seconds = round(time.monotonic() - started, 2)
    steps = trainer.state.global_step
    if state.preempt_requested:
        raise Preempted(f"SIGTERM at step {steps}; checkpoint-{state.last_checkpoint} uploaded, a retry resumes from it")
    result = trainer.model, trainer.state.log_history, steps, seconds
    del trainer  # the optimizer state is not needed past training: free it before evaluation
    state.trainer = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def _keep_best(ctx: RunContext, control: ControlState, model, steps: int) -> None:
    """Give `model` the best checkpoint's adapter (unless the last step was the best). Rank 0
    kept it from the checkpoint it saved; other ranks (their nodes never held the adapter file)
    read it from the final checkpoint in storage, which carries a copy."""
    import sys

    from .checkpoints import checkpoint_uri
    from .control import BEST_ADAPTER, restore_best

    if control.best_step is None:
        print("ragtune train: no finite validation loss: the adapter is the last step's", file=sys.stderr)
        return
    if control.best_step == steps:
        return
    best = ctx.work_dir / "best" / BEST_ADAPTER
    if not best.is_file():
        ctx.storage.download(checkpoint_uri(ctx.run_uri, steps) + BEST_ADAPTER, best)
    restore_best(model, best)
    if distributed.world().main:
        print(f"ragtune train: the adapter is the best checkpoint, step {control.best_step} (validation loss "
              f"{control.best_eval_loss:.4f}); training ended at step {steps} ({control.stop_reason})",
              file=sys.stderr, flush=True)
