"""The vLLM backend without a cluster: admission of `spec.server.backend: vllm` settings, the
rendered Deployment (vLLM on loopback, the adapter-sync sidecar, a template that does not depend
on the set) and desired-set ConfigMap, and the fetcher's compatibility checks against the base
model's weights."""

from __future__ import annotations

import json
import struct
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from ragtune.adapterdeployment import render
from ragtune.adapterdeployment.backends import TGI, VllmBackend, backend_for
from ragtune.api.adapterdeployment import DEFAULT_VLLM_IMAGE, AdapterDeploymentSpec, ResolvedAdapter
from ragtune.api.pods import AdapterSetDocument
from ragtune.pods import adapter_sync, fetch

IMAGE = "ghcr.io/ragtune/ragtune-operator:0.1.0"
OWNER = render.Owner("chat", "team-a", "0b5c7d1e-0000-4000-8000-000000000001")
ADAPTERS = [ResolvedAdapter(name="support", uri="s3://models/runs/r1/", sha256="a" * 64),
            ResolvedAdapter(name="legal", uri="s3://models/runs/r2/", sha256="b" * 64)]


def make_spec(server: dict | None = None, adapters: int = 1, **overrides) -> AdapterDeploymentSpec:
    wire = {
        "baseModel": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "12fd25f"},
        "server": {"backend": "vllm", **(server or {})},
        "adapters": [{"name": f"a{i}", "uri": f"s3://models/runs/r{i}/", "sha256": "a" * 64} for i in range(adapters)],
        "s3": {"endpoint": "http://minio.storage:9000", "credentialsSecretRef": {"name": "s3-credentials"}},
    }
    wire.update(overrides)
    return AdapterDeploymentSpec.model_validate(wire)


# -- admission --

def test_tgi_stays_the_default_backend_with_its_image():
    spec = AdapterDeploymentSpec.model_validate({**make_spec().model_dump(by_alias=True, exclude_none=True),
                                                 "server": {}})
    assert spec.server.backend.value == "tgi" and backend_for(spec.server) is TGI
    assert spec.server.image_ref.startswith("ghcr.io/huggingface/text-generation-inference:")


def test_vllm_defaults_and_settings():
    spec = make_spec({"vllm": {"maxLoras": 2, "maxCpuLoras": 8, "maxLoraRank": 32, "dtype": "bfloat16",
                               "maxModelLen": 2048, "extraArgs": ["--enforce-eager", "--gpu-memory-utilization=0.85"]}})
    assert spec.server.image_ref == DEFAULT_VLLM_IMAGE
    backend = backend_for(spec.server)
    assert isinstance(backend, VllmBackend) and backend.max_lora_rank == 32
    assert spec.server.vllm_settings.capacity == 8
    assert make_spec().server.vllm_settings.capacity == 4  # maxCpuLoras defaults to maxLoras (4)


@pytest.mark.parametrize("server, match", [
    ({"vllm": {"maxLoraRank": 24}}, "maxLoraRank"),
    ({"vllm": {"maxLoras": 4, "maxCpuLoras": 2}}, r"maxCpuLoras \(2\) must be >= maxLoras \(4\)"),
    ({"vllm": {"extraArgs": ["--enforce-eager --port 1"]}}, "no shell strings"),
    ({"vllm": {"extraArgs": ["--port=9000"]}}, r"--port is set by ragtune"),
    ({"vllm": {"extraArgs": ["--enable-lora"]}}, r"--enable-lora is set by ragtune"),
    ({"vllm": {"dtype": "int4"}}, "dtype"),
    ({"maxTotalTokens": 4096}, "max_total_tokens are TGI settings"),
    ({"backend": "tgi", "vllm": {}}, "vllm settings need backend: vllm"),
    ({"deploymentRef": {"name": "mine"}}, "supported for backend: tgi only"),
])
def test_bad_vllm_settings_are_refused_naming_the_field(server, match):
    with pytest.raises(ValidationError, match=match):
        make_spec(server)


