"""Two operator replicas, one Lease: exactly one reconciles, and when it dies the other takes over
(real kube-apiserver; `ragtune operator run` processes killed with SIGKILL)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from ragtune.runtime.kube import Kube
from ragtune.runtime.leader import LeaderElector

from .conftest import OperatorProcess, ftj_manifest, get_json, jobs_of, wait_status

pytestmark = [pytest.mark.platform, pytest.mark.slow]

LEASE_SECONDS = 4


def _lease(platform, namespace: str) -> dict:
    return get_json(platform, "-n", namespace, "lease", "ragtune-operator")


def test_of_two_candidates_one_leads_and_the_other_takes_over_only_after_expiry(platform, namespace):
    kube = Kube(platform.api_client())
    a = LeaderElector(kube, namespace, "a", lease_seconds=2, renew_seconds=0.5, retry_seconds=0.2)
    b = LeaderElector(kube, namespace, "b", lease_seconds=2, renew_seconds=0.5, retry_seconds=0.2)
    assert a.try_acquire_or_renew() is True
    assert b.try_acquire_or_renew() is False  # held and fresh
    assert a.try_acquire_or_renew() is True  # renewing keeps it
    assert _lease(platform, namespace)["spec"]["holderIdentity"] == "a"
    # `a` stops renewing: `b` must wait a whole lease duration on its own clock, then take it.
    started = time.monotonic()
    assert b.acquire() is True
    waited = time.monotonic() - started
    assert 1.5 <= waited <= 6, waited
    spec = _lease(platform, namespace)["spec"]
    assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1
    # `a` learns that it lost the Lease and stops.
    lost = threading.Event()
    a.keep(lambda why: lost.set())
    assert lost.wait(5)


def test_racing_candidates_never_both_win(platform, namespace):
    kube = Kube(platform.api_client())
    electors = [LeaderElector(kube, namespace, f"c{i}", lease_seconds=30) for i in range(4)]
    wins: list[str] = []
    barrier = threading.Barrier(len(electors))

    def race(e: LeaderElector) -> None:
        barrier.wait()
        if e.try_acquire_or_renew():
            wins.append(e.identity)

    threads = [threading.Thread(target=race, args=(e,)) for e in electors]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and _lease(platform, namespace)["spec"]["holderIdentity"] == wins[0]


def test_killing_the_leading_operator_hands_over_with_no_duplicate_job(platform, namespace, crds,
                                                                       fake_trainer_image, tmp_path):
    env = {"RAGTUNE_LEADER_ELECTION": "true", "RAGTUNE_LEADER_ELECTION_NAMESPACE": namespace,
           "RAGTUNE_LEASE_SECONDS": str(LEASE_SECONDS)}
    replicas = [OperatorProcess(platform.kubeconfig, tmp_path / f"op{i}.log", extra_env=env) for i in range(2)]
    for op in replicas:
        op.start()  # both are healthy: the standby answers liveness probes too
    try:
        def holder() -> str:
            return _lease(platform, namespace)["spec"].get("holderIdentity") or ""

        deadline = time.monotonic() + 30
        while not holder() and time.monotonic() < deadline:
            time.sleep(0.3)
        leading = [op for op in replicas if "leading as " + holder() in op.log()]
        assert len(leading) == 1, [op.log()[-2000:] for op in replicas]
        leader, standby = leading[0], next(op for op in replicas if op is not leading[0])
        assert "standing by" in standby.log()

        platform.apply(ftj_manifest("ha", namespace, "succeed/20"))
        wait_status(platform, namespace, "ha", lambda s: s.get("phase") == "Running", what="Running")
        first_holder = holder()
        leader.kill()
        killed_at = time.monotonic()
        while holder() == first_holder and time.monotonic() - killed_at < 60:
            time.sleep(0.2)
        failover = time.monotonic() - killed_at
        assert holder() != first_holder, "the standby never took the Lease"
        # The standby waits one lease duration (plus a retry interval) after the last renewal it saw.
        assert failover <= LEASE_SECONDS * 3, failover
        print(json.dumps({"failover_seconds": round(failover, 2), "lease_seconds": LEASE_SECONDS}))

        status = wait_status(platform, namespace, "ha", lambda s: s["phase"] == "Succeeded", timeout=120,
                             what="Succeeded after the failover")
        assert status["adapter"]["sha256"] and status["observedGeneration"] == 1
        assert len(jobs_of(platform, namespace, "ha")) == 1, "the new leader created a second Job"
        assert "leading as" in standby.log()
    finally:
        for op in replicas:
            op.stop()
