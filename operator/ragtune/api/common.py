"""Types shared by FineTuneJob and AdapterDeployment."""

from __future__ import annotations

import ipaddress
import re
from enum import Enum
from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, Field, ValidationInfo, model_validator

from ragtune.addresses import (
    ALWAYS_FORBIDDEN,
    HostError,
    classify_host,
    host_ip,
    looks_numeric,
    url_authority_host,
)

from .base import ApiModel, cel, k8s_extensions

# --- URIs -----------------------------------------------------------------------------

# S3 bucket naming rules: 3-63 chars of lowercase letters, digits, dots and hyphens, starting
# and ending with a letter or digit; no "..", not formatted like an IP address, none of the
# prefixes and suffixes AWS reserves.
_BUCKET = r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"
# What the CRD admits: s3:// only (in-cluster, file:// would read the pod's own filesystem); no
# control characters anywhere.
S3_URI_PATTERN = rf"^s3://{_BUCKET}(/[^\x00-\x1f\x7f]*)?$"
_IP_LIKE = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
_RESERVED_BUCKET = re.compile(r"^(xn--|sthree-|amzn-s3-demo-)|(-s3alias|--ol-s3|\.mrap|--x-s3|--table-s3)$")
_DOT_SEGMENT = re.compile(r"(^|/)\.\.?(/|$)")

IN_CLUSTER = {"in_cluster": True}
"""Validation context for objects read from the cluster (the operator, pods): `file://` URIs are
refused there. Without it (local `ragtune train -f` runs) they are accepted."""


def validate_artifact_uri(uri: str, info: Optional[ValidationInfo] = None) -> str:
    """Accept `s3://bucket[/key]` (bucket naming rules, no `.`/`..` key segments, no control
    characters) or, outside a cluster only, `file:///abs/path`."""
    in_cluster = bool(info is not None and info.context and info.context.get("in_cluster"))
    if uri.startswith("file:///") and not in_cluster:
        return uri
    if uri.startswith("file://"):
        raise ValueError(f"{uri!r}: file:// URIs are for local runs only; in a cluster use s3://bucket/key")
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} must be an s3://bucket/prefix URI (or file:///path for local runs)")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in uri):
        raise ValueError(f"{uri!r} contains control characters")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not re.fullmatch(_BUCKET, bucket):
        raise ValueError(
            f"bucket {bucket!r} in {uri!r} breaks S3 naming rules: 3-63 lowercase letters, digits, "
            "dots or hyphens, starting and ending with a letter or digit"
        )
    if ".." in bucket or _IP_LIKE.match(bucket):
        raise ValueError(f"bucket {bucket!r} in {uri!r} must not contain '..' or look like an IP address")
    if _RESERVED_BUCKET.search(bucket):
        raise ValueError(f"bucket {bucket!r} in {uri!r} uses a prefix or suffix S3 reserves "
                         "(xn--, sthree-, amzn-s3-demo-, -s3alias, --ol-s3, .mrap, --x-s3, --table-s3)")
    if _DOT_SEGMENT.search(key):
        raise ValueError(f"key {key!r} in {uri!r} must not contain '.' or '..' path segments")
    return uri


# CEL rules of an S3 URI (a file:/// URI passes them: its third '/' part is empty).
_S3_URI_RULES = (
    cel(
        "!self.split('/')[2].contains('..')",
        "S3 bucket names must not contain '..'",
    ),
    cel(
        r"!self.split('/')[2].matches('^[0-9]{1,3}(\\.[0-9]{1,3}){3}$')",
        "S3 bucket names must not be formatted like an IP address",
    ),
    cel(
        r"!self.split('/')[2].matches('^(xn--|sthree-|amzn-s3-demo-)|(-s3alias|--ol-s3|\\.mrap|--x-s3|--table-s3)$')",
        "S3 bucket names must not use a reserved prefix (xn--, sthree-, amzn-s3-demo-) or suffix "
        "(-s3alias, --ol-s3, .mrap, --x-s3, --table-s3)",
    ),
    cel(
        r"!self.matches('^s3://[^/]*/(.*/)?\\.\\.?(/|$)')",
        "S3 keys must not contain '.' or '..' path segments",
    ),
)

