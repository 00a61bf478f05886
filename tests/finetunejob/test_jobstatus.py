"""Job + pods -> FineTuneJob status: phases, condition reasons, results, events."""

from __future__ import annotations

import json

from ragtune.api.common import GateResult
from ragtune.finetunejob.controller import parse_progress
from ragtune.finetunejob.status import (
    FtjView,
    JobView,
    PodView,
    build_status,
    duration_seconds,
    ended_attempt_events,
    status_patch,
    transition_event,
)
from ragtune.runtime.conditions import get_condition

from .helpers import (
    META,
    RUN_ID,
    job_body,
    job_condition,
    pod_body,
    result_message,
    spec,
    spec_dict,
)

SHA = "cd" * 32


def ftj(status: dict | None = None, generation: int = 1) -> FtjView:
    return FtjView(META["name"], META["namespace"], META["uid"], generation, spec_dict(), status or {})


def job(status: dict | None = None, **spec_overrides) -> JobView:
    return JobView.from_body(job_body(spec(**spec_overrides) if spec_overrides else None, status))


def pods(*bodies: dict) -> list[PodView]:
    return [PodView.from_body(b) for b in bodies]


def cond(status: dict, type_: str) -> dict:
    found = get_condition(status["conditions"], type_)
    assert found is not None, f"no {type_} condition in {status['conditions']}"
    return found


def test_views_read_labels_and_annotations():
    j = job({"active": 1, "startTime": "2026-01-01T00:00:05Z"})
    assert (j.name, j.run_id, j.generation, j.owner_uid) == ("demo-01234567-g1", RUN_ID, 1, META["uid"])
    assert j.spec_hash and j.active == 1 and not j.suspend
    p = PodView.from_body(pod_body(waiting=("ContainerCreating", "")))
    assert (p.job_name, p.ftj_name, p.waiting_reason) == ("demo-01234567-g1", "demo", "ContainerCreating")


def test_no_job_yet_and_job_create_failure():
    s = build_status(ftj(), None, [])
    assert s["phase"] == "Pending" and s["observedGeneration"] == 1
    s = build_status(ftj(), None, [], problem=("JobCreateFailed", "quota exceeded"))
    assert cond(s, "Ready")["status"] == "False" and cond(s, "Ready")["reason"] == "JobCreateFailed"
    assert cond(s, "Succeeded")["reason"] == "JobCreateFailed"


def test_pending_then_running_with_progress():
    s = build_status(ftj(), job({"active": 1}), pods(pod_body(waiting=("ContainerCreating", ""))))
    assert s["phase"] == "Pending" and s["jobName"] == "demo-01234567-g1" and s["runId"] == RUN_ID
    assert cond(s, "Ready")["status"] == "Unknown"
    progress = {"step": 3, "totalSteps": 10, "loss": 1.5, "percent": 30, "stage": "training"}
    s = build_status(ftj(s), job({"active": 1, "startTime": "2026-01-01T00:00:05Z"}),
                     pods(pod_body(phase="Running", running=True)), progress=progress)
    assert s["phase"] == "Running" and s["progress"] == progress and s["attempts"] == 1
    assert cond(s, "Ready")["status"] == "True" and cond(s, "Running")["status"] == "True"
    assert cond(s, "Succeeded")["status"] == "Unknown"
    assert s["startTime"] == "2026-01-01T00:00:05Z"
    s2 = build_status(ftj(s), job({"active": 1}), pods(pod_body(phase="Running", running=True)),
                      progress={**progress, "stage": "evaluating"})
    assert s2["phase"] == "Evaluating"


def test_missing_secret_and_missing_key():
    p = pod_body(waiting=("CreateContainerConfigError", 'secret "s3-credentials" not found'))
    s = build_status(ftj(), job({"active": 1}), pods(p))
    assert s["phase"] == "Pending"
    assert cond(s, "Ready")["reason"] == "SecretNotFound" and cond(s, "Ready")["status"] == "False"
    assert "s3-credentials" in s["message"]
    p = pod_body(waiting=("CreateContainerConfigError",
                          "couldn't find key AWS_ACCESS_KEY_ID in Secret team-a/s3-credentials"))
    s = build_status(ftj(), job({"active": 1}), pods(p))
    assert cond(s, "Succeeded")["reason"] == "SecretKeyNotFound"


