"""The node agent of the local platform: a kubelet for one node (`ragtune-local`) that runs pods
as local processes.

It registers the node and renews its lease, watches the pods bound to it (a watch wakes the sync
loop; a periodic list makes it robust to missed events), starts one `PodWorker` per pod, gives
pods their IPs (answered on this machine only: podnet.py) and their hosts files, and serves logs
through the kubelet API.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from . import cgroups
from .kubeclient import ApiError, Kube
from .platform import RUNNER_NODE, PlatformInfo
from .podenv import hosts_file, pod_hostname, write_in_place
from .podworker import PodWorker, log, micro_now, now
from .procs import ProcRef

LEASE_SECONDS, LEASE_RENEW, NODE_STATUS_EVERY = 40, 10.0, 30.0


class Runner:
    def __init__(self, info: PlatformInfo):
        self.info = info
        self.root = Path(info.state_dir) / "runner"
        (self.root / "pgids").mkdir(parents=True, exist_ok=True)
        p = info.pki
        self.kube = Kube(info.server, p / "ca.crt", p / "runner.crt", p / "runner.key")
        self.host_ip = "127.0.0.1"
        self.workers: dict[str, PodWorker] = {}
        self.lock = threading.Lock()
        self.ips: dict[str, str] = {}
        self._next_ip = 0
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.services: dict[tuple[str, str], dict] = {}
        self.cgroups, self.no_cgroups_reason = cgroups.detect()
        if self.cgroups is not None:
            self.cgroups.sweep()

    # -- pod IPs: <prefix>.x.y, a range routed to lo (podnet.py), or 127/8 as the fallback --
    def allocate_ip(self, uid: str) -> str:
        with self.lock:
            used = set(self.ips.values())
            while True:
                self._next_ip = self._next_ip % 65000 + 1
                ip = f"{self.info.pod_ip_prefix}.{self._next_ip // 254}.{self._next_ip % 254 + 1}"
                if ip not in used:
                    self.ips[uid] = ip
                    return ip

    def release_ip(self, uid: str) -> None:
        with self.lock:
            self.ips.pop(uid, None)

    def record_pgid(self, uid: str, container: str, ref: ProcRef) -> None:
        (self.root / "pgids" / f"{uid}-{container}").write_text(ref.to_text())

    def forget_pgid(self, uid: str, container: str) -> None:
        (self.root / "pgids" / f"{uid}-{container}").unlink(missing_ok=True)

    # -- node --
    def register_node(self) -> None:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        # Advertised; memory limits are enforced per container (cgroups), CPU is not. CPU is generous so
        # pods that request a few cores (a trainer sized for a real node) still schedule here.
        capacity = {"cpu": str(max(os.cpu_count() or 1, 16)), "memory": str(mem), "pods": "110",
                    "ephemeral-storage": str(shutil.disk_usage(self.root).total)}
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": RUNNER_NODE, "labels": {
            "kubernetes.io/hostname": RUNNER_NODE, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
            "ragtune.dev/local-runner": "true"}}}
        try:
            self.kube.create("/api/v1/nodes", node)
        except ApiError as exc:
            if exc.status != 409:
                raise
        self._node_status = {
            "capacity": capacity, "allocatable": capacity,
            "addresses": [{"type": "InternalIP", "address": self.host_ip}, {"type": "Hostname", "address": RUNNER_NODE}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.info.ports["kubelet"]}},
            "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": "ragtune-local",
                         "containerRuntimeVersion": "local://processes", "kernelVersion": os.uname().release,
                         "osImage": "local processes", "kubeProxyVersion": "", "machineID": "", "systemUUID": "",
                         "bootID": ""},
        }
        self._transition = now()
        self.update_node_status()

    def update_node_status(self) -> None:
        t = now()
        conds = [("Ready", "True", "KubeletReady", "ragtune local runner is posting ready status"),
                 ("MemoryPressure", "False", "KubeletHasSufficientMemory", "no memory pressure"),
                 ("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk pressure"),
                 ("PIDPressure", "False", "KubeletHasSufficientPID", "no PID pressure")]
        status = dict(self._node_status)
        status["conditions"] = [{"type": k, "status": s, "reason": r, "message": m, "lastHeartbeatTime": t,
                                 "lastTransitionTime": self._transition} for k, s, r, m in conds]
        self.kube.merge_patch(f"/api/v1/nodes/{RUNNER_NODE}/status", {"status": status})

    def renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{RUNNER_NODE}"
        spec = {"holderIdentity": RUNNER_NODE, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": micro_now()}
        try:
            self.kube.merge_patch(path, {"spec": spec})
        except ApiError as exc:
            if exc.status != 404:
                raise
            self.kube.create("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": RUNNER_NODE}, "spec": spec})

    def heartbeat_loop(self) -> None:
        last_status = time.monotonic()
        while not self.stopping.wait(LEASE_RENEW):
            try:
                self.renew_lease()
                if time.monotonic() - last_status > NODE_STATUS_EVERY:
                    self.update_node_status()
                    last_status = time.monotonic()
            except (ApiError, OSError) as exc:
                log.warning("node heartbeat failed: %s", exc)

    # -- services -> /etc/hosts --
    def refresh_services(self) -> None:
        try:
            items = self.kube.get("/api/v1/services")["items"]
        except (ApiError, OSError) as exc:
            log.warning("listing services failed: %s", exc)
            return
        self.services = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in items}

    def service_ips(self) -> dict[tuple[str, str], str]:
        """What DNS would answer, per (namespace, name): each Service -> the IP of a ready local pod it
        selects (first by name: no load balancing), and each pod `<hostname>.<subdomain>` whose
        subdomain names a headless Service selecting it -> that pod's IP (ready, or running when the
        Service publishes not-ready addresses) — how an Indexed Job's ranks find index 0."""
        running = sorted((w for w in list(self.workers.values()) if not w.finished.is_set()
                          and w.phase == "Running"), key=lambda w: w.pod_name)
        out = {}
        for (ns, name), svc in self.services.items():
            spec = svc.get("spec") or {}
            selector = spec.get("selector")
            if not selector:
                continue
            selected = [w for w in running if w.ns == ns and all(
                (w.pod["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())]
            ready = [w for w in selected if all(c.ready for c in w.containers)]
            if ready:
                out[(ns, name)] = ready[0].pod_ip
            if spec.get("clusterIP") == "None":
                for w in (selected if spec.get("publishNotReadyAddresses") else ready):
                    host, subdomain = pod_hostname(w.pod)
                    if subdomain == name:
                        out[(ns, f"{host}.{subdomain}")] = w.pod_ip
        return out

    def hosts_for(self, worker: PodWorker) -> str:
        return hosts_file(worker.pod, worker.pod_ip, self.service_ips())

    def refresh_hosts(self) -> None:
        ips = self.service_ips()
        for w in list(self.workers.values()):
            if not w.finished.is_set() and w.hosts_path.exists():
                write_in_place(w.hosts_path, hosts_file(w.pod, w.pod_ip, ips))

    # -- sync --
    def watch_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                for _event in self.kube.watch("/api/v1/pods", timeout_seconds=60,
                                              fieldSelector=f"spec.nodeName={RUNNER_NODE}"):
                    self.wake.set()
                    if self.stopping.is_set():
                        return
            except (ApiError, OSError, ValueError) as exc:
                log.debug("pod watch ended: %s", exc)
                self.stopping.wait(1.0)

    def sync(self) -> None:
        pods = self.kube.get("/api/v1/pods", fieldSelector=f"spec.nodeName={RUNNER_NODE}")["items"]
        if any(p["metadata"]["uid"] not in self.workers for p in pods):
            self.refresh_services()  # a new pod's /etc/hosts should know the Services created just before it
        seen = set()
        for pod in pods:
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            worker = self.workers.get(uid)
            deleting = pod["metadata"].get("deletionTimestamp") is not None
            if worker is None:
                if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    continue  # finished before this runner started
                worker = PodWorker(self, pod)
                self.workers[uid] = worker
                worker.start()
            else:
                worker.pod = pod  # the API's newest view: conditions others added (e.g. DisruptionTarget)
            if deleting:
                grace = pod["metadata"].get("deletionGracePeriodSeconds")
                grace = float(pod["spec"].get("terminationGracePeriodSeconds", 30) if grace is None else grace)
                worker.request_stop(grace)
                if worker.finished.is_set():  # already terminal: just finish the deletion
                    worker._delete_from_api()
                    worker._cleanup()
        for uid in list(self.workers):
            if uid not in seen:
                worker = self.workers.pop(uid)
                worker.request_stop(0, vanished=True)

    def log_lookup(self, ns: str, pod: str, container: str, previous: bool):
        for w in list(self.workers.values()):
            if w.ns == ns and w.pod_name == pod:
                c = w.find(container)
                if c is None:
                    names = ", ".join(x.name for x in w.all_containers())
                    return None, None, f'container "{container}" in pod "{pod}" not found (containers: {names})'
                if previous:
                    if c.restarts == 0:
                        return None, None, f'previous terminated container "{container}" in pod "{pod}" not found'
                    return w.log_path(c, c.restarts - 1), (lambda: False), ""
                path = w.log_path(c)
                if "waiting" in c.state and not path.exists():
                    reason = c.state["waiting"].get("reason", "ContainerCreating")
                    return None, None, f'container "{container}" in pod "{pod}" is waiting to start: {reason}'
                return path, c.running, ""
        return None, None, f'pod "{ns}/{pod}" not found on node {RUNNER_NODE}'

    def run(self) -> None:
        from .kubelet_server import serve

        p = self.info.pki
        server = serve(self.info.ports["kubelet"], p / "kubelet.crt", p / "kubelet.key", p / "ca.crt", self.log_lookup)
        self.register_node()
        self.renew_lease()
        threading.Thread(target=self.heartbeat_loop, name="heartbeat", daemon=True).start()
        threading.Thread(target=self.watch_loop, name="pod-watch", daemon=True).start()
        last_services = 0.0
        while not self.stopping.is_set():
            try:
                if time.monotonic() - last_services > 2.0:
                    self.refresh_services()
                    last_services = time.monotonic()
                self.sync()
                self.refresh_hosts()
            except (ApiError, OSError) as exc:
                log.warning("sync failed: %s", exc)
            self.wake.wait(1.0)
            self.wake.clear()
        self.shutdown()
        server.shutdown()

    def shutdown(self) -> None:
        """Stops every pod's processes (short grace: the platform is going away)."""
        workers = list(self.workers.values())
        for w in workers:
            w.vanished = True  # the API server may already be gone: no status writes
            w.request_stop(5.0)
        for w in workers:
            w.finished.wait(15)
        if self.cgroups is not None:
            self.cgroups.close()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ragtune-local-podrunner")
    parser.add_argument("--state-dir", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s: %(message)s")
    info = PlatformInfo(**json.loads((Path(args.state_dir) / "state.json").read_text()))
    runner = Runner(info)

    def stop(signum: int, _frame) -> None:
        log.info("received %s: stopping every pod, then exiting", signal.Signals(signum).name)
        runner.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("pod runner for node %s starting (kubelet API on 127.0.0.1:%s, pod IPs %s.x.y)", RUNNER_NODE,
             info.ports["kubelet"], info.pod_ip_prefix)
    if runner.cgroups is None:
        log.warning("memory limits are NOT enforced (containers run without resources.limits.memory and are never "
                    "OOMKilled): no writable memory cgroup: %s", runner.no_cgroups_reason)
    else:
        log.info("memory limits enforced with cgroup v%d under %s", runner.cgroups.version, runner.cgroups.parent)
    runner.run()
    log.info("pod runner stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
