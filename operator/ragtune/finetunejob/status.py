"""Job + pods -> FineTuneJob status (pure functions; no Kubernetes calls).

The controller keeps compact views of the objects it watches (`JobView`, `PodView`) and derives
the whole status from them on every change, so the status converges after an operator restart
without any state of its own. Conditions:

- `Ready`: the inputs resolved and the training pod started (False with `SecretNotFound`,
  `SecretKeyNotFound`, `ImagePullFailed`, `Unschedulable`, `JobCreateFailed`, ...).
- `Running`: a trainer pod is running (False while pending, retrying, suspended or finished).
- `Succeeded`: Unknown while in progress (its reason says what the run waits for), True when
  the run completed and passed its gates, False with the failure reason.
- `Failed` / `Suspended`: present once they happened; True while they hold.

A run with `spec.queueName` whose Job Kueue holds suspended is `Queued`; the reason Kueue gives
(its Workload's `QuotaReserved` / `Evicted` condition, `WorkloadView`) is the `Ready` reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Optional

from pydantic import ValidationError

from ragtune.api.base import validate_tolerant
from ragtune.api.finetunejob import MAX_ATTEMPT_HISTORY, FineTuneJobStatus, Phase, TrainingProgress
from ragtune.api.gates import describe_failures
from ragtune.api.keys import ANNOTATION_JOB_COMPLETION_INDEX, GROUP_VERSION, LABEL_KUEUE_QUEUE_NAME
from ragtune.api.pods import EXIT_PERMANENT, OOM_REMEDIES, PROMPT_JSON, TrainerResult
from ragtune.runtime.conditions import get_condition, set_condition

from .render import (
    ANNOTATION_FINETUNEJOB,
    ANNOTATION_SPEC_HASH,
    CONTAINER,
    DISRUPTION_IGNORED,
    LABEL_GENERATION,
    LABEL_RUN_ID,
)

TERMINAL_PHASES = (Phase.SUCCEEDED.value, Phase.FAILED.value)

# Reasons that deserve a Warning event (a person may have to act).
WARNING_REASONS = {
    "SecretNotFound", "SecretKeyNotFound", "ContainerConfigError", "ImagePullFailed", "Unschedulable",
    "JobCreateFailed", "InvalidSpec", "Evicted", "Preempted", "TrainerFailed", "Retrying", "OutOfMemory",
}
_IMAGE_PULL_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
_END_CONDITIONS = ("Complete", "SuccessCriteriaMet", "Failed", "FailureTarget")


# --- Compact views of watched objects (what the controller's indexes keep) -------------


@dataclass(frozen=True)
class Cond:
    type: str
    status: str
    reason: str = ""
    message: str = ""
    time: Optional[str] = None


def _conds(items: Optional[list[dict]]) -> tuple[Cond, ...]:
    return tuple(
        Cond(c.get("type", ""), c.get("status", ""), c.get("reason") or "", c.get("message") or "",
             c.get("lastTransitionTime"))
        for c in items or []
    )


@dataclass(frozen=True)
class JobView:
    name: str
    uid: str
    owner_uid: Optional[str]
    generation: int
    run_id: str
    spec_hash: str
    suspend: bool
    backoff_limit: int
    active_deadline: Optional[int]
    active: int = 0
    succeeded: int = 0
    failed: int = 0
    start_time: Optional[str] = None
    completion_time: Optional[str] = None
    conditions: tuple[Cond, ...] = ()
    created: str = ""
    deleting: bool = False
    completions: int = 1
    """Pods of one attempt: `resources.nodes` (an Indexed Job), 1 for a single-pod run."""
    queue_name: str = ""
    """The Kueue LocalQueue that admits the Job (its `kueue.x-k8s.io/queue-name` label), if any."""
    ignores_disruption: bool = False
    """Its podFailurePolicy leaves preempted/evicted pods out of the failure count (Jobs rendered
    since the rule exists; older single-pod Jobs count them)."""

    @classmethod
    def from_body(cls, body: dict) -> "JobView":
        meta, spec, status = body.get("metadata", {}), body.get("spec", {}), body.get("status") or {}
        labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
        owner = next((o for o in meta.get("ownerReferences") or [] if o.get("controller")), None)
        try:
            generation = int(labels.get(LABEL_GENERATION, "0"))
        except ValueError:
            generation = 0
        return cls(
            name=meta.get("name", ""),
            uid=meta.get("uid", ""),
            owner_uid=owner.get("uid") if owner else None,
            generation=generation,
            run_id=labels.get(LABEL_RUN_ID, ""),
            spec_hash=annotations.get(ANNOTATION_SPEC_HASH, ""),
            suspend=bool(spec.get("suspend")),
            backoff_limit=int(spec.get("backoffLimit") or 0),
            active_deadline=spec.get("activeDeadlineSeconds"),
            active=int(status.get("active") or 0),
            succeeded=int(status.get("succeeded") or 0),
            failed=int(status.get("failed") or 0),
            start_time=status.get("startTime"),
            completion_time=status.get("completionTime"),
            conditions=_conds(status.get("conditions")),
            created=meta.get("creationTimestamp", ""),
            deleting=bool(meta.get("deletionTimestamp")),
            completions=int(spec.get("completions") or 1) if spec.get("completionMode") == "Indexed" else 1,
            queue_name=labels.get(LABEL_KUEUE_QUEUE_NAME, ""),
            ignores_disruption=DISRUPTION_IGNORED in ((spec.get("podFailurePolicy") or {}).get("rules") or []),
        )

    def condition(self, type_: str) -> Optional[Cond]:
        return next((c for c in self.conditions if c.type == type_ and c.status == "True"), None)

    @property
    def queued(self) -> bool:
        """Held by Kueue: suspended, with a queue (the operator never suspends such a Job)."""
        return self.suspend and bool(self.queue_name)

    @property
    def attempts_allowed(self) -> int:
        """Attempts the Job's backoffLimit allows (a multi-node attempt fails all its pods)."""
        return (self.backoff_limit + 1) // max(self.completions, 1) or 1

    def run_control(self) -> dict:
        """The Job's mutable run-control fields, in Job spec form."""
        out: dict[str, Any] = {"suspend": self.suspend, "backoffLimit": self.backoff_limit}
        if self.active_deadline is not None:
            out["activeDeadlineSeconds"] = self.active_deadline
        return out


