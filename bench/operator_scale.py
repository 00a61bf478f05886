"""How the FineTuneJob controller copes with many objects at once (prints JSON).

For each N (default 100 and 1000): apply N FineTuneJobs at once (16 concurrent clients) to a
namespace served by a freshly started `ragtune operator run --all-namespaces`, and measure
- `all_jobs_seconds`: from the first create to the moment every training Job exists (seen on a watch),
- create->Job latency per object (p50/p99/max): Job seen on the watch minus its FineTuneJob's create,
- the operator's peak RSS (VmHWM of the process),
and, as baselines in the same run, `direct_jobs_seconds`: the same N Jobs created directly by the
same clients with no operator in between (what the API server and the Job controller cost anyway),
and `crd_only_create_seconds`: the N FineTuneJobs created with no operator running (the floor of
`all_jobs_seconds`: every Job comes after its FineTuneJob; `ratio_floor_crd_vs_direct`). Creates the
API server answers with 504/429/5xx when overloaded are retried (`creates_retried`).

Where the time goes, per round: `api_writes` (the API server's own `apiserver_request_total`,
mutating verbs by resource, counted from the round's start until its last Job), `cpu_seconds` of
each platform part and of the operator over the same span, and `all_status_seconds` (until every
FineTuneJob's status names its Job: the status writes the operator may defer in a burst).
`--status-writes-per-second 0 20` runs the operator round once per value (`0`: unlimited), the
before/after of the operator's write budget in one run.
Pods land on kwok GPU nodes (they need `nvidia.com/gpu`), so nothing really trains.

Targets (issue 2): N=1000: every Job within 60 s, operator RSS <= 200 MB.

Platform selection as in the tests (ragtune_local.testing.open_platform): a private local platform
by default, `RAGTUNE_TEST_PLATFORM=reuse` for the `ragtune dev up` one.
Usage: python bench/operator_scale.py [--n 100 1000]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import benchio  # noqa: E402  (bench/ is sys.path[0])

from ragtune.api.finetunejob import FineTuneJobSpec
from ragtune.finetunejob.render import render_job
from ragtune.runtime.kube import Kube, KubeError
from ragtune_local.platform import free_port

REPO = Path(__file__).resolve().parents[1]
CLIENTS = 16


def spec(i: int) -> dict:
    return {
        "baseModel": {"id": "tiny/model", "revision": "r1"},
        "dataset": {"train": f"s3://bench/train-{i}.jsonl"},
        "output": {"uri": "s3://bench/runs"},
        "s3": {"endpoint": "http://127.0.0.1:9000", "credentialsSecretRef": {"name": "s3-credentials"}},
        "resources": {"gpus": 1, "cpu": "100m", "memory": "256Mi", "shmSize": "64Mi",
                      "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}]},
        "backoffLimit": 0,
    }


def ftj(i: int, namespace: str) -> dict:
    return {"apiVersion": "ragtune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": f"bench-{i:05d}", "namespace": namespace}, "spec": spec(i)}


class JobWatcher(threading.Thread):
    """Records when each Job of a namespace is first seen (a raw watch stream, no polling)."""

    def __init__(self, kube: Kube, namespace: str, label: str) -> None:
        super().__init__(daemon=True)
        self.kube, self.namespace, self.label = kube, namespace, label
        self.seen: dict[str, float] = {}
        self.ready = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        api = self.kube.api  # reuse its TLS/auth configuration
        path = f"/apis/batch/v1/namespaces/{self.namespace}/jobs"
        listing = self.kube.request("GET", path, query=[("labelSelector", self.label)])
        rv = listing["metadata"]["resourceVersion"]
        while not self.stop.is_set():
            method, url, headers, _, _ = api.param_serialize(
                method="GET", resource_path=path, auth_settings=["BearerToken"],
                query_params=[("watch", "true"), ("labelSelector", self.label), ("resourceVersion", rv),
                              ("allowWatchBookmarks", "true"), ("timeoutSeconds", 60)])
            response = api.rest_client.pool_manager.request(method, url, headers=headers, preload_content=False,
                                                            timeout=90)
            self.ready.set()
            buffer = b""
            for chunk in response.stream(4096):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    event = json.loads(line)
                    obj = event["object"]
                    rv = obj["metadata"].get("resourceVersion", rv)
                    if event["type"] == "ADDED":
                        labels = obj["metadata"].get("labels") or {}
                        name = labels.get("ragtune.dev/finetunejob", obj["metadata"]["name"])
                        self.seen.setdefault(name, time.monotonic())
                if self.stop.is_set():
                    break
            response.release_conn()


def start_operator(kubeconfig: str, log: Path, status_writes_per_second: float | None = None
                   ) -> tuple[subprocess.Popen, int]:
    health = free_port()
    env = {**os.environ, "KUBECONFIG": kubeconfig, "RAGTUNE_METRICS_PORT": str(free_port())}
    if status_writes_per_second is not None:
        env["RAGTUNE_STATUS_WRITES_PER_SECOND"] = str(status_writes_per_second)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ragtune.cli", "operator", "run", "--all-namespaces",
                                 "--liveness", f"http://127.0.0.1:{health}/healthz"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"operator exited ({proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=2):
                return proc, health
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"operator not healthy in 60 s; see {log}")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_SAMPLE = re.compile(r'^apiserver_request_total\{([^}]*)\} ([0-9.e+]+)$')
_LABEL = re.compile(r'(\w+)="([^"]*)"')
_WRITES = {"POST", "PUT", "PATCH", "DELETE", "APPLY"}


def api_writes(kube: Kube) -> Counter:
    """The API server's count of mutating requests so far, by verb and resource[/subresource]."""
    counts: Counter = Counter()
    for line in kube.request("GET", "/metrics", raw=True).splitlines():
        match = _SAMPLE.match(line)
        if not match:
            continue
        labels = dict(_LABEL.findall(match.group(1)))
        if labels.get("verb") in _WRITES:
            resource = labels.get("resource", "") + (f"/{labels['subresource']}" if labels.get("subresource") else "")
            counts[f"{labels['verb']} {resource}"] += int(float(match.group(2)))
    return counts


