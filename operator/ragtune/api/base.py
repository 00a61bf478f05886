"""Shared building blocks of the ragtune API models.

Every model is a pydantic model whose attribute docstrings become the field
descriptions, both in `kubectl explain` (through the generated CRDs) and in the
Python API. Field names are snake_case in Python and camelCase on the wire.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    """Base for every API object: camelCase aliases, docstrings as descriptions."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
        extra="forbid",
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as Kubernetes stores it: camelCase keys, unset optionals left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def cel(rule: str, message: str, field_path: str | None = None, reason: str | None = None) -> dict[str, str]:
    """One `x-kubernetes-validations` entry; `field_path` makes the API server name the field."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    return entry


def k8s_extensions(*rules: dict[str, str], **extensions: Any) -> dict[str, Any]:
    """`json_schema_extra` for a model or field: CEL rules plus other `x-kubernetes-*` keys."""
    extra: dict[str, Any] = {}
    if rules:
        extra["x-kubernetes-validations"] = list(rules)
    for key, value in extensions.items():
        extra["x-kubernetes-" + key.replace("_", "-")] = value
    return extra
