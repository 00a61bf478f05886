"""Shared building blocks of the ragtune API models.

Every model is a pydantic model whose attribute docstrings become the field
descriptions, both in `kubectl explain` (through the generated CRDs) and in the
Python API. Field names are snake_case in Python and camelCase on the wire.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
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


M = TypeVar("M", bound=BaseModel)
log = logging.getLogger("ragtune.api")


def validate_tolerant(model: type[M], data: Any, **kwargs: Any) -> M:
    """`model.model_validate(data)` for documents another version of ragtune may have written: a
    newer trainer's termination message, a status a newer operator wrote before a rollback of the
    operator. Fields this version does not know are dropped (and logged) instead of failing the
    whole document; every field it knows is checked as strictly as ever. Specs stay strict (the
    API server's schema is the version check there)."""
    dropped: list[str] = []
    while True:
        try:
            result = model.model_validate(data, **kwargs)
        except ValidationError as exc:
            unknown = [e["loc"] for e in exc.errors() if e["type"] == "extra_forbidden"]
            if not unknown:
                raise
            data = copy.deepcopy(data) if not dropped else data
            removed = [loc for loc in unknown if _remove(data, loc)]
            if not removed:
                raise
            dropped += [".".join(map(str, loc)) for loc in removed]
            continue
        if dropped:
            log.info("%s: ignored fields this version does not know: %s", model.__name__, ", ".join(dropped))
        return result


def _remove(data: Any, loc: tuple) -> bool:
    """Delete the value at a validation error's `loc`; parts that name a union member rather than
    a key are skipped. False when nothing was there."""
    node = data
    for part in loc[:-1]:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
    if isinstance(node, dict) and loc[-1] in node:
        del node[loc[-1]]
        return True
    return False


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
