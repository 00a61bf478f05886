"""One training run, start to finish:

    load data -> validate -> RAFT set -> train (checkpoints, SIGTERM-safe) -> evaluate base vs adapter
    -> adapter folder -> report -> upload -> manifest.json LAST -> TrainerResult

Every fault ends as `TrainerFailure(reason, message)`; the CLI turns it into the termination
message and a non-zero exit. Speed on CPU comes from four things, each measured by
`bench/train_speed.py`: fp32 without gradient checkpointing, an LM head applied only to the answer
positions (the loss is only computed there, so projecting the prompt onto the vocabulary is wasted
work), LoRA dropout masks drawn from random bits (`lora_dropout.py`), and length-grouped batches
when random ones would be >= 20% padding (or padding-free rows).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from ragtune.api.contract import ADAPTER_DIR, MANIFEST, Manifest, ManifestFile, TrainerResult
from ragtune.api.finetunejob import DatasetFormat, FineTuneJobSpec, Method, TrainingProgress
from ragtune.api.gates import describe_failures, evaluate_gates
from ragtune.storage import Storage, StorageError, join, sha256_bytes, sha256_file

from . import data as D
from .checkpoints import latest_complete_checkpoint, upload_checkpoint
from ragtune.rag.records import RagRecord

EVAL_LOSS_ITEMS = 64
"""Held-out items used for the validation loss (generation-based evaluation uses maxSamples)."""


class TrainerFailure(Exception):
    """A run that cannot succeed; `reason` is the CamelCase reason of the termination message."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


class Preempted(TrainerFailure):
    def __init__(self, message: str = "SIGTERM received"):
        super().__init__("Preempted", message)


ProgressFn = Callable[[TrainingProgress], None]


@dataclass
class RunContext:
    """Where a run reads and writes, and who it reports to."""

    spec: FineTuneJobSpec
    run_id: str
    run_uri: str
    """Run prefix (`run_prefix(...)`), ends with `/`."""
    job: dict[str, Any] = field(default_factory=dict)
    """`{namespace, name, uid, generation}` of the FineTuneJob."""
    work_dir: Optional[Path] = None
    progress: Optional[ProgressFn] = None
    storage: Optional[Storage] = None
    image: Optional[str] = None

    def __post_init__(self):
        self.storage = self.storage or Storage(self.spec.s3)
        self._own_work_dir = self.work_dir is None
        self.work_dir = Path(self.work_dir or tempfile.mkdtemp(prefix="ragtune-run-"))

    def cleanup(self) -> None:
        """Remove the scratch folder when this context created it (everything worth keeping is uploaded)."""
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)


# --- Device-aware settings -------------------------------------------------------------


@dataclass
class Plan:
    """The concrete settings a spec resolves to on this machine."""

    device: str
    dtype: str  # "float32" | "bfloat16" | "float16"
    quantize_bits: Optional[int]
    gradient_checkpointing: bool
    padding_free: bool


def plan_for(spec: FineTuneJobSpec, cuda: bool, bf16_ok: bool, flash_attention: bool) -> Plan:
    t = spec.training
    if t.precision == "auto":
        dtype = "bfloat16" if cuda and bf16_ok else "float32"
    else:
        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[t.precision]
    if dtype != "float32" and not cuda:
        raise TrainerFailure("InvalidSpec", f"training.precision {t.precision} needs a GPU; use fp32 or auto on CPU")
    quant = spec.quantization
    bits = quant.bits if quant else (4 if spec.method == Method.QLORA else None)
    # Padding-free rows need an attention that keeps packed items apart: flash-attention varlen
    # kernels do; on CPU, SDPA gets a block-diagonal mask from the position ids (correct, but it
    # computes the masked blocks), so length-grouped batches are the default there.
    padding_free = t.packing if t.packing is not None else (cuda and flash_attention)
    checkpointing = t.gradient_checkpointing if t.gradient_checkpointing is not None else cuda
    return Plan("cuda" if cuda else "cpu", dtype, bits, checkpointing, padding_free)


def detect_plan(spec: FineTuneJobSpec) -> Plan:
    import importlib.util

    import torch

    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    flash = cuda and importlib.util.find_spec("flash_attn") is not None
    return plan_for(spec, cuda, bf16, flash)


# --- Base model ------------------------------------------------------------------------