def test_image_pull_and_unschedulable():
    for waiting in ("ErrImagePull", "ImagePullBackOff"):
        s = build_status(ftj(), job({"active": 1}), pods(pod_body(waiting=(waiting, "repository not found"))))
        assert cond(s, "Ready")["reason"] == "ImagePullFailed" and s["phase"] == "Pending"
    unsched = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
               "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}
    s = build_status(ftj(), job({"active": 1}), pods(pod_body(conditions=[unsched])))
    assert cond(s, "Ready")["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in cond(s, "Ready")["message"]


def test_success_reads_termination_message():
    msg = result_message(outcome="Succeeded", reason="Completed", message="done", run_id=RUN_ID,
                         adapter_uri="s3://out/runs/team-a/demo/" + RUN_ID + "/", manifest_sha256=SHA,
                         adapter_size_bytes=42, report_uri="s3://out/r.html",
                         base={"samples": 4, "f1": 0.4}, adapter={"samples": 4, "f1": 0.7, "refusalRate": 0.9},
                         passed=True)
    j = job({"succeeded": 1, "startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T00:10:00Z",
             "conditions": [job_condition("Complete")]})
    s = build_status(ftj(), j, pods(pod_body(phase="Succeeded", terminated=(0, msg))))
    assert s["phase"] == "Succeeded"
    assert s["adapter"] == {"uri": "s3://out/runs/team-a/demo/" + RUN_ID + "/", "sha256": SHA, "sizeBytes": 42,
                            "reportUri": "s3://out/r.html"}
    assert s["metrics"]["adapter"]["f1"] == 0.7 and s["metrics"]["passed"] is True
    assert s["score"] == "F1 0.70 / refusal 0.90"
    assert cond(s, "Succeeded")["status"] == "True" and cond(s, "Succeeded")["reason"] == "Completed"
    assert s["completionTime"] == "2026-01-01T00:10:00Z"
    assert duration_seconds(s) == 600


def test_success_without_result_is_not_trusted():
    j = job({"succeeded": 1, "conditions": [job_condition("Complete")]})
    s = build_status(ftj(), j, pods(pod_body(phase="Succeeded", terminated=(0, ""))))
    assert s["phase"] == "Failed" and cond(s, "Failed")["reason"] == "InvalidTrainerResult"
    assert "adapter" not in s


def test_permanent_trainer_failure_and_gate_failure():
    msg = result_message(outcome="Failed", reason="InvalidDataset", message="train.jsonl line 3: no question")
    j = job({"failed": 1, "conditions": [job_condition("Failed", "PodFailurePolicy")]})
    s = build_status(ftj(), j, pods(pod_body(phase="Failed", terminated=(2, msg))))
    assert s["phase"] == "Failed"
    assert cond(s, "Failed")["reason"] == "InvalidDataset" and "line 3" in cond(s, "Failed")["message"]
    gate = GateResult(metric="refusalRate", comparison=">=", threshold=0.95, value=0.61, passed=False, margin=-0.34)
    msg = result_message(outcome="Failed", reason="GateFailed", adapter_uri="s3://out/x/", manifest_sha256=SHA,
                         adapter={"samples": 4, "refusalRate": 0.61}, passed=False, gates=[gate])
    s = build_status(ftj(), j, pods(pod_body(phase="Failed", terminated=(2, msg))))
    assert cond(s, "Succeeded")["reason"] == "GateFailed"
    assert "refusalRate 0.610 < 0.95" in s["message"]
    assert s["adapter"]["sha256"] == SHA and s["metrics"]["passed"] is False


def test_backoff_limit_exceeded_names_the_last_failure():
    msg = result_message(outcome="Failed", reason="S3Unreachable", message="endpoint timed out")
    j = job({"failed": 3, "conditions": [job_condition("Failed", "BackoffLimitExceeded")]})
    s = build_status(ftj(), j, pods(pod_body(phase="Failed", terminated=(1, msg))))
    assert cond(s, "Failed")["reason"] == "BackoffLimitExceeded"
    assert "S3Unreachable" in s["message"] and "3 attempt" in s["message"]
    # No result at all: the log tail (FallbackToLogsOnError) is quoted.
    s = build_status(ftj(), j, pods(pod_body(phase="Failed", terminated=(137, "Killed\nout of memory"))))
    assert "code 137" in s["message"] and "out of memory" in s["message"]


def test_deadline_exceeded():
    j = job({"failed": 1, "conditions": [job_condition("Failed", "DeadlineExceeded")]}, activeDeadlineSeconds=60)
    s = build_status(ftj(), j, pods(pod_body(phase="Failed")))
    assert s["phase"] == "Failed" and cond(s, "Failed")["reason"] == "DeadlineExceeded"
    assert "60 s" in s["message"]


def test_eviction_and_preemption_while_the_job_retries():
    disruption = {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                  "message": "Eviction API: evicting"}
    evicted = pod_body(phase="Failed", conditions=[disruption], terminated=(143, ""))
    j = job({"active": 0, "failed": 1})
    s = build_status(ftj(), j, pods(evicted))
    assert s["phase"] == "Pending" and cond(s, "Running")["reason"] == "Evicted"
    assert cond(s, "Succeeded")["reason"] == "Retrying"
    replacement = pod_body(name="demo-01234567-g1-fghij", phase="Running", running=True, created="2026-01-01T00:05:00Z")
    s = build_status(ftj(s), job({"active": 1, "failed": 1}), pods(evicted, replacement))
    assert s["phase"] == "Running" and s["attempts"] == 2
    preempted = pod_body(phase="Failed", conditions=[{**disruption, "reason": "PreemptionByScheduler"}])
    s = build_status(ftj(), job({"failed": 1, "conditions": [job_condition("Failed", "BackoffLimitExceeded")]},
                                backoffLimit=0), pods(preempted))
    assert "Preempted" in s["message"]


def test_suspend_and_resume():
    s = build_status(ftj(), job({"conditions": [job_condition("Suspended")]}, suspend=True), [])
    assert s["phase"] == "Suspended" and cond(s, "Suspended")["status"] == "True"
    s = build_status(ftj(s, generation=2), job({"active": 1}), pods(pod_body(phase="Running", running=True)))
    assert s["phase"] == "Running" and cond(s, "Suspended")["status"] == "False"
    assert s["observedGeneration"] == 2 and cond(s, "Running")["observedGeneration"] == 2


def test_terminal_outcome_of_a_run_is_kept_when_pods_are_gone():
    msg = result_message(outcome="Succeeded", reason="Completed", adapter_uri="s3://o/x/", manifest_sha256=SHA)
    j = job({"succeeded": 1, "conditions": [job_condition("Complete")]})
    done = build_status(ftj(), j, pods(pod_body(phase="Succeeded", terminated=(0, msg))))
    again = build_status(ftj(done), j, [])
    assert again == done


def test_condition_times_do_not_churn():
    j, p = job({"active": 1}), pods(pod_body(phase="Running", running=True))
    first = build_status(ftj(), j, p)
    second = build_status(ftj(first), j, p)
    assert status_patch(first, second) == {}


def test_status_patch_nulls_removed_fields():
    assert status_patch({"a": 1, "b": 2}, {"a": 1, "c": 3}) == {"b": None, "c": 3}


def test_transition_events():
    pending = build_status(ftj(), job({"active": 1}), pods(pod_body()))
    running = build_status(ftj(pending), job({"active": 1}), pods(pod_body(phase="Running", running=True)))
    assert transition_event(pending, running) == ("Normal", "Running", running["message"])
    assert transition_event(running, running) is None
    stuck = build_status(ftj(), job({"active": 1}), pods(pod_body(waiting=("ErrImagePull", "nope"))))
    assert transition_event(pending, stuck)[:2] == ("Warning", "ImagePullFailed")


def test_an_eviction_the_replacement_pod_absorbed_still_gets_its_retrying_event():
    """The Job controller replaces an evicted pod at once: the operator often sees the evicted pod
    and its running replacement in the same look, never the Retrying phase between them."""
    disruption = {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                  "message": "Eviction API: evicting"}
    first = pod_body(phase="Running", running=True)
    running = build_status(ftj(), job({"active": 1}, backoffLimit=0), pods(first))
    evicted = pod_body(phase="Failed", conditions=[disruption], terminated=(143, ""))
    replacement = pod_body(name="demo-01234567-g1-fghij", phase="Running", running=True, created="2026-01-01T00:05:00Z")
    again = build_status(ftj(running), job({"active": 1}, backoffLimit=0), pods(evicted, replacement))
    assert again["phase"] == "Running" and transition_event(running, again) is None  # same phase, same reason
    (event,) = ended_attempt_events(running, again)
    assert event[:2] == ("Warning", "Retrying") and "attempt 1 ended (Evicted: pod " in event[2]
    assert ended_attempt_events(again, again) == []  # once per ended attempt
    # The Retrying phase itself says it: no second Event for the same attempt.
    retrying = build_status(ftj(running), job({"active": 0}, backoffLimit=0), pods(evicted))
    assert cond(retrying, "Succeeded")["reason"] == "Retrying" and ended_attempt_events(running, retrying) == []


def test_parse_progress_takes_the_newest_valid_line():
    tail = "\n".join([
        'RAGTUNE_PROGRESS {"step": 1, "totalSteps": 10}',
        "some log line",
        'RAGTUNE_PROGRESS {"step": 5, "totalSteps": 10, "loss": 0.5}',
        "RAGTUNE_PROGRESS {not json",
    ])
    assert parse_progress(tail) == {"step": 5, "totalSteps": 10, "loss": 0.5}
    assert parse_progress("nothing here") is None


def test_a_preemption_does_not_use_up_backoff_limit_zero():
    """The Job's podFailurePolicy ignores DisruptionTarget pods: with backoffLimit 0 a preempted
    attempt is retried, and the status says so instead of predicting BackoffLimitExceeded."""
    disruption = {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
                  "message": "preempted by a higher-priority pod"}
    j = job({"active": 0}, backoffLimit=0)
    assert j.ignores_disruption
    s = build_status(ftj(), j, pods(pod_body(phase="Failed", conditions=[disruption], terminated=(1, ""))))
    assert s["phase"] == "Pending" and cond(s, "Succeeded")["reason"] == "Retrying", s["message"]
    assert cond(s, "Running")["reason"] == "Preempted"
    # A Job rendered before the rule existed counts the preemption: that one has no retry left.
    old = JobView(**{**j.__dict__, "ignores_disruption": False})
    s = build_status(ftj(), old, pods(pod_body(phase="Failed", conditions=[disruption], terminated=(1, ""))))
    assert s["phase"] == "Failed"


def test_retry_after_the_failed_pod_is_gone_keeps_the_failure_and_counts_attempts():
    disruption = {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                  "message": "Eviction API: evicting"}
    evicted = build_status(ftj(), job({"failed": 1}), pods(pod_body(phase="Failed", conditions=[disruption])))
    gone = build_status(ftj(evicted), job({"failed": 1}, backoffLimit=1), [])
    assert gone["phase"] == "Pending" and cond(gone, "Succeeded")["reason"] == "Retrying"
    assert cond(gone, "Running")["reason"] == "Evicted"
    assert "attempt 1 of 2 failed" in gone["message"]
    # The success of attempt 2 is seen before the Job counts it: still two attempts.
    msg = result_message(outcome="Succeeded", reason="Completed", adapter_uri="s3://o/x/", manifest_sha256=SHA)
    done = build_status(ftj(gone), job({"failed": 1, "conditions": [job_condition("SuccessCriteriaMet")]}),
                        pods(pod_body(phase="Succeeded", terminated=(0, msg))))
    assert done["phase"] == "Succeeded" and done["attempts"] == 2 and done["completionTime"]


def test_the_status_written_is_validated_by_its_model():
    """`build_status` output parses as FineTuneJobStatus (the CRD's status schema comes from it);
    a status the model would refuse is not written."""
    import pydantic
    import pytest

    s = build_status(ftj(), job({"active": 1}), pods(pod_body(phase="Running", running=True)),
                     progress={"step": 3, "totalSteps": 10, "loss": 0.5})
    assert s["progress"]["step"] == 3
    with pytest.raises(pydantic.ValidationError):
        build_status(ftj(), job({"active": 1}), pods(pod_body(phase="Running", running=True)),
                     progress={"step": "three"})


def test_a_newer_trainers_result_is_read_by_an_older_operator():
    """A trainer image newer than the operator may add fields (top level and inside metrics):
    the run's outcome and every field this operator knows still count; a known field with a
    wrong value still makes the result untrusted."""
    msg = json.dumps({"outcome": "Succeeded", "reason": "Completed", "runId": RUN_ID,
                      "adapterUri": "s3://out/runs/team-a/demo/" + RUN_ID + "/", "manifestSha256": SHA,
                      "adapterSizeBytes": 42, "adapter": {"samples": 4, "f1": 0.7, "judgeScore": 0.8},
                      "passed": True, "stagesRun": [{"name": "sft"}, {"name": "preference"}]})
    done = job({"succeeded": 1, "conditions": [job_condition("Complete")]})
    s = build_status(ftj(), done, pods(pod_body(phase="Succeeded", terminated=(0, msg))))
    assert s["phase"] == "Succeeded" and s["adapter"]["sha256"] == SHA
    assert s["metrics"]["adapter"] == {"samples": 4, "f1": 0.7}

    bad = json.dumps({"outcome": "Succeeded", "reason": "Completed", "runId": RUN_ID,
                      "adapter": {"f1": "high"}, "futureField": 1})
    s = build_status(ftj(), done, pods(pod_body(phase="Succeeded", terminated=(0, bad))))
    assert s["phase"] == "Failed" and cond(s, "Failed")["reason"] == "InvalidTrainerResult"


def test_progress_lines_of_a_newer_trainer_keep_the_fields_this_operator_knows():
    tail = 'RAGTUNE_PROGRESS {"step": 3, "totalSteps": 10, "rank": 0, "worldSizeSeen": 2}'
    assert parse_progress(tail) == {"step": 3, "totalSteps": 10}


def test_attempt_history_lists_each_ended_attempt_once_and_outlives_its_pods():
    failed = pod_body(phase="Failed", terminated=(1, result_message(outcome="Failed", reason="S3Unreachable",
                                                                    message="minio down", run_id=RUN_ID)))
    preempted = pod_body(name="demo-01234567-g1-second", phase="Failed", created="2026-01-01T00:05:00Z",
                         terminated=(1, ""), conditions=[{"type": "DisruptionTarget", "status": "True",
                                                          "reason": "PreemptionByScheduler", "message": "preempted"}])
    running = pod_body(name="demo-01234567-g1-third", phase="Running", running=True, created="2026-01-01T00:09:00Z")
    s = build_status(ftj(), job({"failed": 1, "active": 1}, backoffLimit=3), pods(failed, preempted, running))
    history = s["attemptHistory"]
    assert [(r["attempt"], r["reason"]) for r in history] == [(1, "S3Unreachable"), (2, "Preempted")]
    assert history[0]["pod"] == "demo-01234567-g1-abcde" and "minio down" in history[0]["message"]
    assert history[0]["finishedAt"]
    # The failed pods are gone (e.g. the Job was recreated by someone): the history stays, once.
    again = build_status(ftj(s), job({"failed": 1, "active": 1}, backoffLimit=3), pods(running, failed))
    assert again["attemptHistory"] == history
    # A new run (spec change: another runId) starts with an empty history.
    other = JobView(**{**job({"active": 1}).__dict__, "run_id": "01234567-g2", "generation": 2})
    fresh = build_status(ftj(s, generation=2), other, pods(pod_body(phase="Running", running=True)))
    assert "attemptHistory" not in fresh
