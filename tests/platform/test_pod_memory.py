"""Memory limits on the local pod runner: enforced with a memory cgroup per container, and an OOM
kill reported like the kubelet does (`OOMKilled`, exit code 137)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from ragtune_local import cgroups

pytestmark = [pytest.mark.platform, pytest.mark.slow,
              pytest.mark.skipif(bool(os.environ.get("RAGTUNE_TEST_KUBECONFIG")),
                                 reason="tests the local platform's runner itself, not an external cluster")]


@pytest.fixture(scope="module")
def memory_cgroups():
    """The runner's cgroup hierarchy (it runs in the test's cgroup); a machine without one FAILS these
    tests: there the runner cannot enforce limits, and skipping would hide that."""
    groups, why = cgroups.detect()
    if groups is None:
        pytest.fail(f"no writable memory cgroup, so the pod runner cannot enforce resources.limits.memory: {why}")
    yield groups
    groups.close()


def _pod(name: str, code: str, memory: str) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {
        "restartPolicy": "Never", "terminationGracePeriodSeconds": 3,
        "containers": [{"name": "main", "image": "local/shell", "command": [sys.executable, "-c", code],
                        "resources": {"limits": {"memory": memory}, "requests": {"memory": memory}}}]}})


def _terminated(platform, namespace: str, name: str) -> dict:
    platform.wait_for("pod", name, "{.status.phase}", lambda v: v in ("Succeeded", "Failed"), namespace=namespace,
                      timeout=90)
    pod = json.loads(platform.kubectl("-n", namespace, "get", "pod", name, "-o", "json"))
    return pod["status"]["containerStatuses"][0]["state"]["terminated"] | {"phase": pod["status"]["phase"],
                                                                          "uid": pod["metadata"]["uid"]}


def _left_cgroups(groups: cgroups.MemoryCgroups, uid: str) -> list[str]:
    """The pod's container cgroups left in any runner's folder (the platform's runner is another process)."""
    return [str(p) for p in groups.parent.parent.glob(f"runner-*/{uid}-*")]


def test_container_over_its_memory_limit_is_oom_killed(platform, namespace, memory_cgroups):
    # Touches every page of 512 MiB (bytes * n writes them) inside a 64 MiB limit.
    code = "import sys; print('allocating', flush=True); x = b'x' * (512 << 20); print('survived', len(x))"
    platform.kubectl("-n", namespace, "apply", "-f", "-", input=_pod("hog", code, "64Mi"))
    t = _terminated(platform, namespace, "hog")
    assert t["phase"] == "Failed"
    assert t["reason"] == "OOMKilled" and t["exitCode"] == 137, t
    logs = platform.kubectl("-n", namespace, "logs", "hog")
    assert "allocating" in logs and "survived" not in logs
    assert not _left_cgroups(memory_cgroups, t["uid"]), "the container's cgroup must go when it is reaped"


def test_container_under_its_memory_limit_completes(platform, namespace, memory_cgroups):
    code = "x = b'x' * (16 << 20); print('kept', len(x) >> 20, 'MiB')"
    platform.kubectl("-n", namespace, "apply", "-f", "-", input=_pod("small", code, "128Mi"))
    t = _terminated(platform, namespace, "small")
    assert t["phase"] == "Succeeded" and t["reason"] == "Completed" and t["exitCode"] == 0, t
    assert platform.kubectl("-n", namespace, "logs", "small").strip() == "kept 16 MiB"
    assert not _left_cgroups(memory_cgroups, t["uid"])

