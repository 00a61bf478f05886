"""Out of memory inside a real run: `ragtune train` under an address-space limit that the imports and
the model fit in but a step's activations do not, exits 2 with reason OutOfMemory (never a crash
or a silent success)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from ragtune.api.pods import EXIT_PERMANENT, PROGRESS_PREFIX
from ragtune_trainer.run import out_of_memory
from ragtune_trainer.synthetic import generate

from .conftest import build_model, build_tokenizer, write_jsonl

REPO = Path(__file__).resolve().parents[2]
HEADROOM = 2 << 30
"""Address space above what imports + the model take: a batch-1 step of this model fits in it
(~0.5 GiB measured), a batch of 32 sequences of ~1500 tokens needs ~6 GiB more."""

PROBE = """
import torch, transformers, peft, trl, datasets
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained({model!r})
x = torch.randn(256, 256); (x @ x).sum()  # start torch's thread pool, as training does
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmPeak")))
"""


@pytest.fixture(scope="module")
def long_rows_setup(tmp_path_factory) -> tuple[Path, Path]:
    """A small Llama (hidden 256, 4 layers) and RAG rows of ~1500 tokens: activations grow with
    batch x length while the model itself stays a few MB."""
    out = tmp_path_factory.mktemp("oom")
    records = generate(120, seed=0)
    texts = [t for r in records for t in [r.question, r.answer] + [c.text for c in r.contexts]]
    tokenizer = build_tokenizer(texts, out / "model")
    build_model(tokenizer, out / "model", hidden=256, layers=4)
    rows = []
    for r in records:
        row = r.to_dict()
        for c in row["contexts"]:
            c["text"] = " ".join([c["text"]] * 40)
        rows.append(row)
    return out / "model", write_jsonl(out / "train.jsonl", rows)


def _baseline_address_space(model: Path) -> int:
    """Peak virtual memory (bytes) of a process that imported the training stack and loaded the model."""
    done = subprocess.run([sys.executable, "-c", PROBE.format(model=str(model))], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1]) * 1024


@pytest.mark.slow
def test_activations_that_do_not_fit_end_out_of_memory_exit_2(long_rows_setup, tmp_path):
    model, train = long_rows_setup
    limit = _baseline_address_space(model) + HEADROOM
    spec = {
        "baseModel": {"id": "test/small-llama", "revision": "main", "uri": model.as_uri()},
        "dataset": {"train": train.as_uri(), "evalSplit": 0.1, "raft": {"distractors": 0, "unanswerableFraction": 0}},
        "method": "lora", "lora": {"r": 4, "alpha": 8},
        "training": {"maxSteps": 2, "batchSize": 32, "maxSeqLength": 2048, "learningRate": 0.01},
        "evaluation": {"maxSamples": 2, "maxNewTokens": 4},
        "output": {"uri": (tmp_path / "out").as_uri()},
        "resources": {"gpus": 0},
    }
    obj = {"apiVersion": "ragtune.dev/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "big", "namespace": "ns", "uid": "0123456789ab", "generation": 1}, "spec": spec}
    term = tmp_path / "termination-log"
    env = dict(os.environ, RAGTUNE_OBJECT=json.dumps(obj), RAGTUNE_RUN_ID="oom",
               RAGTUNE_TERMINATION_MESSAGE_PATH=str(term))

    def limit_address_space() -> None:  # like a container's memory limit, but exact and unprivileged
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    done = subprocess.run([sys.executable, "-m", "ragtune.cli", "train", "--in-cluster",
                           "--work-dir", str(tmp_path / "work")],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
                          preexec_fn=limit_address_space)
    log = done.stderr[-3000:]
    assert done.returncode == EXIT_PERMANENT, log
    result = json.loads(term.read_text())
    assert result["outcome"] == "Failed" and result["reason"] == "OutOfMemory", result
    message = result["message"]
    assert "\n" not in message and "host memory" in message
    for remedy in ("spec.resources.memory", "training.batchSize", "training.maxSeqLength",
                   "training.gradientCheckpointing"):
        assert remedy in message
    # It failed in a training step, not while importing or loading: the limit left room for those.
    stages = [json.loads(line[len(PROGRESS_PREFIX):]).get("stage") for line in done.stdout.splitlines()
              if line.startswith(PROGRESS_PREFIX)]
    assert "training" in stages, (stages, log)
    assert "ragtune train: OutOfMemory: out of host memory" in done.stderr


@pytest.mark.parametrize("error, what", [
    (MemoryError(), "host memory"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 4503599627370496 bytes. Error code 12 (Cannot allocate memory)"), "host memory"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "GPU memory"),
    (RuntimeError("shape mismatch"), None),
    (ValueError("can't allocate memory"), None),
])
def test_out_of_memory_classification(error, what):
    assert out_of_memory(error) == what


def test_torch_out_of_memory_error_is_gpu_memory():
    import torch

    assert out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")) == "GPU memory"
