"""AdapterDeployment: which LoRA adapters a TGI server serves, and the gates they must pass."""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, Field, model_validator

from .base import ApiModel, cel, k8s_extensions
from .common import (
    IMAGE_REF,
    Affinity,
    ArtifactUri,
    Condition,
    CpuQuantity,
    EndpointUrl,
    EvalMetrics,
    ExtendedResourceName,
    GateResult,
    K8sName,
    MemoryQuantity,
    MetricThresholds,
    NodeSelector,
    S3Config,
    ServedBaseModelRef,
    Toleration,
)
from .keys import GROUP_VERSION

DEFAULT_TGI_IMAGE = "ghcr.io/huggingface/text-generation-inference:3.3.6"
DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.32.0"


class ServerBackend(str, Enum):
    TGI = "tgi"
    VLLM = "vllm"


# Flags ragtune sets on `vllm serve` itself (or that would expose or bypass what it manages).
RESERVED_VLLM_FLAGS = ("--model", "--host", "--port", "--enable-lora", "--max-loras", "--max-cpu-loras",
                       "--max-lora-rank", "--dtype", "--max-model-len", "--lora-modules", "--served-model-name",
                       "--revision", "--download-dir", "--api-key", "--allowed-local-media-path")
VLLM_ARG = r"^[^ \t\n\r]+$"


def _check_vllm_args(args: list[str]) -> list[str]:
    for i, arg in enumerate(args):
        if not re.match(VLLM_ARG, arg):
            raise ValueError(f"extraArgs[{i}] {arg!r} contains whitespace: give each flag and value as its own "
                             "list item (no shell strings)")
        flag = arg.split("=", 1)[0]
        if flag in RESERVED_VLLM_FLAGS:
            raise ValueError(f"extraArgs[{i}] {flag} is set by ragtune; use the dedicated spec.server.vllm field")
    return args


VllmArgs = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=1024)]],
    Field(max_length=64, json_schema_extra=k8s_extensions(
        cel(f"self.all(a, a.matches('{VLLM_ARG}'))",
            "each extraArgs item is one argv entry without whitespace (no shell strings)"),
        cel("self.all(a, !(a.split('=')[0] in [" + ", ".join(f"'{f}'" for f in RESERVED_VLLM_FLAGS) + "]))",
            "extraArgs must not set flags ragtune sets itself (--model, --port, --enable-lora, --max-loras, ...): "
            "use the dedicated spec.server.vllm fields"),
    )),
    AfterValidator(_check_vllm_args),
]


class VllmSettings(ApiModel):
    """Settings of a vLLM server (`spec.server.backend: vllm`); each becomes a `vllm serve` flag."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": k8s_extensions(
            cel("!has(self.maxCpuLoras) || self.maxCpuLoras >= self.maxLoras",
                "maxCpuLoras must be >= maxLoras", field_path=".maxCpuLoras"),
        )
    }

    max_loras: int = Field(4, ge=1, le=64)
    """`--max-loras`: adapters that can be used in one batch."""
    max_cpu_loras: Optional[int] = Field(None, ge=1, le=256)
    """`--max-cpu-loras`: adapters the server holds at once (empty: `maxLoras`); the adapter set
    may not be larger."""
    max_lora_rank: Literal[8, 16, 32, 64, 128, 256, 320, 512] = 16
    """`--max-lora-rank` (one of vLLM's supported values); a larger adapter rank is refused."""
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    """`--dtype` of the base weights."""
    max_model_len: Optional[int] = Field(None, ge=16, le=1048576)
    """`--max-model-len` (empty: the model's own)."""
    extra_args: VllmArgs = Field(default_factory=list)
    """More `vllm serve` arguments, one argv entry per item (e.g. `["--enforce-eager",
    "--gpu-memory-utilization=0.85"]`); not the flags ragtune sets."""

    @property
    def capacity(self) -> int:
        """How many adapters the server holds: `maxCpuLoras`, else `maxLoras`."""
        return self.max_cpu_loras or self.max_loras

    @model_validator(mode="after")
    def _cpu_loras_cover_batch(self) -> "VllmSettings":
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"maxCpuLoras ({self.max_cpu_loras}) must be >= maxLoras ({self.max_loras})")
        return self


