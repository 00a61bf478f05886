"""Weighted canary on live traffic through Gateway API (`spec.strategy.type: Canary`).

The AdapterDeployment owns one `HTTPRoute` (`<name>-route`) attached to the Gateway the spec
names. Between rollouts its single rule sends everything to the stable Service. During a
rollout, once the canary Deployment is ready (and passed the online evaluation when it is
enabled), the `Traffic` step walks `spec.strategy.canary.steps`:

- write the step's weight into the rule's `backendRefs` (stable `100 - w`, canary `w`);
- wait until the Gateway accepted that route generation (`status.parents[]` Accepted and
  ResolvedRefs with `observedGeneration` >= it), then hold it for the step's `pause`
  (at least `ROUTE_SETTLE_SECONDS`, the time a data plane may take after writing its status);
- after the last step (weight 100 is implied if the last step is lower) the canary carries all
  traffic while the stable Deployment is rolled to the candidate set; once it is ready the route
  goes back to the stable Service (weight 0 for the canary), and only when the Gateway accepted
  that and the settle time passed is the canary removed: no request is sent to a pod going away.

Everything lives in `status.candidate.traffic` (step index, weight, the route generation that
carries it, when the Gateway accepted it): a restarted operator finds the route already at the
recorded weight, writes nothing and resumes the pause where it was. Every weight written is
kept in `traffic.changes` and posted as an Event.

With `canary.analysis` every step below 100% is also judged on live metrics (`analysis.py`): the
pods' counters are kept in `traffic.baseline` when the Gateway accepted the weight, and compared
when the pause is over. Successful: next step. Inconclusive (too few canary requests), or Failed
within `failureLimit`: the step is held for another pause and measured again from there. Failed
beyond the limit: `traffic.aborting` is set and the route goes to weight 0 in the same tick; once
the Gateway accepted that and the settle time passed, the canary is removed and the rollout ends
`RolledBack` with the metric and its value (the stable server is never touched). Each
measurement lands in `traffic.measurements` and an Event.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Optional

from ragtune import workloads
from ragtune.api.adapterdeployment import (
    AdapterDeploymentSpec,
    AnalysisMeasurement,
    Candidate,
    TrafficStatus,
    WeightChange,
    pause_seconds,
)
from ragtune.api.keys import (
    ANNOTATION_ADAPTERDEPLOYMENT,
    ANNOTATION_ROLLOUT_DECISION,
    ANNOTATION_ROUTE_HASH,
    LABEL_ADAPTERDEPLOYMENT,
    LABEL_MANAGED_BY,
    MANAGED_BY,
)

from . import analysis, render

if TYPE_CHECKING:
    from .rollout import _Tick

log = logging.getLogger("ragtune.adapterdeployment")

GATEWAY_GROUP = "gateway.networking.k8s.io"
ROUTE_SETTLE_SECONDS = 3.0
"""After the Gateway reported a route generation Accepted: time its data plane may still take to
apply it (Traefik writes the status when it builds its configuration)."""
PAUSE_POLL_SECONDS = 5.0
"""During a pause the rollout looks again this often at most (the canary's pod events bring it
back sooner); the end of the pause is hit exactly."""
MAX_CHANGES = 64


def route_name(ad_name: str) -> str:
    return workloads.child_name(ad_name, "-route")


def plan(spec: AdapterDeploymentSpec) -> list[tuple[int, int]]:
    """(weight, pause seconds) per step; weight 100 appended when the last step is lower."""
    assert spec.strategy.canary is not None
    steps = [(s.weight, pause_seconds(s.pause)) for s in spec.strategy.canary.steps]
    if steps[-1][0] < 100:
        steps.append((100, 0))
    return steps


def stamp(ts: float) -> str:
    """RFC 3339 (seconds) of a clock reading: the times in `status.candidate.traffic` and `status.bake`."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()


