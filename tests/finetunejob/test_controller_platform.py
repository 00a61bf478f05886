"""The FineTuneJob controller against the real local control plane (kube-apiserver, Job controller,
scheduler, pod runner): Job rendering accepted by the API server, success, every run-time failure
kind, suspend/resume, spec changes, deletion, operator crash and restart, metrics."""

from __future__ import annotations

import json
import time

import pytest

from .conftest import (
    condition,
    events,
    ftj_manifest,
    get_json,
    jobs_of,
    pods_of,
    wait_status,
)

pytestmark = [pytest.mark.platform, pytest.mark.slow]


def _reasons(platform, ns: str, name: str) -> list[tuple[str, str]]:
    return [(e["type"], e["reason"]) for e in events(platform, ns, name)]


def test_job_created_with_the_pod_contract(platform, namespace, operator):
    platform.apply(ftj_manifest("render", namespace, "succeed/30",
                                resources={"nodeSelector": {"kubernetes.io/hostname": "ragtune-local"}}))
    status = wait_status(platform, namespace, "render", lambda s: s.get("jobName"), what="jobName")
    job = get_json(platform, "-n", namespace, "job", status["jobName"])
    ftj = get_json(platform, "-n", namespace, "finetunejob", "render")
    assert job["metadata"]["ownerReferences"][0]["uid"] == ftj["metadata"]["uid"]
    assert job["metadata"]["ownerReferences"][0]["controller"] is True
    assert job["metadata"]["name"] == f"render-{status['runId']}"
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-credentials"
    assert json.loads(env["RAGTUNE_OBJECT"]["value"])["metadata"]["uid"] == ftj["metadata"]["uid"]
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["nodeSelector"]
    assert [r["action"] for r in job["spec"]["podFailurePolicy"]["rules"]] == ["Ignore", "FailJob"]
    # The API server accepted the rendered Job, and the run goes on to Running with sampled progress.
    status = wait_status(platform, namespace, "render", lambda s: (s.get("progress") or {}).get("step", 0) >= 1,
                         what="progress sampled")
    assert status["phase"] == "Running" and condition(status, "Running")["status"] == "True"


def test_success_path_status_events_and_metrics(platform, namespace, operator):
    before = operator.metrics()
    platform.apply(ftj_manifest("ok", namespace, "succeed/3"))
    status = wait_status(platform, namespace, "ok", lambda s: s["phase"] == "Succeeded", what="Succeeded")
    assert status["adapter"]["sha256"] == "ab" * 32
    assert status["adapter"]["uri"].endswith(f"/{namespace}/ok/{status['runId']}/")
    assert status["metrics"]["adapter"]["f1"] == 0.7 and status["metrics"]["passed"] is True
    assert status["score"] == "F1 0.70 / refusal 0.90"
    assert status["observedGeneration"] == 1 and status["attempts"] == 1
    assert status["startTime"] and status["completionTime"]
    succeeded = condition(status, "Succeeded")
    assert (succeeded["status"], succeeded["reason"], succeeded["observedGeneration"]) == ("True", "Completed", 1)
    reasons = [r for _, r in _reasons(platform, namespace, "ok")]
    assert reasons[0] == "JobCreated" and "Completed" in reasons
    # kubectl's printer columns show it.
    assert "Succeeded" in platform.kubectl("-n", namespace, "get", "ftj", "ok")
    after = operator.metrics()
    key = 'ragtune_reconciles_total{kind="FineTuneJob",outcome="success"}'
    assert after[key] > before.get(key, 0)
    assert after['ragtune_training_duration_seconds_count{outcome="Succeeded"}'] >= 1
    assert after.get('ragtune_finetunejobs{phase="Succeeded"}', 0) >= 1


FAILURES = [
    # name, scenario, spec overrides, phase, reason (Succeeded condition), text in the message
    ("nosecret", "succeed/2", {"s3": {"credentialsSecretRef": {"name": "absent"}}}, "Pending", "SecretNotFound",
     "absent"),
    ("nokey", "succeed/2", {"s3": {"credentialsSecretRef": {"name": "s3-credentials", "accessKeyIdKey": "NOPE"}}},
     "Pending", "SecretKeyNotFound", "NOPE"),
    ("noimage", "succeed/2", {"resources": {"gpus": 0, "cpu": "100m", "memory": "256Mi",
                                            "image": "ghcr.io/nope/nope:1"}}, "Pending", "ImagePullFailed", "nope"),
    ("nogpu", "succeed/2", {"resources": {"gpus": 64, "cpu": "100m", "memory": "256Mi"}}, "Pending",
     "Unschedulable", "nvidia.com/gpu"),
    ("baddata", "invalid-dataset", {"backoffLimit": 3}, "Failed", "InvalidDataset", "line 3"),
    ("gates", "gate-fail", {}, "Failed", "GateFailed", "refusalRate"),
    ("flaky", "retryable", {"backoffLimit": 1}, "Failed", "BackoffLimitExceeded", "S3Unreachable"),
    ("noresult", "no-result", {}, "Failed", "InvalidTrainerResult", "termination message"),
]


