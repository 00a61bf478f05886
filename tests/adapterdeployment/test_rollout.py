"""State transitions of the AdapterDeployment rollout against an in-memory API server."""

from __future__ import annotations

import json

import pytest

from ragtune.adapterdeployment import render
from ragtune.adapterdeployment.rollout import Reconciler
from ragtune.api.adapterdeployment import AdapterDeploymentStatus
from ragtune.pods.online_eval import OnlineEvalResult
from ragtune.runtime.kube import KubeError

from .fakekube import FakeKube

BASE = {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "12fd25f"}
IMAGE = "ghcr.io/ragtune/ragtune-operator:test"
GOOD = {"base": {"samples": 20, "f1": 0.30, "refusalRate": 0.2},
        "adapter": {"samples": 20, "f1": 0.62, "refusalRate": 0.9}, "passed": True}


def ftj(kube: FakeKube, name: str, phase: str = "Succeeded", metrics=GOOD, base=BASE, sha="a") -> None:
    kube.objects[("FineTuneJob", "ns", name)] = {
        "kind": "FineTuneJob", "metadata": {"name": name, "namespace": "ns"},
        "spec": {"baseModel": base, "dataset": {"train": "s3://data/train.jsonl", "eval": "s3://data/eval.jsonl"}},
        "status": {"phase": phase, "message": "trainer exited 2: InvalidDataset" if phase == "Failed" else "",
                   "adapter": {"uri": f"s3://models/ns/{name}/run/", "sha256": sha * 64}, "metrics": metrics}}


def ad(kube: FakeKube, adapters=None, **spec) -> None:
    body = {"apiVersion": "ragtune.dev/v1alpha1", "kind": "AdapterDeployment",
            "metadata": {"name": "chat", "namespace": "ns", "uid": "uid-chat", "generation": 1,
                         "resourceVersion": "1"},
            "spec": {"baseModel": BASE, "server": {"gpus": 0},
                     "adapters": adapters or [{"name": "support", "fineTuneJobRef": {"name": "ftj1"}}], **spec}}
    kube.objects[("AdapterDeployment", "ns", "chat")] = body


def edit(kube: FakeKube, **spec) -> None:
    kube.merge_patch("AdapterDeployment", "ns", "chat", {"spec": spec})


def status(kube: FakeKube) -> AdapterDeploymentStatus:
    return AdapterDeploymentStatus.model_validate(kube.objects[("AdapterDeployment", "ns", "chat")].get("status", {}))


def tick(kube: FakeKube) -> AdapterDeploymentStatus:
    Reconciler(kube, IMAGE, clock=lambda: kube.clock).tick("ns", "chat")
    return status(kube)


def passed(name="support") -> str:
    return OnlineEvalResult(outcome="Passed", reason="Passed", message="1 adapter(s) passed on 16 items",
                            results=[{"adapter": name, "passed": True, "differsFromBase": 0.8}]).model_dump_json(by_alias=True)


def promote_through_canary(kube: FakeKube, generation: int = 1) -> AdapterDeploymentStatus:
    s = tick(kube)
    assert s.candidate.step == "Canary" and kube.kinds("Deployment") == sorted(
        {"chat-tgi-canary", *[n for n in kube.kinds("Deployment") if n == "chat-tgi"]})
    kube.ready("chat-tgi-canary")
    s = tick(kube)
    assert s.candidate.step == "OnlineGate" and f"chat-eval-g{generation}" in kube.kinds("Job")
    kube.finish_job(f"chat-eval-g{generation}", passed())
    s = tick(kube)
    assert s.candidate.step == "Promoting" and s.phase == "RollingOut"
    kube.ready("chat-tgi")
    return tick(kube)


def test_canary_pass_promotes_and_cleans_up():
    kube = FakeKube()
    ftj(kube, "ftj1")
    ad(kube)
    s = promote_through_canary(kube)
    assert s.phase == "Ready" and s.candidate is None and s.observed_generation == 1
    assert [(a.name, a.sha256) for a in s.serving] == [("support", "a" * 64)]
    assert s.serving[0].since and s.serving[0].source == "FineTuneJob/ftj1"
    assert s.history[0].outcome == "Promoted" and s.history[0].adapters == ["support@" + "a" * 12]
    assert s.endpoint == "http://chat-tgi.ns.svc:8080" and s.serving_adapters == "support"
    assert kube.kinds("Deployment") == ["chat-tgi"] and kube.kinds("Service") == ["chat-tgi"]
    assert kube.kinds("Job") == []
    assert {c.type: c.status.value for c in s.conditions} == {"Progressing": "False", "Ready": "True",
                                                              "Degraded": "False"}
    reasons = [r for _, r, _ in kube.events]
    assert reasons == ["RolloutStarted", "OfflineGatePassed", "CanaryCreated", "CanaryReady",
                       "OnlineGatePassed", "Promoting", "Promoted"]
    # a further tick changes nothing
    writes = len(kube.writes)
    tick(kube)
    assert len(kube.writes) == writes


