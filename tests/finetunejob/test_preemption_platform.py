"""A training pod evicted through the Eviction API (the API server marks it `DisruptionTarget`,
as it does for a preemption or a node drain) does not use up `backoffLimit`: with backoffLimit 0
the Job replaces the pod and the run still succeeds (issue 16: the podFailurePolicy `Ignore` rule,
and a pod runner that keeps conditions it does not own, as a kubelet does)."""

from __future__ import annotations

import pytest

from .conftest import condition, events, ftj_manifest, get_json, pods_of, wait_status

pytestmark = pytest.mark.platform


def test_an_evicted_training_pod_is_replaced_without_using_up_backoff_limit(platform, namespace, operator):
    if platform.local is None:
        pytest.skip("evicts through the local platform's admin client")
    platform.apply(ftj_manifest("evicted", namespace, "succeed/8", backoffLimit=0))
    status = wait_status(platform, namespace, "evicted", lambda s: s.get("phase") == "Running", what="Running")
    (pod,) = [p["metadata"]["name"] for p in pods_of(platform, namespace, status["jobName"])]
    platform.local.info().admin_client().create(
        f"/api/v1/namespaces/{namespace}/pods/{pod}/eviction",
        {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": namespace}})
    status = wait_status(platform, namespace, "evicted", lambda s: s.get("phase") in ("Succeeded", "Failed"),
                         timeout=180, what="the end of the run")
    assert status["phase"] == "Succeeded", status["message"]
    assert condition(status, "Succeeded")["reason"] == "Completed"
    # The eviction was not counted as a failure: the Job's podFailurePolicy ignored it.
    job = get_json(platform, "-n", namespace, "job", status["jobName"])
    assert job["spec"]["backoffLimit"] == 0 and not job["status"].get("failed")
    # It was seen: the run said it retries after the eviction, then completed.
    seen = [(e["reason"], e["message"]) for e in events(platform, namespace, "evicted")]
    assert any(r == "Retrying" and "Evict" in m for r, m in seen) and ("Completed" in {r for r, _ in seen}), seen
