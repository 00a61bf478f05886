"""bench/qlora_gpu.py runs where a GPU is lent; here its code path is exercised on CPU (tiny shape), so
a session that gets a GPU finds a working script, and both runs train on the same answer tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "qlora_gpu.py"


@pytest.mark.slow
def test_qlora_bench_runs_both_recipes_on_the_same_answer_tokens(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH), "--shape", "tiny", "--device", "cpu", "--steps", "2",
                           "--seq-len", "192", "--cache", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    plain, ours = report["runs"]["plain"], report["runs"]["ragtune"]
    assert plain["steps"] == ours["steps"] == 2
    # same items, same completion-only objective: the answer share of the tokens is the same in both runs
    assert plain["answer_tokens_per_s"] / plain["tokens_per_s"] == pytest.approx(
        ours["answer_tokens_per_s"] / ours["tokens_per_s"], rel=0.02)
    assert plain["answer_tokens_per_s"] < plain["tokens_per_s"]
    assert abs(plain["final_loss"] - ours["final_loss"]) < 0.05  # same model, same data: same loss scale
    assert ours["settings"]["activation_checkpointing"] and plain["settings"]["activation_checkpointing"]


def test_without_a_gpu_the_8b_shape_is_skipped_with_a_reason():
    done = subprocess.run([sys.executable, str(BENCH), "--device", "cpu"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "no CUDA device" in json.loads(done.stdout)["skipped"]
