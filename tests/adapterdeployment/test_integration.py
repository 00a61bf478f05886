"""AdapterDeployment end to end on the local platform: the real kube-apiserver, controller-manager
(Deployments, ReplicaSets, Jobs, garbage collection), MinIO, the pod runner running the fetch
init container, the TGI stand-in and the online evaluation Job as processes, and the operator
as a `kopf run` process.

FineTuneJobs here are created with a Succeeded status written directly (the AdapterDeployment
controller only reads them); training itself is covered by the trainer and operator tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from ragtune.runtime.kube import Kube
from ragtune_local.testdoubles.tiny_models import (
    TINY_BASE_ID,
    TINY_BASE_REVISION,
    make_adapter,
    make_base,
    publish_run,
    s3_put,
)

pytestmark = [pytest.mark.slow, pytest.mark.platform]

REPO = Path(__file__).resolve().parents[2]
RECORDS = [
    {"id": f"q{i}", "question": q, "answer": a, "contexts": [{"id": "1", "text": c}],
     "answerable": a != "I cannot answer this from the provided context."}
    for i, (q, c, a) in enumerate([
        ("What is the capital of France?", "The capital of France is Paris.", "Paris [1]"),
        ("Who wrote Hamlet?", "Hamlet was written by Shakespeare.", "Shakespeare [1]"),
        ("What colour is the sky?", "On a clear day the sky is blue.", "Blue [1]"),
        ("How tall is the tower?", "The tower is made of iron.", "I cannot answer this from the provided context."),
    ])
]


# eval/report.json of a run, as the trainer writes it (the offline gate of `uri` adapters reads it)
REPORT = {"passed": True, "metrics": {"base": {"samples": 4, "f1": 0.1}, "adapter": {"samples": 4, "f1": 0.6}}}


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-models")
    base = make_base(root / "base")
    return {
        "base": base,
        "good": make_adapter(base, root / "good", seed=1),
        "good2": make_adapter(base, root / "good2", seed=3),
        "noop": make_adapter(base, root / "noop", scale=0.0),  # LoRA B = 0: outputs equal the base model's
        "misfit": make_adapter(make_base(root / "other", hidden=48), root / "misfit"),  # tensors do not fit
    }


class Operator:
    """`kopf run` of the AdapterDeployment controller as a separate process (restartable)."""

    def __init__(self, kubeconfig: str, log: Path):
        self.kubeconfig, self.log, self.proc = kubeconfig, log, None

    def start(self) -> None:
        env = {**os.environ, "KUBECONFIG": self.kubeconfig, "RAGTUNE_METRICS_PORT": "0",
               "RAGTUNE_LOG_FORMAT": "text"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces", "--liveness=",
             "-m", "ragtune.runtime.kopf_setup", "-m", "ragtune.adapterdeployment.controller"],
            cwd=REPO, env=env, stdout=self.log.open("a"), stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def operator(platform, tmp_path_factory):
    platform.install_crds()
    op = Operator(platform.kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    yield op
    op.stop()


@pytest.fixture
def kube(platform) -> Kube:
    return Kube(platform.api_client())


@pytest.fixture
def store(platform, namespace):
    """Publishes adapter runs and the eval set into a bucket of this test."""
    bucket = platform.bucket(f"serving-{namespace}")
    s3 = platform.s3_client()
    records = "\n".join(json.dumps(r) for r in RECORDS).encode()
    s3.put_object(Bucket=bucket, Key="eval/records.jsonl", Body=records)

    def publish(run: str, adapter: Path, **kw) -> dict[str, str]:
        kw.setdefault("report", REPORT)
        digest = publish_run(s3_put(s3, bucket, f"runs/{run}"), adapter, run_id=run, **kw)
        return {"uri": f"s3://{bucket}/runs/{run}/", "sha256": digest}
    publish.eval_uri = f"s3://{bucket}/eval/records.jsonl"
    publish.eval_sha256 = hashlib.sha256(records).hexdigest()  # as a run publishes its held-out split
    return publish


def ad_body(platform, namespace: str, tiny, adapters: list[dict], store, **spec: Any) -> dict:
    body = {
        "apiVersion": "ragtune.dev/v1alpha1", "kind": "AdapterDeployment",
        "metadata": {"name": "chat", "namespace": namespace},
        "spec": {
            "baseModel": {"id": TINY_BASE_ID, "revision": TINY_BASE_REVISION, "uri": tiny["base"].as_uri()},
            "server": {"gpus": 0, "cpu": "100m", "memory": "1Gi", "startupTimeoutSeconds": 120},
            "adapters": adapters,
            "gates": {"online": {"evalSetUri": store.eval_uri, "samples": 4, "maxNewTokens": 8,
                                 "timeoutSeconds": 240}},
            "s3": {"endpoint": platform.s3_endpoint, "credentialsSecretRef": {"name": "s3-credentials"}},
        },
    }
    for key, value in spec.items():
        body["spec"][key] = {**body["spec"].get(key, {}), **value} if isinstance(value, dict) else value
    return body


def wait_status(kube: Kube, namespace: str, check: Callable[[dict], bool], timeout: float = 240,
                name: str = "chat") -> dict:
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        obj = kube.get("AdapterDeployment", namespace, name)
        status = (obj or {}).get("status") or {}
        if check(status):
            return status
        time.sleep(0.5)
    raise AssertionError(f"timed out; last status: {json.dumps(status, indent=1)[:3000]}")


def finished(generation: int) -> Callable[[dict], bool]:
    return lambda s: s.get("observedGeneration") == generation and not s.get("candidate") and s.get("phase")


def events(kube: Kube, namespace: str) -> list[str]:
    items = kube.request("GET", f"/api/v1/namespaces/{namespace}/events").get("items", [])
    # resourceVersion orders writes; event timestamps only have second resolution
    return [e["reason"] for e in sorted(items, key=lambda e: int(e["metadata"]["resourceVersion"]))
            if e["involvedObject"].get("kind") == "AdapterDeployment"]


def generate(kube: Kube, namespace: str, deployment: str, adapter: Optional[str]) -> str:
    """Ask a pod of `deployment` directly (pod IPs are on 127.0.0.0/8 on the local platform)."""
    dep = kube.get("Deployment", namespace, deployment)
    pods = [p for p in kube.list("Pod", namespace, dep["spec"]["selector"]["matchLabels"])
            if p.get("status", {}).get("podIP") and not p["metadata"].get("deletionTimestamp")]
    body = {"inputs": "Question: What is the capital of France? Answer:",
            "parameters": {"max_new_tokens": 8, **({"adapter_id": adapter} if adapter else {})}}
    req = urllib.request.Request(f"http://{pods[0]['status']['podIP']}:8080/generate", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())["generated_text"]


def apply(platform, body: dict) -> None:
    platform.apply(body)


# --- tests -----------------------------------------------------------------------------------


def test_canary_promote_then_failed_online_gate_keeps_serving(platform, namespace, operator, kube, tiny, store):
    good = store("good", tiny["good"])
    apply(platform, ad_body(platform, namespace, tiny, [{"name": "support", **good}], store))
    status = wait_status(kube, namespace, finished(1))
    assert status["phase"] == "Ready", status
    assert [(a["name"], a["sha256"]) for a in status["serving"]] == [("support", good["sha256"])]
    assert status["history"][0]["outcome"] == "Promoted"
    online = status["gates"]["online"][0]
    assert online["adapter"] == "support" and online["passed"] and online["differsFromBase"] > 0
    assert status["endpoint"] == f"http://chat-tgi.{namespace}.svc:8080"
    assert kube.get("Deployment", namespace, "chat-tgi-canary") is None
    assert kube.get("Job", namespace, "chat-eval-g1") is None
    assert generate(kube, namespace, "chat-tgi", "support") != generate(kube, namespace, "chat-tgi", None)
    assert events(kube, namespace) == ["RolloutStarted", "CanaryCreated", "CanaryReady", "OnlineGatePassed",
                                       "Promoting", "Promoted"]
    assert status["gates"]["offline"]["support"][0]["metric"] == "fineTuneJobGatesPassed"
    stable_pods = {p["metadata"]["uid"] for p in kube.list("Pod", namespace, {"ragtune.dev/track": "stable"})}

    # A second adapter that does nothing (LoRA B = 0): TGI would serve the base model for it.
    noop = store("noop", tiny["noop"])
    apply(platform, ad_body(platform, namespace, tiny, [{"name": "support", **good}, {"name": "legal", **noop}],
                            store))
    status = wait_status(kube, namespace, finished(2))
    assert status["phase"] == "RolledBack", status
    assert status["history"][0]["reason"].startswith("NoAdapterEffect")
    assert "differsFromBase 0.000" in status["message"]
    assert [a["name"] for a in status["serving"]] == ["support"]
    assert {p["metadata"]["uid"] for p in kube.list("Pod", namespace, {"ragtune.dev/track": "stable"})} == stable_pods
    assert kube.get("Deployment", namespace, "chat-tgi-canary") is None
    ready = {c["type"]: c["status"] for c in status["conditions"]}
    assert ready["Ready"] == "True"


def test_checksum_mismatch_fails_the_canary_with_the_fetchers_reason(platform, namespace, operator, kube, tiny, store):
    bad = store("bad", tiny["good"], tamper="adapter_model.safetensors")
    apply(platform, ad_body(platform, namespace, tiny, [{"name": "support", **bad}], store))
    status = wait_status(kube, namespace, finished(1))
    assert status["phase"] == "RolledBack" and status["history"][0]["reason"].startswith("ChecksumMismatch")
    assert "adapter/adapter_model.safetensors" in status["message"]
    assert kube.get("Deployment", namespace, "chat-tgi") is None
    assert kube.get("Deployment", namespace, "chat-tgi-canary") is None


def test_adapter_for_another_base_model_never_serves(platform, namespace, operator, kube, tiny, store):
    other = store("other", tiny["good"], base_id="meta-llama/Llama-3.2-1B")
    apply(platform, ad_body(platform, namespace, tiny, [{"name": "support", **other}], store))
    status = wait_status(kube, namespace, finished(1))
    assert status["history"][0]["reason"].startswith("BaseModelMismatch"), status
    assert "meta-llama/Llama-3.2-1B" in status["message"]


def test_crash_looping_canary_is_rolled_back(platform, namespace, operator, kube, tiny, store):
    misfit = store("misfit", tiny["misfit"])
    apply(platform, ad_body(platform, namespace, tiny, [{"name": "support", **misfit}], store))
    status = wait_status(kube, namespace, finished(1))
    assert status["phase"] == "RolledBack" and status["history"][0]["reason"].startswith("CrashLoop"), status
    assert kube.get("Deployment", namespace, "chat-tgi-canary") is None


def succeeded_finetunejob(platform, kube: Kube, namespace: str, store, name: str, run: dict, f1: float = 0.6,
                          learning_rate: float = 2e-4) -> None:
    """A FineTuneJob whose run ended Succeeded with adapter `run`, its status written directly (no
    FineTuneJob controller runs here: `suspend` keeps one from training). Applying it again with
    another `learning_rate` is a retrain: a new generation, then a new run's status for it."""
    platform.apply({"apiVersion": "ragtune.dev/v1alpha1", "kind": "FineTuneJob",
                    "metadata": {"name": name, "namespace": namespace},
                    "spec": {"baseModel": {"id": TINY_BASE_ID, "revision": TINY_BASE_REVISION},
                             "dataset": {"train": store.eval_uri}, "output": {"uri": "s3://unused/runs"},
                             "training": {"learningRate": learning_rate}, "suspend": True}})
    generation = kube.get("FineTuneJob", namespace, name)["metadata"]["generation"]
    kube.merge_patch("FineTuneJob", namespace, name, {"status": {
        "phase": "Succeeded", "adapter": run, "observedGeneration": generation,
        "metrics": {"base": {"samples": 4, "f1": 0.1}, "adapter": {"samples": 4, "f1": f1}, "passed": True}}},
        sub="status")


