"""Types shared by FineTuneJob and AdapterDeployment."""

from __future__ import annotations

import ipaddress
import re
from enum import Enum
from typing import Annotated, Literal, Optional
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field

from .base import ApiModel, cel, k8s_extensions

# --- URIs -----------------------------------------------------------------------------

# S3 bucket naming rules: 3-63 chars of lowercase letters, digits, dots and hyphens, starting
# and ending with a letter or digit; no "..", not formatted like an IP address.
_BUCKET = r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"
ARTIFACT_URI_PATTERN = rf"^(s3://{_BUCKET}(/.*)?|file:///.*)$"
_IP_LIKE = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")


def validate_artifact_uri(uri: str) -> str:
    """Accept `s3://bucket[/prefix]` (bucket naming rules enforced) or `file:///abs/path`."""
    if uri.startswith("file:///"):
        return uri
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} must be an s3://bucket/prefix URI (or file:///path for local runs)")
    bucket = uri[len("s3://"):].split("/", 1)[0]
    if not re.fullmatch(_BUCKET, bucket):
        raise ValueError(
            f"bucket {bucket!r} in {uri!r} breaks S3 naming rules: 3-63 lowercase letters, digits, "
            "dots or hyphens, starting and ending with a letter or digit"
        )
    if ".." in bucket or _IP_LIKE.match(bucket):
        raise ValueError(f"bucket {bucket!r} in {uri!r} must not contain '..' or look like an IP address")
    return uri


ArtifactUri = Annotated[
    str,
    Field(
        max_length=1024,
        pattern=ARTIFACT_URI_PATTERN,
        json_schema_extra=k8s_extensions(
            cel(
                "!self.startsWith('s3://') || !self.split('/')[2].contains('..')",
                "S3 bucket names must not contain '..'",
            ),
            cel(
                r"!self.startsWith('s3://') || !self.split('/')[2].matches('^[0-9]{1,3}(\\.[0-9]{1,3}){3}$')",
                "S3 bucket names must not be formatted like an IP address",
            ),
        ),
    ),
    AfterValidator(validate_artifact_uri),
]

# Endpoints that hand out cloud credentials to whoever can reach them: never an S3 endpoint.
_METADATA_HOSTS = {"metadata.google.internal", "metadata", "instance-data"}


def validate_endpoint(url: str) -> str:
    """An http(s) URL that is not a link-local / cloud-metadata address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"endpoint {url!r} must be an http:// or https:// URL with a host")
    host = parts.hostname
    if host in _METADATA_HOSTS:
        raise ValueError(f"endpoint {url!r} points at a cloud metadata service")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return url
    if address.is_link_local or str(address) == "fd00:ec2::254":
        raise ValueError(f"endpoint {url!r} is a link-local (cloud metadata) address")
    return url


EndpointUrl = Annotated[
    str,
    Field(
        max_length=512,
        pattern=r"^https?://",
        json_schema_extra=k8s_extensions(
            cel("isURL(self)", "must be a valid URL"),
            cel(
                "!isURL(self) || !(url(self).getHostname() in "
                "['metadata.google.internal', 'metadata', 'instance-data'])",
                "must not point at a cloud metadata service",
            ),
            # A regex, not url()/ip(): the ip() form exceeds the API server's CEL cost budget.
            cel(
                r"!self.matches('^https?://([^/@]*@)?(169\\.254\\.|\\[(?i:fe[89ab][0-9a-f]:|fd00:ec2::254\\]))')",
                "must not be a link-local address such as 169.254.169.254 (cloud metadata)",
            ),
        ),
    ),
    AfterValidator(validate_endpoint),
]

# DNS-1123 label: what Kubernetes accepts as a Secret / Job / Deployment name.
K8sName = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")]


# --- S3 ------------------------------------------------------------------------------


class S3CredentialsSecretRef(ApiModel):
    """A Secret in the object's own namespace holding S3 credentials. The operator never reads
    it: the pods that need S3 get its keys as environment variables via `secretKeyRef`."""

    name: K8sName
    """Name of the Secret (same namespace as this object)."""
    access_key_id_key: str = "AWS_ACCESS_KEY_ID"
    """Key in the Secret holding the access key id."""
    secret_access_key_key: str = "AWS_SECRET_ACCESS_KEY"
    """Key in the Secret holding the secret access key."""
    session_token_key: Optional[str] = None
    """Optional key in the Secret holding a session token."""


class S3Config(ApiModel):
    """Where S3 lives and how pods authenticate to it."""

    endpoint: Optional[EndpointUrl] = None
    """S3-compatible endpoint URL (MinIO, Ceph, R2, ...). Empty means AWS S3. Link-local and
    cloud-metadata addresses are refused."""
    region: str = "us-east-1"
    """Region passed to the S3 client."""
    addressing_style: Literal["path", "virtual", "auto"] = "path"
    """Bucket addressing style; `path` works with every S3-compatible server."""
    credentials_secret_ref: Optional[S3CredentialsSecretRef] = None
    """Secret with the S3 credentials. Empty means the pod's ambient identity (IRSA, workload
    identity, instance profile)."""


# --- Models ---------------------------------------------------------------------------


class SecretKeyRef(ApiModel):
    """One key of a Secret in the object's namespace."""

    name: K8sName
    """Name of the Secret."""
    key: str = "token"
    """Key in the Secret."""


