"""Installing the CRDs of an opt-in part (Gateway API for the gateway, Kueue's) on the platform."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Iterable, Optional

from .kubeclient import ApiError, Kube


def not_established(kube: Kube, names: Iterable[str]) -> Optional[str]:
    """None once every named CRD (`<plural>.<group>`) is Established, else what is missing."""
    for name in names:
        try:
            crd = kube.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
        except ApiError as err:
            return f"CRD {name}: {err}"
        if not any(c.get("type") == "Established" and c.get("status") == "True"
                   for c in (crd.get("status") or {}).get("conditions") or []):
            return f"CRD {name} is not Established yet"
    return None


def install(kubeconfig: str, kube: Kube, crds_file: Path, names: Iterable[str], deadline: float) -> None:
    """Server-side apply of `crds_file`, then wait (until `deadline`) for `names` to be Established."""
    from .paths import kubectl_binary

    subprocess.run([kubectl_binary(), f"--kubeconfig={kubeconfig}", "apply", "--server-side", "--force-conflicts",
                    "-f", str(crds_file)], check=True, capture_output=True, timeout=max(deadline - time.monotonic(), 5))
    while reason := not_established(kube, names):
        if time.monotonic() > deadline:
            raise TimeoutError(reason)
        time.sleep(0.2)