class Span:
    """API writes and CPU seconds (per platform part and the extra processes) between start and stop."""

    def __init__(self, platform, kube: Kube, extra: dict[str, int] | None = None) -> None:
        self.platform, self.kube, self.extra = platform, kube, extra or {}

    def _cpu(self) -> dict[str, float]:
        pids = {**(self.platform.local.part_pids() if self.platform.local else {}), **self.extra}
        out = {}
        for part, pid in pids.items():
            try:
                out[part] = cpu_seconds(pid)
            except (FileNotFoundError, ProcessLookupError):
                continue
        return out

    def start(self) -> "Span":
        self._writes0, self._cpu0 = api_writes(self.kube), self._cpu()
        return self

    def stop(self) -> dict:
        writes, cpu = api_writes(self.kube) - self._writes0, self._cpu()
        return {"api_writes": dict(writes.most_common()),
                "cpu_seconds": {p: round(cpu[p] - self._cpu0.get(p, 0.0), 1) for p in sorted(cpu)}}


def create_retrying(kube: Kube, path: str, body: dict, retries: list) -> None:
    """POST `body`; an answer the API server gives when it is overloaded (504, 429, 5xx, none)
    is retried, and a 409 then means the first try was stored after all. `retries` counts them."""
    for attempt in range(10):
        try:
            kube.request("POST", path, body=body)
            return
        except KubeError as exc:
            if exc.status == 409 and attempt:
                return
            if not exc.retryable or exc.status == 409 or attempt == 9:
                raise
            retries.append(exc.status)
            time.sleep(0.5 * 2 ** min(attempt, 4))


def cpu_flags() -> str:
    text = Path("/proc/cpuinfo").read_text()
    return "avx512_bf16" if "avx512_bf16" in text else "avx2" if " avx2" in text else "neither avx2 nor avx512_bf16"