class BaseModelRef(ApiModel):
    """The base model: a Hugging Face id and pinned revision, optionally with the location of
    its weights in S3. `id` + `revision` are its identity: adapters are only deployed onto the
    base model they were trained on."""

    id: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
    """Model id, e.g. `HuggingFaceTB/SmolLM2-135M-Instruct`."""
    revision: str = Field("main", min_length=1, max_length=128)
    """Revision (a commit sha is strongly recommended: branches move)."""
    uri: Optional[ArtifactUri] = None
    """Where the weights are (an `s3://` prefix in Hugging Face layout). Empty means the Hugging
    Face Hub (or the local Hugging Face cache)."""
    token_secret_ref: Optional[SecretKeyRef] = None
    """Secret holding a Hugging Face token, for gated models downloaded from the Hub."""


# --- Conditions -----------------------------------------------------------------------


class ConditionStatus(str, Enum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(ApiModel):
    """A Kubernetes-style condition (same shape as metav1.Condition)."""

    type: str
    """Condition type in CamelCase, e.g. `Ready`, `Succeeded`."""
    status: ConditionStatus
    """`True`, `False` or `Unknown`."""
    reason: str
    """One CamelCase word saying why, e.g. `SecretNotFound`."""
    message: str = ""
    """Human-readable details."""
    last_transition_time: str
    """When `status` last changed (RFC 3339)."""
    observed_generation: Optional[int] = None
    """The `metadata.generation` this condition was computed from."""


# --- Evaluation -----------------------------------------------------------------------


class EvalMetrics(ApiModel):
    """RAG generator quality on a held-out set (see DESIGN.md, Evaluation). Rates are in [0, 1]."""

    samples: int = 0
    """Number of evaluated items."""
    f1: Optional[float] = None
    """Token F1 against the reference answer (SQuAD normalisation), answerable items."""
    exact_match: Optional[float] = None
    """Exact match against the reference answer, answerable items."""
    rouge_l: Optional[float] = None
    """ROUGE-L F-measure against the reference answer, answerable items."""
    refusal_rate: Optional[float] = None
    """Share of unanswerable items the model refused (higher is better)."""
    false_refusal_rate: Optional[float] = None
    """Share of answerable items the model refused (lower is better)."""
    citation_validity: Optional[float] = None
    """Share of cited context ids that exist in the prompt."""
    citation_precision: Optional[float] = None
    """Share of cited contexts that are gold supporting contexts."""
    citation_recall: Optional[float] = None
    """Share of gold supporting contexts that were cited."""
    grounding_score: Optional[float] = None
    """Share of answer content tokens found in the provided contexts."""
    mean_answer_words: Optional[float] = None
    """Mean answer length in words."""


class MetricThresholds(ApiModel):
    """Gates: every threshold that is set must hold. `*GainOverBase` compare the adapter with
    the base model on the same items."""

    min_f1: Optional[float] = Field(None, ge=0, le=1)
    """Minimum answer F1."""
    min_exact_match: Optional[float] = Field(None, ge=0, le=1)
    """Minimum exact match."""
    min_rouge_l: Optional[float] = Field(None, ge=0, le=1)
    """Minimum ROUGE-L."""
    min_refusal_rate: Optional[float] = Field(None, ge=0, le=1)
    """Minimum refusal rate on unanswerable items."""
    max_false_refusal_rate: Optional[float] = Field(None, ge=0, le=1)
    """Maximum refusal rate on answerable items."""
    min_citation_validity: Optional[float] = Field(None, ge=0, le=1)
    """Minimum share of citations that point at an existing context."""
    min_grounding_score: Optional[float] = Field(None, ge=0, le=1)
    """Minimum grounding score."""
    min_f1_gain_over_base: Optional[float] = Field(None, ge=-1, le=1)
    """Minimum F1 improvement over the base model (adapter - base)."""
    min_refusal_gain_over_base: Optional[float] = Field(None, ge=-1, le=1)
    """Minimum refusal-rate improvement over the base model (adapter - base)."""


class GateResult(ApiModel):
    """The outcome of one threshold."""

    metric: str
    """Metric name, e.g. `refusalRate`, or `f1GainOverBase`."""
    comparison: Literal[">=", "<="]
    """How `value` is compared with `threshold`."""
    threshold: float
    """The configured threshold."""
    value: Optional[float] = None
    """The measured value (empty when the metric could not be computed)."""
    passed: bool
    """Whether the threshold holds."""
    margin: Optional[float] = None
    """How far `value` is on the good side of `threshold` (negative: by how much it failed)."""
