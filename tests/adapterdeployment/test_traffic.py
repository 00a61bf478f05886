"""The weighted canary (`strategy.type: Canary`): the HTTPRoute builder and the traffic steps
against the in-memory API server, the test playing the Gateway (route status) and the clock."""

from __future__ import annotations

import copy

import pytest
from pydantic import ValidationError

from ragtune.adapterdeployment import render, traffic
from ragtune.api.adapterdeployment import AdapterDeploymentSpec, StrategySpec

from .fakekube import FakeKube
from .test_rollout import BASE, ad, edit, ftj, passed, status, tick

CANARY = {"type": "Canary", "canary": {"gatewayRef": {"name": "public", "namespace": "edge"},
                                       "steps": [{"weight": 10, "pause": "2m"}, {"weight": 50, "pause": "30s"}]}}


def spec(**strategy) -> AdapterDeploymentSpec:
    return AdapterDeploymentSpec.model_validate({
        "baseModel": BASE, "adapters": [{"name": "support", "fineTuneJobRef": {"name": "ftj1"}}],
        "strategy": {**CANARY, **strategy}})


def accept(kube: FakeKube, ok: bool = True) -> None:
    """The Gateway reports the route's current generation (Accepted, ResolvedRefs)."""
    route = kube.objects[("HTTPRoute", "ns", "chat-route")]
    gen = route["metadata"]["generation"]
    route["status"] = {"parents": [{"parentRef": {"name": "public", "namespace": "edge"},
                                    "controllerName": "traefik.io/gateway-controller", "conditions": [
        {"type": "Accepted", "status": "True" if ok else "False", "reason": "Accepted" if ok else "NotAllowedByListeners",
         "observedGeneration": gen},
        {"type": "ResolvedRefs", "status": "True", "reason": "ResolvedRefs", "observedGeneration": gen}]}]}


def weights(kube: FakeKube) -> dict[str, int]:
    return traffic.live_weights(kube.objects[("HTTPRoute", "ns", "chat-route")])


# --- the HTTPRoute builder ---------------------------------------------------------------------


