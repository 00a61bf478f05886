"""Spellings of forbidden S3 endpoints, and ordinary ones, shared by the model, admission and
connection-time tests. Nothing here is ever connected to except loopback spellings."""

from __future__ import annotations

import ipaddress


def ipv4_spellings(address: str) -> list[str]:
    """Every way `inet_aton` (hence boto3/urllib3 through getaddrinfo) reads as `address`, and the
    WHATWG/IDNA variants an HTTP client or a resolver folds to it."""
    a, b, c, d = (int(x) for x in address.split("."))
    n = int(ipaddress.IPv4Address(address))
    return [
        address,
        str(n),                                   # one decimal number
        hex(n), hex(n).upper().replace("X", "x"), "0X" + format(n, "x"),  # one hex number
        "0x" + format(n, "010x"),                 # hex with leading zeros
        "0" + format(n, "o"),                     # one octal number
        f"{a}.{(b << 16) | (c << 8) | d}",        # two parts
        f"{a}.{b}.{(c << 8) | d}",                # three parts
        f"0{a:o}.0{b:o}.0{c:o}.0{d:o}",           # dotted octal
        f"00{a:o}.{b}.{c}.{d}",                   # one octal part with extra zeros
        f"0x{a:x}.0x{b:x}.0x{c:x}.0x{d:x}",       # dotted hex
        f"0x{a:02X}.{b}.0{c:o}.{d}",              # mixed
        f"{address}.",                            # trailing dot
        f"{address}..",                           # two trailing dots
        f"{n}.",                                  # number with trailing dot
        address.translate(str.maketrans("0123456789.", "０１２３４５６７８９．")),  # full-width
        address.replace(".", "\u3002"),           # ideographic full stops
        "%" + "%".join(f"{ord(ch):02x}" for ch in address),  # percent-encoded
    ]


def ipv6_spellings_of_v4(address: str) -> list[str]:
    """IPv6 literals that carry the IPv4 `address` (the kernel or a gateway reaches it)."""
    v4 = ipaddress.IPv4Address(address)
    hi, lo = int(v4) >> 16, int(v4) & 0xFFFF
    return [
        f"[::ffff:{address}]", f"[::FFFF:{address}]", f"[::ffff:{hi:x}:{lo:x}]",
        f"[0:0:0:0:0:ffff:{hi:x}:{lo:x}]", f"[0000:0000:0000:0000:0000:ffff:{hi:04x}:{lo:04x}]",
        f"[::ffff:0:{hi:x}:{lo:x}]",             # SIIT
        f"[::{address}]", f"[::{hi:x}:{lo:x}]",  # IPv4-compatible
        f"[64:ff9b::{hi:x}:{lo:x}]", f"[64:ff9b::{address}]", f"[64:ff9b:1::{hi:x}:{lo:x}]",  # NAT64
        f"[2002:{hi:x}:{lo:x}::1]",              # 6to4
    ]


METADATA_V6 = [
    "[fd00:ec2::254]", "[FD00:EC2::254]", "[fd00:0ec2::254]", "[fd00:ec2:0:0:0:0:0:254]",
    "[fd00:ec2::0254]", "[fd00:ec2:0::254]", "[fd00:ec2::0:254]", "[fd00:0ec2:0000:0000:0000:0000:0000:0254]",
    "[fd00:ec2::254%25eth0]", "[fd00:ec2::254%eth0]",
]
LINK_LOCAL_V6 = ["[fe80::1]", "[FE80::1]", "[fe80::a9fe:a9fe]", "[fe80:0:0:0:0:0:0:1]", "[febf::1]", "[fe9a::1]",
                 "[fe80::1%25eth0]", "[fe80::1%eth0]"]
METADATA_NAMES = [
    "metadata.google.internal", "METADATA.GOOGLE.INTERNAL", "Metadata.Google.Internal", "metadata.google.internal.",
    "metadata.google.internal..", "metadata", "METADATA", "metadata.", "metadata.goog", "instance-data",
    "instance-data.ec2.internal", "metadata.tencentyun.com", "x.metadata.google.internal", "metadata.google.internal%2e",
    "%6detadata.google.internal", "ｍｅｔａｄａｔａ.google.internal",
]
UNSPECIFIED = ["0.0.0.0", "0", "0x0", "00", "0.0", "0.0.0", "[::]", "[0:0:0:0:0:0:0:0]", "[::0]"]
OTHER_METADATA_V4 = ["169.254.170.2", "100.100.100.200", "192.0.0.192", "168.63.129.16", "169.254.0.23",
                     "169.254.0.1", "169.254.255.255"]

