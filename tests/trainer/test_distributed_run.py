"""The trainer under torchrun, no Kubernetes: 2 CPU processes (gloo, DDP through transformers/
accelerate) train the same adapter as one process with the same global batch and seed, and only
rank 0 publishes (one result, one manifest); every checkpoint holds both ranks' state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

from .test_train_run import job_spec  # noqa: E402

RAGTUNE = str(Path(sys.executable).with_name("ragtune"))
WEIGHT_TOLERANCE = 1e-4
"""Largest |DDP - one process| over the adapter's weights after 4 steps (float32; the two differ
only in summation order: measured ~1e-7 on this machine)."""
LOSS_TOLERANCE = 1e-4


def _job(tmp_path: Path, tiny_model_dir, train_file, batch: int) -> Path:
    spec = job_spec(tiny_model_dir, str(train_file), tmp_path / "out", **{
        "lora.dropout": 0.0,  # dropout masks would come from different RNG streams per rank
        "training.maxSteps": 4, "training.batchSize": batch, "training.checkpointIntervalSteps": 2,
        "training.packing": True,  # random batches: the same items per step whatever the per-device size
        "evaluation.maxSamples": 2, "evaluation.maxNewTokens": 4, "evaluation.fewShot": 0,
        "evaluation.thresholds": {"maxFalseRefusalRate": 1.0},
    })
    path = tmp_path / f"job-{batch}.yaml"
    path.write_text(json.dumps({"apiVersion": "ragtune.dev/v1alpha1", "kind": "FineTuneJob",
                                "metadata": {"name": "dist", "namespace": "dev"}, "spec": spec}))
    return path


def _run(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])
    return done


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def _losses(run: Path) -> list[float]:
    return [e["loss"] for e in json.loads((run / "eval/report.json").read_text())["lossHistory"] if "loss" in e]


def test_two_ranks_train_what_one_process_trains_and_only_rank_0_publishes(tiny_model_dir, train_file, tmp_path):
    single = _run([RAGTUNE, "train", "-f", str(_job(tmp_path, tiny_model_dir, train_file, 4)), "--run-id", "one",
                   "--work-dir", str(tmp_path / "w1")], tmp_path)
    ddp = _run([RAGTUNE, "torchrun", "--standalone", "--nnodes=1", "--nproc-per-node=2", "--max-restarts=0",
                "--no-python", RAGTUNE, "train", "-f", str(_job(tmp_path, tiny_model_dir, train_file, 2)),
                "--run-id", "ddp", "--work-dir", str(tmp_path / "w2")], tmp_path)
    runs = tmp_path / "out/dev/dist"

    # Only rank 0 reports: one result document; the other rank says it left publishing to rank 0.
    assert ddp.stdout.count('"outcome"') == 1 and json.loads(ddp.stdout[ddp.stdout.index("{"):])["steps"] == 4
    assert "rank 1: trained 4 steps; rank 0 evaluates and publishes" not in ddp.stdout
    assert "world size 2 (ddp), global batch 4 = 2 per device x 2 x 1 accumulation" in ddp.stderr
    assert "world size 1 (one process), global batch 4" in single.stderr
    assert len(list(runs.rglob("manifest.json"))) == 2  # one per run
    assert len(list((runs / "ddp").rglob("manifest.json"))) == 1

    # Every checkpoint is COMPLETE only with both ranks' state in it.
    for step in (2, 4):
        folder = runs / "ddp/checkpoints" / f"checkpoint-{step}"
        marker = json.loads((folder / "COMPLETE").read_text())
        assert marker["worldSize"] == 2 and "rng_state_1.pth" in marker["rankFiles"]
        assert {"rng_state_0.pth", "adapter_model.safetensors", "optimizer.pt"} <= set(marker["files"])
        assert (folder / "rng_state_1.pth").is_file()

    # The same adapter and losses as one process with the same global batch and seed.
    a, b = _adapter(runs / "one"), _adapter(runs / "ddp")
    assert a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k)
    assert moved > 10 * WEIGHT_TOLERANCE  # it trained (lora_B starts at zero)
    one, two = _losses(runs / "one"), _losses(runs / "ddp")
    print(f"adapter max |DDP - one| {worst:.3g} (largest lora_B {moved:.3g}); losses {one} vs {two}")
    assert worst <= WEIGHT_TOLERANCE, f"adapter weights differ by {worst}"
    assert len(one) == len(two) == 4
    assert max(abs(x - y) for x, y in zip(one, two)) <= LOSS_TOLERANCE, (one, two)
    # The answer tokens trained on are every rank's (the same items as the one process's), not rank 0's.
    assert 0 < _answer_tokens(runs / "one") == _answer_tokens(runs / "ddp")


def _answer_tokens(run: Path) -> int:
    return json.loads((run / "eval/report.json").read_text())["stages"][0]["answerTokens"]


def _pid_with(tag: str, rank: str) -> int:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e)
        except OSError:
            continue
        if env.get(b"S5_TEST_TAG") == tag.encode() and env.get(b"RANK") == rank.encode():
            return int(proc.name)
    return 0


def test_sigterm_on_one_rank_stops_both_at_one_checkpoint_and_both_resume(tiny_model_dir, train_file, tmp_path):
    """A SIGTERM seen by rank 1 only (its pod is preempted): the ranks agree at the next step, save
    one checkpoint holding both ranks' state, both stop (Preempted, retryable); the retry resumes
    both from it and trains exactly maxSteps."""
    import re
    import signal
    import time
    import uuid

    STEPS = 200  # an idle machine trains 40 tiny steps in under 3 s: leave time to act mid-run
    job = _job(tmp_path, tiny_model_dir, train_file, 2)
    job.write_text(job.read_text().replace('"maxSteps": 4', f'"maxSteps": {STEPS}').replace(
        '"checkpointIntervalSteps": 2', '"checkpointIntervalSteps": 1000'))  # only the SIGTERM saves
    tag = uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "S5_TEST_TAG": tag}
    cmd = [RAGTUNE, "torchrun", "--standalone", "--nnodes=1", "--nproc-per-node=2", "--max-restarts=0",
           "--no-python", RAGTUNE, "train", "-f", str(job), "--run-id", "term"]
    checkpoints = tmp_path / "out/dev/dist/term/checkpoints"
    log = tmp_path / "a1.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd + ["--work-dir", str(tmp_path / "a1")], cwd=tmp_path, env=env,
                                stdout=sink, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        trained = re.compile(rf"training:.*?\b(\d+)/{STEPS}\b")
        # a few steps in, by rank 0's progress bar (a fixed sleep raced with a fast machine)
        while max([int(n) for n in trained.findall(log.read_text())] or [0]) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        pid = _pid_with(tag, "1")
        assert pid, "rank 1 not found"
        os.kill(pid, signal.SIGTERM)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert proc.returncode == 1, out[-3000:]
    markers = sorted(checkpoints.glob("checkpoint-*/COMPLETE"))
    assert len(markers) == 1, out[-3000:]  # one checkpoint, at the step both ranks agreed on
    marker = json.loads(markers[0].read_text())
    saved = marker["step"]
    assert 0 < saved < STEPS and marker["worldSize"] == 2 and "rng_state_1.pth" in marker["rankFiles"]
    assert '"reason": "Preempted"' in out  # rank 0 stopped too, and said why

    done = _run(cmd + ["--work-dir", str(tmp_path / "a2")], tmp_path)
    result = json.loads(done.stdout[done.stdout.index("{"):])
    assert result["reason"] == "Completed" and result["steps"] == STEPS
    losses = [e for e in json.loads((tmp_path / "out/dev/dist/term/eval/report.json").read_text())["lossHistory"]
              if "loss" in e]
    assert losses[-1]["step"] == STEPS