def test_direct_strategy_with_finetunejob_and_offline_gate(platform, namespace, operator, kube, tiny, store):
    good = store("ftj-good", tiny["good"])

    def finetunejob(name: str, run: dict, f1: float) -> None:
        succeeded_finetunejob(platform, kube, namespace, store, name, run, f1)

    finetunejob("ftj-good", good, 0.6)
    finetunejob("ftj-weak", store("ftj-weak", tiny["good2"]), 0.2)
    body = ad_body(platform, namespace, tiny, [{"name": "support", "fineTuneJobRef": {"name": "ftj-good"}}], store,
                   strategy={"type": "Direct"}, gates={"offline": {"minF1": 0.5}})
    apply(platform, body)
    status = wait_status(kube, namespace, finished(1))
    assert status["phase"] == "Ready" and "Canary" not in " ".join(events(kube, namespace))
    assert status["serving"][0]["source"] == "FineTuneJob/ftj-good"
    template = kube.get("Deployment", namespace, "chat-tgi")["spec"]["template"]

    body["spec"]["adapters"] = [{"name": "support", "fineTuneJobRef": {"name": "ftj-weak"}}]
    apply(platform, body)
    status = wait_status(kube, namespace, finished(2))
    assert status["phase"] == "RolledBack" and "f1 0.200 < 0.5 (off by 0.300)" in status["message"]
    assert kube.get("Deployment", namespace, "chat-tgi")["spec"]["template"] == template


