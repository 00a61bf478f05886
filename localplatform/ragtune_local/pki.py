"""Certificates for the local control plane: one CA, serving certs, client certs, SA keys.

EC P-256 keys everywhere: generating them takes milliseconds, which keeps `dev up` fast.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICE_IP = "10.96.0.1"  # first address of --service-cluster-ip-range (the `kubernetes` Service)
_VALIDITY = dt.timedelta(days=30)


@dataclass(frozen=True)
class Identity:
    """A client identity: file stem, user name (CN) and groups (O)."""

    stem: str
    user: str
    groups: tuple[str, ...] = ()


ADMIN = Identity("admin", "ragtune-admin", ("system:masters",))
CONTROLLER_MANAGER = Identity("controller-manager", "system:kube-controller-manager")
SCHEDULER = Identity("scheduler", "system:kube-scheduler")
# kwok simulates kubelets of many nodes and patches any pod on them: admin rights, test-only part.
KWOK = Identity("kwok", "ragtune:kwok", ("system:masters",))
RUNNER = Identity("runner", "ragtune:local-runner")
APISERVER_KUBELET_CLIENT = Identity("apiserver-kubelet-client", "kube-apiserver-kubelet-client")
GATEWAY = Identity("gateway", "ragtune:local-gateway")  # Traefik (opt-in part), see gateway.py's RBAC
KUEUE = Identity("kueue", "ragtune:local-kueue")  # Kueue (opt-in part), bound to its manager role (kueue.py)
PROMETHEUS = Identity("prometheus", "ragtune:local-prometheus")  # Prometheus (opt-in part): reads pods
CLIENT_IDENTITIES = (ADMIN, CONTROLLER_MANAGER, SCHEDULER, KWOK, RUNNER, APISERVER_KUBELET_CLIENT, GATEWAY, KUEUE,
                     PROMETHEUS)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _name(cn: str, orgs: tuple[str, ...] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    return x509.Name(attrs + [x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class CertAuthority:
    """The CA in `<pki>/ca.{crt,key}`; issues leaf certificates next to it."""

    def __init__(self, pki_dir: Path):
        self.dir = pki_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = _key()
        now = dt.datetime.now(dt.timezone.utc)
        self.cert = (
            x509.CertificateBuilder().subject_name(_name("ragtune-local-ca")).issuer_name(_name("ragtune-local-ca"))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        _write_key(self.dir / "ca.key", self.key)
        (self.dir / "ca.crt").write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    @property
    def ca_path(self) -> Path:
        return self.dir / "ca.crt"

    def issue(self, stem: str, cn: str, orgs: tuple[str, ...] = (), *, server: bool = False,
              dns: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> tuple[Path, Path]:
        """Writes `<stem>.crt` / `<stem>.key`; returns their paths."""
        key = _key()
        now = dt.datetime.now(dt.timezone.utc)
        usage = [ExtendedKeyUsageOID.SERVER_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = (
            x509.CertificateBuilder().subject_name(_name(cn, orgs)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        )
        if dns or ips:
            names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        crt, keyp = self.dir / f"{stem}.crt", self.dir / f"{stem}.key"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(keyp, key)
        return crt, keyp


def write_service_account_keys(pki_dir: Path) -> tuple[Path, Path]:
    """`sa.key` signs ServiceAccount tokens (apiserver + token controller), `sa.pub` verifies them."""
    key = _key()
    _write_key(pki_dir / "sa.key", key)
    pub = pki_dir / "sa.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return pki_dir / "sa.key", pub


def write_kubeconfig(path: Path, server: str, ca: Path, cert: Path, key: Path, user: str) -> Path:
    """A self-contained kubeconfig (certs embedded, so it can be copied anywhere)."""
    b64 = lambda p: base64.b64encode(p.read_bytes()).decode()  # noqa: E731
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "ragtune-local",
        "clusters": [{"name": "ragtune-local", "cluster": {"server": server, "certificate-authority-data": b64(ca)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)}}],
        "contexts": [{"name": "ragtune-local", "context": {"cluster": "ragtune-local", "user": user}}],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path
