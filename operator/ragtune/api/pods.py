"""Contracts between the operator and the pods it runs (trainer, adapter fetcher, evaluator).

The operator passes configuration through environment variables and reads each pod's outcome
from its termination message (JSON, at most 4 KiB), so it never needs S3 access nor Secret
contents. Long-running pods also print progress lines on stdout, which the operator samples
from the pod log at a bounded rate.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Optional

from pydantic import Field

from .adapterdeployment import GatesSpec, OnlineGate, OnlineGateResult
from .base import ApiModel
from .common import EvalMetrics, GateResult, PromptGap, S3Config

# --- Images ---------------------------------------------------------------------------

OPERATOR_IMAGE = "ghcr.io/ragtune/ragtune-operator"
"""Slim image (no torch): the operator, the adapter fetcher and the online evaluator."""
TRAINER_IMAGE = "ghcr.io/ragtune/ragtune-trainer"
"""CUDA image with torch: the trainer."""

# --- Environment ----------------------------------------------------------------------

ENV_OBJECT = "RAGTUNE_OBJECT"
"""JSON of the owning object: apiVersion, kind, metadata {name, namespace, uid, generation} and
the full spec (wire form, camelCase)."""
ENV_RUN_ID = "RAGTUNE_RUN_ID"
"""Artifact folder of the run: stable across retries of one generation, so a retry resumes."""
ENV_IMAGE = "RAGTUNE_IMAGE"
"""The image the trainer pod runs (set by the operator from the container it renders), recorded
as `manifest.image` so an adapter names the code that trained it."""
ENV_TERMINATION_PATH = "RAGTUNE_TERMINATION_MESSAGE_PATH"
"""Where to write the result (default `/dev/termination-log`)."""
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
TERMINATION_MESSAGE_LIMIT = 4096

EXIT_RETRYABLE = 1
"""Trainer exit code for failures a retry may fix (S3 unreachable, preempted): the
Job retries up to `spec.backoffLimit`, resuming from the newest checkpoint."""
EXIT_PERMANENT = 2
"""Trainer exit code for failures a retry cannot fix (`PERMANENT_REASONS`): the Job's
podFailurePolicy fails the whole Job at once."""
PERMANENT_REASONS = frozenset({
    "InvalidDataset", "InvalidSpec", "BaseModelNotFound", "GateFailed", "NaNLoss",
    "S3AccessDenied", "S3ObjectNotFound", "S3AddressForbidden",
    "OutOfMemory",  # the retry runs the same spec on the same resources and hits the same wall
})
"""Trainer failure reasons that exit with EXIT_PERMANENT; every other failure exits EXIT_RETRYABLE."""
OOM_REMEDIES = ("raise spec.resources.memory, lower training.batchSize or training.maxSeqLength, "
                "or enable training.gradientCheckpointing")
"""What an OutOfMemory failure tells the user to change (trainer and operator say the same)."""

PROGRESS_PREFIX = "RAGTUNE_PROGRESS "
"""A stdout line `RAGTUNE_PROGRESS {json TrainingProgress}` reports progress."""


def run_id(uid: str, generation: int) -> str:
    """Run folder for one generation of one object (a re-created object never resumes an old run)."""
    return f"{uid[:8]}-g{generation}"


def run_prefix(output_uri: str, namespace: str, name: str, rid: str) -> str:
    """`<output.uri>/<namespace>/<name>/<runId>/` (docs/architecture.md, Artifacts in S3)."""
    return f"{output_uri.rstrip('/')}/{namespace}/{name}/{rid}/"


# --- Artifact layout under the run prefix ---------------------------------------------

ADAPTER_DIR = "adapter/"
CHECKPOINTS_DIR = "checkpoints/"
REPORT_JSON = "eval/report.json"
REPORT_HTML = "eval/report.html"
PROMPT_JSON = "adapter/prompt.json"
"""The prompt contract the adapter was trained with (`ragtune.rag.prompt.PromptContract`)."""
EVAL_SET_JSONL = "eval/heldout.jsonl"
"""The held-out split of a `rag` run, one record a line as built for evaluation (after the
hard-negative construction, each with its `construction` label; the trainer evaluated on the first
`evaluation.maxSamples`): the online gate's default evaluation set."""
MANIFEST = "manifest.json"
MANIFEST_SCHEMA = "ragtune.dev/manifest/v1"


