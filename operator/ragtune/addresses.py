"""Which network addresses an S3 client in a ragtune pod may talk to: host normalisation and
address classification, in one place, for the API models (admission) and for the storage
client (connection time). Pure Python: no torch, no boto3.

An attacker who controls `spec.s3.endpoint` controls where a pod sends requests signed with
the pod's S3 credentials, and what the pod reads back as "data". The forbidden classes:

- `cloud-metadata`: instance metadata services hand out cloud credentials to whoever can reach
  them. Always refused. The list (`METADATA_ADDRESSES`, `METADATA_HOSTS`): 169.254.169.254
  (AWS, GCP, Azure, OpenStack, DigitalOcean, Hetzner, ...), 169.254.170.2 (AWS ECS task
  credentials), fd00:ec2::254 (AWS IPv6), 100.100.100.200 (Alibaba Cloud), 192.0.0.192
  (Oracle Cloud), 168.63.129.16 (Azure WireServer), 169.254.0.23 (Tencent Cloud); the names
  `metadata.google.internal`, `metadata.goog`, `metadata`, `instance-data`,
  `instance-data.ec2.internal`, `metadata.tencentyun.com` and their subdomains.
- `link-local`: 169.254.0.0/16 and fe80::/10 (where most metadata services live). Always refused.
- `unspecified`: 0.0.0.0/8 and `::` (a connection to them reaches the pod itself). Always refused.
- `loopback`: 127.0.0.0/8, ::1, `localhost`: the pod itself (sidecars, admin ports). Refused at
  connection time unless the operator's configuration allows it (the local platform's MinIO is
  on loopback); never refused at admission.

IPv6 addresses that embed an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible
`::a.b.c.d`, SIIT `::ffff:0:a.b.c.d`, NAT64 `64:ff9b::/96` and `64:ff9b:1::/48`, 6to4
`2002::/16`, Teredo `2001::/32`) are classified by the IPv4 address they carry (the worst one).

Host spellings are normalised the way HTTP clients and the C resolver read them: case, trailing
dots, brackets, zone ids (`%eth0`, `%25eth0`), percent-encoding, IDNA (full-width digits and
ideographic full stops fold to ASCII) and the `inet_aton` forms of IPv4 (`2130706433`,
`0x7f000001`, `0177.0.0.1`, `127.1`, `127.0.1`).
"""

from __future__ import annotations

import ipaddress
import re
from enum import Enum
from typing import Optional, Union
from urllib.parse import unquote

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class AddressClass(str, Enum):
    METADATA = "cloud-metadata"
    LINK_LOCAL = "link-local"
    UNSPECIFIED = "unspecified"
    LOOPBACK = "loopback"
    ORDINARY = "ordinary"
    """Everything else, private ranges included (in-cluster S3 lives there)."""


ALWAYS_FORBIDDEN = frozenset({AddressClass.METADATA, AddressClass.LINK_LOCAL, AddressClass.UNSPECIFIED})

METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "169.254.0.23", "fd00:ec2::254",
    "100.100.100.200", "192.0.0.192", "168.63.129.16",
))
METADATA_HOSTS = ("metadata.google.internal", "metadata.goog", "metadata", "instance-data",
                  "instance-data.ec2.internal", "metadata.tencentyun.com")

_LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))
_UNSPECIFIED_V4 = ipaddress.ip_network("0.0.0.0/8")
# IPv6 prefixes whose low 32 bits are an IPv4 address a gateway or the kernel will reach.
_EMBEDDING_V4_IN_LOW_BITS = tuple(ipaddress.ip_network(n) for n in (
    "::/96", "::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48"))

_RANKING = [AddressClass.METADATA, AddressClass.LINK_LOCAL, AddressClass.UNSPECIFIED,
            AddressClass.LOOPBACK, AddressClass.ORDINARY]


def _worst(classes) -> AddressClass:
    return min(classes, key=_RANKING.index)


class HostError(ValueError):
    """A host that no client would read unambiguously (empty, control characters, bad IDNA)."""


# --- IPv4 the way inet_aton reads it ---------------------------------------------------------

_AT_PART = re.compile(r"0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*")


def parse_inet_aton(text: str) -> Optional[ipaddress.IPv4Address]:
    """`inet_aton` semantics (what getaddrinfo, hence urllib3/boto3, accepts as a numeric
    host): 1-4 dot-separated parts, each decimal, `0x` hex or `0` octal; the last part fills the
    remaining bytes. None when `text` is not such a number."""
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(_AT_PART.fullmatch(p) for p in parts):
        return None
    values = []
    for p in parts:
        if p[:2] in ("0x", "0X"):
            values.append(int(p[2:] or "0", 16))
        elif len(p) > 1 and p[0] == "0":
            values.append(int(p, 8))
        else:
            values.append(int(p))
    *head, last = values
    if any(v > 255 for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    number = last
    for i, v in enumerate(head):
        number |= v << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def looks_numeric(host: str) -> bool:
    """A host whose last label is a number (decimal or 0x hex) is read as IPv4 by WHATWG URL
    parsers and the C resolver, never looked up as a name."""
    last = host.rstrip(".").rsplit(".", 1)[-1]
    return bool(re.fullmatch(r"[0-9]+|0[xX][0-9a-fA-F]*", last))


# --- Hosts -----------------------------------------------------------------------------------


def normalise_host(raw: str) -> str:
    """The host a client connects to, in canonical text: lower case, no brackets, no zone id, no
    trailing dots, IDNA folded to ASCII, an IP literal in its canonical form."""
    host = unquote(raw).strip()
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in host):
        raise HostError(f"host {raw!r} contains whitespace or control characters")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host.split("%", 1)[0] if ":" in host else host  # IPv6 zone id: fe80::1%eth0
    if not host.isascii():
        try:
            # IDNA 2003 nameprep (NFKC): full-width digits and U+3002 dots fold to ASCII.
            host = ".".join(host.replace("\u3002", ".").replace("\uff0e", ".").replace("\uff61", ".")
                            .encode("idna").decode("ascii").split("."))
        except UnicodeError as exc:
            raise HostError(f"host {raw!r} is not a valid internationalised name ({exc})") from None
    host = host.lower().rstrip(".")
    if not host:
        raise HostError(f"host {raw!r} is empty")
    ip = host_ip(host)
    return str(ip) if ip is not None else host


