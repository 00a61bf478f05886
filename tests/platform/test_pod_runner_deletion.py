"""Deleting pods the pod runner never started (issue 15, bug 6).

A Job pod carries the `batch.kubernetes.io/job-tracking` finalizer until the Job controller has
counted it, and it counts a pod only once the pod is terminal. A kubelet makes a deleted pod
terminal (phase Failed) whether or not its containers ever ran; a pod left `Pending` stays
`Terminating`, and with it its namespace.
"""

from __future__ import annotations

import json
import os
import time

import pytest

pytestmark = [pytest.mark.platform, pytest.mark.slow,
              pytest.mark.skipif(bool(os.environ.get("RAGTUNE_TEST_KUBECONFIG")),
                                 reason="tests the local platform itself, not an external cluster")]


def _job_with_missing_image(name: str) -> str:
    # Like a training Job: a podFailurePolicy, so the Job controller counts only terminal pods.
    return json.dumps({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
                       "spec": {"backoffLimit": 0, "podFailurePolicy": {"rules": [
                           {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In",
                                                                 "values": [2]}}]},
                                "template": {"spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 3,
                                                      "containers": [{"name": "main", "command": ["true"],
                                                                      "image": "example.com/not-in-the-table:1"}]}}}})


def _pods(platform, namespace: str) -> list[dict]:
    out = platform.kubectl("-n", namespace, "get", "pods", "-o", "json", check=False)
    return json.loads(out)["items"] if out.startswith("{") else []


def _wait_pull_failure(platform, namespace: str) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for pod in _pods(platform, namespace):
            waiting = ((pod.get("status") or {}).get("containerStatuses") or [{}])[0].get("state", {}).get("waiting")
            if waiting and waiting.get("reason") in ("ErrImagePull", "ImagePullBackOff"):
                return pod
        time.sleep(0.5)
    raise AssertionError(f"no pod with an image pull failure: {_pods(platform, namespace)}")


def _gone(check, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.5)
    raise AssertionError(f"still there after {timeout:.0f} s")


def test_a_deleted_pod_that_never_started_is_terminal_and_goes_away(platform, namespace):
    platform.kubectl("-n", namespace, "apply", "-f", "-", input=_job_with_missing_image("nopull"))
    pod = _wait_pull_failure(platform, namespace)
    name = pod["metadata"]["name"]
    assert "batch.kubernetes.io/job-tracking" in pod["metadata"].get("finalizers", [])
    platform.kubectl("-n", namespace, "delete", "pod", name, "--wait=false")
    _gone(lambda: name not in {p["metadata"]["name"] for p in _pods(platform, namespace)}, 30)
    # The Job counted it as a failure (backoffLimit 0: the Job failed) rather than losing track of it.
    job = json.loads(platform.kubectl("-n", namespace, "get", "job", "nopull", "-o", "json"))
    assert (job["status"].get("failed") or 0) == 1, job["status"]


def test_a_namespace_with_a_pod_that_never_started_finishes_deleting(platform):
    namespace = platform.create_namespace("nopull")
    platform.kubectl("-n", namespace, "apply", "-f", "-", input=_job_with_missing_image("nopull"))
    _wait_pull_failure(platform, namespace)
    platform.delete_namespace(namespace)
    _gone(lambda: not platform.kubectl("get", "namespace", namespace, "--ignore-not-found", "-o", "name").strip(), 90)
