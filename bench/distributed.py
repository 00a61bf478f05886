"""One node vs two nodes: a FineTuneJob with `resources.nodes` 1 and 2 on the local platform (prints JSON).

The real path end to end: the operator renders a single-pod Job (1 node) or a headless Service +
Indexed Job (2 nodes), the local platform runs the pods as processes, every pod runs `ragtune
torchrun` (2 nodes: c10d rendezvous at index 0's stable hostname, gloo, DDP), one CPU process per
node (`gpus: 0`, `cpu: 1`; torch's default intra-op threads, one per core, in each). Same tiny random Llama
(`make_base`, `--hidden` x `--layers`, LoRA r=8), same synthetic RAG data, same steps, and the same
per-device batch (weak scaling: two nodes train twice the items per step). Per run:

- `answer_tokens_per_second`: the loss-bearing (answer) tokens the run trained on, over all ranks
  (`eval/report.json` `stages[0].answerTokens`), over the SFT stage's training seconds (`seconds`:
  `trainer.train()`, so it includes the process group's and DDP's set-up);
- `create_to_all_ranks_training_seconds`: from the create to the first status whose progress says
  step >= 1 of training (a step is a collective: rank 0 finishing one means every rank joined the
  rendezvous and trained it); it includes the operator reading rank 0's progress line;
  `create_to_pods_running_seconds` (every pod of the run Running) and
  `create_to_rank0_loaded_seconds` (rank 0's progress says `training` at step 0: base model and data
  loaded; then the process group, DDP's wrap and the first step) split it;
- `create_to_succeeded_seconds`.

`scaling_efficiency` = two-node tokens/s / (2 x one-node tokens/s): 1.0 would be perfect. On a
machine with 2 shared cores the two nodes' ranks compete for the cores with the operator and the
control plane, so the figure measures the overhead of distribution (rendezvous, the gradient
all-reduce, the per-step decision all-reduce), not a speed-up.

Platform selection as in the tests (ragtune_local.testing.open_platform).
Usage: python bench/distributed.py [--nodes 1 2] [--steps 30] [--batch-size 2] [--hidden 256] [--layers 4]
       [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]

import benchio  # noqa: E402  (bench/ is sys.path[0])

from ragtune.api.pods import TRAINER_IMAGE, run_prefix  # noqa: E402
from ragtune.runtime.kube import Kube  # noqa: E402
from ragtune_local.platform import free_port  # noqa: E402
from ragtune_local.testdoubles.tiny_models import make_base  # noqa: E402

BUCKET = "bench-distributed"
POLL_S = 0.2


def cpu_flags() -> list[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return [f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f" {f}" in text]


def log(message: str) -> None:
    print(f"# {message}", file=sys.stderr, flush=True)


def start_operator(kubeconfig: str, log_path: Path) -> subprocess.Popen:
    health = free_port()
    env = {**os.environ, "KUBECONFIG": kubeconfig, "RAGTUNE_TRAINER_IMAGE": f"{TRAINER_IMAGE}:dev",
           "RAGTUNE_PROGRESS_INTERVAL_SECONDS": "1", "RAGTUNE_METRICS_PORT": str(free_port())}
    with open(log_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ragtune.cli", "operator", "run", "--all-namespaces",
                                 "--liveness", f"http://127.0.0.1:{health}/healthz", "--log-format", "json"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the operator exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the operator was not healthy within 60 s; see {log_path}")
        time.sleep(0.3)


def upload_inputs(platform, work: Path, items: int, hidden: int, layers: int) -> dict[str, str]:
    from ragtune_trainer.synthetic import generate

    model = make_base(work / "model", hidden=hidden, layers=layers)
    records = generate(items, seed=0)
    (work / "train.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
    platform.bucket(BUCKET)
    s3 = platform.s3_client()
    for path in Path(model).iterdir():
        s3.upload_file(str(path), BUCKET, f"models/tiny/{path.name}")
    s3.upload_file(str(work / "train.jsonl"), BUCKET, "data/train.jsonl")
    return {"model": f"s3://{BUCKET}/models/tiny/", "train": f"s3://{BUCKET}/data/train.jsonl"}


def ftj(name: str, namespace: str, inputs: dict, platform, nodes: int, args) -> dict:
    return {"apiVersion": "ragtune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "baseModel": {"id": "bench/tiny-llama", "revision": "main", "uri": inputs["model"]},
                "dataset": {"train": inputs["train"], "evalSplit": 0.2,
                            "raft": {"distractors": 1, "unanswerableFraction": 0.25}},
                "method": "lora",
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                "training": {"maxSteps": args.steps, "batchSize": args.batch_size, "learningRate": 0.01,
                             "maxSeqLength": 512, "checkpointIntervalSteps": 100000, "packing": True},
                "evaluation": {"maxSamples": 2, "maxNewTokens": 4, "fewShot": 0,
                               "thresholds": {"maxFalseRefusalRate": 1.0}},
                "output": {"uri": f"s3://{BUCKET}/runs"},
                "s3": {"endpoint": platform.s3_endpoint, "credentialsSecretRef": {"name": "s3-credentials"}},
                "resources": {"gpus": 0, "nodes": nodes, "cpu": "1", "memory": "3Gi", "shmSize": "64Mi",
                              "nodeSelector": {"kubernetes.io/hostname": "ragtune-local"}},
                "backoffLimit": 0,
            }}


def measure(platform, kube: Kube, nodes: int, inputs: dict, args) -> dict[str, Any]:
    namespace = platform.create_namespace(f"dist{nodes}")
    name = f"bench-{nodes}n"
    try:
        started = time.monotonic()
        platform.apply(ftj(name, namespace, inputs, platform, nodes, args))
        marks: dict[str, float] = {}
        status: dict = {}
        deadline = started + args.timeout
        while time.monotonic() < deadline:
            now = time.monotonic() - started
            status = (kube.get("FineTuneJob", namespace, name) or {}).get("status") or {}
            progress = status.get("progress") or {}
            if "pods_running" not in marks:
                pods = kube.list("Pod", namespace, {"ragtune.dev/finetunejob": name})
                if len(pods) >= nodes and all((p.get("status") or {}).get("phase") == "Running" for p in pods):
                    marks["pods_running"] = now
            stage = progress.get("stage")
            if stage == "loading":
                marks.setdefault("loading", now)
            if stage == "training":
                marks.setdefault("loaded", now)  # rank 0 loaded model and data; the ranks join the group next
                if (progress.get("step") or 0) >= 1:
                    marks.setdefault("training", now)
            if status.get("phase") in ("Succeeded", "Failed"):
                marks["end"] = now
                break
            time.sleep(POLL_S)
        if status.get("phase") != "Succeeded":
            raise RuntimeError(f"{nodes} node(s): the run did not succeed: {json.dumps(status)[:2000]}")
        prefix = run_prefix(f"s3://{BUCKET}/runs", namespace, name, status["runId"])[len(f"s3://{BUCKET}/"):]
        report = json.loads(platform.s3_client().get_object(Bucket=BUCKET, Key=prefix + "eval/report.json")
                            ["Body"].read())
        sft = report["stages"][0]
        tokens, seconds = sft["answerTokens"], sft["seconds"]
        result = {
            "nodes": nodes, "world_size": (status.get("workers") or {}).get("worldSize", 1),
            "global_batch": args.batch_size * nodes, "steps": sft["steps"],
            "answer_tokens": tokens, "train_seconds": seconds,
            "answer_tokens_per_second": round(tokens / seconds, 1),
            "seconds_per_step": round(seconds / sft["steps"], 3),
            "create_to_pods_running_seconds": mark(marks, "pods_running"),
            "create_to_rank0_loaded_seconds": mark(marks, "loaded"),
            "create_to_all_ranks_training_seconds": mark(marks, "training"),
            "create_to_succeeded_seconds": round(marks["end"], 1),
            "status_tokens_per_second": (status.get("progress") or {}).get("tokensPerSecond"),
            "attempts": status.get("attempts"),
        }
        log(json.dumps(result))
        return result
    finally:
        platform.delete_namespace(namespace)


def mark(marks: dict[str, float], key: str) -> Optional[float]:
    """A mark, or None when the poller never saw that state (it passed between two polls)."""
    return round(marks[key], 1) if key in marks else None


def median_run(trials: list[dict]) -> dict:
    """Each number the median over the trials (the first trial's other fields)."""
    out = dict(trials[0])
    for key, value in trials[0].items():
        if len({json.dumps(t.get(key)) for t in trials}) == 1:
            continue  # the same in every trial (nodes, steps, tokens): kept as it is
        if any(isinstance(t.get(key), (int, float)) for t in trials):
            seen = [t[key] for t in trials if t.get(key) is not None]
            out[key] = round(statistics.median(seen), 3) if seen else None
    return out


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2, help="per device (weak scaling)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--items", type=int, default=200, help="synthetic RAG records")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of all --nodes, interleaved (a shared machine's load hits each alike); "
                             "medians reported")
    args = parser.parse_args()

    from ragtune_local.testing import close_platform, open_platform

    load_start = round(os.getloadavg()[0], 2)
    work = Path(tempfile.mkdtemp(prefix="ragtune-bench-distributed-"))
    platform, owned = open_platform()
    operator = None
    trials: list[dict] = []
    try:
        platform.install_crds()
        inputs = upload_inputs(platform, work, args.items, args.hidden, args.layers)
        operator = start_operator(platform.kubeconfig, work / "operator.log")
        kube = Kube(platform.api_client())
        trials = [measure(platform, kube, n, inputs, args) for _ in range(args.repeat) for n in args.nodes]
        kube.close()
    finally:
        if operator is not None:
            benchio.stop_session(operator)
        if owned:
            close_platform(platform)
    runs = [median_run([t for t in trials if t["nodes"] == n]) for n in args.nodes]
    by_nodes = {r["nodes"]: r for r in runs}
    doc: dict[str, Any] = {
        "benchmark": "distributed: one node vs two nodes (local platform, CPU, gloo, one process per node)",
        "where": "local platform: operator -> Job / Indexed Job + headless Service -> pods as processes -> "
                 "ragtune torchrun (c10d rendezvous) -> DDP",
        "model": f"random Llama hidden {args.hidden} x {args.layers} layers, LoRA r=8, float32",
        "per_device_batch": args.batch_size, "steps": args.steps,
        "cpus": os.cpu_count(), "cpu_flags": cpu_flags(),
        "load_average_1m_start": load_start, "load_average_1m": round(os.getloadavg()[0], 2),
        "repeats": args.repeat,
        "runs": runs,
        "trials": trials if args.repeat > 1 else None,
    }
    if 1 in by_nodes and 2 in by_nodes:
        one, two = by_nodes[1], by_nodes[2]
        doc["scaling_efficiency"] = round(two["answer_tokens_per_second"] / (2 * one["answer_tokens_per_second"]), 3)
        key = "create_to_all_ranks_training_seconds"
        if one[key] is not None and two[key] is not None:
            doc["two_node_extra_create_to_training_seconds"] = round(two[key] - one[key], 1)
    return doc


if __name__ == "__main__":
    sys.exit(benchio.run(main))
