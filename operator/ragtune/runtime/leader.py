"""Leader election on a `coordination.k8s.io/v1` Lease, so that of several operator replicas exactly
one reconciles (the chart runs two, for availability).

Semantics follow client-go's leaderelection (what controller-runtime operators use):
- a candidate takes the Lease when it is free, or when its holder has not renewed it for
  `leaseDurationSeconds` as seen on this candidate's own clock (the time it last saw the Lease's
  record change, so clock skew between nodes does not matter);
- the leader renews every `renew_seconds`; a leader that cannot renew before the lease runs out
  stops at once (the process exits and its replacement starts as a candidate): two leaders at once
  would mean two writers of the same Jobs and statuses;
- every write carries the resourceVersion it read, so of two candidates racing for a free Lease
  exactly one wins (the other gets 409 Conflict).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Optional

from ragtune.clock import utc_now_micro

from .kube import Kube, KubeError

log = logging.getLogger("ragtune.leader")

LEASE_NAME = "ragtune-operator"


def default_identity() -> str:
    """Unique per process: the pod name (HOSTNAME) plus a random suffix for restarts in place."""
    return f"{os.environ.get('HOSTNAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


@dataclass
class LeaderElector:
    kube: Kube
    namespace: str
    identity: str
    name: str = LEASE_NAME
    lease_seconds: float = 15.0
    renew_seconds: float = 5.0
    retry_seconds: float = 2.0
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._observed: Optional[tuple[str, float]] = None
        """(resourceVersion of the Lease we last saw, when we first saw it on our clock)."""

    def _path(self, name: Optional[str] = None) -> str:
        base = f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases"
        return f"{base}/{name}" if name else base

    def _spec(self, transitions: int, acquired: Optional[str]) -> dict:
        now = utc_now_micro()
        return {"holderIdentity": self.identity, "leaseDurationSeconds": int(self.lease_seconds),
                "acquireTime": acquired or now, "renewTime": now, "leaseTransitions": transitions}

    def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this process holds the Lease afterwards."""
        try:
            lease = self.kube.request("GET", self._path(self.name))
        except KubeError as err:
            if err.status != 404:
                raise
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._spec(0, None)}
            try:
                self.kube.request("POST", self._path(), body)
            except KubeError as err2:
                if err2.status == 409:  # another candidate created it first
                    return False
                raise
            return True
        spec = lease.get("spec") or {}
        version = lease["metadata"]["resourceVersion"]
        if self._observed is None or self._observed[0] != version:
            self._observed = (version, self.clock())
        holder = spec.get("holderIdentity")
        mine = holder == self.identity
        expired = self.clock() - self._observed[1] > float(spec.get("leaseDurationSeconds") or self.lease_seconds)
        if holder and not mine and not expired:
            return False
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if mine else 1)
        lease["spec"] = self._spec(transitions, spec.get("acquireTime") if mine else None)
        try:
            updated = self.kube.request("PUT", self._path(self.name), lease)
        except KubeError as err:
            if err.status == 409:  # someone else wrote it since we read it
                return False
            raise
        self._observed = (updated["metadata"]["resourceVersion"], self.clock())
        if not mine:
            log.info("acquired Lease %s/%s (previous holder: %s)", self.namespace, self.name, holder or "none")
        return True

    def acquire(self, stop: Optional[threading.Event] = None) -> bool:
        """Block until this process leads (True) or `stop` is set (False)."""
        announced = False
        while stop is None or not stop.is_set():
            try:
                if self.try_acquire_or_renew():
                    return True
            except KubeError as err:
                log.warning("leader election: %s", err)
            if not announced:
                log.info("standing by: Lease %s/%s is held by another replica", self.namespace, self.name)
                announced = True
            time.sleep(self.retry_seconds)
        return False

    def keep(self, on_lost: Callable[[str], None], stop: Optional[threading.Event] = None) -> threading.Thread:
        """Renew in a daemon thread; call `on_lost` once if the Lease cannot be kept."""

        def loop() -> None:
            last_renewal = self.clock()
            while stop is None or not stop.is_set():
                time.sleep(self.renew_seconds)
                try:
                    if self.try_acquire_or_renew():
                        last_renewal = self.clock()
                        continue
                    on_lost(f"Lease {self.namespace}/{self.name} was taken by another replica")
                    return
                except KubeError as err:
                    log.warning("renewing Lease %s/%s: %s", self.namespace, self.name, err)
                if self.clock() - last_renewal > self.lease_seconds:
                    on_lost(f"could not renew Lease {self.namespace}/{self.name} for {self.lease_seconds:.0f} s")
                    return

        thread = threading.Thread(target=loop, name="lease-renewal", daemon=True)
        thread.start()
        return thread
