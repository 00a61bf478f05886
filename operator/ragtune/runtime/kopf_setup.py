"""kopf settings shared by every controller, applied at operator startup.

- No peering (one operator replica; the chart runs one) and no cluster scanning: the operator
  needs no cluster-wide permissions on CRDs or namespaces; namespaces are served as listed.
- Server-side label selectors on pods and Jobs: only objects ragtune created are listed,
  watched and kept in memory, however big the cluster.
- Handler progress and last-handled state, if a controller uses change handlers, go into
  annotations: the status of our CRDs is structural and would prune kopf's own fields.
- Prometheus metrics on `RAGTUNE_METRICS_PORT`.
"""

from __future__ import annotations

import logging

import kopf

from ragtune.api.keys import (
    FINALIZER,
    KOPF_ANNOTATION_PREFIX,
    LABEL_MANAGED_BY,
    MANAGED_BY,
)
from ragtune.runtime import metrics

from .settings import get_config

MANAGED_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
WATCH_ONLY_KINDS = frozenset({"Pod", "Job", "FineTuneJob"})
"""Kinds ragtune only watches and indexes (no kopf create/update/delete/timer handlers)."""


class LeanDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf builds every object's "essence" (a deep copy) on every watch event to detect changes
    for change handlers, also for kinds that have none. For the high-volume kinds in
    WATCH_ONLY_KINDS that copy was the operator's largest CPU cost in the scale bench: skip it."""

    def build(self, *, body: kopf.Body, extra_fields=None) -> kopf.BodyEssence:
        if body.get("kind") in WATCH_ONLY_KINDS:
            return {}
        return super().build(body=body, extra_fields=extra_fields)

    def fetch(self, *, body: kopf.Body):
        if body.get("kind") in WATCH_ONLY_KINDS:
            return {}
        return super().fetch(body=body)

logger = logging.getLogger(__name__)


def apply_settings(settings: kopf.OperatorSettings) -> None:
    settings.peering.standalone = True
    settings.peering.mandatory = False
    settings.scanning.disabled = True
    settings.posting.level = logging.INFO
    settings.posting.reporting_component = "ragtune-operator"
    settings.posting.event_name_prefix = "ragtune-"
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = LeanDiffBaseStorage(
        prefix=KOPF_ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.watching.label_selectors[("batch", "v1", "jobs")] = MANAGED_SELECTOR
    settings.watching.label_selectors[("v1", "pods")] = MANAGED_SELECTOR
    # Reconnect well before a silent load balancer would cut an idle watch.
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60


@kopf.on.startup()
async def _configure(settings: kopf.OperatorSettings, **_) -> None:
    config = get_config()
    apply_settings(settings)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # kopf logs every watch handler call at INFO ("Handler ... succeeded"): thousands of lines
        # per minute with many objects. Our own transitions are logged by the controllers.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    metrics.start_server(config.metrics_port)
    logger.info("ragtune operator: trainer image %s, namespaces %s, metrics port %s",
                config.trainer_image, ",".join(config.namespaces) or "(all)", config.metrics_port or "off")


@kopf.on.cleanup()
async def _shutdown(**_) -> None:
    metrics.stop_server()