def test_offline_gate_failure_leaves_serving_untouched_and_says_by_how_much():
    kube = FakeKube()
    ftj(kube, "ftj1")
    ad(kube)
    promote_through_canary(kube)
    ftj(kube, "ftj2", sha="b", metrics={**GOOD, "adapter": {"f1": 0.41, "refusalRate": 0.9}})
    edit(kube, adapters=[{"name": "support", "fineTuneJobRef": {"name": "ftj2"}}],
         gates={"offline": {"minF1": 0.5}})
    stable_before = kube.get("Deployment", "ns", "chat-tgi")
    s = tick(kube)
    assert s.phase == "RolledBack" and s.candidate is None
    assert "adapter support: f1 0.410 < 0.5 (off by 0.090)" in s.message
    assert s.gates.offline["support"][0].margin == pytest.approx(-0.09)
    assert s.history[0].outcome == "RolledBack" and s.history[0].reason.startswith("OfflineGateFailed")
    assert kube.get("Deployment", "ns", "chat-tgi") == stable_before
    assert [a.sha256[0] for a in s.serving] == ["a"]
    assert kube.kinds("Deployment") == ["chat-tgi"]


def test_online_gate_failure_rolls_back():
    kube = FakeKube()
    ftj(kube, "ftj1")
    ad(kube)
    tick(kube)
    kube.ready("chat-tgi-canary")
    tick(kube)
    failed = OnlineEvalResult(outcome="Failed", reason="NoAdapterEffect",
                              message="adapter support: differsFromBase 0.000 < 0.0625 (off by 0.062)")
    kube.finish_job("chat-eval-g1", failed.model_dump_json(by_alias=True), exit_code=1)
    s = tick(kube)
    assert s.phase == "RolledBack" and "differsFromBase" in s.message
    assert s.history[0].reason.startswith("NoAdapterEffect")
    assert kube.kinds("Deployment") == [] and kube.kinds("Job") == [] and kube.kinds("Service") == []
    assert {c.type: c.status.value for c in s.conditions}["Ready"] == "False"
    assert ("Warning", "NoAdapterEffect") in [(t, r) for t, r, _ in kube.events]


def test_checksum_mismatch_in_the_canary_init_container_rolls_back_with_its_reason():
    kube = FakeKube()
    ftj(kube, "ftj1")
    ad(kube)
    tick(kube)
    message = json.dumps({"outcome": "Failed", "reason": "ChecksumMismatch", "adapter": "support",
                          "message": "adapter support: adapter/adapter_model.safetensors has sha256 12…"})
    kube.add_pod("chat-tgi-canary", init={"state": {"terminated": {"exitCode": 1, "message": message}}})
    s = tick(kube)
    assert s.phase == "RolledBack" and s.history[0].reason.startswith("ChecksumMismatch")
    assert "adapter_model.safetensors" in s.message
    assert kube.kinds("Deployment") == []


