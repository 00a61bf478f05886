"""The FineTuneJob controller: one training Job per run, its status derived from the Job and pods.

Level-triggered: kopf indexes keep compact views of FineTuneJobs, their Jobs and their pods
(all from watches, no polling); every watch event enqueues the FineTuneJob's key into a
deduplicating work queue, and `reconcile(key)` brings the world in line:

1. the current run's Job exists (deterministic name `<name>-<runId>`; a create answered with
   409 AlreadyExists means it is there already, so an operator restart never makes a second Job),
   Jobs of superseded runs are deleted, run-control fields (`suspend`, ...) are applied in place;
2. the status is recomputed from the Job and its pods (`jobstatus.build_status`) and written as a
   merge patch only when it differs; a change of phase or reason emits an Event. Status writes
   spend a budget (`runtime.ratelimit.WriteBudget`): in a burst a key whose write must wait comes
   back at its reserved slot and writes the newest status then; Job creates never wait.

The operator's only writes to a FineTuneJob are to its status subresource: no finalizers, no
annotations. Deleting a FineTuneJob deletes its Jobs (foreground) at once; owner references
make the garbage collector do the same if the operator is down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

import kopf
from pydantic import ValidationError

from ragtune.api.base import validate_tolerant
from ragtune.api.common import IN_CLUSTER
from ragtune.api.finetunejob import FineTuneJobSpec, TrainingProgress
from ragtune.api.keys import API_GROUP, API_VERSION, FINETUNEJOBS, GROUP_VERSION
from ragtune.api.pods import PROGRESS_PREFIX, run_id
from ragtune.runtime import metrics
from ragtune.runtime.conditions import set_condition
from ragtune.runtime.kube import Kube, KubeError
from ragtune.runtime.ratelimit import WriteBudget
from ragtune.runtime.settings import get_config
from ragtune.runtime.workqueue import RetryableError, WorkQueue

from .kueue import QueueWatcher
from .render import (
    ANNOTATION_FINETUNEJOB,
    CONTAINER,
    KIND,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    MANAGED_BY,
    TRAINER_APP,
    run_control_patch,
    service_name,
    spec_hash,
    workload_for,
)
from .status import (
    TERMINAL_PHASES,
    FtjView,
    JobView,
    PodView,
    build_status,
    duration_seconds,
    ended_attempt_events,
    primary,
    status_patch,
    transition_event,
)

logger = logging.getLogger("ragtune.finetunejob")

Key = tuple[str, str]
TRAINER_LABELS = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_NAME: TRAINER_APP}
JOB_CREATE_RETRY_SECONDS = 60.0
COALESCE_SECONDS = 1.0
"""Job and pod events within this window fold into one status update (a pod goes through several
states in a second; each would otherwise be a status write)."""
QUEUE_POLL_SECONDS = 5.0
"""How often Kueue's Workloads are listed while some run is queued (see `kueue.QueueWatcher`)."""


def _log_extra(key: Key, uid: str = "") -> dict:
    """`k8s_ref` is what kopf's formatters print as the object (JSON `object`, text `[ns/name]`)."""
    return {"k8s_ref": {"apiVersion": GROUP_VERSION, "kind": KIND, "namespace": key[0],
                        "name": key[1], "uid": uid}, "k8s_skip": True}


def _error_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"spec.{where}: {err.get('msg')}")
    return "; ".join(parts)


# Job fields -> the FineTuneJob fields they are rendered from (first match wins).
_JOB_FIELD_SOURCES = (
    ("tolerations", "spec.resources.tolerations"),
    ("nodeSelector", "spec.resources.nodeSelector"),
    ("secretKeyRef", "the Secret key names of spec.s3.credentialsSecretRef / spec.baseModel.tokenSecretRef"),
    ("resources.limits", "spec.resources (gpuResourceName, gpus, cpu, memory)"),
    ("resources.requests", "spec.resources (gpuResourceName, gpus, cpu, memory)"),
)


