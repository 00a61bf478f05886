"""Where the platform's binaries and state live.

Versions are read from `build.sh` so that the script stays the single place that pins them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

BUILD_SCRIPT = Path(__file__).resolve().parent.parent / "build.sh"
REPO_ROOT = BUILD_SCRIPT.parent.parent
VLLM_BUILD_SCRIPT = BUILD_SCRIPT.parent / "build_vllm.sh"
VLLM_CONSTRAINTS = BUILD_SCRIPT.parent / "vllm-constraints.txt"


def cache_dir() -> Path:
    env = os.environ.get("RAGTUNE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ragtune"


def default_state_dir() -> Path:
    env = os.environ.get("RAGTUNE_STATE_DIR")
    return Path(env) if env else cache_dir() / "platform"


def _pinned_versions() -> dict[str, str]:
    text = BUILD_SCRIPT.read_text()
    found = dict(re.findall(r"^([A-Z]+)_VERSION=(\S+)", text, flags=re.M))
    return {part.lower(): version for part, version in found.items()}


@dataclass(frozen=True)
class Part:
    """One build.sh part: the binaries it provides, in bin/<part>-<version>/."""

    name: str
    binaries: tuple[str, ...]

    @property
    def version(self) -> str:
        return _pinned_versions()[self.name]

    @property
    def dir(self) -> Path:
        return cache_dir() / "bin" / f"{self.name}-{self.version}"

    def missing(self) -> list[str]:
        # as build.sh checks: binaries executable, data files (*.yaml) present
        return [b for b in self.binaries
                if not (os.path.isfile(self.dir / b) if b.endswith(".yaml") else os.access(self.dir / b, os.X_OK))]


PARTS = {
    "etcd": Part("etcd", ("etcd",)),
    "kube": Part("kube", ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")),
    "kwok": Part("kwok", ("kwok",)),
    "minio": Part("minio", ("minio",)),
    "helm": Part("helm", ("helm",)),
    "traefik": Part("traefik", ("traefik",)),  # opt-in: `dev up --with gateway`
    "gatewayapi": Part("gatewayapi", ("standard-crds.yaml",)),
    "kueue": Part("kueue", ("kueue",)),  # opt-in: `dev up --with kueue`
    "kueuecrds": Part("kueuecrds", ("crds.yaml", "manager-role.yaml", "manager-secrets-role.yaml")),
    "prometheus": Part("prometheus", ("prometheus",)),  # opt-in: `dev up --with prometheus`
}


def vllm_venv() -> Path:
    """The real vLLM's virtualenv, as build_vllm.sh names it: vllm-venv-<version>-<constraints hash>."""
    version = re.search(r"^VLLM_VERSION=(\S+)", VLLM_BUILD_SCRIPT.read_text(), flags=re.M).group(1)
    digest = hashlib.sha256(VLLM_CONSTRAINTS.read_bytes()).hexdigest()[:12]
    return cache_dir() / f"vllm-venv-{version}-{digest}"


def vllm_python() -> Path:
    """Its interpreter; usable once `vllm_built()` (build_vllm.sh marks a finished venv)."""
    return vllm_venv() / "bin" / "python"


def vllm_built() -> bool:
    return (vllm_venv() / ".complete").is_file() and os.access(vllm_python(), os.X_OK)


def binary(name: str) -> Path:
    """Path of a platform binary, e.g. `binary("kubectl")` (it may not be built yet)."""
    for part in PARTS.values():
        if name in part.binaries:
            return part.dir / name
    raise KeyError(f"{name} is not a local platform binary (known: {sorted(b for p in PARTS.values() for b in p.binaries)})")


def kubectl_binary() -> str:
    """kubectl from the platform build, else the one on PATH (for external clusters)."""
    path = binary("kubectl")
    if path.exists():
        return str(path)
    found = shutil.which("kubectl")
    if not found:
        raise FileNotFoundError(f"kubectl not found: neither {path} (run `ragtune dev build kube`) nor on PATH")
    return found