def resolve_base_model(ctx: RunContext) -> str:
    """A local folder (downloaded from `baseModel.uri` when it is in S3) or the hub id."""
    ref = ctx.spec.base_model
    if not ref.uri:
        return ref.id
    if ref.uri.startswith("file://"):
        from ragtune.storage import local_path

        path = local_path(ref.uri)
        if not (path / "config.json").is_file():
            raise TrainerFailure("BaseModelNotFound", f"baseModel.uri {ref.uri}: no config.json in {path}")
        return str(path)
    cache = Path(os.environ.get("RAGTUNE_MODEL_CACHE", Path.home() / ".cache/ragtune/base-models"))
    dest = cache / sha256_bytes(f"{ref.uri}@{ref.revision}".encode())[:16]
    if not (dest / ".complete").exists():
        try:
            ctx.storage.download_prefix(ref.uri, dest)
        except StorageError as err:
            reason = "BaseModelNotFound" if err.reason == "S3ObjectNotFound" else err.reason
            raise TrainerFailure(reason, f"baseModel.uri: {err}") from err
        if not (dest / "config.json").is_file():
            raise TrainerFailure("BaseModelNotFound", f"baseModel.uri {ref.uri}: no config.json under the prefix")
        (dest / ".complete").write_text(ref.uri)
    return str(dest)


