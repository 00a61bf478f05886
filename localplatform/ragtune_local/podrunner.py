"""The pod runner: a kubelet for one node (`ragtune-local`) that runs pods as local processes.

One thread per pod drives its lifecycle (volumes, init containers, containers, probes,
restarts, deletion); a watch wakes the sync loop, a periodic list makes it robust to missed
events. Each container runs through `nsexec.py` in its own mount namespace and, when it has
`resources.limits.memory`, in its own memory cgroup (OOM kills reported as `OOMKilled`, like a kubelet).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import cgroups, images
from .kubeclient import ApiError, Kube
from .platform import RUNNER_NODE, PlatformInfo
from .podenv import ConfigError, ObjectCache, container_env, container_mounts, expand, hosts_file, prepare_volumes, \
    write_in_place
from .procs import ProcRef, stop_group

log = logging.getLogger("ragtune.podrunner")
NSEXEC = Path(__file__).resolve().parent / "nsexec.py"
BACKOFF_BASE, BACKOFF_MAX = 2.0, 60.0  # kubelet uses 10 s / 300 s; shorter keeps local iterations quick
LEASE_SECONDS, LEASE_RENEW, NODE_STATUS_EVERY = 40, 10.0, 30.0
TERMINATION_LOG_LIMIT = 4096


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---- containers -------------------------------------------------------------------------------


@dataclass
class Container:
    spec: dict
    init: bool
    restarts: int = 0
    proc: Optional[subprocess.Popen] = None
    ref: Optional[ProcRef] = None
    state: dict = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict = field(default_factory=dict)
    started: bool = False
    ready: bool = False
    done: bool = False
    """Terminated and will not run again."""
    restart_at: float = 0.0
    probes: dict = field(default_factory=dict)
    started_mono: float = 0.0
    cgroup: Optional[Path] = None
    """The memory cgroup of the current run (None: no limit)."""

    @property
    def name(self) -> str:
        return self.spec["name"]

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict:
        s = {"name": self.name, "image": self.spec["image"], "imageID": "", "ready": self.ready,
             "restartCount": self.restarts, "state": self.state, "started": self.started}
        if self.ref:
            s["containerID"] = f"local://{self.ref.pid}"
        if self.last_state:
            s["lastState"] = self.last_state
        return s


@dataclass
class Probe:
    spec: dict
    next_at: float
    successes: int = 0
    failures: int = 0
    passed: bool = False


class PodWorker(threading.Thread):
    def __init__(self, runner: "Runner", pod: dict):
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.runner, self.kube = runner, runner.kube
        self.pod = pod
        self.ns, self.pod_name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.path = f"/api/v1/namespaces/{self.ns}/pods/{self.pod_name}"
        self.dir = runner.root / "pods" / self.uid
        self.log_dir = runner.root / "logs" / f"{self.ns}_{self.pod_name}_{self.uid}"
        self.shm_dir = Path("/dev/shm/ragtune") / self.uid
        self.policy = pod["spec"].get("restartPolicy", "Always")
        self.init_containers = [Container(c, True) for c in pod["spec"].get("initContainers") or []]
        self.containers = [Container(c, False) for c in pod["spec"]["containers"]]
        self.pod_ip = runner.host_ip if pod["spec"].get("hostNetwork") else runner.allocate_ip(self.uid)
        self.phase = "Pending"
        self.start_time = now()
        self.reason: Optional[str] = None
        self.message: Optional[str] = None
        self.stop_grace: Optional[float] = None
        self.vanished = False
        self.wake = threading.Event()
        self.finished = threading.Event()
        self._last_status: Optional[str] = None
        self.hosts_path = self.dir / "hosts"
        self._cond_times: dict[str, tuple[bool, str]] = {}

    # -- control from the sync loop --
    def request_stop(self, grace: float, vanished: bool = False) -> None:
        self.vanished = self.vanished or vanished
        self.stop_grace = grace if self.stop_grace is None else min(grace, self.stop_grace)
        self.wake.set()

    def all_containers(self) -> list[Container]:
        return self.init_containers + self.containers

    def find(self, name: str) -> Optional[Container]:
        return next((c for c in self.all_containers() if c.name == name), None)

    def log_path(self, c: Container, restart: Optional[int] = None) -> Path:
        return self.log_dir / f"{c.name}.{c.restarts if restart is None else restart}.log"

    # -- lifecycle --
    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # a runner bug must not leave a pod silently stuck
            log.exception("pod %s/%s: runner error", self.ns, self.pod_name)
            self.phase, self.reason, self.message = "Failed", "RunnerError", f"local pod runner error: {exc}"
            self._kill_all(0)
            self._report()
        finally:
            self.runner.release_ip(self.uid)
            if self.stop_grace is not None and not self.vanished:
                self._delete_from_api()
            self._cleanup()
            self.finished.set()

    def _run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.hosts_path.write_text(self.runner.hosts_for(self))
        volumes = self._prepare_volumes()
        if volumes is None:
            return
        for c in self.init_containers:
            if not self._run_to_completion(c, volumes):
                return
        for c in self.containers:
            self._start(c, volumes)
        self._report()
        while self.stop_grace is None:
            self._tick(volumes)
            if self.phase in ("Succeeded", "Failed"):
                self._report()
                return
            self._report()
            self.wake.wait(0.5)
            self.wake.clear()
        self._kill_all(self.stop_grace)
        self._report()

    def _prepare_volumes(self) -> Optional[dict[str, Path]]:
        """Retries while a referenced object is missing (like the kubelet), until the pod is deleted."""
        while self.stop_grace is None:
            try:
                return prepare_volumes(self.pod, self.dir, self.shm_dir, ObjectCache(self.kube, self.ns), self.kube,
                                       self.pod_ip, self.runner.host_ip)
            except (ConfigError, ApiError) as exc:
                for c in self.all_containers():
                    c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
                self._report()
                self.wake.wait(2.0)
                self.wake.clear()
        return None

    def _run_to_completion(self, c: Container, volumes: dict[str, Path]) -> bool:
        while self.stop_grace is None:
            if not c.running() and time.monotonic() >= c.restart_at:
                self._start(c, volumes)
            self._report()
            self.wake.wait(0.3)
            self.wake.clear()
            if c.proc is None or c.running():
                continue
            code = self._reap(c)
            if code == 0:
                c.done = True
                return True
            if self.policy == "Never":
                c.done = True
                self.phase = "Failed"
                for other in self.containers:
                    other.state = {"waiting": {"reason": "PodInitializing"}}
                self._report()
                return False
            self._backoff(c)
        self._kill_all(self.stop_grace or 0)
        self._report()
        return False

    def _start(self, c: Container, volumes: dict[str, Path]) -> None:
        c.proc = None
        try:
            image = images.lookup(c.spec["image"])
        except images.ImageNotFound as exc:
            reason = "ImagePullBackOff" if c.state.get("waiting", {}).get("reason") in ("ErrImagePull",
                                                                                       "ImagePullBackOff") else "ErrImagePull"
            c.state = {"waiting": {"reason": reason, "message": str(exc)}}
            c.restart_at = time.monotonic() + 5
            return
        try:
            env = container_env(self.pod, c.spec, ObjectCache(self.kube, self.ns), self._base_env(image),
                                self.pod_ip, self.runner.host_ip)
            argv = images.local_argv(c.spec["image"], c.spec.get("command"), c.spec.get("args"))
            argv = [expand(a, env) for a in argv]
            mounts = container_mounts(c.spec, volumes)
            keep = _paths_to_keep(mounts, c.spec.get("workingDir") or images.working_dir())
            limit = memory_limit(c.spec)
        except (ConfigError, ApiError, images.ImageNotFound) as exc:
            c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
            c.restart_at = time.monotonic() + 2
            return
        term = self.dir / f"termination-{c.name}"
        term.write_bytes(b"")
        mounts.append({"source": str(term), "target": c.spec.get("terminationMessagePath", "/dev/termination-log")})
        mounts.append({"source": str(self.hosts_path), "target": "/etc/hosts"})
        spec = {"mounts": mounts, "keep": keep, "argv": argv, "env": env,
                "cwd": c.spec.get("workingDir") or images.working_dir()}
        if limit is not None and self.runner.cgroups is not None:
            try:
                c.cgroup = self.runner.cgroups.create(f"{self.uid}-{c.name}-{c.restarts}", limit)
            except OSError as exc:
                c.state = {"waiting": {"reason": "RunContainerError",
                                       "message": f"cannot create the memory cgroup: {exc}"}}
                c.restart_at = time.monotonic() + 2
                return
            spec["cgroup"] = str(c.cgroup)
        logf = open(self.log_path(c), "ab")
        try:
            c.proc = subprocess.Popen([sys.executable, "-S", str(NSEXEC)], stdin=subprocess.PIPE,
                                      stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError:
            self._release_cgroup(c)
            raise
        finally:
            logf.close()
        # The spec holds resolved secrets: it goes over a pipe, never into a file.
        try:
            c.proc.stdin.write(json.dumps(spec).encode())
        except BrokenPipeError:  # nsexec died before reading it: its exit is reaped like any other
            pass
        finally:
            try:
                c.proc.stdin.close()
            except BrokenPipeError:
                pass
        c.ref = ProcRef.of(c.proc.pid)
        self.runner.record_pgid(self.uid, c.name, c.ref)
        c.state = {"running": {"startedAt": now()}}
        c.started_mono = time.monotonic()
        c.started = "startupProbe" not in c.spec
        c.ready = False
        c.probes = {kind: Probe(c.spec[kind], time.monotonic() + c.spec[kind].get("initialDelaySeconds", 0))
                    for kind in ("startupProbe", "readinessProbe", "livenessProbe") if kind in c.spec}

    def _base_env(self, image: images.LocalImage) -> dict[str, str]:
        env = images.base_env()
        env.update(image.env)
        env["HOSTNAME"] = self.pod_name
        # In-cluster clients (KUBERNETES_SERVICE_HOST) reach the API server on loopback: no Service VIPs here.
        env["KUBERNETES_SERVICE_HOST"] = "127.0.0.1"
        env["KUBERNETES_SERVICE_PORT"] = str(self.runner.info.ports["apiserver"])
        return env

    def _reap(self, c: Container) -> int:
        """Records the exit of `c` in its state; returns the exit code."""
        code = c.proc.returncode
        code = 128 - code if code < 0 else code  # killed by signal N -> 128+N, as runtimes report
        self.runner.forget_pgid(self.uid, c.name)
        if c.ref:
            stop_group(c.ref, grace=1)  # children of the exited main process go too
        # Like the kubelet: a container whose cgroup saw an OOM kill is OOMKilled, whichever process died.
        oom = c.cgroup is not None and code != 0 and self.runner.cgroups.oom_kills(c.cgroup) > 0
        self._release_cgroup(c)
        term = {"exitCode": code, "reason": "OOMKilled" if oom else "Completed" if code == 0 else "Error",
                "startedAt": c.state.get("running", {}).get("startedAt", now()), "finishedAt": now(),
                "containerID": f"local://{c.ref.pid}" if c.ref else ""}
        message = self._termination_message(c, code)
        if message:
            term["message"] = message
        c.state = {"terminated": term}
        c.ready = False
        c.proc = None
        return code

    def _release_cgroup(self, c: Container) -> None:
        if c.cgroup is not None and not cgroups.remove(c.cgroup):
            log.warning("pod %s/%s: memory cgroup %s of container %s could not be removed", self.ns, self.pod_name,
                        c.cgroup, c.name)
        c.cgroup = None

    def _termination_message(self, c: Container, code: int) -> str:
        path = self.dir / f"termination-{c.name}"
        data = path.read_bytes()[:TERMINATION_LOG_LIMIT] if path.exists() else b""
        if not data and code != 0 and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            logp = self.log_path(c)
            tail = logp.read_bytes().splitlines()[-80:] if logp.exists() else []
            data = b"\n".join(tail)[-2048:]
        return data.decode(errors="replace")

    def _backoff(self, c: Container) -> None:
        c.last_state = c.state
        delay = min(BACKOFF_BASE * (2 ** c.restarts), BACKOFF_MAX)
        c.restarts += 1
        c.restart_at = time.monotonic() + delay
        term = c.state["terminated"]
        c.state = {"waiting": {"reason": "CrashLoopBackOff",
                               "message": f"back-off {delay:.0f}s restarting failed container={c.name} "
                                          f"pod={self.pod_name}_{self.ns}({self.uid}) (exit code {term['exitCode']})"}}

    def _tick(self, volumes: dict[str, Path]) -> None:
        for c in self.containers:
            if c.done:
                continue
            if c.proc is None:
                if time.monotonic() >= c.restart_at and "terminated" not in c.state:
                    self._start(c, volumes)
                continue
            if c.running():
                self._probe(c)
                continue
            code = self._reap(c)
            if self.policy == "Always" or (self.policy == "OnFailure" and code != 0):
                self._backoff(c)
            else:
                c.done = True
        if all(c.done for c in self.containers):
            failed = any(c.state["terminated"]["exitCode"] != 0 for c in self.containers)
            self.phase = "Failed" if failed else "Succeeded"
        elif any(c.started or c.done or c.restarts for c in self.containers):
            self.phase = "Running"

    # -- probes --
    def _probe(self, c: Container) -> None:
        t = time.monotonic()
        for kind, probe in list(c.probes.items()):
            if kind != "startupProbe" and not c.started:
                continue
            if kind == "startupProbe" and c.started:
                continue
            if t < probe.next_at:
                continue
            spec = probe.spec
            probe.next_at = t + spec.get("periodSeconds", 10)
            ok = self._check(c, spec)
            if ok:
                probe.successes, probe.failures = probe.successes + 1, 0
                if probe.successes >= (spec.get("successThreshold", 1) if kind == "readinessProbe" else 1):
                    probe.passed = True
            else:
                probe.failures, probe.successes = probe.failures + 1, 0
                if probe.failures >= spec.get("failureThreshold", 3):
                    probe.passed = False
                    if kind in ("startupProbe", "livenessProbe"):
                        log.info("pod %s/%s container %s failed its %s; restarting", self.ns, self.pod_name,
                                 c.name, kind)
                        stop_group(c.ref, grace=float(self.pod["spec"].get("terminationGracePeriodSeconds", 30)))
                        return
            if kind == "startupProbe" and probe.passed:
                c.started = True
        readiness = c.probes.get("readinessProbe")
        c.ready = c.started and (readiness is None or readiness.passed)

    def _check(self, c: Container, spec: dict) -> bool:
        timeout = spec.get("timeoutSeconds", 1)
        if "httpGet" in spec:
            h = spec["httpGet"]
            port = self._port(c, h["port"])
            scheme = h.get("scheme", "HTTP").lower()
            url = f"{scheme}://{h.get('host') or self.pod_ip}:{port}{h.get('path', '/')}"
            req = urllib.request.Request(url, headers={x["name"]: x["value"] for x in h.get("httpHeaders") or []})
            ctx = ssl._create_unverified_context() if scheme == "https" else None  # like the kubelet: no verify
            try:
                with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
                    return 200 <= resp.status < 400
            except urllib.error.HTTPError as exc:
                return 200 <= exc.code < 400
            except (OSError, urllib.error.URLError):
                return False
        if "tcpSocket" in spec:
            try:
                with socket.create_connection((self.pod_ip, self._port(c, spec["tcpSocket"]["port"])), timeout):
                    return True
            except OSError:
                return False
        if "exec" in spec:
            argv = ["nsenter", f"--target={c.ref.pid}", "--mount", "--", *spec["exec"]["command"]]
            try:
                return subprocess.run(argv, capture_output=True, timeout=timeout).returncode == 0
            except subprocess.TimeoutExpired:
                return False
        return True

    @staticmethod
    def _port(c: Container, port) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in c.spec.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        raise ValueError(f"named port {port!r} not found in container {c.name}")

    # -- stop / report --
    def _kill_all(self, grace: float) -> None:
        running = [c for c in self.all_containers() if c.running()]
        threads = [threading.Thread(target=stop_group, args=(c.ref, grace)) for c in running]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for c in running:
            c.proc.wait()
            self._reap(c)
            c.done = True
        for c in self.all_containers():
            if "waiting" in c.state:
                c.state = {"waiting": {"reason": c.state["waiting"].get("reason", "ContainerCreating")}}
        if self.phase not in ("Succeeded", "Failed") and running:
            self.phase = "Failed" if any(c.state.get("terminated", {}).get("exitCode") for c in running) \
                else "Succeeded"

    def _report(self) -> None:
        if self.vanished:
            return
        ready = all(c.ready for c in self.containers) and self.phase == "Running"
        init_done = all(c.done and c.state.get("terminated", {}).get("exitCode") == 0 for c in self.init_containers)
        scheduled = [x for x in (self.pod.get("status") or {}).get("conditions") or [] if x["type"] == "PodScheduled"]
        conds = scheduled + [self._cond("PodReadyToStartContainers", True), self._cond("Initialized", init_done),
                             self._cond("ContainersReady", ready), self._cond("Ready", ready)]
        status = {"phase": self.phase, "hostIP": self.runner.host_ip, "hostIPs": [{"ip": self.runner.host_ip}],
                  "podIP": self.pod_ip, "podIPs": [{"ip": self.pod_ip}], "startTime": self.start_time,
                  "conditions": conds, "containerStatuses": [c.status() for c in self.containers],
                  "qosClass": (self.pod.get("status") or {}).get("qosClass", "BestEffort")}
        if self.init_containers:
            status["initContainerStatuses"] = [c.status() for c in self.init_containers]
        if self.reason:
            status["reason"], status["message"] = self.reason, self.message
        comparable = json.dumps(status, sort_keys=True, default=str)
        if comparable == self._last_status:
            return
        try:
            self.kube.merge_patch(self.path + "/status", {"status": status})
            self._last_status = comparable
        except ApiError as exc:
            if exc.status == 404:
                self.vanished = True
            else:
                log.warning("pod %s/%s: status update failed: %s", self.ns, self.pod_name, exc)
        except OSError as exc:
            log.warning("pod %s/%s: status update failed: %s", self.ns, self.pod_name, exc)

    def _cond(self, kind: str, value: bool) -> dict:
        """A condition whose lastTransitionTime changes only when its status does."""
        prev = self._cond_times.get(kind)
        if prev is None or prev[0] != value:
            self._cond_times[kind] = (value, now())
        return {"type": kind, "status": "True" if value else "False", "lastTransitionTime": self._cond_times[kind][1]}

    def _delete_from_api(self) -> None:
        try:
            self.kube.delete(self.path, {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                                         "preconditions": {"uid": self.uid}})
        except ApiError as exc:
            if exc.status not in (404, 409):
                log.warning("pod %s/%s: final delete failed: %s", self.ns, self.pod_name, exc)
        except OSError as exc:
            log.warning("pod %s/%s: final delete failed: %s", self.ns, self.pod_name, exc)

    def _cleanup(self) -> None:
        if self.stop_grace is not None:  # the pod is gone: drop its volumes (logs stay for post-mortems)
            shutil.rmtree(self.dir, ignore_errors=True)
            shutil.rmtree(self.shm_dir, ignore_errors=True)


def memory_limit(container: dict) -> Optional[int]:
    """`resources.limits.memory` in bytes, or None when the container has no memory limit."""
    value = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    if value is None:
        return None
    try:
        return cgroups.parse_quantity(value)
    except ValueError as exc:
        raise ConfigError(f"container {container.get('name')}: resources.limits.memory: {exc}") from exc


def _paths_to_keep(mounts: list[dict], cwd: str) -> list[str]:
    """Processes run from this checkout and venv. A volume mounted *above* them (e.g. an emptyDir at
    /tmp while the checkout is under /tmp) is fine: nsexec binds them back on top. A volume mounted
    exactly on them, or on /, cannot work and is refused."""
    protected = sorted({cwd, images.working_dir(), images.VENV_BIN})
    for m in mounts:
        target = m["target"].rstrip("/") or "/"
        for path in protected:
            if path == target or target == "/":
                raise ConfigError(f"volumeMount {m['target']!r} would replace {path} (the local runner runs images "
                                  "from the checkout and its venv); mount the volume elsewhere")
    # the outermost protected paths; anything inside them comes back with them
    return [p for p in protected if not any(p != q and p.startswith(q + "/") for q in protected)]


# ---- the runner -------------------------------------------------------------------------------


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

    # -- pod IPs: <prefix>.x.y on loopback; the whole 127/8 routes to lo on Linux --
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

    def _service_ips(self) -> dict[tuple[str, str], str]:
        """Each Service -> the IP of a ready local pod it selects (first by name: no load balancing)."""
        ready = sorted((w for w in list(self.workers.values()) if not w.finished.is_set()
                        and w.phase == "Running" and all(c.ready for c in w.containers)), key=lambda w: w.pod_name)
        out = {}
        for (ns, name), svc in self.services.items():
            selector = (svc.get("spec") or {}).get("selector")
            if not selector:
                continue
            for w in ready:
                labels = w.pod["metadata"].get("labels") or {}
                if w.ns == ns and all(labels.get(k) == v for k, v in selector.items()):
                    out[(ns, name)] = w.pod_ip
                    break
        return out

    def hosts_for(self, worker: PodWorker) -> str:
        return hosts_file(worker.pod_name, worker.pod_ip, worker.ns, self._service_ips())

    def refresh_hosts(self) -> None:
        ips = self._service_ips()
        for w in list(self.workers.values()):
            if not w.finished.is_set() and w.hosts_path.exists():
                write_in_place(w.hosts_path, hosts_file(w.pod_name, w.pod_ip, w.ns, ips))

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