class LocalObjectRef(ApiModel):
    """A reference to an object in the same namespace."""

    name: K8sName
    """Name of the object."""


class FollowPolicy(str, Enum):
    PINNED = "Pinned"
    LATEST_SUCCEEDED = "LatestSucceeded"


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
                "!has(self.follow) || self.follow == 'Pinned' || has(self.fineTuneJobRef)",
                "follow: LatestSucceeded follows a FineTuneJob: it needs fineTuneJobRef (a uri is pinned by its sha256)",
                field_path=".follow",
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
    follow: FollowPolicy = FollowPolicy.PINNED
    """`Pinned`: the adapter the FineTuneJob reported when this generation of the spec rolled out
    keeps serving (a new spec generation resolves it again). `LatestSucceeded` (with
    `fineTuneJobRef`): whenever that FineTuneJob succeeds again with a new adapter (a retrained
    run: its spec was changed), the serving set with that adapter replaced becomes a rollout
    candidate by itself, through the same gates and strategy, with no change to this spec. A
    candidate that was rolled back is not tried again; the next successful run is."""

    @model_validator(mode="after")
    def _follow_needs_a_job(self) -> "AdapterSource":
        if self.follow == FollowPolicy.LATEST_SUCCEEDED and self.fine_tune_job_ref is None:
            raise ValueError("follow: LatestSucceeded follows a FineTuneJob: it needs fineTuneJobRef "
                             "(a uri is pinned by its sha256)")
        return self


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
    """The inference server (TGI or vLLM). Either ragtune renders it (`image`, `replicas`, ...)
    or it patches an existing TGI Deployment named by `deploymentRef`."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": k8s_extensions(
            cel("!has(self.vllm) || self.backend == 'vllm'", "vllm settings need backend: vllm",
                field_path=".vllm"),
            cel("!has(self.deploymentRef) || self.backend == 'tgi'",
                "deploymentRef (an existing Deployment) is supported for backend: tgi only",
                field_path=".deploymentRef"),
            cel("!has(self.deploymentRef) || (!has(self.affinity) && !has(self.priorityClassName))",
                "affinity and priorityClassName place ragtune's own server pods: with deploymentRef the "
                "referenced Deployment's template places its pods", field_path=".deploymentRef"),
            cel("self.backend != 'vllm' || (!has(self.maxInputTokens) && !has(self.maxTotalTokens) && "
                "!has(self.maxConcurrentRequests))",
                "maxInputTokens, maxTotalTokens and maxConcurrentRequests are TGI settings: for vllm use "
                "vllm.maxModelLen or vllm.extraArgs"),
        )
    }

    backend: ServerBackend = ServerBackend.TGI
    """`tgi` (adapters fixed at server start: a new set rolls the pods) or `vllm` (adapters
    loaded with `vllm serve --enable-lora`)."""
    vllm: Optional[VllmSettings] = None
    """vLLM settings (backend `vllm` only; empty: the defaults)."""
    deployment_ref: Optional[LocalObjectRef] = None
    """An existing TGI Deployment to manage instead of rendering one (its pod template gets
    the adapter init container and `LORA_ADAPTERS`). The canary runs that Deployment's own pod
    template (image, base weights, resources, placement, env) with the candidate set, under
    ragtune's labels only, so the Deployment's Service never sends it user traffic."""
    image: Optional[str] = Field(None, max_length=512, pattern=IMAGE_REF)
    """Server image (empty: the backend's pinned image, `ghcr.io/huggingface/text-generation-inference:3.3.6`
    or `vllm/vllm-openai:v0.32.0`)."""
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
    """Node labels the server pods (stable and canary) must match."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Tolerations of the server pods, e.g. for tainted GPU nodes."""
    affinity: Optional[Affinity] = None
    """Node and pod (anti-)affinity of the server pods (stable and canary), e.g. replicas on
    different nodes or a GPU type. Not with `deploymentRef`: that Deployment's own template places
    its pods."""
    priority_class_name: Optional[K8sName] = None
    """PriorityClass of the server pods and of the online-evaluation Job (a canary whose
    evaluation is preempted rolls back). Not with `deploymentRef`."""
    env: ServerEnv = Field(default_factory=dict)
    """Extra server environment variables. Not for secrets (names like `*_TOKEN`, `*_SECRET`,
    `*_PASSWORD`, `*_KEY` are refused) and not for what ragtune sets itself (`MODEL_ID`,
    `LORA_ADAPTERS`, `PORT`, ..., `AWS_*`, `RAGTUNE_*`): use the dedicated fields."""

    @model_validator(mode="after")
    def _backend_fields(self) -> "ServerSpec":
        if self.vllm is not None and self.backend != ServerBackend.VLLM:
            raise ValueError("vllm settings need backend: vllm")
        if self.deployment_ref is not None and self.backend != ServerBackend.TGI:
            raise ValueError("deploymentRef (an existing Deployment) is supported for backend: tgi only")
        if self.deployment_ref is not None and (self.affinity is not None or self.priority_class_name):
            raise ValueError("affinity and priorityClassName place ragtune's own server pods: with deploymentRef "
                             "the referenced Deployment's template places its pods")
        tgi_only = [n for n in ("max_input_tokens", "max_total_tokens", "max_concurrent_requests")
                    if getattr(self, n) is not None]
        if tgi_only and self.backend == ServerBackend.VLLM:
            raise ValueError(f"{', '.join(tgi_only)} are TGI settings: for vllm use vllm.maxModelLen or "
                             "vllm.extraArgs")
        return self

    @property
    def vllm_settings(self) -> VllmSettings:
        return self.vllm or VllmSettings()

    @property
    def image_ref(self) -> str:
        """`image`, else the backend's pinned image."""
        return self.image or (DEFAULT_VLLM_IMAGE if self.backend == ServerBackend.VLLM else DEFAULT_TGI_IMAGE)


