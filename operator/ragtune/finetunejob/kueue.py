"""What Kueue says of the queued training Jobs (runs with `spec.queueName`).

Kueue holds a queued Job suspended and keeps its reason on the Job's Workload (a
`kueue.x-k8s.io` object labelled with the Job's uid): quota not reserved yet, a LocalQueue that
does not exist, evicted by preemption. The operator reads Workloads by listing them while some run
is queued - one list per namespace with queued runs every `interval` seconds, nothing while no run
is queued - rather than watching them: Kueue may be absent (ragtune must start without its CRDs),
and a kopf watch on a resource that does not exist yet would only be resolved at restart.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Optional

from ragtune.api.keys import KUEUE_GROUP, KUEUE_VERSION
from ragtune.runtime.kube import Kube, KubeError

from .status import WorkloadView

logger = logging.getLogger("ragtune.finetunejob")

Key = tuple[str, str]
JOB_UID_LABEL = f"{KUEUE_GROUP}/job-uid"
"""Kueue's label on a Workload: the uid of the Job it stands for."""


class QueueWatcher:
    def __init__(self, kube: Kube, interval: float, on_change: Callable[[Key], None]) -> None:
        self._kube = kube
        self._interval = interval
        self._on_change = on_change
        self._queued: dict[Key, str] = {}
        """Queued run -> its Job's uid."""
        self._views: dict[tuple[str, str], WorkloadView] = {}
        """(namespace, Job uid) -> its Workload, as last listed."""
        self._absent_until: dict[str, float] = {}
        """Namespaces where listing Workloads failed (no Kueue): not asked again before then."""

    def track(self, key: Key, job_uid: str) -> None:
        self._queued[key] = job_uid

    def untrack(self, key: Key) -> None:
        job_uid = self._queued.pop(key, None)
        if job_uid is not None:
            self._views.pop((key[0], job_uid), None)

    def view(self, namespace: str, job_uid: str) -> Optional[WorkloadView]:
        return self._views.get((namespace, job_uid))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            for namespace in sorted({ns for ns, _ in self._queued}):
                await self.refresh(namespace)

    async def refresh(self, namespace: str) -> None:
        """List the namespace's Workloads once; requeue each queued run whose Workload changed."""
        loop = asyncio.get_running_loop()
        if self._absent_until.get(namespace, 0.0) > loop.time():
            return
        path = f"/apis/{KUEUE_GROUP}/{KUEUE_VERSION}/namespaces/{namespace}/workloads"
        try:
            listing = await self._kube.run(self._kube.request, "GET", path)
        except KubeError as exc:
            if exc.status in (403, 404):  # Kueue not installed, or no permission: say so once a while
                self._absent_until[namespace] = loop.time() + self._interval * 6
                logger.info("cannot list Kueue Workloads in %s (%s): queued runs wait without Kueue's reason",
                            namespace, exc.status)
                return
            logger.debug("listing Kueue Workloads in %s failed: %s", namespace, exc)
            return
        by_uid = {}
        for item in listing.get("items") or []:
            uid = (item.get("metadata", {}).get("labels") or {}).get(JOB_UID_LABEL)
            if uid:
                by_uid[uid] = WorkloadView.from_body(item)
        for key, job_uid in list(self._queued.items()):
            if key[0] != namespace:
                continue
            new = by_uid.get(job_uid)
            if new != self._views.get((namespace, job_uid)):
                if new is None:
                    self._views.pop((namespace, job_uid), None)
                else:
                    self._views[(namespace, job_uid)] = new
                self._on_change(key)
