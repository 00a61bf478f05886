"""The handle tests and the demo use: a cluster (local platform or any KUBECONFIG) plus S3.

Selection (see `open_platform`):
- `RAGTUNE_TEST_KUBECONFIG=/path`: use that cluster; S3 from `RAGTUNE_TEST_S3_ENDPOINT`,
  `RAGTUNE_TEST_S3_ACCESS_KEY`, `RAGTUNE_TEST_S3_SECRET_KEY` (kwok GPU nodes unavailable).
- `RAGTUNE_TEST_PLATFORM=reuse`: the platform of `ragtune dev up` (started if needed, left running).
- otherwise: a private platform for this test session, in its own state dir, stopped afterwards.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from .paths import binary, cache_dir, default_state_dir, kubectl_binary
from .platform import LocalPlatform, PlatformError

S3_SECRET_NAME = "s3-credentials"


class CommandError(subprocess.CalledProcessError):
    """A failed kubectl/helm call whose message carries stderr (pytest shows it on failure)."""

    def __str__(self) -> str:
        return f"{' '.join(self.cmd)} exited {self.returncode}: {(self.stderr or '').strip()[-2000:]}"


@dataclass
class PlatformHandle:
    kubeconfig: str
    s3_endpoint: Optional[str]
    s3_access_key: Optional[str]
    s3_secret_key: Optional[str]
    local: Optional[LocalPlatform] = None
    """None when the tests target an external cluster."""

    # ---- clients --------------------------------------------------------------------------

    def kubectl(self, *args: str, input: Optional[str] = None, check: bool = True, timeout: float = 120) -> str:
        """Runs kubectl against the cluster; returns stdout (raises with stderr when `check`)."""
        result = subprocess.run([kubectl_binary(), f"--kubeconfig={self.kubeconfig}", *args], input=input,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise CommandError(result.returncode, ["kubectl", *args], result.stdout, result.stderr)
        return result.stdout if check else result.stdout + result.stderr

    def helm(self, *args: str, check: bool = True, timeout: float = 300) -> str:
        helm = binary("helm")
        if not helm.exists():
            helm = Path(shutil.which("helm") or helm)
        result = subprocess.run([str(helm), f"--kubeconfig={self.kubeconfig}", *args], capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise CommandError(result.returncode, ["helm", *args], result.stdout, result.stderr)
        return result.stdout

    def apply(self, *objects: dict) -> str:
        return self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects))

    def api_client(self):
        """A `kubernetes.client.ApiClient` for this cluster."""
        from kubernetes import config

        return config.new_client_from_config(config_file=self.kubeconfig)

    def s3_client(self):
        import boto3
        from botocore.config import Config

        if not self.s3_endpoint:
            raise PlatformError("no S3 endpoint: set RAGTUNE_TEST_S3_ENDPOINT/ACCESS_KEY/SECRET_KEY for external clusters")
        return boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id=self.s3_access_key,
                            aws_secret_access_key=self.s3_secret_key, region_name="us-east-1",
                            config=Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=3,
                                          read_timeout=30))

    def bucket(self, name: str) -> str:
        """Creates bucket `name` if missing; returns the name."""
        s3 = self.s3_client()
        try:
            s3.create_bucket(Bucket=name)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name

    # ---- cluster setup ---------------------------------------------------------------------

    def install_crds(self, timeout: float = 60) -> list[str]:
        """Applies the CRDs generated from the API models and waits until they are Established."""
        from ragtune.api.crdgen import build_crds

        crds = list(build_crds().values())
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump_all(crds))
        names = [c["metadata"]["name"] for c in crds]
        self.kubectl("wait", "--for=condition=Established", f"--timeout={int(timeout)}s",
                     *[f"crd/{n}" for n in names])
        return names

    def create_namespace(self, prefix: str = "t") -> str:
        """A fresh namespace with the `s3-credentials` Secret; waits for its default ServiceAccount."""
        name = f"{prefix}-{secrets.token_hex(4)}"
        self.kubectl("create", "namespace", name)
        if self.s3_access_key:
            self.kubectl("-n", name, "create", "secret", "generic", S3_SECRET_NAME,
                         f"--from-literal=AWS_ACCESS_KEY_ID={self.s3_access_key}",
                         f"--from-literal=AWS_SECRET_ACCESS_KEY={self.s3_secret_key}")
        deadline = time.monotonic() + 30
        while "default" not in self.kubectl("-n", name, "get", "serviceaccounts", "-o", "name", check=False):
            if time.monotonic() > deadline:
                raise PlatformError(f"namespace {name}: ServiceAccount default never appeared (controller-manager?)")
            time.sleep(0.2)
        return name

    def delete_namespace(self, name: str, wait: bool = False) -> None:
        self.kubectl("delete", "namespace", name, f"--wait={'true' if wait else 'false'}", "--ignore-not-found")

    def gpu_nodes(self, count: int, gpus: int = 8, prefix: str = "kwok-gpu") -> list[str]:
        """Fake GPU nodes (kwok); only on the local platform."""
        from .kwok import create_gpu_nodes

        if self.local is None:
            raise PlatformError("kwok GPU nodes exist only on the local platform (RAGTUNE_TEST_KUBECONFIG is set)")
        return create_gpu_nodes(self.local.info().admin_client(), count, gpus=gpus, prefix=prefix)

    def wait_for(self, kind: str, name: str, jsonpath: str, expect: Any, namespace: Optional[str] = None,
                 timeout: float = 60) -> str:
        """Polls `kubectl get` until `jsonpath` renders `expect` (a str, or a callable on the str)."""
        ns = ["-n", namespace] if namespace else []
        deadline = time.monotonic() + timeout
        value = ""
        while True:
            target = [kind, name] if name else [kind]  # no name: the whole list
            value = self.kubectl(*ns, "get", *target, "-o", f"jsonpath={jsonpath}", check=False)
            if (expect(value) if callable(expect) else value == expect):
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{kind}/{name} {jsonpath}: last value {value!r}, expected {expect!r}")
            time.sleep(0.3)


def _local_handle(local: LocalPlatform) -> PlatformHandle:
    info = local.info()
    return _allowing_loopback_s3(
        PlatformHandle(info.kubeconfig, info.s3_endpoint, info.s3_access_key, info.s3_secret_key, local))


def _allowing_loopback_s3(handle: PlatformHandle) -> PlatformHandle:
    """S3 clients refuse loopback peers unless RAGTUNE_S3_ALLOW_LOOPBACK is set; with the local
    MinIO on loopback, this process (in-process tests) and the operators it starts (which render
    the setting into their pods) need it."""
    from ragtune.addresses import ALLOW_LOOPBACK_ENV, AddressClass, classify_host, url_authority_host

    if handle.s3_endpoint and classify_host(url_authority_host(handle.s3_endpoint))[1] is AddressClass.LOOPBACK:
        os.environ.setdefault(ALLOW_LOOPBACK_ENV, "true")
    return handle


def _to_stderr(message: str) -> None:
    # Benches and tests own stdout (a bench prints exactly one JSON document there).
    print(message, file=sys.stderr, flush=True)


def open_platform() -> tuple[PlatformHandle, bool]:
    """Returns (handle, owned); `owned` platforms must be closed with `close_platform`."""
    external = os.environ.get("RAGTUNE_TEST_KUBECONFIG")
    if external:
        return _allowing_loopback_s3(PlatformHandle(external, os.environ.get("RAGTUNE_TEST_S3_ENDPOINT"),
                                                    os.environ.get("RAGTUNE_TEST_S3_ACCESS_KEY"),
                                                    os.environ.get("RAGTUNE_TEST_S3_SECRET_KEY"))), False
    if os.environ.get("RAGTUNE_TEST_PLATFORM") == "reuse":
        local = LocalPlatform(default_state_dir())
        if not local.is_running():
            local.up(log=_to_stderr)
        return _local_handle(local), False
    sessions = cache_dir() / "test-platforms"
    _reap_abandoned(sessions)
    local = LocalPlatform(sessions / f"session-{os.getpid()}")
    local.up(log=_to_stderr)
    return _local_handle(local), True


def _reap_abandoned(sessions: Path) -> None:
    """Stops platforms left by test sessions that were killed before their teardown ran."""
    for state in sessions.glob("session-*"):
        pid = state.name.removeprefix("session-")
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            LocalPlatform(state).down(log=lambda _m: None)
            shutil.rmtree(state, ignore_errors=True)


def close_platform(handle: PlatformHandle) -> None:
    if handle.local is not None:
        handle.local.down(log=lambda _m: None)
        shutil.rmtree(handle.local.state_dir, ignore_errors=True)
