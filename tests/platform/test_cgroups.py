"""Memory cgroups and Kubernetes quantities (no platform: the runner's building blocks, on this machine's
real cgroup file system)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ragtune_local import cgroups
from ragtune_local.podenv import ConfigError
from ragtune_local.podworker import memory_limit


@pytest.mark.parametrize("text, expected", [
    ("64Mi", 64 << 20), ("1Gi", 1 << 30), ("1.5Gi", 3 << 29), ("512Ki", 512 << 10), ("2Ti", 2 << 40),
    ("1G", 10 ** 9), ("100M", 10 ** 8), ("1k", 1000), ("128974848", 128974848), ("129e6", 129_000_000),
    ("1.2345", 2), ("500m", 1), (4096, 4096),
])
def test_parse_quantity(text, expected):
    assert cgroups.parse_quantity(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "1GB", "Mi", "-1Mi", "1 Gi", "1.5.0"])
def test_parse_quantity_rejects_garbage(text):
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        cgroups.parse_quantity(text)


def test_memory_limit_of_a_container():
    assert memory_limit({"name": "c"}) is None
    assert memory_limit({"name": "c", "resources": {"requests": {"memory": "1Gi"}}}) is None
    assert memory_limit({"name": "c", "resources": {"limits": {"memory": "256Mi"}}}) == 256 << 20
    with pytest.raises(ConfigError, match="container c: resources.limits.memory: 'huge'"):
        memory_limit({"name": "c", "resources": {"limits": {"memory": "huge"}}})


def test_own_cgroup_lines():
    text = "9:name=systemd:/\n4:memory:/process_api/abc\n3:cpu,cpuacct:/x\n0::/user.slice/app\n"
    assert cgroups._own_cgroups(text) == ("/process_api/abc", "/user.slice/app")
    assert cgroups._own_cgroups("0::/\n") == (None, "/")


def test_a_limited_cgroup_oom_kills_and_counts_it():
    groups, why = cgroups.detect()
    if groups is None:
        pytest.fail(f"no writable memory cgroup on this machine, so memory limits cannot be enforced: {why}")
    results = {}
    for name, size in (("fits", 8 << 20), ("hog", 400 << 20)):
        path = groups.create(f"test-{os.getpid()}-{name}", 64 << 20)
        try:
            join = lambda p=path: (p / "cgroup.procs").write_text(str(os.getpid()))  # noqa: E731
            proc = subprocess.run([sys.executable, "-S", "-c", f"x = b'x' * {size}"], preexec_fn=join, timeout=60)
            results[name] = (proc.returncode, groups.oom_kills(path))
        finally:
            assert cgroups.remove(path) and not path.exists()
    groups.close()
    assert not groups.parent.exists()
    assert results == {"fits": (0, 0), "hog": (-9, 1)}


def test_sweep_removes_what_a_dead_runner_left_and_keeps_live_ones():
    groups, why = cgroups.detect()
    if groups is None:
        pytest.fail(f"no writable memory cgroup on this machine: {why}")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = groups.parent.parent / f"runner-{int(dead.stdout)}"
    (leftover / "pod-main-0").mkdir(parents=True)
    mine = groups.create("pod-main-0", 64 << 20)
    try:
        groups.sweep()
        assert not leftover.exists() and mine.exists()
    finally:
        groups.close()
    assert not groups.parent.exists()