@dataclass(frozen=True)
class PodView:
    name: str
    job_name: str
    ftj_name: str
    created: str
    phase: str
    reason: str = ""
    message: str = ""
    node: str = ""
    deleting: bool = False
    conditions: tuple[Cond, ...] = ()
    waiting_reason: str = ""
    waiting_message: str = ""
    running: bool = False
    exit_code: Optional[int] = None
    terminated_reason: str = ""
    termination_message: str = ""
    finished_at: str = ""
    """When the trainer container terminated (`state.terminated.finishedAt`)."""
    memory_limit: str = ""
    """The trainer container's `resources.limits.memory` (the operator sets it from spec.resources.memory)."""
    index: Optional[int] = None
    """Completion index of a multi-node run's pod (index 0 runs rank 0, which alone writes the result)."""

    @classmethod
    def from_body(cls, body: dict) -> "PodView":
        meta, spec, status = body.get("metadata", {}), body.get("spec", {}), body.get("status") or {}
        labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
        statuses = status.get("containerStatuses") or []
        cs = next((c for c in statuses if c.get("name") == CONTAINER), statuses[0] if statuses else {})
        state = cs.get("state") or {}
        waiting, terminated = state.get("waiting") or {}, state.get("terminated") or {}
        containers = spec.get("containers") or []
        trainer = next((c for c in containers if c.get("name") == CONTAINER), containers[0] if containers else {})
        return cls(
            name=meta.get("name", ""),
            job_name=labels.get("batch.kubernetes.io/job-name") or labels.get("job-name", ""),
            ftj_name=annotations.get(ANNOTATION_FINETUNEJOB, ""),
            created=meta.get("creationTimestamp", ""),
            phase=status.get("phase", "Pending"),
            reason=status.get("reason") or "",
            message=status.get("message") or "",
            node=spec.get("nodeName") or "",
            deleting=bool(meta.get("deletionTimestamp")),
            conditions=_conds(status.get("conditions")),
            waiting_reason=waiting.get("reason") or "",
            waiting_message=waiting.get("message") or "",
            running="running" in state,
            exit_code=terminated.get("exitCode") if terminated else None,
            terminated_reason=terminated.get("reason") or "",
            termination_message=terminated.get("message") or "",
            finished_at=terminated.get("finishedAt") or "",
            memory_limit=str(((trainer.get("resources") or {}).get("limits") or {}).get("memory") or ""),
            index=_index(annotations),
        )

    def condition(self, type_: str) -> Optional[Cond]:
        return next((c for c in self.conditions if c.type == type_), None)

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed")


