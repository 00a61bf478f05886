"""`gates.online.evalSetUri` left empty: the online gate evaluates on the held-out split each
FineTuneJob published (`status.adapter.evalSetUri`), pinned by its sha256."""

from __future__ import annotations

import json

from ragtune.adapterdeployment.resolve import resolve
from ragtune.api.adapterdeployment import AdapterDeploymentSpec

from .fakekube import FakeKube
from .test_rollout import BASE, ad, ftj, tick

SPLIT = "s3://models/ns/ftj1/run/eval/heldout.jsonl"


def publish_split(kube: FakeKube, name: str = "ftj1", dataset_eval: bool = True) -> None:
    obj = kube.objects[("FineTuneJob", "ns", name)]
    obj["status"]["adapter"].update(evalSetUri=SPLIT, evalSetSha256="e" * 64)
    if not dataset_eval:
        del obj["spec"]["dataset"]["eval"]


def eval_config(kube: FakeKube) -> dict:
    tick(kube)
    kube.ready("chat-tgi-canary")
    tick(kube)
    job = kube.get("Job", "ns", "chat-eval-g1")
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    return json.loads(env["RAGTUNE_EVAL_CONFIG"])


def test_the_published_split_is_the_default_and_its_digest_travels_to_the_evaluator():
    kube = FakeKube()
    ftj(kube, "ftj1")  # its spec names dataset.eval too: the split as the trainer built it wins
    publish_split(kube)
    ad(kube)
    config = eval_config(kube)
    assert config["evalSetUri"] == SPLIT and config["evalSetSha256"] == "e" * 64


def test_an_explicit_eval_set_wins_and_carries_no_digest():
    kube = FakeKube()
    ftj(kube, "ftj1")
    publish_split(kube)
    ad(kube, gates={"online": {"evalSetUri": "s3://data/mine.jsonl"}})
    config = eval_config(kube)
    assert config["evalSetUri"] == "s3://data/mine.jsonl" and "evalSetSha256" not in config


def test_a_run_that_predates_publishing_falls_back_to_its_dataset_eval():
    kube = FakeKube()
    ftj(kube, "ftj1")
    ad(kube)
    config = eval_config(kube)
    assert config["evalSetUri"] == "s3://data/eval.jsonl" and "evalSetSha256" not in config


def test_with_neither_the_rollout_fails_naming_the_field():
    kube = FakeKube()
    ftj(kube, "ftj1")
    del kube.objects[("FineTuneJob", "ns", "ftj1")]["spec"]["dataset"]["eval"]
    ad(kube)
    s = tick(kube)
    assert s.phase == "Failed" and s.history[0].reason.startswith("EvalSetMissing")
    assert "spec.gates.online.evalSetUri" in s.message and "published no held-out split" in s.message
    assert kube.kinds("Deployment") == []


def test_resolve_keys_the_digest_by_uri():
    spec = AdapterDeploymentSpec.model_validate({"baseModel": BASE, "adapters": [
        {"name": "a", "fineTuneJobRef": {"name": "j"}}, {"name": "b", "uri": "s3://models/r/", "sha256": "b" * 64}]})
    kube = FakeKube()
    ftj(kube, "j")
    publish_split(kube, "j", dataset_eval=False)
    res = resolve(spec, lambda n: kube.objects.get(("FineTuneJob", "ns", n)))
    assert res.eval_sets == {"a": SPLIT} and res.eval_set_sha256 == {SPLIT: "e" * 64}
