"""Pure functions: an AdapterDeployment + its resolved adapters -> TGI Deployment, Service,
canary and the online-evaluation Job (plain dicts in the Kubernetes wire form).

Nothing here talks to the API server, so every object the operator writes can be unit-tested.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Optional

from ragtune import workloads
from ragtune.api.adapterdeployment import AdapterDeploymentSpec, ResolvedAdapter
from ragtune.api.keys import ANNOTATION_ADAPTER_SET as ANNOTATION_DIGEST
from ragtune.api.keys import ANNOTATION_ADAPTERDEPLOYMENT as ANNOTATION_AD_NAME
from ragtune.api.keys import (
    ANNOTATION_ADAPTERS,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_TRACK,
    MANAGED_BY,
)
from ragtune.api.keys import ANNOTATION_ORIGINAL_TEMPLATE as ANNOTATION_ORIGINAL
from ragtune.api.keys import ANNOTATION_TEMPLATE_HASH as ANNOTATION_TEMPLATE
from ragtune.api.keys import LABEL_ADAPTERDEPLOYMENT as LABEL_AD
from ragtune.api.pods import ENV_TERMINATION_PATH, EVAL_CONFIG_ENV

from .backends import TGI, ServingBackend, backend_for

FETCH_CONTAINER = "ragtune-fetch-adapters"
DATA_VOLUME = "ragtune-data"
SHM_VOLUME = "ragtune-shm"
ADAPTER_ROOT = "/data/adapters"
BASE_DIR = "/data/base"
TERMINATION_GRACE_SECONDS = 120


@dataclass(frozen=True)
class Owner:
    """What ownerReferences need: the AdapterDeployment's identity."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return workloads.owner_reference("AdapterDeployment", self.name, self.uid)


def stable_name(ad_name: str) -> str:
    return workloads.child_name(ad_name, "-tgi")


def canary_name(ad_name: str) -> str:
    return workloads.child_name(ad_name, "-tgi-canary")


def eval_job_name(ad_name: str, generation: int) -> str:
    return workloads.child_name(ad_name, f"-eval-g{generation}")


def service_url(name: str, namespace: str, port: int) -> str:
    return f"http://{name}.{namespace}.svc:{port}"


def adapter_set_digest(adapters: list[ResolvedAdapter]) -> str:
    """Digest of the adapter set (names + manifest digests): the pod template annotation that
    makes any change to the set roll the pods."""
    text = "\n".join(f"{a.name}={a.sha256}" for a in sorted(adapters, key=lambda a: a.name))
    return hashlib.sha256(text.encode()).hexdigest()


def template_hash(template: dict[str, Any]) -> str:
    """Hash of a pod template as rendered (without this annotation): comparing it with the live
    object's tells whether the template must be rewritten, without diffing API-server defaults."""
    clean = copy.deepcopy(template)
    clean.get("metadata", {}).get("annotations", {}).pop(ANNOTATION_TEMPLATE, None)
    return hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest()[:20]


def with_template_hash(template: dict[str, Any]) -> dict[str, Any]:
    template.setdefault("metadata", {}).setdefault("annotations", {})[ANNOTATION_TEMPLATE] = template_hash(template)
    return template


