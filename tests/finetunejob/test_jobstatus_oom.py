"""An OOM-killed trainer pod -> FineTuneJob reason OutOfMemory, naming the limit and the remedies."""

from __future__ import annotations

from ragtune.finetunejob.status import (
    FtjView,
    JobView,
    PodView,
    build_status,
    describe_pod_failure,
)
from ragtune.runtime.conditions import get_condition

from .helpers import (
    META,
    job_body,
    job_condition,
    pod_body,
    result_message,
    spec,
    spec_dict,
)

REMEDIES = ("spec.resources.memory", "training.batchSize", "training.maxSeqLength", "training.gradientCheckpointing")


def oom_killed_pod(limit: str | None = "2Gi", message: str = "") -> dict:
    body = pod_body(phase="Failed", terminated=(137, message))
    body["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] = "OOMKilled"
    container = {"name": "trainer", "image": "ghcr.io/ragtune/ragtune-trainer:1"}
    if limit:
        container["resources"] = {"requests": {"memory": limit}, "limits": {"memory": limit}}
    body["spec"]["containers"] = [container]
    return body


def test_oom_killed_pod_is_out_of_memory_naming_limit_and_remedies():
    reason, message = describe_pod_failure(PodView.from_body(oom_killed_pod("150Mi")))
    assert reason == "OutOfMemory"
    assert "spec.resources.memory=150Mi" in message and "\n" not in message
    assert all(r in message for r in REMEDIES)


def test_oom_kill_wins_over_a_stale_termination_message_and_needs_no_limit():
    stale = result_message(outcome="Failed", reason="S3Unreachable", message="old")
    reason, message = describe_pod_failure(PodView.from_body(oom_killed_pod(None, stale)))
    assert reason == "OutOfMemory" and "node's memory" in message


def test_plain_exit_137_is_not_out_of_memory():
    reason, _ = describe_pod_failure(PodView.from_body(pod_body(phase="Failed", terminated=(137, ""))))
    assert reason == "TrainerFailed"


def _status(backoff_limit: int, failed: int) -> dict:
    ftj = FtjView(META["name"], META["namespace"], META["uid"], 1, spec_dict(), {})
    conditions = [job_condition("Failed", "BackoffLimitExceeded")]
    job = JobView.from_body(job_body(spec(backoffLimit=backoff_limit), {"failed": failed, "conditions": conditions}))
    return build_status(ftj, job, [PodView.from_body(oom_killed_pod("150Mi"))])


def test_job_failed_by_backoff_limit_after_an_oom_kill_is_out_of_memory():
    for backoff_limit, failed in ((0, 1), (2, 3)):
        s = _status(backoff_limit, failed)
        failed_cond = get_condition(s["conditions"], "Failed")
        assert s["phase"] == "Failed" and failed_cond["reason"] == "OutOfMemory"
        assert f"{failed} attempt(s) failed, spec.backoffLimit is {backoff_limit}" in s["message"]
        assert "last: OutOfMemory:" in s["message"] and "spec.resources.memory=150Mi" in s["message"]
        assert all(r in s["message"] for r in REMEDIES)
