"""The status-write budget (`ragtune.runtime.ratelimit`) on a real API server: in a burst of
FineTuneJobs every training Job is created at once, while the status writes follow at the
budget's pace and each FineTuneJob still gets its status."""

from __future__ import annotations

import time

import pytest

from .conftest import OperatorProcess, ftj_manifest, get_json

pytestmark = pytest.mark.platform

N = 10
KWOK_GPU = {"gpus": 1, "cpu": "100m", "memory": "256Mi",
            "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}]}


def test_a_burst_gets_every_job_at_once_and_the_statuses_at_the_budgets_pace(platform, namespace, crds, tmp_path):
    nodes = platform.gpu_nodes(1, gpus=N, prefix="budget-gpu")  # pods sit on a kwok node: nothing trains
    op = OperatorProcess(platform.kubeconfig, tmp_path / "operator.log", {"RAGTUNE_STATUS_WRITES_PER_SECOND": "1"})
    op.start()
    try:
        platform.apply(*[ftj_manifest(f"burst-{i}", namespace, "succeed/2", resources=KWOK_GPU) for i in range(N)])
        job_seen: dict[str, float] = {}
        status_seen: dict[str, float] = {}
        deadline = time.monotonic() + 120
        while len(status_seen) < N and time.monotonic() < deadline:
            now = time.monotonic()
            for job in get_json(platform, "-n", namespace, "jobs")["items"]:
                job_seen.setdefault(job["metadata"]["labels"]["ragtune.dev/finetunejob"], now)
            for ftj in get_json(platform, "-n", namespace, "finetunejobs")["items"]:
                if (ftj.get("status") or {}).get("jobName"):
                    status_seen.setdefault(ftj["metadata"]["name"], now)
            time.sleep(0.2)
        assert len(status_seen) == N, f"statuses written: {sorted(status_seen)}"
        firsts = sorted(status_seen.values())
        # A burst of round(1.5 x 1) = 2 writes, then one a second: the tenth status comes about 8 s
        # after the first (without the budget all ten come within the same second or two).
        assert firsts[-1] - firsts[0] >= 5.0, firsts
        # Job creation was not held back by the budget: every Job existed before the last status.
        assert len(job_seen) == N and max(job_seen.values()) < firsts[-1]
    finally:
        op.stop()
        # The platform outlives this test: a GPU node left behind takes other tests' GPU pods.
        platform.kubectl("delete", "node", *nodes, "--wait=false")