def wait_all(watcher: JobWatcher, names: list[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(n in watcher.seen for n in names):
            return True
        time.sleep(0.05)
    return False


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def delete_and_wait(platform, namespace: str, timeout: float = 600) -> None:
    """Delete a namespace and wait until it is gone, so its cleanup does not load the next round."""
    platform.delete_namespace(namespace)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not platform.kubectl("get", "namespace", namespace, "--ignore-not-found", "-o", "name",
                                    check=False).strip():
                return
        except subprocess.TimeoutExpired:  # an overloaded API server: keep waiting until the deadline
            pass
        time.sleep(2)
    print(f"warning: namespace {namespace} still terminating after {timeout} s", file=sys.stderr)


def direct_baseline(platform, kube: Kube, n: int, timeout: float) -> dict:
    """Seconds to create the same N Jobs straight from the clients (no operator), and the span."""
    namespace = platform.create_namespace("bench-direct")
    try:
        jobs = []
        for i in range(n):
            meta = {"name": f"bench-{i:05d}", "namespace": namespace, "uid": f"{i:08d}-0000", "generation": 1}
            job = render_job(meta, FineTuneJobSpec.model_validate(spec(i)), f"{i:08d}-g1", "bench/trainer:1")
            del job["metadata"]["ownerReferences"]  # no owner object exists
            jobs.append(job)
        watcher = JobWatcher(kube, namespace, "app.kubernetes.io/managed-by=ragtune")
        watcher.start()
        watcher.ready.wait(30)
        span = Span(platform, kube).start()
        start = time.monotonic()
        retries: list = []
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(lambda j: create_retrying(kube, f"/apis/batch/v1/namespaces/{namespace}/jobs", j, retries),
                          jobs))
        if retries:
            print(f"direct baseline: {len(retries)} creates retried ({sorted(set(retries))})", file=sys.stderr)
        ok = wait_all(watcher, [j["metadata"]["labels"]["ragtune.dev/finetunejob"] for j in jobs], timeout)
        elapsed = time.monotonic() - start
        watcher.stop.set()
        return {"seconds": elapsed if ok else float("nan"), **span.stop()}
    finally:
        delete_and_wait(platform, namespace)


def crd_only_baseline(platform, kube: Kube, n: int) -> float:
    """Seconds to create the N FineTuneJobs themselves with no operator running: the part of
    `all_jobs_seconds` no operator can save (every Job comes after its FineTuneJob)."""
    namespace = platform.create_namespace("bench-crd")
    try:
        retries: list = []
        start = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(lambda o: create_retrying(
                kube, f"/apis/ragtune.dev/v1alpha1/namespaces/{namespace}/finetunejobs", o, retries),
                [ftj(i, namespace) for i in range(n)]))
        return time.monotonic() - start
    finally:
        delete_and_wait(platform, namespace)


