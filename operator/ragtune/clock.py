"""Wall-clock time as the Kubernetes API writes it (RFC 3339, UTC, seconds)."""

from __future__ import annotations

from datetime import datetime, timezone


def utc_now_iso() -> str:
    """`2026-12-01T10:12:30Z`: what `metav1.Time` serialises to."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def utc_now_micro() -> str:
    """`2026-12-01T10:12:30.123456Z`: what `metav1.MicroTime` (Lease renew times) serialises to."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
