"""Adapter resolution and the offline gate."""

from __future__ import annotations

import pytest

from ragtune.adapterdeployment.resolve import (
    NotReady,
    ResolveError,
    changed_adapters,
    offline_failures,
    offline_gate,
    resolve,
)
from ragtune.api.adapterdeployment import (
    AdapterDeploymentSpec,
    GatesSpec,
    ResolvedAdapter,
)

BASE = {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "12fd25f"}


def spec(*adapters) -> AdapterDeploymentSpec:
    return AdapterDeploymentSpec.model_validate({"baseModel": BASE, "adapters": list(adapters)})


def job(phase="Succeeded", base=BASE, adapter=True, metrics=None, eval_uri="s3://data/eval.jsonl"):
    status = {"phase": phase, "metrics": metrics or {"adapter": {"f1": 0.6}, "passed": True}}
    if adapter:
        status["adapter"] = {"uri": "s3://models/ns/j/run/", "sha256": "c" * 64}
    return {"spec": {"baseModel": base, "dataset": {"train": "s3://data/t.jsonl", "eval": eval_uri}},
            "status": status}


def test_explicit_uri_and_finetunejob_sources():
    s = spec({"name": "a", "uri": "s3://models/r1/", "sha256": "a" * 64},
             {"name": "b", "fineTuneJobRef": {"name": "j"}})
    res = resolve(s, {"j": job()}.get)
    assert [(a.name, a.uri, a.sha256, a.source) for a in res.adapters] == [
        ("a", "s3://models/r1/", "a" * 64, "uri"), ("b", "s3://models/ns/j/run/", "c" * 64, "FineTuneJob/j")]
    assert res.metrics["b"]["passed"] is True and "a" not in res.metrics
    assert res.eval_sets == {"b": "s3://data/eval.jsonl"}


@pytest.mark.parametrize("ftj,expected", [
    (None, "does not exist"),
    (job(phase="Running"), r"waiting for FineTuneJob j \(Running\)"),
    (job(phase=None), r"\(Pending\)"),
])
def test_not_ready_inputs_wait(ftj, expected):
    with pytest.raises(NotReady, match=expected):
        resolve(spec({"name": "b", "fineTuneJobRef": {"name": "j"}}), lambda _: ftj)


@pytest.mark.parametrize("ftj,reason", [
    (job(phase="Failed"), "FineTuneJobFailed"),
    (job(base={"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "main"}), "BaseModelMismatch"),
    (job(adapter=False), "AdapterMissing"),
])
def test_permanent_errors(ftj, reason):
    with pytest.raises(ResolveError) as err:
        resolve(spec({"name": "b", "fineTuneJobRef": {"name": "j"}}), lambda _: ftj)
    assert err.value.reason == reason


def test_changed_adapters_are_new_or_redigested():
    serving = [ResolvedAdapter(name="a", uri="u", sha256="1" * 64), ResolvedAdapter(name="b", uri="u", sha256="2" * 64)]
    candidate = [ResolvedAdapter(name="a", uri="u", sha256="1" * 64), ResolvedAdapter(name="b", uri="u", sha256="3" * 64),
                 ResolvedAdapter(name="c", uri="u", sha256="4" * 64)]
    assert changed_adapters(candidate, serving) == ["b", "c"]


def test_offline_gate_absolute_and_gain_over_base():
    gates = GatesSpec.model_validate({"offline": {"minF1": 0.5, "minRefusalGainOverBase": 0.3}})
    metrics = {"base": {"f1": 0.3, "refusalRate": 0.5}, "adapter": {"f1": 0.55, "refusalRate": 0.7}, "passed": True}
    results = offline_gate(gates, metrics)
    by = {r.metric: r for r in results}
    assert by["f1"].passed and not by["refusalRateGainOverBase"].passed
    assert by["refusalRateGainOverBase"].margin == pytest.approx(-0.1)
    assert by["fineTuneJobGatesPassed"].passed
    assert offline_failures({"a": results}) == "adapter a: refusalRateGainOverBase 0.200 < 0.3 (off by 0.100)"


def test_offline_gate_requires_the_jobs_own_verdict_unless_disabled():
    failed = {"adapter": {"f1": 0.9}, "passed": False}
    assert not all(r.passed for r in offline_gate(GatesSpec(), failed))
    assert offline_gate(GatesSpec(requireOfflinePass=False), failed) == []


def test_a_finetunejob_rank_above_the_servers_limit_is_refused_before_anything_rolls():
    vllm = AdapterDeploymentSpec.model_validate({"baseModel": BASE, "server": {"backend": "vllm", "vllm": {"maxLoraRank": 16}},
                                                 "adapters": [{"name": "big", "fineTuneJobRef": {"name": "j"}}]})
    wide = job()
    wide["spec"]["lora"] = {"r": 32}
    with pytest.raises(ResolveError, match=r"adapter big \(FineTuneJob j\) has LoRA rank 32, above the server's "
                                           r"limit 16 \(spec.server.vllm.maxLoraRank\)") as err:
        resolve(vllm, {"j": wide}.get)
    assert err.value.reason == "AdapterRankTooLarge"
    fits = job()
    fits["spec"]["lora"] = {"r": 16}
    assert resolve(vllm, {"j": fits}.get).adapters[0].name == "big"
    assert resolve(vllm, {"j": job()}.get).adapters  # no lora section: the FineTuneJob default rank (16)
    tgi = spec({"name": "big", "fineTuneJobRef": {"name": "j"}})  # TGI holds up to 128
    assert resolve(tgi, {"j": wide}.get).adapters