ArtifactUri = Annotated[
    str,
    Field(
        max_length=1024,
        # The pattern is the CRD's (s3:// only); the model's check is validate_artifact_uri.
        json_schema_extra={"pattern": S3_URI_PATTERN, **k8s_extensions(*_S3_URI_RULES)},
    ),
    AfterValidator(lambda uri, info: validate_artifact_uri(uri, info)),  # `info` required: pydantic passes it
]

_IPV4_CANONICAL = r"^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
# The CRD's grammar for an endpoint: no userinfo (credentials belong in the Secret), no zone id,
# no trailing dot, ASCII only (IDNA as xn--), a path of plain characters, no query/fragment.
ENDPOINT_PATTERN = rf"^https?://(\[[0-9A-Fa-f:]+\]|{_LABEL}(\.{_LABEL})*)(:[0-9]{{1,5}})?(/[-A-Za-z0-9._~/]*)?$"
_ENDPOINT_RE = re.compile(ENDPOINT_PATTERN)
# IPv6 literals that carry an IPv4 address (compatible/mapped/SIIT: a zero first group; NAT64,
# 6to4, Teredo): refused at admission, whatever IPv4 address they carry (`::1` aside).
_V6_EMBEDDING = ["::/16", "64:ff9b::/32", "2002::/16", "2001::/32"]


def validate_endpoint(url: str) -> str:
    """An http(s) URL whose host, normalised the way HTTP clients read it, is not a link-local,
    unspecified or cloud-metadata address; spelled plainly (see `ENDPOINT_PATTERN`)."""
    if not re.match(r"^https?://", url):
        raise ValueError(f"endpoint {url!r} must be an http:// or https:// URL")
    raw_host = url_authority_host(url)
    try:
        host, kind = classify_host(raw_host)
    except HostError as exc:
        raise ValueError(f"endpoint {url!r}: {exc}") from None
    if kind in ALWAYS_FORBIDDEN:
        raise ValueError(f"endpoint {url!r} points at a {kind.value} address ({host}); "
                         "that is never an S3 endpoint")
    if "@" in url:
        raise ValueError(f"endpoint {url!r} must not carry userinfo ('@'): S3 credentials belong in "
                         "credentialsSecretRef")
    if not _ENDPOINT_RE.match(url):
        raise ValueError(f"endpoint {url!r} must be http(s)://host[:port][/path] with a DNS name, a dotted-decimal "
                         "IPv4 address or a bracketed IPv6 address (no zone id, trailing dot, query or non-ASCII "
                         "characters)")
    ip = host_ip(host)
    if ip is None and looks_numeric(raw_host):
        raise ValueError(f"endpoint {url!r}: a numeric host must be a dotted-decimal IPv4 address")
    if ip is not None and ip.version == 4 and not raw_host.startswith("[") and not re.match(_IPV4_CANONICAL, raw_host):
        raise ValueError(f"endpoint {url!r}: write the IPv4 address {host} in dotted decimal")
    if ip is not None and ip.version == 6 and any(ip in ipaddress.ip_network(n) for n in _V6_EMBEDDING) \
            and not ip.is_loopback:
        raise ValueError(f"endpoint {url!r}: IPv6 literals that embed an IPv4 address are refused; "
                         "write the IPv4 address")
    if ip is not None and ip.version == 4 and raw_host.startswith("["):
        raise ValueError(f"endpoint {url!r}: only IPv6 addresses go in brackets")
    return url


