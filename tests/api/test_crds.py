"""The CRDs in crds/ and the chart are generated from the API models and must not drift."""

from pathlib import Path

import pytest
import yaml

from ragtune.api.crdgen import build_crds, render

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("out_dir", ["crds", "charts/ragtune/crds"])
def test_committed_crds_match_the_models(out_dir):
    for name, crd in build_crds().items():
        committed = REPO / out_dir / name
        assert committed.exists(), f"{committed} missing: run `make crds`"
        assert committed.read_text() == render(crd), f"{committed} drifted from the API models: run `make crds`"


def _walk(node, path="spec"):
    yield path, node
    for key, child in node.get("properties", {}).items():
        yield from _walk(child, f"{path}.{key}")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("name", sorted(build_crds()))
def test_schemas_are_structural_and_documented(name):
    crd = build_crds()[name]
    version = crd["spec"]["versions"][0]
    root = version["schema"]["openAPIV3Schema"]
    for section in ("spec", "status"):
        for path, node in _walk(root["properties"][section], section):
            assert "type" in node, f"{path} has no type (not structural)"
            assert not {"$ref", "anyOf", "oneOf", "allOf", "title"} & node.keys(), f"{path}: {node.keys()}"
            if path != section and not path.endswith(("[]", "{}")):
                assert node.get("description"), f"{path} has no description (kubectl explain)"
    assert version["subresources"] == {"status": {}}
    assert crd["spec"]["names"]["shortNames"] in (["ftj"], ["ad"])


def test_finetunejob_schema_carries_defaults_ranges_enums_and_cel():
    crd = build_crds()["ragtune.dev_finetunejobs.yaml"]
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    props = spec["properties"]
    assert props["method"]["enum"] == ["qlora", "lora", "dora", "ia3"] and props["method"]["default"] == "qlora"
    assert props["lora"]["default"] == {} and props["lora"]["properties"]["r"]["default"] == 16
    assert props["lora"]["properties"]["r"]["maximum"] == 256
    rules = [v["rule"] for v in spec["x-kubernetes-validations"]]
    assert any("qlora" in r and "bits == 4" in r for r in rules)
    columns = [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns[:4] == ["Phase", "Progress", "Loss", "Score"] and "Age" in columns


def test_adapterdeployment_requires_exactly_one_source():
    crd = build_crds()["ragtune.dev_adapterdeployments.yaml"]
    adapters = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["adapters"]
    assert adapters["x-kubernetes-list-type"] == "map" and adapters["x-kubernetes-list-map-keys"] == ["name"]
    rules = [v["rule"] for v in adapters["items"]["x-kubernetes-validations"]]
    assert "has(self.fineTuneJobRef) != has(self.uri)" in rules


def test_generated_yaml_is_loadable():
    for crd in build_crds().values():
        assert yaml.safe_load(render(crd)) == crd


def test_api_reference_matches_the_models():
    from ragtune.api.docgen import render_reference

    assert (REPO / "docs/api-reference.md").read_text() == render_reference(), "run `make crds`"
