"""API requests per minute an idle operator makes (prints JSON).

Scenario: `--ad` AdapterDeployments whose rollout is over (Direct strategy; the stable server's pod
runs on a kwok GPU node, so it is Ready at once) and `--ftj` FineTuneJobs whose Jobs finished (kwok
completes Job pods), in one namespace, with `ragtune operator run --all-namespaces` talking to
the API server through the local platform's recording proxy (ragtune_local.apiproxy). Once every object has
settled, the requests the operator makes in a quiet window of `--window` seconds are counted (a
watch stream opened in the window is one request), split by verb and resource.

Baseline in the same run: the same window before any object exists (what the operator's watches
and startup cost with nothing to do); `per_object_per_minute` is what each idle object adds.

Platform selection as in the tests (ragtune_local.testing.open_platform).
Usage: python bench/operator_requests.py [--ad 100] [--ftj 100] [--window 60]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import benchio  # noqa: E402
import yaml

from ragtune_local.apiproxy import RecordingProxy  # noqa: E402
from ragtune_local.platform import free_port  # noqa: E402

KWOK = [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}]
SHA = "0" * 64


def log(message: str) -> None:
    print(f"[operator_requests] {message}", file=sys.stderr, flush=True)


def finetunejob(i: int, namespace: str) -> dict:
    return {"apiVersion": "ragtune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": f"idle-{i:04d}", "namespace": namespace},
            "spec": {"baseModel": {"id": "tiny/model", "revision": "r1"},
                     "dataset": {"train": f"s3://bench/train-{i}.jsonl"}, "output": {"uri": "s3://bench/runs"},
                     "s3": {"endpoint": "http://127.0.0.1:9000", "credentialsSecretRef": {"name": "s3-credentials"}},
                     "resources": {"gpus": 1, "cpu": "100m", "memory": "256Mi", "shmSize": "64Mi",
                                   "tolerations": KWOK},
                     "backoffLimit": 0}}


def adapterdeployment(i: int, namespace: str) -> dict:
    return {"apiVersion": "ragtune.dev/v1alpha1", "kind": "AdapterDeployment",
            "metadata": {"name": f"idle-{i:04d}", "namespace": namespace},
            "spec": {"baseModel": {"id": "tiny/model", "revision": "r1"},
                     "server": {"gpus": 1, "cpu": "100m", "memory": "256Mi", "shmSize": "64Mi", "tolerations": KWOK,
                                "startupTimeoutSeconds": 60},
                     "adapters": [{"name": "a", "uri": f"s3://bench/runs/r{i}/", "sha256": SHA}],
                     "strategy": {"type": "Direct"}, "gates": {"requireOfflinePass": False},
                     "s3": {"endpoint": "http://127.0.0.1:9000", "credentialsSecretRef": {"name": "s3-credentials"}}}}


def proxy_kubeconfig(platform, namespace: str, workdir: Path) -> tuple[RecordingProxy, Path]:
    """A ServiceAccount bound to cluster-admin (the bench measures volume, not permissions) whose
    token the operator sends through the recording proxy."""
    kc = platform.kubeconfig
    platform.kubectl("-n", namespace, "create", "serviceaccount", "bench-operator")
    platform.kubectl("create", "clusterrolebinding", f"bench-operator-{namespace}", "--clusterrole=cluster-admin",
                     f"--serviceaccount={namespace}:bench-operator")
    token = platform.kubectl("-n", namespace, "create", "token", "bench-operator", "--duration=2h").strip()
    cluster = yaml.safe_load(Path(kc).read_text())["clusters"][0]["cluster"]
    ca = workdir / "ca.crt"
    if "certificate-authority-data" in cluster:
        ca.write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
    else:
        ca.write_bytes(Path(cluster["certificate-authority"]).read_bytes())
    proxy = RecordingProxy(cluster["server"], str(ca)).start()
    path = workdir / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": {"server": proxy.url}}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa"}}],
    }))
    return proxy, path


def start_operator(kubeconfig: Path, log_path: Path) -> subprocess.Popen:
    health = free_port()
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "RAGTUNE_METRICS_PORT": str(free_port())}
    with open(log_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ragtune.cli", "operator", "run", "--all-namespaces",
                                 "--liveness", f"http://127.0.0.1:{health}/healthz"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"operator exited ({proc.returncode}); see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=2):
                return proc
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"operator not healthy in 90 s; see {log_path}")


def window(proxy: RecordingProxy, seconds: float) -> dict:
    before = len(proxy.recorded())
    time.sleep(seconds)
    calls = proxy.recorded()[before:]
    kinds = Counter(f"{c.rbac[2]} {c.rbac[1]}" if c.rbac else f"{c.method} {c.path}" for c in calls)
    return {"requests": len(calls), "per_minute": round(len(calls) * 60 / seconds, 1),
            "by_verb_resource": dict(kinds.most_common())}


def settled(platform, namespace: str) -> tuple[int, int, dict]:
    """(idle AdapterDeployments, finished FineTuneJobs, phases). Idle: no rollout under way (Ready; or
    Degraded / RolledBack when kwok's node lease lapsed on a loaded machine and its pods lost readiness)."""
    ads = json.loads(platform.kubectl("-n", namespace, "get", "adapterdeployments", "-o", "json"))["items"]
    ftjs = json.loads(platform.kubectl("-n", namespace, "get", "finetunejobs", "-o", "json"))["items"]
    idle = sum(1 for a in ads if (a.get("status") or {}).get("phase") and not a["status"].get("candidate")
               and a["status"].get("observedGeneration") == a["metadata"].get("generation"))
    done = sum(1 for f in ftjs if (f.get("status") or {}).get("phase") in ("Succeeded", "Failed"))
    phases = Counter(f"{kind}/{(o.get('status') or {}).get('phase')}" for kind, items in
                     (("AdapterDeployment", ads), ("FineTuneJob", ftjs)) for o in items)
    return idle, done, dict(phases)


def apply(platform, objects: list[dict]) -> None:
    for start in range(0, len(objects), 50):
        platform.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                "items": objects[start:start + 50]}))


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ad", type=int, default=100, help="idle AdapterDeployments")
    parser.add_argument("--ftj", type=int, default=100, help="finished FineTuneJobs")
    parser.add_argument("--window", type=float, default=60, help="seconds counted per window")
    parser.add_argument("--settle-timeout", type=float, default=600)
    args = parser.parse_args()

    from ragtune_local.testing import close_platform, open_platform

    workdir = Path(os.environ.get("RAGTUNE_BENCH_DIR", "/tmp/ragtune-bench")) / "operator-requests"
    workdir.mkdir(parents=True, exist_ok=True)
    handle, owned = open_platform()
    proc = proxy = None
    try:
        handle.install_crds()
        handle.gpu_nodes((args.ad + args.ftj) // 100 + 1, gpus=100, prefix="req-gpu")
        namespace = handle.create_namespace("requests")
        proxy, kubeconfig = proxy_kubeconfig(handle, namespace, workdir)
        proc = start_operator(kubeconfig, workdir / "operator.log")
        time.sleep(5)  # startup's initial lists are not idle traffic
        log(f"baseline window ({args.window:.0f} s, no objects)")
        baseline = window(proxy, args.window)
        apply(handle, [finetunejob(i, namespace) for i in range(args.ftj)]
              + [adapterdeployment(i, namespace) for i in range(args.ad)])
        deadline = time.monotonic() + args.settle_timeout
        while True:
            idle, done, phases = settled(handle, namespace)
            if idle == args.ad and done == args.ftj:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"after {args.settle_timeout:.0f} s: {idle}/{args.ad} AdapterDeployments idle, "
                                   f"{done}/{args.ftj} FineTuneJobs finished; see {workdir / 'operator.log'}")
            time.sleep(3)
        log("settled; waiting 15 s, then the measured window")
        time.sleep(15)
        loaded = window(proxy, args.window)
        phases = settled(handle, namespace)[2]
        handle.kubectl("delete", "clusterrolebinding", f"bench-operator-{namespace}")
    finally:
        if proc is not None:
            benchio.stop_session(proc)
        if proxy is not None:
            proxy.stop()
        if owned:
            close_platform(handle)
    objects = args.ad + args.ftj
    return {
        "benchmark": "operator_requests",
        "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "adapterdeployments_idle": args.ad,
        "finetunejobs_finished": args.ftj,
        "window_seconds": args.window,
        "baseline_no_objects": baseline,
        "with_objects": loaded,
        "phases": phases,
        "per_object_per_minute": round((loaded["per_minute"] - baseline["per_minute"]) / objects, 3) if objects else None,
    }


if __name__ == "__main__":
    sys.exit(benchio.run(main))