# The CRD's rules work on the URL text (CRD CEL has no variable bindings): the pattern admits no
# '@', so the host is what follows "://" up to ':', '/' or the end.
_END = "(:|/|$)"
# IPv6 literals as text (the pattern admits hex and ':' only, groups have at most 4 digits):
# link-local fe80::/10, a zero first group (::/96 with the IPv4-compatible and -mapped forms, and
# `::`), NAT64 64:ff9b::/32, 6to4 2002::/16, Teredo 2001::/32, AWS metadata fd00:ec2::254.
_V6_FORBIDDEN = (r"^https?://\[(?i)(fe[89ab][0-9a-f]:|:|0{1,4}:|0{0,2}64:ff9b:|2002:|2001:(0{1,4}:|:)"
                 r"|fd00:0?ec2:[0:]*254\])")
_V6_LOOPBACK = r"^https?://\[[0:]*:0{0,3}1\]"


def _cel_regex(regex: str) -> str:
    return regex.replace("\\", "\\\\")


EndpointUrl = Annotated[
    str,
    Field(
        max_length=512,
        json_schema_extra={"pattern": ENDPOINT_PATTERN, **k8s_extensions(
            cel(
                f"!self.matches('{_cel_regex(r'^https?://([^/:[]*[.])?([0-9]+|0[xX][0-9a-fA-F]*)' + _END)}') || "
                f"self.matches('{_cel_regex('^https?://' + _IPV4_CANONICAL[1:-1] + _END)}')",
                "a numeric host must be a dotted-decimal IPv4 address (no decimal, hex, octal or short forms)",
            ),
            cel(
                f"!self.matches('{_cel_regex(r'^https?://(169[.]254[.]|0[.]|(100[.]100[.]100[.]200|192[.]0[.]0[.]192|168[.]63[.]129[.]16)' + _END + ')')}')",
                "must not be a link-local, unspecified or cloud-metadata address such as 169.254.169.254",
            ),
            cel(
                f"!self.lowerAscii().matches('{_cel_regex(r'^https?://([^/:]*[.])?(metadata|metadata[.]google[.]internal|metadata[.]goog|instance-data|instance-data[.]ec2[.]internal|metadata[.]tencentyun[.]com)' + _END)}')",
                "must not point at a cloud metadata service (metadata.google.internal, instance-data, ...)",
            ),
            cel(
                f"!self.matches('{_cel_regex(_V6_FORBIDDEN)}') || self.matches('{_cel_regex(_V6_LOOPBACK)}')",
                "an IPv6 endpoint must not be link-local (fe80::/10), unspecified, the cloud metadata address "
                "fd00:ec2::254 or a form that embeds an IPv4 address (::/96, 64:ff9b::/32, 2002::/16, 2001::/32)",
            ),
        )},
    ),
    AfterValidator(validate_endpoint),
]

IMAGE_REF = (r"^([A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*(:[0-9]{1,5})?/)?"
             r"[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*(/[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*)*"
             r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$")
"""A container image reference ([registry[:port]/]path[:tag][@sha256:digest]): no spaces or shell
characters reach a pod spec."""

# DNS-1123 label: what Kubernetes accepts as a Secret / Job / Deployment name.
K8sName = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")]

# A key of a Secret's data: what Kubernetes accepts (and never empty).
SecretKeyName = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]

