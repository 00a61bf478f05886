"""Runs with `spec.queueName` (Kueue): the Job's label and suspension, run control that leaves
`suspend` to Kueue, the `Queued` status with Kueue's reason, and reading that reason from the
Workloads (issue 16, item 5)."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from ragtune.api.finetunejob import FineTuneJobSpec
from ragtune.finetunejob.kueue import QueueWatcher
from ragtune.finetunejob.render import render_job, render_service, run_control_patch
from ragtune.finetunejob.status import FtjView, JobView, PodView, WorkloadView, build_status
from ragtune.runtime.conditions import get_condition
from ragtune.runtime.kube import KubeError

from .helpers import META, RUN_ID, job_body, pod_body, spec, spec_dict

QUEUE = "team-a-gpus"


def test_a_queued_job_is_labelled_and_created_suspended_and_run_control_leaves_suspend_to_kueue():
    job = render_job(META, spec(queueName=QUEUE), RUN_ID, "img")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == QUEUE
    assert job["spec"]["suspend"] is True
    assert "kueue.x-k8s.io/queue-name" not in job["spec"]["template"]["metadata"]["labels"]
    # Kueue admitted it (suspend false): the operator does not suspend it back, nor the reverse.
    assert run_control_patch({**job["spec"], "suspend": False}, spec(queueName=QUEUE)) == {}
    assert run_control_patch(job["spec"], spec(queueName=QUEUE)) == {}
    # Without a queue, run control still owns suspend.
    plain = render_job(META, spec(), RUN_ID, "img")
    assert plain["spec"]["suspend"] is False and "kueue.x-k8s.io/queue-name" not in plain["metadata"]["labels"]
    assert run_control_patch(plain["spec"], spec(suspend=True)) == {"suspend": True}


def test_the_headless_service_of_a_queued_multi_node_run_has_no_queue_label():
    s = spec(queueName=QUEUE, **{"resources.nodes": 2, "resources.gpus": 0, "resources.cpu": "1",
                                 "resources.memory": "1Gi"})
    job = render_job(META, s, RUN_ID, "img")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == QUEUE
    assert "kueue.x-k8s.io/queue-name" not in render_service(META, job)["metadata"]["labels"]


@pytest.mark.parametrize("bad, field", [
    ({"queueName": "Not_A_Label"}, "queue_name"),
    ({"queueName": "x" * 64}, "queue_name"),
    ({"queueName": QUEUE, "suspend": True}, "suspend"),
])
def test_invalid_queue_specs_are_refused(bad, field):
    with pytest.raises(ValidationError, match=field.split("_")[0]):
        FineTuneJobSpec.model_validate(spec_dict(**bad))


def ftj() -> FtjView:
    return FtjView(META["name"], META["namespace"], META["uid"], 1, spec_dict(queueName=QUEUE), {})


def queued_job(status: dict | None = None) -> JobView:
    return JobView.from_body(job_body(spec(queueName=QUEUE), status))


def workload(*conditions: tuple[str, str, str, str]) -> WorkloadView:
    return WorkloadView.from_body({"metadata": {"name": "job-demo-01234567-g1-abcde"}, "status": {"conditions": [
        {"type": t, "status": s, "reason": r, "message": m} for t, s, r, m in conditions]}})


def test_queued_status_says_why_kueue_holds_the_run():
    j = queued_job()
    assert j.queued and j.queue_name == QUEUE
    no_workload = build_status(ftj(), j, [])
    assert no_workload["phase"] == "Queued"
    assert "is Kueue installed" in no_workload["message"] and QUEUE in no_workload["message"]
    quota = workload(("QuotaReserved", "False", "Pending",
                      "couldn't assign flavors to pod set main: insufficient unused quota for cpu in flavor "
                      "default, 1 more needed"))
    s = build_status(ftj(), j, [], workload=quota)
    assert s["phase"] == "Queued" and "insufficient unused quota for cpu" in s["message"]
    assert get_condition(s["conditions"], "Succeeded")["reason"] == "Queued"
    assert get_condition(s["conditions"], "Ready")["reason"] == "Pending"
    missing = workload(("QuotaReserved", "False", "Inadmissible", f"LocalQueue {QUEUE} doesn't exist"))
    assert get_condition(build_status(ftj(), j, [], workload=missing)["conditions"], "Ready")["reason"] == \
        "Inadmissible"
    preempted = workload(("QuotaReserved", "False", "Pending", "waiting"),
                         ("Evicted", "True", "Preempted", "Preempted to accommodate a workload (UID: 1)"))
    s = build_status(ftj(), j, [], workload=preempted)
    assert get_condition(s["conditions"], "Ready")["reason"] == "Preempted" and "accommodate" in s["message"]


def test_an_admitted_job_runs_as_any_other():
    j = queued_job({"active": 1, "startTime": "2026-01-01T00:00:05Z"})
    admitted = JobView(**{**j.__dict__, "suspend": False})  # Kueue unsuspended it
    s = build_status(ftj(), admitted, [PodView.from_body(pod_body(phase="Running", running=True))])
    assert s["phase"] == "Running"


class ListingKube:
    """Answers GET workloads with what the test puts in `items` (404: no Kueue)."""

    def __init__(self) -> None:
        self.items: list[dict] | None = []
        self.calls = 0

    async def run(self, fn, *args):
        return fn(*args)

    def request(self, method: str, path: str, **_):
        self.calls += 1
        assert (method, path) == ("GET", "/apis/kueue.x-k8s.io/v1beta2/namespaces/team-a/workloads")
        if self.items is None:
            raise KubeError(404, "NotFound", "the server could not find the requested resource")
        return {"items": self.items}


def test_queue_watcher_requeues_a_run_when_its_workload_changes_and_copes_without_kueue():
    kube, changed = ListingKube(), []
    watcher = QueueWatcher(kube, interval=1.0, on_change=changed.append)
    key = ("team-a", "demo")
    watcher.track(key, "job-uid")

    def body(reason: str) -> dict:
        return {"metadata": {"name": "wl", "labels": {"kueue.x-k8s.io/job-uid": "job-uid"}},
                "status": {"conditions": [{"type": "QuotaReserved", "status": "False", "reason": reason}]}}

    async def scenario():
        kube.items = [body("Pending"), {"metadata": {"name": "other", "labels": {"kueue.x-k8s.io/job-uid": "x"}}}]
        await watcher.refresh("team-a")
        assert changed == [key] and watcher.view("team-a", "job-uid").waiting_reason()[0] == "Pending"
        await watcher.refresh("team-a")
        assert changed == [key]  # unchanged: no requeue
        kube.items = [body("Inadmissible")]
        await watcher.refresh("team-a")
        assert changed == [key, key]
        watcher.untrack(key)
        assert watcher.view("team-a", "job-uid") is None
        # No Kueue (404): nothing breaks, and the namespace is not asked again at once.
        watcher.track(key, "job-uid")
        kube.items, calls = None, kube.calls
        await watcher.refresh("team-a")
        await watcher.refresh("team-a")
        assert kube.calls == calls + 1 and watcher.view("team-a", "job-uid") is None

    asyncio.run(scenario())
