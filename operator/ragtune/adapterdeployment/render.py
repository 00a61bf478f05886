"""Pure functions: an AdapterDeployment + its resolved adapters -> server Deployment, Service,
canary, the stable server's PodDisruptionBudget, the vLLM desired-set ConfigMap and the
online-evaluation Job (plain dicts in the Kubernetes wire form).

TGI takes its adapters at start (`LORA_ADAPTERS` + the fetch init container), so the set is part of
the pod template and a new set rolls the pods. vLLM's pod template does not depend on the set at
all: the set lives in a ConfigMap (`adapter_set_configmap`) that the adapter-sync sidecar
(`ragtune adapters sync`) loads at start and on every change, without a restart.

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
from ragtune.api.pods import (
    ADAPTER_SET_KEY,
    ADAPTER_SET_MOUNT,
    ENV_TERMINATION_PATH,
    EVAL_CONFIG_ENV,
    SYNC_READY_PATH,
    SYNC_STATUS_PATH,
    SYNC_STATUS_PORT_NAME,
    AdapterSetDocument,
    DesiredAdapter,
)

from .backends import TGI, ServingBackend, backend_for

FETCH_CONTAINER = "ragtune-fetch-adapters"
SYNC_CONTAINER = "ragtune-adapter-sync"
ADAPTER_SET_VOLUME = "ragtune-adapter-set"
VLLM_LOOPBACK = "localhost"
"""Where vLLM listens in its pod: the pod's own loopback in Kubernetes. On the local platform,
which has no network namespaces, a pod's /etc/hosts maps `localhost` to the pod's own 127.x IP
(still loopback, but other local processes can reach it: see docs/architecture.md)."""
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


def _server_suffix(backend: str) -> str:
    # TGI keeps the name it always had, so the objects of existing AdapterDeployments stay theirs
    # across an operator upgrade; other backends get a backend-neutral one.
    return "-tgi" if backend == "tgi" else "-server"


def stable_name(ad_name: str, backend: str = "tgi") -> str:
    return workloads.child_name(ad_name, _server_suffix(backend))


def canary_name(ad_name: str, backend: str = "tgi") -> str:
    return workloads.child_name(ad_name, _server_suffix(backend) + "-canary")


def adapter_set_name(ad_name: str, canary: bool) -> str:
    """The desired-set ConfigMap of a vLLM server (stable or canary)."""
    return workloads.child_name(ad_name, "-server-canary-adapters" if canary else "-server-adapters")


def sidecar_ports(port: int) -> tuple[int, int]:
    """(vLLM's loopback port, the sidecar's status port): fixed, but never the serving port."""
    return (8000 if port != 8000 else 8001), (9090 if port != 9090 else 9091)


def eval_job_name(ad_name: str, generation: int, candidate: str = "") -> str:
    """`<ad>-eval-g<generation>`, and `-<candidate>` for a followed run's rollout (same generation)."""
    return workloads.child_name(ad_name, f"-eval-g{generation}" + (f"-{candidate}" if candidate else ""))


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


def _labels(owner: Owner, track: str, backend: str = "tgi") -> dict[str, str]:
    return {LABEL_NAME: backend, LABEL_INSTANCE: workloads.label_value(owner.name), LABEL_MANAGED_BY: MANAGED_BY,
            LABEL_AD: workloads.label_value(owner.name), LABEL_TRACK: track}


