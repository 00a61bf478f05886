"""The bake after a promotion (`spec.strategy.bake`): rollback also after promotion.

A promotion that replaced a serving set (traffic steps with `canary.analysis`) opens
`status.bake`: the set that served before, by digest, and the previous stable server's figures at
the rollout's last successful traffic measurement (`reference`). Between rollouts every tick looks
at the new stable server's pods (at most every `traffic.PAUSE_POLL_SECONDS`) and judges the window
since `baseline` with the same thresholds as a traffic step (`analysis.judge`, the ratios against
`reference`):

- Failed: one more failed measurement; a new window opens. Beyond `failureLimit` the previous set
  is written back onto the stable server by digest (`_Tick.revert_stable`: the pod template for
  TGI, the desired-set ConfigMap for vLLM, whose sidecars load it without a restart), the rollout
  gets a `RolledBack` history record (reason `BakeFailed`, so a followed run is not retried) and
  the phase is `RolledBack`. With `autoRollback: false` the new set keeps serving and the phase is
  `Degraded` (`BakeFailed`): a new spec decides.
- Successful or Inconclusive during the bake: nothing yet (only a failure ends a bake early).
- At `until`: the last window's verdict is recorded and, unless Failed, the bake ends
  (`BakeSucceeded`; `BakeInconclusive` when the window saw fewer than `minRequests` requests:
  nothing to hold against the new set, and nothing to wait for).

A new rollout (spec generation or followed run) ends a bake under way (`BakeAbandoned`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from ragtune.api.adapterdeployment import (
    AdapterDeploymentPhase,
    AnalysisMeasurement,
    BakeStatus,
    Candidate,
    ResolvedAdapter,
    RolloutRecord,
    ServerMeasurement,
    pause_seconds,
)
from ragtune.runtime.conditions import now

from . import analysis, render, traffic

if TYPE_CHECKING:
    from .rollout import _Tick

NAMES = ("new stable", "previous stable")
MAX_MEASUREMENTS = 64


def start(t: "_Tick", cand: Candidate, previous: list[ResolvedAdapter]) -> None:
    """At promotion: open the bake when the spec asks for one and a set served before."""
    bake = t.spec.strategy.bake
    if bake is None or not previous or t.spec.strategy.canary is None:
        t.status.bake = None
        return
    measured = [m for m in (cand.traffic.measurements if cand.traffic else []) if m.phase == "Successful"]
    clock = t.rec.clock()
    t.status.bake = BakeStatus(generation=cand.generation, started_at=now(),
                               until=traffic.stamp(clock + pause_seconds(bake)), previous=previous,
                               reference=measured[-1].stable if measured else None)
    t.event("Normal", "BakeStarted", f"analysing {t.stable_name()} for {bake} before the rollout is final; "
            f"{', '.join(render.short_set(previous))} is restored if it fails")


def abandon(t: "_Tick") -> None:
    """A new rollout starts: a bake under way ends, a failed one kept (`autoRollback: false`) is decided."""
    if t.status.bake is not None:
        t.event("Normal", "BakeAbandoned", "a new rollout started before the bake ended")
        t.status.bake = None
    if failed_and_kept(t):
        t.cond("Degraded", False, "RolloutStarted", "a new rollout replaces the set that failed its bake")


def failed_and_kept(t: "_Tick") -> bool:
    """The last bake failed and the set stays (`autoRollback: false`): Degraded until a new rollout."""
    return any(c.type == "Degraded" and c.status.value == "True" and c.reason == "BakeFailed"
               for c in t.status.conditions)


def _stable_pods(t: "_Tick") -> dict[str, tuple[str, int]]:
    return {k: v for k, v in traffic.scraped_pods(t).items() if k.startswith("stable/")}


def look(t: "_Tick") -> None:
    """One look at the new stable server during the bake (between rollouts)."""
    b = t.status.bake
    spec = t.spec.strategy.canary.analysis if t.spec.strategy.canary else None
    if b is None:
        return
    if spec is None or t.spec.strategy.bake is None:  # the spec no longer bakes
        t.status.bake = None
        return
    clock = t.rec.clock()
    if not b.baseline:  # the window opens at the first look after the promotion
        b.baseline = traffic.counters_now(t, _stable_pods(t)) or {"-": {}}
        t.wait_hint(min(max(traffic.parse_stamp(b.until) - clock, 0.0), traffic.PAUSE_POLL_SECONDS))
        return
    left = traffic.parse_stamp(b.until) - clock
    _, stable = analysis.compare(b.baseline, traffic.counters_now(t, _stable_pods(t)))
    phase, message = analysis.judge(spec, stable, b.reference or ServerMeasurement(), NAMES)
    if left > 0 and phase != "Failed":
        t.status.message = f"baking {t.stable_name()}: {int(left + 0.999)}s left"
        t.wait_hint(min(left, traffic.PAUSE_POLL_SECONDS))
        return
    m = AnalysisMeasurement(step=-1, weight=100, at=traffic.stamp(clock), phase=phase, message=f"bake: {message}",
                            canary=stable, stable=b.reference or ServerMeasurement())
    b.measurements = (b.measurements + [m])[-MAX_MEASUREMENTS:]
    if phase == "Failed":
        b.failed_measurements += 1
        t.event("Warning", "BakeAnalysisFailed", f"{m.message}; {analysis.figures(stable)} (failed measurements "
                f"{b.failed_measurements}, failureLimit {spec.failure_limit})")
        if b.failed_measurements > spec.failure_limit:
            _failed(t, b, message)
            return
        b.baseline = traffic.counters_now(t, _stable_pods(t)) or {"-": {}}
        if left > 0:
            t.wait_hint(min(left, traffic.PAUSE_POLL_SECONDS))
            return
        phase = "Inconclusive"  # the bake ran out right after a failure within the limit
    reason = "BakeSucceeded" if phase == "Successful" else "BakeInconclusive"
    t.event("Normal", reason, f"{t.stable_name()} baked for {t.spec.strategy.bake}: {message}")
    t.cond("Progressing", False, reason, message)
    t.status.bake = None


def _failed(t: "_Tick", b: BakeStatus, message: str) -> None:
    text = f"the new set failed its bake: {message}"
    if not t.spec.strategy.auto_rollback:
        t.status.phase = AdapterDeploymentPhase.DEGRADED
        t.status.message = f"{text}; still serving it (autoRollback: false): change the spec to decide"
        t.cond("Degraded", True, "BakeFailed", t.status.message)
        t.event("Warning", "BakeFailed", t.status.message)
        t.status.bake = None
        return
    failed = t.status.serving
    record = RolloutRecord(generation=b.generation, adapters=render.short_set(failed), outcome="RolledBack",
                           reason=f"BakeFailed: {message}"[:1024], started_at=b.started_at, finished_at=now())
    t.status.history = ([record] + t.status.history)[: t.spec.history_limit]
    t.status.serving = b.previous
    dep = t.kube.get("Deployment", t.ns, t.stable_name())
    if dep is not None:
        t.revert_stable(dep)  # writes `status.serving` (now the previous set) onto the stable server
    t.status.bake = None
    t.status.phase = AdapterDeploymentPhase.ROLLED_BACK
    t.status.message = f"{text}; restored {', '.join(render.short_set(b.previous))}"
    t.cond("Progressing", False, "BakeFailed", t.status.message)
    t.event("Warning", "BakeFailed", t.status.message)
    t.refresh_serving_fields()
    t.out.finished, t.out.reason = "RolledBack", "BakeFailed"


def wait(t: "_Tick") -> Optional[float]:
    """Seconds until the bake needs another look (None: no bake)."""
    b = t.status.bake
    if b is None:
        return None
    return min(max(traffic.parse_stamp(b.until) - t.rec.clock(), 0.0), traffic.PAUSE_POLL_SECONDS)
