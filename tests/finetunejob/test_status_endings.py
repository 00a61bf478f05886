"""The end of a run, before the Job controller has said so: status and Events never announce a
retry that will not happen (issue 15, bug 2).

Between a trainer pod's end and the Job's terminal condition the operator sees a Job with no
end condition and a finished pod. A permanent exit (code 2: the podFailurePolicy fails the Job),
an exhausted `backoffLimit` or a succeeded pod all end the run; only the rest is a retry.
"""

from __future__ import annotations

import pytest

from ragtune.finetunejob.status import FtjView, JobView, PodView, build_status, transition_event
from ragtune.runtime.conditions import get_condition

from .helpers import META, job_body, job_condition, pod_body, result_message, spec, spec_dict

SHA = "cd" * 32
RUNNING = pod_body(name="demo-01234567-g1-aaaaa", phase="Running", running=True, created="2026-01-01T00:00:01Z")
RETRY = pod_body(name="demo-01234567-g1-bbbbb", phase="Running", running=True, created="2026-01-01T00:01:30Z")


def ftj(status: dict | None = None) -> FtjView:
    return FtjView(META["name"], META["namespace"], META["uid"], 1, spec_dict(), status or {})


def job(status: dict | None = None, backoff_limit: int = 2) -> JobView:
    return JobView.from_body(job_body(spec(backoffLimit=backoff_limit), status))


def failed_pod(n: int, code: int = 1, message: str = "") -> dict:
    msg = message or result_message(outcome="Failed", reason="S3Unreachable", message="endpoint timed out")
    return pod_body(name=f"demo-01234567-g1-f{n:04d}", phase="Failed", terminated=(code, msg),
                    created=f"2026-01-01T00:0{n}:00Z")


def succeeded_pod(n: int) -> dict:
    msg = result_message(outcome="Succeeded", reason="Completed", adapter_uri="s3://o/x/", manifest_sha256=SHA)
    return pod_body(name=f"demo-01234567-g1-s{n:04d}", phase="Succeeded", terminated=(0, msg),
                    created=f"2026-01-01T00:0{n}:00Z")


def play(backoff_limit: int, steps: list[tuple[dict, list[dict]]]) -> tuple[dict, list[tuple[str, str, str]]]:
    """Feeds the watch states of a run to build_status; returns the last status and every Event."""
    status: dict = {}
    events = []
    for job_status, pod_bodies in steps:
        new = build_status(ftj(status), job(job_status, backoff_limit), [PodView.from_body(p) for p in pod_bodies])
        event = transition_event(status, new)
        if event is not None:
            events.append(event)
        status = new
    return status, events


def reason(status: dict) -> str:
    return get_condition(status["conditions"], "Succeeded")["reason"]


INVALID = result_message(outcome="Failed", reason="InvalidDataset", message="train.jsonl line 3: no question")
GATE = result_message(outcome="Failed", reason="GateFailed", message="refusalRate 0.2 < 0.8")

# (name, backoffLimit, watch states, final phase, final reason, retries the Job really made)
ENDINGS = [
    ("invalid dataset (exit 2)", 2, [
        ({"active": 1}, [RUNNING]),
        ({"active": 0, "failed": 1}, [failed_pod(1, 2, INVALID)]),
        ({"failed": 1, "conditions": [job_condition("Failed", "PodFailurePolicy")]}, [failed_pod(1, 2, INVALID)]),
    ], "Failed", "InvalidDataset", 0),
    ("gate failure (exit 2), seen before the Job counts it", 2, [
        ({"active": 1}, [RUNNING]),
        ({"active": 1}, [failed_pod(1, 2, GATE)]),
        ({"failed": 1, "conditions": [job_condition("Failed", "PodFailurePolicy")]}, [failed_pod(1, 2, GATE)]),
    ], "Failed", "GateFailed", 0),
    ("retryable failures with backoffLimit 1", 1, [
        ({"active": 1}, [RUNNING]),
        ({"failed": 1}, [failed_pod(1)]),
        ({"active": 1, "failed": 1}, [failed_pod(1), RETRY]),
        ({"failed": 2}, [failed_pod(1), failed_pod(2)]),
        ({"failed": 2, "conditions": [job_condition("Failed", "BackoffLimitExceeded")]}, [failed_pod(1), failed_pod(2)]),
    ], "Failed", "BackoffLimitExceeded", 1),
    ("an S3 outage, then success seen before the Job is Complete", 2, [
        ({"active": 1}, [RUNNING]),
        ({"failed": 1}, [failed_pod(1)]),
        ({"active": 1, "failed": 1}, [failed_pod(1), RETRY]),
        ({"failed": 1}, [failed_pod(1), succeeded_pod(2)]),
        ({"failed": 1, "succeeded": 1, "conditions": [job_condition("Complete")]}, [failed_pod(1), succeeded_pod(2)]),
    ], "Succeeded", "Completed", 1),
]


@pytest.mark.parametrize("name,backoff_limit,steps,phase,final,retries", ENDINGS, ids=[e[0] for e in ENDINGS])
def test_no_event_announces_a_retry_that_does_not_happen(name, backoff_limit, steps, phase, final, retries):
    status, events = play(backoff_limit, steps)
    assert status["phase"] == phase and reason(status) == final, status["message"]
    announced = [e for e in events if "retries" in e[2] or e[1] == "Retrying"]
    assert len(announced) == retries, events
    assert [e[1] for e in events].count(final) == 1, events  # the outcome is announced exactly once


def test_a_real_retry_names_the_attempt_that_ended():
    status, events = play(2, [({"active": 1}, [RUNNING]), ({"failed": 1}, [failed_pod(1)]),
                              ({"active": 1, "failed": 1}, [failed_pod(1), RETRY]),
                              ({"failed": 2}, [failed_pod(1), failed_pod(2)])])
    assert status["phase"] == "Pending" and reason(status) == "Retrying"
    assert status["message"].startswith("attempt 2 of 3 ended (S3Unreachable")
    assert [e[2].split(" (")[0] for e in events if e[1] == "Retrying"] == ["attempt 1 of 3 ended",
                                                                            "attempt 2 of 3 ended"]


def test_an_exhausted_backoff_limit_ends_the_run_before_the_job_says_so():
    status, _ = play(1, [({"failed": 2}, [failed_pod(1), failed_pod(2)])])
    assert status["phase"] == "Failed" and reason(status) == "BackoffLimitExceeded"
    assert "2 attempt(s) failed" in status["message"] and "retries" not in status["message"]
    # ... and the Job's own condition, once it comes, changes nothing but the completion time
    final = build_status(ftj(status), job({"failed": 2, "conditions": [job_condition("Failed", "BackoffLimitExceeded")]},
                                          1), [PodView.from_body(failed_pod(1)), PodView.from_body(failed_pod(2))])
    assert {k: v for k, v in final.items() if k != "completionTime"} == \
        {k: v for k, v in status.items() if k != "completionTime"}


def test_a_run_seen_to_end_from_its_pod_has_a_completion_time_at_once():
    """Succeeded from the pod before the Job says so: completionTime is when the trainer terminated."""
    status, _ = play(2, [({"active": 1}, [RUNNING]), ({"active": 1}, [succeeded_pod(2)])])
    assert status["phase"] == "Succeeded" and status["completionTime"] == "2026-01-01T00:02:30Z"
    status, _ = play(0, [({"active": 1}, [RUNNING]), ({"active": 1}, [failed_pod(1, code=2)])])
    assert status["phase"] == "Failed" and status["completionTime"] == "2026-01-01T00:01:30Z"