def _spec_field_hint(api_message: str) -> str:
    for job_field, source in _JOB_FIELD_SOURCES:
        if job_field in api_message:
            return f" (from {source})"
    return ""


def _one_line(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first(store: Any) -> Any:
    return next(iter(store), None) if store is not None else None


def parse_progress(log_tail: str) -> Optional[dict]:
    """The newest `RAGTUNE_PROGRESS {json}` line of a log tail, as a TrainingProgress wire dict."""
    for line in reversed(log_tail.splitlines()):
        start = line.find(PROGRESS_PREFIX)
        if start < 0:
            continue
        try:
            return validate_tolerant(TrainingProgress, json.loads(line[start + len(PROGRESS_PREFIX):])).to_wire()
        except (ValueError, ValidationError):
            continue
    return None


@dataclass
class _Tracked:
    namespace: str
    pod: str
    due: float


class ProgressSampler:
    """Samples the newest progress line of each running trainer's log: every `interval` seconds
    per job at most, and `rate` log reads per second at most over all jobs (so a thousand
    running jobs cost the API server a bounded trickle, not a flood)."""

    def __init__(self, kube: Kube, interval: float, rate: float, on_progress) -> None:
        self._kube = kube
        self._interval = interval
        self._pause = 1.0 / rate
        self._on_progress = on_progress
        self._tracked: dict[Key, _Tracked] = {}
        self._last: dict[Key, dict] = {}

    def track(self, key: Key, namespace: str, pod: str) -> None:
        current = self._tracked.get(key)
        if current is None or current.pod != pod:
            # First look soon after the pod starts, then every interval.
            self._tracked[key] = _Tracked(namespace, pod, time.monotonic() + min(5.0, self._interval))

    def untrack(self, key: Key) -> None:
        self._tracked.pop(key, None)
        self._last.pop(key, None)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._pause)
            now = time.monotonic()
            due = [(t.due, k) for k, t in self._tracked.items() if t.due <= now]
            if not due:
                continue
            _, key = min(due)
            tracked = self._tracked[key]
            tracked.due = now + self._interval
            try:
                tail = await self._kube.run(self._kube.pod_log_tail, tracked.namespace, tracked.pod, CONTAINER)
            except KubeError as exc:
                # No kubelet to ask (e.g. a virtual node), or the pod is gone: look much later.
                tracked.due = now + self._interval * 8
                logger.debug("no log for %s/%s: %s", tracked.namespace, tracked.pod, exc)
                continue
            progress = parse_progress(tail)
            if progress is not None and progress != self._last.get(key):
                self._last[key] = progress
                self._on_progress(key, progress)


