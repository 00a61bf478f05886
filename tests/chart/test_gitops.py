"""examples/gitops: Argo CD health checks (run in a real Lua 5.1 interpreter, the dialect of
Argo CD's gopher-lua) and the Argo CD Application / Flux HelmRelease."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from .chartlib import CHART, REPO_ROOT

GITOPS = REPO_ROOT / "examples" / "gitops"
HEALTH = GITOPS / "argocd" / "health"


def lua_runtime():
    try:
        from lupa import lua51
    except ImportError:
        pytest.fail("the Lua interpreter is missing: it comes from the PyPI package `lupa` (dev extra); run `make install`")
    return lua51.LuaRuntime(unpack_returned_tuples=True)


def health(script: str, obj: dict) -> tuple[str, str]:
    """Run an Argo CD health script the way Argo CD does: `obj` global, returns {status, message}."""
    lua = lua_runtime()
    lua.globals().obj = lua.eval("function(s) return s end")(_to_lua(lua, obj))
    result = lua.execute((HEALTH / script).read_text())
    return result["status"], result["message"]


def _to_lua(lua, value):
    if isinstance(value, dict):
        return lua.table_from({k: _to_lua(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([_to_lua(lua, v) for v in value])
    return value


def ftj(status=None, generation=1, suspend=False):
    obj = {"metadata": {"name": "rag", "generation": generation}, "spec": {"suspend": suspend}}
    if status is not None:
        obj["status"] = status
    return obj


@pytest.mark.parametrize("obj, expected_status, message_part", [
    (ftj(), "Progressing", "Waiting for the ragtune operator"),
    (ftj(suspend=True), "Suspended", "Suspended"),
    (ftj({"phase": "Pending", "observedGeneration": 1, "message": "Unschedulable: 0/3 nodes have nvidia.com/gpu"}),
     "Progressing", "Unschedulable"),
    (ftj({"phase": "Running", "observedGeneration": 1, "progress": {"step": 30, "percent": 42}}),
     "Progressing", "Running (42%)"),
    (ftj({"phase": "Evaluating", "observedGeneration": 1}), "Progressing", "Evaluating"),
    (ftj({"phase": "Succeeded", "observedGeneration": 1, "score": "f1=0.71 refusal=0.90"}),
     "Healthy", "f1=0.71"),
    (ftj({"phase": "Succeeded", "observedGeneration": 1}, generation=2), "Progressing", "generation 2"),
    (ftj({"phase": "Failed", "observedGeneration": 1, "message": "gate minF1 failed: 0.31 < 0.5"}),
     "Degraded", "minF1"),
    (ftj({"phase": "Failed", "observedGeneration": 1, "conditions": [
        {"type": "Failed", "status": "True", "reason": "SecretNotFound", "message": "secret \"s3\" not found"}]}),
     "Degraded", "SecretNotFound"),
    (ftj({"phase": "Suspended", "observedGeneration": 1}), "Suspended", "Suspended"),
])
def test_finetunejob_health(obj, expected_status, message_part):
    status, message = health("finetunejob.lua", obj)
    assert status == expected_status, message
    assert message_part in message


def ad(status=None, generation=1):
    obj = {"metadata": {"name": "rag", "generation": generation}, "spec": {}}
    if status is not None:
        obj["status"] = status
    return obj


@pytest.mark.parametrize("obj, expected_status, message_part", [
    (ad(), "Progressing", "Waiting"),
    (ad({"phase": "Ready", "observedGeneration": 1, "servingAdapters": "support-v3,legal-v1"}),
     "Healthy", "support-v3,legal-v1"),
    (ad({"phase": "Gating", "observedGeneration": 1, "candidate": {"generation": 1, "step": "OfflineGate"}}),
     "Progressing", "OfflineGate"),
    (ad({"phase": "RollingOut", "observedGeneration": 1, "candidate": {"generation": 1, "step": "Canary"}}),
     "Progressing", "Canary"),
    (ad({"phase": "Ready", "observedGeneration": 1}, generation=3), "Progressing", "generation 3"),
    (ad({"phase": "RolledBack", "observedGeneration": 1, "message": "online gate minF1 failed"}),
     "Degraded", "online gate minF1 failed"),
    (ad({"phase": "Degraded", "observedGeneration": 1, "message": "1/2 replicas ready"}), "Degraded", "replicas"),
    (ad({"phase": "Failed", "observedGeneration": 1}), "Degraded", "Failed"),
    (ad({"phase": "Exploded", "observedGeneration": 1}), "Unknown", "Exploded"),
])
def test_adapterdeployment_health(obj, expected_status, message_part):
    status, message = health("adapterdeployment.lua", obj)
    assert status == expected_status, message
    assert message_part in message


def test_argocd_cm_snippet_embeds_the_same_lua():
    cm = yaml.safe_load((GITOPS / "argocd" / "argocd-cm-health.yaml").read_text())
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "argocd-cm"
    data = cm["data"]
    assert data["resource.customizations.health.ragtune.dev_FineTuneJob"] == (HEALTH / "finetunejob.lua").read_text()
    assert data["resource.customizations.health.ragtune.dev_AdapterDeployment"] == (
        HEALTH / "adapterdeployment.lua").read_text()


def _schema_errors(values: dict) -> list[str]:
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    merged = _merge(defaults, values)
    return [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(merged)]


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def test_argocd_application_points_at_the_chart_with_valid_values():
    app = yaml.safe_load((GITOPS / "argocd" / "application.yaml").read_text())
    assert app["apiVersion"] == "argoproj.io/v1alpha1" and app["kind"] == "Application"
    source = app["spec"]["source"]
    assert source["path"] == "charts/ragtune"
    assert _schema_errors(source["helm"]["valuesObject"]) == []
    assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]
    # Deleting the Application must not cascade to the CRDs (and with them every user object).
    assert "resources-finalizer.argocd.argoproj.io" not in app["metadata"].get("finalizers", [])


def test_flux_helmrelease_points_at_the_chart_with_valid_values():
    docs = {d["kind"]: d for d in yaml.safe_load_all((GITOPS / "flux" / "ragtune.yaml").read_text())}
    repo, release = docs["GitRepository"], docs["HelmRelease"]
    assert release["apiVersion"] == "helm.toolkit.fluxcd.io/v2"
    spec = release["spec"]["chart"]["spec"]
    assert spec["chart"] == "./charts/ragtune"
    assert spec["sourceRef"] == {"kind": "GitRepository", "name": repo["metadata"]["name"],
                                 "namespace": repo["metadata"]["namespace"]}
    assert release["spec"]["install"]["crds"] == "Create" and release["spec"]["upgrade"]["crds"] == "CreateReplace"
    assert _schema_errors(release["spec"]["values"]) == []