def _index(annotations: dict) -> Optional[int]:
    value = annotations.get(ANNOTATION_JOB_COMPLETION_INDEX)
    return int(value) if value is not None and str(value).isdigit() else None


def primary(pods: list[PodView]) -> list[PodView]:
    """The pods that speak for the run: all of a single-pod run, index 0's of a multi-node run (rank 0
    writes the result, progress and the termination message; the other ranks only train)."""
    first = [p for p in pods if p.index in (None, 0)]
    return first or pods


@dataclass
class FtjView:
    """What the controller keeps of a FineTuneJob."""

    name: str
    namespace: str
    uid: str
    generation: int
    spec: dict
    status: dict = field(default_factory=dict)
    deleting: bool = False

    @classmethod
    def from_body(cls, body: dict) -> "FtjView":
        meta = body.get("metadata", {})
        return cls(
            name=meta.get("name", ""),
            namespace=meta.get("namespace", ""),
            uid=meta.get("uid", ""),
            generation=int(meta.get("generation") or 1),
            spec=dict(body.get("spec") or {}),
            status=dict(body.get("status") or {}),
            deleting=bool(meta.get("deletionTimestamp")),
        )

    def reference(self) -> dict:
        """Enough of the object for Events and log lines."""
        return {
            "apiVersion": GROUP_VERSION,
            "kind": "FineTuneJob",
            "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid},
        }


# --- Reading the trainer's outcome ---------------------------------------------------


def parse_result(message: str) -> Optional[TrainerResult]:
    """The TrainerResult in a termination message, or None (empty, log tail, or malformed)."""
    text = (message or "").strip()
    if not text.startswith("{"):
        return None
    try:
        return validate_tolerant(TrainerResult, json.loads(text))
    except (ValueError, ValidationError):
        return None


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _disrupted(pod: PodView) -> bool:
    cond = pod.condition("DisruptionTarget")
    return cond is not None and cond.status == "True"


def describe_pod_failure(pod: PodView) -> tuple[str, str]:
    """(reason, message) for a pod that ended without success."""
    if _disrupted(pod):
        disruption = pod.condition("DisruptionTarget")
        reason = "Preempted" if disruption.reason == "PreemptionByScheduler" else "Evicted"
        return reason, _one_line(f"pod {pod.name}: {disruption.message or disruption.reason}")
    if pod.reason == "Evicted":
        return "Evicted", _one_line(f"pod {pod.name} was evicted: {pod.message}")
    if pod.terminated_reason == "OOMKilled":  # the kernel killed it: whatever it wrote last is moot
        limit = f"its memory limit spec.resources.memory={pod.memory_limit}" if pod.memory_limit \
            else "the node's memory"
        return "OutOfMemory", (f"the trainer (pod {pod.name}) was OOM-killed: it needed more than {limit}; "
                               f"{OOM_REMEDIES}")
    result = parse_result(pod.termination_message)
    if result is not None and result.outcome == "Failed":
        return result.reason, _one_line(result.message or f"trainer reported {result.reason}")
    if pod.exit_code is not None:
        tail = f": {_one_line(pod.termination_message, 200)}" if pod.termination_message.strip() else ""
        return "TrainerFailed", f"trainer exited with code {pod.exit_code}{tail}"
    if pod.deleting or pod.phase == "Failed":
        return "PodFailed", _one_line(f"pod {pod.name} {pod.reason or 'failed'}: {pod.message}".rstrip(": "))
    return "TrainerFailed", f"pod {pod.name} failed"