def build_route(spec: AdapterDeploymentSpec, owner: render.Owner, canary_weight: int) -> dict[str, Any]:
    """The HTTPRoute: all of the Gateway's matching traffic to the stable Service, `canary_weight`
    percent of it to the canary Service (0: the canary is not a backend at all)."""
    canary = spec.strategy.canary
    assert canary is not None and 0 <= canary_weight <= 100
    stable_svc = render.service(spec, owner, canary=False)["metadata"]["name"]
    canary_svc = render.service(spec, owner, canary=True)["metadata"]["name"]
    port = spec.server.port
    parent: dict[str, Any] = {"group": GATEWAY_GROUP, "kind": "Gateway", "name": canary.gateway_ref.name}
    if canary.gateway_ref.namespace:
        parent["namespace"] = canary.gateway_ref.namespace
    if canary.gateway_ref.section_name:
        parent["sectionName"] = canary.gateway_ref.section_name
    backends = [{"group": "", "kind": "Service", "name": stable_svc, "port": port, "weight": 100 - canary_weight}]
    if canary_weight > 0:
        backends.append({"group": "", "kind": "Service", "name": canary_svc, "port": port, "weight": canary_weight})
    route_spec: dict[str, Any] = {
        "parentRefs": [parent],
        "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}], "backendRefs": backends}],
    }
    if canary.hostnames:
        route_spec["hostnames"] = list(canary.hostnames)
    digest = hashlib.sha256(json.dumps(route_spec, sort_keys=True).encode()).hexdigest()[:20]
    return {
        "apiVersion": f"{GATEWAY_GROUP}/v1",
        "kind": "HTTPRoute",
        "metadata": {
            "name": route_name(owner.name), "namespace": owner.namespace,
            "labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_ADAPTERDEPLOYMENT: workloads.label_value(owner.name)},
            "annotations": {ANNOTATION_ADAPTERDEPLOYMENT: owner.name, ANNOTATION_ROUTE_HASH: digest},
            "ownerReferences": [owner.reference()],
        },
        "spec": route_spec,
    }


def live_weights(route: dict[str, Any]) -> dict[str, int]:
    """Service name -> weight of the route's first rule (weight defaults to 1, as in Gateway API)."""
    rules = (route.get("spec") or {}).get("rules") or [{}]
    return {b["name"]: b.get("weight", 1) for b in rules[0].get("backendRefs") or []}


def _matches(live: dict[str, Any], desired: dict[str, Any]) -> bool:
    ann = (live["metadata"].get("annotations") or {}).get(ANNOTATION_ROUTE_HASH)
    return ann == desired["metadata"]["annotations"][ANNOTATION_ROUTE_HASH] and \
        live_weights(live) == live_weights(desired)


def accepted(route: dict[str, Any], generation: int, spec: AdapterDeploymentSpec) -> tuple[bool, str]:
    """(True, "") once the Gateway named in the spec reports `generation` (or later) Accepted with
    its references resolved; else (False, what it says so far)."""
    canary = spec.strategy.canary
    assert canary is not None
    want_ns = canary.gateway_ref.namespace or route["metadata"]["namespace"]
    for parent in (route.get("status") or {}).get("parents") or []:
        ref = parent.get("parentRef") or {}
        if ref.get("name") != canary.gateway_ref.name or (ref.get("namespace") or route["metadata"]["namespace"]) != want_ns:
            continue
        conds = {c.get("type"): c for c in parent.get("conditions") or []}
        for type_ in ("Accepted", "ResolvedRefs"):
            c = conds.get(type_) or {}
            if c.get("observedGeneration", 0) < generation:
                return False, f"Gateway {want_ns}/{canary.gateway_ref.name} has not processed the route yet"
            if c.get("status") != "True":
                return False, (f"Gateway {want_ns}/{canary.gateway_ref.name}: {type_}={c.get('status')} "
                               f"{c.get('reason', '')}: {c.get('message', '')}").rstrip(": ")
        return True, ""
    return False, f"Gateway {want_ns}/{canary.gateway_ref.name} has not reported on the route yet (is it installed?)"


