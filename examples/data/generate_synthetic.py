"""Write synthetic RAG records (answerable, unanswerable, two-context with citations) as JSONL.

    python examples/data/generate_synthetic.py --n 400 --seed 0 --out /tmp/synthetic-rag.jsonl
    ragtune dataset validate /tmp/synthetic-rag.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ragtune_trainer.synthetic import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unanswerable-fraction", type=float, default=0.2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    records = generate(args.n, args.seed, unanswerable_fraction=args.unanswerable_fraction)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
    print(f"wrote {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()