def test_crash_looping_canary_rolls_back():
    kube = FakeKube()
    ftj(kube, "ftj1")
    ad(kube)
    tick(kube)
    kube.add_pod("chat-tgi-canary", container={
        "restartCount": 2, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": {"exitCode": 1, "message": "size mismatch for lora_A"}}})
    s = tick(kube)
    assert s.phase == "RolledBack" and s.history[0].reason.startswith("CrashLoop")
    assert "size mismatch for lora_A" in s.message


def test_canary_not_ready_within_the_timeout_rolls_back():
    kube = FakeKube()
    ftj(kube, "ftj1")
    ad(kube, gates={"online": {"timeoutSeconds": 60}})
    tick(kube)
    kube.clock += 30
    assert tick(kube).candidate.step == "Canary"
    kube.clock += 31
    s = tick(kube)
    assert s.phase == "RolledBack" and s.history[0].reason.startswith("CanaryTimeout")


def test_direct_strategy_skips_the_canary_but_not_the_offline_gate():
    kube = FakeKube()
    ftj(kube, "ftj1")
    ad(kube, strategy={"type": "Direct"})
    s = tick(kube)
    assert s.candidate.step == "Promoting" and kube.kinds("Deployment") == ["chat-tgi"]
    kube.ready("chat-tgi")
    assert tick(kube).phase == "Ready"
    ftj(kube, "ftj2", sha="b", metrics={**GOOD, "passed": False})
    edit(kube, adapters=[{"name": "support", "fineTuneJobRef": {"name": "ftj2"}}])
    s = tick(kube)
    assert s.phase == "RolledBack" and "fineTuneJobGatesPassed" in s.message


def test_direct_rollout_that_crashes_restores_the_previous_set():
    kube = FakeKube()
    ftj(kube, "ftj1")
    ad(kube, strategy={"type": "Direct"})
    tick(kube)
    kube.ready("chat-tgi")
    tick(kube)
    before = kube.get("Deployment", "ns", "chat-tgi")["spec"]["template"]
    ftj(kube, "ftj2", sha="b")
    edit(kube, adapters=[{"name": "support", "fineTuneJobRef": {"name": "ftj2"}}])
    s = tick(kube)
    assert s.candidate.step == "Promoting"
    kube.add_pod("chat-tgi", container={"restartCount": 3})
    s = tick(kube)
    assert s.phase == "RolledBack" and s.history[0].reason.startswith("CrashLoop")
    after = kube.get("Deployment", "ns", "chat-tgi")["spec"]["template"]
    assert render.live_template_hash({"spec": {"template": after}}) == \
        render.live_template_hash({"spec": {"template": before}})
    assert [a.sha256[0] for a in s.serving] == ["a"]


def test_adapter_for_another_base_model_fails_before_anything_rolls():
    kube = FakeKube()
    ftj(kube, "ftj1", base={"id": "meta-llama/Llama-3.2-1B", "revision": "main"})
    ad(kube)
    s = tick(kube)
    assert s.phase == "Failed" and s.history[0].reason.startswith("BaseModelMismatch")
    assert "meta-llama/Llama-3.2-1B@main" in s.message and kube.kinds("Deployment") == []


def test_waits_for_a_running_finetunejob_and_fails_with_a_failed_one():
    kube = FakeKube()
    ftj(kube, "ftj1", phase="Running")
    ad(kube)
    s = tick(kube)
    assert s.phase == "Pending" and "waiting for FineTuneJob ftj1 (Running)" in s.message
    assert s.candidate.step == "Resolving"
    ftj(kube, "ftj1", phase="Failed")
    s = tick(kube)
    assert s.phase == "Failed" and "InvalidDataset" in s.message


def test_operator_restart_mid_rollout_resumes_without_a_second_canary():
    kube = FakeKube()
    ftj(kube, "ftj1")
    ad(kube)
    tick(kube)  # canary created, then the operator "dies"
    canary = kube.get("Deployment", "ns", "chat-tgi-canary")
    for _ in range(3):  # a fresh Reconciler each time, like a restarted operator
        assert tick(kube).candidate.step == "Canary"
    assert kube.get("Deployment", "ns", "chat-tgi-canary")["metadata"]["resourceVersion"] == \
        canary["metadata"]["resourceVersion"]
    kube.ready("chat-tgi-canary")
    tick(kube)
    tick(kube)  # the Job exists already: adopted, not duplicated
    assert kube.kinds("Job") == ["chat-eval-g1"]
    assert [w for w in kube.writes if w[:2] == ("create", "Deployment")] == [("create", "Deployment", "chat-tgi-canary")]


def test_spec_edit_mid_canary_aborts_it_before_the_next_rollout():
    kube = FakeKube()
    ftj(kube, "ftj1")
    ftj(kube, "ftj2", sha="b")
    ad(kube)
    tick(kube)
    edit(kube, adapters=[{"name": "support", "fineTuneJobRef": {"name": "ftj2"}}])
    s = tick(kube)
    assert s.history[0].outcome == "RolledBack" and s.history[0].reason.startswith("Superseded")
    assert s.candidate.generation == 2 and s.candidate.step == "Canary"
    digest = kube.get("Deployment", "ns", "chat-tgi-canary")["spec"]["template"]["metadata"]["annotations"]
    assert "support@bbbbbbbbbbbb" in digest[render.ANNOTATION_ADAPTERS]


def test_unchanged_set_after_a_gate_edit_does_not_roll():
    kube = FakeKube()
    ftj(kube, "ftj1")
    ad(kube)
    promote_through_canary(kube)
    writes = len([w for w in kube.writes if w[1] == "Deployment"])
    edit(kube, historyLimit=3)
    s = tick(kube)
    assert s.phase == "Ready" and s.observed_generation == 2 and s.candidate is None
    assert len([w for w in kube.writes if w[1] == "Deployment"]) == writes


def test_removing_an_adapter_rolls_without_a_canary():
    kube = FakeKube()
    ftj(kube, "ftj1")
    ftj(kube, "ftj2", sha="b")
    ad(kube, adapters=[{"name": "support", "fineTuneJobRef": {"name": "ftj1"}},
                       {"name": "legal", "fineTuneJobRef": {"name": "ftj2"}}], strategy={"type": "Direct"})
    tick(kube)
    kube.ready("chat-tgi")
    tick(kube)
    edit(kube, adapters=[{"name": "support", "fineTuneJobRef": {"name": "ftj1"}}])
    s = tick(kube)
    assert s.candidate.step == "Promoting" and "chat-tgi-canary" not in kube.kinds("Deployment")
    kube.ready("chat-tgi")
    s = tick(kube)
    assert [a.name for a in s.serving] == ["support"]


def test_history_is_bounded():
    kube = FakeKube()
    ftj(kube, "ftj1", phase="Failed")
    ad(kube, historyLimit=2)
    for generation in range(2, 6):
        tick(kube)
        edit(kube, historyLimit=2, server={"gpus": 0, "replicas": generation})
    s = tick(kube)
    assert len(s.history) == 2 and s.history[0].generation == 5


def test_invalid_spec_is_reported_with_the_field():
    kube = FakeKube()
    ad(kube, adapters=[{"name": "Bad Name", "uri": "s3://models/x/", "sha256": "a" * 64}])
    s = tick(kube)
    assert s.phase == "Failed" and s.message.startswith("spec.adapters.0.name")


def test_stale_status_write_conflicts():
    kube = FakeKube()
    ftj(kube, "ftj1")
    ad(kube)
    body = kube.get("AdapterDeployment", "ns", "chat")
    kube.merge_patch("AdapterDeployment", "ns", "chat", {"status": {"message": "someone else"}}, sub="status")
    with pytest.raises(KubeError) as err:
        Reconciler(kube, IMAGE)._write(body, {}, {"phase": "Pending"})
    assert err.value.status == 409


def test_uri_adapter_with_direct_strategy_is_gated_on_its_report_by_a_job():
    kube = FakeKube()
    ad(kube, adapters=[{"name": "support", "uri": "s3://models/runs/r1/", "sha256": "d" * 64}],
       strategy={"type": "Direct"}, gates={"offline": {"minF1": 0.5}})
    s = tick(kube)
    assert s.candidate.step == "OfflineGate" and kube.kinds("Job") == ["chat-eval-g1"]
    assert kube.kinds("Deployment") == []
    job = kube.get("Job", "ns", "chat-eval-g1")
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    config = json.loads(env["RAGTUNE_EVAL_CONFIG"])
    assert "canaryUrl" not in config and config["candidates"][0]["offline"] is True
    assert config["candidates"][0]["sha256"] == "d" * 64
    failed = OnlineEvalResult(outcome="Failed", reason="OfflineGateFailed",
                              message="adapter support: f1 0.450 < 0.5 (off by 0.050)",
                              offline={"support": [{"metric": "f1", "comparison": ">=", "threshold": 0.5,
                                                    "value": 0.45, "passed": False, "margin": -0.05}]})
    kube.finish_job("chat-eval-g1", failed.model_dump_json(by_alias=True), exit_code=1)
    s = tick(kube)
    assert s.phase == "RolledBack" and s.history[0].reason.startswith("OfflineGateFailed")
    assert s.gates.offline["support"][0].value == 0.45 and kube.kinds("Deployment") == []


def test_uri_adapter_report_pass_then_rolls_directly():
    kube = FakeKube()
    ad(kube, adapters=[{"name": "support", "uri": "s3://models/runs/r1/", "sha256": "d" * 64}],
       strategy={"type": "Direct"})
    tick(kube)
    ok = OnlineEvalResult(outcome="Passed", reason="Passed", message="1 adapter(s) passed the offline gate",
                          offline={"support": []})
    kube.finish_job("chat-eval-g1", ok.model_dump_json(by_alias=True))
    s = tick(kube)
    assert s.candidate.step == "Promoting" and kube.kinds("Deployment") == ["chat-tgi"]


class MetadataWriterKube(FakeKube):
    """kopf adds its finalizer right after an object is created: here that metadata-only write
    lands between the first tick's read of the AdapterDeployment and its status write."""

    def __init__(self) -> None:
        super().__init__()
        self.pending_metadata_write = True

    def get(self, kind, namespace, name):
        obj = super().get(kind, namespace, name)
        if kind == "AdapterDeployment" and obj is not None and self.pending_metadata_write:
            self.pending_metadata_write = False
            self.merge_patch(kind, namespace, name, {"metadata": {"finalizers": ["ragtune.dev/finalizer"]}})
        return obj


def test_a_metadata_write_during_a_tick_neither_loses_nor_repeats_its_events():
    kube = MetadataWriterKube()
    ftj(kube, "ftj1")
    ad(kube)
    s = promote_through_canary(kube)
    assert s.phase == "Ready"
    assert [r for _, r, _ in kube.events] == ["RolloutStarted", "OfflineGatePassed", "CanaryCreated", "CanaryReady",
                                              "OnlineGatePassed", "Promoting", "Promoted"]


def test_status_written_by_a_newer_operator_is_read_after_an_operator_rollback():
    """helm rollback of the operator mid-rollout: the status holds fields only the newer version
    knows; the older operator carries the rollout on instead of failing the object."""
    kube = FakeKube()
    ftj(kube, "ftj1")
    ad(kube)
    assert tick(kube).candidate.step == "Canary"
    body = kube.objects[("AdapterDeployment", "ns", "chat")]
    body["status"]["analysisRuns"] = [{"step": 1, "phase": "Running"}]
    body["status"]["candidate"]["canaryWeight"] = 10
    kube.ready("chat-tgi-canary")
    Reconciler(kube, IMAGE, clock=lambda: kube.clock).tick("ns", "chat")
    after = body["status"]
    assert after["phase"] != "Failed" and after["candidate"]["step"] == "OnlineGate", after.get("message")


def user_deployment(kube: FakeKube) -> None:
    kube.create({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "user-tgi", "namespace": "ns"},
                 "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "u"}},
                          "template": {"metadata": {"labels": {"app": "u"}},
                                       "spec": {"containers": [{"name": "tgi", "image": "tgi:user",
                                                                "env": [{"name": "MODEL_ID", "value": "/m"}]}]}}}})


