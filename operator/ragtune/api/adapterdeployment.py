"""AdapterDeployment: which LoRA adapters a TGI server serves, and the gates they must pass."""

from __future__ import annotations

from enum import Enum
import re
from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, Field

from .keys import GROUP_VERSION
from .base import ApiModel, cel, k8s_extensions
from .common import (
    ArtifactUri,
    BaseModelRef,
    Condition,
    EvalMetrics,
    GateResult,
    CpuQuantity,
    ExtendedResourceName,
    IMAGE_REF,
    K8sName,
    MemoryQuantity,
    MetricThresholds,
    NodeSelector,
    S3Config,
)
from .finetunejob import Toleration

DEFAULT_TGI_IMAGE = "ghcr.io/huggingface/text-generation-inference:3.3.6"


class LocalObjectRef(ApiModel):
    """A reference to an object in the same namespace."""

    name: K8sName
    """Name of the object."""


class AdapterSource(ApiModel):
    """One adapter to serve: from a FineTuneJob, or an explicit artifact URI with its digest."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": k8s_extensions(
            cel(
                "has(self.fineTuneJobRef) != has(self.uri)",
                "exactly one of fineTuneJobRef or uri must be set",
                reason="FieldValueInvalid",
            ),
            cel(
                "!has(self.uri) || has(self.sha256)",
                "uri requires sha256 (the sha256 of the run's manifest.json)",
                field_path=".sha256",
                reason="FieldValueRequired",
            ),
        )
    }

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([a-z0-9_-]*[a-z0-9])?$")
    """Adapter id clients send as `parameters.adapter_id` (TGI `/generate`) or `model`
    (`/v1/chat/completions`). Lowercase letters, digits, `-` and `_`."""
    fine_tune_job_ref: Optional[LocalObjectRef] = None
    """A Succeeded FineTuneJob in this namespace; its adapter, digest and metrics are used."""
    uri: Optional[ArtifactUri] = None
    """Run prefix holding `manifest.json` and `adapter/` (as a FineTuneJob writes it)."""
    sha256: Optional[str] = Field(None, pattern=r"^[a-f0-9]{64}$")
    """sha256 of the run's `manifest.json`; pins exactly what gets served."""


# Variables the operator sets on the server container (or must not be overridden because they
# decide what is loaded and from where); tests/api checks the TGI backend's set is covered.
RESERVED_SERVER_ENV = ("MODEL_ID", "REVISION", "LORA_ADAPTERS", "CUDA_GRAPHS", "PORT", "HF_HOME",
                       "HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MAX_INPUT_TOKENS",
                       "MAX_TOTAL_TOKENS", "MAX_CONCURRENT_REQUESTS")
RESERVED_SERVER_ENV_PREFIXES = ("AWS_", "RAGTUNE_")
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
SECRET_LIKE_ENV = r"(?i)(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|KEY|APIKEY|CREDENTIALS?)(_|$)"


def _check_server_env(env: dict[str, str]) -> dict[str, str]:
    for name in env:
        if not re.match(ENV_NAME, name):
            raise ValueError(f"env name {name!r} is not a valid environment variable name")
        if name in RESERVED_SERVER_ENV or name.startswith(RESERVED_SERVER_ENV_PREFIXES):
            raise ValueError(f"env {name!r} is set by ragtune; use the dedicated spec field instead")
        if re.search(SECRET_LIKE_ENV, name):
            raise ValueError(f"env {name!r} looks like a secret: a literal value would sit in the spec in plain "
                             "text; reference a Secret instead (e.g. baseModel.tokenSecretRef)")
    return env


ServerEnv = Annotated[
    dict[str, Annotated[str, Field(max_length=4096)]],
    Field(max_length=64, json_schema_extra=k8s_extensions(
        cel(f"self.all(k, k.matches('{ENV_NAME}'))", "env names must be valid environment variable names"),
        cel("self.all(k, !(k in [" + ", ".join(f"'{n}'" for n in RESERVED_SERVER_ENV) + "]) && "
            + " && ".join(f"!k.startsWith('{p}')" for p in RESERVED_SERVER_ENV_PREFIXES) + ")",
            "env must not set variables ragtune sets itself (MODEL_ID, LORA_ADAPTERS, PORT, AWS_*, RAGTUNE_*, ...): "
            "use the dedicated spec fields"),
        cel(f"self.all(k, !k.matches('{SECRET_LIKE_ENV}'))",
            "env names like *_TOKEN, *_SECRET, *_PASSWORD, *_KEY look like secrets: do not put them in the spec "
            "as plain text"),
    )),
    AfterValidator(_check_server_env),
]


