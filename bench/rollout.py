"""Time from "adapter available" to "adapter serving" for an AdapterDeployment (prints JSON).

For each strategy (Canary, Direct): a tiny random Llama + LoRA adapter (localplatform/ragtune_local/testdoubles/tiny_models.py)
is published to S3 in the artifact layout, an AdapterDeployment is applied at t0, and a 0.1 s
poller records when each child appears and becomes ready, until the status says the adapter
serves. The total splits into
- `server_start_seconds`: TGI pod created -> pod Ready (fetch init container + the TGI stand-in
  loading weights and adapters + the probe), summed over the canary and the stable pod,
- `online_eval_seconds`: evaluation Job created -> its pod terminated (canary only),
- `operator_overhead_seconds`: everything else: the operator's reaction time (timer ticks,
  API calls) and the control plane's (Deployment -> ReplicaSet -> Pod -> scheduling).
Baseline in the same run: `standin_direct_start_seconds`, the stand-in started as a plain
process on the same model (what serving costs with no Kubernetes at all).

Target (issue 5): operator overhead < 5 s on the local platform.
Platform selection as in the tests (ragtune_local.testing.open_platform).
Usage: python bench/rollout.py [--strategies Canary Direct]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import benchio  # noqa: E402
from ragtune.runtime.kube import Kube  # noqa: E402
from ragtune_local.testdoubles.tiny_models import (  # noqa: E402
    TINY_BASE_ID,
    TINY_BASE_REVISION,
    make_adapter,
    make_base,
    publish_run,
    s3_put,
)

RECORDS = [{"id": f"q{i}", "question": f"What is item {i}?", "answer": f"Item {i} [1]",
            "contexts": [{"id": "1", "text": f"Item {i} is a tiny test fact."}]} for i in range(4)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def standin_direct_start(base: Path, adapter: Path) -> float:
    port = free_port()
    env = {**os.environ, "MODEL_ID": str(base), "LORA_ADAPTERS": f"a={adapter}", "PORT": str(port),
           "HOSTNAME": "127.0.0.1"}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "ragtune_local.testdoubles.tgi_standin"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return time.monotonic() - t0
            if proc.poll() is not None or time.monotonic() - t0 > 300:
                raise RuntimeError("stand-in did not start")
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def pod_ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions") or [])


def measure(kube: Kube, platform, namespace: str, body: dict) -> dict:
    """Apply `body` and poll until it serves; return the split timings."""
    marks: dict[str, float] = {}
    t0 = time.monotonic()
    platform.apply(body)
    track_pods: dict[str, dict[str, float]] = {}
    while True:
        now = time.monotonic() - t0
        if now > 600:
            raise RuntimeError("rollout did not finish within 600 s")
        for pod in kube.list("Pod", namespace, {"ragtune.dev/adapterdeployment": "chat"}) + \
                kube.list("Pod", namespace, {"job-name": "chat-eval-g1"}):
            name = pod["metadata"]["name"]
            seen = track_pods.setdefault(name, {"created": now, "kind": pod["metadata"]["labels"].get(
                "ragtune.dev/track", "eval")})
            if "ready" not in seen and pod_ready(pod):
                seen["ready"] = now
            if "terminated" not in seen and any((c.get("state") or {}).get("terminated")
                                                for c in pod.get("status", {}).get("containerStatuses") or []):
                seen["terminated"] = now
        status = (kube.get("AdapterDeployment", namespace, "chat") or {}).get("status") or {}
        if status.get("observedGeneration") == 1 and not status.get("candidate") and status.get("phase"):
            marks["done"] = now
            break
        time.sleep(0.1)
    if status["phase"] != "Ready":
        raise RuntimeError(f"rollout ended {status['phase']}: {status.get('message')}")
    server = {k: v["ready"] - v["created"] for k, v in ((p["kind"], p) for p in track_pods.values())
              if k in ("canary", "stable") and "ready" in v}
    evals = [p["terminated"] - p["created"] for p in track_pods.values() if p["kind"] == "eval" and "terminated" in p]
    total = marks["done"]
    server_start = sum(server.values())
    online_eval = sum(evals)
    return {
        "total_seconds": round(total, 2),
        "server_start_seconds": round(server_start, 2),
        "server_start_by_track": {k: round(v, 2) for k, v in server.items()},
        "online_eval_seconds": round(online_eval, 2),
        "operator_overhead_seconds": round(total - server_start - online_eval, 2),
    }


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategies", nargs="+", default=["Canary", "Direct"])
    args = parser.parse_args()

    from ragtune_local.testing import close_platform, open_platform

    work = Path(tempfile.mkdtemp(prefix="ragtune-bench-rollout-"))
    base = make_base(work / "base")
    adapter = make_adapter(base, work / "adapter")
    baseline = standin_direct_start(base, adapter)

    platform, owned = open_platform()
    operator = None
    results = {}
    try:
        platform.install_crds()
        kube = Kube(platform.api_client())
        bucket = platform.bucket("bench-rollout")
        s3 = platform.s3_client()
        report = {"passed": True, "metrics": {"base": {"samples": 4}, "adapter": {"samples": 4}}}
        digest = publish_run(s3_put(s3, bucket, "runs/r1"), adapter, run_id="r1", report=report)
        s3.put_object(Bucket=bucket, Key="eval.jsonl", Body="\n".join(json.dumps(r) for r in RECORDS).encode())
        env = {**os.environ, "KUBECONFIG": platform.kubeconfig, "RAGTUNE_METRICS_PORT": "0",
               "RAGTUNE_LOG_FORMAT": "text"}
        operator = subprocess.Popen(
            [sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces", "--liveness=",
             "-m", "ragtune.runtime.kopf_setup", "-m", "ragtune.adapterdeployment.controller"],
            cwd=REPO, env=env, stdout=(work / "operator.log").open("w"), stderr=subprocess.STDOUT)
        for strategy in args.strategies:
            namespace = platform.create_namespace("bench")
            body = {
                "apiVersion": "ragtune.dev/v1alpha1", "kind": "AdapterDeployment",
                "metadata": {"name": "chat", "namespace": namespace},
                "spec": {
                    "baseModel": {"id": TINY_BASE_ID, "revision": TINY_BASE_REVISION, "uri": base.as_uri()},
                    "server": {"gpus": 0, "cpu": "100m", "memory": "1Gi", "startupTimeoutSeconds": 120},
                    "adapters": [{"name": "support", "uri": f"s3://{bucket}/runs/r1/", "sha256": digest}],
                    "strategy": {"type": strategy},
                    "gates": {"online": {"evalSetUri": f"s3://{bucket}/eval.jsonl", "samples": 4,
                                         "maxNewTokens": 8}},
                    "s3": {"endpoint": platform.s3_endpoint, "credentialsSecretRef": {"name": "s3-credentials"}},
                },
            }
            results[strategy] = measure(kube, platform, namespace, body)
            platform.delete_namespace(namespace)
    finally:
        if operator is not None:
            operator.send_signal(signal.SIGINT)
            try:
                operator.wait(timeout=20)
            except subprocess.TimeoutExpired:
                operator.kill()
        if owned:
            close_platform(platform)
    overhead = max(r["operator_overhead_seconds"] for r in results.values())
    return {
        "benchmark": "adapter rollout: adapter available -> serving",
        "standin_direct_start_seconds": round(baseline, 2),
        "strategies": results,
        "ratio_total_vs_direct_start": {k: round(v["total_seconds"] / baseline, 2) for k, v in results.items()},
        "operator_overhead_target_seconds": 5.0,
        "operator_overhead_max_seconds": overhead,
        "meets_target": overhead < 5.0,
    }


if __name__ == "__main__":
    sys.exit(benchio.run(main))