class ManifestFile(ApiModel):
    path: str
    """Path relative to the run prefix, e.g. `adapter/adapter_model.safetensors`."""
    sha256: str
    size: int


class StageSummary(ApiModel):
    """One training stage of a run, in the order they ran (`sft`, then `preference`)."""

    name: Literal["sft", "preference"]
    """`sft` (supervised fine-tuning) or `preference` (DPO on chosen/rejected pairs)."""
    steps: int
    """Optimiser steps the stage ran (counted from the stage's start)."""
    seconds: Optional[float] = None
    """Wall-clock training time of the stage (0 when a retry took a finished SFT adapter over)."""
    items: Optional[int] = None
    """Training rows (sft) or preference pairs (preference) the stage trained on."""
    stop_reason: Optional[Literal["maxSteps", "earlyStopping"]] = None
    """Why the stage's training ended: `maxSteps` (its planned steps) or `earlyStopping` (the
    validation loss stopped improving; `training.earlyStopping`)."""
    best_step: Optional[int] = None
    """With a validation split: the step of the best checkpoint, whose adapter the stage kept."""
    best_eval_loss: Optional[float] = None
    """The validation loss at `bestStep`."""
    validation_items: Optional[int] = None
    """Items of the validation split (`dataset.validationSplit`); unset without one."""


class Manifest(ApiModel):
    """`manifest.json`, written last: a run without it is incomplete and never deployed."""

    schema_: Literal["ragtune.dev/manifest/v1"] = Field(MANIFEST_SCHEMA, alias="schema")
    run_id: str
    base_model: dict[str, Optional[str]]
    """`{id, revision}` the adapter was trained on."""
    files: list[ManifestFile]
    """Every adapter, tokenizer and report file, and the held-out split, with its digest."""
    base_model_files: list[ManifestFile] = Field(default_factory=list)
    """Every file of the base model the run trained on, when `baseModel.uri` gave it (paths
    relative to that prefix): a serving pod that downloads the base weights verifies them against
    this list, like the adapter files. Empty for a hub model (the hub pins it by revision)."""
    datasets: list[dict[str, Optional[str]]] = Field(default_factory=list)
    """`{uri, etag}` of every dataset object read."""
    image: Optional[str] = None
    versions: dict[str, str] = Field(default_factory=dict)
    """Library versions (torch, transformers, peft, trl, ...)."""
    evaluation_passed: Optional[bool] = None
    stages: list[StageSummary] = Field(default_factory=list)
    """The training stages that made the adapter, in order."""
    created_at: str
    job: dict[str, Any] = Field(default_factory=dict)
    """`{namespace, name, uid, generation}` of the FineTuneJob."""


# --- Termination messages -------------------------------------------------------------


class TrainerResult(ApiModel):
    """What the trainer writes to its termination message."""

    outcome: Literal["Succeeded", "Failed"]
    reason: str
    """CamelCase reason, e.g. `Completed`, `GateFailed`, `S3Unreachable`, `InvalidDataset`,
    `BaseModelNotFound`, `OutOfMemory`, `NaNLoss`, `Preempted`."""
    message: str = ""
    """One line for humans."""
    run_id: Optional[str] = None
    adapter_uri: Optional[str] = None
    """Run prefix holding `manifest.json`."""
    manifest_sha256: Optional[str] = None
    adapter_size_bytes: Optional[int] = None
    report_uri: Optional[str] = None
    prompt_sha256: Optional[str] = None
    """sha256 of `PROMPT_JSON` (the status names it beside its URI)."""
    eval_set_uri: Optional[str] = None
    """`EVAL_SET_JSONL` under the run prefix (`rag` runs with a held-out split)."""
    eval_set_sha256: Optional[str] = None
    """sha256 of that file (also listed in `manifest.json`)."""
    base: Optional[EvalMetrics] = None
    adapter: Optional[EvalMetrics] = None
    foreign_prompt: Optional[EvalMetrics] = None
    """The adapter under the foreign prompt."""
    foreign_prompt_gap: Optional[PromptGap] = None
    passed: Optional[bool] = None
    gates: list[GateResult] = Field(default_factory=list)
    steps: Optional[int] = None
    train_seconds: Optional[float] = None
    stages: list[StageSummary] = Field(default_factory=list)
    """The training stages that ran, in order (`steps` and `trainSeconds` are their sums)."""