@pytest.mark.parametrize("name, scenario, spec, phase, reason, text", FAILURES, ids=[f[0] for f in FAILURES])
def test_failure_kinds(platform, namespace, operator, name, scenario, spec, phase, reason, text):
    platform.apply(ftj_manifest(name, namespace, scenario, **spec))
    status = wait_status(platform, namespace, name, lambda s: condition(s, "Succeeded")["reason"] == reason,
                         timeout=120, what=reason)
    assert status["phase"] == phase
    assert text in condition(status, "Succeeded")["message"]
    if phase == "Failed":
        assert condition(status, "Failed")["status"] == "True"
        assert condition(status, "Succeeded")["status"] == "False"
    else:
        assert condition(status, "Ready")["status"] == "False" and condition(status, "Ready")["reason"] == reason
    assert ("Warning", reason) in _reasons(platform, namespace, name)
    if reason == "GateFailed":
        assert status["metrics"]["passed"] is False and status["adapter"]["sha256"]
    if reason == "BackoffLimitExceeded":
        assert status["attempts"] == 2
    if reason == "InvalidDataset":
        assert status["attempts"] == 1  # exit code 2: no retry despite backoffLimit 3
    if phase == "Failed":  # the end of a failing run announces no retry that does not happen (issue 15)
        retries = [e["message"] for e in events(platform, namespace, name) if e["reason"] == "Retrying"]
        assert len(retries) == status["attempts"] - 1, retries
        assert [r.split(" (")[0] for r in retries] == [f"attempt {i} of {spec.get('backoffLimit', 0) + 1} ended"
                                                       for i in range(1, status["attempts"])], retries
        assert [r for _, r in _reasons(platform, namespace, name)].count(reason) == 1


def test_deadline_exceeded(platform, namespace, operator):
    platform.apply(ftj_manifest("slow", namespace, "succeed/600", activeDeadlineSeconds=60))
    status = wait_status(platform, namespace, "slow", lambda s: s["phase"] == "Failed", timeout=150, what="Failed")
    assert condition(status, "Failed")["reason"] == "DeadlineExceeded"
    assert "60 s" in status["message"]


def test_eviction_is_retried_by_the_job_without_using_up_backoff_limit(platform, namespace, operator):
    """The API server marks an evicted pod DisruptionTarget (as for a preemption or a drain); the
    Job's podFailurePolicy ignores it, so even backoffLimit 0 retries (this fails when the pod
    runner drops the condition, as its merge-patched status once did)."""
    platform.apply(ftj_manifest("evict", namespace, "succeed/8", backoffLimit=0))
    status = wait_status(platform, namespace, "evict", lambda s: s["phase"] == "Running", what="Running")
    pod = next(p for p in pods_of(platform, namespace, status["jobName"]) if p["status"].get("phase") == "Running")
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction",
                "metadata": {"name": pod["metadata"]["name"], "namespace": namespace}}
    platform.kubectl("create", "--raw", f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}/eviction",
                     "-f", "-", input=json.dumps(eviction))
    status = wait_status(platform, namespace, "evict", lambda s: s["phase"] in ("Succeeded", "Failed"), timeout=120,
                         what="the end of the run")
    assert status["phase"] == "Succeeded", status["message"]
    job = get_json(platform, "-n", namespace, "job", status["jobName"])
    assert not job["status"].get("failed")  # the eviction did not count
    seen = [(e["reason"], e["message"]) for e in events(platform, namespace, "evict")]
    assert any(r == "Retrying" and "Evict" in m for r, m in seen), seen


def test_suspend_and_resume_keep_the_run(platform, namespace, operator):
    platform.apply(ftj_manifest("pause", namespace, "succeed/10"))
    first = wait_status(platform, namespace, "pause", lambda s: s["phase"] == "Running", what="Running")
    platform.kubectl("-n", namespace, "patch", "finetunejob", "pause", "--type=merge", "-p",
                     '{"spec": {"suspend": true}}')
    status = wait_status(platform, namespace, "pause", lambda s: s["phase"] == "Suspended", what="Suspended")
    assert condition(status, "Suspended")["status"] == "True" and status["observedGeneration"] == 2
    job = get_json(platform, "-n", namespace, "job", first["jobName"])
    assert job["spec"]["suspend"] is True
    platform.kubectl("-n", namespace, "patch", "finetunejob", "pause", "--type=merge", "-p",
                     '{"spec": {"suspend": false}}')
    status = wait_status(platform, namespace, "pause", lambda s: s["phase"] == "Succeeded", timeout=120,
                         what="Succeeded after resume")
    assert (status["runId"], status["jobName"]) == (first["runId"], first["jobName"])
    assert condition(status, "Suspended")["status"] == "False"
    assert len(jobs_of(platform, namespace, "pause")) == 1


