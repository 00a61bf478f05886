"""Pure builders of the pod-spec pieces that both controllers render (no Kubernetes calls).

One home for what every pod ragtune starts must get the same way: S3 settings with credentials
only as `secretKeyRef` (the operator never reads a Secret), owner references, the `restricted`
Pod Security Standard's security contexts, and names and label values derived from an owner's
name that are valid whatever that (valid) name is.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Optional

from ragtune.addresses import ALLOW_LOOPBACK_ENV
from ragtune.api.common import S3Config
from ragtune.api.keys import GROUP_VERSION

MAX_LABEL = 63
"""Kubernetes' limit for label values and for DNS-1035 labels (Service names)."""

RUNTIME_DEFAULT_SECCOMP = {"type": "RuntimeDefault"}


def short_hash(text: str, n: int = 6) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def label_value(value: str) -> str:
    """`value` as a valid label value: at most 63 characters, alphanumeric at both ends; a value
    that had to change keeps a hash of the original so distinct values stay distinct."""
    if len(value) <= MAX_LABEL and re.fullmatch(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]", value):
        return value
    cleaned = re.sub(r"[^-A-Za-z0-9_.]", "-", value)[:MAX_LABEL - 7].strip("-_.") or "x"
    return f"{cleaned}-{short_hash(value)}"


def child_name(owner: str, suffix: str) -> str:
    """`<owner><suffix>` as a DNS-1035 label (valid for every kind, Services included: lower-case
    alphanumerics and `-`, a letter first, at most 63 characters). An owner name that does not fit
    as is (a dot, a digit first, too long) is shortened and keeps a hash of the full name, so two
    owners never share a child and the same owner always gets the same one."""
    full = owner + suffix
    if len(full) <= MAX_LABEL and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", full):
        return full
    stem = re.sub(r"[^-a-z0-9]", "-", owner.lower())
    stem = stem if stem[:1].isalpha() else f"x{stem}"
    stem = stem[:MAX_LABEL - len(suffix) - 7].strip("-") or "x"
    return f"{stem}-{short_hash(owner)}{suffix}"

RESTRICTED_CONTAINER: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": RUNTIME_DEFAULT_SECCOMP,
}
"""What the `restricted` Pod Security Standard requires of every container."""


def restricted_container(*, user: int | None = None, read_only_root: bool = False) -> dict[str, Any]:
    """A container securityContext meeting `restricted` (fresh dict: callers may extend it)."""
    ctx: dict[str, Any] = {**RESTRICTED_CONTAINER, "capabilities": {"drop": ["ALL"]},
                           "seccompProfile": dict(RUNTIME_DEFAULT_SECCOMP)}
    if read_only_root:
        ctx["readOnlyRootFilesystem"] = True
    if user is not None:
        ctx.update(runAsUser=user, runAsGroup=user)
    return ctx


def restricted_pod(user: int) -> dict[str, Any]:
    """A pod securityContext meeting `restricted`, files owned by `user`'s group."""
    return {"runAsNonRoot": True, "runAsUser": user, "runAsGroup": user, "fsGroup": user,
            "seccompProfile": dict(RUNTIME_DEFAULT_SECCOMP)}


def owner_reference(kind: str, name: str, uid: str) -> dict[str, Any]:
    """The controller reference of a child object: garbage-collected with its owner."""
    return {"apiVersion": GROUP_VERSION, "kind": kind, "name": name, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


def secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def s3_env(s3: S3Config, allow_loopback: Optional[bool] = None) -> list[dict[str, Any]]:
    """S3 endpoint/region, credentials as secretKeyRef (read by the kubelet, not the operator), and
    whether the pod's S3 client may connect to loopback (default: the running operator's setting)."""
    if allow_loopback is None:
        from ragtune.runtime.settings import get_config

        allow_loopback = get_config().s3_allow_loopback
    env: list[dict[str, Any]] = [{"name": "AWS_REGION", "value": s3.region}]
    if allow_loopback:
        env.append({"name": ALLOW_LOOPBACK_ENV, "value": "true"})
    if s3.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": s3.endpoint})
    ref = s3.credentials_secret_ref
    if ref is not None:
        env.append(secret_env("AWS_ACCESS_KEY_ID", ref.name, ref.access_key_id_key))
        env.append(secret_env("AWS_SECRET_ACCESS_KEY", ref.name, ref.secret_access_key_key))
        if ref.session_token_key:
            env.append(secret_env("AWS_SESSION_TOKEN", ref.name, ref.session_token_key))
    return env
