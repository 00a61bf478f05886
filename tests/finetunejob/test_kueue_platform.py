"""FineTuneJobs with `spec.queueName` under a real Kueue (built from its Go module, started on the
local platform): a ClusterQueue whose quota admits one run at a time runs three FineTuneJobs one
after another; the waiting ones say `Queued` with Kueue's reason (issue 16, item 5)."""

from __future__ import annotations

import time

import pytest

from .conftest import ftj_manifest, get_json

pytestmark = pytest.mark.platform

RUNS = 3


@pytest.fixture(scope="module")
def kueue(platform):
    if platform.local is None:
        pytest.skip("Kueue is started as a part of the local platform (RAGTUNE_TEST_KUBECONFIG is set)")
    from ragtune_local.testing import _to_stderr

    platform.local.start_kueue(log=_to_stderr)
    return platform.local.info().admin_client()


def test_a_queue_that_admits_one_run_at_a_time_runs_three_in_a_row(platform, namespace, operator, kueue):
    from ragtune_local.kubeclient import ApiError
    from ragtune_local.kueue import queue_objects

    # One run's pod requests 100m CPU and 256Mi: the quota fits one, not two.
    for path, obj in queue_objects(f"one-at-a-time-{namespace}", "training", namespace,
                                   {"cpu": "150m", "memory": "512Mi"}):
        try:
            kueue.create(path, obj)
        except ApiError as err:  # the shared ResourceFlavor may exist from another test
            if err.status != 409:
                raise
    names = [f"queued-{i}" for i in range(RUNS)]
    platform.apply(*[ftj_manifest(n, namespace, "succeed/3", queueName="training") for n in names])

    seen: dict[str, set[str]] = {n: set() for n in names}
    queued_messages: list[str] = []
    ready_reasons: set[str] = set()
    deadline = time.monotonic() + 240
    statuses: dict[str, dict] = {}
    while time.monotonic() < deadline:
        items = get_json(platform, "-n", namespace, "finetunejobs")["items"]
        statuses = {o["metadata"]["name"]: o.get("status") or {} for o in items}
        running = [n for n, s in statuses.items() if s.get("phase") in ("Running", "Evaluating")]
        assert len(running) <= 1, f"the queue admits one run at a time, but {running} run together"
        for n, s in statuses.items():
            seen[n].add(s.get("phase") or "")
            if s.get("phase") == "Queued":
                queued_messages.append(s.get("message", ""))
                ready_reasons |= {c["reason"] for c in s.get("conditions", []) if c["type"] == "Ready"}
        if all(s.get("phase") == "Succeeded" for s in statuses.values()) and len(statuses) == RUNS:
            break
        time.sleep(0.5)
    assert all(s.get("phase") == "Succeeded" for s in statuses.values()), statuses
    # One after another: each run started after the one before it completed.
    windows = sorted((s["startTime"], s["completionTime"]) for s in statuses.values())
    for (_, done), (start, _) in zip(windows, windows[1:]):
        assert start >= done, f"runs overlapped: {windows}"
    # The waiting runs said so, with Kueue's own reason (its Workload: quota not reserved).
    assert sum("Queued" in phases for phases in seen.values()) >= RUNS - 1, seen
    assert any("insufficient" in m or "quota" in m for m in queued_messages), queued_messages[-3:]
    assert "Pending" in ready_reasons, ready_reasons
    # Kueue, not the operator, decided: each Job carries the queue label and ended unsuspended.
    for n in names:
        job = get_json(platform, "-n", namespace, "job", statuses[n]["jobName"])
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "training"
        assert job["spec"]["suspend"] is False
