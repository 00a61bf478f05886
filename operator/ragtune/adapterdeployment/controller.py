"""The AdapterDeployment controller: watch events enqueue keys into a work queue
(`ragtune.runtime.workqueue`), whose workers run one tick of the rollout state machine
(`ragtune.adapterdeployment.rollout`), the same idiom as the FineTuneJob controller.

- Events of an AdapterDeployment, of the pods and evaluation Jobs it owns (label
  `ragtune.dev/adapterdeployment`; kopf watches ragtune's pods and Jobs anyway) and the end of a
  FineTuneJob one of its adapters names enqueue it.
- A tick that leaves something to wait for re-enqueues the key itself after `Outcome.again`
  (`ragtune.adapterdeployment.rollout`: 0.5 s while a rollout is under way; child events
  usually bring it back sooner).
- Between rollouts a healthy AdapterDeployment costs no API request; the one exception is a
  server given by `deploymentRef`, whose pods are not ragtune's and not watched.
- A failed tick is retried with the queue's exponential backoff (1 s doubling to 60 s); an
  object the API server refuses ends the rollout `Failed` with its message (no retry).

Every tick re-reads the object and its children, so it is idempotent and an operator restart
resumes any step (kopf's initial listing enqueues every object); children carry
ownerReferences, so the garbage collector removes what ragtune created when the
AdapterDeployment goes. A delete handler puts a referenced Deployment's pod template back.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import kopf

from ragtune.api.keys import (
    ADAPTERDEPLOYMENTS,
    ANNOTATION_ADAPTERDEPLOYMENT,
    API_GROUP,
    API_VERSION,
    FINETUNEJOBS,
    LABEL_ADAPTERDEPLOYMENT,
)
from ragtune.runtime import metrics
from ragtune.runtime.kube import Kube, KubeError, path
from ragtune.runtime.settings import get_config
from ragtune.runtime.workqueue import RetryableError, WorkQueue

from . import render
from .rollout import Reconciler

GROUP, VERSION, PLURAL = API_GROUP, API_VERSION, ADAPTERDEPLOYMENTS
KIND = "AdapterDeployment"
Key = tuple[str, str]

RESTORE_ATTEMPTS = 10
TERMINAL_FTJ_PHASES = ("Succeeded", "Failed")

logger = logging.getLogger("ragtune.adapterdeployment")


class AdapterDeploymentController:
    def __init__(self) -> None:
        self.kube: Optional[Kube] = None
        self.queue: WorkQueue[Key] = WorkQueue(self.reconcile, workers=8, base_delay=1.0, max_delay=60.0,
                                               name="adapterdeployment")
        self._started = False
        self.ftj_refs: dict[Key, set[str]] = {}
        """(namespace, FineTuneJob) -> AdapterDeployments whose adapters name it."""

    async def start(self) -> None:
        self.kube = Kube(workers=8)

    def _start_workers(self) -> None:
        # From the first watch handler, not at startup: the workers inherit the handler's context,
        # which carries kopf's event-posting queue (kopf.event needs it).
        self.queue.start()
        self._started = True

    async def stop(self) -> None:
        await self.queue.stop()
        if self.kube is not None:
            self.kube.close()

    @property
    def alive(self) -> bool:
        return not self._started or self.queue.alive

    def enqueue(self, namespace: Optional[str], name: Optional[str]) -> None:
        if namespace and name and self.kube is not None:
            if not self._started:
                self._start_workers()
            self.queue.add((namespace, name))

    async def reconcile(self, key: Key) -> Optional[float]:
        namespace, name = key
        assert self.kube is not None
        try:
            reconciler = Reconciler(self.kube, get_config().operator_image, post_events=False)
            out = await self.kube.run(reconciler.tick, namespace, name)
        except KubeError as err:
            metrics.observe_reconcile(KIND, "error")
            if err.retryable:  # 409: someone wrote the object since we read it; 5xx/no answer: transient
                raise RetryableError(f"{namespace}/{name}: {err}") from None
            raise
        metrics.observe_reconcile(KIND, "success")
        metrics.ADAPTERDEPLOYMENT_PHASES.set(key, out.phase)
        for type_, reason, message in out.events:  # one path for both kinds: kopf's event queue
            kopf.event(out.involved, type=type_, reason=reason, message=message)
        if out.online_gate is not None:
            metrics.observe_gates(KIND, out.online_gate)
        if out.finished:
            logger.info("%s/%s: rollout finished: %s (%s)", namespace, name, out.finished, out.reason)
            metrics.observe_rollout(out.seconds, "promoted" if out.finished == "Promoted" else "rolledBack")
            if out.finished != "Promoted":
                metrics.observe_rollback(out.reason)
        return out.again

    def track_refs(self, namespace: str, name: str, spec: Any) -> None:
        wanted = {(a.get("fineTuneJobRef") or {}).get("name") for a in (spec or {}).get("adapters") or []} - {None}
        for ftj in wanted:
            self.ftj_refs.setdefault((namespace, ftj), set()).add(name)
        for ref, ads in list(self.ftj_refs.items()):
            if ref[0] == namespace and ref[1] not in wanted and name in ads:
                ads.discard(name)
                if not ads:
                    del self.ftj_refs[ref]

    def finetunejob_changed(self, namespace: str, name: str, phase: Optional[str]) -> None:
        if phase in TERMINAL_FTJ_PHASES:
            for ad in self.ftj_refs.get((namespace, name), ()):
                self.enqueue(namespace, ad)

    def forget(self, namespace: str, name: str) -> None:
        self.queue.forget((namespace, name))
        metrics.ADAPTERDEPLOYMENT_PHASES.forget((namespace, name))
        self.track_refs(namespace, name, None)

    def restore_referenced(self, namespace: str, name: str) -> bool:
        """Put the original pod template back on a referenced Deployment, conflict-safe: a JSON
        patch whose `test` guards exactly the template it replaces needs no resourceVersion, so
        writes to the Deployment's status or metadata in between do not make it fail; a change to
        the template itself is re-read. False when there was nothing to restore."""
        assert self.kube is not None
        for _ in range(RESTORE_ATTEMPTS):
            dep = self.kube.get("Deployment", namespace, name)
            if dep is None:
                return False
            template = dep["spec"]["template"]
            annotations = (template.get("metadata") or {}).get("annotations") or {}
            if render.ANNOTATION_ORIGINAL not in annotations:
                return False
            ops = [{"op": "test", "path": "/spec/template", "value": template},
                   {"op": "replace", "path": "/spec/template", "value": render.restore_existing_template(template)}]
            try:
                self.kube.request("PATCH", path("Deployment", namespace, name), ops,
                                  query=[("fieldManager", self.kube.field_manager)],
                                  content_type="application/json-patch+json")
                return True
            except KubeError as err:
                if err.status == 404:
                    return False
                if err.status not in (409, 422) and not err.retryable:
                    raise
                logger.info("Deployment %s/%s changed while restoring it, retrying: %s", namespace, name, err)
        raise kopf.TemporaryError(f"Deployment {namespace}/{name} kept changing; retrying the restore", delay=1)


controller = AdapterDeploymentController()


def _owner(body: Any) -> Optional[str]:
    """The owning AdapterDeployment of a child: its full name (annotation), else the label."""
    meta = body.get("metadata", {})
    return (meta.get("annotations") or {}).get(ANNOTATION_ADAPTERDEPLOYMENT) or \
        (meta.get("labels") or {}).get(LABEL_ADAPTERDEPLOYMENT)


# --- kopf registrations ------------------------------------------------------------


@kopf.on.startup()
async def _start(**_) -> None:
    await controller.start()


@kopf.on.cleanup()
async def _stop(**_) -> None:
    await controller.stop()


@kopf.on.probe(id="adapterdeploymentQueue")
def _probe(**_) -> int:
    if not controller.alive:
        raise RuntimeError("the AdapterDeployment work queue has stopped")
    return len(controller.queue)


# async handlers: they run on the event loop that owns the queue (sync ones run in threads)
@kopf.on.event(GROUP, VERSION, PLURAL)
async def _ad_event(type: str, spec: kopf.Spec, namespace: str, name: str, **_) -> None:
    if type == "DELETED":
        controller.forget(namespace, name)
    else:
        controller.track_refs(namespace, name, spec)
        controller.enqueue(namespace, name)


@kopf.on.event(GROUP, VERSION, FINETUNEJOBS)
async def _ftj_event(status: kopf.Status, namespace: str, name: str, **_) -> None:
    controller.finetunejob_changed(namespace, name, status.get("phase"))


@kopf.on.event("v1", "pods", labels={LABEL_ADAPTERDEPLOYMENT: kopf.PRESENT})
async def _pod_event(body: kopf.Body, namespace: str, **_) -> None:
    controller.enqueue(namespace, _owner(body))


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_ADAPTERDEPLOYMENT: kopf.PRESENT})
async def _job_event(body: kopf.Body, namespace: str, **_) -> None:
    controller.enqueue(namespace, _owner(body))


@kopf.on.delete(GROUP, VERSION, PLURAL, backoff=1.0)
async def restore_referenced_deployment(spec, namespace: str, name: str, logger, **_) -> None:
    """A referenced TGI Deployment is not ours: put its original pod template back. Everything
    ragtune created is owned by the AdapterDeployment and garbage-collected. `backoff`: a retry
    of this handler holds the finalizer, so it comes in a second, not after kopf's default 60 s."""
    controller.forget(namespace, name)
    ref = (spec.get("server") or {}).get("deploymentRef")
    if not ref or controller.kube is None:
        return
    if await controller.kube.run(controller.restore_referenced, namespace, ref["name"]):
        logger.info("restored the pod template of Deployment %s", ref["name"])
