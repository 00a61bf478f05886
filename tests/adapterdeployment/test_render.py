"""Rendering of TGI Deployments, Services and the evaluation Job (pure functions)."""

from __future__ import annotations

import copy

import pytest

from ragtune.adapterdeployment import render
from ragtune.api.adapterdeployment import AdapterDeploymentSpec, ResolvedAdapter

IMAGE = "ghcr.io/ragtune/ragtune-operator:0.1.0"
OWNER = render.Owner("chat", "team-a", "0b5c7d1e-0000-4000-8000-000000000001")


def make_spec(**overrides) -> AdapterDeploymentSpec:
    wire = {
        "baseModel": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "12fd25f"},
        "adapters": [{"name": "support", "uri": "s3://models/runs/r1/", "sha256": "a" * 64}],
        "s3": {"endpoint": "http://minio.storage:9000", "credentialsSecretRef": {"name": "s3-credentials"}},
    }
    wire.update(overrides)
    return AdapterDeploymentSpec.model_validate(wire)


ADAPTERS = [ResolvedAdapter(name="support", uri="s3://models/runs/r1/", sha256="a" * 64),
            ResolvedAdapter(name="legal", uri="s3://models/runs/r2/", sha256="b" * 64)]


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_stable_deployment_has_tgi_settings_and_restricted_security():
    dep = render.deployment(make_spec(), ADAPTERS, OWNER, canary=False, operator_image=IMAGE)
    assert dep["metadata"]["name"] == "chat-tgi"
    assert dep["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    pod = dep["spec"]["template"]["spec"]
    tgi = pod["containers"][0]
    env = env_of(tgi)
    assert env["MODEL_ID"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert env["REVISION"] == "12fd25f"
    assert env["LORA_ADAPTERS"] == "legal=/data/adapters/legal,support=/data/adapters/support"
    assert env["CUDA_GRAPHS"] == "0"
    assert env["PORT"] == "8080"
    assert "HF_HUB_OFFLINE" not in env  # weights come from the Hub
    assert tgi["resources"]["limits"]["nvidia.com/gpu"] == "1"
    mounts = {m["mountPath"]: m["name"] for m in tgi["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}
    assert "emptyDir" in volumes[mounts["/data"]]
    assert pod["terminationGracePeriodSeconds"] > 90
    # generous startup probe (30 min by default), then readiness/liveness on /health
    startup = tgi["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800
    assert tgi["readinessProbe"]["httpGet"]["path"] == "/health"
    assert tgi["livenessProbe"]["httpGet"]["path"] == "/health"
    assert pod["securityContext"]["runAsNonRoot"] is True
    for c in pod["containers"] + pod["initContainers"]:
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False


def test_init_container_fetches_every_adapter_with_pinned_digest_and_secret_refs():
    dep = render.deployment(make_spec(), ADAPTERS, OWNER, canary=False, operator_image=IMAGE)
    init = dep["spec"]["template"]["spec"]["initContainers"][0]
    assert init["image"] == IMAGE
    assert init["command"] == ["ragtune"] and init["args"][:2] == ["adapters", "fetch"]
    args = init["args"]
    pairs = [args[i + 1] for i, a in enumerate(args) if a == "--adapter"]
    assert pairs == ["legal=s3://models/runs/r2/#" + "b" * 64, "support=s3://models/runs/r1/#" + "a" * 64]
    assert args[args.index("--expect-base-model") + 1] == "HuggingFaceTB/SmolLM2-135M-Instruct@12fd25f"
    env = env_of(init)
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3-credentials", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_ENDPOINT_URL_S3"] == "http://minio.storage:9000"
    # no secret material anywhere in the rendered object
    assert "value" not in [e for e in init["env"] if e["name"] == "AWS_SECRET_ACCESS_KEY"][0]


def test_gpu_limit_omitted_for_cpu_servers_and_local_weights_are_offline():
    spec = make_spec(server={"gpus": 0}, baseModel={"id": "tiny", "revision": "r1", "uri": "file:///models/tiny"})
    dep = render.deployment(spec, ADAPTERS[:1], OWNER, canary=False, operator_image=IMAGE)
    tgi = dep["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in tgi["resources"]["limits"]
    env = env_of(tgi)
    assert env["MODEL_ID"] == "/models/tiny"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert "REVISION" not in env


def test_s3_base_weights_are_downloaded_by_the_init_container():
    spec = make_spec(baseModel={"id": "tiny", "revision": "r1", "uri": "s3://models/base/tiny/"})
    dep = render.deployment(spec, ADAPTERS[:1], OWNER, canary=False, operator_image=IMAGE)
    init = dep["spec"]["template"]["spec"]["initContainers"][0]
    assert init["args"][init["args"].index("--base-model-uri") + 1] == "s3://models/base/tiny/"
    assert env_of(dep["spec"]["template"]["spec"]["containers"][0])["MODEL_ID"] == "/data/base"


def test_any_change_of_the_adapter_set_changes_the_template():
    a = render.deployment(make_spec(), ADAPTERS, OWNER, canary=False, operator_image=IMAGE)
    b = render.deployment(make_spec(), list(reversed(ADAPTERS)), OWNER, canary=False, operator_image=IMAGE)
    assert render.live_template_hash(a) == render.live_template_hash(b)  # order does not matter
    changed = [ADAPTERS[0], ADAPTERS[1].model_copy(update={"sha256": "c" * 64})]
    c = render.deployment(make_spec(), changed, OWNER, canary=False, operator_image=IMAGE)
    assert render.live_template_hash(a) != render.live_template_hash(c)
    assert a["spec"]["template"]["metadata"]["annotations"][render.ANNOTATION_DIGEST] != \
        c["spec"]["template"]["metadata"]["annotations"][render.ANNOTATION_DIGEST]


def test_canary_and_stable_are_separate_and_services_select_their_track():
    spec = make_spec(server={"port": 8081})
    canary = render.deployment(spec, ADAPTERS, OWNER, canary=True, operator_image=IMAGE)
    stable = render.deployment(spec, ADAPTERS, OWNER, canary=False, operator_image=IMAGE)
    assert canary["metadata"]["name"] == "chat-tgi-canary"
    assert canary["spec"]["selector"] != stable["spec"]["selector"]
    svc = render.service(spec, OWNER, canary=True)
    assert svc["metadata"]["name"] == "chat-tgi-canary"
    assert svc["spec"]["selector"] == canary["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["port"] == svc["spec"]["ports"][0]["targetPort"] == 8081


def test_existing_deployment_patch_changes_only_our_fields_and_restores():
    original = {
        "metadata": {"labels": {"app": "tgi"}},
        "spec": {"containers": [
            {"name": "tgi", "image": "ghcr.io/huggingface/text-generation-inference:3.3.6",
             "env": [{"name": "MODEL_ID", "value": "m"}, {"name": "LORA_ADAPTERS", "value": "old=/x"}],
             "volumeMounts": [{"name": "models", "mountPath": "/data"}]},
            {"name": "sidecar", "image": "busybox"}],
            "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}]},
    }
    spec = make_spec(server={"deploymentRef": {"name": "tgi"}})
    patched = render.patch_existing_template(original, spec, ADAPTERS, IMAGE)
    tgi = patched["spec"]["containers"][0]
    env = env_of(tgi)
    assert env["LORA_ADAPTERS"] == "legal=/data/adapters/legal,support=/data/adapters/support"
    assert env["MODEL_ID"] == "m" and env["CUDA_GRAPHS"] == "0"
    assert patched["spec"]["containers"][1] == original["spec"]["containers"][1]
    assert [c["name"] for c in patched["spec"]["initContainers"]] == [render.FETCH_CONTAINER]
    assert "--base-model-uri" not in patched["spec"]["initContainers"][0]["args"]
    # patching twice (a later rollout) is the same as patching once with the new set
    again = render.patch_existing_template(patched, spec, ADAPTERS[:1], IMAGE)
    assert len(again["spec"]["initContainers"]) == 1
    assert env_of(again["spec"]["containers"][0])["LORA_ADAPTERS"] == "support=/data/adapters/support"
    restored = render.restore_existing_template(again)
    assert restored == original


def test_a_deployment_ref_canary_runs_the_referenced_template_with_the_candidate_set_under_our_labels_only():
    user = {
        "metadata": {"labels": {"app": "tgi"}, "annotations": {"example.com/owner": "team-a"}},
        "spec": {"serviceAccountName": "tgi", "nodeSelector": {"gpu": "h100"},
                 "containers": [{"name": "tgi", "image": "ghcr.io/huggingface/text-generation-inference:3.3.6",
                                 "env": [{"name": "MODEL_ID", "value": "/models/base"}],
                                 "resources": {"limits": {"nvidia.com/gpu": "1"}}}]},
    }
    spec = make_spec(server={"deploymentRef": {"name": "tgi"}}, strategy={"canaryReplicas": 2})
    # the referenced Deployment serves `support` (patched in by an earlier promotion)
    existing = {"spec": {"template": render.patch_existing_template(user, spec, ADAPTERS[:1], IMAGE)}}
    canary = render.canary_from_existing(existing, spec, ADAPTERS, OWNER, IMAGE)
    assert canary["metadata"]["name"] == "chat-tgi-canary" and canary["spec"]["replicas"] == 2
    assert canary["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    template = canary["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert "app" not in labels and canary["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert labels[render.LABEL_TRACK] == "canary"
    pod = template["spec"]
    assert pod["serviceAccountName"] == "tgi" and pod["nodeSelector"] == {"gpu": "h100"}
    (tgi,) = pod["containers"]
    assert tgi["image"] == user["spec"]["containers"][0]["image"] and tgi["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    env = env_of(tgi)
    assert env["MODEL_ID"] == "/models/base"
    assert env["LORA_ADAPTERS"] == "legal=/data/adapters/legal,support=/data/adapters/support"
    assert [c["name"] for c in pod["initContainers"]] == [render.FETCH_CONTAINER]  # one, with the candidate set
    annotations = template["metadata"]["annotations"]
    assert annotations["example.com/owner"] == "team-a"
    assert annotations[render.ANNOTATION_DIGEST] == render.adapter_set_digest(ADAPTERS)
    assert render.ANNOTATION_ORIGINAL not in annotations  # nothing of the canary is restored: it is deleted
    # the same inputs render the same canary (a tick adopts it instead of replacing it)
    assert render.canary_from_existing(existing, spec, ADAPTERS, OWNER, IMAGE) == canary


def test_eval_job_carries_config_and_credentials_by_reference():
    spec = make_spec()
    job = render.eval_job(spec, OWNER, 3, {"canaryUrl": "http://x"}, IMAGE)
    assert job["metadata"]["name"] == "chat-eval-g3"
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0
    c = pod["containers"][0]
    assert c["args"] == ["eval", "online"]
    env = env_of(c)
    assert env[render.EVAL_CONFIG_ENV] == '{"canaryUrl":"http://x"}'
    assert "secretKeyRef" in env["AWS_SECRET_ACCESS_KEY"]


@pytest.mark.parametrize("mutate", [
    lambda s: s["server"].update(replicas=3),
    lambda s: s["server"].update(image="ghcr.io/huggingface/text-generation-inference:3.3.7"),
    lambda s: s["server"]["env"].update(MAX_BATCH_PREFILL_TOKENS="4096"),
])
def test_server_changes_change_the_template_or_replicas(mutate):
    wire = make_spec().to_wire()
    before = render.deployment(make_spec(), ADAPTERS, OWNER, canary=False, operator_image=IMAGE)
    changed = copy.deepcopy(wire)
    mutate(changed)
    after = render.deployment(AdapterDeploymentSpec.model_validate(changed), ADAPTERS, OWNER, canary=False,
                              operator_image=IMAGE)
    assert (render.live_template_hash(before), before["spec"]["replicas"]) != \
        (render.live_template_hash(after), after["spec"]["replicas"])