# Wrapping: the same host in other URL shapes (userinfo and several '@', ports, paths, trailing junk).
def wrappings(host: str) -> list[str]:
    return [
        f"http://{host}", f"https://{host}/", f"http://{host}:80/latest/meta-data/", f"http://user:pass@{host}/",
        f"http://a@b@{host}/", f"http://good.example.com@{host}/", f"http://good.example.com\\@{host}/",
        f"http://{host}#@good.example.com", f"http://{host}?@good.example.com", f"http://{host}/ ",
        f" http://{host}", f"http://{host}\n", f"http://{host}\t/",
    ]


def forbidden_endpoints() -> list[str]:
    """URLs whose host, read by some HTTP client, is link-local, unspecified or cloud metadata."""
    hosts = (ipv4_spellings("169.254.169.254") + ipv6_spellings_of_v4("169.254.169.254") + METADATA_V6
             + LINK_LOCAL_V6 + METADATA_NAMES + UNSPECIFIED)
    for other in OTHER_METADATA_V4:
        hosts += ipv4_spellings(other)[:8]
    urls = [f"http://{h}" for h in hosts] + [f"http://{h}:9000/" for h in hosts[:40]]
    for h in ("169.254.169.254", "[fd00:ec2::254]", "metadata.google.internal", "2852039166"):
        urls += wrappings(h)
    return list(dict.fromkeys(urls))


# Refused at admission though their host is not forbidden (plain spelling is required), or that
# have no usable host at all.
MALFORMED = [
    "http://", "http:///", "http:///latest", "http://:9000", "http://@", "http://user@", "http://?", "http://#",
    "https://:443/", "ftp://s3.example.com", "file:///etc/passwd", "s3://bucket", "//s3.example.com",
    "HTTP://s3.example.com", "http//s3.example.com", "http://s3.example.com:99999999", "http://s3 .example.com",
    "http://user:secret@s3.example.com/",    # credentials belong in the Secret
    "http://s3.example.com?x=1", "http://s3.example.com#frag",
    "http://bücher.example", "http://s3.example.com.",
    "http://[::1%25lo]:9000", "http://[fd00::1]]", "http://[::ffff:10.0.0.1]",
]
# Loopback spellings: refused at admission when not plain (numeric forms), refused at connection
# unless the operator allows loopback. These are the only ones a test connects to.
LOOPBACK_ODD = ["2130706433", "0x7f000001", "0177.0.0.1", "127.1", "[::ffff:127.0.0.1]", "127.0.1", "0x7f.1",
                "017700000001", "[::ffff:7f00:1]", "[::127.0.0.1]", "127.0.0.1."]
LOOPBACK_PLAIN = ["127.0.0.1", "127.0.0.2", "[::1]", "[0:0:0:0:0:0:0:1]", "localhost", "LOCALHOST"]

ORDINARY = [
    "http://127.0.0.1:9000", "http://localhost:9000", "http://[::1]:9000", "https://s3.eu-central-1.amazonaws.com",
    "https://s3.amazonaws.com/", "http://minio.storage.svc:9000", "http://minio.storage.svc.cluster.local:9000/",
    "http://10.0.0.5:9000", "http://192.168.1.10:9000", "http://172.16.0.1", "https://storage.googleapis.com",
    "https://abc123.r2.cloudflarestorage.com", "http://[2001:db8::1]:9000", "http://[fd12:3456::10]:9000",
    "http://metadata-store.internal:9000", "http://minio-metadata.svc:9000", "http://s3.xn--fiqs8s",
    "http://1.2.3.4", "http://169.253.169.254", "http://169.255.0.1", "http://100.100.100.201",
    "http://s3-0x10.example.com", "http://0xdead.example.com", "http://1e100.net",
]