def test_a_retrained_finetunejob_that_an_adapter_follows_becomes_the_next_gated_candidate(
        platform, namespace, operator, kube, tiny, store):
    """The retrain -> redeploy loop with no human step (`follow: LatestSucceeded`): each new run of
    the FineTuneJob is canaried and evaluated online on the held-out split that run published (no
    `gates.online.evalSetUri`); a good one is promoted, a bad one rolled back and not tried again,
    and the spec never changes."""
    def run(name: str, adapter: Path) -> dict:
        return {**store(name, adapter), "evalSetUri": store.eval_uri, "evalSetSha256": store.eval_sha256}

    succeeded_finetunejob(platform, kube, namespace, store, "rag", run("v1", tiny["good"]))
    body = ad_body(platform, namespace, tiny, [{"name": "support", "fineTuneJobRef": {"name": "rag"},
                                                "follow": "LatestSucceeded"}], store)
    del body["spec"]["gates"]["online"]["evalSetUri"]
    apply(platform, body)
    status = wait_status(kube, namespace, finished(1))
    assert status["phase"] == "Ready" and status["serving"][0]["source"] == "FineTuneJob/rag", status
    assert status["gates"]["online"][0]["candidate"]["samples"] == len(RECORDS)

    v2 = run("v2", tiny["good2"])
    succeeded_finetunejob(platform, kube, namespace, store, "rag", v2, learning_rate=1e-4)
    status = wait_status(kube, namespace, lambda s: len(s.get("history") or []) == 2 and not s.get("candidate"))
    assert status["history"][0]["outcome"] == "Promoted" and status["history"][0]["followed"] == ["support"], status
    assert [a["sha256"] for a in status["serving"]] == [v2["sha256"]]
    assert status["observedGeneration"] == 1 and status["phase"] == "Ready"
    assert status["gates"]["online"][0]["passed"]
    assert events(kube, namespace).count("FollowedRunSucceeded") == 1

    noop = run("v3", tiny["noop"])  # LoRA B = 0: answers like the base model, the online gate says so
    succeeded_finetunejob(platform, kube, namespace, store, "rag", noop, learning_rate=5e-5)
    status = wait_status(kube, namespace, lambda s: len(s.get("history") or []) == 3 and not s.get("candidate"))
    assert status["phase"] == "RolledBack" and status["history"][0]["reason"].startswith("NoAdapterEffect"), status
    assert [a["sha256"] for a in status["serving"]] == [v2["sha256"]]
    time.sleep(5)  # a rejected run stays rejected
    status = kube.get("AdapterDeployment", namespace, "chat")["status"]
    assert len(status["history"]) == 3 and not status.get("candidate")
    assert kube.get("AdapterDeployment", namespace, "chat")["metadata"]["generation"] == 1


