"""`up`/`down` of the platform itself, in private state dirs (apart from the session platform)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from ragtune_local.paths import PARTS, cache_dir
from ragtune_local.platform import LocalPlatform, PlatformError
from ragtune_local.procs import group_members

pytestmark = [pytest.mark.platform, pytest.mark.slow,
              pytest.mark.skipif(bool(os.environ.get("RAGTUNE_TEST_KUBECONFIG")),
                                 reason="tests the local platform itself, not an external cluster")]


def _alive_pids(platform: LocalPlatform) -> list[int]:
    return [pid for ref in platform._recorded().values() for pid in group_members(ref.pid)]


def test_up_refuses_second_up_and_down_leaves_nothing_twice_in_a_row(tmp_path):
    local = LocalPlatform(tmp_path / "state")
    for round_ in range(2):
        info = local.up(log=lambda _m: None)
        try:
            recorded = local._recorded()
            assert set(recorded) == {"etcd", "kube-apiserver", "minio", "kube-controller-manager", "kube-scheduler",
                                     "kwok", "pod-runner"}
            assert info.startup_seconds < 60, f"round {round_}: startup took {info.startup_seconds}s"
            # Pod IPs from a private /16 routed to lo (root here), not loopback; the route is recorded.
            assert info.pod_ip_route == f"{info.pod_ip_prefix}.0.0/16" and info.pod_ip_prefix.startswith("10.")
            assert f"local {info.pod_ip_route} dev lo" in _local_routes()
            with pytest.raises(PlatformError, match="already running"):
                local.up(log=lambda _m: None)
            # The CLI says the same and fails.
            cli = subprocess.run([sys.executable, "-m", "ragtune.cli", "dev", "--state-dir", str(local.state_dir), "up"],
                                 capture_output=True, text=True, timeout=60)
            assert cli.returncode == 1 and "already running" in cli.stderr
        finally:
            pids = [pid for ref in local._recorded().values() for pid in group_members(ref.pid)]
            stopped = local.down(log=lambda _m: None)
        assert "pod-runner" in stopped and "kube-apiserver" in stopped
        assert pids and not any(os.path.exists(f"/proc/{pid}") and _not_zombie(pid) for pid in pids)
        assert not local.is_running()
        assert f"local {info.pod_ip_route} " not in _local_routes(), "down left the pod IP route behind"


def _local_routes() -> str:
    return subprocess.run(["ip", "route", "show", "table", "local"], capture_output=True, text=True).stdout


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _fake_cache(tmp_path, broken: str, script: str):
    """A cache whose binaries are the real ones, except `broken`, which runs `script`."""
    root = tmp_path / "cache"
    for part in PARTS.values():
        d = root / "bin" / part.dir.name
        d.mkdir(parents=True)
        for b in part.binaries:
            if b == broken:
                (d / b).write_text(f"#!/bin/sh\n{script}\n")
                (d / b).chmod(stat.S_IRWXU)
            elif (part.dir / b).exists():
                (d / b).symlink_to(part.dir / b)
    return root


def test_part_that_fails_to_start_is_named_with_its_log(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGTUNE_CACHE", str(_fake_cache(tmp_path, "kube-scheduler",
                                                        "echo 'scheduler: unknown flag --boom' >&2; exit 1")))
    local = LocalPlatform(tmp_path / "state")
    with pytest.raises(PlatformError) as err:
        local.up(timeout=60, build=False, log=lambda _m: None)
    text = str(err.value)
    assert "kube-scheduler exited during startup" in text
    assert str(tmp_path / "state" / "logs" / "kube-scheduler.log") in text
    assert "unknown flag --boom" in text
    assert not _alive_pids(local), "a failed up must stop what it started"


def test_part_that_hangs_times_out_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGTUNE_CACHE", str(_fake_cache(tmp_path, "etcd", "exec sleep 600")))
    local = LocalPlatform(tmp_path / "state")
    with pytest.raises(PlatformError, match=r"etcd was not healthy in time .*log: .*etcd\.log"):
        local.up(timeout=3, build=False, log=lambda _m: None)
    assert not _alive_pids(local)


def test_missing_binaries_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGTUNE_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(PlatformError, match=r"missing binaries for etcd, kube, kwok, minio: run `ragtune dev build"):
        LocalPlatform(tmp_path / "state").up(build=False, log=lambda _m: None)
    assert cache_dir() == tmp_path / "empty-cache"
