"""A trainer that outgrows spec.resources.memory on the real platform: the pod runner's memory cgroup
OOM-kills it, and the FineTuneJob ends Failed with reason OutOfMemory (the real trainer image, not the
fake one: 150Mi is too little for it to even import torch)."""

from __future__ import annotations

import pytest

from ragtune.api.pods import TRAINER_IMAGE

from .conftest import (
    OperatorProcess,
    condition,
    ftj_manifest,
    jobs_of,
    pods_of,
    wait_status,
)

pytestmark = [pytest.mark.platform, pytest.mark.slow]


@pytest.fixture(scope="module")
def real_trainer_operator(platform, crds, tmp_path_factory):
    from ragtune_local import cgroups

    groups, why = cgroups.detect()
    if groups is None:  # the runner (in this cgroup) could not enforce the limit either: fail, do not skip
        pytest.fail(f"no writable memory cgroup, so the pod runner cannot OOM-kill the trainer: {why}")
    groups.close()
    op = OperatorProcess(platform.kubeconfig, tmp_path_factory.mktemp("operator-oom") / "operator.log",
                         extra_env={"RAGTUNE_TRAINER_IMAGE": f"{TRAINER_IMAGE}:dev"})
    op.start()
    try:
        yield op
    finally:
        op.stop()


def test_trainer_oom_killed_ends_out_of_memory(platform, namespace, real_trainer_operator):
    platform.apply(ftj_manifest("hungry", namespace, resources={
        "gpus": 0, "cpu": "100m", "memory": "150Mi", "shmSize": "64Mi",
        "nodeSelector": {"kubernetes.io/hostname": "ragtune-local"}}))
    status = wait_status(platform, namespace, "hungry", lambda s: s["phase"] == "Failed", timeout=180,
                         what="Failed")
    failed = condition(status, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "OutOfMemory", status
    assert condition(status, "Succeeded")["reason"] == "OutOfMemory"
    message = status["message"]
    assert "spec.resources.memory=150Mi" in message and "training.batchSize" in message
    assert "\n" not in message
    pod = pods_of(platform, namespace, jobs_of(platform, namespace, "hungry")[0]["metadata"]["name"])[0]
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["reason"] == "OOMKilled" and terminated["exitCode"] == 137