def test_a_deployment_ref_canary_is_rendered_from_the_referenced_deployment_then_promoted_onto_it():
    kube = FakeKube()
    ftj(kube, "ftj1")
    user_deployment(kube)
    ad(kube, server={"gpus": 0, "deploymentRef": {"name": "user-tgi"}})
    s = tick(kube)
    assert s.candidate.step == "Canary"
    canary = kube.get("Deployment", "ns", "chat-tgi-canary")
    (server,) = canary["spec"]["template"]["spec"]["containers"]
    assert server["image"] == "tgi:user" and {"name": "MODEL_ID", "value": "/m"} in server["env"]
    assert "app" not in canary["spec"]["template"]["metadata"]["labels"]  # never behind the user's Service
    assert kube.get("Deployment", "ns", "user-tgi")["spec"]["template"]["spec"]["containers"][0].get("env") == [
        {"name": "MODEL_ID", "value": "/m"}]  # untouched until promotion
    kube.ready("chat-tgi-canary")
    s = tick(kube)
    assert s.candidate.step == "OnlineGate"
    kube.finish_job("chat-eval-g1", passed())
    s = tick(kube)
    assert s.candidate.step == "Promoting"
    kube.ready("user-tgi")
    s = tick(kube)
    assert s.phase == "Ready" and kube.kinds("Deployment") == ["user-tgi"]
    env = kube.get("Deployment", "ns", "user-tgi")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "LORA_ADAPTERS", "value": "support=/data/adapters/support"} in env


def test_a_deployment_ref_that_is_gone_fails_the_rollout_before_any_canary():
    kube = FakeKube()
    ftj(kube, "ftj1")
    ad(kube, server={"gpus": 0, "deploymentRef": {"name": "user-tgi"}})
    s = tick(kube)
    assert s.phase == "Failed" and s.history[0].reason.startswith("DeploymentNotFound")
    assert kube.kinds("Deployment") == [] and kube.kinds("Service") == []
