"""Values that would pass admission and break or mislead later (issue 14 item 2) are refused by the
models and by the real API server, naming the field; the ordinary values next to them pass.

Decisions (see docs/architecture.md): `file://` URIs are refused in the cluster (CRD, and the
operator validates with the IN_CLUSTER context) and kept for `ragtune train -f`, except an
AdapterDeployment's `baseModel.uri` (weights inside the serving container: read there, never
copied out); S3 keys
with `.`/`..` segments or control characters, reserved bucket prefixes/suffixes, images that are not
image references, regions outside `[A-Za-z0-9_-]`, node selector keys/values and extended-resource
names Kubernetes would reject, empty or malformed Secret key names and zero CPU/memory/shm are
refused; `spec.server.env` may not set what ragtune sets nor carry secret-looking names."""

from __future__ import annotations

import copy

import pytest
from pydantic import ValidationError

from ragtune.api.adapterdeployment import RESERVED_SERVER_ENV, AdapterDeploymentSpec
from ragtune.api.common import IN_CLUSTER
from ragtune.api.finetunejob import FineTuneJobSpec

from .test_ssrf_spellings import dry_run_many

FTJ = {"baseModel": {"id": "tiny/model"}, "dataset": {"train": "s3://data/train.jsonl"},
       "output": {"uri": "s3://out/runs"}, "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"},
       "s3": {"credentialsSecretRef": {"name": "s3-credentials"}}}
AD = {"baseModel": {"id": "tiny/model"}, "adapters": [{"name": "a1", "fineTuneJobRef": {"name": "ftj"}}],
      "server": {"gpus": 0}}
DIGEST = "a" * 64