def test_route_splits_between_the_stable_and_canary_services_on_the_named_gateway():
    route = traffic.build_route(spec(), render.Owner("chat", "ns", "uid-chat"), 10)
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1" and route["kind"] == "HTTPRoute"
    assert route["metadata"]["name"] == "chat-route" and route["metadata"]["ownerReferences"][0]["uid"] == "uid-chat"
    assert route["spec"]["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                            "name": "public", "namespace": "edge"}]
    assert route["spec"]["rules"][0]["backendRefs"] == [
        {"group": "", "kind": "Service", "name": "chat-tgi", "port": 8080, "weight": 90},
        {"group": "", "kind": "Service", "name": "chat-tgi-canary", "port": 8080, "weight": 10}]
    assert "hostnames" not in route["spec"]


def test_route_without_canary_weight_has_no_canary_backend_and_a_different_hash():
    owner = render.Owner("chat", "ns", "uid-chat")
    s = spec(canary={**CANARY["canary"], "hostnames": ["chat.example.com"],
                     "gatewayRef": {"name": "public", "sectionName": "https"}})
    stable_only, split = traffic.build_route(s, owner, 0), traffic.build_route(s, owner, 50)
    assert traffic.live_weights(stable_only) == {"chat-tgi": 100}
    assert traffic.live_weights(split) == {"chat-tgi": 50, "chat-tgi-canary": 50}
    assert stable_only["spec"]["hostnames"] == ["chat.example.com"]
    assert stable_only["spec"]["parentRefs"][0] == {"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                                    "name": "public", "sectionName": "https"}
    key = "ragtune.dev/route-hash"
    assert stable_only["metadata"]["annotations"][key] != split["metadata"]["annotations"][key]


def test_plan_appends_the_promoting_weight_100():
    assert traffic.plan(spec()) == [(10, 120), (50, 30), (100, 0)]
    assert traffic.plan(spec(canary={**CANARY["canary"], "steps": [{"weight": 20}, {"weight": 100, "pause": "1h"}]})) \
        == [(20, 0), (100, 3600)]


# --- the API ---------------------------------------------------------------------------------


@pytest.mark.parametrize("steps, field, words", [
    ([{"weight": 50}, {"weight": 10}], "canary.steps", "weights only increase"),
    ([{"weight": 10}, {"weight": 10}], "canary.steps", "weights only increase"),
    ([{"weight": 0}], "canary.steps.0.weight", "greater than or equal to 1"),
    ([{"weight": 101}], "canary.steps.0.weight", "less than or equal to 100"),
    ([{"weight": 10, "pause": "2 min"}], "canary.steps.0.pause", "pattern"),
    ([{"weight": 10, "pause": "25h"}], "canary.steps.0.pause", "longer than 24h"),
    ([], "canary.steps", "at least 1"),
])
def test_bad_steps_are_refused_naming_the_field(steps, field, words):
    with pytest.raises(ValidationError) as err:
        StrategySpec.model_validate({**CANARY, "canary": {**CANARY["canary"], "steps": steps}})
    assert field in str(err.value) and words in str(err.value)


def test_evaluate_is_the_default_and_canary_without_steps_keeps_meaning_evaluate():
    assert StrategySpec().type.value == "Evaluate" and StrategySpec().evaluates and not StrategySpec().shifts_traffic
    legacy = StrategySpec.model_validate({"type": "Canary"})
    assert legacy.evaluates and not legacy.shifts_traffic
    with pytest.raises(ValidationError, match="needs type: Canary"):
        StrategySpec.model_validate({**CANARY, "type": "Evaluate"})
    with pytest.raises(ValidationError, match="not with server.deploymentRef"):
        AdapterDeploymentSpec.model_validate({
            "baseModel": BASE, "adapters": [{"name": "a", "fineTuneJobRef": {"name": "f"}}],
            "server": {"deploymentRef": {"name": "tgi"}}, "strategy": CANARY})


# --- the traffic steps ---------------------------------------------------------------------------


def serving_with_route(kube: FakeKube):
    """First rollout (nothing to split yet): canary, online gate, promotion; then the route exists."""
    ftj(kube, "ftj1")
    ad(kube, strategy=copy.deepcopy(CANARY), gates={"online": {"evalSetUri": "s3://data/eval.jsonl"}})
    tick(kube)
    kube.ready("chat-tgi-canary")
    tick(kube)
    kube.finish_job("chat-eval-g1", passed())
    s = tick(kube)
    assert s.candidate.step == "Promoting"  # no Traffic step: nothing served before
    kube.ready("chat-tgi")
    s = tick(kube)
    assert s.phase == "Ready" and s.route_name == "chat-route" and weights(kube) == {"chat-tgi": 100}
    accept(kube)


def start_second_rollout(kube: FakeKube):
    ftj(kube, "ftj2", sha="b")
    edit(kube, adapters=[{"name": "support", "fineTuneJobRef": {"name": "ftj2"}}])
    tick(kube)
    kube.ready("chat-tgi-canary")
    tick(kube)
    kube.finish_job("chat-eval-g2", passed())
    return tick(kube)


def test_steps_move_the_weights_after_each_pause_and_promote_with_the_canary_carrying_all_traffic():
    kube = FakeKube()
    serving_with_route(kube)
    s = start_second_rollout(kube)
    assert s.candidate.step == "Traffic" and s.phase == "RollingOut"
    assert weights(kube) == {"chat-tgi": 90, "chat-tgi-canary": 10}
    assert s.candidate.traffic.step == 0 and s.candidate.traffic.weight == 10
    assert s.candidate.traffic.step_started_at is None  # the Gateway has not accepted it yet
    kube.clock += 300
    s = tick(kube)  # however long: no pause before the Gateway accepted the weight
    assert s.candidate.traffic.step == 0 and "has not processed the route" in s.message
    accept(kube)
    s = tick(kube)
    started = s.candidate.traffic.step_started_at
    assert started and "canary at 10% (step 1/3), 120s left" in s.message
    kube.clock += 119
    s = tick(kube)
    assert weights(kube)["chat-tgi-canary"] == 10 and s.candidate.traffic.step_started_at == started
    kube.clock += 1
    s = tick(kube)
    assert weights(kube) == {"chat-tgi": 50, "chat-tgi-canary": 50} and s.candidate.traffic.step == 1
    assert s.candidate.traffic.step_started_at is None, "step 1's start survived the status write"
    accept(kube)
    s = tick(kube)
    assert s.candidate.traffic.step == 1 and "30s left" in s.message  # step 2's own pause, from its acceptance
    kube.clock += 30
    s = tick(kube)
    assert weights(kube) == {"chat-tgi": 0, "chat-tgi-canary": 100} and s.candidate.traffic.step == 2
    accept(kube)
    tick(kube)
    kube.clock += traffic.ROUTE_SETTLE_SECONDS
    s = tick(kube)
    assert s.candidate.step == "Promoting"
    assert kube.get("Deployment", "ns", "chat-tgi-canary") is not None  # still carrying all traffic
    kube.ready("chat-tgi")
    s = tick(kube)
    assert weights(kube) == {"chat-tgi": 100}, "back to stable before the canary goes"
    assert s.candidate is not None and kube.get("Deployment", "ns", "chat-tgi-canary") is not None
    accept(kube)
    tick(kube)
    kube.clock += traffic.ROUTE_SETTLE_SECONDS
    s = tick(kube)
    assert s.phase == "Ready" and s.candidate is None and s.history[0].outcome == "Promoted"
    assert [a.sha256[0] for a in s.serving] == ["b"] and kube.kinds("Deployment") == ["chat-tgi"]
    shifted = [m for _, r, m in kube.events if r == "TrafficShifted"]
    assert [m.split(": ", 1)[1] for m in shifted[-4:]] == [
        "canary 10%, stable 90% (step 1/3)", "canary 50%, stable 50% (step 2/3)",
        "canary 100%, stable 0% (step 3/3)", "canary 0%, stable 100% (back to stable)"]


def test_a_restarted_operator_resumes_the_step_with_the_same_weight_and_pause():
    kube = FakeKube()
    serving_with_route(kube)
    start_second_rollout(kube)
    accept(kube)
    s = tick(kube)
    kube.clock += 60
    route_version = kube.objects[("HTTPRoute", "ns", "chat-route")]["metadata"]["resourceVersion"]
    # every tick is a fresh Reconciler reading only the API: a restart is the next tick
    s = tick(kube)
    assert s.candidate.traffic.step == 0 and "60s left" in s.message
    assert kube.objects[("HTTPRoute", "ns", "chat-route")]["metadata"]["resourceVersion"] == route_version
    assert [c.weight for c in s.candidate.traffic.changes] == [10]


def test_a_weight_written_but_not_recorded_is_adopted_not_rewritten():
    kube = FakeKube()
    serving_with_route(kube)
    start_second_rollout(kube)
    # the status write of the tick that set 10% was lost (a conflict): the route already carries it
    body = kube.objects[("AdapterDeployment", "ns", "chat")]
    body["status"]["candidate"].pop("traffic")
    writes = len(kube.writes)
    s = tick(kube)
    assert s.candidate.traffic.weight == 10 and len(kube.writes) == writes
    assert weights(kube)["chat-tgi-canary"] == 10


def test_a_canary_crash_during_the_steps_sends_all_traffic_back_to_stable():
    kube = FakeKube()
    serving_with_route(kube)
    start_second_rollout(kube)
    kube.add_pod("chat-tgi-canary", container={"restartCount": 3, "state": {"waiting": {"reason": "CrashLoopBackOff"}}})
    s = tick(kube)
    assert s.phase == "RolledBack" and s.history[0].reason.startswith("CrashLoop")
    assert weights(kube) == {"chat-tgi": 100} and kube.kinds("Deployment") == ["chat-tgi"]
    assert [a.sha256[0] for a in s.serving] == ["a"]


def test_a_gateway_that_refuses_the_route_holds_the_step_and_says_why():
    kube = FakeKube()
    serving_with_route(kube)
    start_second_rollout(kube)
    accept(kube, ok=False)
    kube.clock += 600
    s = tick(kube)
    assert s.candidate.traffic.step == 0 and s.candidate.traffic.step_started_at is None
    assert "Accepted=False NotAllowedByListeners" in s.message


def test_leaving_the_canary_strategy_removes_the_route():
    kube = FakeKube()
    serving_with_route(kube)
    edit(kube, strategy={"type": "Evaluate", "canary": None})
    s = tick(kube)
    assert kube.kinds("HTTPRoute") == [] and s.route_name is None
    assert status(kube).phase == "Ready"


def test_without_the_online_evaluation_the_ready_canary_goes_straight_to_the_traffic_steps():
    kube = FakeKube()
    ftj(kube, "ftj1")
    ad(kube, strategy=copy.deepcopy(CANARY), gates={"online": {"enabled": False}})
    s = tick(kube)
    assert s.candidate.step == "Promoting" and kube.kinds("Deployment") == ["chat-tgi"]  # first: no canary
    kube.ready("chat-tgi")
    assert tick(kube).phase == "Ready"
    ftj(kube, "ftj2", sha="b")
    edit(kube, adapters=[{"name": "support", "fineTuneJobRef": {"name": "ftj2"}}])
    assert tick(kube).candidate.step == "Canary"
    kube.ready("chat-tgi-canary")
    tick(kube)
    s = tick(kube)
    assert s.candidate.step == "Traffic" and kube.kinds("Job") == []
    assert weights(kube) == {"chat-tgi": 90, "chat-tgi-canary": 10}