def encode_termination_message(result: ApiModel) -> str:
    """Compact JSON within the kubelet's 4 KiB limit (keeps of the foreign-prompt metrics only what
    the gap uses, then drops the gates' confidence intervals (their bounds stay; report.json has
    them all), then cuts the message to 200 characters (a GateFailed message only repeats the
    gates, from which the operator rebuilds it), then drops gate details)."""
    data = result.to_wire()
    text = json.dumps(data, separators=(",", ":"))
    if len(text.encode()) > TERMINATION_MESSAGE_LIMIT and isinstance(data.get("foreignPrompt"), dict):
        data["foreignPrompt"] = {k: v for k, v in data["foreignPrompt"].items()
                                 if k in ("samples", "f1", "refusalRate", "falseRefusalRate")}
        text = json.dumps(data, separators=(",", ":"))
    if len(text.encode()) > TERMINATION_MESSAGE_LIMIT and any("interval" in g for g in data.get("gates") or []):
        data["gates"] = [{k: v for k, v in g.items() if k != "interval"} for g in data["gates"]]
        text = json.dumps(data, separators=(",", ":"))
    if len(text.encode()) > TERMINATION_MESSAGE_LIMIT:
        data["message"] = data.get("message", "")[:200]
        text = json.dumps(data, separators=(",", ":"))
    if len(text.encode()) > TERMINATION_MESSAGE_LIMIT and "gates" in data:
        data["gates"] = [g for g in data["gates"] if not g.get("passed")][:5]
        text = json.dumps(data, separators=(",", ":"))
    return text


# --- Adapter fetcher (init container of the serving pods) -----------------------------------


class FetchedAdapter(ApiModel):
    name: str
    sha256: str
    files: int
    bytes: int


class FetchResult(ApiModel):
    """Termination message of the fetch init container."""

    outcome: Literal["Succeeded", "Failed"]
    reason: str
    """`Fetched`, or why not: `ManifestMissing`, `DigestMismatch`, `ChecksumMismatch`,
    `BaseModelMismatch`, `IncompleteAdapter`, `UnsupportedAdapter`, `InvalidManifest`, or a
    storage reason (`S3Unreachable`, `S3AccessDenied`, `S3ObjectNotFound`, `S3Error`)."""
    message: str = ""
    adapter: Optional[str] = None
    """The adapter that failed."""
    adapters: list[FetchedAdapter] = Field(default_factory=list)


# --- inference servers (TGI, vLLM) -------------------------------------------------------------

SERVER_METRICS_PATH = "/metrics"
"""Prometheus text of a serving pod on its serving port (TGI's own route; on vLLM the sidecar's
proxy forwards it), scraped by the traffic steps' analysis (`adapterdeployment/analysis.py`)."""

# --- vLLM adapter-sync sidecar (`ragtune adapters sync`) ------------------------------------

ADAPTER_SET_KEY = "adapters.json"
"""Key of the desired-set ConfigMap the operator writes (an `AdapterSetDocument`)."""
ADAPTER_SET_MOUNT = "/etc/ragtune/adapter-set"
"""Where the sidecar sees that ConfigMap (the kubelet updates the files when it changes)."""
SYNC_STATUS_PORT_NAME = "ragtune-sync"
"""Container port of the sidecar's status document (`SYNC_STATUS_PATH`) and readiness (`SYNC_READY_PATH`)."""
SYNC_STATUS_PATH = "/status"
SYNC_READY_PATH = "/ready"
"""200 once the sidecar has loaded the desired set (and vLLM answers), 503 before."""
LORA_ADMIN_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/adapters")
"""vLLM's runtime LoRA endpoints: the sidecar's serving proxy refuses them (403), only the sidecar
calls them, on loopback. `/adapters` (and below it) is the SageMaker-style register/unregister API
vLLM 0.32 also mounts (`POST /adapters`, `DELETE /adapters/{name}`), which wraps the same loader."""


class DesiredAdapter(ApiModel):
    name: str
    uri: str
    """Run prefix holding `manifest.json`."""
    sha256: str
    """Pinned sha256 of the run's manifest.json."""


