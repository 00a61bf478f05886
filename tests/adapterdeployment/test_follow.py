"""`follow: LatestSucceeded`: a retrained FineTuneJob's new adapter becomes a gated rollout candidate
by itself (issue 18 item 5), against the in-memory API server; the default stays pinned."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ragtune.adapterdeployment import render
from ragtune.api.adapterdeployment import AdapterSource
from ragtune.pods.online_eval import OnlineEvalResult

from .fakekube import FakeKube
from .test_rollout import ad, ftj, passed, promote_through_canary, tick


def retrain(kube: FakeKube, name: str, sha: str, phase: str = "Succeeded", observed: int | None = None) -> None:
    """The FineTuneJob's spec changed (generation + 1) and its new run ended with adapter `sha`."""
    obj = kube.objects[("FineTuneJob", "ns", name)]
    generation = obj["metadata"].get("generation", 1) + 1
    obj["metadata"]["generation"] = generation
    obj["status"] = {**obj["status"], "phase": phase, "observedGeneration": observed or generation,
                     "adapter": {"uri": f"s3://models/ns/{name}/run{generation}/", "sha256": sha * 64}}


def followed(name: str = "support", ftj_name: str = "ftj1") -> dict:
    return {"name": name, "fineTuneJobRef": {"name": ftj_name}, "follow": "LatestSucceeded"}


def eval_job(kube: FakeKube) -> str:
    jobs = [j for j in kube.kinds("Job") if j.startswith("chat-eval-")]
    assert len(jobs) == 1, jobs
    return jobs[0]


def promote_followed(kube: FakeKube):
    """The canary of a followed run's rollout passes its evaluation and is promoted."""
    s = tick(kube)
    assert s.candidate.step == "Canary"
    kube.ready("chat-tgi-canary")
    s = tick(kube)
    assert s.candidate.step == "OnlineGate"
    kube.finish_job(eval_job(kube), passed())
    s = tick(kube)
    assert s.candidate.step == "Promoting"
    kube.ready("chat-tgi")
    return tick(kube)


def test_a_pinned_adapter_keeps_serving_what_it_resolved_when_its_finetunejob_is_retrained():
    kube = FakeKube()
    ftj(kube, "ftj1")
    ad(kube)
    promote_through_canary(kube)
    retrain(kube, "ftj1", "b")
    s = tick(kube)
    assert s.candidate is None and s.phase == "Ready"
    assert [a.sha256[0] for a in s.serving] == ["a"]
    assert kube.kinds("Deployment") == ["chat-tgi"]


def test_a_followed_finetunejobs_new_run_is_rolled_out_through_the_gates_with_no_spec_change():
    kube = FakeKube()
    ftj(kube, "ftj1")
    ad(kube, adapters=[followed()])
    promote_through_canary(kube)
    template = kube.get("Deployment", "ns", "chat-tgi")["spec"]["template"]

    retrain(kube, "ftj1", "b", phase="Running", observed=1)  # being retrained: nothing to roll yet
    assert tick(kube).candidate is None
    retrain(kube, "ftj1", "b", observed=1)  # Succeeded, but the status is the older generation's
    assert tick(kube).candidate is None

    retrain(kube, "ftj1", "b")
    s = tick(kube)
    assert s.candidate.followed == ["support"] and s.candidate.generation == 1
    assert s.candidate.changed == ["support"] and s.phase == "Gating"
    assert [a.sha256[0] for a in s.candidate.adapters] == ["b"]
    assert [a.sha256[0] for a in s.serving] == ["a"]  # nothing moves before the gates
    started = [m for t, r, m in kube.events if r == "FollowedRunSucceeded"]
    assert started and f"FineTuneJob ftj1 succeeded with {'b' * 12} (serving {'a' * 12})" in started[0]

    s = promote_followed(kube)
    assert s.phase == "Ready" and s.candidate is None and s.observed_generation == 1
    assert [a.sha256[0] for a in s.serving] == ["b"]
    assert s.history[0].outcome == "Promoted" and s.history[0].followed == ["support"]
    assert s.history[1].followed == []  # the spec's own rollout
    assert kube.get("Deployment", "ns", "chat-tgi")["spec"]["template"] != template
    assert kube.kinds("Job") == [] and kube.kinds("Deployment") == ["chat-tgi"]
    assert tick(kube).candidate is None  # promoted: nothing more to roll


