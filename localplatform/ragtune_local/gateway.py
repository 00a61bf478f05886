"""The local platform's opt-in Gateway API implementation: Traefik's `kubernetesgateway` provider.

`LocalPlatform.start_gateway()` (`ragtune dev up --with gateway`, the `gateway` test fixture):

1. installs Gateway API's standard-channel CRDs (build.sh part `gatewayapi`, taken from the
   `sigs.k8s.io/gateway-api` module at the version Traefik's go.mod requires);
2. grants Traefik's identity (`ragtune:local-gateway`, a client cert in `gateway.kubeconfig`)
   the read access its provider watches with, and status updates on Gateway API objects;
3. creates GatewayClass `traefik` and Gateway `ragtune-gateway/local` (one HTTP listener whose
   port is Traefik's `web` entry point, routes from every namespace);
4. runs Traefik (build.sh part `traefik`) against the local kube-apiserver, and waits until its
   ping answers and the Gateway is Programmed.

Traefik routes to the EndpointSlices' addresses (the pod IPs, a private /16 routed to lo: see
podnet.py), not to Service IPs: no kube-proxy is needed. Its data plane listens on 127.0.0.1 only.
With loopback pod IPs (the platform could not add its route) the EndpointSlices stay empty, so
`start` refuses instead of serving 503s.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Optional

from . import crds
from .kubeclient import ApiError, Kube
from .paths import PARTS

if TYPE_CHECKING:
    from .platform import LocalPlatform, PlatformInfo

GATEWAY_CLASS = "traefik"
CONTROLLER_NAME = "traefik.io/gateway-controller"
GATEWAY_NAMESPACE = "ragtune-gateway"
GATEWAY_NAME = "local"
LISTENER = "http"
GATEWAY_USER = "ragtune:local-gateway"
GATEWAY_API = "/apis/gateway.networking.k8s.io/v1"
CRD_NAMES = tuple(f"{plural}.gateway.networking.k8s.io"
                  for plural in ("gatewayclasses", "gateways", "httproutes", "referencegrants"))

# What Traefik's provider watches (its informers), least privilege otherwise: it only writes status.
RBAC_RULES = [
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["services", "secrets", "configmaps"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
    {"apiGroups": ["gateway.networking.k8s.io"],
     "resources": ["gatewayclasses", "gateways", "httproutes", "grpcroutes", "referencegrants", "backendtlspolicies"],
     "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["gateway.networking.k8s.io"],
     "resources": ["gatewayclasses/status", "gateways/status", "httproutes/status", "grpcroutes/status",
                   "backendtlspolicies/status"],
     "verbs": ["update"]},
]


def crds_file():
    return PARTS["gatewayapi"].dir / "standard-crds.yaml"


def traefik_argv(web_port: int, ping_port: int) -> list[str]:
    return [
        str(PARTS["traefik"].dir / "traefik"),
        f"--entryPoints.web.address=127.0.0.1:{web_port}",
        f"--entryPoints.ping.address=127.0.0.1:{ping_port}",
        "--ping=true", "--ping.entryPoint=ping",
        "--providers.kubernetesgateway=true",
        "--providers.kubernetesgateway.statusAddress.ip=127.0.0.1",
        # A weight change should reach the data plane quickly (the operator waits for the route's
        # status, then a settle time): no extra batching on top of the informers.
        "--providers.kubernetesgateway.throttleDuration=0s", "--providers.providersThrottleDuration=0s",
        "--global.checkNewVersion=false", "--global.sendAnonymousUsage=false",
        "--log.level=INFO",
    ]


def setup_objects(kube: Kube, web_port: int) -> None:
    """RBAC for Traefik's identity, the GatewayClass and the shared Gateway (idempotent)."""
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    kube.create_if_absent(f"{rbac}/clusterroles", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "ragtune:local-gateway"}, "rules": RBAC_RULES})
    kube.create_if_absent(f"{rbac}/clusterrolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "ragtune:local-gateway"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "ragtune:local-gateway"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": GATEWAY_USER}]})
    kube.create_if_absent(f"{GATEWAY_API}/gatewayclasses", {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
        "metadata": {"name": GATEWAY_CLASS}, "spec": {"controllerName": CONTROLLER_NAME}})
    kube.create_if_absent("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                 "metadata": {"name": GATEWAY_NAMESPACE}})
    kube.create_if_absent(f"{GATEWAY_API}/namespaces/{GATEWAY_NAMESPACE}/gateways", {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": GATEWAY_NAME, "namespace": GATEWAY_NAMESPACE},
        "spec": {"gatewayClassName": GATEWAY_CLASS, "listeners": [{
            "name": LISTENER, "protocol": "HTTP", "port": web_port,
            "allowedRoutes": {"namespaces": {"from": "All"}}}]}})


def gateway_programmed(kube: Kube) -> Optional[str]:
    """None once Traefik accepted the Gateway and programmed its listener."""
    try:
        gw = kube.get(f"{GATEWAY_API}/namespaces/{GATEWAY_NAMESPACE}/gateways/{GATEWAY_NAME}")
    except (ApiError, OSError) as err:
        return f"Gateway {GATEWAY_NAMESPACE}/{GATEWAY_NAME}: {err}"
    conds = {c.get("type"): c for c in (gw.get("status") or {}).get("conditions") or []}
    prog = conds.get("Programmed") or {}
    if prog.get("status") == "True":
        return None
    return f"Gateway {GATEWAY_NAMESPACE}/{GATEWAY_NAME} not Programmed yet ({prog.get('message') or 'no status'})"


def start(platform: "LocalPlatform", timeout: float = 60.0) -> "PlatformInfo":
    """Brings the gateway up on the running `platform`; records its ports in the platform's state."""
    from .platform import PlatformError, _http_ok, free_port
    from .podnet import routable

    deadline = time.monotonic() + timeout
    info = platform.info()
    if not routable(info.pod_ip_prefix):
        raise PlatformError(
            f"the gateway needs pod IPs kube-apiserver accepts in EndpointSlices, but this platform's are "
            f"loopback ({info.pod_ip_prefix}.x.y): its route for a private range to lo could not be added "
            f"(see the pod IPs line of `ragtune dev up`; it needs `ip` and CAP_NET_ADMIN)")
    admin = info.admin_client()
    crds.install(info.kubeconfig, admin, crds_file(), CRD_NAMES, deadline)
    web, ping = free_port(), free_port()
    info.ports.update({"gateway": web, "gateway-ping": ping})
    setup_objects(admin, web)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}  # not "in-cluster"
    env["KUBECONFIG"] = str(platform.state_dir / "gateway.kubeconfig")
    platform._spawn("gateway", traefik_argv(web, ping), env=env)
    platform._wait("gateway", deadline, lambda: _http_ok(f"http://127.0.0.1:{ping}/ping", expect="OK")
                   or gateway_programmed(admin))
    platform._save(info)
    return info