# A Kubernetes qualified name (label keys, node selector keys): `[prefix/]name`, the prefix a
# DNS subdomain, the name 1-63 alphanumerics, '-', '_' or '.' starting and ending alphanumeric.
QUALIFIED_NAME = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                  r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
# A label value: empty or up to 63 alphanumerics, '-', '_' or '.' starting and ending alphanumeric.
LABEL_VALUE = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$"
# An extended resource name: a domain-prefixed qualified name outside kubernetes.io.
EXTENDED_RESOURCE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+/[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"


def _not_kubernetes_io(name: str) -> str:
    domain = name.split("/", 1)[0]
    if domain == "kubernetes.io" or domain.endswith(".kubernetes.io"):
        raise ValueError(f"{name!r}: extended resources may not use the kubernetes.io domain")
    return name


ExtendedResourceName = Annotated[
    str,
    Field(max_length=253, pattern=EXTENDED_RESOURCE, json_schema_extra=k8s_extensions(
        cel("!self.split('/')[0].matches('(^|\\\\.)kubernetes\\\\.io$')",
            "extended resources may not use the kubernetes.io domain"))),
    AfterValidator(_not_kubernetes_io),
]


def _positive_quantity(value: str) -> str:
    if not re.match(r"^[0-9.]*[1-9]", value):
        raise ValueError(f"{value!r} must be greater than zero")
    return value


_POSITIVE = k8s_extensions(cel("self.matches('^[0-9.]*[1-9]')", "must be greater than zero"))
CpuQuantity = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+|m)?$", max_length=32, json_schema_extra=_POSITIVE),
                        AfterValidator(_positive_quantity)]
"""A CPU quantity greater than zero: `4`, `0.5`, `500m`."""
MemoryQuantity = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$", max_length=32,
                                      json_schema_extra=_POSITIVE), AfterValidator(_positive_quantity)]
"""A memory quantity greater than zero: `32Gi`, `512Mi`."""


def _label_map(what: str, max_items: int, admission: bool = True):
    """A map of label keys to label values (a node selector, `matchLabels`); keys are checked by
    the model and, with `admission`, by CEL (a structural schema cannot constrain map keys).
    `admission` False for maps nested in lists, where a key rule's estimated CEL cost (unbounded
    key length x every enclosing list's size) would risk the CRD's cost budget: the operator's
    model refuses a bad key (`InvalidSpec`, naming the field), and the API server the pod."""

    def check_keys(labels: dict[str, str]) -> dict[str, str]:
        for key in labels:
            if not re.match(QUALIFIED_NAME, key) or len(key) > 317:
                raise ValueError(f"{what} key {key!r} is not a valid label key ([prefix/]name, name at most "
                                 "63 alphanumerics, '-', '_' or '.')")
        return labels

    rules = [cel(f"self.all(k, k.size() <= 317 && k.matches('{QUALIFIED_NAME.replace(chr(92), chr(92) * 2)}'))",
                 f"{what} keys must be valid label keys ([prefix/]name, name at most 63 alphanumerics, "
                 "'-', '_' or '.')")] if admission else []
    return Annotated[
        dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]],
        Field(max_length=max_items, json_schema_extra=k8s_extensions(*rules)),
        AfterValidator(check_keys),
    ]


NodeSelector = _label_map("node selector", 64)
"""Node labels a pod must match."""


# --- Pod placement (FineTuneJob `resources`, AdapterDeployment `server`) -------------------


