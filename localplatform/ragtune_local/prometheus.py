"""The local platform's opt-in Prometheus (`github.com/prometheus/prometheus`, built from its Go module).

`LocalPlatform.start_optional("prometheus")` (`ragtune dev up --with prometheus`, the `prometheus`
test fixture):

1. grants Prometheus' identity (`ragtune:local-prometheus`, a client cert in
   `prometheus.kubeconfig`) what its Kubernetes service discovery watches: pods, read-only;
2. runs Prometheus (build.sh part `prometheus`) with one scrape job, as kube-prometheus would label
   it: every running pod managed by ragtune, on its container port named `http` (the serving port of
   TGI, and of vLLM's sidecar proxy, which forwards `/metrics`), every second, with the labels
   `namespace` and `pod`; its API on 127.0.0.1 (`info().ports["prometheus"]`);
3. waits until `/-/ready` answers.

An AdapterDeployment's `strategy.canary.analysis.prometheus.address` then points at
`http://127.0.0.1:<port>`; the operator's queries go through the same address check as S3
connections (loopback is allowed on the local platform).
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING

from ragtune.api.keys import LABEL_MANAGED_BY, MANAGED_BY

from .kubeclient import Kube
from .paths import PARTS

if TYPE_CHECKING:
    from .platform import LocalPlatform, PlatformInfo

PROMETHEUS_USER = "ragtune:local-prometheus"
ROLE = "ragtune:local-prometheus"
SCRAPE_INTERVAL = "1s"
JOB = "ragtune-servers"


def _meta_label(label: str) -> str:
    """Prometheus' service-discovery name of a pod label (`app.kubernetes.io/managed-by` ->
    `__meta_kubernetes_pod_label_app_kubernetes_io_managed_by`)."""
    return "__meta_kubernetes_pod_label_" + "".join(c if c.isalnum() else "_" for c in label)


def configuration(kubeconfig: str) -> dict:
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL},
        "scrape_configs": [{
            "job_name": JOB,
            "kubernetes_sd_configs": [{"role": "pod", "kubeconfig_file": kubeconfig}],
            "relabel_configs": [
                {"source_labels": [_meta_label(LABEL_MANAGED_BY)], "regex": MANAGED_BY, "action": "keep"},
                {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "http", "action": "keep"},
                {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "Running", "action": "keep"},
                {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            ],
        }],
    }


def setup_objects(kube: Kube) -> None:
    """Prometheus' read access to pods (idempotent)."""
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    kube.create_if_absent(f"{rbac}/clusterroles", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": ROLE},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]})
    kube.create_if_absent(f"{rbac}/clusterrolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": ROLE},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": ROLE},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": PROMETHEUS_USER}]})


def start(platform: "LocalPlatform", timeout: float = 60.0) -> "PlatformInfo":
    """Brings Prometheus up on the running `platform`; records its port in the platform's state."""
    from .platform import _http_ok, free_port

    deadline = time.monotonic() + timeout
    info = platform.info()
    setup_objects(info.admin_client())
    port = free_port()
    info.ports["prometheus"] = port
    config = platform.state_dir / "prometheus.yml"
    config.write_text(json.dumps(configuration(str(platform.state_dir / "prometheus.kubeconfig")), indent=2))
    data = platform.state_dir / "prometheus-data"
    data.mkdir(exist_ok=True)
    # Paths only, never the caller's variables (which may hold credentials), and no KUBERNETES_*.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(platform.state_dir)}
    platform._spawn("prometheus", [str(PARTS["prometheus"].dir / "prometheus"), f"--config.file={config}",
                                   f"--storage.tsdb.path={data}", "--storage.tsdb.retention.time=1d",
                                   f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], env=env)
    platform._wait("prometheus", deadline, lambda: _http_ok(f"http://127.0.0.1:{port}/-/ready"))
    platform._save(info)
    return info
