"""Kubernetes-style status conditions, kept as plain dicts (the wire form kopf patches)."""

from __future__ import annotations

from typing import Optional

from ragtune.clock import utc_now_iso

now = utc_now_iso


def get_condition(conditions: list[dict], type_: str) -> Optional[dict]:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def set_condition(
    conditions: list[dict] | None,
    type_: str,
    status: bool | str,
    reason: str,
    message: str = "",
    generation: int | None = None,
) -> list[dict]:
    """Return a new list with `type_` set. `lastTransitionTime` moves only when status changes,
    as in metav1.Condition, so re-running a reconcile does not churn the object."""
    status_str = status if isinstance(status, str) else ("True" if status else "False")
    result = [dict(c) for c in conditions or []]
    current = get_condition(result, type_)
    if current is None:
        current = {"type": type_}
        result.append(current)
    if current.get("status") != status_str:
        current["lastTransitionTime"] = now()
    current.update(status=status_str, reason=reason, message=message)
    if generation is not None:
        current["observedGeneration"] = generation
    current.setdefault("lastTransitionTime", now())
    return result
