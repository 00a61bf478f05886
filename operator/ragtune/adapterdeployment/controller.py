"""kopf handlers for AdapterDeployment: a per-object timer drives the rollout state machine
(`ragtune.adapterdeployment.rollout`), and a delete handler restores a referenced TGI Deployment.

The timer re-reads the object and its children on every tick, so it is idempotent and an
operator restart resumes any step; children carry ownerReferences, so the garbage collector
removes what ragtune created when the AdapterDeployment goes.
"""

from __future__ import annotations

import functools
import json
import os
import time

import kopf

from ragtune.api.keys import ADAPTERDEPLOYMENTS, API_GROUP, API_VERSION
from ragtune.runtime import metrics
from ragtune.runtime.settings import get_config

GROUP, VERSION, PLURAL = API_GROUP, API_VERSION, ADAPTERDEPLOYMENTS
TICK_SECONDS = float(os.environ.get("RAGTUNE_AD_TICK_SECONDS", "0.5"))
"""How often an AdapterDeployment with a rollout under way looks at its children."""
IDLE_SECONDS = float(os.environ.get("RAGTUNE_AD_IDLE_SECONDS", "10"))
"""How often an AdapterDeployment between rollouts checks its stable server's health."""

_last_idle_check: dict[str, float] = {}


@functools.lru_cache(maxsize=1)
def _kube():
    from ragtune.runtime.kube import Kube

    return Kube()


def _idle(body, uid: str) -> bool:
    """Nothing to roll and the health check is recent: skip this tick (no API calls). kopf's
    cached body is enough to tell; a spec edit bumps the generation and ends the idling."""
    status = body.get("status") or {}
    rolling = status.get("candidate") or status.get("observedGeneration") != body["metadata"].get("generation")
    if rolling or time.monotonic() - _last_idle_check.get(uid, 0.0) > IDLE_SECONDS:
        _last_idle_check[uid] = time.monotonic()
        return False
    return True


@kopf.timer(GROUP, VERSION, PLURAL, interval=TICK_SECONDS)
def rollout_tick(body, name: str, namespace: str, uid: str, logger, **_) -> None:
    from ragtune.adapterdeployment.rollout import Reconciler
    from ragtune.runtime.kube import KubeError

    if _idle(body, uid):
        return
    try:
        out = Reconciler(_kube(), get_config().operator_image).tick(namespace, name)
    except KubeError as err:
        if err.status == 409:  # someone wrote the object since we read it: redo next tick
            logger.debug("conflict, retrying: %s", err)
            return
        metrics.observe_reconcile("AdapterDeployment", "error")
        raise
    metrics.observe_reconcile("AdapterDeployment", "success")
    if out.online_gate is not None:
        metrics.observe_gates("AdapterDeployment", out.online_gate)
    if out.finished:
        logger.info("rollout finished: %s (%s)", out.finished, out.reason)
        metrics.observe_rollout(out.seconds, "promoted" if out.finished == "Promoted" else "rolledBack")
        if out.finished != "Promoted":
            metrics.observe_rollback(out.reason)


@kopf.on.delete(GROUP, VERSION, PLURAL)
def restore_referenced_deployment(spec, namespace: str, uid: str, logger, **_) -> None:
    """A referenced TGI Deployment is not ours: put its original pod template back. Everything
    ragtune created is owned by the AdapterDeployment and garbage-collected."""
    _last_idle_check.pop(uid, None)
    ref = (spec.get("server") or {}).get("deploymentRef")
    if not ref:
        return
    from ragtune.adapterdeployment import render

    kube = _kube()
    dep = kube.get("Deployment", namespace, ref["name"])
    if dep is None:
        return
    annotations = (dep["spec"]["template"].get("metadata") or {}).get("annotations") or {}
    if render.ANNOTATION_ORIGINAL not in annotations:
        return
    restored = json.loads(json.dumps(dep))
    restored["spec"]["template"] = render.restore_existing_template(dep["spec"]["template"])
    kube.replace(restored)
    logger.info("restored the pod template of Deployment %s", ref["name"])