def wait_all_statuses(kube: Kube, namespace: str, n: int, start: float, timeout: float) -> float:
    """Seconds from `start` until every FineTuneJob's status names its Job (listed every 2 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = kube.request("GET", f"/apis/ragtune.dev/v1alpha1/namespaces/{namespace}/finetunejobs")["items"]
        if len(items) >= n and all((o.get("status") or {}).get("jobName") for o in items):
            return time.monotonic() - start
        time.sleep(2)
    return float("nan")


def run_once(platform, kube: Kube, n: int, timeout: float, workdir: Path, write_rates: list) -> dict:
    direct = direct_baseline(platform, kube, n, timeout)
    crd_only = crd_only_baseline(platform, kube, n)
    rounds = [operator_round(platform, kube, n, timeout, workdir, rate, direct["seconds"]) for rate in write_rates]
    return {**rounds[-1], "direct_jobs_seconds": round(direct["seconds"], 2),
            "direct": {k: v for k, v in direct.items() if k != "seconds"},
            "crd_only_create_seconds": round(crd_only, 2),
            "ratio_floor_crd_vs_direct": round(crd_only / direct["seconds"], 2) if direct["seconds"] else None,
            **({"by_status_write_rate": rounds} if len(rounds) > 1 else {})}


def operator_round(platform, kube: Kube, n: int, timeout: float, workdir: Path, write_rate: float | None,
                   baseline: float) -> dict:
    namespace = platform.create_namespace("bench")
    proc, _ = start_operator(platform.kubeconfig, workdir / f"operator-{n}.log", write_rate)
    try:
        watcher = JobWatcher(kube, namespace, "app.kubernetes.io/managed-by=ragtune")
        watcher.start()
        watcher.ready.wait(30)
        objects = [ftj(i, namespace) for i in range(n)]
        created: dict[str, float] = {}

        retries: list = []

        def create(obj: dict) -> None:
            create_retrying(kube, f"/apis/ragtune.dev/v1alpha1/namespaces/{namespace}/finetunejobs", obj, retries)
            created[obj["metadata"]["name"]] = time.monotonic()

        span = Span(platform, kube, {"operator": proc.pid}).start()
        start = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(create, objects))
        apply_seconds = time.monotonic() - start
        names = list(created)
        complete = wait_all(watcher, names, timeout)
        all_jobs = max(watcher.seen.values()) - start if complete else float("nan")
        spent = span.stop()
        latencies = [watcher.seen[k] - created[k] for k in names if k in watcher.seen]
        watcher.stop.set()
        all_status = wait_all_statuses(kube, namespace, n, start, timeout)
        rss = peak_rss_mb(proc.pid)
        cpu = cpu_seconds(proc.pid)
        return {
            "n": n,
            "status_writes_per_second": "default" if write_rate is None else write_rate or "unlimited",
            "all_jobs_created": complete,
            "jobs_seen": len(watcher.seen),
            "apply_seconds": round(apply_seconds, 2),
            "creates_retried": len(retries),
            "all_jobs_seconds": round(all_jobs, 2),
            "latency_p50_seconds": round(statistics.median(latencies), 3) if latencies else None,
            "latency_p99_seconds": round(percentile(latencies, 0.99), 3) if latencies else None,
            "latency_max_seconds": round(max(latencies), 3) if latencies else None,
            "operator_peak_rss_mb": round(rss, 1),
            "operator_cpu_seconds": round(cpu, 1),
            "ratio_vs_direct": round(all_jobs / baseline, 2) if baseline and baseline == baseline else None,
            "all_status_seconds": round(all_status, 2),
            **spent,
            "meets_targets": bool(complete and all_jobs <= 60 and rss <= 200) if n >= 1000 else None,
        }
    finally:
        benchio.stop_session(proc)
        delete_and_wait(platform, namespace)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100, 1000], help="FineTuneJobs per round")
    parser.add_argument("--timeout", type=float, default=300, help="give up on a round after this many seconds")
    parser.add_argument("--status-writes-per-second", type=float, nargs="+", default=None,
                        help="run the operator round once per value (RAGTUNE_STATUS_WRITES_PER_SECOND; 0: unlimited)")
    args = parser.parse_args()

    from ragtune_local.testing import close_platform, open_platform

    load_before = round(os.getloadavg()[0], 2)
    handle, owned = open_platform()
    workdir = Path(os.environ.get("RAGTUNE_BENCH_DIR", "/tmp/ragtune-bench"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        handle.install_crds()
        biggest = max(args.n)
        # Enough fake GPU capacity (and pod slots: 110 per node) for every pod at once.
        handle.gpu_nodes(math.ceil(biggest / 100) + 1, gpus=100, prefix="bench-gpu")
        kube = Kube(kubeconfig=handle.kubeconfig, workers=CLIENTS)
        rates = args.status_writes_per_second or [None]
        rounds = [run_once(handle, kube, n, args.timeout, workdir, rates) for n in args.n]
        kube.close()
    finally:
        if owned:
            close_platform(handle)
    return {
        "benchmark": "operator_scale",
        "cpus": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "load_average_1m_start": load_before,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "targets": {"n": 1000, "all_jobs_seconds": 60, "operator_peak_rss_mb": 200},
        "rounds": rounds,
    }


if __name__ == "__main__":
    sys.exit(benchio.run(main))