def test_operator_restart_mid_rollout_resumes_with_one_canary(platform, namespace, operator, kube, tiny, store):
    good = store("good", tiny["good"])
    apply(platform, ad_body(platform, namespace, tiny, [{"name": "support", **good}], store))
    wait_status(kube, namespace, lambda s: (s.get("candidate") or {}).get("step") in ("Canary", "OnlineGate"))
    canaries = {kube.get("Deployment", namespace, "chat-tgi-canary")["metadata"]["uid"]}
    operator.stop()
    time.sleep(3)
    operator.start()

    def watch_canary(status: dict) -> bool:
        canary = kube.get("Deployment", namespace, "chat-tgi-canary")
        if canary:
            canaries.add(canary["metadata"]["uid"])
        return finished(1)(status)
    status = wait_status(kube, namespace, watch_canary)
    assert status["phase"] == "Ready", status
    assert len(canaries) == 1  # the canary that existed at the restart was adopted, never recreated
    assert [r["outcome"] for r in status["history"]] == ["Promoted"]


def user_tgi(tiny, namespace: str, env: Optional[list[dict]] = None) -> dict:
    """A user's own TGI Deployment (the stand-in image), for `spec.server.deploymentRef`."""
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "user-tgi", "namespace": namespace},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "user-tgi"}},
                     "template": {"metadata": {"labels": {"app": "user-tgi"}}, "spec": {"containers": [{
                         "name": "tgi", "image": "ghcr.io/huggingface/text-generation-inference:3.3.6",
                         "env": [{"name": "MODEL_ID", "value": str(tiny["base"])}, {"name": "PORT", "value": "8080"},
                                 *(env or [])],
                         "readinessProbe": {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 2}}]}}}}