def _selector(owner: Owner, track: str, backend: str = "tgi") -> dict[str, str]:
    selector = {LABEL_AD: workloads.label_value(owner.name), LABEL_TRACK: track}
    if backend != "tgi":  # TGI's (immutable) selector stays as it was; the others name their backend
        selector[LABEL_NAME] = backend
    return selector


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
    dynamic = backend.name == "vllm"
    # vLLM: on loopback only, behind the sidecar's proxy on the serving port; its adapters come
    # from the sidecar, not from the args (so the template does not depend on the set).
    listen_port = sidecar_ports(server.port)[0] if dynamic else server.port
    args = backend.args(model_id=model_id, served_name=spec.base_model.id,
                        revision=None if local else spec.base_model.revision,
                        adapters={} if dynamic else
                        {a.name: f"{ADAPTER_ROOT}/{a.name}" for a in sorted(adapters, key=lambda a: a.name)},
                        port=listen_port)
    ours = {e["name"] for e in env}
    env += [{"name": k, "value": v} for k, v in sorted(server.env.items()) if k not in ours]
    if spec.base_model.token_secret_ref and not local:
        ref = spec.base_model.token_secret_ref
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    limits: dict[str, str] = {"memory": server.memory}
    if server.gpus:
        limits[server.gpu_resource_name] = str(server.gpus)
    # vLLM's probes reach it through the sidecar's proxy (the kubelet probes the pod IP).
    probe = {"httpGet": {"path": backend.health_path, "port": server.port}}
    container = {
        "name": backend.container_name,
        "image": server.image_ref,
        **({"args": args} if args else {}),
        "env": env,
        **({} if dynamic else {"ports": [{"name": "http", "containerPort": server.port, "protocol": "TCP"}]}),
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


def sync_container(spec: AdapterDeploymentSpec, operator_image: str,
                   backend: Optional[ServingBackend] = None) -> dict[str, Any]:
    """The vLLM pod's sidecar: keeps the server's adapters equal to the desired-set ConfigMap
    (verified like the fetcher, loaded on loopback), serves the pod's serving port (a proxy that
    refuses vLLM's LoRA endpoints) and the pod's status document; ready once the set is loaded."""
    backend = backend or backend_for(spec.server)
    port = spec.server.port
    vllm_port, status_port = sidecar_ports(port)
    model_id, local = model_location(spec)
    args = ["adapters", "sync", "--desired", f"{ADAPTER_SET_MOUNT}/{ADAPTER_SET_KEY}",
            "--server", f"http://{VLLM_LOOPBACK}:{vllm_port}", "--dest", ADAPTER_ROOT,
            "--listen", f"$(POD_IP):{port}", "--status-listen", f"$(POD_IP):{status_port}",
            "--expect-base-model", f"{spec.base_model.id}@{spec.base_model.revision}",
            "--max-rank", str(backend.max_lora_rank), "--interval", "1"]
    for module in backend.supported_target_modules:
        args += ["--allowed-target-module", module]
    if not backend.supported_target_modules and local:
        args += ["--target-modules-from-base", model_id]
    status_probe = {"httpGet": {"path": SYNC_READY_PATH, "port": status_port}}
    return {
        "name": SYNC_CONTAINER,
        "image": operator_image,
        "command": ["ragtune"],
        "args": args,
        "env": workloads.s3_env(spec.s3) + [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"},
                  {"name": SYNC_STATUS_PORT_NAME, "containerPort": status_port, "protocol": "TCP"}],
        "volumeMounts": [{"name": DATA_VOLUME, "mountPath": "/data"},
                         {"name": ADAPTER_SET_VOLUME, "mountPath": ADAPTER_SET_MOUNT, "readOnly": True}],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        # Ready = the desired set is loaded (and vLLM answers): a Service routes only to pods serving it.
        "readinessProbe": {**status_probe, "periodSeconds": 2, "timeoutSeconds": 2, "failureThreshold": 2},
        "livenessProbe": {"httpGet": {"path": SYNC_STATUS_PATH, "port": status_port}, "periodSeconds": 10,
                          "timeoutSeconds": 5, "failureThreshold": 6},
        "securityContext": workloads.restricted_container(read_only_root=True),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def adapter_set_configmap(spec: AdapterDeploymentSpec, adapters: list[ResolvedAdapter], owner: Owner, *,
                          canary: bool, generation: int) -> dict[str, Any]:
    """The desired set of a vLLM server (stable or canary), read by its pods' sidecars."""
    ordered = sorted(adapters, key=lambda a: a.name)
    doc = AdapterSetDocument(generation=generation, digest=adapter_set_digest(ordered),
                             adapters=[DesiredAdapter(name=a.name, uri=a.uri, sha256=a.sha256) for a in ordered])
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": adapter_set_name(owner.name, canary), "namespace": owner.namespace,
                     "labels": _labels(owner, "canary" if canary else "stable", spec.server.backend.value),
                     "annotations": {ANNOTATION_DIGEST: doc.digest, ANNOTATION_ADAPTERS: ",".join(short_set(ordered)),
                                     ANNOTATION_AD_NAME: owner.name},
                     "ownerReferences": [owner.reference()]},
        "data": {ADAPTER_SET_KEY: json.dumps(doc.to_wire(), sort_keys=True)},
    }