class OnlineGate(ApiModel):
    """Canary evaluation through the TGI API before promotion."""

    enabled: bool = True
    """Run the online evaluation (ignored by the `Direct` strategy, which has no canary)."""
    eval_set_uri: Optional[ArtifactUri] = None
    """Evaluation records (`rag` format). Empty: the held-out split each FineTuneJob's trainer
    published (`status.adapter.evalSetUri`, verified against its `evalSetSha256`), else its
    `dataset.eval` (runs that predate publishing); with neither the rollout fails `EvalSetMissing`."""
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
    EVALUATE = "Evaluate"
    CANARY = "Canary"
    DIRECT = "Direct"


PAUSE = r"^[0-9]{1,5}(s|m|h)$"
MAX_PAUSE_SECONDS = 24 * 3600


def pause_seconds(pause: str) -> int:
    """`30s`, `2m`, `1h` -> seconds."""
    return int(pause[:-1]) * {"s": 1, "m": 60, "h": 3600}[pause[-1]]


def _check_pause(pause: str) -> str:
    if pause_seconds(pause) > MAX_PAUSE_SECONDS:
        raise ValueError(f"pause {pause!r} is longer than 24h")
    return pause


class CanaryStep(ApiModel):
    """One traffic step: the canary's share of the route's requests, held for `pause`."""

    weight: int = Field(ge=1, le=100)
    """Percent of the requests the canary receives (1..100; 100 promotes)."""
    pause: Annotated[str, Field(pattern=PAUSE, max_length=6, json_schema_extra=k8s_extensions(
        cel("duration(self) <= duration('24h')", "pause must be at most 24h"))),
        AfterValidator(_check_pause)] = "0s"
    """How long to hold this weight once the Gateway accepted it: a number and a unit, `s`, `m`
    or `h` (`30s`, `2m`, `1h`; at most 24h). `0s`: move on as soon as it is accepted."""