def _set(spec: dict, path: str, value) -> dict:
    spec = copy.deepcopy(spec)
    node = spec
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node.setdefault(k, {})
    node[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value
    return spec


def ftj(path, value):
    return ("FineTuneJob", _set(FTJ, path, value), "spec." + path)


def ad(path, value, field=None):
    return ("AdapterDeployment", _set(AD, path, value), "spec." + (field or path))


REFUSED = {
    # file:// inside the cluster would read the pod's own filesystem
    "file-dataset": ftj("dataset.train", "file:///etc/passwd"),
    "file-eval": ftj("dataset.eval", "file:///var/run/secrets/kubernetes.io/serviceaccount/token"),
    "file-output": ftj("output.uri", "file:///tmp/out"),
    "file-base-model": ftj("baseModel.uri", "file:///models/tiny"),
    "file-adapter": ad("adapters.0", {"name": "a1", "uri": "file:///data/run/", "sha256": DIGEST}, "adapters[0].uri"),
    "file-eval-set": ad("gates.online.evalSetUri", "file:///etc/passwd"),
    # S3 keys with dot segments / control characters
    "key-dotdot": ftj("dataset.train", "s3://data/../other/train.jsonl"),
    "key-dotdot-end": ftj("output.uri", "s3://out/runs/.."),
    "key-dot": ftj("dataset.train", "s3://data/./train.jsonl"),
    "key-dotdot-adapter": ad("adapters.0", {"name": "a1", "uri": "s3://out/../x/", "sha256": DIGEST},
                             "adapters[0].uri"),
    "key-newline": ftj("dataset.train", "s3://data/train\n.jsonl"),
    "key-nul": ftj("output.uri", "s3://out/runs\x00x"),
    # reserved bucket names
    **{f"bucket-{b}": ftj("output.uri", f"s3://{b}/runs") for b in (
        "xn--bucket", "sthree-bucket", "sthree-configurator-x", "amzn-s3-demo-bucket", "bucket-s3alias",
        "bucket--ol-s3", "bucket.mrap", "bucket--x-s3", "bucket--table-s3")},
    # images
    **{f"image-{i}": ftj("resources.image", img) for i, img in enumerate((
        "evil image:1", "img;rm -rf /", "img$(id)", "img`id`", "img|nc", "img&&x", "img:tag with space",
        "Registry/UPPER/path", "img\n", "-flag", "img:", "img@sha256:short", "ghcr.io//x", " img"))},
    "server-image": ad("server.image", "ghcr.io/x/tgi:1 --inject"),
    # regions
    **{f"region-{i}": ftj("s3.region", r) for i, r in enumerate((
        "us-east-1\nX-Injected: 1", "us east 1", "us-east-1;", "", "-us", "us/east", "x" * 65))},
    "region-ad": ad("s3.region", "eu-west-1\r\n"),
    # node selectors and extended resources
    **{f"selector-key-{i}": ftj("resources.nodeSelector", {k: "x"}) for i, k in enumerate((
        "bad key", "-leading", "trailing-", "a/b/c", "x" * 64, "Upper.Domain/name", "/name", "prefix/", "ke$y"))},
    "selector-value": ftj("resources.nodeSelector", {"gpu": "bad value!"}),
    "selector-value-long": ftj("resources.nodeSelector", {"gpu": "v" * 64}),
    "selector-ad": ad("server.nodeSelector", {"bad key": "x"}),
    **{f"resource-{i}": ftj("resources.gpuResourceName", r) for i, r in enumerate((
        "gpu", "nvidia.com/gpu/x", "kubernetes.io/gpu", "NVIDIA.com/gpu", "nvidia.com/", "nvidia.com/g pu",
        "x.kubernetes.io/gpu"))},
    "resource-ad": ad("server.gpuResourceName", "gpu"),
    # Secret key names
    "secret-key-empty": ftj("s3.credentialsSecretRef.accessKeyIdKey", ""),
    "secret-key-empty-2": ftj("s3.credentialsSecretRef.secretAccessKeyKey", ""),
    "secret-key-empty-3": ftj("s3.credentialsSecretRef.sessionTokenKey", ""),
    "secret-key-slash": ftj("s3.credentialsSecretRef.accessKeyIdKey", "bad/key"),
    "token-key-empty": ("FineTuneJob", _set(FTJ, "baseModel.tokenSecretRef", {"name": "hf", "key": ""}),
                        "spec.baseModel.tokenSecretRef.key"),
    # zero resources
    **{f"zero-{f}-{v}": ftj(f"resources.{f}", v) for f, v in (
        ("cpu", "0"), ("cpu", "0m"), ("cpu", "0.0"), ("memory", "0"), ("memory", "0Gi"), ("memory", "0.0Mi"),
        ("shmSize", "0"), ("shmSize", "00Ki"))},
    **{f"zero-ad-{f}": ad(f"server.{f}", "0") for f in ("cpu", "memory", "shmSize")},
    # server.env
    **{f"env-{n.lower()}": ad("server.env", {n: "x"}) for n in (
        "MODEL_ID", "LORA_ADAPTERS", "PORT", "REVISION", "HF_HUB_OFFLINE", "CUDA_GRAPHS", "HF_TOKEN",
        "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "RAGTUNE_S3_ALLOW_LOOPBACK", "OPENAI_API_KEY",
        "DB_PASSWORD", "MY_SECRET", "API_KEY", "GITHUB_TOKEN", "SERVICE_CREDENTIALS", "apikey")},
    "env-bad-name": ad("server.env", {"bad name": "x"}),
    "env-equals": ad("server.env", {"A=B": "x"}),
}

ACCEPTED = {
    "ok-plain": ("FineTuneJob", FTJ, None),
    "ok-keys": ftj("dataset.train", "s3://data/a.b/..x/train..jsonl"),
    "ok-bucket-dots": ftj("output.uri", "s3://my.bucket-1/runs/"),
    "ok-images": ftj("resources.image", "localhost:5000/ragtune/trainer:dev"),
    "ok-image-digest": ftj("resources.image", f"ghcr.io/ragtune/ragtune-trainer:0.1.0@sha256:{'b' * 64}"),
    "ok-image-plain": ftj("resources.image", "ragtune.test/fake-trainer:dev"),
    "ok-image-hub": ftj("resources.image", "ubuntu"),
    "ok-region": ftj("s3.region", "eu-central-1"),
    "ok-region-auto": ftj("s3.region", "auto"),
    "ok-selector": ftj("resources.nodeSelector", {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
                                                  "kubernetes.io/arch": "amd64", "pool": "", "a_b.c-d": "v"}),
    "ok-resource": ftj("resources.gpuResourceName", "amd.com/gpu"),
    "ok-quantities": ftj("resources", {"gpus": 0, "cpu": "500m", "memory": "512Mi", "shmSize": "0.5Gi"}),
    "ok-secret-keys": ftj("s3.credentialsSecretRef", {"name": "s3", "accessKeyIdKey": "access.key-id_1",
                                                      "secretAccessKeyKey": "secret"}),
    "ok-env": ad("server.env", {"MAX_BATCH_PREFILL_TOKENS": "4096", "TOKENIZERS_PARALLELISM": "false",
                                "LOG_LEVEL": "info", "MONKEY": "1", "KEYRING_BACKEND": "x"}),
    # The server loads its own model from a path inside its container; nothing is copied out.
    "ok-served-model-path": ad("baseModel.uri", "file:///models/tiny"),
    "ok-server": ad("server", {"gpus": 0, "cpu": "2", "memory": "8Gi", "image": "ghcr.io/huggingface/text-generation-inference:3.3.6"}),
}

MODELS = {"FineTuneJob": FineTuneJobSpec, "AdapterDeployment": AdapterDeploymentSpec}


def _loc(field: str) -> str:
    return field.removeprefix("spec.").replace("[", ".").replace("]", "")


@pytest.mark.parametrize("case", list(REFUSED))
def test_models_refuse_naming_the_field(case):
    kind, spec, field = REFUSED[case]
    with pytest.raises(ValidationError) as err:
        MODELS[kind].model_validate(spec, context=IN_CLUSTER)
    locs = [".".join(map(str, e["loc"])) for e in err.value.errors()]
    assert any(loc.startswith(_loc(field)) for loc in locs), (locs, field)


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_models_accept_ordinary_values(case):
    kind, spec, _ = ACCEPTED[case]
    MODELS[kind].model_validate(spec, context=IN_CLUSTER)


def test_file_uris_stay_available_to_local_runs():
    spec = FineTuneJobSpec.model_validate(_set(_set(FTJ, "dataset.train", "file:///data/train.jsonl"),
                                               "output.uri", "file:///data/out"))
    assert spec.dataset.train == "file:///data/train.jsonl"
    with pytest.raises(ValidationError, match="file:// URIs are for local runs only"):
        FineTuneJobSpec.model_validate(spec.to_wire(), context=IN_CLUSTER)


def test_every_variable_the_tgi_backend_sets_is_reserved():
    from ragtune.adapterdeployment.backends import TGI

    env = TGI.env(model_id="m", revision="r", adapters={"a": "/p"}, port=80, offline=True,
                  limits={"MAX_INPUT_TOKENS": 1, "MAX_TOTAL_TOKENS": 2, "MAX_CONCURRENT_REQUESTS": 3})
    assert {e["name"] for e in env} <= set(RESERVED_SERVER_ENV)


def _object_name(case: str) -> str:
    return "".join(c if c.isalnum() or c == "-" else "-" for c in case.lower())


@pytest.mark.platform
@pytest.mark.slow
def test_api_server_refuses_hostile_specs_naming_the_field(platform):
    platform.install_crds()
    objects = []
    for case, (kind, spec, _) in {**REFUSED, **ACCEPTED}.items():
        objects.append({"apiVersion": "ragtune.dev/v1alpha1", "kind": kind,
                        "metadata": {"name": _object_name(case), "namespace": "default"}, "spec": spec})
    by_name = dry_run_many(platform.kubeconfig, objects)
    assert len(by_name) == len(objects)  # one distinct object name per case
    verdicts = {case: by_name[_object_name(case)] for case in {**REFUSED, **ACCEPTED}}
    assert not any("metadata.name" in v for v in verdicts.values())
    wrong = [f"{name}: accepted" for name in REFUSED if not verdicts[name]]
    wrong += [f"{name}: error does not name {REFUSED[name][2]}: {verdicts[name][:300]}" for name in REFUSED
              if verdicts[name] and REFUSED[name][2] not in verdicts[name]]
    wrong += [f"{name}: refused: {verdicts[name][:400]}" for name in ACCEPTED if verdicts[name]]
    assert not wrong, "\n".join(wrong)