def configmap_set_digest(cm: Optional[dict[str, Any]]) -> Optional[str]:
    """The set digest a desired-set ConfigMap holds (None: no ConfigMap)."""
    if cm is None:
        return None
    return ((cm.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_DIGEST)


def pod_template(spec: AdapterDeploymentSpec, adapters: list[ResolvedAdapter], owner: Owner, track: str,
                 operator_image: str, backend: Optional[ServingBackend] = None) -> dict[str, Any]:
    server = spec.server
    backend = backend or backend_for(server)
    volumes = [
        {"name": DATA_VOLUME, "emptyDir": {}},
        {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": server.shm_size}},
    ]
    annotations = {ANNOTATION_DIGEST: adapter_set_digest(adapters),
                   ANNOTATION_ADAPTERS: ",".join(sorted(short_set(adapters))),
                   ANNOTATION_AD_NAME: owner.name}
    if backend.name == "vllm":
        # Nothing here depends on the adapter set: a new set changes the ConfigMap, not the pods.
        init = [fetch_container(spec, [], operator_image, backend)] if \
            (spec.base_model.uri or "").startswith("s3://") else []
        containers = [server_container(spec, [], backend), sync_container(spec, operator_image, backend)]
        volumes.append({"name": ADAPTER_SET_VOLUME, "configMap": {
            "name": adapter_set_name(owner.name, track == "canary"), "items": [{"key": ADAPTER_SET_KEY,
                                                                               "path": ADAPTER_SET_KEY}]}})
        annotations = {ANNOTATION_AD_NAME: owner.name}
    else:
        init = [fetch_container(spec, adapters, operator_image, backend)]
        containers = [server_container(spec, adapters, backend)]
    pod_spec: dict[str, Any] = {
        **({"initContainers": init} if init else {}),
        "containers": containers,
        "volumes": volumes,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": workloads.restricted_pod(SERVER_USER),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
    }
    if server.node_selector:
        pod_spec["nodeSelector"] = dict(server.node_selector)
    if server.tolerations:
        pod_spec["tolerations"] = [t.to_wire() for t in server.tolerations]
    if server.affinity is not None:
        # Empty lists left out: the pod spec reads as written (an empty list means the same).
        pod_spec["affinity"] = server.affinity.model_dump(by_alias=True, exclude_defaults=True, mode="json")
    if server.priority_class_name:
        pod_spec["priorityClassName"] = server.priority_class_name
    return {
        "metadata": {"labels": _labels(owner, track, backend.name), "annotations": annotations},
        "spec": pod_spec,
    }


def deployment(spec: AdapterDeploymentSpec, adapters: list[ResolvedAdapter], owner: Owner, *,
               canary: bool, operator_image: str, backend: Optional[ServingBackend] = None) -> dict[str, Any]:
    track = "canary" if canary else "stable"
    kind = spec.server.backend.value
    name = canary_name(owner.name, kind) if canary else stable_name(owner.name, kind)
    replicas = spec.strategy.canary_replicas if canary else spec.server.replicas
    annotations = {ANNOTATION_AD_NAME: owner.name}
    if kind == "tgi":  # vLLM's set is in its ConfigMap
        annotations[ANNOTATION_DIGEST] = adapter_set_digest(adapters)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": owner.namespace, "labels": _labels(owner, track, kind),
                     "annotations": annotations, "ownerReferences": [owner.reference()]},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": _selector(owner, track, kind)},
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
    kind = spec.server.backend.value
    name = canary_name(owner.name, kind) if canary else stable_name(owner.name, kind)
    port = spec.server.port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": owner.namespace, "labels": _labels(owner, track, kind),
                     "ownerReferences": [owner.reference()]},
        "spec": {
            "selector": selector or _selector(owner, track, kind),
            # port == targetPort: the local platform resolves Services straight to a pod IP.
            "ports": [{"name": "http", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


def pod_disruption_budget(spec: AdapterDeploymentSpec, owner: Owner) -> Optional[dict[str, Any]]:
    """The stable server's PodDisruptionBudget: voluntary disruptions (node drains) take its pods
    one at a time. None where there is nothing to protect: one replica (a budget would block
    every drain, or allow the only pod to go), or a `deploymentRef` server (not ragtune's pods)."""
    if spec.server.deployment_ref is not None or spec.server.replicas <= 1:
        return None
    kind = spec.server.backend.value
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": stable_name(owner.name, kind), "namespace": owner.namespace,
                     "labels": _labels(owner, "stable", kind), "annotations": {ANNOTATION_AD_NAME: owner.name},
                     "ownerReferences": [owner.reference()]},
        "spec": {
            "selector": {"matchLabels": _selector(owner, "stable", kind)},
            # One pod at a time whatever the replica count (a rolling update adds one first).
            "maxUnavailable": 1,
            # A crash-looping pod serves nothing: never let it block a drain.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
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


def canary_from_existing(existing: dict[str, Any], spec: AdapterDeploymentSpec, adapters: list[ResolvedAdapter],
                         owner: Owner, operator_image: str) -> dict[str, Any]:
    """The canary of a `deploymentRef` server: the referenced Deployment's own pod template (the
    user's image, base weights, resources, placement, service account and env, without the serving
    set patched in) with the candidate set patched in as on the stable (`patch_existing_template`),
    in ragtune's canary Deployment. Its pods carry ragtune's canary labels only: the user's labels
    would put them behind the user's Service (user traffic on an unevaluated set) and under the
    referenced Deployment's selector."""
    canary = deployment(spec, adapters, owner, canary=True, operator_image=operator_image)
    template = restore_existing_template(existing["spec"]["template"])
    meta = template.setdefault("metadata", {})
    meta["labels"] = dict(canary["spec"]["template"]["metadata"]["labels"])
    meta["annotations"] = {**(meta.get("annotations") or {}), ANNOTATION_AD_NAME: owner.name}
    template = patch_existing_template(template, spec, adapters, operator_image)
    del template["metadata"]["annotations"][ANNOTATION_ORIGINAL]  # ours, deleted whole: nothing to restore
    canary["spec"]["template"] = with_template_hash(template)
    return canary


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
             operator_image: str, candidate: str = "") -> dict[str, Any]:
    """The Job that queries the canary and writes its verdict to the termination message
    (named by `eval_job_name`)."""
    gate = spec.gates.online
    labels = {LABEL_NAME: "ragtune-online-eval", LABEL_INSTANCE: workloads.label_value(owner.name),
              LABEL_MANAGED_BY: MANAGED_BY, LABEL_AD: workloads.label_value(owner.name)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": eval_job_name(owner.name, generation, candidate), "namespace": owner.namespace,
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
                    # The server's priority (an evaluation preempted mid-gate rolls the canary back);
                    # not its placement: a CPU client needs no GPU node.
                    **({"priorityClassName": spec.server.priority_class_name}
                       if spec.server.priority_class_name else {}),
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
