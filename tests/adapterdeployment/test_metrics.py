"""The AdapterDeployment controller's Prometheus series: reconciles, the online gate's verdicts,
rollout durations by outcome, rollbacks by reason and the phase gauge (`ragtune_adapterdeployments`,
like FineTuneJob's `ragtune_finetunejobs`), driven through `AdapterDeploymentController.reconcile`
against the in-memory API server."""

from __future__ import annotations

import asyncio

import kopf
from kopf._core.engines import posting
from prometheus_client import REGISTRY

from ragtune.adapterdeployment.controller import AdapterDeploymentController
from ragtune.pods.online_eval import OnlineEvalResult

from .fakekube import FakeKube
from .test_rollout import ad, edit, ftj, passed

SERIES = {
    "reconciled": ("ragtune_reconciles_total", {"kind": "AdapterDeployment", "outcome": "success"}),
    "gate passed": ("ragtune_gate_evaluations_total", {"kind": "AdapterDeployment", "result": "passed"}),
    "gate failed": ("ragtune_gate_evaluations_total", {"kind": "AdapterDeployment", "result": "failed"}),
    "promoted": ("ragtune_rollout_duration_seconds_count", {"outcome": "promoted"}),
    "rolled back": ("ragtune_rollout_duration_seconds_count", {"outcome": "rolledBack"}),
    "rollback OnlineGateFailed": ("ragtune_rollbacks_total", {"reason": "OnlineGateFailed"}),
    **{phase: ("ragtune_adapterdeployments", {"phase": phase})
       for phase in ("Pending", "Gating", "RollingOut", "Ready", "RolledBack", "Failed")},
}


def sample() -> dict[str, float]:
    return {k: REGISTRY.get_sample_value(name, labels) or 0.0 for k, (name, labels) in SERIES.items()}


class AsyncKube(FakeKube):
    """The controller calls the client through `await kube.run(fn, *args)`."""

    async def run(self, fn, *args):
        return fn(*args)


class Controller:
    """One AdapterDeploymentController on an in-memory API server; events go to a local queue."""

    def __init__(self) -> None:
        self.kube = AsyncKube()
        self.controller = AdapterDeploymentController()
        self.controller.kube = self.kube
        self.start = sample()

    def reconcile(self) -> dict[str, float]:
        """One reconcile of ns/chat; -> how each series moved since the start."""
        async def once():
            posting.event_queue_loop_var.set(asyncio.get_running_loop())
            posting.event_queue_var.set(asyncio.Queue())
            posting.settings_var.set(kopf.OperatorSettings())
            await self.controller.reconcile(("ns", "chat"))
        asyncio.run(once())
        now = sample()
        return {k: now[k] - self.start[k] for k in SERIES if now[k] != self.start[k]}


def test_rollout_gate_rollback_and_phase_series_follow_the_rollouts():
    c = Controller()
    kube = c.kube
    ftj(kube, "ftj1")
    ad(kube)
    assert c.reconcile() == {"reconciled": 1, "Gating": 1}  # canary created
    kube.ready("chat-tgi-canary")
    assert c.reconcile() == {"reconciled": 2, "Gating": 1}  # evaluation Job running
    kube.finish_job("chat-eval-g1", passed())
    assert c.reconcile() == {"reconciled": 3, "gate passed": 1, "RollingOut": 1}
    kube.ready("chat-tgi")
    moved = c.reconcile()
    assert moved == {"reconciled": 4, "gate passed": 1, "promoted": 1, "Ready": 1}, moved

    # a second generation whose online gate fails: rolled back, with its reason
    ftj(kube, "ftj2", sha="b")
    edit(kube, adapters=[{"name": "support", "fineTuneJobRef": {"name": "ftj2"}}])
    c.reconcile()
    kube.ready("chat-tgi-canary")
    c.reconcile()
    failed = OnlineEvalResult(outcome="Failed", reason="GateFailed", message="adapter support: f1 0.1 < 0.5",
                              results=[{"adapter": "support", "passed": False}]).model_dump_json(by_alias=True)
    kube.finish_job("chat-eval-g2", failed)
    moved = c.reconcile()
    assert {k: v for k, v in moved.items() if k != "reconciled"} == {
        "gate passed": 1, "gate failed": 1, "promoted": 1, "rolled back": 1, "rollback OnlineGateFailed": 1,
        "RolledBack": 1}, moved

    # an invalid spec is Failed in the gauge too; the object gone leaves no series behind
    edit(kube, server={"replicas": -1})
    assert c.reconcile()["Failed"] == 1 and "RolledBack" not in c.reconcile()
    del kube.objects[("AdapterDeployment", "ns", "chat")]
    assert "Failed" not in c.reconcile()


def test_forgetting_a_deleted_object_takes_it_out_of_the_gauge():
    c = Controller()
    ftj(c.kube, "ftj1")
    ad(c.kube)
    assert c.reconcile()["Gating"] == 1
    c.controller.forget("ns", "chat")  # the DELETED watch event
    assert sample()["Gating"] == c.start["Gating"]
