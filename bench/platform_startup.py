"""Startup time of a cached local platform (binaries built), printed as JSON.

Each round runs `up` then `down` in a fresh state dir. Baseline, from the same rounds: the time
until etcd + kube-apiserver are ready (what any cluster start pays); `ratio` = full platform /
that baseline, so the cost of the other parts (controllers, kwok, MinIO, pod runner) is visible.

    python bench/platform_startup.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import benchio

from ragtune_local.paths import cache_dir
from ragtune_local.platform import LocalPlatform


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-", dir=cache_dir()))
    rounds = []
    try:
        for i in range(args.rounds):
            local = LocalPlatform(root / f"round-{i}")
            info = local.up(build=False, log=lambda _m: None)
            t0 = time.monotonic()
            local.down(log=lambda _m: None)
            rounds.append({"up_s": info.startup_seconds, "down_s": round(time.monotonic() - t0, 2),
                           "ready_after_s": info.ready_after})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    up = statistics.median(r["up_s"] for r in rounds)
    base = statistics.median(r["ready_after_s"]["kube-apiserver"] for r in rounds)
    return {
        "benchmark": "platform_startup", "rounds": rounds,
        "median_up_s": up, "median_down_s": statistics.median(r["down_s"] for r in rounds),
        "baseline": "etcd + kube-apiserver ready", "median_baseline_s": base, "ratio": round(up / base, 2),
    }


if __name__ == "__main__":
    sys.exit(benchio.run(main))