def test_more_adapters_than_the_server_holds_is_refused_naming_the_adapter_and_the_limit():
    make_spec({"vllm": {"maxLoras": 2, "maxCpuLoras": 10}}, adapters=10)
    with pytest.raises(ValidationError, match=r"adapter 'a2' does not fit: 3 adapters, the vLLM server holds 2"):
        make_spec({"vllm": {"maxLoras": 2}}, adapters=3)


# -- rendering --

def test_vllm_deployment_runs_the_server_on_loopback_behind_the_sidecar_with_lora_limits_and_probes():
    spec = make_spec({"vllm": {"maxLoras": 2, "maxCpuLoras": 4, "maxLoraRank": 64, "dtype": "float16",
                               "maxModelLen": 4096, "extraArgs": ["--enforce-eager"]}, "gpus": 1})
    dep = render.deployment(spec, ADAPTERS, OWNER, canary=False, operator_image=IMAGE)
    assert dep["metadata"]["name"] == "chat-server"  # backend-neutral (TGI keeps chat-tgi)
    pod = dep["spec"]["template"]["spec"]
    server, sidecar = pod["containers"]
    assert server["name"] == "vllm" and server["image"] == DEFAULT_VLLM_IMAGE
    assert "command" not in server  # the image's ENTRYPOINT is `vllm serve`
    args = server["args"]
    assert args[0] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    flags = {a: b for a, b in zip(args, args[1:]) if a.startswith("--") and not b.startswith("--")}
    assert flags["--served-model-name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert flags["--revision"] == "12fd25f"
    assert (flags["--max-loras"], flags["--max-cpu-loras"], flags["--max-lora-rank"]) == ("2", "4", "64")
    # loopback only, on an internal port: the serving port belongs to the sidecar's proxy
    assert (flags["--dtype"], flags["--max-model-len"], flags["--host"], flags["--port"]) == \
        ("float16", "4096", "localhost", "8000")
    assert "ports" not in server
    assert "--enable-lora" in args and args[-1] == "--enforce-eager"
    assert "--lora-modules" not in args  # the set comes from the ConfigMap, through the sidecar
    env = {e["name"]: e["value"] for e in server["env"]}
    assert env["VLLM_NO_USAGE_STATS"] == "1" and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "LORA_ADAPTERS" not in env
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):  # through the proxy: the kubelet probes the pod IP
        assert server[kind]["httpGet"] == {"path": "/health", "port": 8080}
    assert server["startupProbe"]["periodSeconds"] * server["startupProbe"]["failureThreshold"] >= 1800
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert "initContainers" not in pod  # a Hub base: nothing to fetch before the server starts
    for c in pod["containers"]:
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False  # the sidecar needs no API access

    # the sidecar: desired set from the mounted ConfigMap, verified against vLLM's limits, proxy on
    # the serving port, status document on its own port, ready only once the set is loaded
    assert sidecar["name"] == render.SYNC_CONTAINER and sidecar["image"] == IMAGE
    sargs = sidecar["args"]
    sflags = {a: b for a, b in zip(sargs, sargs[1:]) if a.startswith("--")}
    assert sargs[:2] == ["adapters", "sync"]
    assert sflags["--desired"] == "/etc/ragtune/adapter-set/adapters.json"
    assert sflags["--server"] == "http://localhost:8000"
    assert (sflags["--listen"], sflags["--status-listen"]) == ("$(POD_IP):8080", "$(POD_IP):9090")
    assert (sflags["--max-rank"], sflags["--expect-base-model"]) == ("64", "HuggingFaceTB/SmolLM2-135M-Instruct@12fd25f")
    assert {p["name"]: p["containerPort"] for p in sidecar["ports"]} == {"http": 8080, "ragtune-sync": 9090}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 9090}
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    senv = {e["name"]: e for e in sidecar["env"]}
    assert senv["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert "secretKeyRef" in senv["AWS_SECRET_ACCESS_KEY"]["valueFrom"]  # the pod's own S3 credentials
    smounts = {m["mountPath"]: m for m in sidecar["volumeMounts"]}
    cm_volume = volumes[smounts["/etc/ragtune/adapter-set"]["name"]]
    assert smounts["/etc/ragtune/adapter-set"]["readOnly"] is True
    assert cm_volume["configMap"]["name"] == "chat-server-adapters"
    assert "subPath" not in smounts["/etc/ragtune/adapter-set"]  # a subPath mount would never see updates


def test_the_vllm_pod_template_does_not_depend_on_the_adapter_set():
    spec = make_spec()
    one = render.deployment(spec, ADAPTERS[:1], OWNER, canary=False, operator_image=IMAGE)
    two = render.deployment(spec, ADAPTERS, OWNER, canary=False, operator_image=IMAGE)
    none = render.deployment(spec, [], OWNER, canary=False, operator_image=IMAGE)
    assert one == two == none, "a new set must not change the Deployment (that would restart the pods)"
    canary = render.deployment(spec, ADAPTERS, OWNER, canary=True, operator_image=IMAGE)
    assert canary["metadata"]["name"] == "chat-server-canary"
    volumes = {v["name"]: v for v in canary["spec"]["template"]["spec"]["volumes"]}
    assert volumes[render.ADAPTER_SET_VOLUME]["configMap"]["name"] == "chat-server-canary-adapters"
    # TGI: the set is in the template (LORA_ADAPTERS), so a new set rolls the pods
    tgi = make_spec({"backend": "tgi"})
    assert render.deployment(tgi, ADAPTERS[:1], OWNER, canary=False, operator_image=IMAGE) != \
        render.deployment(tgi, ADAPTERS, OWNER, canary=False, operator_image=IMAGE)


def test_the_desired_set_configmap_pins_every_adapter_by_digest():
    cm = render.adapter_set_configmap(make_spec(), ADAPTERS, OWNER, canary=False, generation=7)
    assert cm["metadata"]["name"] == "chat-server-adapters" and cm["metadata"]["namespace"] == "team-a"
    assert cm["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid  # garbage-collected with the AD
    doc = AdapterSetDocument.model_validate_json(cm["data"]["adapters.json"])
    assert doc.generation == 7 and doc.digest == render.adapter_set_digest(ADAPTERS)
    assert [(a.name, a.uri, a.sha256) for a in doc.adapters] == \
        [("legal", "s3://models/runs/r2/", "b" * 64), ("support", "s3://models/runs/r1/", "a" * 64)]
    assert render.configmap_set_digest(cm) == doc.digest
    # the sidecar reads exactly this document
    desired = adapter_sync.read_desired_text(cm["data"]["adapters.json"], "adapters.json")
    assert desired.adapters == {"legal": ("s3://models/runs/r2/", "b" * 64), "support": ("s3://models/runs/r1/", "a" * 64)}
    assert desired.digest == doc.digest and desired.generation == 7


def test_s3_base_weights_are_still_fetched_and_verified_before_vllm_starts():
    spec = make_spec(baseModel={"id": "tiny", "revision": "1", "uri": "s3://models/base/tiny/"})
    pod = render.deployment(spec, ADAPTERS, OWNER, canary=False, operator_image=IMAGE)["spec"]["template"]["spec"]
    init = pod["initContainers"][0]
    assert init["name"] == render.FETCH_CONTAINER
    assert "--base-model-uri" in init["args"] and "--adapter" not in init["args"]
    sidecar = pod["containers"][1]
    assert sidecar["args"][sidecar["args"].index("--target-modules-from-base") + 1] == "/data/base"


def test_the_sidecar_ports_never_take_the_serving_port():
    assert render.sidecar_ports(8080) == (8000, 9090)
    assert render.sidecar_ports(8000) == (8001, 9090)
    assert render.sidecar_ports(9090) == (8000, 9091)


def test_vllm_fetcher_reads_target_modules_from_local_base_weights():
    spec = make_spec(baseModel={"id": "tiny", "revision": "1", "uri": "file:///models/tiny"})
    init = render.fetch_container(spec, ADAPTERS, IMAGE)
    assert init["args"][init["args"].index("--target-modules-from-base") + 1] == "/models/tiny"
    assert "--allowed-target-module" not in init["args"]
    server = render.server_container(spec, ADAPTERS)
    assert server["args"][0] == "/models/tiny" and "--revision" not in server["args"]
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in server["env"]
    tgi = make_spec({"backend": "tgi"})
    assert "--target-modules-from-base" not in render.fetch_container(tgi, ADAPTERS, IMAGE)["args"]


def test_the_backend_is_part_of_the_template_so_switching_it_rolls_the_pods():
    vllm = render.deployment(make_spec(), ADAPTERS, OWNER, canary=False, operator_image=IMAGE)
    tgi = render.deployment(make_spec({"backend": "tgi"}), ADAPTERS, OWNER, canary=False, operator_image=IMAGE)
    assert render.live_template_hash(vllm) != render.live_template_hash(tgi)


# -- the fetcher's checks against the base model --

def _safetensors(path, tensors: dict[str, list[int]]) -> None:
    header = json.dumps({name: {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}
                         for name, shape in tensors.items()}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)


def test_base_target_modules_are_the_per_layer_linear_weights(tmp_path):
    _safetensors(tmp_path / "model.safetensors", {
        "model.embed_tokens.weight": [100, 8], "lm_head.weight": [100, 8], "model.norm.weight": [8],
        "model.layers.0.self_attn.qkv_proj.weight": [24, 8], "model.layers.0.mlp.down_proj.weight": [8, 16],
        "model.layers.0.input_layernorm.weight": [8], "transformer.h.1.attn.c_attn.weight": [8, 24],
        "model.layers.0.self_attn.o_proj.bias": [8, 8],
    })
    assert fetch.base_target_modules(tmp_path) == {"qkv_proj", "down_proj", "c_attn"}
    with pytest.raises(fetch.FetchError, match="no \\*.safetensors"):
        fetch.base_target_modules(tmp_path / "missing")


def test_vllm_rank_and_module_limits_refuse_an_adapter_naming_it():
    allowed = {"q_proj", "v_proj"}
    fetch.check_adapter_config("ok", {"r": 16, "target_modules": ["q_proj"]}, allowed, 16)
    with pytest.raises(fetch.FetchError, match=r"adapter big: LoRA rank 32 outside 1\.\.16"):
        fetch.check_adapter_config("big", {"r": 32, "target_modules": ["q_proj"]}, allowed, 16)
    with pytest.raises(fetch.FetchError, match=r"adapter odd: target modules \['w_gate'\] are not supported"):
        fetch.check_adapter_config("odd", {"r": 8, "target_modules": ["q_proj", "w_gate"]}, allowed, 16)


def test_fetch_run_allows_exactly_the_base_models_modules(tmp_path, monkeypatch):
    base = tmp_path / "base"
    base.mkdir()
    _safetensors(base / "model.safetensors", {"model.layers.0.self_attn.q_proj.weight": [8, 8]})
    seen = {}

    def fake_fetch(storage, name, uri, digest, dest, *, expect_base, allowed_modules, max_rank, base_files=None):
        seen.update(allowed=allowed_modules, max_rank=max_rank)
        return fetch.FetchedAdapter(name=name, sha256=digest, files=0, bytes=0)

    monkeypatch.setattr(fetch, "fetch_adapter", fake_fetch)
    args = SimpleNamespace(dest=str(tmp_path / "out"), expect_base_model=None, adapter=[f"a=s3://b/r/#{'c' * 64}"],
                           base_model_uri=None, base_dest=None, allowed_target_module=None,
                           target_modules_from_base=str(base), max_rank=16)
    assert fetch.run(args).outcome == "Succeeded"
    assert seen == {"allowed": {"q_proj"}, "max_rank": 16}
