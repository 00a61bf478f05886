"""The AdapterDeployment rollout state machine, one idempotent tick at a time.

Every tick reads the object and its children fresh, moves `status.candidate.step` along
Resolving -> OfflineGate -> Canary -> OnlineGate -> Promoting (then the candidate is cleared), and writes the status back
with the resourceVersion it read (a concurrent writer makes the write fail and the next tick
redo the work). All state lives in the status and in deterministically named children, so an
operator restart resumes where it stopped: the canary, the evaluation Job and the stable
Deployment are created-or-adopted by name, and the stable pod template changes in one write.

A rollout starts on a new generation of the spec or, between rollouts, when a FineTuneJob that an
adapter follows (`follow: LatestSucceeded`) succeeded with a new adapter (`resolve.followed_updates`:
the serving set with only that adapter resolved again). After a promotion with `strategy.bake`,
`bake.py` judges the new stable server on live metrics between rollouts and restores the previous
set by digest when it fails.

With `backend: vllm` the adapter set is not in the pod template: a step writes the set into the
server's desired-set ConfigMap, and completes only when every ready pod of that track reports
(its sidecar's status document, read once per pod per tick while the change is pending) that it
serves exactly that set; a pod that reports a load failure for it ends the step with a condition
and a Warning Event naming the pod and the adapter, and the rollout rolls back by writing the
serving set (by digest, from `status.serving`) back into the ConfigMap. No pod restarts.

The offline gate of FineTuneJob-sourced adapters is computed here from the FineTuneJob status;
adapters given by `uri` are gated on their run's `eval/report.json` by the evaluation Job (the
operator reads no S3): inside the canary's evaluation, or in an offline-only Job for `Direct`.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Optional

from pydantic import ValidationError

from ragtune.api.adapterdeployment import AdapterDeploymentPhase as Phase
from ragtune.api.adapterdeployment import (
    AdapterDeploymentSpec,
    AdapterDeploymentStatus,
    Candidate,
    GateReport,
    OnlineGateResult,
    ResolvedAdapter,
    RolloutRecord,
)
from ragtune.api.base import validate_tolerant
from ragtune.api.common import IN_CLUSTER, Condition
from ragtune.api.keys import ANNOTATION_ROLLED_AT
from ragtune.api.pods import (
    SYNC_STATUS_PATH,
    AdapterSyncStatus,
    CandidateRef,
    FetchResult,
    OnlineEvalConfig,
    OnlineEvalResult,
)
from ragtune.runtime.conditions import now, set_condition
from ragtune.runtime.kube import KubeError

from . import bake, render, traffic
from .resolve import (
    FollowedRun,
    NotReady,
    Resolution,
    ResolveError,
    changed_adapters,
    followed_updates,
    offline_failures,
    offline_gate,
    resolve,
)

log = logging.getLogger("ragtune.adapterdeployment")

CRASH_RESTARTS = 2
"""Restarts of a server container that count as crash-looping."""
ROLLOUT_POLL_SECONDS = 0.5
"""A rollout under way looks again this soon (its children's watch events often come sooner)."""
FINETUNEJOB_WAIT_SECONDS = 60.0
"""Waiting for a FineTuneJob to succeed: its watch events bring the rollout back; this is the
safety net."""
REFERENCED_HEALTH_SECONDS = 30.0
"""A `deploymentRef` server's pods are not ragtune's and not watched: its health is re-read this often."""
REFUSED = frozenset({400, 422})
"""API answers that refuse an object rendered from the spec: permanent until the spec changes."""
FATAL_WAITING = {"CrashLoopBackOff", "ErrImagePull", "ImagePullBackOff", "InvalidImageName",
                 "CreateContainerConfigError", "CreateContainerError"}


@dataclass
class Outcome:
    """What a tick did, for events and metrics."""

    events: list[tuple[str, str, str]] = field(default_factory=list)
    finished: Optional[str] = None
    """`Promoted`, `RolledBack` or `Failed` when a rollout ended this tick."""
    reason: str = ""
    """Why it ended."""
    seconds: float = 0.0
    """How long the rollout that ended took."""
    online_gate: Optional[bool] = None
    """The online gate's verdict, when it came in this tick."""
    again: Optional[float] = None
    """Seconds after which to tick again because something is awaited; None: only on a watch event."""
    involved: Optional[dict[str, Any]] = None
    """The AdapterDeployment the events are about (apiVersion, kind, metadata)."""
    phase: Optional[str] = None
    """The phase the tick left (None: the object is gone or being deleted), for the phase gauge."""


def _parse_time(stamp: Optional[str]) -> Optional[float]:
    if not stamp:
        return None
    return datetime.strptime(stamp.replace("Z", "+00:00")[:19], "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=timezone.utc).timestamp()


def _same(live: dict[str, Any], desired: dict[str, Any]) -> bool:
    """The live Deployment has the desired pod template and replica count."""
    return (render.live_template_hash(live) == render.live_template_hash(desired)
            and live["spec"].get("replicas") == desired["spec"].get("replicas"))


def merge_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`: a key gone at any depth is
    null (a field cleared inside `candidate.traffic` must not survive the write)."""
    patch: dict[str, Any] = {k: None for k in old if k not in new}
    for k, v in new.items():
        o = old.get(k)
        patch[k] = merge_diff(o, v) if isinstance(o, dict) and isinstance(v, dict) else v
    return patch


def pod_failure(pods: list[dict[str, Any]]) -> Optional[tuple[str, str]]:
    """(reason, message) when a server pod cannot become ready: its fetch init container failed
    (the termination message says why), or a container crash-loops / cannot start."""
    for pod in pods:
        st = pod.get("status") or {}
        name = pod["metadata"]["name"]
        for cs in st.get("initContainerStatuses") or []:
            for state in (cs.get("state") or {}, cs.get("lastState") or {}):
                term = state.get("terminated")
                if term and term.get("exitCode", 0) != 0:
                    message = term.get("message") or ""
                    try:
                        result = validate_tolerant(FetchResult, json.loads(message))
                        return result.reason, f"pod {name}: adapter fetch failed: {result.message}"
                    except (ValueError, ValidationError):
                        return "InitContainerFailed", f"pod {name}: init container {cs['name']} exited " \
                                                      f"{term.get('exitCode')}: {message.strip()[-300:]}"
        for cs in st.get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            last = (cs.get("lastState") or {}).get("terminated") or {}
            if waiting.get("reason") in FATAL_WAITING or cs.get("restartCount", 0) >= CRASH_RESTARTS:
                detail = (last.get("message") or waiting.get("message") or "").strip()[-300:]
                return "CrashLoop", (f"pod {name}: container {cs['name']} "
                                     f"{waiting.get('reason') or 'restarting'} after {cs.get('restartCount', 0)} "
                                     f"restart(s), last exit {last.get('exitCode')}: {detail}").rstrip(": ")
        if st.get("phase") == "Failed":
            return "PodFailed", f"pod {name} failed: {st.get('message') or st.get('reason') or ''}"
    return None


def _pod_ready(pod: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def deployment_ready(dep: dict[str, Any]) -> bool:
    """Rolled out completely: every replica updated, available, and no old replica left."""
    spec, st = dep.get("spec") or {}, dep.get("status") or {}
    want = spec.get("replicas", 1)
    return (st.get("observedGeneration", 0) >= dep["metadata"].get("generation", 0)
            and st.get("updatedReplicas", 0) >= want and st.get("readyReplicas", 0) >= want
            and st.get("availableReplicas", 0) >= want and st.get("replicas", 0) == want)


POD_STATUS_TIMEOUT = 2.0
"""Seconds to wait for one sidecar's status document (a tick reads one per pod)."""


def read_pod_status(ip: str, port: int) -> Optional[dict[str, Any]]:
    """A vLLM pod's sidecar status document (`api.pods.AdapterSyncStatus`), None when it does not answer."""
    host = f"[{ip}]" if ":" in ip else ip
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{SYNC_STATUS_PATH}", timeout=POD_STATUS_TIMEOUT) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def pod_set_failure(pod_name: str, report: AdapterSyncStatus, want: dict[str, str]) -> Optional[tuple[str, str]]:
    """(reason, message) when the pod's sidecar could not load a version of `want` (name -> sha256).
    Errors about another digest are history; an unreachable server is retried by the sidecar."""
    for name, err in sorted(report.errors.items()):
        if name in want and err.sha256 in (None, want[name]) and err.reason != "ServerUnreachable":
            return "AdapterLoadFailed", (f"pod {pod_name}: adapter {name}@{want[name][:12]} not loaded: "
                                         f"{err.reason}: {err.message}")[:1024]
    return None


def job_result(pods: list[dict[str, Any]]) -> Optional[OnlineEvalResult]:
    """The evaluation Job's verdict from its pod's termination message (None while running)."""
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated")
            if not term:
                continue
            message = term.get("message") or ""
            try:
                return validate_tolerant(OnlineEvalResult, json.loads(message))
            except (ValueError, ValidationError):
                return OnlineEvalResult(outcome="Error", reason="EvaluatorFailed",
                                        message=f"exit {term.get('exitCode')}: {message.strip()[-300:]}")
    return None


class Reconciler:
    """One tick for one AdapterDeployment. `kube` is a `ragtune.runtime.kube.Kube`-like client."""

    def __init__(self, kube, operator_image: str, clock: Callable[[], float] = time.time,
                 post_events: bool = True,
                 pod_status: Callable[[str, int], Optional[dict[str, Any]]] = read_pod_status):
        """`post_events` False: the caller posts `Outcome.events` (the operator does, through kopf's
        event queue like the FineTuneJob controller). `pod_status(ip, port)` reads a vLLM pod's
        sidecar status document."""
        self.kube = kube
        self.operator_image = operator_image
        self.clock = clock
        self.post_events = post_events
        self.pod_status = pod_status

    # --- entry point -----------------------------------------------------------------------

    def tick(self, namespace: str, name: str) -> Outcome:
        body = self.kube.get("AdapterDeployment", namespace, name)
        out = Outcome()
        if body is None or body["metadata"].get("deletionTimestamp"):
            return out
        meta = body["metadata"]
        out.involved = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
                        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid")}}
        old = body.get("status") or {}
        try:
            spec = AdapterDeploymentSpec.model_validate(body["spec"], context=IN_CLUSTER)
            status = validate_tolerant(AdapterDeploymentStatus, old)
        except ValidationError as exc:
            err = exc.errors()[0]
            message = f"spec.{'.'.join(map(str, err['loc']))}: {err['msg']}"
            new = {**old, "phase": "Failed", "message": message, "observedGeneration": meta.get("generation")}
            out.phase = "Failed"
            if new != old:
                self._write(body, old, new)
                out.events.append(("Warning", "InvalidSpec", message))
                self._post(body, out)
            return out
        state = _Tick(self, body, spec, status, out)
        try:
            state.run()
        except KubeError as err:
            if err.status not in REFUSED:
                raise
            state.refused(err)
        out.again = state.again()
        out.phase = state.status.phase.value if state.status.phase else None
        try:
            self._write(body, old, state.status.to_wire())
        except KubeError as err:
            if err.status != 409:
                raise
            # Someone wrote the object since we read it: redo the step at once. What this tick did
            # (a canary created, a Job started) happened all the same, so its Events still go out.
            out.again = 0.0
        self._post(body, out)
        return out

    def _post(self, body: dict[str, Any], out: Outcome) -> None:
        if not self.post_events:
            return
        for type_, reason, message in out.events:
            try:
                self.kube.event(body, type_, reason, message)
            except KubeError as err:  # events are best effort
                log.debug("event not recorded: %s", err)

    def _write(self, body: dict[str, Any], old: dict[str, Any], new: dict[str, Any]) -> None:
        """Write the status, guarded by the resourceVersion read at the start of the tick. A
        conflict caused only by a metadata write (kopf's finalizer and annotations land right after
        creation) is not a reason to redo the step: when the status and the generation are still
        what the tick read, the same status is written again on the fresh resourceVersion."""
        if new == old:
            return
        patch = merge_diff(old, new)
        meta = body["metadata"]
        version = meta["resourceVersion"]
        for attempt in range(3):
            try:
                self.kube.merge_patch("AdapterDeployment", meta["namespace"], meta["name"],
                                      {"metadata": {"resourceVersion": version}, "status": patch}, sub="status")
                return
            except KubeError as err:
                if err.status != 409 or attempt == 2:
                    raise
                fresh = self.kube.get("AdapterDeployment", meta["namespace"], meta["name"])
                if fresh is None or (fresh.get("status") or {}) != old or \
                        fresh["metadata"].get("generation") != meta.get("generation"):
                    raise
                version = fresh["metadata"]["resourceVersion"]


class _Tick:
    def __init__(self, rec: Reconciler, body: dict[str, Any], spec: AdapterDeploymentSpec,
                 status: AdapterDeploymentStatus, out: Outcome):
        self.rec, self.kube, self.body, self.spec, self.out = rec, rec.kube, body, spec, out
        self.status = status.model_copy(deep=True)
        meta = body["metadata"]
        self.ns, self.name, self.generation = meta["namespace"], meta["name"], meta.get("generation", 1)
        self.owner = render.Owner(self.name, self.ns, meta["uid"])
        self.waiting_for_ftj = False
        self.hint: Optional[float] = None
        """Seconds until the rollout needs another look (traffic pauses), instead of the poll interval."""
        self.backend = spec.server.backend.value
        self.dynamic = self.backend == "vllm"
        """The adapter set lives in a ConfigMap the pods' sidecars load (vLLM), not in the template."""

    # --- helpers -----------------------------------------------------------------------------

    def wait_hint(self, seconds: float) -> None:
        self.hint = seconds if self.hint is None else min(self.hint, seconds)

    def again(self) -> Optional[float]:
        if self.status.candidate is not None:
            if self.hint is not None:
                return max(self.hint, ROLLOUT_POLL_SECONDS)
            return FINETUNEJOB_WAIT_SECONDS if self.waiting_for_ftj else ROLLOUT_POLL_SECONDS
        if not self.status.serving:
            return None
        if self.status.bake is not None:
            return max(self.hint if self.hint is not None else bake.wait(self) or 0.0, ROLLOUT_POLL_SECONDS)
        # Our stable server's pods are watched: their events bring a degraded one back.
        return REFERENCED_HEALTH_SECONDS if self.spec.server.deployment_ref else None

    def refused(self, err: KubeError) -> None:
        """The API server refused an object rendered from this spec (a name it cannot take, an
        empty image or env var name, ...): retrying cannot help, so the rollout ends Failed with the
        API server's message, which names the field."""
        message = f"the API server refused an object rendered from this spec: {err.message}"[:1024]
        try:
            self.finish("Failed", "RejectedByAPIServer", message)
        except KubeError:  # the clean-up was refused too: still say what is wrong
            self.status.candidate = None
            self.status.observed_generation = self.generation
            self.status.phase, self.status.message = Phase("Failed"), message
            self.cond("Progressing", False, "RejectedByAPIServer", message)
            self.event("Warning", "RejectedByAPIServer", message)

    def event(self, type_: str, reason: str, message: str) -> None:
        self.out.events.append((type_, reason, message))

    def cond(self, type_: str, ok: bool | str, reason: str, message: str = "") -> None:
        conditions = [c.to_wire() for c in self.status.conditions]
        self.status.conditions = [Condition.model_validate(c) for c in
                                  set_condition(conditions, type_, ok, reason, message, self.generation)]

    def get_ftj(self, ftj_name: str) -> Optional[dict[str, Any]]:
        return self.kube.get("FineTuneJob", self.ns, ftj_name)

    def stable_name(self) -> str:
        ref = self.spec.server.deployment_ref
        return ref.name if ref else render.stable_name(self.name, self.backend)

    def canary_name(self) -> str:
        return render.canary_name(self.name, self.backend)

    def pods_of(self, dep: dict[str, Any], desired: dict[str, Any]) -> list[dict[str, Any]]:
        """Live pods of `dep` that run the desired template (old pods' crashes are not ours)."""
        pods = self.kube.list("Pod", self.ns, dep["spec"]["selector"]["matchLabels"])
        want = render.live_template_hash(desired)
        pods = [p for p in pods if (p["metadata"].get("annotations") or {}).get(render.ANNOTATION_TEMPLATE) == want]
        return [p for p in pods if not p["metadata"].get("deletionTimestamp")]

    # --- vLLM: the desired-set ConfigMap and what each pod serves ---

    def write_set(self, adapters: list[ResolvedAdapter], *, canary: bool, generation: int) -> bool:
        """Make the desired-set ConfigMap hold `adapters` (one write when it differs); True when written."""
        desired = render.adapter_set_configmap(self.spec, adapters, self.owner, canary=canary, generation=generation)
        cm = self.kube.get("ConfigMap", self.ns, desired["metadata"]["name"])
        if render.configmap_set_digest(cm) == render.configmap_set_digest(desired):
            return False
        desired["metadata"]["annotations"][ANNOTATION_ROLLED_AT] = str(int(self.rec.clock()))
        if cm is None:
            self.kube.create(desired)
        else:
            desired["metadata"]["resourceVersion"] = cm["metadata"]["resourceVersion"]
            self.kube.replace(desired)
        return True

    def set_written_at(self, canary: bool) -> Optional[float]:
        cm = self.kube.get("ConfigMap", self.ns, render.adapter_set_name(self.name, canary))
        stamp = ((cm or {}).get("metadata", {}).get("annotations") or {}).get(ANNOTATION_ROLLED_AT)
        return float(stamp) if stamp else None

    def serving_progress(self, dep: dict[str, Any], desired: dict[str, Any], adapters: list[ResolvedAdapter],
                         ) -> tuple[list[dict[str, Any]], Optional[tuple[str, str]], list[str]]:
        """(the pods of `desired`'s template, a pod failure or failed load, the ready pods not serving
        `adapters` yet): what the canary and promotion steps both wait on."""
        pods = self.pods_of(dep, desired)
        failure = pod_failure(pods)
        behind: list[str] = []
        if failure is None and self.dynamic:
            failure, behind = self.set_progress(pods, adapters)
            if failure:
                self.set_failed(failure)
        return pods, failure, behind

    def set_progress(self, pods: list[dict[str, Any]],
                     adapters: list[ResolvedAdapter]) -> tuple[Optional[tuple[str, str]], list[str]]:
        """(a pod's load failure, the ready pods that do not serve `adapters` yet): one status
        document per running pod of the desired template."""
        want = {a.name: a.sha256 for a in adapters}
        port = render.sidecar_ports(self.spec.server.port)[1]
        behind = []
        for pod in pods:
            st = pod.get("status") or {}
            raw = self.rec.pod_status(st["podIP"], port) if st.get("podIP") and st.get("phase") == "Running" else None
            try:
                report = validate_tolerant(AdapterSyncStatus, raw) if raw is not None else None
            except ValidationError:
                report = None
            name = pod["metadata"]["name"]
            if report is not None:
                failure = pod_set_failure(name, report, want)
                if failure:
                    return failure, behind
            if _pod_ready(pod) and (report is None or report.loaded != want):
                behind.append(name)
        return None, behind

    def set_failed(self, failure: tuple[str, str]) -> None:
        """A pod could not load the new set: say so on the object (a condition; the Event comes with the rollback)."""
        self.cond("AdaptersLoaded", False, *failure)

    def set_served(self, name: str, adapters: list[ResolvedAdapter], pods: int) -> None:
        self.cond("AdaptersLoaded", True, "AllPodsServe",
                  f"all {pods} ready pod(s) of {name} serve {', '.join(render.short_set(adapters)) or 'no adapter'}")

    # --- the state machine ---------------------------------------------------------------------

    def run(self) -> None:
        cand = self.status.candidate
        if cand is not None and cand.generation != self.generation and cand.step != "Promoting":
            # A newer spec: abort this rollout cleanly before starting the next (never interleave).
            self.finish("RolledBack", "Superseded", f"generation {self.generation} replaced the spec mid-rollout")
            cand = None
        if cand is None:
            followed: list[FollowedRun] = []
            if self.status.observed_generation == self.generation and self.status.phase is not None:
                followed = followed_updates(self.spec, self.get_ftj, self.status.serving, self.rejected())
                if not followed:
                    bake.look(self)
                    self.watch_stable()
                    return
            cand = self.start_rollout(followed)
        step = {"Resolving": self.resolving, "OfflineGate": self.after_offline_gate, "Canary": self.canary,
                "OnlineGate": self.online_gate, "Traffic": self.traffic_step, "Promoting": self.promoting}.get(cand.step)
        if step:
            step(cand)

    def start_rollout(self, followed: list[FollowedRun]) -> Candidate:
        """A new candidate: the spec's new generation, or (`followed`) the serving set with the
        new runs of followed FineTuneJobs."""
        bake.abandon(self)
        cand = Candidate(generation=self.generation, step="Resolving", started_at=now(),
                         followed=[f.adapter for f in followed])
        self.status.candidate = cand
        self.status.gates = GateReport()
        self.status.phase = Phase("Pending")
        if followed:
            what = "; ".join(f"adapter {f.adapter}: FineTuneJob {f.fine_tune_job} succeeded with {f.sha256[:12]}"
                             + (f" (serving {f.serving_sha256[:12]})" if f.serving_sha256 else "") for f in followed)
            self.cond("Progressing", True, "FollowedRunSucceeded", f"rolling out {what}")
            self.event("Normal", "FollowedRunSucceeded", f"rollout started by a followed run: {what}")
        else:
            self.cond("Progressing", True, "RolloutStarted", f"rolling out generation {self.generation}")
            self.event("Normal", "RolloutStarted", f"rollout of generation {self.generation} started")
        return cand

    def rejected(self) -> set[str]:
        """`name@sha256-prefix` of every adapter in a rollout that did not end Promoted (within
        `status.history`): a followed run that failed its gates is not tried again."""
        return {a for r in self.status.history if r.outcome != "Promoted" for a in r.adapters}

    def resolve(self, cand: Candidate) -> Resolution:
        if cand.followed:
            return resolve(self.spec, self.get_ftj, followed=cand.followed, serving=self.status.serving)
        return resolve(self.spec, self.get_ftj)

    @staticmethod
    def candidate_id(cand: Candidate) -> str:
        """One evaluation Job per rollout: a followed run's rollout shares the spec's generation,
        so its Job's name carries its candidate set's digest too."""
        return render.adapter_set_digest(cand.adapters)[:8] if cand.followed else ""

    def eval_job_name(self, cand: Candidate) -> str:
        return render.eval_job_name(self.name, cand.generation, self.candidate_id(cand))

    def resolving(self, cand: Candidate) -> None:
        try:
            res = self.resolve(cand)
        except NotReady as exc:
            self.status.phase, self.status.message = Phase.PENDING, str(exc)
            self.cond("Progressing", True, "WaitingForFineTuneJob", str(exc))
            self.waiting_for_ftj = True
            return
        except ResolveError as exc:
            self.finish("Failed", exc.reason, str(exc))
            return
        cand.adapters = res.adapters
        cand.changed = changed_adapters(res.adapters, self.status.serving)
        removed = sorted({a.name for a in self.status.serving} - {a.name for a in res.adapters})
        cand.step = "OfflineGate"
        self.status.phase = Phase("Gating")
        results = {n: offline_gate(self.spec.gates, res.metrics.get(n)) for n in cand.changed if n in res.metrics}
        self.status.gates = GateReport(offline=results)
        failures = offline_failures(results)
        if failures:
            self.finish("RolledBack", "OfflineGateFailed", failures)
            return
        if not cand.changed and not removed and self.stable_up_to_date(res.adapters):
            self.finish(None, "UpToDate", "the adapter set is already serving")
            return
        use_canary = self.use_canary(cand)
        if use_canary and self.spec.gates.online.enabled and not self.eval_set(res.eval_sets, cand.changed):
            self.finish("Failed", "EvalSetMissing", "the online gate needs evaluation data: set "
                        "spec.gates.online.evalSetUri (the FineTuneJobs published no held-out split "
                        "and name no dataset.eval)")
            return
        if results:
            self.event("Normal", "OfflineGatePassed", f"adapters {', '.join(results)} passed the offline gate")
        if removed:
            self.event("Normal", "AdaptersRemoved", f"removing {', '.join(removed)}")
        # Continue in the same tick: each step is idempotent and re-reads what it needs.
        self.after_offline_gate(cand)

    def use_canary(self, cand: Candidate) -> bool:
        # Traffic steps need the canary even without the online evaluation (not the first rollout:
        # with nothing serving there is no traffic to split).
        shifts = self.spec.strategy.shifts_traffic and bool(self.status.serving)
        return bool((self.spec.strategy.evaluates and self.spec.gates.online.enabled or shifts)
                    and cand.changed)

    def report_gated(self, cand: Candidate) -> list[str]:
        """Changed adapters given by `uri`: their offline gate runs on the run's eval/report.json,
        in the evaluation Job (the operator reads no S3)."""
        gates = self.spec.gates
        thresholds = [v for k, v in gates.offline.model_dump().items() if k.startswith(("min_", "max_"))]
        if not gates.require_offline_pass and all(v is None for v in thresholds):  # nothing to check
            return []
        return [a.name for a in cand.adapters if a.name in cand.changed and a.source == "uri"]

    def after_offline_gate(self, cand: Candidate) -> None:
        """OfflineGate (report-gated adapters, Direct strategy) -> Canary or Promoting."""
        if self.use_canary(cand):
            cand.step = "Canary"
            self.status.message = "starting the canary"
            self.canary(cand)
            return
        if self.report_gated(cand):
            cand.step = "OfflineGate"
            verdict = self.job_verdict(cand, online=False)
            if verdict is None:
                return
        cand.step = "Promoting"
        self.status.message = "rolling the stable server"
        self.promoting(cand)

    def eval_set(self, from_jobs: dict[str, str], changed: list[str]) -> Optional[str]:
        if self.spec.gates.online.eval_set_uri:
            return self.spec.gates.online.eval_set_uri
        return next((from_jobs[n] for n in changed if n in from_jobs), None)

    def stable_up_to_date(self, adapters: list[ResolvedAdapter]) -> bool:
        dep = self.kube.get("Deployment", self.ns, self.stable_name())
        if dep is None or not _same(dep, self.desired_stable(adapters, dep)):
            return False
        if self.dynamic:
            cm = self.kube.get("ConfigMap", self.ns, render.adapter_set_name(self.name, False))
            return render.configmap_set_digest(cm) == render.adapter_set_digest(adapters)
        return True

    # --- canary ---

    def desired_canary(self, cand: Candidate) -> Optional[dict[str, Any]]:
        """The canary Deployment: rendered from `spec.server`, or with `deploymentRef` from the
        referenced Deployment's own template (None, and the rollout fails, when it is gone)."""
        if not self.spec.server.deployment_ref:
            return render.deployment(self.spec, cand.adapters, self.owner, canary=True,
                                     operator_image=self.rec.operator_image)
        existing = self.kube.get("Deployment", self.ns, self.stable_name())
        if existing is None:
            self.finish("Failed", "DeploymentNotFound", f"spec.server.deploymentRef: Deployment {self.stable_name()} "
                        "not found")
            return None
        return render.canary_from_existing(existing, self.spec, cand.adapters, self.owner, self.rec.operator_image)

    def canary(self, cand: Candidate) -> None:
        self.status.phase = Phase("Gating")
        desired = self.desired_canary(cand)
        if desired is None:
            return
        if self.dynamic:  # before the Deployment: its pods mount it
            self.write_set(cand.adapters, canary=True, generation=cand.generation)
        dep = self.kube.get("Deployment", self.ns, desired["metadata"]["name"])
        if dep is None:
            self.kube.create(render.service(self.spec, self.owner, canary=True))
            self.kube.create(desired)
            self.event("Normal", "CanaryCreated", f"canary {desired['metadata']['name']} with "
                       f"{', '.join(render.short_set(cand.adapters))}")
            self.status.message = "canary starting"
            return
        if not _same(dep, desired):
            # A canary left from an aborted rollout: adopt it with this rollout's set (one write).
            desired["metadata"]["resourceVersion"] = dep["metadata"]["resourceVersion"]
            self.kube.replace(desired)
            return
        if self.timed_out(dep, "canary", cand):
            return
        _, failure, behind = self.serving_progress(dep, desired, cand.adapters)
        if failure:
            self.rollback(cand, *failure)
            return
        if deployment_ready(dep) and not behind:
            cand.step = "OnlineGate"
            self.status.message = "canary ready, evaluating"
            self.event("Normal", "CanaryReady", f"canary ready; online evaluation on "
                       f"{self.spec.gates.online.samples} samples")
            self.online_gate(cand)
        else:
            self.status.message = "waiting for the canary to become ready"

    def timed_out(self, dep: dict[str, Any], what: str, cand: Candidate) -> bool:
        started = _parse_time(dep["metadata"].get("creationTimestamp"))
        limit = self.spec.gates.online.timeout_seconds
        if started is not None and self.rec.clock() - started > limit:
            self.rollback(cand, "CanaryTimeout", f"{what} not done within gates.online.timeoutSeconds={limit}")
            return True
        return False

    def online_gate(self, cand: Candidate) -> None:
        canary = self.kube.get("Deployment", self.ns, self.canary_name())
        if canary is None:  # deleted under us: start the canary again
            cand.step = "Canary"
            return
        if self.timed_out(canary, "canary evaluation", cand):
            return
        desired = self.desired_canary(cand)
        if desired is None:
            return
        failure = pod_failure(self.pods_of(canary, desired))
        if failure:
            self.rollback(cand, *failure)
            return
        if self.spec.gates.online.enabled:
            if self.job_verdict(cand, online=True) is None:
                return
        elif self.report_gated(cand) and self.job_verdict(cand, online=False) is None:
            return  # traffic steps without the online evaluation: `uri` adapters still pass their offline gate
        if self.spec.strategy.shifts_traffic and self.status.serving:  # first rollout: no traffic to split
            cand.step = "Traffic"
            self.traffic_step(cand)
            return
        cand.step = "Promoting"
        self.promoting(cand)

    def traffic_step(self, cand: Candidate) -> None:
        """User traffic shifts to the canary step by step (`ragtune.adapterdeployment.traffic`)."""
        self.status.phase = Phase("RollingOut")
        canary = self.kube.get("Deployment", self.ns, self.canary_name())
        if canary is None:  # deleted under us: nothing to send traffic to
            self.rollback(cand, "CanaryMissing", f"canary {self.canary_name()} disappeared during the traffic steps")
            return
        desired = render.deployment(self.spec, cand.adapters, self.owner, canary=True,
                                    operator_image=self.rec.operator_image)
        failure = pod_failure(self.pods_of(canary, desired))
        if failure:
            self.rollback(cand, *failure)
            return
        if traffic.step(self, cand):
            cand.step = "Promoting"
            self.status.message = "canary carries all traffic; rolling the stable server"
            self.promoting(cand)

    def job_verdict(self, cand: Candidate, online: bool) -> Optional[bool]:
        """Run (create-or-adopt) the evaluation Job and read its verdict: True when it passed,
        None while it runs or after a failure (which ends the rollout)."""
        job_name = self.eval_job_name(cand)
        job = self.kube.get("Job", self.ns, job_name)
        if job is None:
            config = self.eval_config(cand, online)
            if config is None:
                return None
            self.kube.create(render.eval_job(self.spec, self.owner, cand.generation, config.to_wire(),
                                             self.rec.operator_image, self.candidate_id(cand)))
            self.status.message = "online evaluation running" if online else "offline gate on the run reports"
            return None
        result = job_result(self.kube.list("Pod", self.ns, {"job-name": job_name}))
        if result is None:
            if any(c.get("type") == "Failed" and c.get("status") == "True"
                   for c in (job.get("status") or {}).get("conditions") or []):
                self.rollback(cand, "EvaluatorFailed", f"evaluation Job {job_name} failed without a result")
            return None
        gates = self.status.gates or GateReport()
        gates.online = [OnlineGateResult.model_validate(r.to_wire()) for r in result.results]
        gates.offline.update(result.offline)
        self.status.gates = gates
        if online:
            self.out.online_gate = result.outcome == "Passed"
        if result.outcome != "Passed":
            self.rollback(cand, {"GateFailed": "OnlineGateFailed"}.get(result.reason, result.reason), result.message)
            return None
        self.event("Normal", "OnlineGatePassed" if online else "OfflineGatePassed", result.message)
        return True

    def eval_config(self, cand: Candidate, online: bool = True) -> Optional[OnlineEvalConfig]:
        try:
            res = self.resolve(cand)
        except (NotReady, ResolveError) as exc:
            self.rollback(cand, "ResolveFailed", str(exc))
            return None
        port = self.spec.server.port
        serving = {a.name for a in self.status.serving}
        stable = self.kube.get("Deployment", self.ns, self.stable_name())
        stable_url = None
        if stable is not None and serving and not self.spec.server.deployment_ref:
            stable_url = render.service_url(self.stable_name(), self.ns, port)
        by_name = {a.name: a for a in cand.adapters}
        gated = set(self.report_gated(cand))
        eval_set = self.eval_set(res.eval_sets, cand.changed) if online else None
        return OnlineEvalConfig(
            canary_url=render.service_url(self.canary_name(), self.ns, port) if online else None,
            stable_url=stable_url if online else None,
            candidates=[CandidateRef(name=n, uri=by_name[n].uri, sha256=by_name[n].sha256, serving=n in serving,
                                     offline=n in gated, prompt=res.prompts.get(n) if online else None)
                        for n in cand.changed if online or n in gated],
            eval_set_uri=eval_set, eval_set_sha256=res.eval_set_sha256.get(eval_set) if eval_set else None,
            gate=self.spec.gates.online, offline=self.spec.gates, s3=self.spec.s3, seed=cand.generation,
            backend=self.spec.server.backend.value, base_model=self.spec.base_model.id,
        )

    # --- promotion ---

    def desired_stable(self, adapters: list[ResolvedAdapter], current: Optional[dict[str, Any]]) -> dict[str, Any]:
        if self.spec.server.deployment_ref:
            assert current is not None
            desired = json.loads(json.dumps(current))
            desired["spec"]["template"] = render.patch_existing_template(
                current["spec"]["template"], self.spec, adapters, self.rec.operator_image)
            return desired
        desired = render.deployment(self.spec, adapters, self.owner, canary=False, operator_image=self.rec.operator_image)
        if current is not None:
            desired["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        return desired

    def promoting(self, cand: Candidate) -> None:
        self.status.phase = Phase("RollingOut")
        name = self.stable_name()
        dep = self.kube.get("Deployment", self.ns, name)
        if dep is None and self.spec.server.deployment_ref:
            self.finish("Failed", "DeploymentNotFound", f"spec.server.deploymentRef: Deployment {name} not found")
            return
        desired = self.desired_stable(cand.adapters, dep)
        if self.dynamic and self.write_set(cand.adapters, canary=False, generation=cand.generation) and \
                dep is not None and _same(dep, desired):
            # The running pods' sidecars load the new set: no new pods, no restart.
            self.event("Normal", "Promoting", f"loading {', '.join(render.short_set(cand.adapters)) or 'no adapter'} "
                       f"into the pods of {name} (no restart)")
            self.status.message = f"pods of {name} are loading the new set"
            return
        if dep is None:
            self.kube.create(render.service(self.spec, self.owner, canary=False))
        if dep is None or not _same(dep, desired):
            desired["metadata"].setdefault("annotations", {})[ANNOTATION_ROLLED_AT] = str(int(self.rec.clock()))
            # The whole pod template in one write: the stable server is never half-updated.
            (self.kube.create if dep is None else self.kube.replace)(desired)
            self.event("Normal", "Promoting", f"rolling {name} to {', '.join(render.short_set(cand.adapters))}")
            self.status.message = f"rolling {name}"
            return
        pods, failure, behind = self.serving_progress(dep, desired, cand.adapters)
        rolled_at = float((dep["metadata"].get("annotations") or {}).get(ANNOTATION_ROLLED_AT) or self.rec.clock())
        if self.dynamic:
            rolled_at = max(rolled_at, self.set_written_at(False) or 0.0)
        if failure is None and self.rec.clock() - rolled_at > self.spec.server.startup_timeout_seconds + 60:
            failure = ("RolloutTimeout", f"{name} did not become ready within "
                                         f"spec.server.startupTimeoutSeconds={self.spec.server.startup_timeout_seconds}"
                       + (f" ({', '.join(behind)} not serving the new set)" if behind else ""))
        if failure:
            self.revert_stable(dep)
            self.rollback(cand, *failure)
            return
        if not deployment_ready(dep):
            self.status.message = f"waiting for {name} to roll out"
            return
        if behind:
            self.status.message = f"waiting for {len(behind)} pod(s) of {name} to serve the new set: {', '.join(behind)}"
            return
        if self.dynamic:
            self.set_served(name, cand.adapters, len([p for p in pods if _pod_ready(p)]))
        if cand.traffic is not None and not traffic.back_to_stable(self, cand):
            return  # the canary serves until the Gateway routes everything to the new stable again
        self.promoted(cand)

    def revert_stable(self, dep: dict[str, Any]) -> None:
        """Put the previous adapter set back on the stable Deployment (or remove a stable
        Deployment this rollout created: nothing served before)."""
        if self.status.serving and self.dynamic:
            # The previous set, by digest: the sidecars load it back (the versions that failed never served).
            self.write_set(self.status.serving, canary=False, generation=self.status.observed_generation or 0)
            self.event("Normal", "AdapterSetRestored", f"{dep['metadata']['name']} back to "
                       f"{', '.join(render.short_set(self.status.serving))}")
        elif self.status.serving:
            desired = self.desired_stable(self.status.serving, dep)
            desired["metadata"].setdefault("annotations", {})[ANNOTATION_ROLLED_AT] = str(int(self.rec.clock()))
            self.kube.replace(desired)
        elif self.spec.server.deployment_ref:
            restored = json.loads(json.dumps(dep))
            restored["spec"]["template"] = render.restore_existing_template(dep["spec"]["template"])
            self.kube.replace(restored)
        else:
            self.kube.delete("Deployment", self.ns, dep["metadata"]["name"])
            self.kube.delete("Service", self.ns, dep["metadata"]["name"])
            self.kube.delete("PodDisruptionBudget", self.ns, dep["metadata"]["name"])
            if self.dynamic:
                self.kube.delete("ConfigMap", self.ns, render.adapter_set_name(self.name, False))

    def promoted(self, cand: Candidate) -> None:
        previous = self.status.serving
        since = {a.name: a.since for a in previous}
        old = {a.name: a.sha256 for a in previous}
        stamp = now()
        self.status.serving = [
            a.model_copy(update={"since": since[a.name] if old.get(a.name) == a.sha256 else stamp})
            for a in cand.adapters
        ]
        self.retire_other_backend()
        self.finish("Promoted", "Promoted", f"serving {', '.join(render.short_set(cand.adapters))}")
        bake.start(self, cand, previous)

    def retire_other_backend(self) -> None:
        """After a switch of `spec.server.backend`, the new server serves: remove the previous
        backend's server (names differ: `<ad>-tgi` vs `<ad>-server`), if it is ours."""
        previous = self.status.deployment_name
        if self.spec.server.deployment_ref or not previous or previous == self.stable_name():
            return
        other = "tgi" if self.dynamic else "vllm"
        if previous != render.stable_name(self.name, other):
            return
        dep = self.kube.get("Deployment", self.ns, previous)
        if dep is None or self.owner.uid not in {r.get("uid") for r in dep["metadata"].get("ownerReferences") or []}:
            return  # not ours (a user's Deployment of that name): left alone
        self.kube.delete("Deployment", self.ns, previous)
        self.kube.delete("Service", self.ns, previous)
        self.kube.delete("PodDisruptionBudget", self.ns, previous)
        if other == "vllm":
            self.kube.delete("ConfigMap", self.ns, render.adapter_set_name(self.name, False))
        self.event("Normal", "ServerReplaced", f"{self.stable_name()} ({self.backend}) serves now; removed {previous}")

    # --- endings ---

    def rollback(self, cand: Candidate, reason: str, message: str) -> None:
        self.finish("RolledBack", reason, message)

    def finish(self, outcome: Optional[str], reason: str, message: str) -> None:
        """End the rollout: remove the canary and evaluation Job, record history, set the phase.
        `outcome` None: nothing to roll (the set already serves)."""
        cand = self.status.candidate
        traffic.between_rollouts(self)  # no user request goes to the canary from here on
        self.kube.delete("Deployment", self.ns, self.canary_name())
        self.kube.delete("Service", self.ns, self.canary_name())
        if self.dynamic:
            self.kube.delete("ConfigMap", self.ns, render.adapter_set_name(self.name, True))
        if cand is not None:
            self.kube.delete("Job", self.ns, self.eval_job_name(cand))
        if outcome is not None and cand is not None:
            record = RolloutRecord(generation=cand.generation, adapters=render.short_set(cand.adapters),
                                   outcome=outcome, followed=cand.followed,
                                   reason=None if outcome == "Promoted" else f"{reason}: {message}"[:1024],
                                   started_at=cand.started_at, finished_at=now())
            self.status.history = ([record] + self.status.history)[: self.spec.history_limit]
            self.out.finished, self.out.reason = outcome, reason
            started = _parse_time(cand.started_at)
            self.out.seconds = self.rec.clock() - started if started else 0.0
        self.status.candidate = None
        self.status.observed_generation = cand.generation if cand else self.generation
        self.status.message = message if outcome != "Promoted" else f"serving {len(self.status.serving)} adapter(s)"
        if outcome == "Promoted" or outcome is None:
            self.status.phase = Phase("Ready")
            self.cond("Progressing", False, reason, message)
            self.event("Normal", reason, message)
        else:
            self.status.phase = Phase(outcome)  # RolledBack or Failed: what serves is untouched
            self.cond("Progressing", False, reason, message)
            self.event("Warning", reason, message)
        self.refresh_serving_fields()
        self.watch_stable(keep_phase=outcome not in ("Promoted", None))

    def refresh_serving_fields(self) -> None:
        self.status.serving_adapters = ",".join(a.name for a in self.status.serving) or None
        if self.status.serving:
            self.status.deployment_name = self.stable_name()
            if not self.spec.server.deployment_ref:
                self.status.endpoint = render.service_url(self.stable_name(), self.ns, self.spec.server.port)

    def ensure_disruption_budget(self) -> None:
        """The stable server's PodDisruptionBudget as the spec wants it (`render.pod_disruption_budget`):
        created, updated (replicas or backend changed) or removed (one replica). One GET per tick
        between rollouts; a PDB of that name that is not ours is left alone."""
        if self.spec.server.deployment_ref:
            return
        name = self.stable_name()
        desired = render.pod_disruption_budget(self.spec, self.owner)
        live = self.kube.get("PodDisruptionBudget", self.ns, name)
        if live is not None and self.owner.uid not in {r.get("uid") for r in live["metadata"].get("ownerReferences") or []}:
            return
        if desired is None:
            if live is not None:
                self.kube.delete("PodDisruptionBudget", self.ns, name)
            return
        if live is None:
            self.kube.create(desired)
        elif {k: live["spec"].get(k) for k in desired["spec"]} != desired["spec"]:
            desired["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
            self.kube.replace(desired)

    def watch_stable(self, keep_phase: bool = True) -> None:
        """Between rollouts: report the stable server's health; recreate it if someone deleted it."""
        traffic.between_rollouts(self)
        if not self.status.serving:
            self.cond("Ready", False, "NothingServing", "no adapter set has been promoted yet")
            return
        self.ensure_disruption_budget()
        dep = self.kube.get("Deployment", self.ns, self.stable_name())
        if dep is None and not self.spec.server.deployment_ref:
            self.kube.create(render.service(self.spec, self.owner, canary=False))
            if self.dynamic:
                self.write_set(self.status.serving, canary=False, generation=self.status.observed_generation or 0)
            self.kube.create(self.desired_stable(self.status.serving, None))
            self.event("Warning", "StableRecreated", f"{self.stable_name()} was missing; recreated it")
            dep = None
        ready = dep is not None and (dep.get("status") or {}).get("readyReplicas", 0) >= 1
        if dep is not None and not ready and not self.spec.server.deployment_ref:
            # A pod's event brought us here; the Deployment's status may not count that pod yet.
            pods = self.kube.list("Pod", self.ns, dep["spec"]["selector"]["matchLabels"])
            ready = any(_pod_ready(p) for p in pods if not p["metadata"].get("deletionTimestamp"))
        if ready:
            self.cond("Ready", True, "Serving", f"serving {self.status.serving_adapters}")
            if not bake.failed_and_kept(self):  # healthy pods do not undo a failed bake: a new spec does
                self.cond("Degraded", False, "Serving")
                if self.status.phase == "Degraded" or not keep_phase and self.status.phase != "Ready":
                    self.status.phase = Phase("Ready")
        else:
            self.cond("Ready", False, "ServerNotReady", f"{self.stable_name()} has no ready replica")
            self.cond("Degraded", True, "ServerNotReady", f"{self.stable_name()} has no ready replica")
            if self.status.phase == "Ready":
                self.status.phase = Phase("Degraded")