class Toleration(ApiModel):
    """A pod toleration (core/v1 Toleration)."""

    key: Optional[str] = None
    """Taint key; empty with `Exists` matches every taint."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """`Exists` or `Equal`."""
    value: Optional[str] = None
    """Taint value for `Equal`."""
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]] = None
    """Taint effect; empty matches all effects."""
    toleration_seconds: Optional[int] = None
    """For `NoExecute`: how long the pod stays bound after the taint appears."""


LabelKey = Annotated[str, Field(max_length=317, pattern=QUALIFIED_NAME)]
"""A label key: `[prefix/]name`."""
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]
"""A label value: empty or up to 63 alphanumerics, '-', '_' or '.'."""
_SET_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


def _check_requirement(operator: str, values: list[str], what: str) -> None:
    if operator in ("In", "NotIn") and not values:
        raise ValueError(f"{what} operator {operator} needs at least one value")
    if operator in ("Exists", "DoesNotExist") and values:
        raise ValueError(f"{what} operator {operator} takes no values")
    if operator in ("Gt", "Lt") and (len(values) != 1 or not re.fullmatch(r"-?[0-9]+", values[0])):
        raise ValueError(f"{what} operator {operator} needs exactly one integer value")


_REQUIREMENT_RULE = cel(
    "self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0) : "
    "self.operator in ['Exists', 'DoesNotExist'] ? (!has(self.values) || size(self.values) == 0) : "
    "(has(self.values) && size(self.values) == 1 && self.values[0].matches('^-?[0-9]+$'))",
    "In and NotIn need at least one value, Exists and DoesNotExist none, Gt and Lt exactly one integer",
    field_path=".values", reason="FieldValueInvalid")


class NodeSelectorRequirement(ApiModel):
    """One node label test (core/v1 NodeSelectorRequirement)."""

    model_config = ApiModel.model_config | {"json_schema_extra": k8s_extensions(_REQUIREMENT_RULE)}

    key: LabelKey
    """Node label key."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    """`In`/`NotIn` (one of `values`), `Exists`/`DoesNotExist` (no values), `Gt`/`Lt` (one integer value)."""
    values: list[LabelValue] = Field(default_factory=list, max_length=64)
    """Label values to compare with."""

    @model_validator(mode="after")
    def _values_fit_operator(self) -> "NodeSelectorRequirement":
        _check_requirement(self.operator, self.values, f"node selector requirement {self.key!r}:")
        return self


class NodeSelectorTerm(ApiModel):
    """Node label tests that must all hold (core/v1 NodeSelectorTerm, `matchExpressions` only)."""

    match_expressions: list[NodeSelectorRequirement] = Field(min_length=1, max_length=32)
    """Requirements, ANDed."""


class RequiredNodeTerms(ApiModel):
    """Terms of which at least one must match (core/v1 NodeSelector)."""

    node_selector_terms: list[NodeSelectorTerm] = Field(min_length=1, max_length=16)
    """Terms, ORed."""


class PreferredSchedulingTerm(ApiModel):
    """A weighted node preference."""

    weight: int = Field(ge=1, le=100)
    """Weight 1-100, added to a node's score when `preference` matches."""
    preference: NodeSelectorTerm
    """The node labels preferred."""


class NodeAffinity(ApiModel):
    """Which nodes the pods may (required) or should (preferred) run on."""

    required_during_scheduling_ignored_during_execution: Optional[RequiredNodeTerms] = None
    """Hard rule: pods are only scheduled onto nodes matching one of its terms."""
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] = Field(
        default_factory=list, max_length=16)
    """Soft rules: nodes matching them score higher."""


class LabelSelectorRequirement(ApiModel):
    """One pod label test (metav1 LabelSelectorRequirement)."""

    model_config = ApiModel.model_config | {"json_schema_extra": k8s_extensions(cel(
        "self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0) : "
        "(!has(self.values) || size(self.values) == 0)",
        "In and NotIn need at least one value, Exists and DoesNotExist none",
        field_path=".values", reason="FieldValueInvalid"))}

    key: LabelKey
    """Pod label key."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    """`In`/`NotIn` (one of `values`) or `Exists`/`DoesNotExist` (no values)."""
    values: list[LabelValue] = Field(default_factory=list, max_length=64)
    """Label values to compare with."""

    @model_validator(mode="after")
    def _values_fit_operator(self) -> "LabelSelectorRequirement":
        _check_requirement(self.operator, self.values, f"label selector requirement {self.key!r}:")
        return self


class LabelSelector(ApiModel):
    """Pods selected by their labels (metav1 LabelSelector); both parts ANDed."""

    match_labels: _label_map("matchLabels", 32, admission=False) = Field(default_factory=dict)
    """Labels the pods must carry with exactly these values."""
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list, max_length=32)
    """Further label tests."""


class PodAffinityTerm(ApiModel):
    """Pods of this namespace that match `labelSelector`, counted per `topologyKey` domain."""

    label_selector: LabelSelector
    """The pods this term is about (e.g. the server's own: `app.kubernetes.io/instance: <name>`)."""
    topology_key: LabelKey
    """Node label whose value is the domain, e.g. `kubernetes.io/hostname` (one node) or
    `topology.kubernetes.io/zone`."""


class WeightedPodAffinityTerm(ApiModel):
    """A weighted pod (anti-)affinity preference."""

    weight: int = Field(ge=1, le=100)
    """Weight 1-100."""
    pod_affinity_term: PodAffinityTerm
    """The term."""


class PodAffinity(ApiModel):
    """Run in the same (affinity) or another (anti-affinity) topology domain as other pods."""

    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] = Field(
        default_factory=list, max_length=16)
    """Hard rules."""
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] = Field(
        default_factory=list, max_length=16)
    """Soft rules."""