class ServerSpec(ApiModel):
    """The TGI server. Either ragtune renders it (`image`, `replicas`, ...) or it patches an
    existing TGI Deployment named by `deploymentRef`."""

    deployment_ref: Optional[LocalObjectRef] = None
    """An existing TGI Deployment to manage instead of rendering one (its pod template gets
    the adapter init container and `LORA_ADAPTERS`)."""
    image: str = Field(DEFAULT_TGI_IMAGE, max_length=512, pattern=IMAGE_REF)
    """TGI image."""
    replicas: int = Field(1, ge=0, le=100)
    """Serving replicas."""
    gpus: int = Field(1, ge=0, le=16)
    """GPUs per replica."""
    gpu_resource_name: ExtendedResourceName = "nvidia.com/gpu"
    """Extended resource name of the GPU."""
    cpu: CpuQuantity = "4"
    """CPU request per replica (greater than zero)."""
    memory: MemoryQuantity = "32Gi"
    """Memory request and limit per replica (greater than zero)."""
    shm_size: MemoryQuantity = "1Gi"
    """Size of the in-memory `/dev/shm` (greater than zero)."""
    port: int = Field(8080, ge=1, le=65535)
    """Container port TGI listens on (`PORT`)."""
    max_input_tokens: Optional[int] = Field(None, ge=1)
    """`MAX_INPUT_TOKENS`."""
    max_total_tokens: Optional[int] = Field(None, ge=2)
    """`MAX_TOTAL_TOKENS`."""
    max_concurrent_requests: Optional[int] = Field(None, ge=1)
    """`MAX_CONCURRENT_REQUESTS`."""
    startup_timeout_seconds: int = Field(1800, ge=60, le=7200)
    """How long the startupProbe waits for weights and adapters to load."""
    node_selector: NodeSelector = Field(default_factory=dict)
    """Node labels the server pods must match."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Tolerations, e.g. for tainted GPU nodes."""
    env: ServerEnv = Field(default_factory=dict)
    """Extra TGI environment variables. Not for secrets (names like `*_TOKEN`, `*_SECRET`,
    `*_PASSWORD`, `*_KEY` are refused) and not for what ragtune sets itself (`MODEL_ID`,
    `LORA_ADAPTERS`, `PORT`, ..., `AWS_*`, `RAGTUNE_*`): use the dedicated fields."""


class OnlineGate(ApiModel):
    """Canary evaluation through the TGI API before promotion."""

    enabled: bool = True
    """Run the online evaluation (ignored by the `Direct` strategy, which has no canary)."""
    eval_set_uri: Optional[ArtifactUri] = None
    """Evaluation records (`rag` format). Empty: the evaluation split each FineTuneJob used."""
    samples: int = Field(16, ge=1, le=10000)
    """Items sampled from the evaluation set."""
    max_new_tokens: int = Field(128, ge=1, le=4096)
    """Generation budget per answer."""
    thresholds: MetricThresholds = Field(default_factory=MetricThresholds)
    """Absolute thresholds on the candidate adapter's online metrics."""
    max_regression: float = Field(0.05, ge=0, le=1)
    """Largest allowed drop of F1 and refusal rate against the adapter of the same name that
    is serving now."""
    require_adapter_effect: bool = True
    """Fail unless the adapter's outputs differ from the base model's on some items (TGI
    silently serves the base model for an unknown adapter id)."""
    timeout_seconds: int = Field(900, ge=30, le=86400)
    """Canary readiness plus evaluation must finish within this; otherwise roll back."""


class GatesSpec(ApiModel):
    """What an adapter must show before it serves traffic."""

    offline: MetricThresholds = Field(default_factory=MetricThresholds)
    """Thresholds on the FineTuneJob's held-out evaluation (adapters given by `uri` are
    checked against the `eval/report.json` of their run)."""
    require_offline_pass: bool = True
    """Also require that the FineTuneJob's own gates passed."""
    online: OnlineGate = Field(default_factory=OnlineGate)
    """Canary evaluation."""


class StrategyType(str, Enum):
    CANARY = "Canary"
    DIRECT = "Direct"


class StrategySpec(ApiModel):
    """How a new adapter set reaches the stable server."""

    type: StrategyType = StrategyType.CANARY
    """`Canary`: a canary Deployment with the candidate set is evaluated online first, then the
    stable Deployment is rolled. `Direct`: the stable Deployment is rolled after the offline
    gate."""
    auto_rollback: bool = True
    """On a failed or timed-out canary, remove it and keep the previous set serving."""
    canary_replicas: int = Field(1, ge=1, le=10)
    """Replicas of the canary Deployment."""


class AdapterDeploymentSpec(ApiModel):
    """The desired set of adapters on a TGI server."""

    base_model: BaseModelRef
    """The base model the server runs; every adapter must have been trained on exactly it."""
    server: ServerSpec = Field(default_factory=ServerSpec)
    """The TGI server."""
    adapters: list[AdapterSource] = Field(
        min_length=1,
        max_length=32,
        json_schema_extra=k8s_extensions(list_type="map", list_map_keys=["name"]),
    )
    """Adapters to serve; names are unique."""
    gates: GatesSpec = Field(default_factory=GatesSpec)
    """Gates each new or changed adapter must pass."""
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    """Rollout strategy."""
    s3: S3Config = Field(default_factory=S3Config)
    """S3 endpoint and credentials for downloading adapters and evaluation data."""
    history_limit: int = Field(10, ge=1, le=100)
    """Rollouts kept in `status.history`."""