def ensure_route(t: "_Tick", canary_weight: int) -> tuple[dict[str, Any], bool]:
    """Create-or-update the route to `canary_weight`; (live route, whether it was written)."""
    desired = build_route(t.spec, t.owner, canary_weight)
    live = t.kube.get("HTTPRoute", t.ns, desired["metadata"]["name"])
    if live is None:
        return t.kube.create(desired), True
    if _matches(live, desired):
        return live, False
    desired["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
    return t.kube.replace(desired), True


def _record(t: "_Tick", tr: TrafficStatus, step: int, weight: int, route: dict[str, Any], total: int) -> None:
    tr.weight, tr.route_generation, tr.step_started_at = weight, route["metadata"].get("generation"), None
    tr.changes = (tr.changes + [WeightChange(step=step, weight=weight, at=stamp(t.rec.clock()))])[-MAX_CHANGES:]
    where = f"step {step + 1}/{total}" if step >= 0 else "back to stable"
    t.event("Normal", "TrafficShifted", f"HTTPRoute {route['metadata']['name']}: canary {weight}%, stable "
            f"{100 - weight}% ({where})")


def _hold(t: "_Tick", tr: TrafficStatus, route: dict[str, Any], hold_seconds: float) -> Optional[float]:
    """Seconds left to hold the current weight (0: done), None while the Gateway has not accepted it."""
    ok, why = accepted(route, tr.route_generation or route["metadata"].get("generation", 1), t.spec)
    if not ok:
        t.status.message = f"canary at {tr.weight}%: {why}"
        return None
    now = t.rec.clock()
    if tr.step_started_at is None:
        tr.step_started_at = stamp(now)
    left = max(hold_seconds, ROUTE_SETTLE_SECONDS) - (now - parse_stamp(tr.step_started_at))
    return max(left, 0.0)


def step(t: "_Tick", cand: Candidate) -> bool:
    """One tick of the Traffic step; True when the canary carries all traffic (promote now).
    A failed analysis ends the rollout here (`t.rollback`) once the canary is out of the route."""
    steps = plan(t.spec)
    tr = cand.traffic = cand.traffic or TrafficStatus()
    if tr.aborting:
        if tr.awaiting_decision and not _decided(t, tr):
            return False
        if tr.aborting and back_to_stable(t, cand):
            t.rollback(cand, "AnalysisFailed", tr.aborting)
        if tr.aborting:
            return False
    spec = t.spec.strategy.canary.analysis if t.spec.strategy.canary else None
    while True:
        weight, pause = steps[tr.step]
        route, wrote = ensure_route(t, weight)
        if wrote or tr.weight != weight or tr.route_generation is None:
            _record(t, tr, tr.step, weight, route, len(steps))
            tr.baseline = {}
        left = _hold(t, tr, route, pause)
        if left is None:
            t.wait_hint(1.0)
            return False
        analysed = spec is not None and weight < 100
        opened = analysed and not tr.baseline
        if opened:  # the window opens when the Gateway carries the weight
            tr.baseline = counters_now(t, scraped_pods(t)) or {"-": {}}
        if left > 0:
            # A failure needs no full pause: every look during it may end the step's measurement.
            verdict = _analyse(t, tr, weight, len(steps), early=True) if analysed and not opened else None
            if verdict is None:
                t.status.message = f"canary at {weight}% (step {tr.step + 1}/{len(steps)}), {int(left + 0.999)}s left"
                last = tr.measurements[-1] if tr.measurements else None
                if last is not None and last.step == tr.step and last.phase != "Successful":
                    t.status.message = f"paused, measuring again: {t.status.message}; last analysis " \
                                       f"{last.phase}: {last.message}"
                t.wait_hint(min(left, PAUSE_POLL_SECONDS))
                return False
        elif analysed:
            verdict = _analyse(t, tr, weight, len(steps))
        else:
            verdict = "Successful"
        if verdict == "abort":
            tr.aborting = tr.measurements[-1].message
            back_to_stable(t, cand)  # weight 0 in this very tick
            t.status.message = f"analysis failed, canary out of the route: {tr.aborting}"
            if not t.spec.strategy.auto_rollback:
                # unique per failure (the list of measurements is bounded, its length is not a counter)
                tr.awaiting_decision = f"g{cand.generation}-" + tr.measurements[-1].at.replace("-", "").replace(":", "")
                _ask(t, tr)
                t.event("Warning", "AwaitingDecision", t.status.message)
            return False
        if verdict != "Successful":  # measure this step again over another pause
            tr.step_started_at = stamp(t.rec.clock())
            tr.baseline = counters_now(t, scraped_pods(t)) or {"-": {}}
            t.wait_hint(min(max(pause, ROUTE_SETTLE_SECONDS), PAUSE_POLL_SECONDS))
            return False
        if tr.step + 1 >= len(steps):
            return True
        tr.step += 1
        tr.baseline = {}


def _ask(t: "_Tick", tr: TrafficStatus) -> None:
    t.status.message = (f"paused, canary at 0% (autoRollback: false): {tr.aborting}; decide with the annotation "
                        f"{ANNOTATION_ROLLOUT_DECISION}: 'rollback {tr.awaiting_decision}' or "
                        f"'resume {tr.awaiting_decision}'")


def _decided(t: "_Tick", tr: TrafficStatus) -> bool:
    """`autoRollback: false` after a failed analysis: the route at weight 0, the canary kept, until
    the annotation names this failure's token. `rollback`: go on rolling back (True). `resume`:
    forget the failures and measure the step again at its weight (True, `aborting` cleared)."""
    route, wrote = ensure_route(t, 0)
    if wrote:
        _record(t, tr, -1, 0, route, 0)
    raw = ((t.body["metadata"].get("annotations") or {}).get(ANNOTATION_ROLLOUT_DECISION) or "").split()
    if len(raw) != 2 or raw[1] != tr.awaiting_decision or raw[0] not in ("rollback", "resume"):
        _ask(t, tr)
        t.wait_hint(PAUSE_POLL_SECONDS)
        return False
    t.event("Normal", "DecisionApplied", f"{ANNOTATION_ROLLOUT_DECISION}: {raw[0]} {raw[1]}")
    if raw[0] == "rollback":
        tr.aborting = f"{tr.aborting} (rolled back on the decision {raw[1]})"
    else:
        tr.aborting, tr.failed_measurements, tr.baseline = None, 0, {}
    tr.awaiting_decision = None
    return True


def counters_now(t: "_Tick", pods: dict[str, tuple[str, int]]) -> dict[str, dict[str, float]]:
    """The pods' counters now: scraped from each pod, or from `analysis.prometheus` when the spec
    names one (a failed query counts nothing: the measurement comes out Inconclusive, and says why
    in the log and the status message)."""
    spec = t.spec.strategy.canary.analysis if t.spec.strategy.canary else None
    if spec is None or spec.prometheus is None:
        return analysis.take(pods, t.backend)
    try:
        return analysis.query_prometheus(spec.prometheus, t.ns, {k: k.split("/", 1)[1] for k in pods}, t.backend)
    except analysis.QueryFailed as exc:
        log.warning("%s/%s: %s", t.ns, t.name, exc)
        t.status.message = f"metrics unavailable: {exc}"
        return {}


def scraped_pods(t: "_Tick") -> dict[str, tuple[str, int]]:
    """`canary/<pod>` / `stable/<pod>` -> (pod IP, serving port) of the running pods of both."""
    out = {}
    for track, name in (("canary", t.canary_name()), ("stable", t.stable_name())):
        dep = t.kube.get("Deployment", t.ns, name)
        if dep is None:
            continue
        for pod in t.kube.list("Pod", t.ns, dep["spec"]["selector"]["matchLabels"]):
            st = pod.get("status") or {}
            if st.get("podIP") and st.get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp"):
                out[f"{track}/{pod['metadata']['name']}"] = (st["podIP"], t.spec.server.port)
    return out


def _analyse(t: "_Tick", tr: TrafficStatus, weight: int, total: int, early: bool = False) -> Optional[str]:
    """Measure the step's window: Successful, Inconclusive, Failed (within the limit) or abort.
    `early` (during the pause): only a Failed verdict counts; otherwise None and nothing recorded."""
    spec = t.spec.strategy.canary.analysis
    assert spec is not None
    now = counters_now(t, scraped_pods(t))
    canary, stable = analysis.compare(tr.baseline, now)
    phase, message = analysis.judge(spec, canary, stable)
    if early and phase != "Failed":
        return None
    where = f"step {tr.step + 1}/{total} at {weight}%"
    m = AnalysisMeasurement(step=tr.step, weight=weight, at=stamp(t.rec.clock()), phase=phase,
                            message=f"{where}: {message}", canary=canary, stable=stable)
    tr.measurements = (tr.measurements + [m])[-MAX_CHANGES:]
    detail = f"{m.message}; canary: {analysis.figures(canary)}; stable: {analysis.figures(stable)}"
    if phase == "Successful":
        t.event("Normal", "AnalysisSuccessful", detail)
        return phase
    if phase == "Inconclusive":
        t.event("Normal", "AnalysisInconclusive", detail)
        t.status.message = f"paused: analysis inconclusive at {where} ({message}); measuring again"
        return phase
    tr.failed_measurements += 1
    t.event("Warning", "AnalysisFailed", f"{detail} (failed measurements {tr.failed_measurements}, "
            f"failureLimit {spec.failure_limit})")
    if tr.failed_measurements > spec.failure_limit:
        return "abort"
    t.status.message = (f"analysis failed at {where} ({message}); {tr.failed_measurements} of "
                        f"failureLimit {spec.failure_limit} used, measuring again")
    return phase


def back_to_stable(t: "_Tick", cand: Candidate) -> bool:
    """After the stable Deployment serves the candidate set: route everything to it again. True once
    the Gateway accepted that and the settle time passed (the canary may go)."""
    tr = cand.traffic = cand.traffic or TrafficStatus()
    route, wrote = ensure_route(t, 0)
    if wrote or tr.weight != 0 or tr.route_generation is None:
        _record(t, tr, -1, 0, route, 0)
    left = _hold(t, tr, route, 0)
    if left is None or left > 0:
        t.status.message = t.status.message if left is None else "traffic back on the stable Service, settling"
        t.wait_hint(1.0 if left is None else left)
        return False
    return True


def between_rollouts(t: "_Tick") -> None:
    """The route when no rollout shifts traffic: everything to stable while something serves
    (created on the first promotion); removed when the strategy no longer shifts traffic."""
    name = route_name(t.name)
    if t.spec.strategy.shifts_traffic and t.status.serving:
        ensure_route(t, 0)
        t.status.route_name = name
    elif t.status.route_name:
        t.kube.delete("HTTPRoute", t.ns, t.status.route_name)
        t.status.route_name = None
