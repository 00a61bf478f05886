"""The pod worker: one thread per pod drives its lifecycle like a kubelet's pod worker — volumes,
init containers, containers, probes, restarts, status reports and deletion.

Each container runs through `nsexec.py` in its own mount namespace and, when it has
`resources.limits.memory`, in its own memory cgroup (OOM kills reported as `OOMKilled`, like a
kubelet). The node agent (`nodeagent.py`) starts and stops workers.
"""

from __future__ import annotations

import json
import logging
import shutil
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
from typing import TYPE_CHECKING, Optional

from ragtune.clock import utc_now_iso, utc_now_micro

from . import cgroups, images
from .kubeclient import ApiError
from .podenv import (
    ConfigError,
    ObjectCache,
    container_env,
    container_mounts,
    expand,
    pod_hostname,
    prepare_volumes,
    refresh_configmap_volumes,
)
from .procs import ProcRef, stop_group

if TYPE_CHECKING:
    from .nodeagent import Runner

log = logging.getLogger("ragtune.podrunner")
NSEXEC = Path(__file__).resolve().parent / "nsexec.py"
BACKOFF_BASE, BACKOFF_MAX = 2.0, 60.0  # kubelet uses 10 s / 300 s; shorter keeps local iterations quick
CONFIGMAP_SYNC_SECONDS = 2.0
"""How often a running pod's configMap volumes are compared with their ConfigMaps (a kubelet: ~1 min)."""
TERMINATION_LOG_LIMIT = 4096


now, micro_now = utc_now_iso, utc_now_micro  # the API server's Time / MicroTime forms


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


KUBELET_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready")
"""The pod conditions the kubelet writes; every other type in a pod's status is someone else's."""


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
        self.has_configmaps = any("configMap" in v for v in pod["spec"].get("volumes") or [])
        self._configmaps_at = 0.0
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
                self._end_deleted()
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
        spec = {"mounts": mounts, "keep": keep, "argv": argv, "env": env, "hostname": pod_hostname(self.pod)[0],
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
        env["HOSTNAME"] = pod_hostname(self.pod)[0]
        # In-cluster clients (KUBERNETES_SERVICE_HOST) reach the API server on loopback: no Service VIPs here.
        env["KUBERNETES_SERVICE_HOST"] = "127.0.0.1"
        env["KUBERNETES_SERVICE_PORT"] = str(self.runner.info.ports["apiserver"])
        # Pod IPs here are addresses of a `local` route (podnet.py), held by no interface: gloo (torch
        # distributed on CPU) looks for the interface holding its hostname's address and finds none.
        # Every pod is reachable through lo on this machine, as on a cluster through the pod's eth0.
        env["GLOO_SOCKET_IFNAME"] = "lo"
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
        if self.has_configmaps and time.monotonic() >= self._configmaps_at:
            self._configmaps_at = time.monotonic() + CONFIGMAP_SYNC_SECONDS
            try:
                for name in refresh_configmap_volumes(self.pod, volumes, self.kube):
                    log.info("pod %s/%s: configMap volume %s updated", self.ns, self.pod_name, name)
            except Exception as exc:  # an API timeout under load: keep the last content, try again later
                log.warning("pod %s/%s: configMap volumes not refreshed: %s", self.ns, self.pod_name, exc)
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

    def _end_deleted(self) -> None:
        """A deleted pod ends terminal, as a kubelet ends it, also when its containers never
        started (image pull failures, missing Secrets): the Job controller removes its
        job-tracking finalizer only from terminal pods, and until then the pod, and with it its
        namespace, stays Terminating."""
        if self.phase in ("Succeeded", "Failed"):
            return
        for c in self.all_containers():
            if "terminated" not in c.state:
                c.state = {"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown",
                                          "message": "the pod was deleted while this container was not running",
                                          "finishedAt": now()}}
        self.phase = "Failed"
        self._report()

    def _report(self) -> None:
        if self.vanished:
            return
        ready = all(c.ready for c in self.containers) and self.phase == "Running"
        init_done = all(c.done and c.state.get("terminated", {}).get("exitCode") == 0 for c in self.init_containers)
        # As a kubelet does: write the conditions it owns, keep the others (PodScheduled from the
        # scheduler, DisruptionTarget from an eviction or preemption, which a Job's podFailurePolicy
        # reads). The status is a merge patch: a condition left out of the list would be dropped.
        kept = [x for x in (self.pod.get("status") or {}).get("conditions") or []
                if x["type"] not in KUBELET_CONDITIONS]
        conds = kept + [self._cond("PodReadyToStartContainers", True), self._cond("Initialized", init_done),
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


