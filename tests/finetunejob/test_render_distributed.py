"""resources.nodes > 1: an Indexed Job of one pod per node plus a headless Service (pure builders);
one node stays the single-pod Job."""

from __future__ import annotations

import re

from ragtune.api.pods import EXIT_PERMANENT
from ragtune.finetunejob.render import (
    IndexedJobWorkload,
    SinglePodJob,
    job_backoff_limit,
    render_job,
    run_control_patch,
    spec_hash,
    workload_for,
    world_size,
)

from .helpers import META, RUN_ID, spec

IMAGE = "ghcr.io/ragtune/ragtune-trainer:test"


def objects(**overrides):
    s = spec(**overrides)
    return workload_for(s).render(META, s, RUN_ID, IMAGE)


def test_one_node_is_the_single_pod_job_unchanged():
    s = spec()
    assert isinstance(workload_for(s), SinglePodJob)
    (job,) = objects()
    assert job == render_job(META, s, RUN_ID, IMAGE)
    assert "completionMode" not in job["spec"] and "subdomain" not in job["spec"]["template"]["spec"]
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["ragtune", "train", "--in-cluster"]
    assert job["spec"]["podFailurePolicy"]["rules"] == [  # preemptions ignored, exit 2 permanent, as for nodes > 1
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [EXIT_PERMANENT]}}]
    assert job["spec"]["backoffLimit"] == 2


def test_nodes_render_a_headless_service_then_an_indexed_job():
    s = spec(**{"resources.nodes": 3, "resources.gpus": 2})
    assert isinstance(workload_for(s), IndexedJobWorkload)
    svc, job = objects(**{"resources.nodes": 3, "resources.gpus": 2})
    assert (svc["kind"], job["kind"]) == ("Service", "Job")
    name = job["metadata"]["name"]
    assert svc["metadata"]["name"] == name == "demo-01234567-g1"
    # Owned by the FineTuneJob, labelled like the Job, headless, selecting this run's pods.
    assert svc["metadata"]["ownerReferences"] == job["metadata"]["ownerReferences"]
    assert svc["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"
    assert svc["metadata"]["labels"] == job["metadata"]["labels"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"] and all(pod_labels[k] == v for k, v in svc["spec"]["selector"].items())
    assert svc["spec"]["selector"]["ragtune.dev/run-id"] == RUN_ID

    js = job["spec"]
    assert (js["completionMode"], js["completions"], js["parallelism"]) == ("Indexed", 3, 3)
    pod = js["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"] and pod["restartPolicy"] == "Never"
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2  # per node
    cmd = c["command"]
    assert cmd[:2] == ["ragtune", "torchrun"] and cmd[-4:] == ["--no-python", "ragtune", "train", "--in-cluster"]
    assert "--nnodes=3" in cmd and "--nproc-per-node=2" in cmd and "--max-restarts=0" in cmd
    assert "--node-rank=$(JOB_COMPLETION_INDEX)" in cmd and "--rdzv-backend=c10d" in cmd
    assert f"--rdzv-endpoint={name}-0.{svc['metadata']['name']}:29500" in cmd
    assert f"--rdzv-id={RUN_ID}" in cmd
    assert "--rdzv-conf=join_timeout=600" in cmd  # torchrun's own default, stated
    # c10d orders ranks by the agents' addresses: each is its pod's stable name, index 0 sorts first.
    assert f"--local-addr={name}-$(JOB_COMPLETION_INDEX).{svc['metadata']['name']}" in cmd
    assert world_size(s) == 6


def test_the_rendezvous_deadline_is_the_specs():
    _, job = objects(**{"resources.nodes": 2, "training.distributed.rendezvousTimeoutSeconds": 45})
    assert "--rdzv-conf=join_timeout=45" in job["spec"]["template"]["spec"]["containers"][0]["command"]


def test_cpu_nodes_run_one_process_each():
    _, job = objects(**{"resources.nodes": 2, "resources.gpus": 0})
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert "--nproc-per-node=1" in c["command"] and "nvidia.com/gpu" not in c["resources"]["limits"]


def test_failure_policy_preemption_ignored_permanent_exit_fails_the_job_and_attempts_are_whole():
    s = spec(**{"resources.nodes": 2, "backoffLimit": 3})
    _, job = objects(**{"resources.nodes": 2, "backoffLimit": 3})
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[1]["action"] == "FailJob" and rules[1]["onExitCodes"]["values"] == [EXIT_PERMANENT]
    # Not per index: an attempt fails all its pods, so the Job's budget is (retries + 1) x nodes - 1.
    assert "backoffLimitPerIndex" not in job["spec"]
    assert job["spec"]["backoffLimit"] == job_backoff_limit(s) == 7
    assert job["spec"]["podReplacementPolicy"] == "Failed"
    # Run control keeps the scaled budget (no patch flapping between 3 and 7).
    assert run_control_patch(job["spec"], s) == {}
    assert run_control_patch({**job["spec"], "backoffLimit": 3}, s) == {"backoffLimit": 7}


def test_names_leave_room_for_the_pod_hostnames():
    long = "a" * 60
    svc, job = workload_for(spec(**{"resources.nodes": 64})).render(
        {**META, "name": long}, spec(**{"resources.nodes": 64}), RUN_ID, IMAGE)
    name = job["metadata"]["name"]
    assert len(f"{name}-63") <= 63 and name.endswith(RUN_ID)
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", svc["metadata"]["name"]) and len(svc["metadata"]["name"]) <= 63
    # A name starting with a digit is not a DNS-1035 label: the Service gets a valid one.
    svc, job = workload_for(spec(**{"resources.nodes": 2})).render(
        {**META, "name": "7b-run"}, spec(**{"resources.nodes": 2}), RUN_ID, IMAGE)
    assert svc["metadata"]["name"][0].isalpha()
    assert job["spec"]["template"]["spec"]["subdomain"] == svc["metadata"]["name"]


def test_nodes_are_part_of_what_a_run_trains():
    assert spec_hash(spec(**{"resources.nodes": 2})) != spec_hash(spec())
