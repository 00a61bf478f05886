"""The bake after promotion (`strategy.bake`, issue 18 item 4): the new stable server analysed on
its live metrics against the previous one's recorded figures; a failure restores the previous set
by digest. Against the in-memory API server with real HTTP `/metrics` endpoints on loopback."""

from __future__ import annotations

import copy

import pytest
from pydantic import ValidationError

from ragtune.adapterdeployment import render, traffic
from ragtune.api.adapterdeployment import StrategySpec

from .fakekube import FakeKube
from .test_analysis import analysed_rollout, pods  # noqa: F401  (fixture)
from .test_rollout import edit, ftj, tick
from .test_traffic import CANARY, accept, weights


def promoted_with_bake(kube: FakeKube, port: int, p, auto_rollback: bool = True):
    """A second rollout through both analysed steps to promotion, with `bake: 10m`."""
    analysed_rollout(kube, port, auto_rollback=auto_rollback, bake="10m")
    p["stable"].serve(270)
    p["canary"].serve(30)
    kube.clock += 120
    tick(kube)  # step 1 Successful: 50%
    accept(kube)
    tick(kube)  # its window opens
    p["stable"].serve(100)
    p["canary"].serve(100)
    kube.clock += 30
    tick(kube)  # step 2 Successful: 100%
    accept(kube)
    tick(kube)
    kube.clock += traffic.ROUTE_SETTLE_SECONDS
    assert tick(kube).candidate.step == "Promoting"
    kube.ready("chat-tgi")
    tick(kube)
    accept(kube)
    tick(kube)
    kube.clock += traffic.ROUTE_SETTLE_SECONDS
    s = tick(kube)
    assert s.phase == "Ready" and s.candidate is None and [a.sha256[0] for a in s.serving] == ["b"]
    return s


def stable_digest(kube: FakeKube) -> str:
    return kube.get("Deployment", "ns", "chat-tgi")["spec"]["template"]["metadata"]["annotations"][
        render.ANNOTATION_DIGEST]


def test_a_healthy_new_stable_bakes_and_stays(pods):  # noqa: F811
    port, p = pods
    kube = FakeKube()
    s = promoted_with_bake(kube, port, p)
    assert [a.sha256[0] for a in s.bake.previous] == ["a"] and s.bake.reference.requests == 100
    assert any(r == "BakeStarted" for _, r, _m in kube.events)
    tick(kube)  # the window opens
    p["stable"].serve(50)
    kube.clock += 60
    s = tick(kube)
    assert s.bake.measurements == [] and "baking chat-tgi: 540s left" in s.message
    kube.clock += 540
    s = tick(kube)
    assert s.bake is None and s.phase == "Ready" and [a.sha256[0] for a in s.serving] == ["b"]
    assert any(r == "BakeSucceeded" and "50 requests" in m for _, r, m in kube.events)
    assert s.history[0].outcome == "Promoted"


def test_a_failure_during_the_bake_restores_the_previous_set_by_digest(pods):  # noqa: F811
    port, p = pods
    kube = FakeKube()
    s = promoted_with_bake(kube, port, p)
    baked = stable_digest(kube)
    previous = s.bake.previous
    tick(kube)
    p["stable"].serve(10, fail=20)
    kube.clock += 30  # well before the bake's end: a failure ends it at once
    s = tick(kube)
    assert s.phase == "RolledBack" and s.bake is None
    assert [(a.name, a.sha256) for a in s.serving] == [(a.name, a.sha256) for a in previous]
    assert stable_digest(kube) == render.adapter_set_digest(previous) != baked
    assert s.history[0].outcome == "RolledBack" and s.history[0].adapters == ["support@" + "b" * 12]
    assert s.history[0].reason.startswith("BakeFailed: new stable successRate 0.3333 < minSuccessRate 0.99")
    assert s.history[1].outcome == "Promoted"
    assert weights(kube) == {"chat-tgi": 100}
    assert any(r == "BakeFailed" and "restored support@" + "a" * 12 in m for _, r, m in kube.events)
    assert tick(kube).phase == "RolledBack"  # nothing rolls again by itself


def test_the_bake_judges_latency_against_the_previous_stables_recorded_figures(pods):  # noqa: F811
    port, p = pods
    kube = FakeKube()
    promoted_with_bake(kube, port, p)
    tick(kube)
    p["stable"].serve(40, seconds=0.9)  # the previous stable answered in 0.05 s
    kube.clock += 30
    s = tick(kube)
    assert s.phase == "RolledBack" and "new stable p95LatencySeconds 0.9" in s.history[0].reason
    assert "x previous stable's 0.06" in s.history[0].reason and "> maxP95LatencyRatio 2.0" in s.history[0].reason


def test_auto_rollback_false_keeps_the_new_set_and_says_degraded(pods):  # noqa: F811
    port, p = pods
    kube = FakeKube()
    promoted_with_bake(kube, port, p, auto_rollback=False)
    baked = stable_digest(kube)
    tick(kube)
    p["stable"].serve(0, fail=30)
    kube.clock += 30
    s = tick(kube)
    assert s.phase == "Degraded" and s.bake is None and [a.sha256[0] for a in s.serving] == ["b"]
    assert stable_digest(kube) == baked
    assert {c.type: c.reason for c in s.conditions}["Degraded"] == "BakeFailed"
    assert "autoRollback: false" in s.message
    kube.ready("chat-tgi")
    s = tick(kube)
    assert s.phase == "Degraded", "healthy pods do not undo a failed bake"
    ftj(kube, "ftj3", sha="c")
    edit(kube, adapters=[{"name": "support", "fineTuneJobRef": {"name": "ftj3"}}])
    s = tick(kube)  # a new spec decides
    assert s.candidate is not None and {c.type: c.status.value for c in s.conditions}["Degraded"] == "False"


def test_a_new_rollout_ends_the_bake(pods):  # noqa: F811
    port, p = pods
    kube = FakeKube()
    promoted_with_bake(kube, port, p)
    ftj(kube, "ftj3", sha="c")
    edit(kube, adapters=[{"name": "support", "fineTuneJobRef": {"name": "ftj3"}}])
    s = tick(kube)
    assert s.bake is None and s.candidate is not None and s.candidate.generation == 3
    assert any(r == "BakeAbandoned" for _, r, _m in kube.events)


def test_bake_needs_the_traffic_analysis():
    strategy = copy.deepcopy(CANARY)
    with pytest.raises(ValidationError, match="strategy.bake analyses the new stable server"):
        StrategySpec.model_validate({**strategy, "bake": "10m"})
    strategy["canary"]["analysis"] = {}
    assert StrategySpec.model_validate({**strategy, "bake": "10m"}).bake == "10m"
    with pytest.raises(ValidationError, match="longer than 24h"):
        StrategySpec.model_validate({**strategy, "bake": "25h"})
