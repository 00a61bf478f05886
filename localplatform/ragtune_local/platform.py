"""Start, stop and inspect the local platform.

`up` starts, in its own state dir: etcd -> kube-apiserver (+ MinIO) -> controller-manager,
scheduler, kwok and the pod runner, each a process group with a log file, waiting (bounded)
for each to be healthy. Any failure names the part, the reason and the log, and stops what
was started. `down` stops every process group it recorded.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from . import pki, podnet
from .kubeclient import ApiError, Kube
from .paths import BUILD_SCRIPT, PARTS, binary, default_state_dir
from .procs import ProcRef, group_members, stop_group

RUNNER_NODE = "ragtune-local"
SERVICE_CIDR = "10.96.0.0/16"
# Start order; `down` stops in reverse. The pod runner goes first so pods get their SIGTERM.
PART_ORDER = ("etcd", "kube-apiserver", "minio", "kube-controller-manager", "kube-scheduler", "kwok", "pod-runner",
              "gateway", "kueue", "prometheus")
OPTIONAL_PARTS = {"gateway": ("traefik", "gatewayapi"), "kueue": ("kueue", "kueuecrds"), "prometheus": ("prometheus",)}
"""Parts `up(with_parts=...)` adds (`ragtune dev up --with gateway`) -> the build.sh parts they need."""
DATA_DIR = Path(__file__).resolve().parent / "data"


class PlatformError(RuntimeError):
    """A part failed to build or start, or the platform is in a state that refuses the request."""


@dataclass
class PlatformInfo:
    """What a running platform exposes; saved as `<state>/state.json`."""

    state_dir: str
    kubeconfig: str
    server: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    pod_ip_prefix: str
    """Pod IPs are `<prefix>.x.y`, answered on this machine only, distinct per platform so two can run
    side by side: `10.<n>` routed to lo (podnet.py), or `127.<n>` where that route cannot be added."""
    ports: dict[str, int] = field(default_factory=dict)
    startup_seconds: Optional[float] = None
    ready_after: dict[str, float] = field(default_factory=dict)
    """Seconds from the start of `up` until each part was healthy."""
    pod_ip_route: Optional[str] = None
    """The `local ... dev lo` route this platform added for its pod IPs (removed on `down`); None
    with loopback pod IPs."""

    @property
    def pki(self) -> Path:
        return Path(self.state_dir) / "pki"

    def log(self, part: str) -> Path:
        return Path(self.state_dir) / "logs" / f"{part}.log"

    def admin_client(self) -> Kube:
        return Kube(self.server, self.pki / "ca.crt", self.pki / "admin.crt", self.pki / "admin.key")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the platform's parts, tests and benches)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log written)"


def _http_ok(url: str, context: Optional[ssl.SSLContext] = None, expect: Optional[str] = None) -> Optional[str]:
    """None when `url` answers 200 (and contains `expect`), else a short reason."""
    try:
        with urllib.request.urlopen(url, timeout=3, context=context) as resp:
            body = resp.read().decode(errors="replace")
            if expect and expect not in body:
                return f"{url} answered {body[:200]!r}"
            return None
    except urllib.error.HTTPError as exc:
        return f"{url}: HTTP {exc.code} {exc.read()[:300].decode(errors='replace')}"
    except (OSError, urllib.error.URLError) as exc:
        return f"{url}: {exc}"


class LocalPlatform:
    def __init__(self, state_dir: Optional[Path] = None):
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        self.procs_dir = self.state_dir / "procs"
        self.logs_dir = self.state_dir / "logs"
        self._t0 = time.monotonic()
        self._ready_after: dict[str, float] = {}
        self._children: list[subprocess.Popen] = []  # reaped by down() when this process started them
        self._log: Callable[[str], None] = print

    # ---- state --------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    def info(self) -> PlatformInfo:
        try:
            return PlatformInfo(**json.loads(self.state_file.read_text()))
        except FileNotFoundError:
            raise PlatformError(f"no local platform in {self.state_dir}: run `ragtune dev up`") from None

    def _save(self, info: PlatformInfo) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(info), indent=2))
        tmp.chmod(0o600)  # holds the S3 root credentials
        tmp.replace(self.state_file)

    def _recorded(self) -> dict[str, ProcRef]:
        refs = {}
        if self.procs_dir.is_dir():
            for f in self.procs_dir.glob("*.pid"):
                try:
                    refs[f.stem] = ProcRef.from_text(f.read_text())
                except (ValueError, FileNotFoundError):
                    continue
        return refs

    def running_parts(self) -> dict[str, bool]:
        return {name: ref.alive() for name, ref in self._recorded().items()}

    def part_pids(self) -> dict[str, int]:
        """The process id of each running part (what a bench reads CPU time from)."""
        return {name: ref.pid for name, ref in self._recorded().items() if ref.alive()}

    def is_running(self) -> bool:
        return any(self.running_parts().values())

    def status(self) -> dict:
        parts = self.running_parts()
        out: dict = {"stateDir": str(self.state_dir), "running": any(parts.values()), "parts": parts}
        if self.state_file.exists() and out["running"]:
            info = self.info()
            out.update(kubeconfig=info.kubeconfig, server=info.server, s3Endpoint=info.s3_endpoint,
                       ports=info.ports, startupSeconds=info.startup_seconds)
        return out

    # ---- up ----------------------------------------------------------------------------

    def up(self, timeout: float = 120.0, build: bool = True, log: Callable[[str], None] = print,
           with_parts: tuple[str, ...] = ()) -> PlatformInfo:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PlatformError(f"another `ragtune dev up`/`down` is in progress on {self.state_dir}") from None
            running = [n for n, alive in self.running_parts().items() if alive]
            if running:
                raise PlatformError(
                    f"a local platform is already running in {self.state_dir} (parts: {', '.join(sorted(running))}); "
                    "use it (KUBECONFIG=" + str(self.state_dir / "kubeconfig") + ") or run `ragtune dev down` first")
            unknown = sorted(set(with_parts) - set(OPTIONAL_PARTS))
            if unknown:
                raise PlatformError(f"unknown optional part(s) {', '.join(unknown)} (known: {', '.join(OPTIONAL_PARTS)})")
            extra = tuple(b for part in with_parts for b in OPTIONAL_PARTS[part])
            ensure_binaries(("etcd", "kube", "kwok", "minio") + extra, build=build, log=log)
            t0 = self._t0 = time.monotonic()
            self._ready_after, self._log = {}, log
            try:
                info = self._start_all(timeout, log)
                self._save(info)
                for part in with_parts:
                    info = self._start_optional(part, timeout)
            except BaseException:
                self._stop_all(log=lambda _m: None)
                raise
            info.startup_seconds = round(time.monotonic() - t0, 2)
            info.ready_after = self._ready_after
            self._save(info)
            log(f"local platform up in {info.startup_seconds}s: KUBECONFIG={info.kubeconfig}  S3={info.s3_endpoint}")
            return info

    def _fresh_state(self) -> None:
        for sub in ("pki", "procs", "logs", "etcd", "runner", "kwok"):
            shutil.rmtree(self.state_dir / sub, ignore_errors=True)
        for sub in ("pki", "procs", "logs"):
            (self.state_dir / sub).mkdir(parents=True)
        self.state_file.unlink(missing_ok=True)

    def _start_all(self, timeout: float, log: Callable[[str], None]) -> PlatformInfo:
        self._release_pod_route()  # left by a platform of this state dir that was killed, not downed
        self._fresh_state()
        deadline = time.monotonic() + timeout
        sd = self.state_dir
        ports = {k: free_port() for k in ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler",
                                           "kwok", "s3", "s3-console", "kubelet")}
        server = f"https://127.0.0.1:{ports['apiserver']}"
        pod_ip_prefix, pod_ip_route = podnet.claim(log)
        info = PlatformInfo(
            state_dir=str(sd), kubeconfig=str(sd / "kubeconfig"), server=server,
            s3_endpoint=f"http://127.0.0.1:{ports['s3']}", s3_access_key="ragtune-" + secrets.token_hex(4),
            s3_secret_key=secrets.token_urlsafe(24), pod_ip_prefix=pod_ip_prefix, ports=ports,
            pod_ip_route=pod_ip_route,
        )
        self._save(info)  # first: a failure from here on finds the route to remove in it
        self._write_pki(info)
        self._save(info)

        self._spawn("etcd", [
            str(binary("etcd")), "--name=local", f"--data-dir={sd / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{ports['etcd']}",
            f"--advertise-client-urls=http://127.0.0.1:{ports['etcd']}",
            f"--listen-peer-urls=http://127.0.0.1:{ports['etcd-peer']}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{ports['etcd-peer']}",
            f"--initial-cluster=local=http://127.0.0.1:{ports['etcd-peer']}",
            "--unsafe-no-fsync",  # throwaway data: durability is not worth the disk waits
            "--log-level=warn",
        ])
        self._spawn("minio", [str(binary("minio")), "server", str(sd / "s3"), "--quiet",
                              f"--address=127.0.0.1:{ports['s3']}", f"--console-address=127.0.0.1:{ports['s3-console']}"],
                    env=self._minio_env(info))
        self._wait("etcd", deadline, lambda: _http_ok(f"http://127.0.0.1:{ports['etcd']}/health", expect='"true"'))
        p = info.pki
        self._spawn("kube-apiserver", [
            str(binary("kube-apiserver")), f"--etcd-servers=http://127.0.0.1:{ports['etcd']}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={ports['apiserver']}",
            "--endpoint-reconciler-type=none", f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--tls-cert-file={p / 'apiserver.crt'}", f"--tls-private-key-file={p / 'apiserver.key'}",
            f"--client-ca-file={p / 'ca.crt'}", "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={p / 'sa.pub'}", f"--service-account-signing-key-file={p / 'sa.key'}",
            f"--kubelet-client-certificate={p / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={p / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={p / 'ca.crt'}", "--kubelet-preferred-address-types=InternalIP",
            "--allow-privileged=true", "--profiling=false",
        ])
        api_ctx = ssl.create_default_context(cafile=str(p / "ca.crt"))
        api_ctx.load_cert_chain(p / "admin.crt", p / "admin.key")
        self._wait("kube-apiserver", deadline, lambda: _http_ok(f"{server}/readyz", api_ctx, expect="ok"))
        admin = info.admin_client()
        _apply_runner_rbac(admin)

        insecure = ssl._create_unverified_context()  # the components' self-signed /healthz serving certs
        self._spawn("kube-controller-manager", [
            str(binary("kube-controller-manager")), f"--kubeconfig={sd / 'controller-manager.kubeconfig'}",
            "--bind-address=127.0.0.1", f"--secure-port={ports['controller-manager']}", "--leader-elect=false",
            "--use-service-account-credentials=true", "--controllers=*",
            f"--service-account-private-key-file={p / 'sa.key'}", f"--root-ca-file={p / 'ca.crt'}",
            f"--cluster-signing-cert-file={p / 'ca.crt'}", f"--cluster-signing-key-file={p / 'ca.key'}",
            "--profiling=false",
        ])
        self._spawn("kube-scheduler", [
            str(binary("kube-scheduler")), f"--kubeconfig={sd / 'scheduler.kubeconfig'}",
            "--bind-address=127.0.0.1", f"--secure-port={ports['scheduler']}", "--leader-elect=false",
            "--profiling=false",
        ])
        self._spawn("kwok", [
            str(binary("kwok")), f"--kubeconfig={sd / 'kwok.kubeconfig'}", f"--config={DATA_DIR / 'kwok-stages.yaml'}",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            f"--server-address=127.0.0.1:{ports['kwok']}", "--cidr=10.244.0.0/16", "--node-ip=10.240.0.1",
        ])
        self._spawn("pod-runner", [sys.executable, "-m", "ragtune_local.nodeagent", "--state-dir", str(sd)])
        self._wait("minio", deadline, lambda: _http_ok(f"{info.s3_endpoint}/minio/health/live"))
        self._wait("kube-controller-manager", deadline,
                   lambda: _http_ok(f"https://127.0.0.1:{ports['controller-manager']}/healthz", insecure, "ok")
                   or _exists(admin, "/api/v1/namespaces/default/serviceaccounts/default"))
        self._wait("kube-scheduler", deadline,
                   lambda: _http_ok(f"https://127.0.0.1:{ports['scheduler']}/healthz", insecure, "ok"))
        self._wait("kwok", deadline, lambda: _http_ok(f"http://127.0.0.1:{ports['kwok']}/healthz"))
        self._wait("pod-runner", deadline, lambda: _node_ready(admin, RUNNER_NODE))
        return info

    def _write_pki(self, info: PlatformInfo) -> None:
        ca = pki.CertAuthority(info.pki)
        ca.issue("apiserver", "kube-apiserver", server=True,
                 dns=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                      "kubernetes.default.svc.cluster.local"), ips=("127.0.0.1", pki.SERVICE_IP))
        ca.issue("kubelet", f"system:node:{RUNNER_NODE}", server=True, dns=("localhost", RUNNER_NODE), ips=("127.0.0.1",))
        ca.issue("kueue-webhook", "kueue-webhook", server=True, dns=("localhost",), ips=("127.0.0.1",))
        pki.write_service_account_keys(info.pki)
        kubeconfigs = {"admin": "kubeconfig", "controller-manager": "controller-manager.kubeconfig",
                       "scheduler": "scheduler.kubeconfig", "kwok": "kwok.kubeconfig", "runner": "runner.kubeconfig",
                       "gateway": "gateway.kubeconfig", "kueue": "kueue.kubeconfig",
                       "prometheus": "prometheus.kubeconfig"}
        for ident in pki.CLIENT_IDENTITIES:
            crt, key = ca.issue(ident.stem, ident.user, ident.groups)
            if ident.stem in kubeconfigs:
                pki.write_kubeconfig(self.state_dir / kubeconfigs[ident.stem], info.server, ca.ca_path, crt, key,
                                     ident.user)

    @staticmethod
    def _minio_env(info: PlatformInfo) -> dict[str, str]:
        return {**os.environ, "MINIO_ROOT_USER": info.s3_access_key, "MINIO_ROOT_PASSWORD": info.s3_secret_key,
                "MINIO_BROWSER": "off", "MINIO_UPDATE": "off"}

    def _spawn(self, part: str, argv: list[str], env: Optional[dict[str, str]] = None) -> ProcRef:
        log_path = self.logs_dir / f"{part}.log"
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=env, cwd=self.state_dir)
        self._children.append(proc)
        ref = ProcRef.of(proc.pid)
        (self.procs_dir / f"{part}.pid").write_text(ref.to_text())
        return ref

    def _wait(self, part: str, deadline: float, check: Callable[[], Optional[str]]) -> None:
        """Polls `check` (None = healthy) until the deadline; fails fast if the process died."""
        ref = self._recorded()[part]
        log_path = self.logs_dir / f"{part}.log"
        reason = "no answer yet"
        while True:
            if not ref.alive():
                raise PlatformError(f"{part} exited during startup; log: {log_path}\n--- last lines ---\n{_tail(log_path)}")
            reason = check() or ""
            if not reason:
                self._ready_after[part] = round(time.monotonic() - self._t0, 2)
                self._log(f"  {part} ready ({self._ready_after[part]}s)")
                return
            if time.monotonic() > deadline:
                raise PlatformError(f"{part} was not healthy in time ({reason}); log: {log_path}\n"
                                    f"--- last lines ---\n{_tail(log_path)}")
            time.sleep(0.2)

    # ---- parts on demand (S3 outage tests, the opt-in gateway, Kueue and Prometheus) ------------------------------

    def start_gateway(self, timeout: float = 60.0, build: bool = True,
                      log: Callable[[str], None] = print) -> PlatformInfo:
        """Adds the Gateway API implementation (Traefik, see gateway.py) to the running platform;
        a no-op when it runs already. `info().ports["gateway"]` is the Gateway's HTTP port."""
        return self.start_optional("gateway", timeout, build, log)

    def start_kueue(self, timeout: float = 90.0, build: bool = True,
                    log: Callable[[str], None] = print) -> PlatformInfo:
        """Adds Kueue (see kueue.py) to the running platform; a no-op when it runs already."""
        return self.start_optional("kueue", timeout, build, log)

    def start_optional(self, part: str, timeout: float, build: bool = True,
                       log: Callable[[str], None] = print) -> PlatformInfo:
        """Adds the opt-in `part` (a key of OPTIONAL_PARTS) to the running platform, building its
        binaries first when needed; a no-op when it runs already."""
        if self.running_parts().get(part):
            return self.info()
        ensure_binaries(OPTIONAL_PARTS[part], build=build, log=log)
        self._t0, self._log = time.monotonic(), log
        return self._start_optional(part, timeout)

    def _start_optional(self, part: str, timeout: float) -> PlatformInfo:
        from . import gateway, kueue, prometheus

        return {"gateway": gateway.start, "kueue": kueue.start, "prometheus": prometheus.start}[part](self, timeout)

    def stop_part(self, part: str) -> None:
        ref = self._recorded().get(part)
        if ref is None:
            raise PlatformError(f"{part} is not a recorded part of the platform in {self.state_dir}")
        stop_group(ref, grace=10)

    def start_s3(self, timeout: float = 30.0) -> None:
        """Restarts MinIO on its old port and data dir (after `stop_part("minio")`)."""
        info = self.info()
        if self.running_parts().get("minio"):
            raise PlatformError("minio is already running")
        self._spawn("minio", [str(binary("minio")), "server", str(self.state_dir / "s3"), "--quiet",
                              f"--address=127.0.0.1:{info.ports['s3']}",
                              f"--console-address=127.0.0.1:{info.ports['s3-console']}"], env=self._minio_env(info))
        self._wait("minio", time.monotonic() + timeout, lambda: _http_ok(f"{info.s3_endpoint}/minio/health/live"))

    # ---- down ---------------------------------------------------------------------------------

    def _release_pod_route(self) -> None:
        """Removes the pod IP route this state dir's platform recorded (only that one)."""
        try:
            route = json.loads(self.state_file.read_text()).get("pod_ip_route")
        except (FileNotFoundError, ValueError):
            return
        podnet.release(route)

    def down(self, log: Callable[[str], None] = print) -> list[str]:
        """Stops every recorded process group (pods first); returns the parts that were running."""
        if not self.state_dir.exists():
            return []
        with open(self.state_dir / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PlatformError(f"another `ragtune dev up`/`down` is in progress on {self.state_dir}") from None
            return self._stop_all(log)

    def _stop_all(self, log: Callable[[str], None]) -> list[str]:
        refs = self._recorded()
        stopped = []
        for part in reversed(PART_ORDER):
            ref = refs.get(part)
            if ref is None:
                continue
            if ref.alive() or group_members(ref.pid):
                stopped.append(part)
            stop_group(ref, grace=15 if part == "pod-runner" else 10)
            (self.procs_dir / f"{part}.pid").unlink(missing_ok=True)
        # Backstop: container process groups the runner recorded but could not stop itself.
        for f in (self.state_dir / "runner" / "pgids").glob("*"):
            try:
                stop_group(ProcRef.from_text(f.read_text()), grace=2)
            except (ValueError, FileNotFoundError):
                pass
            f.unlink(missing_ok=True)
        for child in self._children:
            child.poll()  # no zombies left behind in a long-lived caller (pytest)
        self._release_pod_route()  # after the pods: none listens on the range any more
        if stopped:
            log(f"stopped: {', '.join(stopped)}")
        return stopped


def _exists(kube: Kube, path: str) -> Optional[str]:
    try:
        kube.get(path)
        return None
    except ApiError as exc:
        return str(exc)
    except OSError as exc:
        return f"{path}: {exc}"


def _node_ready(kube: Kube, name: str) -> Optional[str]:
    try:
        node = kube.get(f"/api/v1/nodes/{name}")
    except (ApiError, OSError) as exc:
        return f"node {name}: {exc}"
    for cond in node.get("status", {}).get("conditions", []):
        if cond["type"] == "Ready" and cond["status"] == "True":
            return None
    return f"node {name} is not Ready yet"


def _apply_runner_rbac(kube: Kube) -> None:
    """The runner is a kubelet for one node: it may read what its pods reference and write pod/node status."""
    rules = [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "delete"]},
        {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch", "update"]},
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "create", "patch", "update"]},
        {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch", "update"]},
        {"apiGroups": [""], "resources": ["secrets", "configmaps"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["services"], "verbs": ["list"]},
        {"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update", "patch"]},
    ]
    kube.create("/apis/rbac.authorization.k8s.io/v1/clusterroles", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "ragtune:local-runner"}, "rules": rules})
    kube.create("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "ragtune:local-runner"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "ragtune:local-runner"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": pki.RUNNER.user}]})


def ensure_binaries(parts: tuple[str, ...], build: bool = True, log: Callable[[str], None] = print) -> None:
    """Builds missing parts with build.sh (it prints progress); raises naming the part otherwise."""
    missing = [name for name in parts if PARTS[name].missing()]
    if not missing:
        return
    if not build:
        raise PlatformError(f"missing binaries for {', '.join(missing)}: run `ragtune dev build {' '.join(missing)}`")
    log(f"building missing parts: {', '.join(missing)} (first run on this machine; cached afterwards)")
    result = subprocess.run(["bash", str(BUILD_SCRIPT), *missing])
    still = [name for name in missing if PARTS[name].missing()]
    if result.returncode != 0 or still:
        raise PlatformError(f"building {', '.join(still or missing)} failed (exit {result.returncode}); "
                            f"see {PARTS[(still or missing)[0]].dir.parent.parent / 'logs'}/build-<part>.log")