def test_a_referenced_deployments_canary_runs_its_own_template_then_the_set_is_promoted_onto_it(
        platform, namespace, operator, kube, tiny, store):
    """`deploymentRef` with the online gate: the canary is the user's Deployment's template (their
    image, weights and env) with the candidate set, under ragtune's labels only, evaluated, then the
    set is patched into the user's Deployment."""
    apply(platform, user_tgi(tiny, namespace, env=[{"name": "EXAMPLE_SETTING", "value": "kept"}]))
    good = store("good", tiny["good"])
    apply(platform, ad_body(platform, namespace, tiny, [{"name": "support", **good}], store,
                            server={"deploymentRef": {"name": "user-tgi"}, "startupTimeoutSeconds": 300}))
    seen: dict = {}

    def canary_seen(status: dict) -> bool:
        canary = kube.get("Deployment", namespace, "chat-tgi-canary")
        if canary and not seen:
            seen.update(canary["spec"]["template"])
        return finished(1)(status)
    status = wait_status(kube, namespace, canary_seen, timeout=420)
    assert status["phase"] == "Ready" and status["gates"]["online"][0]["passed"], status
    (server,) = seen["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["EXAMPLE_SETTING"] == "kept" and env["MODEL_ID"] == str(tiny["base"])
    assert env["LORA_ADAPTERS"] == "support=/data/adapters/support"
    assert "app" not in seen["metadata"]["labels"]
    patched = kube.get("Deployment", namespace, "user-tgi")["spec"]["template"]
    assert {e["name"]: e.get("value") for e in patched["spec"]["containers"][0]["env"]}["LORA_ADAPTERS"] == \
        "support=/data/adapters/support"
    assert kube.get("Deployment", namespace, "chat-tgi-canary") is None
    assert generate(kube, namespace, "user-tgi", "support") != generate(kube, namespace, "user-tgi", None)


def test_delete_removes_what_it_created_and_restores_a_referenced_deployment(platform, namespace, operator, kube,
                                                                              tiny, store):
    good = store("good", tiny["good"])
    apply(platform, user_tgi(tiny, namespace))
    original = kube.get("Deployment", namespace, "user-tgi")["spec"]["template"]
    apply(platform, ad_body(platform, namespace, tiny, [{"name": "support", **good}], store,
                            # a loaded machine (2 shared cores) can take over 120 s to start the server
                            server={"deploymentRef": {"name": "user-tgi"}, "startupTimeoutSeconds": 300},
                            strategy={"type": "Direct"}))
    status = wait_status(kube, namespace, finished(1), timeout=420)
    assert status["phase"] == "Ready", status
    patched = kube.get("Deployment", namespace, "user-tgi")["spec"]["template"]
    env = {e["name"]: e.get("value") for e in patched["spec"]["containers"][0]["env"]}
    assert env["LORA_ADAPTERS"] == "support=/data/adapters/support"
    assert generate(kube, namespace, "user-tgi", "support") != generate(kube, namespace, "user-tgi", None)

    # Someone else keeps writing to the Deployment meanwhile (its controller writes its status, a
    # user or GitOps tool its metadata): the restore must not fail on the resourceVersion it read.
    stop, writes = threading.Event(), [0]

    def writer(i: int) -> None:
        while not stop.is_set():
            kube.merge_patch("Deployment", namespace, "user-tgi",
                             {"metadata": {"annotations": {f"example.com/touched-{i}": str(writes[0])}}})
            writes[0] += 1

    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(4)]
    for thread in threads:
        thread.start()
    while writes[0] < 3:
        time.sleep(0.01)
    before, started = writes[0], time.monotonic()
    try:
        platform.kubectl("-n", namespace, "delete", "adapterdeployment", "chat", "--wait=true", timeout=60)
        during = writes[0] - before
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    took = time.monotonic() - started
    # kopf's default handler backoff was 60 s: a single conflict held the finalizer that long
    assert during > 0 and took < 15, f"the delete took {took:.1f} s with {during} concurrent writes"
    restored = kube.get("Deployment", namespace, "user-tgi")
    assert restored is not None and restored["spec"]["template"] == original