def host_ip(host: str) -> Optional[IPAddress]:
    """The IP address a host *literal* denotes in any spelling, None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    return parse_inet_aton(host.rstrip("."))


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries (mapped, compatible, SIIT, NAT64, 6to4, Teredo)."""
    out = []
    if ip.ipv4_mapped:
        out.append(ip.ipv4_mapped)
    if any(ip in net for net in _EMBEDDING_V4_IN_LOW_BITS) and ip not in (
            ipaddress.IPv6Address("::"), ipaddress.IPv6Address("::1")):
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour:
        out.append(ip.sixtofour)
    if ip.teredo:
        out.extend(ip.teredo)
    return out


def classify_ip(ip: IPAddress) -> AddressClass:
    """The class of one address; IPv6 forms embedding IPv4 get the worst of both."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = [classify_ip(v4) for v4 in embedded_ipv4(ip)]
        if ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
        own = _classify_plain(ip)
        return _worst([own, *inner])
    return _classify_plain(ip)


def _classify_plain(ip: IPAddress) -> AddressClass:
    if ip in METADATA_ADDRESSES:
        return AddressClass.METADATA
    if any(ip in net for net in _LINK_LOCAL if net.version == ip.version):
        return AddressClass.LINK_LOCAL
    if ip.is_unspecified or (ip.version == 4 and ip in _UNSPECIFIED_V4):
        return AddressClass.UNSPECIFIED
    if ip.is_loopback:
        return AddressClass.LOOPBACK
    return AddressClass.ORDINARY


def classify_host(raw: str) -> tuple[str, AddressClass]:
    """(normalised host, class) of a URL host as written. A DNS name other than the metadata and
    localhost names is `ordinary` here: only resolution at connection time can tell more."""
    host = normalise_host(raw)
    ip = host_ip(host)
    if ip is not None:
        return host, classify_ip(ip)
    if any(host == name or host.endswith("." + name) for name in METADATA_HOSTS):
        return host, AddressClass.METADATA
    if host == "localhost" or host.endswith(".localhost"):
        return host, AddressClass.LOOPBACK
    return host, AddressClass.ORDINARY


def url_authority_host(url: str) -> str:
    """The host part of an http(s) URL's authority as urllib3 splits it: the authority ends at the
    first `/`, `\\`, `?` or `#`; the host follows the *last* `@`; a port follows the last `:`
    outside brackets."""
    rest = url.split("://", 1)[1] if "://" in url else url
    authority = re.split(r"[/\\?#]", rest, maxsplit=1)[0]
    host = authority.rpartition("@")[2]
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rpartition(":")[0] if ":" in host else host


# --- Connection-time policy --------------------------------------------------------------------

ALLOW_LOOPBACK_ENV = "RAGTUNE_S3_ALLOW_LOOPBACK"
"""Set to `true` in a pod's environment (the operator renders it from its own setting of the same
name) to let its S3 client connect to loopback addresses; the local platform's MinIO needs it."""

_TRUE = {"1", "true", "yes", "on"}


class AddressPolicy:
    """Which resolved peer addresses an S3 client may connect to."""

    def __init__(self, allow_loopback: bool = False):
        self.allow_loopback = allow_loopback
        self.forbidden = ALWAYS_FORBIDDEN | (frozenset() if allow_loopback else {AddressClass.LOOPBACK})

    @classmethod
    def from_env(cls, env=None) -> "AddressPolicy":
        import os

        env = os.environ if env is None else env
        raw = env.get(ALLOW_LOOPBACK_ENV, "").strip().lower()
        if raw and raw not in _TRUE | {"0", "false", "no", "off"}:
            raise ValueError(f"{ALLOW_LOOPBACK_ENV}={raw!r} must be true or false")
        return cls(allow_loopback=raw in _TRUE)

    def refusal(self, address: str) -> Optional[AddressClass]:
        """The forbidden class of a resolved address (as getaddrinfo/getpeername give it), or None."""
        kind = classify_ip(ipaddress.ip_address(address.split("%", 1)[0]))
        return kind if kind in self.forbidden else None

    def __repr__(self) -> str:
        return f"AddressPolicy(allow_loopback={self.allow_loopback})"