class Affinity(ApiModel):
    """Scheduling constraints (core/v1 Affinity) in the same wire form, limited to what placement
    of ragtune's pods needs: node terms by `matchExpressions`, pod terms within the object's own
    namespace (no `namespaces`/`namespaceSelector`, `matchFields` or `matchLabelKeys`)."""

    node_affinity: Optional[NodeAffinity] = None
    """Node constraints (e.g. a GPU type)."""
    pod_affinity: Optional[PodAffinity] = None
    """Co-location with other pods."""
    pod_anti_affinity: Optional[PodAffinity] = None
    """Spreading away from other pods (e.g. replicas on different nodes)."""


# --- S3 ------------------------------------------------------------------------------


class S3CredentialsSecretRef(ApiModel):
    """A Secret in the object's own namespace holding S3 credentials. The operator never reads
    it: the pods that need S3 get its keys as environment variables via `secretKeyRef`."""

    name: K8sName
    """Name of the Secret (same namespace as this object)."""
    access_key_id_key: SecretKeyName = "AWS_ACCESS_KEY_ID"
    """Key in the Secret holding the access key id."""
    secret_access_key_key: SecretKeyName = "AWS_SECRET_ACCESS_KEY"
    """Key in the Secret holding the secret access key."""
    session_token_key: Optional[SecretKeyName] = None
    """Optional key in the Secret holding a session token."""


class S3Config(ApiModel):
    """Where S3 lives and how pods authenticate to it."""

    endpoint: Optional[EndpointUrl] = None
    """S3-compatible endpoint URL (MinIO, Ceph, R2, ...). Empty means AWS S3. Link-local and
    cloud-metadata addresses are refused."""
    region: str = Field("us-east-1", max_length=64, pattern=r"^[A-Za-z0-9]([A-Za-z0-9_-]*[A-Za-z0-9])?$")
    """Region passed to the S3 client (letters, digits, '-' and '_')."""
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
    key: SecretKeyName = "token"
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


def _served_model_uri(uri: str) -> str:
    if uri.startswith("file:///"):
        return uri
    return validate_artifact_uri(uri)


ServedModelUri = Annotated[
    str,
    Field(max_length=1024, json_schema_extra={"pattern": rf"^(s3://{_BUCKET}(/[^\x00-\x1f\x7f]*)?|file:///[^\x00-\x1f\x7f]*)$",
                                              **k8s_extensions(*_S3_URI_RULES)}),
    AfterValidator(_served_model_uri),
]
"""An S3 prefix, or `file:///path` for weights already inside the serving image or on its node:
the server loads its model from there and nothing is copied out of the pod."""


class ServedBaseModelRef(BaseModelRef):
    """The base model a server runs: a Hugging Face id and pinned revision, optionally with the
    location of its weights. `id` + `revision` are its identity: adapters are only deployed onto
    the base model they were trained on."""

    uri: Optional[ServedModelUri] = None
    """Where the weights are: an `s3://` prefix in Hugging Face layout (the adapter fetcher
    downloads and verifies it) or `file:///path` inside the server container (weights baked into
    the image or mounted from the node). Empty means the Hugging Face Hub."""


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