# Specs whose children the API server refuses (issue 15, bug 4): an empty image, an empty env var
# name. (A dotted or 60-character name, refused by older API servers, serves on 1.36: Service
# names may be DNS subdomains.) Admission refuses more of them over time; either way the user is
# told what is wrong, and never left with an empty status.
REFUSED_CHILDREN = [
    ("empty-image", "chat", {"server": {"image": ""}}, "image"),
    ("empty-env-name", "chat", {"server": {"env": {"": "x"}}}, "env"),
]


@pytest.mark.parametrize("case, name, spec, field", REFUSED_CHILDREN, ids=[r[0] for r in REFUSED_CHILDREN])
def test_a_child_the_api_server_refuses_is_reported_not_retried(platform, namespace, operator, kube, tiny, store,
                                                                case, name, spec, field):
    good = store("good", tiny["good"])
    body = ad_body(platform, namespace, tiny, [{"name": "support", **good}], store, strategy={"type": "Direct"},
                   gates={"requireOfflinePass": False}, **spec)
    body["metadata"]["name"] = name
    applied = platform.kubectl("apply", "-f", "-", input=json.dumps(body), check=False)
    if "created" not in applied:  # admission refused it up front, naming the field
        assert field.split(".")[-1] in applied, applied
        return
    status = wait_status(kube, namespace, lambda s: s.get("phase") == "Failed", timeout=60, name=name)
    assert field in status["message"] and "refused" in status["message"], status
    progressing = next(c for c in status["conditions"] if c["type"] == "Progressing")
    assert progressing["reason"] == "RejectedByAPIServer"
    time.sleep(3)  # permanent until the spec changes: one Event, no retries
    assert events(kube, namespace).count("RejectedByAPIServer") == 1
