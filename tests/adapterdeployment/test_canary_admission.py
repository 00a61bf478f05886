"""Bad traffic steps (and `follow` without a FineTuneJob) are refused by the real API server (the
generated CRD's schema and CEL rules), with the field named, before the operator ever sees them."""

from __future__ import annotations

import copy

import pytest

pytestmark = pytest.mark.platform

GOOD = {
    "apiVersion": "ragtune.dev/v1alpha1", "kind": "AdapterDeployment", "metadata": {"name": "chat"},
    "spec": {"baseModel": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "12fd25f"},
             "adapters": [{"name": "a", "fineTuneJobRef": {"name": "ftj"}}],
             "strategy": {"type": "Canary", "canary": {"gatewayRef": {"name": "public"},
                                                       "steps": [{"weight": 10, "pause": "2m"}, {"weight": 50}]}}},
}


@pytest.fixture(scope="module")
def crds(platform):
    platform.install_crds()


def with_strategy(**changes) -> dict:
    body = copy.deepcopy(GOOD)
    body["spec"]["strategy"].update(changes)
    return body


def with_steps(steps) -> dict:
    body = copy.deepcopy(GOOD)
    body["spec"]["strategy"]["canary"]["steps"] = steps
    return body


def with_adapters(adapters) -> dict:
    body = copy.deepcopy(GOOD)
    body["spec"]["adapters"] = adapters
    return body


@pytest.mark.parametrize("body, field, words", [
    (with_adapters([{"name": "a", "uri": "s3://runs/a/", "sha256": "a" * 64, "follow": "LatestSucceeded"}]),
     "spec.adapters[0].follow", "it needs fineTuneJobRef"),
    (with_adapters([{"name": "a", "fineTuneJobRef": {"name": "ftj"}, "follow": "Latest"}]),
     "spec.adapters[0].follow", "Unsupported value"),
    (with_steps([{"weight": 50}, {"weight": 10}]), "spec.strategy.canary.steps", "strictly increase"),
    (with_steps([{"weight": 20}, {"weight": 20}]), "spec.strategy.canary.steps", "strictly increase"),
    (with_steps([{"weight": 0}]), "spec.strategy.canary.steps[0].weight", "greater than or equal to 1"),
    (with_steps([{"weight": 10}, {"weight": 101}]), "spec.strategy.canary.steps[1].weight", "less than or equal to 100"),
    (with_steps([{"weight": 10, "pause": "2min"}]), "spec.strategy.canary.steps[0].pause", "should match"),
    (with_steps([{"weight": 10, "pause": "90000s"}]), "spec.strategy.canary.steps[0].pause", "at most 24h"),
    (with_strategy(type="Evaluate"), "spec.strategy.canary", "needs type: Canary"),
    (with_strategy(bake="10m"), "spec.strategy.bake", "set strategy.canary.analysis"),
    (with_strategy(bake="25h", canary={**GOOD["spec"]["strategy"]["canary"], "analysis": {}}), "spec.strategy.bake",
     "at most 24h"),
])
def test_the_api_server_refuses_bad_steps_naming_the_field(platform, crds, namespace, body, field, words):
    out = platform.kubectl("-n", namespace, "apply", "--dry-run=server", "-f", "-", input=_yaml(body), check=False)
    assert field in out and words in out, out


@pytest.mark.parametrize("body", [GOOD, with_adapters([{"name": "a", "fineTuneJobRef": {"name": "ftj"},
                                                          "follow": "LatestSucceeded"}])])
def test_the_api_server_accepts_good_steps(platform, crds, namespace, body):
    out = platform.kubectl("-n", namespace, "apply", "--dry-run=server", "-f", "-", input=_yaml(body))
    assert "created (server dry run)" in out


def _yaml(body: dict) -> str:
    import yaml

    return yaml.safe_dump(body)