class AdapterSetDocument(ApiModel):
    """The desired set, as the operator writes it into the ConfigMap key `ADAPTER_SET_KEY`."""

    generation: int
    """The AdapterDeployment generation whose rollout wrote it."""
    digest: str
    """Digest of the set (names + manifest digests), as in the pod template annotation of TGI."""
    adapters: list[DesiredAdapter]


class AdapterSyncError(ApiModel):
    reason: str
    """`DigestMismatch`, `ChecksumMismatch`, `UnsupportedAdapter`, `LoadFailed`, `ServerUnreachable`, ..."""
    message: str = ""
    sha256: Optional[str] = None
    """The manifest digest that failed (an error about an older digest is history)."""


class AdapterSyncStatus(ApiModel):
    """The sidecar's status document (`GET SYNC_STATUS_PATH`): what this pod serves. The operator
    reads it once per pod per tick while a set change is pending (no Secrets, no S3)."""

    generation: int = 0
    """Generation of the last desired set the sidecar acted on."""
    desired: str = ""
    """Digest of that set."""
    loaded: dict[str, str] = Field(default_factory=dict)
    """Adapter name -> manifest sha256 vLLM serves now."""
    errors: dict[str, AdapterSyncError] = Field(default_factory=dict)
    """Adapter name -> why the desired version is not loaded (the old version, if any, keeps serving)."""
    ready: bool = False
    """The desired set was loaded once since the sidecar started, and vLLM answers."""


# --- Online evaluator (the canary evaluation Job) -----------------------------------------

EVAL_CONFIG_ENV = "RAGTUNE_EVAL_CONFIG"
"""JSON `OnlineEvalConfig` for the evaluation Job."""


class CandidateRef(ApiModel):
    name: str
    """Adapter id on the canary."""
    uri: str
    """Run prefix (its `adapter/` tokenizer files give the chat template)."""
    sha256: Optional[str] = None
    """Pinned sha256 of the run's manifest.json (needed for `offline`)."""
    serving: bool = False
    """An adapter of this name serves on the stable server now (the regression baseline)."""
    offline: bool = False
    """Apply the offline gate to the run's `eval/report.json` (adapters given by `uri`: the
    operator has no FineTuneJob status to read their evaluation from)."""
    prompt: Optional[dict[str, str]] = None
    """The prompt contract (prompt.json's form) of the adapter's FineTuneJob spec, where it is not
    ragtune's default; used when the run publishes no `adapter/prompt.json` (which wins: it is
    what the run trained with, pinned by the manifest)."""


class OnlineEvalConfig(ApiModel):
    canary_url: Optional[str] = None
    """Empty: offline checks only (the `Direct` strategy)."""
    stable_url: Optional[str] = None
    candidates: list[CandidateRef]
    eval_set_uri: Optional[str] = None
    eval_set_sha256: Optional[str] = None
    """When given, the evaluation set must be one object with this sha256 (the held-out split a
    FineTuneJob published): a mismatch fails with `EvalSetDigestMismatch`."""
    gate: OnlineGate = Field(default_factory=OnlineGate)
    offline: GatesSpec = Field(default_factory=GatesSpec)
    s3: S3Config = Field(default_factory=S3Config)
    seed: int = 0
    backend: Literal["tgi", "vllm"] = "tgi"
    """The server's kind; both are asked through `/v1/completions` with the adapter as `model`, and
    this names the base model: TGI's `tgi`, vLLM's served name (`base_model`)."""
    base_model: Optional[str] = None
    """The base model's served name (vLLM: `--served-model-name`, i.e. `spec.baseModel.id`)."""


class OnlineEvalResult(ApiModel):
    """Termination message of the evaluation Job."""

    outcome: Literal["Passed", "Failed", "Error"]
    reason: str
    """`Passed`, `GateFailed`, `NoAdapterEffect`, `AdapterNotServed` (vLLM: 404 for the name),
    `Regression`, or an error reason (`CanaryUnreachable`, `InvalidEvalSet`, `EvalSetDigestMismatch`, `S3...`)."""
    message: str = ""
    results: list[OnlineGateResult] = Field(default_factory=list)
    offline: dict[str, list[GateResult]] = Field(default_factory=dict)
    """Offline gate results of the adapters checked against their run's report."""
