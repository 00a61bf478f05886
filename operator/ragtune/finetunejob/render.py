"""FineTuneJob -> batch/v1 Job (pure functions; no Kubernetes calls).

Runs and generations: a run is one training Job with its own artifact folder (`runId`). A new
generation starts a new run only when the spec changed in a way that matters for what gets
trained (anything but the run-control fields below). Changing `suspend`, `backoffLimit` or
`activeDeadlineSeconds` patches the current run's Job instead: suspending and resuming must
continue the same run (it resumes from its checkpoints), and a longer deadline or more retries
should not throw away hours of training. `specHash` (an annotation on the Job) records which
spec a Job trains, so the controller can tell after a restart which Job is current.

Queues: with `spec.queueName` the Job carries Kueue's `kueue.x-k8s.io/queue-name` label and is
created suspended; Kueue owns `suspend` from then on (it starts the Job on admission and
suspends it to preempt it), so run control never patches it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Optional

from ragtune import workloads
from ragtune.api.finetunejob import FineTuneJobSpec
from ragtune.api.keys import (
    ANNOTATION_FINETUNEJOB,
    ANNOTATION_SPEC_HASH,
    GROUP_VERSION,
    LABEL_FINETUNEJOB,
    LABEL_GENERATION,
    LABEL_KUEUE_QUEUE_NAME,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_RUN_ID,
    MANAGED_BY,
)
from ragtune.api.pods import (
    DEFAULT_TERMINATION_PATH,
    ENV_IMAGE,
    ENV_OBJECT,
    ENV_RUN_ID,
    ENV_TERMINATION_PATH,
    EXIT_PERMANENT,
)

KIND = "FineTuneJob"
CONTAINER = "trainer"
RUN_USER = 65532
TERMINATION_GRACE_SECONDS = 120
"""Time for the trainer to write a last checkpoint to S3 after SIGTERM (suspend, eviction)."""

TRAINER_APP = "ragtune-trainer"

RUN_CONTROL_FIELDS = ("suspend", "backoffLimit", "activeDeadlineSeconds")
DISRUPTION_IGNORED = {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
"""The podFailurePolicy rule that keeps preemptions and evictions out of a Job's failure count."""
"""Spec fields applied to the running Job in place instead of starting a new run."""

MAX_NAME = workloads.MAX_LABEL


label_value = workloads.label_value
"""A FineTuneJob name as a label value (<= 63 chars; long names keep a hash suffix to stay unique)."""


def job_name(ftj_name: str, run_id: str, limit: int = MAX_NAME) -> str:
    """Deterministic Job name `<name>-<runId>`, shortened with a hash to fit 63 characters (the Job
    controller copies it into a pod label; an Indexed Job's pod hostnames `<job>-<index>` must fit
    too: `limit`)."""
    full = f"{ftj_name}-{run_id}"
    if len(full) <= limit:
        return full
    keep = limit - len(run_id) - 8
    return f"{ftj_name[:keep].rstrip('-.')}-{workloads.short_hash(ftj_name)}-{run_id}"