class FineTuneJobController:
    def __init__(self) -> None:
        self.config = get_config()
        self.kube: Optional[Kube] = None
        self.queue: WorkQueue[Key] = WorkQueue(self.reconcile, workers=16, name="finetunejob")
        self.status_budget: WriteBudget[Key] = self._budget()
        self.sampler: Optional[ProgressSampler] = None
        self._sampler_task: Optional[asyncio.Task] = None
        self.queues: Optional[QueueWatcher] = None
        self._queues_task: Optional[asyncio.Task] = None
        self.ftjs: Any = {}
        self.jobs: Any = {}
        self.pods: Any = {}
        self.progress: dict[Key, dict] = {}
        self._written: dict[Key, tuple[str, dict]] = {}
        """Status we wrote but whose watch event may not have arrived yet (uid, status)."""
        self._specs: dict[Key, tuple[str, int, FineTuneJobSpec, str]] = {}
        """Parsed spec and its hash per (uid, generation): parsed once, not on every event."""
        self._announce: dict[Key, str] = {}
        """JobCreated Events waiting for the next status write of their FineTuneJob."""

    # --- lifecycle -----------------------------------------------------------------

    def _budget(self) -> WriteBudget[Key]:
        rate = self.config.status_writes_per_second
        return WriteBudget(rate, burst=round(rate * 1.5))

    async def start(self) -> None:
        self.config = get_config()
        self.status_budget = self._budget()
        self.kube = Kube(workers=self.config.api_workers)
        self.sampler = ProgressSampler(self.kube, self.config.progress_interval,
                                       self.config.progress_reads_per_second, self._on_progress)
        self.queues = QueueWatcher(self.kube, QUEUE_POLL_SECONDS, self.queue.add)

    def _start_workers(self) -> None:
        # Started from the first watch handler, not at startup: tasks inherit the handler's
        # context, which carries kopf's event-posting queue (kopf.event needs it).
        self.queue.start()
        self._sampler_task = asyncio.create_task(self.sampler.run(), name="progress-sampler")
        self._queues_task = asyncio.create_task(self.queues.run(), name="kueue-workloads")

    async def stop(self) -> None:
        tasks = [t for t in (self._sampler_task, self._queues_task) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.queue.stop()
        if self.kube is not None:
            self.kube.close()

    def bind(self, ftj_index: Any, ftj_jobs: Any, ftj_pods: Any) -> None:
        """kopf hands its live indexes to every handler; keep them for the workers."""
        self.ftjs, self.jobs, self.pods = ftj_index, ftj_jobs, ftj_pods
        if self._sampler_task is None:
            self._start_workers()

    @property
    def alive(self) -> bool:
        if self._sampler_task is None:
            return True  # no watch event yet
        return self.queue.alive and not self._sampler_task.done() and not self._queues_task.done()

    def _on_progress(self, key: Key, progress: dict) -> None:
        self.progress[key] = progress
        self.queue.add(key)

    # --- deletion ------------------------------------------------------------------

    async def deleted(self, ftj: FtjView) -> None:
        """The FineTuneJob is gone: delete its Jobs (and, foreground, their pods) now."""
        key = (ftj.namespace, ftj.name)
        self.queue.forget(key)
        self.progress.pop(key, None)
        self._written.pop(key, None)
        self._specs.pop(key, None)
        self._announce.pop(key, None)
        self.status_budget.forget(key)
        if self.sampler:
            self.sampler.untrack(key)
        if self.queues:
            self.queues.untrack(key)
        metrics.FINETUNEJOB_PHASES.forget(key)
        for job in list(self.jobs.get(key, ())):
            if job.owner_uid == ftj.uid and not job.deleting:
                await self.kube.run(self.kube.delete_job, ftj.namespace, job.name, job.uid)
                logger.info("deleted Job %s of the deleted FineTuneJob", job.name, extra=_log_extra(key, ftj.uid))

    # --- reconcile -----------------------------------------------------------------

    async def reconcile(self, key: Key) -> Optional[float]:
        try:
            again = await self._reconcile(key)
        except Exception:
            metrics.observe_reconcile(KIND, "error")
            raise
        metrics.observe_reconcile(KIND, "success")
        return again

    async def _reconcile(self, key: Key) -> Optional[float]:
        namespace, name = key
        ftj: Optional[FtjView] = _first(self.ftjs.get(key))
        if ftj is None or ftj.deleting:
            return None
        problem: Optional[tuple[str, str]] = None
        again: Optional[float] = None
        cached = self._specs.get(key)
        if cached is not None and cached[:2] == (ftj.uid, ftj.generation):
            spec, wanted = cached[2], cached[3]
        else:
            try:
                spec = FineTuneJobSpec.model_validate(ftj.spec, context=IN_CLUSTER)
            except ValidationError as exc:
                return await self._write_failed(ftj, "InvalidSpec", _error_message(exc))
            wanted = spec_hash(spec)
            self._specs[key] = (ftj.uid, ftj.generation, spec, wanted)

        jobs = [j for j in self.jobs.get(key, ()) if j.owner_uid == ftj.uid]
        candidates = [j for j in jobs if j.spec_hash == wanted and not j.deleting]
        job: Optional[JobView] = max(candidates, key=lambda j: (j.generation, j.created)) if candidates else None
        for old in jobs:
            if old is not job and not old.deleting:
                await self.kube.run(self.kube.delete_job, namespace, old.name, old.uid)
                if old.completions > 1:  # a multi-node run's headless Service goes with its Job
                    await self.kube.run(self.kube.delete, "Service", namespace, service_name(old.name))
                kopf.info(ftj.reference(), reason="RunSuperseded",
                          message=f"spec changed: deleted Job {old.name} of run {old.run_id}")

        if job is None:
            status = ftj.status
            if status.get("phase") in TERMINAL_PHASES and status.get("observedGeneration") == ftj.generation \
                    and not jobs:
                return None  # the run finished and its Job was removed by someone: keep the outcome
            problem = await self._create_job(ftj, spec)
            if problem is None:
                # Created, or there already: the Job's watch event brings the key back for the
                # status (the timer is a safety net). Creating Jobs first keeps them fast in a burst.
                return 5.0
            if problem[0] == "JobRejected":  # the same spec renders the same Job: no retry can help
                return await self._write_failed(ftj, *problem)
            again = JOB_CREATE_RETRY_SECONDS
        else:
            patch = run_control_patch(job.run_control(), spec)
            if patch:
                await self._patch_run_control(ftj, job, patch)

        pods = list(self.pods.get((namespace, job.name), ())) if job else []
        deferred = await self._write_status(ftj, job, pods, problem)
        return min((t for t in (again, deferred) if t is not None), default=None)

    async def _create_job(self, ftj: FtjView, spec: FineTuneJobSpec) -> Optional[tuple[str, str]]:
        """Create this generation's Job; returns a (reason, message) problem if the API refuses it:
        `JobRejected` for an invalid Job (400/422: permanent), `JobCreateFailed` otherwise (e.g. a
        quota: retried)."""
        key = (ftj.namespace, ftj.name)
        rid = run_id(ftj.uid, ftj.generation)
        meta = {"name": ftj.name, "namespace": ftj.namespace, "uid": ftj.uid, "generation": ftj.generation}
        *others, manifest = workload_for(spec).render(meta, spec, rid, self.config.trainer_image)
        try:
            for obj in others:  # the Job's companions first (a multi-node run's headless Service)
                await self.kube.run(self.kube.create, obj)
            await self.kube.run(self.kube.create_job, ftj.namespace, manifest)
        except KubeError as exc:
            if exc.status == 409:
                logger.info("Job %s exists already: adopting it", manifest["metadata"]["name"],
                            extra=_log_extra(key, ftj.uid))
                return None
            if exc.retryable:
                raise RetryableError(f"creating Job {manifest['metadata']['name']}: {exc}") from None
            message = f"the API server refused Job {manifest['metadata']['name']}: {exc.message}"
            if exc.status in (400, 422):
                return "JobRejected", _one_line(f"{message}{_spec_field_hint(exc.message)}", 1000)
            return "JobCreateFailed", message
        # Announced with the status write that records the Job (budgeted): in a burst, an Event
        # per create would double the API server's writes while Jobs are still being created.
        self._announce[key] = f"created Job {manifest['metadata']['name']} for run {rid}"
        logger.info("created Job %s for run %s", manifest["metadata"]["name"], rid, extra=_log_extra(key, ftj.uid))
        return None

    async def _patch_run_control(self, ftj: FtjView, job: JobView, patch: dict) -> None:
        try:
            await self.kube.run(self.kube.patch_job, ftj.namespace, job.name, {"spec": patch})
        except KubeError as exc:
            if exc.retryable:
                raise RetryableError(f"patching Job {job.name}: {exc}") from None
            kopf.warn(ftj.reference(), reason="RunControlNotApplied",
                      message=f"cannot apply {sorted(patch)} to the running Job {job.name}: {exc.message}")
            return
        logger.info("applied %s to Job %s", json.dumps(patch, sort_keys=True), job.name,
                    extra=_log_extra((ftj.namespace, ftj.name), ftj.uid))

    def _base_status(self, ftj: FtjView) -> dict:
        """The newest status we know: ours if our last write has not come back through the watch."""
        key = (ftj.namespace, ftj.name)
        written = self._written.get(key)
        if written is None or written[0] != ftj.uid:
            return ftj.status
        if written[1] == ftj.status:
            del self._written[key]
            return ftj.status
        return written[1]

    async def _write_failed(self, ftj: FtjView, reason: str, message: str) -> Optional[float]:
        """A failure before any Job runs (the run cannot start with this spec)."""
        old = self._base_status(ftj)
        conditions = set_condition(old.get("conditions"), "Succeeded", False, reason, message, ftj.generation)
        conditions = set_condition(conditions, "Failed", True, reason, message, ftj.generation)
        new = {**old, "phase": "Failed", "message": message, "observedGeneration": ftj.generation,
               "conditions": conditions}
        return await self._patch_status(ftj, old, new)

    async def _write_status(self, ftj: FtjView, job: Optional[JobView], pods: list[PodView],
                            problem: Optional[tuple[str, str]]) -> Optional[float]:
        """Writes the status the Job and pods call for; returns seconds until a write that had to
        wait for the budget may happen (None when written or nothing to write)."""
        key = (ftj.namespace, ftj.name)
        old = self._base_status(ftj)
        view = FtjView(ftj.name, ftj.namespace, ftj.uid, ftj.generation, ftj.spec, old)
        workload = None
        if job is not None and job.queued:
            self.queues.track(key, job.uid)
            workload = self.queues.view(ftj.namespace, job.uid)
        else:
            self.queues.untrack(key)
        new = build_status(view, job, pods, problem, self.progress.get(key), workload)
        deferred = await self._patch_status(ftj, old, new)

        running_pod = next((p for p in primary(pods) if p.running and not p.deleting), None)
        if new.get("phase") in ("Running", "Evaluating") and running_pod is not None and self.sampler:
            self.sampler.track(key, ftj.namespace, running_pod.name)
        elif self.sampler:
            self.sampler.untrack(key)
            self.progress.pop(key, None)
        return deferred

    async def _patch_status(self, ftj: FtjView, old: dict, new: dict) -> Optional[float]:
        key = (ftj.namespace, ftj.name)
        patch = status_patch(old, new)
        wait = self.status_budget.delay(key) if patch else 0.0
        if wait > 0:
            return wait  # back at its reserved slot; the phase gauge shows what is written
        metrics.FINETUNEJOB_PHASES.set(key, new.get("phase"))
        if not patch:
            return None
        try:
            await self.kube.run(self.kube.patch_status, "finetunejobs", ftj.namespace, ftj.name, patch)
        except KubeError as exc:
            if exc.status == 404:
                return None
            if exc.retryable:
                raise RetryableError(f"writing status: {exc}") from None
            raise
        self._written[key] = (ftj.uid, new)
        created = self._announce.pop(key, None)
        if created is not None:
            kopf.info(ftj.reference(), reason="JobCreated", message=created)
        for type_, reason, message in ended_attempt_events(old, new):
            kopf.event(ftj.reference(), type=type_, reason=reason, message=message)
            logger.warning("%s", message, extra=_log_extra(key, ftj.uid))
        event = transition_event(old, new)
        if event is not None:
            type_, reason, message = event
            kopf.event(ftj.reference(), type=type_, reason=reason, message=message)
            log = logger.warning if type_ == "Warning" else logger.info
            log("%s -> %s (%s): %s", old.get("phase") or "New", new.get("phase"), reason, message,
                extra=_log_extra(key, ftj.uid))
        if new.get("phase") in TERMINAL_PHASES and old.get("phase") not in TERMINAL_PHASES:
            seconds = duration_seconds(new)
            if seconds is not None:
                metrics.observe_training(seconds, new["phase"])
            gates = (new.get("metrics") or {}).get("gates")
            if gates:
                metrics.observe_gates(KIND, all(g.get("passed") for g in gates))
        return None


controller = FineTuneJobController()


# --- kopf registrations ------------------------------------------------------------


def _owner_name(body: dict) -> Optional[str]:
    for owner in body.get("metadata", {}).get("ownerReferences") or []:
        if owner.get("kind") == KIND and owner.get("controller"):
            return owner.get("name")
    return None


@kopf.on.startup()
async def _start(**_) -> None:
    await controller.start()


@kopf.on.cleanup()
async def _stop(**_) -> None:
    await controller.stop()


@kopf.on.probe(id="finetunejobQueue")
def _probe(**_) -> int:
    if not controller.alive:
        raise RuntimeError("the FineTuneJob workers stopped")
    return len(controller.queue)


# The index functions are coroutines, not plain functions: kopf runs a plain function in its
# thread pool (a thread hop, a context copy and a shielded task per watch event), which was the
# operator's largest cost in a burst of FineTuneJobs (bench/operator_scale.py); these are cheap
# and never block, so they run in the event loop.
@kopf.index(API_GROUP, API_VERSION, FINETUNEJOBS)
async def ftj_index(body: kopf.Body, namespace: str, name: str, **_) -> dict:
    return {(namespace, name): FtjView.from_body(dict(body))}


@kopf.index("batch", "v1", "jobs", labels=TRAINER_LABELS)
async def ftj_jobs(body: kopf.Body, namespace: str, **_) -> Optional[dict]:
    owner = _owner_name(body)
    return {(namespace, owner): JobView.from_body(dict(body))} if owner else None


@kopf.index("v1", "pods", labels=TRAINER_LABELS)
async def ftj_pods(body: kopf.Body, namespace: str, **_) -> Optional[dict]:
    view = PodView.from_body(dict(body))
    return {(namespace, view.job_name): view} if view.job_name else None


@kopf.on.event(API_GROUP, API_VERSION, FINETUNEJOBS)
async def _ftj_event(type: str, body: kopf.Body, namespace: str, name: str, ftj_index, ftj_jobs, ftj_pods, **_) -> None:
    controller.bind(ftj_index, ftj_jobs, ftj_pods)
    key = (namespace, name)
    if type == "DELETED":
        await controller.deleted(FtjView.from_body(dict(body)))
    elif body.get("metadata", {}).get("generation") != (body.get("status") or {}).get("observedGeneration"):
        # New object or changed spec: somebody waits for a Job (or a suspend) now.
        controller.queue.add(key, urgent=key not in ftj_jobs)
    else:
        # Typically the echo of our own status write.
        controller.queue.add_after(key, COALESCE_SECONDS)


@kopf.on.event("batch", "v1", "jobs", labels=TRAINER_LABELS)
async def _job_event(body: kopf.Body, namespace: str, ftj_index, ftj_jobs, ftj_pods, **_) -> None:
    controller.bind(ftj_index, ftj_jobs, ftj_pods)
    owner = _owner_name(body)
    if owner:
        controller.queue.add_after((namespace, owner), COALESCE_SECONDS)


@kopf.on.event("v1", "pods", labels=TRAINER_LABELS)
async def _pod_event(body: kopf.Body, namespace: str, ftj_index, ftj_jobs, ftj_pods, **_) -> None:
    controller.bind(ftj_index, ftj_jobs, ftj_pods)
    ftj_name = (body.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_FINETUNEJOB)
    if ftj_name:
        controller.queue.add_after((namespace, ftj_name), COALESCE_SECONDS)
