"""A small random-kill campaign of the operator mid-rollout (issue 15 fault scenarios): two
AdapterDeployments roll out through the Canary strategy (canary TGI stand-in, online evaluation
Job, promotion) while `ragtune operator run` is SIGKILLed four times. Every child (canary, stable
Deployment, evaluation Job) is created once per generation, both statuses converge to one
Promoted rollout, and each expected Event is posted exactly once."""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict

import pytest

from ragtune.runtime.kube import Kube
from tests.finetunejob.conftest import OperatorProcess

from .test_integration import ad_body, finished, store, tiny, wait_status  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.platform, pytest.mark.slow]

NAMES, KILLS = ("alpha", "beta"), 4
STEPS = ("Canary", "OnlineGate", "Promoting")
"""The rollout steps that take a while (Resolving -> OfflineGate -> Canary -> OnlineGate -> Promoting)."""
EXPECTED = ["RolloutStarted", "CanaryCreated", "CanaryReady", "OnlineGatePassed", "Promoting", "Promoted"]


def _past(step: str, steps) -> bool:
    """Every rollout is beyond `step` (or done): waiting for it is over."""
    order = ("Resolving", "OfflineGate", *STEPS)
    return all(s == "" or (s in order and order.index(s) > order.index(step)) for s in steps)


def _events_of(kube: Kube, namespace: str, name: str) -> list[str]:
    items = kube.request("GET", f"/api/v1/namespaces/{namespace}/events").get("items", [])
    return [e["reason"] for e in sorted(items, key=lambda e: int(e["metadata"]["resourceVersion"]))
            if e["involvedObject"].get("kind") == "AdapterDeployment" and e["involvedObject"].get("name") == name]


def test_rollouts_converge_under_repeated_operator_kills(platform, namespace, tiny, store, tmp_path):  # noqa: F811
    platform.install_crds()
    kube = Kube(platform.api_client())
    rng = random.Random(15)
    children: dict[tuple[str, str], set[str]] = defaultdict(set)  # (kind, name) -> uids seen

    def record_children() -> None:
        for kind in ("Deployment", "Job"):
            for obj in kube.list(kind, namespace, {}):
                children[(kind, obj["metadata"]["name"])].add(obj["metadata"]["uid"])

    def step_of(name: str) -> str:
        status = (kube.get("AdapterDeployment", namespace, name) or {}).get("status") or {}
        return (status.get("candidate") or {}).get("step") or ""

    def under_way() -> list[str]:
        out = []
        for name in NAMES:
            status = (kube.get("AdapterDeployment", namespace, name) or {}).get("status") or {}
            if not finished(1)(status):
                out.append(name)
        return out

    op = OperatorProcess(platform.kubeconfig, tmp_path / "operator.log")
    op.start()
    try:
        good = store("good", tiny["good"])
        for name in NAMES:
            body = ad_body(platform, namespace, tiny, [{"name": "support", **good}], store)
            body["metadata"]["name"] = name
            platform.apply(body)
        # The kills land mid-rollout: one at a random early moment (resolving, the first Events,
        # the canary's creation), then one in each step that runs for a while (the canary
        # starting, the online evaluation, the stable server starting).
        hit: list[str] = []
        for target in (None, *STEPS):
            while under_way():
                record_children()
                steps = {name: step_of(name) for name in NAMES}
                if target is None or target in steps.values() or _past(target, steps.values()):
                    break
                time.sleep(0.3)
            if not under_way():
                break
            time.sleep(rng.uniform(0.5, 6.0) if target is None else rng.uniform(0.0, 3.0))
            hit.append(",".join(f"{n}:{step_of(n)}" for n in NAMES))
            op.kill()
            record_children()
            op.start()
        kills = len(hit)
        assert kills == KILLS, f"the rollouts ended after {kills} kills ({hit}): too fast for this campaign"
        for name in NAMES:
            status = wait_status(kube, namespace, lambda s: (record_children(), finished(1)(s))[1], timeout=600,
                                 name=name)
            assert status["phase"] == "Ready", (name, status)
            assert [(r["generation"], r["outcome"]) for r in status["history"]] == [(1, "Promoted")], status
            assert [a["name"] for a in status["serving"]] == ["support"]
        record_children()
        twice = {key: len(uids) for key, uids in children.items() if len(uids) > 1}
        assert not twice, f"children created more than once: {twice}"
        for name in NAMES:
            assert (("Deployment", f"{name}-tgi") in children and ("Deployment", f"{name}-tgi-canary") in children
                    and ("Job", f"{name}-eval-g1") in children), sorted(children)
            assert kube.get("Deployment", namespace, f"{name}-tgi-canary") is None
            posted = Counter(_events_of(kube, namespace, name))
            assert posted == Counter(EXPECTED), f"{name}: Events {dict(posted)}, expected each of {EXPECTED} once"
    finally:
        op.stop()
