"""Operator configuration, read from the environment (the Helm chart sets these variables).

| variable | default | meaning |
|---|---|---|
| `RAGTUNE_TRAINER_IMAGE` | `ghcr.io/ragtune/ragtune-trainer:<version>` | trainer image (a FineTuneJob may override it) |
| `RAGTUNE_OPERATOR_IMAGE` | `ghcr.io/ragtune/ragtune-operator:<version>` | image of the operator's helper pods |
| `RAGTUNE_WATCH_NAMESPACES` | empty = all namespaces | comma-separated namespaces to serve |
| `RAGTUNE_METRICS_PORT` | `8080` | Prometheus metrics port, `0` disables |
| `RAGTUNE_LOG_FORMAT` | `json` | `json` (one object per line, with the object's namespace/name) or `text` |
| `RAGTUNE_PROGRESS_INTERVAL_SECONDS` | `15` | how often the progress of one running job is sampled |
| `RAGTUNE_PROGRESS_READS_PER_SECOND` | `5` | cap on pod-log reads per second over all jobs |
| `RAGTUNE_API_WORKERS` | `16` | concurrent Kubernetes API calls made by the controllers (as many as the FineTuneJob work queue's workers: in a burst, Job creates are bound by the API server's latency, not by CPU) |
| `RAGTUNE_STATUS_WRITES_PER_SECOND` | `20` | budget for FineTuneJob status writes (with their Events), bursts of 1.5 s' worth; `0` = no limit. Job creates and deletes are never held back: in a burst the statuses follow within seconds (`ragtune.runtime.ratelimit`) |
| `RAGTUNE_LEADER_ELECTION` | `false` | take a Lease before reconciling, so that of several replicas one works (the chart sets `true`) |
| `RAGTUNE_LEADER_ELECTION_NAMESPACE` | `$POD_NAMESPACE`, else `default` | namespace of the Lease `ragtune-operator` |
| `RAGTUNE_LEASE_SECONDS` | `15` | a leader that has not renewed for this long is replaced (failover time) |
| `RAGTUNE_S3_ALLOW_LOOPBACK` | `false` | let the S3 clients of ragtune's pods connect to loopback addresses (set on every pod that talks to S3; the local platform's MinIO is on loopback) |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata
from typing import Mapping, Optional

from ragtune.addresses import ALLOW_LOOPBACK_ENV
from ragtune.api.pods import OPERATOR_IMAGE, TRAINER_IMAGE


class ConfigError(ValueError):
    """An environment variable holds a value the operator cannot use."""


def _version() -> str:
    try:
        return metadata.version("ragtune")
    except metadata.PackageNotFoundError:
        return "latest"


def _number(env: Mapping[str, str], name: str, default: float, kind: type = float, minimum: float = 0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return kind(default)
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a {kind.__name__}") from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} must be >= {minimum}")
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name}={raw!r} must be true or false")


@dataclass(frozen=True)
class OperatorConfig:
    trainer_image: str
    operator_image: str
    namespaces: tuple[str, ...] = ()
    """Namespaces to serve; empty means every namespace (cluster mode)."""
    metrics_port: int = 8080
    log_format: str = "json"
    progress_interval: float = 15.0
    progress_reads_per_second: float = 5.0
    api_workers: int = 16
    status_writes_per_second: float = 20.0
    leader_election: bool = False
    leader_election_namespace: str = "default"
    lease_seconds: float = 15.0
    s3_allow_loopback: bool = False
    """Rendered into every pod that talks to S3 (ragtune.addresses.ALLOW_LOOPBACK_ENV)."""

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "OperatorConfig":
        env = os.environ if env is None else env
        version = _version()
        log_format = env.get("RAGTUNE_LOG_FORMAT", "json").strip().lower() or "json"
        if log_format not in ("json", "text"):
            raise ConfigError(f"RAGTUNE_LOG_FORMAT={log_format!r} must be 'json' or 'text'")
        namespaces = tuple(n.strip() for n in env.get("RAGTUNE_WATCH_NAMESPACES", "").split(",") if n.strip())
        return cls(
            trainer_image=env.get("RAGTUNE_TRAINER_IMAGE", "").strip() or f"{TRAINER_IMAGE}:{version}",
            operator_image=env.get("RAGTUNE_OPERATOR_IMAGE", "").strip() or f"{OPERATOR_IMAGE}:{version}",
            namespaces=namespaces,
            metrics_port=int(_number(env, "RAGTUNE_METRICS_PORT", 8080, int)),
            log_format=log_format,
            progress_interval=_number(env, "RAGTUNE_PROGRESS_INTERVAL_SECONDS", 15.0, float, 1),
            progress_reads_per_second=_number(env, "RAGTUNE_PROGRESS_READS_PER_SECOND", 5.0, float, 0.1),
            api_workers=int(_number(env, "RAGTUNE_API_WORKERS", 16, int, 1)),
            status_writes_per_second=_number(env, "RAGTUNE_STATUS_WRITES_PER_SECOND", 20.0, float, 0),
            leader_election=_flag(env, "RAGTUNE_LEADER_ELECTION"),
            leader_election_namespace=(env.get("RAGTUNE_LEADER_ELECTION_NAMESPACE", "").strip()
                                       or env.get("POD_NAMESPACE", "").strip() or "default"),
            lease_seconds=_number(env, "RAGTUNE_LEASE_SECONDS", 15.0, float, 2),
            s3_allow_loopback=_flag(env, ALLOW_LOOPBACK_ENV),
        )


_config: Optional[OperatorConfig] = None


def get_config() -> OperatorConfig:
    """The running operator's configuration (read from the environment on first use)."""
    global _config
    if _config is None:
        _config = OperatorConfig.from_env()
    return _config


def set_config(config: OperatorConfig) -> None:
    """Install the configuration (the CLI does this after applying its flags)."""
    global _config
    _config = config