def diagnose_pending(pod: PodView) -> Optional[tuple[str, str]]:
    """(reason, message) when a pending pod is stuck on something a person must fix."""
    waiting, msg = pod.waiting_reason, pod.waiting_message
    if waiting == "CreateContainerConfigError":
        low = msg.lower()
        if "couldn't find key" in low or "key not found" in low:
            return "SecretKeyNotFound", _one_line(f"a key the pod needs is missing from its Secret: {msg}")
        if "secret" in low and "not found" in low:
            return "SecretNotFound", _one_line(f"a Secret the pod needs does not exist: {msg}")
        return "ContainerConfigError", _one_line(msg or "the container's configuration cannot be resolved")
    if waiting in _IMAGE_PULL_REASONS:
        return "ImagePullFailed", _one_line(f"the trainer image cannot be pulled ({waiting}): {msg}")
    scheduled = pod.condition("PodScheduled")
    if scheduled is not None and scheduled.status == "False" and scheduled.reason == "Unschedulable":
        return "Unschedulable", _one_line(
            f"no node can run the training pod yet (still waiting): {scheduled.message}"
        )
    return None


def _score(result: TrainerResult) -> Optional[str]:
    a = result.adapter
    if a is None:
        return None
    f1 = "-" if a.f1 is None else f"{a.f1:.2f}"
    refusal = "-" if a.refusal_rate is None else f"{a.refusal_rate:.2f}"
    return f"F1 {f1} / refusal {refusal}"


def result_fields(result: TrainerResult) -> dict[str, Any]:
    """Status fields carried by a TrainerResult (adapter, metrics, score)."""
    out: dict[str, Any] = {}
    if result.adapter_uri and result.manifest_sha256:
        adapter = {"uri": result.adapter_uri, "sha256": result.manifest_sha256}
        if result.adapter_size_bytes is not None:
            adapter["sizeBytes"] = result.adapter_size_bytes
        if result.report_uri:
            adapter["reportUri"] = result.report_uri
        if result.prompt_sha256:
            adapter["promptUri"] = result.adapter_uri.rstrip("/") + "/" + PROMPT_JSON
            adapter["promptSha256"] = result.prompt_sha256
        if result.eval_set_uri and result.eval_set_sha256:
            adapter["evalSetUri"] = result.eval_set_uri
            adapter["evalSetSha256"] = result.eval_set_sha256
        out["adapter"] = adapter
    if result.adapter is not None or result.base is not None or result.gates:
        metrics: dict[str, Any] = {
            "base": result.base.to_wire() if result.base else {"samples": 0},
            "adapter": result.adapter.to_wire() if result.adapter else {"samples": 0},
            "gates": [g.to_wire() for g in result.gates],
        }
        if result.passed is not None:
            metrics["passed"] = result.passed
        if result.foreign_prompt is not None:
            metrics["foreignPrompt"] = result.foreign_prompt.to_wire()
        if result.foreign_prompt_gap is not None:
            metrics["foreignPromptGap"] = result.foreign_prompt_gap.to_wire()
        out["metrics"] = metrics
    score = _score(result)
    if score:
        out["score"] = score
    return out


# --- The assessment -----------------------------------------------------------------


@dataclass
class Assessment:
    phase: str
    reason: str
    """Reason of the `Succeeded` condition (also the Event reason on a transition)."""
    message: str
    ready: tuple[str, str, str]
    running: Optional[tuple[str, str, str]]
    """None: leave the `Running` condition as it is (it still describes the last failure)."""
    suspended: Optional[bool] = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkloadView:
    """What Kueue says of a queued Job: its Workload's name and conditions."""
    name: str
    conditions: tuple[Cond, ...] = ()

    @classmethod
    def from_body(cls, body: dict) -> "WorkloadView":
        return cls(name=body.get("metadata", {}).get("name", ""),
                   conditions=_conds((body.get("status") or {}).get("conditions")))

    def condition(self, type_: str) -> Optional[Cond]:
        return next((c for c in self.conditions if c.type == type_), None)

    def waiting_reason(self) -> tuple[str, str]:
        """(reason, message) of why the Workload does not run: evicted (e.g. preempted) or not
        (yet) given quota (`Pending`, `Inadmissible` for a missing LocalQueue, ...)."""
        evicted = self.condition("Evicted")
        if evicted is not None and evicted.status == "True":
            return evicted.reason or "Evicted", evicted.message
        reserved = self.condition("QuotaReserved")
        if reserved is not None and reserved.status == "False":
            return reserved.reason or "Pending", reserved.message
        admitted = self.condition("Admitted")
        if admitted is not None and admitted.status == "True":
            return "Admitted", f"admitted ({admitted.message or 'quota reserved'}); Kueue is starting the Job"
        return "Pending", "waiting for Kueue to reserve quota"


