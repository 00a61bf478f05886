"""Pod IP ranges of the local platform (podnet.py): a real route to lo claimed and released, the
loopback fallback without CAP_NET_ADMIN (dropped for real with setpriv), and the gateway's refusal
of loopback pod IPs. No platform started."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys

import pytest

from ragtune_local import gateway, podnet
from ragtune_local.platform import LocalPlatform, PlatformError, PlatformInfo

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="adding a route needs `ip` and CAP_NET_ADMIN")


def _local_routes() -> str:
    return subprocess.run(["ip", "route", "show", "table", "local"], capture_output=True, text=True).stdout


@needs_root
def test_claim_adds_a_local_route_that_serves_the_range_and_release_removes_only_it():
    before = _local_routes()
    prefix, route = podnet.claim(log=print)
    try:
        assert route == f"{prefix}.0.0/16" and f"local {route} dev lo" in _local_routes()
        n = int(prefix.split(".")[1])
        assert 100 <= n < 240 and n not in podnet.RESERVED
        net = ipaddress.ip_network(route)
        assert not any(net.overlaps(other) for other in podnet._routed() if other != net)
        # Any address of the range is bindable and reachable here, as on 127/8.
        probe = ("import socket;s=socket.socket();s.bind((%r,0));s.listen();"
                 "c=socket.create_connection(s.getsockname());print(c.getpeername()[0])") % f"{prefix}.3.7"
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=10)
        assert out.stdout.strip() == f"{prefix}.3.7", out.stderr
        # A second claim (another platform) never gets the same range.
        prefix2, route2 = podnet.claim(log=print)
        podnet.release(route2)
        assert route2 != route
    finally:
        podnet.release(route)
    assert f"local {route} " not in _local_routes()
    assert _local_routes() == before


@needs_root
def test_without_cap_net_admin_pod_ips_fall_back_to_loopback_with_a_log_line():
    code = ("import json;from ragtune_local import podnet;lines=[];"
            "print(json.dumps([podnet.claim(lines.append), lines]))")
    out = subprocess.run(["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin",
                          sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    (prefix, route), lines = json.loads(out.stdout)
    assert route is None and prefix.startswith("127.") and not podnet.routable(prefix)
    assert len(lines) == 1 and "CAP_NET_ADMIN" in lines[0] and "gateway part cannot start" in lines[0]


def test_the_gateway_refuses_loopback_pod_ips(tmp_path):
    local = LocalPlatform(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    local._save(PlatformInfo(state_dir=str(tmp_path), kubeconfig="k", server="https://127.0.0.1:1",
                             s3_endpoint="http://127.0.0.1:2", s3_access_key="a", s3_secret_key="b",
                             pod_ip_prefix="127.150"))
    with pytest.raises(PlatformError, match=r"loopback \(127\.150\.x\.y\).*CAP_NET_ADMIN"):
        gateway.start(local, timeout=1)
    assert podnet.routable("10.150")


def test_a_state_file_without_the_route_field_still_loads(tmp_path):
    """state.json written before pod_ip_route existed (a platform started by an older checkout)."""
    (tmp_path / "state.json").write_text(json.dumps({
        "state_dir": str(tmp_path), "kubeconfig": "k", "server": "s", "s3_endpoint": "e", "s3_access_key": "a",
        "s3_secret_key": "b", "pod_ip_prefix": "127.120", "ports": {}}))
    info = LocalPlatform(tmp_path).info()
    assert info.pod_ip_route is None
    LocalPlatform(tmp_path)._release_pod_route()  # nothing recorded: nothing removed, no error
