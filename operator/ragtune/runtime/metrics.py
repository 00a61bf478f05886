"""Prometheus metrics of the operator: a handful of instruments and a tiny API to move them.

Every series is prefixed `ragtune_`. The default registry also carries the process metrics
(`process_resident_memory_bytes`, CPU seconds, open fds).
"""

from __future__ import annotations

import threading
from typing import Hashable, Optional

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter(
    "ragtune_reconciles_total", "Reconciles by resource kind and outcome (success, error).", ["kind", "outcome"]
)
FINETUNEJOB_PHASE = Gauge("ragtune_finetunejobs", "FineTuneJobs by phase (as seen by this operator).", ["phase"])
ADAPTERDEPLOYMENT_PHASE = Gauge("ragtune_adapterdeployments", "AdapterDeployments by phase (as seen by this operator).",
                                ["phase"])
TRAINING_DURATION = Histogram(
    "ragtune_training_duration_seconds",
    "Wall-clock duration of finished training runs (Job start to end).",
    ["outcome"],
    buckets=(60, 300, 900, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 16 * 3600, 48 * 3600),
)
GATE_RESULTS = Counter(
    "ragtune_gate_evaluations_total",
    "Evaluation gate outcomes: FineTuneJob (offline, after training) and AdapterDeployment (online canary).",
    ["kind", "result"],
)
ROLLOUT_DURATION = Histogram(
    "ragtune_rollout_duration_seconds",
    "Duration of adapter rollouts, from candidate to promoted or rolled back.",
    ["outcome"],
    buckets=(5, 15, 30, 60, 120, 300, 600, 1200, 3600),
)
ROLLBACKS = Counter("ragtune_rollbacks_total", "Adapter rollouts rolled back, by reason.", ["reason"])

_server_lock = threading.Lock()
_server = None


def observe_reconcile(kind: str, outcome: str) -> None:
    RECONCILES.labels(kind=kind, outcome=outcome).inc()


def observe_training(seconds: float, outcome: str) -> None:
    TRAINING_DURATION.labels(outcome=outcome).observe(max(seconds, 0.0))


def observe_gates(kind: str, passed: bool) -> None:
    GATE_RESULTS.labels(kind=kind, result="passed" if passed else "failed").inc()


def observe_rollout(seconds: float, outcome: str) -> None:
    """`outcome`: `promoted` or `rolledBack` (serving engineer's rollout state machine)."""
    ROLLOUT_DURATION.labels(outcome=outcome).observe(max(seconds, 0.0))


def observe_rollback(reason: str) -> None:
    ROLLBACKS.labels(reason=reason).inc()


class PhaseTracker:
    """Keeps the per-phase gauge equal to the number of objects this process saw in each phase."""

    def __init__(self, gauge: Gauge = FINETUNEJOB_PHASE) -> None:
        self._gauge = gauge
        self._phases: dict[Hashable, str] = {}
        self._lock = threading.Lock()

    def set(self, key: Hashable, phase: Optional[str]) -> None:
        with self._lock:
            old = self._phases.get(key)
            if old == phase:
                return
            if old is not None:
                self._gauge.labels(phase=old).dec()
            if phase is None:
                self._phases.pop(key, None)
            else:
                self._phases[key] = phase
                self._gauge.labels(phase=phase).inc()

    def forget(self, key: Hashable) -> None:
        self.set(key, None)


FINETUNEJOB_PHASES = PhaseTracker()
ADAPTERDEPLOYMENT_PHASES = PhaseTracker(ADAPTERDEPLOYMENT_PHASE)


def start_server(port: int, addr: str = "0.0.0.0") -> None:
    """Serve `/metrics` on `port` (once per process; 0 disables)."""
    global _server
    with _server_lock:
        if port and _server is None:
            _server = start_http_server(port, addr=addr)


def stop_server() -> None:
    global _server
    with _server_lock:
        if _server is not None:
            server, thread = _server
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            _server = None