class GatewayRef(ApiModel):
    """The Gateway the HTTPRoute attaches to (its `parentRefs` entry)."""

    name: K8sName
    """Gateway name."""
    namespace: Optional[K8sName] = None
    """Gateway namespace (empty: the AdapterDeployment's); its listener must allow routes from
    this namespace."""
    section_name: Optional[str] = Field(None, min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    """Listener name to attach to (empty: every listener that allows the route)."""


def _check_steps(steps: list[CanaryStep]) -> list[CanaryStep]:
    for i in range(1, len(steps)):
        if steps[i].weight <= steps[i - 1].weight:
            raise ValueError(f"steps[{i}].weight ({steps[i].weight}) must be greater than steps[{i - 1}].weight "
                             f"({steps[i - 1].weight}): weights only increase")
    return steps


# A Prometheus label name (its data model: letters, digits and `_`, not starting with a digit).
PromLabelName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$")]


class PrometheusSource(ApiModel):
    """A Prometheus (or a server with its query API: Thanos, Mimir, VictoriaMetrics) that scrapes
    the server pods, queried for their counters instead of scraping the pods from the operator."""

    address: EndpointUrl
    """Base URL of its HTTP API, e.g. `http://prometheus-operated.monitoring.svc:9090` (queries go
    to `<address>/api/v1/query`). Checked when the operator connects, like S3 endpoints: never a
    link-local, unspecified or cloud-metadata address, loopback only where the operator allows it.
    No credentials (the operator reads no Secrets): an in-cluster query endpoint."""
    pod_label: PromLabelName = "pod"
    """The series label that names the pod (kube-prometheus and the Prometheus Operator: `pod`)."""
    namespace_label: PromLabelName = "namespace"
    """The series label that names the pod's namespace."""
    timeout_seconds: int = Field(10, ge=1, le=60)
    """One query's timeout; an unanswered or failed query makes the measurement Inconclusive."""


class AnalysisSpec(ApiModel):
    """Analysis of every traffic step on live signals: the canary's and the stable server's own
    Prometheus metrics, scraped from their pods when the step starts and compared at its end, and
    at every look during its pause, where only a Failed verdict counts and ends the step at once
    (TGI's `tgi_request_*`, vLLM's `http_requests_total` and `vllm:*`). Argo Rollouts' AnalysisRun
    semantics: a step's measurement is Successful, Failed or Inconclusive; an inconclusive one
    (too few canary requests) holds the step and measures it again instead of passing; more than
    `failureLimit` failed measurements roll the canary back (weight 0, canary removed, stable
    untouched, `RolledBack` naming the metric and its value)."""

    min_requests: int = Field(20, ge=1, le=1_000_000)
    """Canary requests a step must see to be judged; fewer: Inconclusive (the step is held and
    measured again). Also the stable requests needed to judge the canary-vs-stable ratios."""
    min_success_rate: float = Field(0.99, ge=0, le=1)
    """Lowest share of the canary's requests that may succeed (TGI: `tgi_request_success` /
    `tgi_request_count`; vLLM: 2xx of `http_requests_total` on the completion endpoints)."""
    max_p95_latency_ratio: float = Field(2.0, ge=1, le=1000)
    """Highest canary p95 request latency, as a multiple of the stable server's p95 in the same
    step (from the request-duration histograms)."""
    max_p95_latency_seconds: Optional[float] = Field(None, gt=0, le=3600)
    """Highest canary p95 request latency in seconds (empty: only the ratio is checked)."""
    min_tokens_per_second_ratio: float = Field(0.5, ge=0, le=1)
    """Lowest canary generation speed (generated tokens per second of request time), as a share
    of the stable server's in the same step."""
    failure_limit: int = Field(0, ge=0, le=20)
    """Failed measurements tolerated in one rollout (a failed step within the limit is held and
    measured again); one more rolls back."""
    prometheus: Optional[PrometheusSource] = None
    """Read the pods' counters from this Prometheus instead of scraping the pods (the same series
    and the same arithmetic; Prometheus' scrape interval delays what a window sees). Empty: the
    operator scrapes each pod's `/metrics`."""


class CanarySpec(ApiModel):
    """Weighted canary on live traffic through Gateway API (`type: Canary`)."""

    gateway_ref: GatewayRef
    """The Gateway whose traffic the AdapterDeployment's HTTPRoute carries."""
    hostnames: list[Annotated[str, Field(min_length=1, max_length=253,
                                         pattern=r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")]] = \
        Field(default_factory=list, max_length=16)
    """The route's `hostnames` (empty: every host the listener accepts)."""
    steps: Annotated[list[CanaryStep], Field(min_length=1, max_length=20, json_schema_extra=k8s_extensions(
        cel("self.map(s, s.weight).isSorted() && self.all(s, self.exists_one(t, t.weight == s.weight))",
            "steps[].weight must strictly increase from step to step"))),
        AfterValidator(_check_steps)]
    """Weights in increasing order, e.g. `[{weight: 10, pause: 2m}, {weight: 50, pause: 5m}]`; after
    the last step (or at weight 100) the candidate is promoted onto the stable Deployment."""
    analysis: Optional[AnalysisSpec] = None
    """Judge every step below 100% on the servers' live metrics before moving on (empty: a step
    ends when its pause has passed). The online quality evaluation (`gates.online`) runs against
    the canary before the first step either way."""


class StrategySpec(ApiModel):
    """How a new adapter set reaches the stable server."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": k8s_extensions(
            cel("!has(self.canary) || self.type == 'Canary'",
                "strategy.canary (traffic steps) needs type: Canary", field_path=".canary"),
            cel("!has(self.bake) || (has(self.canary) && has(self.canary.analysis))",
                "strategy.bake analyses the new stable server with strategy.canary.analysis's thresholds: set "
                "strategy.canary.analysis", field_path=".bake"),
        )
    }

    type: StrategyType = StrategyType.EVALUATE
    """`Evaluate`: a canary Deployment with the candidate set is evaluated online (the evaluation
    Job is its only client: it receives no user traffic), then the stable Deployment is rolled.
    `Canary` with `canary`: the same canary, then user traffic shifted to it through Gateway API
    in `canary.steps`, then promotion (`Canary` without `canary` is the former name of
    `Evaluate`). `Direct`: the stable Deployment is rolled after the offline gate."""
    canary: Optional[CanarySpec] = None
    """Traffic steps on a Gateway (`type: Canary`); ragtune owns an HTTPRoute whose weighted
    `backendRefs` point at the stable and canary Services."""
    auto_rollback: bool = True
    """On a failed or timed-out canary, remove it and keep the previous set serving. `false`
    (traffic analysis failures only, `canary.analysis`): the canary's weight goes to 0 but the
    canary stays and the rollout waits for a decision carried by the annotation
    `ragtune.dev/rollout-decision`: `rollback <token>` or `resume <token>` (measure the step again),
    the token being `status.candidate.traffic.awaitingDecision`."""
    canary_replicas: int = Field(1, ge=1, le=10)
    """Replicas of the canary Deployment."""
    bake: Optional[Annotated[str, Field(pattern=PAUSE, max_length=6, json_schema_extra=k8s_extensions(
        cel("duration(self) <= duration('24h')", "bake must be at most 24h"))),
        AfterValidator(_check_pause)]] = None
    """After a promotion that replaced a serving set: keep analysing the new stable server on its
    pods' live metrics for this long (`30m`, `2h`; at most 24h), with `canary.analysis`'s
    thresholds, the latency and speed ratios against the previous stable server's figures at the
    rollout's last successful traffic measurement (`status.bake`). A failed measurement beyond
    `failureLimit` restores the previous adapter set by digest and ends `RolledBack` (reason
    `BakeFailed`); with `autoRollback: false` the new set keeps serving and the
    AdapterDeployment turns `Degraded` (`BakeFailed`) for a person to decide with a new spec.
    Needs `canary.analysis`. Empty: no bake."""

    @model_validator(mode="after")
    def _canary_needs_type(self) -> "StrategySpec":
        if self.canary is not None and self.type != StrategyType.CANARY:
            raise ValueError("strategy.canary (traffic steps) needs type: Canary")
        if self.bake is not None and (self.canary is None or self.canary.analysis is None):
            raise ValueError("strategy.bake analyses the new stable server with strategy.canary.analysis's "
                             "thresholds: set strategy.canary.analysis")
        return self

    @property
    def evaluates(self) -> bool:
        """A canary Deployment is started and evaluated (Evaluate, Canary)."""
        return self.type != StrategyType.DIRECT

    @property
    def shifts_traffic(self) -> bool:
        """User traffic moves through a Gateway API HTTPRoute."""
        return self.type == StrategyType.CANARY and self.canary is not None


class AdapterDeploymentSpec(ApiModel):
    """The desired set of adapters on a TGI or vLLM server."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": k8s_extensions(
            cel("!has(self.server) || self.server.backend != 'vllm' || size(self.adapters) <= "
                "(!has(self.server.vllm) ? 4 : has(self.server.vllm.maxCpuLoras) ? self.server.vllm.maxCpuLoras "
                ": self.server.vllm.maxLoras)",
                "more adapters than the vLLM server holds: raise spec.server.vllm.maxCpuLoras (or maxLoras)",
                field_path=".adapters", reason="FieldValueInvalid"),
            cel("!has(self.strategy) || !has(self.strategy.canary) || !has(self.server) || "
                "!has(self.server.deploymentRef)",
                "strategy.canary routes to ragtune's own stable Service: not with server.deploymentRef",
                field_path=".strategy.canary"),
        )
    }

    base_model: ServedBaseModelRef
    """The base model the server runs; every adapter must have been trained on exactly it."""
    server: ServerSpec = Field(default_factory=ServerSpec)
    """The inference server (TGI or vLLM)."""
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

    @model_validator(mode="after")
    def _fits_the_server(self) -> "AdapterDeploymentSpec":
        if self.strategy.canary is not None and self.server.deployment_ref is not None:
            raise ValueError("strategy.canary routes to ragtune's own stable Service: not with server.deploymentRef")
        if self.server.backend == ServerBackend.VLLM:
            capacity = self.server.vllm_settings.capacity
            if len(self.adapters) > capacity:
                raise ValueError(f"adapter {self.adapters[capacity].name!r} does not fit: {len(self.adapters)} "
                                 f"adapters, the vLLM server holds {capacity} (spec.server.vllm.maxCpuLoras, "
                                 "else maxLoras)")
        return self


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


class WeightChange(ApiModel):
    """One write of the canary's weight to the HTTPRoute."""

    step: int
    """Index into `spec.strategy.canary.steps` (-1: back to the stable Service after promotion
    or on an abort)."""
    weight: int
    """Canary weight written (percent)."""
    at: str
    """When (RFC 3339)."""


class ServerMeasurement(ApiModel):
    """One server's (canary or stable) figures over one step, from its pods' metrics."""

    pods: int = 0
    """Pods scraped at both ends of the step."""
    requests: int = 0
    """Requests counted during the step."""
    success_rate: Optional[float] = None
    """Share of them that succeeded (empty without requests)."""
    p95_latency_seconds: Optional[float] = None
    """95th percentile request latency of the successful requests."""
    tokens_per_second: Optional[float] = None
    """Generated tokens per second of request time."""


class AnalysisMeasurement(ApiModel):
    """One measurement of a traffic step (`strategy.canary.analysis`)."""

    step: int
    """Index into `spec.strategy.canary.steps` (-1: the bake after promotion)."""
    weight: int
    """Canary weight during the measurement (percent; 100 in the bake)."""
    at: str
    """When it was taken (RFC 3339)."""
    phase: Literal["Successful", "Failed", "Inconclusive"]
    """The verdict."""
    message: str = ""
    """Which metric decided it, with its value and threshold."""
    canary: ServerMeasurement = Field(default_factory=ServerMeasurement)
    """The canary's figures."""
    stable: ServerMeasurement = Field(default_factory=ServerMeasurement)
    """The stable server's figures in the same window."""


class TrafficStatus(ApiModel):
    """Where the traffic steps stand (`strategy.type: Canary`); an operator restart resumes
    from here with the same weights."""

    step: int = 0
    """Index into `spec.strategy.canary.steps` being held."""
    weight: int = 0
    """Canary weight the HTTPRoute carries now (percent)."""
    route_generation: Optional[int] = None
    """`metadata.generation` of the HTTPRoute write that set `weight`."""
    step_started_at: Optional[str] = None
    """When the Gateway accepted `weight` (the step's pause counts from here); empty while
    waiting for it."""
    changes: list[WeightChange] = Field(default_factory=list, max_length=64)
    """Every weight written in this rollout, oldest first."""
    baseline: dict[str, dict[str, float]] = Field(default_factory=dict)
    """Counters of each scraped pod (`canary/<pod>`, `stable/<pod>`) when the step's
    measurement window opened (`strategy.canary.analysis`); a restarted operator measures from
    here."""
    measurements: list[AnalysisMeasurement] = Field(default_factory=list, max_length=64)
    """Every analysis measurement of this rollout, oldest first."""
    failed_measurements: int = 0
    """Failed measurements so far (compared with `analysis.failureLimit`)."""
    aborting: Optional[str] = None
    """Set when the analysis failed: the route is going back to the stable Service (weight 0);
    once the Gateway accepted that, the canary is removed and the rollout ends RolledBack with
    this message."""
    awaiting_decision: Optional[str] = None
    """`strategy.autoRollback: false` and the analysis failed: the token a decision must name in
    the annotation `ragtune.dev/rollout-decision` (`rollback <token>` or `resume <token>`); the
    canary gets no traffic meanwhile."""


class Candidate(ApiModel):
    """The adapter set being rolled out."""

    generation: int
    """`metadata.generation` of the spec this rollout serves."""
    adapters: list[ResolvedAdapter] = Field(default_factory=list)
    """The full adapter set the server will serve after promotion."""
    changed: list[str] = Field(default_factory=list)
    """Adapters that are new or changed (and therefore gated)."""
    step: Literal["Resolving", "OfflineGate", "Canary", "OnlineGate", "Traffic", "Promoting"] = "Resolving"
    """Rollout step (`Traffic`: user traffic shifting to the canary, `strategy.type: Canary`)."""
    traffic: Optional[TrafficStatus] = None
    """Traffic steps (`strategy.type: Canary`)."""
    started_at: Optional[str] = None
    """When the rollout began."""
    followed: list[str] = Field(default_factory=list)
    """Adapters (`follow: LatestSucceeded`) whose FineTuneJob's new run started this rollout; the
    other adapters keep serving what they serve. Empty: a new generation of the spec started it."""


class RolloutRecord(ApiModel):
    """One finished rollout."""

    generation: int
    """Spec generation."""
    adapters: list[str] = Field(default_factory=list)
    """`name@sha256-prefix` of each adapter in the set."""
    outcome: Literal["Promoted", "RolledBack", "Failed"]
    """How it ended."""
    followed: list[str] = Field(default_factory=list)
    """Adapters whose followed FineTuneJob's new run started it (empty: a new spec generation)."""
    reason: Optional[str] = None
    """Why (for RolledBack / Failed)."""
    started_at: Optional[str] = None
    """When it started."""
    finished_at: Optional[str] = None
    """When it ended."""


class BakeStatus(ApiModel):
    """The bake after the last promotion (`strategy.bake`): the new stable server analysed on its
    live metrics until `until`."""

    generation: int
    """`metadata.generation` of the promoted rollout."""
    started_at: str
    """When the promotion finished (RFC 3339)."""
    until: str
    """When the bake ends (RFC 3339)."""
    previous: list[ResolvedAdapter] = Field(default_factory=list)
    """The set that served before the promotion, by digest: restored when the bake fails."""
    reference: Optional[ServerMeasurement] = None
    """The previous stable server's figures at the rollout's last successful traffic measurement:
    the latency and speed ratios are judged against them (empty: only the absolute thresholds)."""
    baseline: dict[str, dict[str, float]] = Field(default_factory=dict)
    """Counters of each stable pod (`stable/<pod>`) when the current measurement window opened."""
    measurements: list[AnalysisMeasurement] = Field(default_factory=list, max_length=64)
    """The bake's measurements (`step` -1), oldest first."""
    failed_measurements: int = 0
    """Failed measurements so far (compared with `analysis.failureLimit`)."""


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
    bake: Optional[BakeStatus] = None
    """The bake under way after the last promotion (`strategy.bake`)."""
    endpoint: Optional[str] = None
    """In-cluster URL of the stable TGI Service."""
    deployment_name: Optional[str] = None
    """The stable TGI Deployment."""
    route_name: Optional[str] = None
    """The HTTPRoute ragtune owns for `strategy.type: Canary`."""
    serving_adapters: Optional[str] = None
    """Comma-separated adapter ids, for `kubectl get`."""


class AdapterDeployment(ApiModel):
    """A gated, canaried set of LoRA adapters served by TGI."""

    api_version: Literal[GROUP_VERSION] = GROUP_VERSION
    kind: Literal["AdapterDeployment"] = "AdapterDeployment"
    metadata: dict = Field(default_factory=dict)
    spec: AdapterDeploymentSpec
    status: Optional[AdapterDeploymentStatus] = None
