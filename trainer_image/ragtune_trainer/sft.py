"""The SFT trainer: trl's SFTTrainer with a loss that projects only the answer positions onto the
vocabulary, batches in a near-random order of similar lengths when random ones would be mostly
padding, the SFTConfig a spec and plan resolve to, and the callbacks that checkpoint to S3 (by
steps, by time, and on SIGTERM) and report progress."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from ragtune.api.finetunejob import FineTuneJobSpec, TrainingProgress
from ragtune.clock import utc_now_iso

from . import distributed
from .base_model import Plan
from .checkpoints import upload_checkpoint
from .run import RunContext, RunState, TrainerFailure


def answer_only_loss(model, inputs: dict, num_items_in_batch=None):
    """Causal-LM loss computed by projecting only the positions whose next token is an answer
    token onto the vocabulary. Returns (loss, number of loss-bearing tokens).

    Kept over trl's own loss (its fused LM head): trl projects only the answer positions on CUDA/XPU
    with Triton, but on CPU it scores every position, and it also computes entropy and top-1
    metrics each step. Measured with `bench/train_speed.py --runs ragtune_trl_loss` (same batches,
    same held-out loss): see docs/benchmarks.md."""
    import torch
    import torch.nn.functional as F

    labels = inputs["labels"]
    inner = unwrap(model)
    causal_lm = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    kwargs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
    targets = labels[:, 1:]
    mask = targets != -100
    config = causal_lm.config.get_text_config()
    if inner is not model and type(model).__name__ == "FullyShardedDataParallel":
        # FSDP: the LM head's weight is a shard outside the wrapper's forward, so the head runs
        # inside it (every position; the model applies its own scaling and capping).
        logits = model(**kwargs, use_cache=False).logits[:, :-1][mask].float()
    else:
        if inner is model:
            hidden = backbone(**kwargs, use_cache=False).last_hidden_state
        else:
            # DDP: the forward must go through the wrapper, or its gradient all-reduce never
            # runs (the reducer arms its hooks in forward). The wrapper computes one position's
            # logits; the backbone's output is taken from a hook.
            hidden = _wrapped_hidden(model, backbone, kwargs)
        logits = causal_lm.get_output_embeddings()(hidden[:, :-1][mask]).float()
        if getattr(config, "logits_scaling", None):  # Granite divides its logits
            logits = logits / config.logits_scaling
        if getattr(config, "final_logit_softcapping", None):  # Gemma 2/3 cap them
            cap = config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
    count = mask.sum()
    denom = num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1)
    loss = F.cross_entropy(logits, targets[mask], reduction="sum") / denom
    return loss, int(count)


def unwrap(model):
    """The PeftModel (or plain model) inside DDP/FSDP wrappers (they keep it in `.module`)."""
    while not hasattr(model, "get_base_model") and hasattr(model, "module"):
        model = model.module
    return model


def _wrapped_hidden(model, backbone, kwargs: dict):
    captured = []
    handle = backbone.register_forward_hook(lambda _m, _a, out: captured.append(out.last_hidden_state))
    try:
        model(**kwargs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[0]


GROUPING_MIN_PADDING = 0.2
"""Length-grouped batches only pay off when random batches would be at least this much padding:
grouping makes batches less diverse, which costs held-out loss in short runs (bench/train_speed.py,
synthetic RAG items of similar lengths: same speed, +0.02 eval loss after 20 steps)."""


def random_batch_padding(lengths: list[int], batch_size: int, seed: int) -> float:
    """The share of computed positions that would be padding if batches were drawn at random."""
    import random

    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    computed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths) / computed if computed else 0.0


def sampling_strategy(plan: Plan, padding: float) -> str:
    """`random`, or `group_by_length` when random batches would be at least GROUPING_MIN_PADDING
    padding (`padding` is what `random_batch_padding` says of the data)."""
    if plan.padding_free:
        return "random"
    return "group_by_length" if padding >= GROUPING_MIN_PADDING else "random"


def length_grouped_order(lengths: list[int], batch_size: int, seed: int, window: int = 8) -> list[int]:
    """A random order in which each run of `batch_size` indices has similar lengths: shuffle, sort
    windows of `window` batches by length, cut them into batches, shuffle the batches (a partial
    batch goes last). Unlike transformers' LengthGroupedSampler (windows of 50 batches, the longest
    batch first), a short run still sees a near-random sample of the data."""
    import random

    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    size = batch_size * window
    batches = []
    for start in range(0, len(order), size):
        chunk = sorted(order[start:start + size], key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    full = [b for b in batches if len(b) == batch_size]
    rng.shuffle(full)
    return [i for b in full + [b for b in batches if len(b) < batch_size] for i in b]


def make_trainer_class():
    import torch
    from trl import SFTTrainer

    class LengthGroupedSampler(torch.utils.data.Sampler):
        def __init__(self, lengths: list[int], batch_size: int, seed: int):
            self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

        def __len__(self):
            return len(self.lengths)

        def __iter__(self):
            # Seeded per epoch (not from the global RNG): a resumed run replays the same order.
            order = length_grouped_order(self.lengths, self.batch_size, self.seed + self.epoch)
            self.epoch += 1
            return iter(order)

    class RagSFTTrainer(SFTTrainer):
        """SFTTrainer whose loss touches the vocabulary only at answer positions, with batches of
        similar lengths (little padding) in a near-random order."""

        loss_tokens = 0

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if self.args.train_sampling_strategy != "group_by_length" or "length" not in dataset.column_names:
                return super()._get_train_sampler(train_dataset)
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return LengthGroupedSampler(list(dataset["length"]), self.args.per_device_train_batch_size, seed)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            loss, count = answer_only_loss(model, inputs, num_items_in_batch)
            if num_items_in_batch is not None and self.args.average_tokens_across_devices \
                    and self.accelerator.num_processes > 1:
                # num_items_in_batch counts every rank's answer tokens and DDP averages gradients
                # over the ranks: scale back up, as Trainer.compute_loss does for its own loss.
                loss = loss * self.accelerator.num_processes
            if model.training:
                self.loss_tokens += count
            if not torch.isfinite(loss):
                raise TrainerFailure("NaNLoss", f"loss became {loss.item()} at step {self.state.global_step}; "
                                                "lower training.learningRate or check the base model weights")
            return (loss, None) if return_outputs else loss

    return RagSFTTrainer


def stage_trainer_args(spec: FineTuneJobSpec, plan: Plan, steps: int) -> dict:
    """The Trainer settings every training stage shares (SFT, preference): precision from the
    plan, checkpointing done on the model (`load_model`), logging at most ~100 points, seeds, the
    optimiser (`training.optimizer`, `weightDecay`, `maxGradNorm`), no reporting integrations
    (`training.reportTo` adds its callbacks itself, `tracking.py`) or tqdm (progress goes through
    the callbacks), CPU when the plan says so."""
    t = spec.training
    return dict(
        optim=t.optimizer,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=plan.dtype == "bfloat16",
        fp16=plan.dtype == "float16",
        activation_checkpointing=False,  # enabled on the model in load_model (also covers QLoRA prep)
        logging_steps=1 if steps <= 200 else max(1, steps // 100),
        logging_first_step=True,
        seed=t.seed,
        data_seed=t.seed,
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=plan.device == "cpu",
    )


def build_sft_config(spec: FineTuneJobSpec, plan: Plan, out_dir: Path, total_steps: int, has_eval: bool,
                     sampling: str = "random"):
    from trl import SFTConfig

    t = spec.training
    eval_every = eval_interval(spec, total_steps)
    return SFTConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        max_steps=total_steps,
        padding_free=plan.padding_free,
        max_length=None,  # lengths are validated against maxSeqLength; nothing to truncate
        train_sampling_strategy=sampling,
        length_column_name="length",
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        completion_only_loss=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_every,
        save_strategy="steps",
        save_steps=t.checkpoint_interval_steps,
        save_total_limit=2,
        **stage_trainer_args(spec, plan, total_steps),
        **distributed.trainer_settings(plan.strategy, plan.device),
    )


def eval_interval(spec: FineTuneJobSpec, total_steps: int) -> int:
    """Steps between eval-loss points: `training.evalIntervalSteps`, else a quarter of the run (a
    tenth with early stopping, which needs more points to notice a plateau)."""
    t = spec.training
    if t.eval_interval_steps:
        return t.eval_interval_steps
    return max(1, math.ceil(total_steps / (10 if t.early_stopping else 4)))


def planned_steps(spec: FineTuneJobSpec, n_train: int) -> int:
    t = spec.training
    if t.max_steps:
        return t.max_steps
    ranks = distributed.world().size  # each optimiser step takes a batch per rank
    per_epoch = math.ceil(math.ceil(n_train / (t.batch_size * ranks)) / t.gradient_accumulation_steps)
    return max(1, math.ceil(per_epoch * t.epochs))


# --- Progress, time-based checkpoints, SIGTERM ------------------------------------------


def make_callbacks(ctx: RunContext, state: RunState, total_steps: int):
    from transformers import TrainerCallback

    interval_s = ctx.spec.training.checkpoint_interval_seconds

    class RunCallback(TrainerCallback):
        """Time-based checkpoints, SIGTERM -> checkpoint + stop, upload on save, progress."""

        def __init__(self):
            self.last_save = time.monotonic()
            self.started = time.monotonic()

        def on_step_end(self, args, st, control, **kw):
            due = time.monotonic() - self.last_save >= interval_s
            tokens = state.trainer.loss_tokens if state.trainer else 0
            if distributed.world().distributed:
                # The ranks decide together: a SIGTERM or a clock seen by one rank stops or saves
                # them all at this step (a save is a barrier; ranks at different steps would hang).
                # The same all-reduce counts every rank's answer tokens (rank 0 alone reports them).
                stop, due, tokens = distributed.sum_over_ranks(state.preempt_requested, due, tokens)
                state.preempt_requested, due, tokens = stop > 0, due > 0, int(tokens)
            state.answer_tokens = tokens
            if state.preempt_requested:
                control.should_save = True
                control.should_training_stop = True
            elif due:
                control.should_save = True
            self._report(st, "training")

        def on_save(self, args, st, control, **kw):
            self.last_save = time.monotonic()
            local = Path(args.output_dir) / f"checkpoint-{st.global_step}"
            upload_checkpoint(ctx.storage, ctx.run_uri, local, st.global_step, world=distributed.world())
            state.last_checkpoint = st.global_step

        def on_evaluate(self, args, st, control, metrics=None, **kw):
            self._report(st, "training")

        def _report(self, st, stage):
            if not ctx.progress:
                return
            losses = [e["loss"] for e in st.log_history if "loss" in e]
            evals = [e["eval_loss"] for e in st.log_history if "eval_loss" in e]
            done = st.global_step - state.start_step
            elapsed = max(time.monotonic() - self.started, 1e-6)
            tokens = state.answer_tokens
            eta = int(elapsed / done * (total_steps - st.global_step)) if done > 0 else None
            ctx.progress(TrainingProgress(
                step=st.global_step, total_steps=total_steps, epoch=round(st.epoch or 0, 3),
                loss=round(losses[-1], 4) if losses else None, eval_loss=round(evals[-1], 4) if evals else None,
                tokens_per_second=round(tokens / elapsed, 1), eta_seconds=eta,
                percent=int(100 * st.global_step / total_steps), stage=stage, updated_at=utc_now_iso(),
            ))

    return [RunCallback()]


def build_trainer(ctx: RunContext, state: RunState, plan: Plan, model, tokenizer, train: list[dict],
                  eval_rows: list[dict], total_steps: int, checkpoint_dir: Path):
    """The trainer of one run, on the training rows (and held-out rows for the validation loss)."""
    from datasets import Dataset
    from transformers import PrinterCallback

    from . import tracking
    from .control import ControlState, make_control_callback

    t = ctx.spec.training
    padding = random_batch_padding([r["length"] for r in train], t.batch_size, t.seed)
    sampling = sampling_strategy(plan, padding)
    w = distributed.world()
    print(f"ragtune train: {plan.device}, {plan.dtype}, gradient checkpointing {plan.gradient_checkpointing}, "
          f"padding-free {plan.padding_free}, {sampling} batches (random batches would be {padding:.0%} padding); "
          f"world size {w.size} ({plan.strategy or 'one process'}), global batch {distributed.global_batch(ctx.spec, w)} "
          f"= {t.batch_size} per device x {w.size} x {t.gradient_accumulation_steps} accumulation",
          file=sys.stderr, flush=True)
    # With a validation split: best checkpoint and early stopping. It writes into each checkpoint
    # folder, so it comes before RunCallback, which uploads it.
    control = [make_control_callback(ctx.spec, state.control or ControlState(), ctx.work_dir / "best")] \
        if ctx.spec.dataset.validation_split > 0 else []
    trainer = make_trainer_class()(
        model=model,
        args=build_sft_config(ctx.spec, plan, checkpoint_dir, total_steps, bool(eval_rows), sampling),
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        callbacks=control + make_callbacks(ctx, state, total_steps) + tracking.callbacks(ctx, "sft"),
    )
    trainer.remove_callback(PrinterCallback)  # progress goes through ctx.progress, not raw dicts on stdout
    state.trainer = trainer
    return trainer