def spec_hash(spec: FineTuneJobSpec) -> str:
    """Digest of everything in the spec that changes what a run trains. Values equal to their
    defaults are left out, so an operator upgrade that adds a defaulted field does not restart
    every running training."""
    wire = spec.model_dump(by_alias=True, exclude_defaults=True, exclude_none=True, mode="json")
    for key in RUN_CONTROL_FIELDS:
        wire.pop(key, None)
    canonical = json.dumps(wire, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def owner_reference(meta: dict) -> dict:
    return workloads.owner_reference(KIND, meta["name"], meta["uid"])


def object_config(meta: dict, generation: int, spec: FineTuneJobSpec) -> str:
    """`RAGTUNE_OBJECT`: the object the trainer works for, as the trainer's only configuration."""
    return json.dumps(
        {
            "apiVersion": GROUP_VERSION,
            "kind": KIND,
            "metadata": {
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
                "generation": generation,
            },
            "spec": spec.to_wire(),
        },
        separators=(",", ":"),
    )


def trainer_env(meta: dict, generation: int, spec: FineTuneJobSpec, run_id: str, image: str) -> list[dict]:
    env: list[dict[str, Any]] = [
        {"name": ENV_IMAGE, "value": image},
        {"name": ENV_OBJECT, "value": object_config(meta, generation, spec)},
        {"name": ENV_RUN_ID, "value": run_id},
        {"name": ENV_TERMINATION_PATH, "value": DEFAULT_TERMINATION_PATH},
        # The root filesystem is read-only: point every cache at the writable volumes.
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": "/cache"},
        {"name": "HF_HOME", "value": "/cache/huggingface"},
        {"name": "TRITON_CACHE_DIR", "value": "/cache/triton"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *workloads.s3_env(spec.s3),
    ]
    token = spec.base_model.token_secret_ref
    if token is not None:
        env.append(workloads.secret_env("HF_TOKEN", token.name, token.key))
    return env


def labels_for(meta: dict, generation: int, run_id: str) -> dict[str, str]:
    return {
        LABEL_NAME: TRAINER_APP,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_FINETUNEJOB: label_value(meta["name"]),
        LABEL_GENERATION: str(generation),
        LABEL_RUN_ID: run_id,
    }


def render_job(
    meta: dict,
    spec: FineTuneJobSpec,
    run_id: str,
    default_image: str,
    generation: Optional[int] = None,
) -> dict:
    """The batch/v1 Job running the trainer for one run of a FineTuneJob (Indexed, one pod per
    node, when `resources.nodes` > 1; its headless Service is `render_service`).

    `meta` is the FineTuneJob's metadata (name, namespace, uid, generation)."""
    generation = int(generation if generation is not None else meta.get("generation") or 1)
    res = spec.resources
    labels = labels_for(meta, generation, run_id)
    annotations = {ANNOTATION_SPEC_HASH: spec_hash(spec), ANNOTATION_FINETUNEJOB: meta["name"]}

    resources: dict[str, dict[str, Any]] = {
        "requests": {"cpu": res.cpu, "memory": res.memory},
        "limits": {"memory": res.memory},
    }
    if res.gpus > 0:
        resources["limits"][res.gpu_resource_name] = res.gpus

    image = res.image or default_image
    container = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["ragtune", "train", "--in-cluster"],
        "env": trainer_env(meta, generation, spec, run_id, image),
        "resources": resources,
        "securityContext": workloads.restricted_container(user=RUN_USER, read_only_root=True),
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cache", "mountPath": "/cache"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        "terminationMessagePath": DEFAULT_TERMINATION_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }

    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": workloads.restricted_pod(RUN_USER),
        "containers": [container],
        "volumes": [
            {"name": "tmp", "emptyDir": {}},
            {"name": "cache", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shm_size}},
        ],
    }
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod_spec["tolerations"] = [t.to_wire() for t in res.tolerations]
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name
    if res.service_account_name:
        pod_spec["serviceAccountName"] = res.service_account_name

    job_spec: dict[str, Any] = {
        "backoffLimit": spec.backoff_limit,
        "suspend": spec.suspend or spec.queue_name is not None,  # a queued Job waits for Kueue
        # A replacement pod starts only once the previous one is gone: two trainers never
        # write to the same run folder.
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": {
            "rules": [
                # A preempted or evicted pod is not the run's fault: it does not count against
                # backoffLimit (the replacement resumes from the newest checkpoint).
                copy.deepcopy(DISRUPTION_IGNORED),
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_PERMANENT]},
                },
            ]
        },
        "template": {"metadata": {"labels": dict(labels), "annotations": dict(annotations)}, "spec": pod_spec},
    }
    if spec.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds

    nodes = res.nodes
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            # Several nodes: room for the pods' hostnames `<job>-<index>`.
            "name": job_name(meta["name"], run_id, MAX_NAME if nodes == 1 else MAX_NAME - 1 - len(str(nodes - 1))),
            "namespace": meta["namespace"],
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner_reference(meta)],
        },
        "spec": job_spec,
    }
    if nodes > 1:
        _make_indexed(job, spec, run_id)
    if spec.queue_name is not None:  # on the Job, for Kueue (not on its pods)
        job["metadata"]["labels"] = {**labels, LABEL_KUEUE_QUEUE_NAME: spec.queue_name}
    return job


# --- The training workload: one pod, or one pod per node --------------------------------------
#
# The controller asks `workload_for(spec)` for the objects of a run and creates them in order; the
# shape of the workload is decided here only. Two shapes exist: a single-pod batch/v1 Job (one
# node: what ragtune always rendered) and an Indexed Job plus a headless Service (several nodes,
# plain Kubernetes primitives every cluster has). A JobSet or Kubeflow TrainJob backend would be a
# third class with the same `render`, chosen where its CRDs are installed (docs/architecture.md).

RENDEZVOUS_PORT = 29500
"""torchrun's c10d rendezvous store, served by index 0's agent."""


def processes_per_node(spec: FineTuneJobSpec) -> int:
    """One training process per GPU, one per node on CPU."""
    return max(spec.resources.gpus, 1)


def world_size(spec: FineTuneJobSpec) -> int:
    return spec.resources.nodes * processes_per_node(spec)


