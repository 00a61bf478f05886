"""The demo's local overrides of examples/adapterdeployment.yaml (no platform): the default keeps the
TGI stand-in with only what cannot be the same here changed; `--backend vllm` gives a spec the API
accepts for the real vLLM, every change printed."""

from types import SimpleNamespace

import pytest
import yaml

from ragtune.api.adapterdeployment import AdapterDeploymentSpec
from ragtune_local.demo import REPO, DemoFailed, _local_overrides, run_flow

HANDLE = SimpleNamespace(s3_endpoint="http://127.0.0.1:9000")


def example() -> dict:
    return yaml.safe_load((REPO / "examples" / "adapterdeployment.yaml").read_text())


def test_default_keeps_tgi_and_changes_only_the_endpoint_and_gpus():
    doc, original = example(), example()
    changes = _local_overrides(doc, HANDLE)
    assert len(changes) == 2 and "spec.s3.endpoint" in changes[0] and "spec.server.gpus" in changes[1]
    original["spec"]["s3"]["endpoint"], original["spec"]["server"]["gpus"] = HANDLE.s3_endpoint, 0
    assert doc == original
    assert AdapterDeploymentSpec.model_validate(doc["spec"]).server.backend.value == "tgi"


def test_vllm_backend_gives_a_valid_vllm_spec_and_prints_each_change():
    doc = example()
    changes = _local_overrides(doc, HANDLE, quick=True, backend="vllm")
    spec = AdapterDeploymentSpec.model_validate(doc["spec"])
    assert spec.server.backend.value == "vllm" and spec.server.gpus == 0
    assert spec.server.vllm_settings.dtype == "float32" and spec.server.vllm_settings.max_model_len == 1536
    assert "maxInputTokens" not in doc["spec"]["server"] and "maxTotalTokens" not in doc["spec"]["server"]
    assert any("backend: tgi -> vllm" in c for c in changes)
    assert any("maxInputTokens, maxTotalTokens removed" in c for c in changes)


def test_an_unknown_backend_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(DemoFailed, match="backend 'triton': must be one of tgi, vllm"):
        run_flow(None, "default", tmp_path, backend="triton")