def _assess_queued(job: JobView, workload: Optional[WorkloadView]) -> Assessment:
    if workload is None:
        kueue_reason, detail = "Pending", (f"no Kueue Workload for Job {job.name} yet (is Kueue installed, "
                                           f"managing batch/job, with LocalQueue {job.queue_name} here?)")
    else:
        kueue_reason, detail = workload.waiting_reason()
    msg = _one_line(f"queued in LocalQueue {job.queue_name} (Job {job.name}): {kueue_reason}: {detail}", 600)
    return Assessment(Phase.QUEUED.value, "Queued", msg, ("False", kueue_reason, msg),
                      ("False", "Queued", msg), suspended=False)


def _newest(pods: list[PodView]) -> Optional[PodView]:
    return max(pods, key=lambda p: (p.created, p.name)) if pods else None


def _attempts(job: JobView, pods: list[PodView]) -> int:
    # A succeeded pod may not be counted in `succeeded` yet (uncountedTerminatedPods).
    done = 1 if job.condition("SuccessCriteriaMet") or job.condition("Complete") else 0
    pods_started = max(job.active + job.succeeded + job.failed, len(pods), job.failed + done)
    if job.completions > 1:  # one attempt is one pod per node
        return max(-(-pods_started // job.completions), len(primary(pods)), 1 if pods_started else 0)
    return pods_started


def _end_time(job: JobView, pods: list[PodView]) -> Optional[str]:
    """When the run ended: the Job's completion, else its ending condition, else — when the run is
    seen to end from its pod before the Job says so — when the newest pod's trainer terminated."""
    newest = _newest(pods)
    return job.completion_time or next(
        (c.time for c in job.conditions if c.type in _END_CONDITIONS and c.status == "True" and c.time),
        newest.finished_at if newest is not None and newest.finished_at else None)


def assess(job: Optional[JobView], pods: list[PodView], problem: Optional[tuple[str, str]] = None,
           stage: Optional[str] = None, workload: Optional[WorkloadView] = None) -> Assessment:
    """What phase and conditions the run is in. `problem` is a failure to create the Job;
    `stage` the trainer's last reported stage (from its progress lines); `workload` what Kueue
    says of a queued Job."""
    if job is None:
        if problem is not None:
            reason, message = problem
            return Assessment(Phase.PENDING.value, reason, message, ("False", reason, message),
                              ("False", "Pending", message))
        msg = "creating the training Job"
        return Assessment(Phase.PENDING.value, "Pending", msg, ("Unknown", "Pending", msg), ("False", "Pending", msg))

    complete = job.condition("Complete") or job.condition("SuccessCriteriaMet")
    failed = job.condition("Failed") or job.condition("FailureTarget")
    if complete is not None:
        return _assess_complete(job, pods)
    if failed is not None:
        return _assess_failed(job, pods, failed)

    if job.queued:
        return _assess_queued(job, workload)
    if job.suspend:
        msg = f"suspended (Job {job.name}); set spec.suspend to false to resume the run"
        return Assessment(Phase.SUSPENDED.value, "Suspended", msg, ("Unknown", "Suspended", msg),
                          ("False", "Suspended", msg), suspended=True)

    live = [p for p in pods if not p.finished and not p.deleting]
    current = _newest(primary(live)) if live else None
    attempt = _attempts(job, pods)
    of = f"attempt {attempt} of {job.attempts_allowed}"
    stuck = _stuck_worker(job, live)
    if stuck is not None:  # rank 0 may run, but waits in the rendezvous for this one
        reason, message = stuck
        return Assessment(Phase.PENDING.value, reason, message, ("False", reason, message),
                          ("False", reason, message), suspended=False)
    if current is not None and current.running and current.phase == "Running":
        evaluating = stage == "evaluating"
        phase = Phase.EVALUATING.value if evaluating else Phase.RUNNING.value
        what = "evaluating base vs adapter" if evaluating else "training"
        msg = f"{of}: {what} (pod {current.name})"
        return Assessment(phase, phase, msg, ("True", "PodStarted", f"pod {current.name} started"),
                          ("True", "Evaluating" if evaluating else "Training", msg), suspended=False)
    if current is not None:
        problem = diagnose_pending(current)
        if problem is not None:
            reason, message = problem
            return Assessment(Phase.PENDING.value, reason, message, ("False", reason, message),
                              ("False", reason, message), suspended=False)
        msg = f"{of}: waiting for pod {current.name} to start"
        return Assessment(Phase.PENDING.value, "Pending", msg, ("Unknown", "Pending", msg),
                          ("False", "Pending", msg), suspended=False)
    if any(p.phase == "Succeeded" for p in pods):
        return _assess_complete(job, pods)  # the Job controller has not marked it Complete yet
    previous = _newest(primary([p for p in pods if p.phase == "Failed" or p.deleting]))
    ending = _ending(job, pods, previous)
    if ending is not None:
        # No retry follows: say now what the Job's end condition will say (never "Retrying").
        return _assess_failed(job, pods, ending)
    if previous is not None:
        reason, message = describe_pod_failure(previous)
        msg = (f"{of} ended ({reason}: {message}); "
               "the Job retries, resuming from the newest checkpoint")
        return Assessment(Phase.PENDING.value, "Retrying", _one_line(msg, 400), ("Unknown", "Retrying", msg),
                          ("False", reason, message), suspended=False)
    if job.failed:
        msg = (f"attempt {attempt} of {job.attempts_allowed} failed; the Job controller starts the next "
               "one after its backoff, resuming from the newest checkpoint")
        return Assessment(Phase.PENDING.value, "Retrying", msg, ("Unknown", "Retrying", msg), None, suspended=False)
    msg = f"waiting for the Job controller to create the training pod of Job {job.name}"
    return Assessment(Phase.PENDING.value, "Pending", msg, ("Unknown", "Pending", msg), ("False", "Pending", msg),
                      suspended=False)


def _stuck_worker(job: JobView, live: list[PodView]) -> Optional[tuple[str, str]]:
    """A multi-node run's worker (index > 0) that cannot start - unschedulable, image or Secret
    problem - named by its index: the run cannot train until every rank joins."""
    if job.completions <= 1:
        return None
    for pod in sorted((p for p in live if p.index), key=lambda p: (p.index, p.created)):
        problem = diagnose_pending(pod)
        if problem is not None:
            reason, message = problem
            return reason, _one_line(f"worker index {pod.index} of {job.completions} (pod {pod.name}): {message}", 600)
    return None


def _failures(job: JobView, pods: list[PodView]) -> int:
    """Failures that count against backoffLimit. A failed pod may not be counted in `failed` yet
    (uncountedTerminatedPods); a preempted one never is where the Job ignores disruptions."""
    counted = [p for p in pods if p.phase == "Failed" and not (job.ignores_disruption and _disrupted(p))]
    return max(job.failed, len(counted))


def _ending(job: JobView, pods: list[PodView], last: Optional[PodView]) -> Optional[Cond]:
    """The end condition the Job will get for a failure that leaves no retry, before it has it:
    a permanent exit (the podFailurePolicy fails the Job) or an exhausted backoffLimit."""
    if last is not None and last.exit_code == EXIT_PERMANENT:
        return Cond("Failed", "True", "PodFailurePolicy", f"pod {last.name} exited {EXIT_PERMANENT}")
    if _failures(job, pods) > job.backoff_limit:
        return Cond("Failed", "True", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
    return None


def _assess_complete(job: JobView, pods: list[PodView]) -> Assessment:
    done = _newest(primary([p for p in pods if p.phase == "Succeeded"]))
    result = parse_result(done.termination_message) if done else None
    if result is None or result.outcome != "Succeeded":
        reason = result.reason if result is not None else "InvalidTrainerResult"
        msg = (f"the trainer exited 0 but reported {result.outcome} {result.reason}: {result.message}"
               if result is not None else
               "the trainer exited 0 without a valid result in its termination message "
               "(see ragtune.api.pods.TrainerResult); its adapter cannot be trusted")
        return Assessment(Phase.FAILED.value, reason, _one_line(msg, 400), ("True", "PodStarted", "ran"),
                          ("False", "Failed", msg), suspended=False,
                          extra=result_fields(result) if result else {})
    msg = result.message or f"run {job.run_id} completed; adapter at {result.adapter_uri}"
    return Assessment(Phase.SUCCEEDED.value, "Completed", _one_line(msg, 400), ("True", "PodStarted", "ran"),
                      ("False", "Completed", "the run completed"), suspended=False, extra=result_fields(result))


def _assess_failed(job: JobView, pods: list[PodView], failed: Cond) -> Assessment:
    last = _newest(primary([p for p in pods if p.phase == "Failed" or p.exit_code not in (None, 0)]))
    result = parse_result(last.termination_message) if last else None
    extra = result_fields(result) if result else {}
    if failed.reason == "DeadlineExceeded":
        reason = "DeadlineExceeded"
        msg = f"the run exceeded spec.activeDeadlineSeconds ({job.active_deadline} s) and was stopped"
    elif failed.reason == "BackoffLimitExceeded":
        last_reason, last_msg = describe_pod_failure(last) if last else ("Unknown", failed.message)
        # An OOM kill (exit 137, which no podFailurePolicy can tell from other kills) is the run's
        # reason: retrying the same spec hits the same wall, as the trainer's own OutOfMemory exit says.
        reason = "OutOfMemory" if last_reason == "OutOfMemory" else "BackoffLimitExceeded"
        msg = (f"{_failures(job, pods) or 1} attempt(s) failed, spec.backoffLimit is {job.backoff_limit}; "
               f"last: {last_reason}: {last_msg}")
    elif last is not None:
        reason, msg = describe_pod_failure(last)
        if reason == "GateFailed" and result is not None and result.gates:
            msg = f"the adapter failed its evaluation gates: {describe_failures(result.gates)}"
    else:
        reason, msg = failed.reason or "JobFailed", failed.message or "the training Job failed"
    return Assessment(Phase.FAILED.value, reason, _one_line(msg, 600), ("True", "PodStarted", "ran"),
                      ("False", "Failed", _one_line(msg, 600)), suspended=False, extra=extra)


# --- Status ------------------------------------------------------------------------


def build_status(
    ftj: FtjView,
    job: Optional[JobView],
    pods: list[PodView],
    problem: Optional[tuple[str, str]] = None,
    progress: Optional[dict] = None,
    workload: Optional[WorkloadView] = None,
) -> dict:
    """The complete status the FineTuneJob should have (wire form). Terminal outcomes of a run
    are kept as they are: pods may be gone by the time the operator looks again."""
    old = ftj.status or {}
    gen = ftj.generation
    if job is not None and old.get("runId") == job.run_id and old.get("phase") in TERMINAL_PHASES:
        kept = {**old, "observedGeneration": gen, "attempts": max(old.get("attempts", 0), _attempts(job, pods))}
        if not kept.get("completionTime") and _end_time(job, pods):
            kept["completionTime"] = _end_time(job, pods)
        return kept

    a = assess(job, pods, problem, stage=(progress or old.get("progress") or {}).get("stage"), workload=workload)
    new_run = job is None or old.get("runId") != job.run_id
    conditions = list(old.get("conditions") or [])
    conditions = set_condition(conditions, "Ready", a.ready[0], a.ready[1], a.ready[2], gen)
    if a.running is not None or get_condition(conditions, "Running") is None:
        running = a.running or ("False", "Retrying", a.message)
        conditions = set_condition(conditions, "Running", running[0], running[1], running[2], gen)
    succeeded = {Phase.SUCCEEDED.value: "True", Phase.FAILED.value: "False"}.get(a.phase, "Unknown")
    conditions = set_condition(conditions, "Succeeded", succeeded, a.reason, a.message, gen)
    if a.phase == Phase.FAILED.value:
        conditions = set_condition(conditions, "Failed", True, a.reason, a.message, gen)
    elif get_condition(conditions, "Failed") is not None:
        conditions = set_condition(conditions, "Failed", False, "NewRun", "a new run started", gen)
    if a.suspended:
        conditions = set_condition(conditions, "Suspended", True, "Suspended", a.message, gen)
    elif get_condition(conditions, "Suspended") is not None:
        conditions = set_condition(conditions, "Suspended", False, "Resumed", "the run is not suspended", gen)

    status: dict[str, Any] = {
        "phase": a.phase,
        "message": a.message,
        "observedGeneration": gen,
        "conditions": conditions,
        "attempts": _attempts(job, pods) if job else 0,
    }
    if job is not None:
        status["jobName"] = job.name
        status["runId"] = job.run_id
        if job.completions > 1:
            status["workers"] = _workers(ftj, job, pods)
        if job.start_time:
            status["startTime"] = job.start_time
        if a.phase in TERMINAL_PHASES and _end_time(job, pods):
            status["completionTime"] = _end_time(job, pods)
    history = attempt_history([] if new_run else old.get("attemptHistory") or [], job, pods)
    if history:
        status["attemptHistory"] = history
    keep_progress = progress if progress is not None else (None if new_run else old.get("progress"))
    if keep_progress and progress is None:  # written by this or another version of the operator
        keep_progress = validate_tolerant(TrainingProgress, keep_progress).to_wire()
    if keep_progress:
        status["progress"] = keep_progress
    status.update(a.extra)
    # The CRD's status schema is generated from this model: what we write must parse as it.
    FineTuneJobStatus.model_validate(status)
    return status


def attempt_history(old: list[dict], job: Optional[JobView], pods: list[PodView]) -> list[dict]:
    """The run's ended attempts: those recorded before (their pods may be gone since) plus every
    failed primary pod not recorded yet, numbered in the order they ended."""
    history = list(old)
    if job is None:
        return history
    known = {r.get("pod") for r in history}
    ended = sorted((p for p in primary(pods) if p.phase == "Failed" and p.name not in known),
                   key=lambda p: (p.finished_at or p.created, p.name))
    for pod in ended:
        reason, message = describe_pod_failure(pod)
        record = {"attempt": (history[-1]["attempt"] + 1) if history else 1, "pod": pod.name,
                  "reason": reason, "message": _one_line(message, 300)}
        if pod.finished_at:
            record["finishedAt"] = pod.finished_at
        history.append(record)
    return history[-MAX_ATTEMPT_HISTORY:]


def _workers(ftj: FtjView, job: JobView, pods: list[PodView]) -> dict:
    gpus = int((ftj.spec.get("resources") or {}).get("gpus", 1))
    ready = sum(1 for p in pods if p.running and p.phase == "Running" and not p.deleting)
    return {"ready": min(ready, job.completions), "total": job.completions,
            "worldSize": job.completions * max(gpus, 1)}


def status_patch(old: dict, new: dict) -> dict:
    """Merge patch turning `old` into `new` (removed top-level fields become null); {} if equal."""
    patch = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new})
    return patch


def transition_event(old: dict, new: dict) -> Optional[tuple[str, str, str]]:
    """(type, reason, message) of the Event for a change of phase or of what the run waits for."""
    def key(status: dict) -> tuple:
        cond = get_condition(status.get("conditions") or [], "Succeeded") or {}
        return status.get("phase"), cond.get("reason")

    if key(old) == key(new):
        return None
    phase, reason = key(new)
    warning = phase == Phase.FAILED.value or reason in WARNING_REASONS
    return ("Warning" if warning else "Normal", reason or phase or "Unknown", new.get("message") or "")


def ended_attempt_events(old: dict, new: dict) -> list[tuple[str, str, str]]:
    """A `Retrying` Warning for every attempt that ended since `old` (`attemptHistory` grew) while
    the run goes on. The Job controller replaces a failed or evicted pod at once, so the status
    rarely shows the moment between the two (the `Retrying` phase event): without these, an
    eviction that a replacement pod absorbed would leave no Event."""
    cond = get_condition(new.get("conditions") or [], "Succeeded") or {}
    if new.get("phase") in TERMINAL_PHASES or cond.get("reason") == "Retrying":  # said by the phase's event
        return []
    if old.get("runId") != new.get("runId"):
        return []
    known = {r.get("pod") for r in old.get("attemptHistory") or []}
    return [("Warning", "Retrying", _one_line(f"attempt {r['attempt']} ended ({r['reason']}: {r['message']}); "
                                              "the Job retries, resuming from the newest checkpoint", 400))
            for r in new.get("attemptHistory") or [] if r.get("pod") not in known]


def duration_seconds(status: dict) -> Optional[float]:
    start, end = status.get("startTime"), status.get("completionTime")
    if not start or not end:
        return None
    parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return (parse(end) - parse(start)).total_seconds()