def load_tokenizer(source: str, revision: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as exc:
        raise TrainerFailure("BaseModelNotFound", f"tokenizer of {source}@{revision} not found: {_one_line(exc)}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(source: str, revision: str, spec: FineTuneJobSpec, plan: Plan):
    """Base model (4-bit nf4 for QLoRA) with a fresh LoRA adapter on top."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = getattr(torch, plan.dtype)
    kwargs: dict[str, Any] = {"revision": revision, "dtype": dtype}
    if plan.quantize_bits:
        q = spec.quantization
        compute = dtype if (q is None or q.compute_dtype == "auto") else getattr(torch, q.compute_dtype)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=plan.quantize_bits == 4,
            load_in_8bit=plan.quantize_bits == 8,
            bnb_4bit_quant_type=q.quant_type if q else "nf4",
            bnb_4bit_use_double_quant=q.double_quant if q else True,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["device_map"] = {"": 0} if plan.device == "cuda" else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise TrainerFailure("BaseModelNotFound", f"base model {source}@{revision} not loadable: {_one_line(exc)}")
    if not plan.quantize_bits:
        model.to(plan.device)
    else:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.gradient_checkpointing)
    if plan.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets = spec.lora.target_modules
    lora = LoraConfig(
        r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets, task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise TrainerFailure("InvalidSpec", f"lora.targetModules {targets}: {_one_line(exc)}")
    if plan.device == "cpu":
        from .lora_dropout import use_bits_dropout

        use_bits_dropout(model)
    return model


# --- Data ------------------------------------------------------------------------------


@dataclass
class PreparedData:
    train: list[dict]
    """Tokenised training rows: input_ids, labels, length."""
    eval: list[dict]
    eval_records: list[RagRecord]
    """Held-out RAG records for generation-based evaluation (empty for other formats)."""
    datasets: list[dict[str, Optional[str]]]
    answer_tokens: int


def _rows(tokenizer, examples: list[D.Example]) -> list[dict]:
    rows = []
    for ex in examples:
        t = D.tokenize(tokenizer, ex)
        labels = [tok if m else -100 for tok, m in zip(t["input_ids"], t["completion_mask"])]
        rows.append({"input_ids": t["input_ids"], "labels": labels, "length": len(labels)})
    return rows


def load_and_check(uri: str, ctx: RunContext, tokenizer) -> tuple[D.LoadedData, list[D.Example]]:
    spec = ctx.spec
    try:
        loaded = D.load_rows(uri, ctx.storage)
    except StorageError as err:
        raise TrainerFailure(err.reason, f"dataset: {err}") from err
    report, examples = D.validate(loaded, spec.dataset.format, tokenizer=tokenizer,
                                  max_seq_length=spec.training.max_seq_length, refusal=spec.dataset.raft.refusal)
    if not report.ok:
        raise TrainerFailure("InvalidDataset", report.render())
    return loaded, examples


def prepare_data(ctx: RunContext, tokenizer) -> PreparedData:
    spec = ctx.spec
    ds, seed = spec.dataset, spec.training.seed
    train_data, train_ex = load_and_check(ds.train, ctx, tokenizer)
    objects = list(train_data.objects)
    if ds.eval:
        eval_data, eval_ex = load_and_check(ds.eval, ctx, tokenizer)
        objects += eval_data.objects
    else:
        train_ex, eval_ex = D.split(train_ex, ds.eval_split, seed)
    eval_records: list[RagRecord] = []
    if ds.format == DatasetFormat.RAG:
        max_len = spec.training.max_seq_length

        def fits(record: RagRecord) -> bool:
            return len(D.tokenize(tokenizer, _rag_example(record, ds.raft.refusal))["input_ids"]) <= max_len

        train_recs = D.build_raft([e.record for e in train_ex], ds.raft, seed, fits=fits)
        eval_records = D.build_raft([e.record for e in eval_ex], ds.raft, seed + 1, fits=fits)
        train_ex = [_rag_example(r, ds.raft.refusal) for r in train_recs]
        eval_ex = [_rag_example(r, ds.raft.refusal) for r in eval_records]
    train_rows = _rows(tokenizer, train_ex)
    if not train_rows:
        raise TrainerFailure("InvalidDataset", f"{ds.train}: no training records left after the eval split")
    return PreparedData(
        train=train_rows,
        eval=_rows(tokenizer, eval_ex[:EVAL_LOSS_ITEMS]),
        eval_records=eval_records,
        datasets=objects,
        answer_tokens=sum(sum(1 for x in r["labels"][1:] if x != -100) for r in train_rows),
    )


def _rag_example(record: RagRecord, refusal: str) -> D.Example:
    from ragtune.rag.prompt import build_messages

    return D.Example(build_messages(record, refusal=refusal)[:2], record.answer, record)


# --- The trainer -----------------------------------------------------------------------


def answer_only_loss(model, inputs: dict, num_items_in_batch=None):
    """Causal-LM loss computed by projecting only the positions whose next token is an answer
    token onto the vocabulary. Returns (loss, number of loss-bearing tokens)."""
    import torch
    import torch.nn.functional as F

    labels = inputs["labels"]
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    kwargs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
    hidden = backbone(**kwargs, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    mask = targets != -100
    picked = hidden[:, :-1][mask]
    logits = causal_lm.get_output_embeddings()(picked).float()
    config = causal_lm.config.get_text_config()
    if getattr(config, "logits_scaling", None):  # Granite divides its logits
        logits = logits / config.logits_scaling
    if getattr(config, "final_logit_softcapping", None):  # Gemma 2/3 cap them
        cap = config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    count = mask.sum()
    denom = num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1)
    loss = F.cross_entropy(logits, targets[mask], reduction="sum") / denom
    return loss, int(count)


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
            if model.training:
                self.loss_tokens += count
            if not torch.isfinite(loss):
                raise TrainerFailure("NaNLoss", f"loss became {loss.item()} at step {self.state.global_step}; "
                                                "lower training.learningRate or check the base model weights")
            return (loss, None) if return_outputs else loss

    return RagSFTTrainer


def build_sft_config(spec: FineTuneJobSpec, plan: Plan, out_dir: Path, total_steps: int, has_eval: bool,
                     sampling: str = "random"):
    from trl import SFTConfig

    t = spec.training
    eval_every = max(1, math.ceil(total_steps / 4))
    return SFTConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        max_steps=total_steps,
        bf16=plan.dtype == "bfloat16",
        fp16=plan.dtype == "float16",
        activation_checkpointing=False,  # enabled on the model in load_model (also covers QLoRA prep)
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
        logging_steps=1 if total_steps <= 200 else max(1, total_steps // 100),
        logging_first_step=True,
        seed=t.seed,
        data_seed=t.seed,
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=plan.device == "cpu",
    )


def planned_steps(spec: FineTuneJobSpec, n_train: int) -> int:
    t = spec.training
    if t.max_steps:
        return t.max_steps
    per_epoch = math.ceil(math.ceil(n_train / t.batch_size) / t.gradient_accumulation_steps)
    return max(1, math.ceil(per_epoch * t.epochs))


# --- Progress, time-based checkpoints, SIGTERM ------------------------------------------


def make_callbacks(ctx: RunContext, state: "RunState", total_steps: int):
    from transformers import TrainerCallback

    interval_s = ctx.spec.training.checkpoint_interval_seconds

    class RunCallback(TrainerCallback):
        """Time-based checkpoints, SIGTERM -> checkpoint + stop, upload on save, progress."""

        def __init__(self):
            self.last_save = time.monotonic()
            self.started = time.monotonic()

        def on_step_end(self, args, st, control, **kw):
            if state.preempt_requested:
                control.should_save = True
                control.should_training_stop = True
            elif time.monotonic() - self.last_save >= interval_s:
                control.should_save = True
            self._report(st, "training")

        def on_save(self, args, st, control, **kw):
            self.last_save = time.monotonic()
            local = Path(args.output_dir) / f"checkpoint-{st.global_step}"
            upload_checkpoint(ctx.storage, ctx.run_uri, local, st.global_step)
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
            tokens = state.trainer.loss_tokens if state.trainer else 0
            eta = int(elapsed / done * (total_steps - st.global_step)) if done > 0 else None
            ctx.progress(TrainingProgress(
                step=st.global_step, total_steps=total_steps, epoch=round(st.epoch or 0, 3),
                loss=round(losses[-1], 4) if losses else None, eval_loss=round(evals[-1], 4) if evals else None,
                tokens_per_second=round(tokens / elapsed, 1), eta_seconds=eta,
                percent=int(100 * st.global_step / total_steps), stage=stage, updated_at=_now(),
            ))

    return [RunCallback()]


@dataclass
class RunState:
    preempt_requested: bool = False
    training: bool = False
    start_step: int = 0
    last_checkpoint: Optional[int] = None
    trainer: Any = None


# --- The run ---------------------------------------------------------------------------


def run(ctx: RunContext) -> TrainerResult:
    """Execute the whole run; raises TrainerFailure on any fault (incl. Preempted). An allocation
    failure propagates as it is: the CLI reports it as OutOfMemory once its frames are released."""
    state = RunState()
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        state.preempt_requested = True
        if not state.training:  # nothing to checkpoint yet, or training is over: stop right here
            raise Preempted("SIGTERM received outside training")

    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:  # signal handlers can only be set there (e.g. not when a test harness runs us in a thread)
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return _run(ctx, state)
    except StorageError as err:
        raise TrainerFailure(err.reason, str(err)) from err
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _report(ctx: RunContext, stage: str, **fields) -> None:
    if ctx.progress:
        ctx.progress(TrainingProgress(stage=stage, updated_at=_now(), **fields))


def _run(ctx: RunContext, state: RunState) -> TrainerResult:
    import torch
    from datasets import Dataset
    from transformers import set_seed

    spec = ctx.spec
    _report(ctx, "loading")
    set_seed(spec.training.seed)
    plan = detect_plan(spec)
    source = resolve_base_model(ctx)
    revision = spec.base_model.revision
    tokenizer = load_tokenizer(source, revision)
    prepared = prepare_data(ctx, tokenizer)
    model = load_model(source, revision, spec, plan)

    total = planned_steps(spec, len(prepared.train))
    ckpt_dir = ctx.work_dir / "checkpoints"
    resume = latest_complete_checkpoint(ctx.storage, ctx.run_uri)
    resume_dir = None
    if resume:
        resume_dir = ckpt_dir / f"checkpoint-{resume[0]}"
        ctx.storage.download_prefix(resume[1], resume_dir)
        state.start_step = resume[0]

    lengths = [r["length"] for r in prepared.train]
    padding = random_batch_padding(lengths, spec.training.batch_size, spec.training.seed)
    sampling = sampling_strategy(plan, padding)
    print(f"ragtune train: {plan.device}, {plan.dtype}, gradient checkpointing {plan.gradient_checkpointing}, "
          f"padding-free {plan.padding_free}, {sampling} batches (random batches would be {padding:.0%} padding)",
          file=sys.stderr, flush=True)
    trainer_cls = make_trainer_class()
    trainer = trainer_cls(
        model=model,
        args=build_sft_config(spec, plan, ckpt_dir, total, bool(prepared.eval), sampling),
        train_dataset=Dataset.from_list(prepared.train),
        eval_dataset=Dataset.from_list(prepared.eval) if prepared.eval else None,
        processing_class=tokenizer,
        callbacks=make_callbacks(ctx, state, total),
    )
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # progress goes through ctx.progress, not raw dicts on stdout
    state.trainer = trainer
    _report(ctx, "training", step=state.start_step, total_steps=total)
    started = time.monotonic()
    state.training = True
    try:
        trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    finally:
        state.training = False
    train_seconds = round(time.monotonic() - started, 2)
    if state.preempt_requested:
        raise Preempted(f"SIGTERM at step {trainer.state.global_step}; "
                        f"checkpoint-{state.last_checkpoint} uploaded, a retry resumes from it")

    # --- evaluate, write, upload ---
    model = trainer.model
    _report(ctx, "evaluating", step=trainer.state.global_step, total_steps=total)
    outcome = None
    if prepared.eval_records:
        from .evaluate import evaluate_run

        outcome = evaluate_run(model, tokenizer, prepared.eval_records, spec,
                               progress=lambda done, n: _report(ctx, "evaluating", step=trainer.state.global_step,
                                                                total_steps=total, percent=int(100 * done / max(n, 1))))
    from ragtune.api.common import EvalMetrics

    base_m = outcome.base if outcome else EvalMetrics()
    adapter_m = outcome.adapter if outcome else EvalMetrics()
    gates = evaluate_gates(spec.evaluation.thresholds, adapter_m, base_m)
    passed = all(g.passed for g in gates)

    _report(ctx, "uploading", step=trainer.state.global_step, total_steps=total)
    out = ctx.work_dir / "run"
    adapter_files = write_adapter(model, tokenizer, spec, out / ADAPTER_DIR)
    report_files: list[Path] = []
    if outcome is not None:
        from .report import write_report

        report_files = write_report(out / "eval", outcome, trainer.state.log_history, spec, gates)
    manifest_bytes = publish(ctx, out, adapter_files + report_files, prepared.datasets, passed)
    adapter_size = sum(p.stat().st_size for p in adapter_files)

    result = TrainerResult(
        outcome="Succeeded" if passed else "Failed",
        reason="Completed" if passed else "GateFailed",
        message=("trained %d steps; %s" % (trainer.state.global_step,
                 "all gates passed" if passed else "gates failed: " + describe_failures(gates))),
        run_id=ctx.run_id, adapter_uri=ctx.run_uri, manifest_sha256=sha256_bytes(manifest_bytes),
        adapter_size_bytes=adapter_size,
        report_uri=join(ctx.run_uri, "eval/report.html") if report_files else None,
        base=base_m, adapter=adapter_m, passed=passed, gates=gates,
        steps=trainer.state.global_step, train_seconds=train_seconds,
    )
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def write_adapter(model, tokenizer, spec: FineTuneJobSpec, out: Path) -> list[Path]:
    """adapter_config.json + adapter_model.safetensors at top level (what TGI loads) + tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for required in ("adapter_config.json", "adapter_model.safetensors"):
        if not (out / required).is_file():
            raise TrainerFailure("InternalError", f"adapter export wrote no {required}")
    # TGI matches adapters to the served model by id, not by our local download path. (Patched in
    # the file: set on the model before saving, peft would try to look the id up on the hub.)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(base_model_name_or_path=spec.base_model.id, revision=spec.base_model.revision)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return sorted(p for p in out.rglob("*") if p.is_file())


def publish(ctx: RunContext, root: Path, files: list[Path], datasets: list[dict], passed: bool) -> bytes:
    """Upload every file, then manifest.json last. A stale manifest from an earlier attempt is
    removed first, so readers never pair an old manifest with new files."""
    import peft
    import torch
    import transformers
    import trl

    storage = ctx.storage
    storage.delete_prefix(join(ctx.run_uri, MANIFEST))
    entries = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        storage.upload(path, join(ctx.run_uri, rel))
        entries.append(ManifestFile(path=rel, sha256=sha256_file(path), size=path.stat().st_size))
    manifest = Manifest(
        run_id=ctx.run_id,
        base_model={"id": ctx.spec.base_model.id, "revision": ctx.spec.base_model.revision,
                    "uri": ctx.spec.base_model.uri},
        files=entries,
        datasets=datasets,
        image=ctx.image,
        versions={"torch": torch.__version__, "transformers": transformers.__version__,
                  "peft": peft.__version__, "trl": trl.__version__, "ragtune": _ragtune_version()},
        evaluation_passed=passed,
        created_at=_now(),
        job=ctx.job,
    )
    data = json.dumps(manifest.to_wire(), indent=2).encode()
    storage.put_bytes(join(ctx.run_uri, MANIFEST), data)
    return data


def _ragtune_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ragtune")
    except PackageNotFoundError:
        return "unknown"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300]
