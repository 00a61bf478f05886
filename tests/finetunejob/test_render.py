"""FineTuneJob -> batch/v1 Job rendering."""

from __future__ import annotations

from ragtune.api.finetunejob import FineTuneJobSpec
from ragtune.api.pods import EXIT_PERMANENT
from ragtune.finetunejob.render import (
    job_name,
    label_value,
    render_job,
    run_control_patch,
    spec_hash,
)

from .helpers import META, RUN_ID, env_of, object_env, spec

IMAGE = "ghcr.io/ragtune/ragtune-trainer:test"


def render(s: FineTuneJobSpec | None = None) -> dict:
    return render_job(META, s or spec(), RUN_ID, IMAGE)


def pod_spec(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def container(job: dict) -> dict:
    return pod_spec(job)["containers"][0]


def test_job_identity_labels_and_owner():
    job = render()
    meta = job["metadata"]
    assert meta["name"] == "demo-01234567-g1"
    assert meta["namespace"] == "team-a"
    for labels in (meta["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert labels["app.kubernetes.io/name"] == "ragtune-trainer"
        assert labels["app.kubernetes.io/managed-by"] == "ragtune"
        assert labels["ragtune.dev/finetunejob"] == "demo"
        assert labels["ragtune.dev/generation"] == "1"
        assert labels["ragtune.dev/run-id"] == RUN_ID
    assert meta["ownerReferences"] == [{
        "apiVersion": "ragtune.dev/v1alpha1", "kind": "FineTuneJob", "name": "demo",
        "uid": META["uid"], "controller": True, "blockOwnerDeletion": True,
    }]
    assert job["spec"]["template"]["metadata"]["annotations"]["ragtune.dev/finetunejob-name"] == "demo"


def test_pod_contract_env_and_secret_refs():
    job = render()
    env = env_of(job)
    obj = object_env(job)
    assert obj["kind"] == "FineTuneJob" and obj["metadata"] == META
    assert FineTuneJobSpec.model_validate(obj["spec"]) == spec()
    assert env["RAGTUNE_RUN_ID"]["value"] == RUN_ID
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio.local:9000"
    assert env["AWS_REGION"]["value"] == "us-east-1"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3-credentials", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3-credentials", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert "AWS_SESSION_TOKEN" not in env
    assert container(job)["command"] == ["ragtune", "train", "--in-cluster"]
    assert container(job)["image"] == IMAGE


def test_trainer_is_told_the_image_it_runs():
    """`manifest.image` comes from RAGTUNE_IMAGE: it must name the container's own image."""
    assert env_of(render())["RAGTUNE_IMAGE"]["value"] == container(render())["image"] == IMAGE
    custom = spec()
    custom.resources.image = "registry.example/trainer:custom"
    job = render(custom)
    assert env_of(job)["RAGTUNE_IMAGE"]["value"] == container(job)["image"] == "registry.example/trainer:custom"


def test_custom_secret_keys_session_token_and_hf_token():
    s = spec(**{"s3.credentialsSecretRef": {"name": "creds", "accessKeyIdKey": "id", "secretAccessKeyKey": "key",
                                            "sessionTokenKey": "token"},
                "baseModel.tokenSecretRef": {"name": "hf", "key": "tok"}})
    env = env_of(render(s))
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "creds", "key": "id"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "creds", "key": "key"}
    assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "creds", "key": "token"}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "tok"}


def test_no_credentials_secret_means_ambient_identity_and_no_endpoint():
    s = FineTuneJobSpec.model_validate({"baseModel": {"id": "m"}, "dataset": {"train": "s3://data/x"},
                                        "output": {"uri": "s3://out/y"}})
    env = env_of(render(s))
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"} & set(env)


def test_restricted_security_context_and_volumes():
    job = render()
    pod = pod_spec(job)
    c = container(job)
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts == {"/tmp": "tmp", "/cache": "cache", "/dev/shm": "dshm"}
    # Every cache a library writes to points at a writable volume.
    env = env_of(job)
    assert env["HOME"]["value"] == "/tmp" and env["HF_HOME"]["value"].startswith("/cache/")


def test_gpu_limits_and_cpu_only():
    c = container(render(spec(**{"resources.gpus": 2, "resources.shmSize": "2Gi"})))
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert c["resources"]["requests"] == {"cpu": "4", "memory": "32Gi"}
    c = container(render(spec(**{"resources.gpus": 0})))
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    c = container(render(spec(**{"resources.gpuResourceName": "amd.com/gpu"})))
    assert c["resources"]["limits"]["amd.com/gpu"] == 1


def test_placement_and_run_control():
    s = spec(**{
        "resources.nodeSelector": {"gpu": "a100"},
        "resources.tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "resources.priorityClassName": "training",
        "resources.image": "registry.local/trainer:dev",
        "backoffLimit": 5, "activeDeadlineSeconds": 3600, "suspend": True,
    })
    job = render(s)
    pod = pod_spec(job)
    assert pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "training"
    assert container(job)["image"] == "registry.local/trainer:dev"
    assert job["spec"]["backoffLimit"] == 5
    assert job["spec"]["activeDeadlineSeconds"] == 3600
    assert job["spec"]["suspend"] is True
    assert "activeDeadlineSeconds" not in render()["spec"]


def test_pod_failure_policy_fails_fast_on_permanent_exit_code():
    rules = render()["spec"]["podFailurePolicy"]["rules"]
    assert rules == [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                     {"action": "FailJob",
                      "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [EXIT_PERMANENT]}}]
    assert render()["spec"]["podReplacementPolicy"] == "Failed"


def test_names_fit_kubernetes_limits_and_are_deterministic():
    long = "a" * 60
    name = job_name(long, RUN_ID)
    assert len(name) <= 63 and name.endswith(RUN_ID) and name == job_name(long, RUN_ID)
    assert job_name("b" + long[1:], RUN_ID) != name
    assert label_value("x" * 100) != label_value("x" * 99 + "y")
    assert len(label_value("x" * 100)) <= 63
    assert label_value("short") == "short"


def test_spec_hash_ignores_run_control_and_defaults():
    base = spec_hash(spec())
    assert spec_hash(spec(suspend=True, backoffLimit=7, activeDeadlineSeconds=600)) == base
    # Explicit default values (the API server fills them in) do not count as changes.
    assert spec_hash(spec(**{"lora.r": 16, "method": "qlora"})) == base
    assert spec_hash(spec(**{"lora.r": 8})) != base
    assert spec_hash(spec(**{"dataset.train": "s3://data/other.jsonl"})) != base
    assert spec_hash(spec(**{"resources.tolerations": [{"key": "gpu", "operator": "Exists"}]})) != base


def test_run_control_patch():
    job_spec = {"suspend": False, "backoffLimit": 2}
    assert run_control_patch(job_spec, spec()) == {}
    assert run_control_patch(job_spec, spec(suspend=True)) == {"suspend": True}
    assert run_control_patch(job_spec, spec(backoffLimit=4, activeDeadlineSeconds=900)) == {
        "backoffLimit": 4, "activeDeadlineSeconds": 900}

