"""The opt-in gateway part: Traefik (built by build.sh from its Go module) serving Gateway API on
the local platform. It accepts the HTTPRoute the AdapterDeployment controller renders, reports
each generation in the route's status as `traffic.accepted` expects, and routes by hostname.

Requests reaching pods through it: tests/adapterdeployment/test_gateway_canary.py (here the
Services select no pods, so a routed host answers 503)."""

from __future__ import annotations

import http.client
import time

import pytest

from ragtune.adapterdeployment import render, traffic
from ragtune.api.adapterdeployment import AdapterDeploymentSpec
from ragtune.runtime.kube import Kube
from ragtune_local.gateway import GATEWAY_NAME, GATEWAY_NAMESPACE

pytestmark = [pytest.mark.platform, pytest.mark.slow]


def status_code(port: int, host: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/health", headers={"Host": host})
        return conn.getresponse().status
    finally:
        conn.close()


def wait(what, check, timeout=60.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last is True or (isinstance(last, tuple) and last[0]):
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


def test_traefik_accepts_each_route_generation_and_routes_by_host(platform, namespace):
    if platform.local is None:
        pytest.skip("the Traefik gateway is a part of the local platform (RAGTUNE_TEST_KUBECONFIG is set)")
    port = platform.local.start_gateway().ports["gateway"]
    kube = Kube(platform.api_client())
    host = f"{namespace}.gateway.test"
    spec = AdapterDeploymentSpec.model_validate({
        "baseModel": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "12fd25f"},
        "adapters": [{"name": "a", "fineTuneJobRef": {"name": "f"}}],
        "strategy": {"type": "Canary", "canary": {
            "gatewayRef": {"name": GATEWAY_NAME, "namespace": GATEWAY_NAMESPACE}, "hostnames": [host],
            "steps": [{"weight": 10}, {"weight": 50}]}}})
    owner = render.Owner("chat", namespace, "no-owner")  # ownerReferences dropped below: no AdapterDeployment here
    for canary in (False, True):
        svc = render.service(spec, owner, canary=canary)
        svc["metadata"]["ownerReferences"] = []
        kube.create(svc)
    route = traffic.build_route(spec, owner, 10)
    route["metadata"]["ownerReferences"] = []
    kube.create(route)
    wait("generation 1 accepted", lambda: traffic.accepted(kube.get("HTTPRoute", namespace, "chat-route"), 1, spec))

    live = kube.get("HTTPRoute", namespace, "chat-route")
    desired = traffic.build_route(spec, owner, 50)
    desired["metadata"].update(ownerReferences=[], resourceVersion=live["metadata"]["resourceVersion"])
    replaced = kube.replace(desired)
    # Its status still reports generation 1 (Traefik may have answered already by the next read).
    assert replaced["metadata"]["generation"] == 2
    assert traffic.accepted(replaced, 2, spec)[0] is False
    wait("generation 2 accepted", lambda: traffic.accepted(kube.get("HTTPRoute", namespace, "chat-route"), 2, spec))
    assert traffic.live_weights(kube.get("HTTPRoute", namespace, "chat-route")) == {"chat-tgi": 50,
                                                                                  "chat-tgi-canary": 50}
    # The route's host is routed (no endpoints behind it: 503); any other host is not (404).
    wait("the route in Traefik's data plane", lambda: status_code(port, host) == 503)
    assert status_code(port, "unknown.gateway.test") == 404
