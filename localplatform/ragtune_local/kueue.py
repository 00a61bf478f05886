"""The local platform's opt-in job queueing: Kueue (`sigs.k8s.io/kueue`), built from its Go module.

`LocalPlatform.start_kueue()` (`ragtune dev up --with kueue`, the `kueue` test fixture):

1. installs Kueue's CRDs (build.sh part `kueuecrds`, taken from the same module);
2. binds Kueue's own manager ClusterRole (from the module) to Kueue's identity
   (`ragtune:local-kueue`, a client cert in `kueue.kubeconfig`);
3. runs the `kueue` binary (build.sh part `kueue`) with a configuration for a cluster of one
   API server: only the `batch/job` integration, Jobs without a queue label left alone, no leader
   election, certificates from the platform's CA instead of Kueue's in-cluster cert rotation (its
   webhooks are not registered with the API server: ragtune creates queued Jobs suspended itself,
   which is what Kueue's Job webhook would do), and no visibility API server. Without its cert
   rotation Kueue reads a metrics certificate from the fixed path /etc/kueue/metrics/certs, so it
   runs in its own mount namespace (`nsexec.py`, as pods do) whose /etc is a directory of the
   platform's state holding that certificate (and a copy of /etc/hosts): nothing is written to the
   machine's /etc;
4. waits until Kueue's readiness probe answers.

What a test or user then creates is plain Kueue: a ResourceFlavor, a ClusterQueue with quota and
a LocalQueue per namespace (`queue_objects` builds the smallest such set).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from typing import TYPE_CHECKING

from . import crds
from .kubeclient import Kube
from .paths import PARTS
from .podworker import NSEXEC

if TYPE_CHECKING:
    from .platform import LocalPlatform, PlatformInfo

KUEUE_USER = "ragtune:local-kueue"
KUEUE_NAMESPACE = "kueue-system"
KUEUE_API = "/apis/kueue.x-k8s.io/v1beta2"
MANAGER_ROLE = "ragtune:local-kueue-manager"
CRD_NAMES = tuple(f"{plural}.kueue.x-k8s.io"
                  for plural in ("resourceflavors", "clusterqueues", "localqueues", "workloads"))


def crds_file():
    return PARTS["kueuecrds"].dir / "crds.yaml"


def configuration(health_port: int, webhook_port: int, cert_dir: str) -> dict:
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
        "namespace": KUEUE_NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": cert_dir},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": ["batch/job"]},
    }


def queue_objects(cluster_queue: str, local_queue: str, namespace: str, quota: dict[str, str],
                  flavor: str = "default") -> list[tuple[str, dict]]:
    """(collection path, object) for a ResourceFlavor, a ClusterQueue admitting `quota` (e.g.
    {"cpu": "1", "memory": "1Gi"}) from every namespace, and a LocalQueue pointing at it."""
    return [
        (f"{KUEUE_API}/resourceflavors", {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor",
                                          "metadata": {"name": flavor}}),
        (f"{KUEUE_API}/clusterqueues", {
            "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": cluster_queue},
            "spec": {"namespaceSelector": {}, "resourceGroups": [{
                "coveredResources": sorted(quota),
                "flavors": [{"name": flavor, "resources": [
                    {"name": r, "nominalQuota": q} for r, q in sorted(quota.items())]}]}]}}),
        (f"{KUEUE_API}/namespaces/{namespace}/localqueues", {
            "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
            "metadata": {"name": local_queue, "namespace": namespace}, "spec": {"clusterQueue": cluster_queue}}),
    ]


def _role(file: str, **metadata: str) -> dict:
    import yaml

    role = yaml.safe_load((PARTS["kueuecrds"].dir / file).read_text())
    return {**role, "metadata": {"name": MANAGER_ROLE, **metadata}}


def _binding(kind: str, **metadata: str) -> dict:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": f"{kind}Binding",
            "metadata": {"name": MANAGER_ROLE, **metadata},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": MANAGER_ROLE},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": KUEUE_USER}]}


def setup_objects(kube: Kube) -> None:
    """Kueue's namespace and its identity's permissions, as Kueue's own manifests grant them: its
    manager ClusterRole, and Secrets in its namespace only (idempotent)."""
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    kube.create_if_absent("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                 "metadata": {"name": KUEUE_NAMESPACE}})
    kube.create_if_absent(f"{rbac}/clusterroles", _role("manager-role.yaml"))
    kube.create_if_absent(f"{rbac}/clusterrolebindings", _binding("ClusterRole"))
    ns = f"{rbac}/namespaces/{KUEUE_NAMESPACE}"
    kube.create_if_absent(f"{ns}/roles", _role("manager-secrets-role.yaml", namespace=KUEUE_NAMESPACE))
    kube.create_if_absent(f"{ns}/rolebindings", _binding("Role", namespace=KUEUE_NAMESPACE))


def start(platform: "LocalPlatform", timeout: float = 90.0) -> "PlatformInfo":
    """Brings Kueue up on the running `platform`; records its ports in the platform's state."""
    from .platform import _http_ok, free_port

    deadline = time.monotonic() + timeout
    info = platform.info()
    admin = info.admin_client()
    crds.install(info.kubeconfig, admin, crds_file(), CRD_NAMES, deadline)
    setup_objects(admin)
    cert_dir = platform.state_dir / "kueue-certs"  # the names controller-runtime's webhook server reads
    etc = platform.state_dir / "kueue-etc"  # Kueue's /etc (see above)
    metrics_certs = etc / "kueue" / "metrics" / "certs"
    for d in (cert_dir, metrics_certs):
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(info.pki / "kueue-webhook.crt", d / "tls.crt")
        shutil.copy(info.pki / "kueue-webhook.key", d / "tls.key")
    if os.path.exists("/etc/hosts"):
        shutil.copy("/etc/hosts", etc / "hosts")
    health, webhook = free_port(), free_port()
    info.ports.update({"kueue-health": health, "kueue-webhook": webhook})
    config = platform.state_dir / "kueue-config.yaml"
    config.write_text(json.dumps(configuration(health, webhook, str(cert_dir)), indent=2))  # JSON is YAML
    # Kueue's whole environment, written to a file: paths only, never the caller's variables (which
    # may hold credentials), and no KUBERNETES_* (it must not think it runs in a cluster).
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(platform.state_dir),
           "KUBECONFIG": str(platform.state_dir / "kueue.kubeconfig")}
    exec_spec = platform.state_dir / "kueue-exec.json"
    exec_spec.write_text(json.dumps({
        "hostname": socket.gethostname(), "mounts": [{"source": str(etc), "target": "/etc", "readOnly": True}],
        "cwd": str(platform.state_dir), "env": env,
        "argv": [str(PARTS["kueue"].dir / "kueue"), f"--config={config}",
                 "--feature-gates=VisibilityOnDemand=false", "--zap-log-level=info"]}))
    platform._spawn("kueue", ["/bin/sh", "-c", 'exec "$0" -S "$1" < "$2"', sys.executable, str(NSEXEC),
                              str(exec_spec)], env=env)
    platform._wait("kueue", deadline, lambda: _http_ok(f"http://127.0.0.1:{health}/readyz"))
    platform._save(info)
    return info