def test_a_rolled_back_followed_run_is_not_tried_again_but_the_next_run_is():
    kube = FakeKube()
    ftj(kube, "ftj1")
    ad(kube, adapters=[followed()])
    promote_through_canary(kube)
    retrain(kube, "ftj1", "b")
    tick(kube)
    kube.ready("chat-tgi-canary")
    tick(kube)
    job = eval_job(kube)
    assert job != render.eval_job_name("chat", 1)  # the spec's rollout had that one
    failed = OnlineEvalResult(outcome="Failed", reason="NoAdapterEffect",
                              message="adapter support: differsFromBase 0.000 < 0.0625 (off by 0.062)")
    kube.finish_job(job, failed.model_dump_json(by_alias=True), exit_code=1)
    s = tick(kube)
    assert s.phase == "RolledBack" and s.history[0].followed == ["support"]
    assert [a.sha256[0] for a in s.serving] == ["a"]
    for _ in range(3):  # the same rejected digest: never a second rollout
        s = tick(kube)
        assert s.candidate is None and s.phase == "RolledBack"
    assert kube.kinds("Deployment") == ["chat-tgi"]

    retrain(kube, "ftj1", "c")
    s = tick(kube)
    assert s.candidate.followed == ["support"] and [a.sha256[0] for a in s.candidate.adapters] == ["c"]
    s = promote_followed(kube)
    assert s.phase == "Ready" and [a.sha256[0] for a in s.serving] == ["c"]


def test_only_the_followed_adapter_changes_the_others_keep_their_pins():
    kube = FakeKube()
    ftj(kube, "ftj1")
    ftj(kube, "ftj2", sha="p")
    ad(kube, adapters=[{"name": "legal", "fineTuneJobRef": {"name": "ftj2"}}, followed()])
    promote_through_canary(kube)
    retrain(kube, "ftj2", "q")  # pinned: its new run is not picked up
    retrain(kube, "ftj1", "b")
    s = tick(kube)
    assert s.candidate.followed == ["support"] and s.candidate.changed == ["support"]
    assert {a.name: a.sha256[0] for a in s.candidate.adapters} == {"legal": "p", "support": "b"}
    s = promote_followed(kube)
    assert {a.name: a.sha256[0] for a in s.serving} == {"legal": "p", "support": "b"}


def test_a_followed_run_for_another_base_model_fails_its_rollout_and_keeps_serving():
    kube = FakeKube()
    ftj(kube, "ftj1")
    ad(kube, adapters=[followed()])
    promote_through_canary(kube)
    kube.objects[("FineTuneJob", "ns", "ftj1")]["spec"]["baseModel"] = {"id": "meta-llama/Llama-3.2-1B"}
    retrain(kube, "ftj1", "b")
    s = tick(kube)
    assert s.phase == "Failed" and s.candidate is None and "meta-llama/Llama-3.2-1B" in s.message
    assert [a.sha256[0] for a in s.serving] == ["a"] and s.history[0].followed == ["support"]
    assert tick(kube).candidate is None


def test_follow_needs_a_finetunejob():
    with pytest.raises(ValidationError, match="follow: LatestSucceeded follows a FineTuneJob"):
        AdapterSource.model_validate({"name": "a", "uri": "s3://models/run/", "sha256": "a" * 64,
                                      "follow": "LatestSucceeded"})
    assert AdapterSource.model_validate({"name": "a", "fineTuneJobRef": {"name": "f"}}).follow.value == "Pinned"