def test_spec_change_starts_a_new_run_and_deletion_cleans_up(platform, namespace, operator):
    platform.apply(ftj_manifest("change", namespace, "succeed/30"))
    first = wait_status(platform, namespace, "change", lambda s: s["phase"] == "Running", what="Running")
    platform.kubectl("-n", namespace, "patch", "finetunejob", "change", "--type=merge", "-p",
                     '{"spec": {"dataset": {"train": "s3://fake-trainer/succeed/2"}}}')
    status = wait_status(platform, namespace, "change", lambda s: s["phase"] == "Succeeded", timeout=120,
                         what="new run Succeeded")
    assert status["runId"] != first["runId"] and status["runId"].endswith("-g2")
    deadline = time.monotonic() + 60
    while [j["metadata"]["name"] for j in jobs_of(platform, namespace, "change")] != [status["jobName"]]:
        assert time.monotonic() < deadline, "the superseded Job was not deleted"
        time.sleep(0.5)
    assert "RunSuperseded" in [r for _, r in _reasons(platform, namespace, "change")]
    platform.kubectl("-n", namespace, "delete", "finetunejob", "change", "--wait=true")
    deadline = time.monotonic() + 60
    while jobs_of(platform, namespace, "change") or pods_of(platform, namespace, status["jobName"]):
        assert time.monotonic() < deadline, "Jobs or pods of the deleted FineTuneJob remain"
        time.sleep(0.5)


def test_operator_crash_and_restart(platform, namespace, operator):
    names = [f"restart-{i}" for i in range(3)]
    platform.apply(*[ftj_manifest(n, namespace, "succeed/6") for n in names])
    for n in names:
        wait_status(platform, namespace, n, lambda s: s.get("jobName"), what="jobName")
    operator.kill()  # the runs go on (and finish) while no operator watches
    try:
        time.sleep(8)
        platform.apply(ftj_manifest("while-down", namespace, "succeed/1"))
    finally:
        operator.start()
    for n in names + ["while-down"]:
        status = wait_status(platform, namespace, n, lambda s: s["phase"] == "Succeeded", timeout=120,
                             what="Succeeded after the restart")
        assert status["adapter"]["sha256"]
        assert len(jobs_of(platform, namespace, n)) == 1, f"{n}: a second Job was created"


# Specs the API server refuses only once they are rendered into a Job (issue 15, bug 4). The
# admission rules refuse more of them over time; either way the user is told what is wrong.
REFUSED_AT_RUN_TIME = [
    ("gpu-as-memory", {"resources": {"gpus": 1, "gpuResourceName": "memory"}}, "memory"),
    ("bad-toleration", {"resources": {"tolerations": [{"key": "a", "operator": "Exists", "value": "x"}]}},
     "tolerations"),
    ("bad-selector", {"resources": {"nodeSelector": {"bad key!": "x"}}}, "nodeSelector"),
    ("slash-key", {"s3": {"credentialsSecretRef": {"name": "s3-credentials", "accessKeyIdKey": "a/b"}}}, "key"),
]


@pytest.mark.parametrize("name, spec, field", REFUSED_AT_RUN_TIME, ids=[r[0] for r in REFUSED_AT_RUN_TIME])
def test_a_job_the_api_server_refuses_fails_the_run_with_its_message(platform, namespace, operator, name, spec,
                                                                    field):
    manifest = ftj_manifest(name, namespace, **spec)
    applied = platform.kubectl("apply", "-f", "-", input=json.dumps(manifest), check=False)
    if "created" not in applied:  # admission refused it up front, naming the field
        assert field.lower() in applied.lower(), applied
        return
    status = wait_status(platform, namespace, name, lambda s: s["phase"] == "Failed", timeout=60, what="Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == "JobRejected" and field in failed["message"], failed
    assert "(from " in failed["message"]  # the FineTuneJob field it was rendered from
    time.sleep(3)  # permanent: no retry, no second Event
    assert [r for _, r in _reasons(platform, namespace, name)].count("JobRejected") == 1
    assert not jobs_of(platform, namespace, name)