def job_backoff_limit(spec: FineTuneJobSpec) -> int:
    """The Job's `backoffLimit` for `spec.backoffLimit` retries of the whole attempt. A failed
    attempt of N nodes fails all N pods (a dead rank breaks the others' collectives; torchrun does
    not restart workers itself), and the Job counts each: N failures per attempt."""
    nodes = spec.resources.nodes
    return spec.backoff_limit if nodes == 1 else (spec.backoff_limit + 1) * nodes - 1


def service_name(job: str) -> str:
    """The headless Service of a multi-node run (a DNS-1035 label; the Job's name when it is one)."""
    return workloads.child_name(job, "")


def _rendezvous_command(spec: FineTuneJobSpec, job: str, run_id: str) -> list[str]:
    # `ragtune torchrun` is torchrun keeping the workers' exit code (torchrun exits 1 for any
    # failure, which would hide the permanent exit 2 from the podFailurePolicy). The c10d backend
    # ignores --node-rank: it numbers the agents in the sorted order of their addresses, so each
    # agent's address is its pod's stable name and index 0 (`<job>-0.<service>`) sorts first: rank 0,
    # the one that writes the result, is always index 0's pod (left to the FQDN, it was not).
    return [
        "ragtune", "torchrun",
        f"--nnodes={spec.resources.nodes}",
        f"--nproc-per-node={processes_per_node(spec)}",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        f"--local-addr={job}-$(JOB_COMPLETION_INDEX).{service_name(job)}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={job}-0.{service_name(job)}:{RENDEZVOUS_PORT}",
        f"--rdzv-id={run_id}",
        f"--rdzv-conf=join_timeout={spec.training.distributed.rendezvous_timeout_seconds}",
        "--max-restarts=0",
        "--no-python",
        "ragtune", "train", "--in-cluster",
    ]


class SinglePodJob:
    """One node: one pod, one Job (exactly what ragtune rendered before distributed training)."""

    def render(self, meta: dict, spec: FineTuneJobSpec, run_id: str, default_image: str,
               generation: Optional[int] = None) -> list[dict]:
        return [render_job(meta, spec, run_id, default_image, generation)]


class IndexedJobWorkload:
    """Several nodes: a headless Service (first, so the names resolve when the pods start) and an
    Indexed Job of `nodes` pods that all run torchrun and meet at index 0."""

    def render(self, meta: dict, spec: FineTuneJobSpec, run_id: str, default_image: str,
               generation: Optional[int] = None) -> list[dict]:
        job = render_job(meta, spec, run_id, default_image, generation)
        return [render_service(meta, job), job]


def workload_for(spec: FineTuneJobSpec):
    """The workload shape of a spec: `render(meta, spec, run_id, image, generation)` -> objects."""
    return SinglePodJob() if spec.resources.nodes == 1 else IndexedJobWorkload()


def render_service(meta: dict, job: dict) -> dict:
    """The headless Service giving the pods of a multi-node run `<job>-<index>.<service>` names."""
    labels = {k: v for k, v in job["metadata"]["labels"].items() if k != LABEL_KUEUE_QUEUE_NAME}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": job["spec"]["template"]["spec"]["subdomain"],
            "namespace": meta["namespace"],
            "labels": labels,
            "annotations": dict(job["metadata"]["annotations"]),
            "ownerReferences": [owner_reference(meta)],
        },
        "spec": {
            "clusterIP": "None",
            "selector": {k: labels[k] for k in (LABEL_MANAGED_BY, LABEL_NAME, LABEL_RUN_ID)},
            # Ranks look index 0 up while it is still starting: publish every pod, ready or not.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }


def _make_indexed(job: dict, spec: FineTuneJobSpec, run_id: str) -> None:
    """Turn the single-pod Job into the Indexed Job of a multi-node run (in place)."""
    nodes = spec.resources.nodes
    name = job["metadata"]["name"]
    job_spec = job["spec"]
    pod_spec = job_spec["template"]["spec"]
    pod_spec["subdomain"] = service_name(name)
    container = pod_spec["containers"][0]
    container["command"] = _rendezvous_command(spec, name, run_id)
    container["ports"] = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}]
    job_spec.update({
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": job_backoff_limit(spec),
    })


def run_control_patch(job_spec: dict, spec: FineTuneJobSpec) -> dict:
    """The patch that brings a Job's mutable run-control fields in line with the spec ({} if none)."""
    patch: dict[str, Any] = {}
    if spec.queue_name is None and bool(job_spec.get("suspend")) != spec.suspend:  # Kueue's otherwise
        patch["suspend"] = spec.suspend
    if job_spec.get("activeDeadlineSeconds") != spec.active_deadline_seconds and spec.active_deadline_seconds:
        patch["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if job_spec.get("backoffLimit") != job_backoff_limit(spec):
        patch["backoffLimit"] = job_backoff_limit(spec)
    return patch
