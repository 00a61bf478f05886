"""Generate CustomResourceDefinitions from the API models (the one source of truth).

pydantic emits JSON Schema with `$ref`s, `anyOf`-with-null for optionals and titles; a CRD needs
a *structural* OpenAPI v3 schema: everything inlined, a type on every node, no nulls. This
module does that translation and adds what only Kubernetes knows: printer columns, short
names, the status subresource.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .adapterdeployment import AdapterDeploymentSpec, AdapterDeploymentStatus
from .finetunejob import FineTuneJobSpec, FineTuneJobStatus
from .keys import API_GROUP as GROUP
from .keys import API_VERSION as VERSION

# Keys of JSON Schema that a structural OpenAPI v3 CRD schema keeps as they are.
_KEPT = {
    "type", "description", "enum", "default", "minimum", "maximum", "minLength", "maxLength",
    "pattern", "minItems", "maxItems", "minProperties", "maxProperties", "format", "required",
}


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Translate one pydantic JSON-Schema node into a structural OpenAPI v3 node."""
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    if "anyOf" in node:  # Optional[X] -> X (unset fields are omitted, never null)
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"unions other than Optional[X] have no structural schema: {node}")
        rest = {k: v for k, v in node.items() if k != "anyOf" and not (k == "default" and v is None)}
        return _structural({**options[0], **rest}, defs)

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "description":
            out[key] = " ".join(value.split())  # docstrings wrap; kubectl explain re-wraps
        elif key in _KEPT:
            out[key] = value
        elif key == "const":
            out["enum"] = [value]
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key.startswith("x-kubernetes-"):
            out[key] = value
    if "enum" in node and "type" not in out:
        out["type"] = "string" if all(isinstance(v, str) for v in node["enum"]) else "integer"

    if out.get("type") == "object" or "properties" in node:
        out["type"] = "object"
        required = set(node.get("required", []))
        props = {}
        for name, prop in node.get("properties", {}).items():
            converted = _structural(prop, defs)
            # A nested object with defaults of its own gets `default: {}` so that the API server
            # fills in its fields when the user leaves the whole object out.
            if name not in required and "$ref" in prop and converted.get("type") == "object" \
                    and "default" not in converted and "properties" in converted:
                converted["default"] = {}
            props[name] = converted
        if props:
            out["properties"] = props
        if isinstance(node.get("additionalProperties"), dict):
            out["additionalProperties"] = _structural(node["additionalProperties"], defs)
    if out.get("type") == "array":
        out["items"] = _structural(node.get("items", {}), defs)
    if out.get("default") is None:
        out.pop("default", None)
    if "required" in out and not out["required"]:
        del out["required"]
    return out


def model_schema(model: type) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a pydantic model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(raw, raw.get("$defs", {}))


def _crd(kind: str, plural: str, short: str, spec_model: type, status_model: type,
         columns: list[dict[str, Any]], description: str) -> dict[str, Any]:
    schema = {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "API version: ragtune.dev/v1alpha1."},
            "kind": {"type": "string", "description": f"Kind: {kind}."},
            "metadata": {"type": "object"},
            "spec": model_schema(spec_model),
            "status": model_schema(status_model),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "ragtune", "app.kubernetes.io/part-of": "ragtune"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["ragtune"],
            },
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
                "schema": {"openAPIV3Schema": schema},
            }],
        },
    }


def _col(name: str, path: str, type_: str = "string", priority: int = 0, description: str = "") -> dict:
    col = {"name": name, "type": type_, "jsonPath": path}
    if priority:
        col["priority"] = priority
    if description:
        col["description"] = description
    return col


def build_crds() -> dict[str, dict[str, Any]]:
    """File name -> CRD object, for every kind in the API."""
    finetunejob = _crd(
        "FineTuneJob", "finetunejobs", "ftj", FineTuneJobSpec, FineTuneJobStatus,
        [
            _col("Phase", ".status.phase", description="Pending, Running, Evaluating, Succeeded, Failed"),
            _col("Progress", ".status.progress.percent", "integer", description="Training progress in percent"),
            _col("Loss", ".status.progress.loss", "number", description="Latest training loss"),
            _col("Score", ".status.score", description="Adapter F1 / refusal rate on the held-out set"),
            _col("Base", ".spec.baseModel.id", priority=1),
            _col("Reason", ".status.conditions[?(@.type==\"Succeeded\")].reason", priority=1),
            _col("Age", ".metadata.creationTimestamp", "date"),
        ],
        "FineTuneJob fine-tunes the generator LLM of a RAG system (QLoRA/LoRA) and evaluates the "
        "adapter against the base model.",
    )
    adapterdeployment = _crd(
        "AdapterDeployment", "adapterdeployments", "ad", AdapterDeploymentSpec, AdapterDeploymentStatus,
        [
            _col("Phase", ".status.phase"),
            _col("Serving", ".status.servingAdapters", description="Adapter ids being served"),
            _col("Step", ".status.candidate.step", description="Step of the rollout under way"),
            _col("Endpoint", ".status.endpoint", priority=1),
            _col("Age", ".metadata.creationTimestamp", "date"),
        ],
        "AdapterDeployment serves LoRA adapters from TGI after offline and online (canary) gates.",
    )
    return {
        "ragtune.dev_finetunejobs.yaml": finetunejob,
        "ragtune.dev_adapterdeployments.yaml": adapterdeployment,
    }


HEADER = "# Generated by `ragtune crds` from operator/ragtune/api. Do not edit.\n"


def render(crd: dict[str, Any]) -> str:
    return HEADER + yaml.safe_dump(crd, sort_keys=False, width=100)


def write_crds(out_dirs: list[Path]) -> list[Path]:
    """Write every CRD into each directory; returns the files written."""
    written = []
    for out in out_dirs:
        out.mkdir(parents=True, exist_ok=True)
        for name, crd in build_crds().items():
            path = out / name
            path.write_text(render(crd))
            written.append(path)
    return written
