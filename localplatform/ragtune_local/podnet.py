"""Pod IPs of the local platform: a private /16 routed to the loopback device.

Pods share the host's network namespace; each gets its own IP that the machine answers on itself.
127/8 would do for sockets, but kube-apiserver refuses loopback addresses in EndpointSlices
(`endpoints: null`), and Gateway implementations (Traefik) route to EndpointSlices. So the
platform claims `10.<n>.0.0/16` with `ip route add local 10.<n>.0.0/16 dev lo table local`: like
127/8, every address of the range is bindable and reachable on this machine only (a `local` route
wins over any route out of the machine, so nothing beyond it becomes reachable through a pod IP).

`n` is drawn from 100-239 (never the service CIDR 10.96/16, kwok's node CIDR 10.244/16 or its node
IP 10.240.0.1) and skipped when any route of any table overlaps the /16; `ip route add` fails when
the route exists, so two platforms starting at once cannot claim the same range. The platform
records its route and removes only that one on `down` (and a stale one left by a killed platform
on the next `up` of the same state dir).

Without `ip` or without CAP_NET_ADMIN the platform falls back to loopback pod IPs (`127.<n>`),
says so in its log, and the gateway part refuses to start (its backends would have no endpoints).
"""

from __future__ import annotations

import ipaddress
import random
import shutil
import subprocess
from typing import Callable, Optional

RESERVED = {96, 240, 244}
"""Second octets of ranges platform.py gives the service CIDR, kwok's node IP and its node CIDR."""


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


def _routed() -> list[ipaddress.IPv4Network]:
    """IPv4 prefixes of every route in every table (the default route excluded)."""
    out = _ip("-4", "-o", "route", "show", "table", "all").stdout
    nets = []
    for line in out.splitlines():
        words = line.split()
        if words and words[0] in ("local", "broadcast", "unicast", "blackhole", "unreachable", "prohibit"):
            words = words[1:]
        try:
            net = ipaddress.ip_network(words[0], strict=False) if words and words[0] != "default" else None
        except ValueError:
            net = None
        if net is not None and net.prefixlen > 0:
            nets.append(net)
    return nets


def claim(log: Callable[[str], None]) -> tuple[str, Optional[str]]:
    """(pod IP prefix `a.b`, the route this platform added or None for the loopback fallback)."""
    fallback = f"127.{random.randint(100, 250)}"
    if shutil.which("ip") is None:
        log(f"  pod IPs: loopback {fallback}.x.y (no `ip` command to route a private range to lo); "
            "EndpointSlices stay empty and the gateway part cannot start")
        return fallback, None
    candidates = [n for n in range(100, 240) if n not in RESERVED]
    random.shuffle(candidates)
    used = _routed()
    for n in candidates:
        net = ipaddress.ip_network(f"10.{n}.0.0/16")
        if any(net.overlaps(u) for u in used):
            continue
        res = _ip("route", "add", "local", str(net), "dev", "lo", "table", "local")
        if res.returncode == 0:
            return f"10.{n}", str(net)
        if "File exists" in res.stderr:  # another platform claimed it a moment ago
            continue
        log(f"  pod IPs: loopback {fallback}.x.y (`ip route add local {net} dev lo table local` failed: "
            f"{res.stderr.strip()}; it needs CAP_NET_ADMIN); EndpointSlices stay empty and the gateway "
            "part cannot start")
        return fallback, None
    log(f"  pod IPs: loopback {fallback}.x.y (every 10.n.0.0/16 candidate is routed already)")
    return fallback, None


def release(route: Optional[str]) -> None:
    """Removes the route `claim` added (no-op for None or a route already gone)."""
    if route and shutil.which("ip"):
        _ip("route", "del", "local", route, "dev", "lo", "table", "local")


def routable(prefix: str) -> bool:
    """Whether pods with this prefix get addresses kube-apiserver accepts in EndpointSlices."""
    return not ipaddress.ip_address(f"{prefix}.0.1").is_loopback
