"""Dataset hygiene cost and recall: `hygiene.check` (duplicates, near-duplicates, train/test
overlap, balance) and `hygiene.groups` (the trainer's grouped split) over synthetic `rag` files
with planted copies (the generator's own
repeats - an invented entity asked the same question twice - come on top), timed against `data.validate` of the same rows in the same run (the ratio is
what hygiene adds to `ragtune dataset validate`). Run at two sizes: time(n) / time(n/2) near 2
says it stays linear.

    python bench/data_hygiene.py --n 100000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchio  # noqa: E402


def planted(n: int, seed: int, copy_fraction: float) -> tuple[list[dict], dict[str, int]]:
    """`n` synthetic records plus copies: exact (case and punctuation changed) and reworded
    (same answer over the same contexts, another question), a share `copy_fraction` of `n` each."""
    from ragtune_trainer.synthetic import generate

    rows = [dict(r.to_dict(), id=f"r{k}") for k, r in enumerate(generate(n, seed=seed))]
    rng = random.Random(seed)
    answerable = [r for r in rows if r["answerable"]]
    exact = [dict(r, id=f"e{k}", question=r["question"].upper().rstrip("?"))
             for k, r in enumerate(rng.sample(answerable, int(n * copy_fraction)))]
    reworded = [dict(r, id=f"w{k}", question="Tell me: " + r["question"])
                for k, r in enumerate(rng.sample(answerable, int(n * copy_fraction)))]
    return rows + exact + reworded, {"exact": len(exact), "reworded": len(reworded)}


def measure(n: int, seed: int, copy_fraction: float, tmp: Path) -> dict:
    from ragtune_trainer import data as D
    from ragtune_trainer import hygiene as H

    rows, plants = planted(n, seed, copy_fraction)
    random.Random(seed + 1).shuffle(rows)
    path = tmp / f"train-{n}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    started = time.perf_counter()
    report, examples = D.validate(D.load_rows(path.as_uri()), "rag")
    validate_s = time.perf_counter() - started
    if not report.ok:
        raise SystemExit(report.render()[-2000:])
    items = [D.hygiene_item(e) for e in examples]
    cut = len(items) * 9 // 10
    started = time.perf_counter()
    result = H.check(items[:cut], items[cut:])
    check_s = time.perf_counter() - started
    started = time.perf_counter()
    groups = H.groups(items)
    groups_s = time.perf_counter() - started
    print(f"n={n}: validate {validate_s:.2f} s, check {check_s:.2f} s, groups {groups_s:.2f} s", file=sys.stderr)
    whole = H.check(items).train  # recall: every planted copy is in one file
    return {
        "rows": len(rows), "planted": plants,
        "found": {"exactDuplicates": whole.exact_duplicates, "nearDuplicates": whole.near_duplicates,
                  "overlapAtA90To10Cut": result.overlap, "itemsJoinedIntoGroups": len(items) - len(set(groups))},
        "seconds": {"validate": round(validate_s, 3), "check": round(check_s, 3), "groups": round(groups_s, 3)},
        "checkOverValidate": round(check_s / validate_s, 3),
    }


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100000, help="synthetic records at the larger size (plus copies)")
    p.add_argument("--copy-fraction", type=float, default=0.02, help="planted copies of each kind, share of --n")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ragtune-hygiene-") as tmp:
        half = measure(args.n // 2, args.seed, args.copy_fraction, Path(tmp))
        full = measure(args.n, args.seed, args.copy_fraction, Path(tmp))
    flags = open("/proc/cpuinfo").read()
    return {
        "benchmark": "data_hygiene", "n": args.n, "copyFraction": args.copy_fraction,
        "half": half, "full": full,
        "checkScaling": round(full["seconds"]["check"] / max(half["seconds"]["check"], 1e-9), 3),
        "groupsScaling": round(full["seconds"]["groups"] / max(half["seconds"]["groups"], 1e-9), 3),
        "cpu_flags": [f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f" {f}" in flags],
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


if __name__ == "__main__":
    sys.exit(benchio.run(main))
