"""Status of a multi-node run: rank 0 (index 0) speaks for the run; an attempt is one pod per node."""

from __future__ import annotations

from ragtune.finetunejob.status import FtjView, JobView, PodView, build_status

from .helpers import META, RUN_ID, job_body, job_condition, pod_body, result_message, spec, spec_dict

SHA = "ef" * 32
NODES = {"resources.nodes": 2, "backoffLimit": 2}


def indexed_pod(index: int, attempt: int = 0, **kw) -> PodView:
    kw.setdefault("created", f"2026-01-01T00:0{attempt}:0{index}Z")
    body = pod_body(name=f"demo-01234567-g1-{index}-{attempt}x", **kw)
    body["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] = str(index)
    return PodView.from_body(body)


def ftj() -> FtjView:
    return FtjView(META["name"], META["namespace"], META["uid"], 1, spec_dict(**NODES), {})


def job(status: dict) -> JobView:
    return JobView.from_body(job_body(spec(**NODES), status))


def test_success_is_read_from_index_0_even_when_another_rank_ended_later():
    msg = result_message(outcome="Succeeded", reason="Completed", message="trained 4 steps", run_id=RUN_ID,
                         adapter_uri=f"s3://out/runs/team-a/demo/{RUN_ID}/", manifest_sha256=SHA, passed=True)
    pods = [indexed_pod(0, phase="Succeeded", terminated=(0, msg)),
            indexed_pod(1, phase="Succeeded", terminated=(0, ""), created="2026-01-01T00:09:00Z")]
    j = job({"succeeded": 2, "conditions": [job_condition("Complete")]})
    assert j.completions == 2 and j.attempts_allowed == 3
    s = build_status(ftj(), j, pods)
    assert s["phase"] == "Succeeded" and s["adapter"]["sha256"] == SHA
    assert s["attempts"] == 1  # two pods, one attempt


def test_a_failed_attempt_of_both_ranks_is_one_attempt_and_names_rank_0s_reason():
    pods = [indexed_pod(0, phase="Failed", terminated=(1, result_message(
                outcome="Failed", reason="S3Unreachable", message="minio down", run_id=RUN_ID))),
            indexed_pod(1, phase="Failed", terminated=(1, "gloo: connection closed by peer"),
                        created="2026-01-01T00:00:09Z")]
    s = build_status(ftj(), job({"failed": 2}), pods)
    assert s["phase"] == "Pending" and s["attempts"] == 1
    assert "attempt 1 of 3 ended (S3Unreachable" in s["message"]
    # The retry: both indexes run again; still "of 3" attempts, not of backoffLimit + 1 pods.
    pods += [indexed_pod(0, 1, running=True, phase="Running"), indexed_pod(1, 1, running=True, phase="Running")]
    s = build_status(ftj(), job({"failed": 2, "active": 2}), pods)
    assert s["phase"] == "Running" and s["attempts"] == 2
    assert s["message"].startswith("attempt 2 of 3: training (pod demo-01234567-g1-0-1x)")
    assert s["workers"] == {"ready": 2, "total": 2, "worldSize": 2}


def test_workers_count_the_attempts_running_pods_and_the_world_size():
    f = FtjView(META["name"], META["namespace"], META["uid"], 1,
                spec_dict(**{"resources.nodes": 2, "resources.gpus": 4}), {})
    j = JobView.from_body(job_body(spec(**{"resources.nodes": 2, "resources.gpus": 4}), {"active": 2}))
    s = build_status(f, j, [indexed_pod(0, running=True, phase="Running"), indexed_pod(1)])
    assert s["workers"] == {"ready": 1, "total": 2, "worldSize": 8}
    # A single-pod run has no workers block (its status is as before).
    assert "workers" not in build_status(FtjView(META["name"], META["namespace"], META["uid"], 1, spec_dict(), {}),
                                         JobView.from_body(job_body(spec(), {"active": 1})), [])


def test_single_pod_runs_count_as_before():
    j = JobView.from_body(job_body(spec(), {"failed": 1}))
    assert j.completions == 1 and j.attempts_allowed == 3


def test_an_unschedulable_worker_is_named_by_its_index_while_rank_0_waits_for_it():
    unschedulable = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                      "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]
    pods = [indexed_pod(0, running=True, phase="Running"), indexed_pod(1, conditions=unschedulable)]
    s = build_status(ftj(), job({"active": 2}), pods)
    assert s["phase"] == "Pending", s["message"]
    assert s["message"].startswith("worker index 1 of 2 (pod demo-01234567-g1-1-0x): no node can run")
    assert "Insufficient nvidia.com/gpu" in s["message"]
    ready = next(c for c in s["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Unschedulable")
    # Once it is scheduled and runs, the run is Running again.
    pods[1] = indexed_pod(1, running=True, phase="Running")
    assert build_status(ftj(), job({"active": 2}), pods)["phase"] == "Running"


RDZV = ("not all 2 nodes joined the rendezvous at demo-01234567-g1-0.demo-01234567-g1:29500 within 600 s "
        "(training.distributed.rendezvousTimeoutSeconds): RendezvousTimeoutError")


def test_a_rank_that_never_joins_the_rendezvous_ends_the_attempt_as_rendezvous_timeout():
    """Index 0's `ragtune torchrun` gives up on the rendezvous and writes RendezvousTimeout: the
    attempt history records it; while worker 1 still cannot be scheduled the run says so by index;
    with no retry left the FineTuneJob fails naming the last attempt's RendezvousTimeout."""
    timed_out = result_message(outcome="Failed", reason="RendezvousTimeout", message=RDZV, run_id=RUN_ID)
    unschedulable = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                      "message": "0/1 nodes are available: 1 Insufficient cpu."}]
    pods = [indexed_pod(0, phase="Failed", terminated=(1, timed_out)), indexed_pod(1, conditions=unschedulable)]
    s = build_status(ftj(), job({"failed": 1, "active": 1}), pods)
    assert [(h["attempt"], h["reason"]) for h in s["attemptHistory"]] == [(1, "RendezvousTimeout")]
    assert s["attemptHistory"][0]["message"].startswith("not all 2 nodes joined the rendezvous")
    assert s["phase"] == "Pending" and s["message"].startswith("worker index 1 of 2"), s["message"]

    # Both ranks' pods gone, the retry not started yet: the run says why the attempt ended.
    s = build_status(ftj(), job({"failed": 2}), [indexed_pod(0, phase="Failed", terminated=(1, timed_out))])
    assert s["phase"] == "Pending" and "attempt 1 of 3 ended (RendezvousTimeout: not all 2 nodes" in s["message"]
    running = next(c for c in s["conditions"] if c["type"] == "Running")
    assert running["reason"] == "RendezvousTimeout"

    # Every attempt timed out: the Job's backoffLimit is spent and the last reason is kept.
    attempts = [indexed_pod(0, a, phase="Failed", terminated=(1, timed_out)) for a in range(3)]
    s = build_status(ftj(), job({"failed": 6, "conditions": [job_condition("Failed", "BackoffLimitExceeded")]}),
                     attempts)
    assert s["phase"] == "Failed" and s["conditions"][-1]["type"] == "Failed"
    assert "last: RendezvousTimeout: not all 2 nodes joined" in s["message"], s["message"]
    assert [h["reason"] for h in s["attemptHistory"]] == ["RendezvousTimeout"] * 3