def live_template_hash(obj: Optional[dict[str, Any]]) -> Optional[str]:
    if obj is None:
        return None
    return ((obj["spec"]["template"].get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_TEMPLATE)


def short_set(adapters: list[ResolvedAdapter]) -> list[str]:
    """`name@sha256-prefix` of each adapter (history, annotations)."""
    return [f"{a.name}@{a.sha256[:12]}" for a in adapters]


def _labels(owner: Owner, track: str) -> dict[str, str]:
    return {LABEL_NAME: "tgi", LABEL_INSTANCE: workloads.label_value(owner.name), LABEL_MANAGED_BY: MANAGED_BY,
            LABEL_AD: workloads.label_value(owner.name), LABEL_TRACK: track}


def _selector(owner: Owner, track: str) -> dict[str, str]:
    return {LABEL_AD: workloads.label_value(owner.name), LABEL_TRACK: track}


SERVER_USER = 1000
"""TGI's image runs as UID 1000; the fetcher and evaluator run as the same user (shared /data)."""


def model_location(spec: AdapterDeploymentSpec) -> tuple[str, bool]:
    """(MODEL_ID, weights are local). `file://` = weights on the node (local platform);
    `s3://` = downloaded by the init container into /data/base; none = Hub id."""
    uri = spec.base_model.uri
    if uri and uri.startswith("file://"):
        return uri[len("file://"):].rstrip("/") or "/", True
    if uri:
        return BASE_DIR, True
    return spec.base_model.id, False


def fetch_container(spec: AdapterDeploymentSpec, adapters: list[ResolvedAdapter], operator_image: str,
                    backend: Optional[ServingBackend] = None) -> dict[str, Any]:
    """The init container: download and verify every adapter (and S3 base weights) before the server starts."""
    backend = backend or backend_for(spec.server)
    args = ["adapters", "fetch", "--dest", ADAPTER_ROOT,
            "--expect-base-model", f"{spec.base_model.id}@{spec.base_model.revision}",
            "--max-rank", str(backend.max_lora_rank)]
    for module in backend.supported_target_modules:
        args += ["--allowed-target-module", module]
    model_id, local = model_location(spec)
    if not backend.supported_target_modules and local:
        args += ["--target-modules-from-base", model_id]
    for a in sorted(adapters, key=lambda a: a.name):
        args += ["--adapter", f"{a.name}={a.uri}#{a.sha256}"]
    if spec.base_model.uri and spec.base_model.uri.startswith("s3://"):
        args += ["--base-model-uri", spec.base_model.uri, "--base-dest", BASE_DIR]
    return {
        "name": FETCH_CONTAINER,
        "image": operator_image,
        "command": ["ragtune"],
        "args": args,
        "env": workloads.s3_env(spec.s3) + [{"name": ENV_TERMINATION_PATH, "value": "/dev/termination-log"}],
        "volumeMounts": [{"name": DATA_VOLUME, "mountPath": "/data"}],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": workloads.restricted_container(read_only_root=True),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def server_container(spec: AdapterDeploymentSpec, adapters: list[ResolvedAdapter],
                     backend: Optional[ServingBackend] = None) -> dict[str, Any]:
    backend = backend or backend_for(spec.server)
    server = spec.server
    model_id, local = model_location(spec)
    env = backend.env(
        model_id=model_id,
        revision=None if local else spec.base_model.revision,
        adapters={a.name: f"{ADAPTER_ROOT}/{a.name}" for a in sorted(adapters, key=lambda a: a.name)},
        port=server.port,
        offline=local,
        limits={"MAX_INPUT_TOKENS": server.max_input_tokens, "MAX_TOTAL_TOKENS": server.max_total_tokens,
                "MAX_CONCURRENT_REQUESTS": server.max_concurrent_requests},
    )
    args = backend.args(model_id=model_id, served_name=spec.base_model.id,
                        revision=None if local else spec.base_model.revision,
                        adapters={a.name: f"{ADAPTER_ROOT}/{a.name}" for a in sorted(adapters, key=lambda a: a.name)},
                        port=server.port)
    ours = {e["name"] for e in env}
    env += [{"name": k, "value": v} for k, v in sorted(server.env.items()) if k not in ours]
    if spec.base_model.token_secret_ref and not local:
        ref = spec.base_model.token_secret_ref
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    limits: dict[str, str] = {"memory": server.memory}
    if server.gpus:
        limits[server.gpu_resource_name] = str(server.gpus)
    probe = {"httpGet": {"path": backend.health_path, "port": server.port}}
    container = {
        "name": backend.container_name,
        "image": server.image_ref,
        **({"args": args} if args else {}),
        "env": env,
        "ports": [{"name": "http", "containerPort": server.port, "protocol": "TCP"}],
        "volumeMounts": [{"name": DATA_VOLUME, "mountPath": "/data"},
                         {"name": SHM_VOLUME, "mountPath": "/dev/shm"}],
        "resources": {"requests": {"cpu": server.cpu, "memory": server.memory}, "limits": limits},
        # Weights and adapters load before the port opens: a generous startup probe, then
        # quick readiness/liveness once it is up.
        "startupProbe": {**probe, "periodSeconds": 1, "timeoutSeconds": 1,
                         "failureThreshold": server.startup_timeout_seconds},
        "readinessProbe": {**probe, "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 2},
        "livenessProbe": {**probe, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6},
        # TGI and vLLM write caches under HOME and /tmp: the root filesystem stays writable.
        "securityContext": workloads.restricted_container(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    return container


def pod_template(spec: AdapterDeploymentSpec, adapters: list[ResolvedAdapter], owner: Owner, track: str,
                 operator_image: str, backend: Optional[ServingBackend] = None) -> dict[str, Any]:
    server = spec.server
    pod_spec: dict[str, Any] = {
        "initContainers": [fetch_container(spec, adapters, operator_image, backend)],
        "containers": [server_container(spec, adapters, backend)],
        "volumes": [
            {"name": DATA_VOLUME, "emptyDir": {}},
            {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": server.shm_size}},
        ],
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": workloads.restricted_pod(SERVER_USER),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
    }
    if server.node_selector:
        pod_spec["nodeSelector"] = dict(server.node_selector)
    if server.tolerations:
        pod_spec["tolerations"] = [t.to_wire() for t in server.tolerations]
    return {
        "metadata": {
            "labels": _labels(owner, track),
            "annotations": {ANNOTATION_DIGEST: adapter_set_digest(adapters),
                            ANNOTATION_ADAPTERS: ",".join(sorted(short_set(adapters))),
                            ANNOTATION_AD_NAME: owner.name},
        },
        "spec": pod_spec,
    }


def deployment(spec: AdapterDeploymentSpec, adapters: list[ResolvedAdapter], owner: Owner, *,
               canary: bool, operator_image: str, backend: Optional[ServingBackend] = None) -> dict[str, Any]:
    track = "canary" if canary else "stable"
    name = canary_name(owner.name) if canary else stable_name(owner.name)
    replicas = spec.strategy.canary_replicas if canary else spec.server.replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": owner.namespace, "labels": _labels(owner, track),
                     "annotations": {ANNOTATION_DIGEST: adapter_set_digest(adapters), ANNOTATION_AD_NAME: owner.name},
                     "ownerReferences": [owner.reference()]},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": _selector(owner, track)},
            # Never drop below the serving capacity: old pods keep serving until new ones are ready.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": spec.server.startup_timeout_seconds + 120,
            "template": with_template_hash(pod_template(spec, adapters, owner, track, operator_image, backend)),
        },
    }


def service(spec: AdapterDeploymentSpec, owner: Owner, *, canary: bool,
            selector: Optional[dict[str, str]] = None) -> dict[str, Any]:
    track = "canary" if canary else "stable"
    name = canary_name(owner.name) if canary else stable_name(owner.name)
    port = spec.server.port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": owner.namespace, "labels": _labels(owner, track),
                     "ownerReferences": [owner.reference()]},
        "spec": {
            "selector": selector or _selector(owner, track),
            # port == targetPort: the local platform resolves Services straight to a pod IP.
            "ports": [{"name": "http", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


# --- An existing TGI Deployment (spec.server.deploymentRef) ------------------------------------


def _server_container_index(containers: list[dict[str, Any]]) -> int:
    for i, c in enumerate(containers):
        if "text-generation-inference" in c.get("image", "") or c.get("name") == TGI.container_name:
            return i
    return 0


def patch_existing_template(template: dict[str, Any], spec: AdapterDeploymentSpec,
                            adapters: list[ResolvedAdapter], operator_image: str,
                            backend: ServingBackend = TGI) -> dict[str, Any]:
    """The pod template of a user's TGI Deployment with our fields set: the fetch init
    container, a /data/adapters volume, `LORA_ADAPTERS`/`CUDA_GRAPHS` and the set digest.
    Only those fields change; the original values are kept in an annotation for restore."""
    template = copy.deepcopy(template)
    original = template.get("metadata", {}).get("annotations", {}).get(ANNOTATION_ORIGINAL)
    if original is None:
        original = json.dumps(_owned_fields(template), sort_keys=True)
    template = restore_existing_template(template) if ANNOTATION_ORIGINAL in \
        template.get("metadata", {}).get("annotations", {}) else template
    pod = template.setdefault("spec", {})
    containers = pod.setdefault("containers", [])
    server = containers[_server_container_index(containers)]
    wanted = {"LORA_ADAPTERS": ",".join(f"{a.name}={ADAPTER_ROOT}/{a.name}"
                                        for a in sorted(adapters, key=lambda a: a.name)),
              "CUDA_GRAPHS": "0"}
    server["env"] = [e for e in server.get("env", []) if e.get("name") not in wanted] + \
        [{"name": k, "value": v} for k, v in wanted.items()]
    server["volumeMounts"] = server.get("volumeMounts", []) + [{"name": DATA_VOLUME, "mountPath": ADAPTER_ROOT}]
    fetch = fetch_container(spec, adapters, operator_image, backend)
    fetch["volumeMounts"] = [{"name": DATA_VOLUME, "mountPath": ADAPTER_ROOT}]
    # The user's Deployment brings its own base weights: fetch adapters only.
    if "--base-model-uri" in fetch["args"]:
        fetch["args"] = fetch["args"][: fetch["args"].index("--base-model-uri")]
    pod["initContainers"] = pod.get("initContainers", []) + [fetch]
    pod["volumes"] = pod.get("volumes", []) + [{"name": DATA_VOLUME, "emptyDir": {}}]
    annotations = template.setdefault("metadata", {}).setdefault("annotations", {})
    annotations[ANNOTATION_DIGEST] = adapter_set_digest(adapters)
    annotations[ANNOTATION_ORIGINAL] = original
    return with_template_hash(template)


def _owned_fields(template: dict[str, Any]) -> dict[str, Any]:
    containers = template.get("spec", {}).get("containers", [])
    server = containers[_server_container_index(containers)] if containers else {}
    env = {e["name"]: e.get("value") for e in server.get("env", []) if e.get("name") in ("LORA_ADAPTERS", "CUDA_GRAPHS")}
    return {"env": env, "digest": template.get("metadata", {}).get("annotations", {}).get(ANNOTATION_DIGEST)}


def restore_existing_template(template: dict[str, Any]) -> dict[str, Any]:
    """Undo `patch_existing_template`: remove our init container, volume and mounts, put the
    original `LORA_ADAPTERS`/`CUDA_GRAPHS` back (or remove them if they were absent)."""
    template = copy.deepcopy(template)
    annotations = template.setdefault("metadata", {}).setdefault("annotations", {})
    raw = annotations.pop(ANNOTATION_ORIGINAL, None)
    if raw is None:
        return template
    original = json.loads(raw)
    pod = template.setdefault("spec", {})
    pod["initContainers"] = [c for c in pod.get("initContainers", []) if c.get("name") != FETCH_CONTAINER]
    if not pod["initContainers"]:
        del pod["initContainers"]
    pod["volumes"] = [v for v in pod.get("volumes", []) if v.get("name") != DATA_VOLUME]
    if not pod["volumes"]:
        del pod["volumes"]
    containers = pod.get("containers", [])
    if containers:
        server = containers[_server_container_index(containers)]
        server["volumeMounts"] = [m for m in server.get("volumeMounts", []) if m.get("name") != DATA_VOLUME]
        if not server["volumeMounts"]:
            del server["volumeMounts"]
        env = [e for e in server.get("env", []) if e.get("name") not in ("LORA_ADAPTERS", "CUDA_GRAPHS")]
        env += [{"name": k, "value": v} for k, v in original["env"].items()]
        server["env"] = env
        if not env:
            del server["env"]
    annotations.pop(ANNOTATION_TEMPLATE, None)
    if original.get("digest"):
        annotations[ANNOTATION_DIGEST] = original["digest"]
    else:
        annotations.pop(ANNOTATION_DIGEST, None)
    if not annotations:
        del template["metadata"]["annotations"]
    return template


# --- Online evaluation Job -------------------------------------------------------------------


def eval_job(spec: AdapterDeploymentSpec, owner: Owner, generation: int, config: dict[str, Any],
             operator_image: str) -> dict[str, Any]:
    """The Job that queries the canary and writes its verdict to the termination message."""
    gate = spec.gates.online
    labels = {LABEL_NAME: "ragtune-online-eval", LABEL_INSTANCE: workloads.label_value(owner.name),
              LABEL_MANAGED_BY: MANAGED_BY, LABEL_AD: workloads.label_value(owner.name)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": eval_job_name(owner.name, generation), "namespace": owner.namespace,
                     "labels": labels, "annotations": {ANNOTATION_AD_NAME: owner.name},
                     "ownerReferences": [owner.reference()]},
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": gate.timeout_seconds,
            "ttlSecondsAfterFinished": 3600,
            "template": {
                "metadata": {"labels": labels, "annotations": {ANNOTATION_AD_NAME: owner.name}},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": workloads.restricted_pod(SERVER_USER),
                    "containers": [{
                        "name": "online-eval",
                        "image": operator_image,
                        "command": ["ragtune"],
                        "args": ["eval", "online"],
                        "env": workloads.s3_env(spec.s3) + [
                            {"name": EVAL_CONFIG_ENV, "value": json.dumps(config, separators=(",", ":"))},
                            {"name": ENV_TERMINATION_PATH, "value": "/dev/termination-log"},
                        ],
                        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
                        "securityContext": workloads.restricted_container(read_only_root=True),
                        "terminationMessagePolicy": "FallbackToLogsOnError",
                    }],
                },
            },
        },
    }