class RefusalByConstruction(ApiModel):
    """Refusal rate on the unanswerable items of each construction (None: none evaluated)."""

    off_topic: Optional[float] = None
    """Only passages about something else: the easy case."""
    near_miss: Optional[float] = None
    """Gold passages replaced by the most similar other passages: on topic, no answer."""
    answer_removed: Optional[float] = None
    """The answer's sentences deleted from the gold passages."""
    user_labelled: Optional[float] = None
    """Records the dataset marks `answerable: false`."""


class EvalMetrics(ApiModel):
    """RAG generator quality on a held-out set (docs/architecture.md, The RAG contract). Rates are in [0, 1]."""

    samples: int = 0
    """Number of evaluated items."""
    f1: Optional[float] = None
    """Token F1 against the reference answer (SQuAD normalisation), answerable items."""
    exact_match: Optional[float] = None
    """Exact match against the reference answer, answerable items."""
    rouge_l: Optional[float] = None
    """ROUGE-L F-measure against the reference answer, answerable items."""
    refusal_rate: Optional[float] = None
    """Share of unanswerable items the model refused (higher is better), all constructions."""
    refusal_by_construction: Optional[RefusalByConstruction] = None
    """`refusalRate` per way the unanswerable items were built (offline evaluation)."""
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


class PromptGap(ApiModel):
    """How much the adapter's behaviour moves under a foreign prompt: absolute differences
    between its metrics under the trained prompt and under the foreign one (docs/architecture.md,
    The RAG contract)."""

    refusal_rate: Optional[float] = None
    """|refusalRate(trained) - refusalRate(foreign)|."""
    false_refusal_rate: Optional[float] = None
    """|falseRefusalRate(trained) - falseRefusalRate(foreign)|."""
    f1: Optional[float] = None
    """|f1(trained) - f1(foreign)|."""
    max: Optional[float] = None
    """The largest of the three measured (what `maxForeignPromptGap` gates)."""


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
    """Minimum refusal rate on unanswerable items, of the construction `refusalConstruction`
    names."""
    refusal_construction: Literal["hardest", "all", "offTopic", "nearMiss", "answerRemoved", "userLabelled"] = "hardest"
    """Which unanswerable items `minRefusalRate` applies to: `hardest` is the construction with
    the lowest measured refusal rate, `all` the pooled rate. Where no per-construction rates
    were measured (e.g. an online evaluation) it falls back to the pooled rate."""
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
    max_foreign_prompt_gap: Optional[float] = Field(None, ge=0, le=1)
    """Maximum `foreignPromptGap.max`: the largest absolute difference of refusal rate,
    false-refusal rate and F1 between the trained prompt and the foreign prompt. Measured by
    the offline (FineTuneJob) evaluation only; an online gate that sets it fails as not measured."""
    confidence: Optional[float] = Field(None, ge=0.5, le=0.999)
    """Gate on the bootstrap confidence interval instead of the point estimate: a `min*` gate
    passes only when the interval's lower bound holds, a `max*` gate when its upper bound does,
    `*GainOverBase` on the interval of the adapter-minus-base difference (paired over the same
    items). E.g. 0.95, so a gate cannot pass on noise. `maxForeignPromptGap` stays on the point
    value. Unset: point estimates (the intervals are reported either way). Intervals are computed
    where the answers are: the FineTuneJob's evaluation and the online gate; an AdapterDeployment
    offline gate only reads the run's status, so there it fails as not measured — set it on the
    FineTuneJob's thresholds instead."""


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
    """How far the compared figure (`value`, or `bound` under `confidence`) is on the good side
    of `threshold` (negative: by how much it failed)."""
    interval: Optional[list[float]] = Field(None, min_length=2, max_length=2)
    """Bootstrap confidence interval `[low, high]` of `value`, where one was computed."""
    bound: Optional[float] = None
    """Under `confidence`: the end of `interval` compared with `threshold` (the lower end for
    `>=`, the upper for `<=`)."""