class AdapterDeploymentPhase(str, Enum):
    PENDING = "Pending"
    GATING = "Gating"
    ROLLING_OUT = "RollingOut"
    READY = "Ready"
    DEGRADED = "Degraded"
    ROLLED_BACK = "RolledBack"
    FAILED = "Failed"


class ResolvedAdapter(ApiModel):
    """An adapter pinned to an artifact and digest."""

    name: str
    """Adapter id."""
    uri: str
    """Run prefix holding `manifest.json` and `adapter/`."""
    sha256: str
    """sha256 of `manifest.json`."""
    source: Optional[str] = None
    """Where it came from, e.g. `FineTuneJob/rag-v3`."""
    since: Optional[str] = None
    """When it started serving (RFC 3339)."""


class OnlineGateResult(ApiModel):
    """What the canary evaluation measured."""

    adapter: str
    """Adapter id evaluated."""
    candidate: EvalMetrics = Field(default_factory=EvalMetrics)
    """Metrics of the candidate adapter on the canary."""
    baseline: Optional[EvalMetrics] = None
    """Metrics of the adapter of the same name serving now (if any)."""
    base: Optional[EvalMetrics] = None
    """Metrics of the base model on the canary."""
    differs_from_base: Optional[float] = None
    """Share of items where the adapter's answer differs from the base model's."""
    gates: list[GateResult] = Field(default_factory=list)
    """Each threshold's outcome."""
    passed: bool = False
    """Whether the candidate passed."""


class GateReport(ApiModel):
    """Offline and online gate outcomes of the current rollout."""

    offline: dict[str, list[GateResult]] = Field(default_factory=dict)
    """Offline gate results per adapter name."""
    online: list[OnlineGateResult] = Field(default_factory=list)
    """Online gate results per candidate adapter."""


class Candidate(ApiModel):
    """The adapter set being rolled out."""

    generation: int
    """`metadata.generation` of the spec this rollout serves."""
    adapters: list[ResolvedAdapter] = Field(default_factory=list)
    """The full adapter set the server will serve after promotion."""
    changed: list[str] = Field(default_factory=list)
    """Adapters that are new or changed (and therefore gated)."""
    step: Literal["Resolving", "OfflineGate", "Canary", "OnlineGate", "Promoting"] = "Resolving"
    """Rollout step."""
    started_at: Optional[str] = None
    """When the rollout began."""


class RolloutRecord(ApiModel):
    """One finished rollout."""

    generation: int
    """Spec generation."""
    adapters: list[str] = Field(default_factory=list)
    """`name@sha256-prefix` of each adapter in the set."""
    outcome: Literal["Promoted", "RolledBack", "Failed"]
    """How it ended."""
    reason: Optional[str] = None
    """Why (for RolledBack / Failed)."""
    started_at: Optional[str] = None
    """When it started."""
    finished_at: Optional[str] = None
    """When it ended."""


class AdapterDeploymentStatus(ApiModel):
    """Observed state, written by the operator."""

    phase: Optional[AdapterDeploymentPhase] = None
    """Pending, Gating, RollingOut, Ready, Degraded, RolledBack or Failed."""
    message: Optional[str] = None
    """One line on what is happening or what went wrong."""
    observed_generation: Optional[int] = None
    """The `metadata.generation` the status describes."""
    conditions: list[Condition] = Field(default_factory=list)
    """`Ready` (serving), `Progressing` (a rollout is under way), `Degraded`."""
    serving: list[ResolvedAdapter] = Field(default_factory=list)
    """Adapters the stable server is serving."""
    candidate: Optional[Candidate] = None
    """The rollout under way."""
    gates: Optional[GateReport] = None
    """Gate results of the latest rollout."""
    history: list[RolloutRecord] = Field(default_factory=list)
    """Finished rollouts, newest first (bounded by `spec.historyLimit`)."""
    endpoint: Optional[str] = None
    """In-cluster URL of the stable TGI Service."""
    deployment_name: Optional[str] = None
    """The stable TGI Deployment."""
    serving_adapters: Optional[str] = None
    """Comma-separated adapter ids, for `kubectl get`."""


class AdapterDeployment(ApiModel):
    """A gated, canaried set of LoRA adapters served by TGI."""

    api_version: Literal[GROUP_VERSION] = GROUP_VERSION
    kind: Literal["AdapterDeployment"] = "AdapterDeployment"
    metadata: dict = Field(default_factory=dict)
    spec: AdapterDeploymentSpec
    status: Optional[AdapterDeploymentStatus] = None
