"""The online evaluator asks and scores with the FineTuneJob's own prompt and refusal sentence:
the operator passes the contract of the FineTuneJob's spec in the evaluation config
(`CandidateRef.prompt`), which the evaluator uses for runs that publish no `adapter/prompt.json`
(a published one wins: it is what the run trained with)."""

from __future__ import annotations

import json

import pytest

from ragtune.adapterdeployment import render
from ragtune.adapterdeployment.resolve import trained_prompt
from ragtune.api.pods import EVAL_CONFIG_ENV, OnlineEvalConfig
from ragtune.pods.online_eval import evaluate
from ragtune.rag.prompt import DEFAULT_REFUSAL, PromptContract
from ragtune.storage import Storage

from ..pods.test_online_eval_prompt import CONTRACT, answering, world
from .fakekube import FakeKube
from .test_rollout import ad, ftj, tick

PROMPT = {"system": CONTRACT.system, "userTemplate": CONTRACT.user_template,
          "contextTemplate": CONTRACT.context_template, "citation": CONTRACT.citation}


def eval_config(kube: FakeKube) -> OnlineEvalConfig:
    """Run the rollout to the online gate; the evaluation Job's config."""
    tick(kube)
    kube.ready("chat-tgi-canary")
    s = tick(kube)
    assert s.candidate.step == "OnlineGate", s.message
    job = kube.get("Job", "ns", render.eval_job_name("chat", 1))
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    return OnlineEvalConfig.model_validate(json.loads(env[EVAL_CONFIG_ENV]))


def with_spec(kube: FakeKube, **spec) -> None:
    ftj(kube, "ftj1")
    body = kube.objects[("FineTuneJob", "ns", "ftj1")]["spec"]
    for key, value in spec.items():
        if key == "raft":
            body["dataset"]["raft"] = value
        else:
            body[key] = value


def test_the_evaluation_config_carries_the_finetunejobs_prompt_and_refusal():
    kube = FakeKube()
    with_spec(kube, prompt={**PROMPT, "refusal": CONTRACT.refusal}, raft={"refusal": "ignored: prompt.refusal wins"})
    ad(kube)
    [cand] = eval_config(kube).candidates
    assert PromptContract.from_wire(cand.prompt) == CONTRACT


def test_the_raft_refusal_is_the_refusal_when_the_prompt_sets_none():
    kube = FakeKube()
    with_spec(kube, raft={"refusal": "Not in the sources."})
    ad(kube)
    [cand] = eval_config(kube).candidates
    contract = PromptContract.from_wire(cand.prompt)
    assert contract.refusal == "Not in the sources." and contract.system == PromptContract().system


def test_a_default_finetunejob_or_a_uri_adapter_passes_no_prompt():
    kube = FakeKube()
    ftj(kube, "ftj1")
    ad(kube)
    [cand] = eval_config(kube).candidates
    assert cand.prompt is None
    kube = FakeKube()
    ad(kube, adapters=[{"name": "support", "uri": "s3://models/runs/r1/", "sha256": "a" * 64}],
       gates={"online": {"evalSetUri": "s3://data/eval.jsonl"}})
    [cand] = eval_config(kube).candidates
    assert cand.prompt is None


def test_trained_prompt_ignores_fields_of_a_newer_ragtune():
    assert trained_prompt({"prompt": {"refusal": "Nope.", "fancyNewField": 1}})["refusal"] == "Nope."
    assert trained_prompt({}) is None and trained_prompt({"dataset": {"raft": {"refusal": DEFAULT_REFUSAL}}}) is None


def test_an_invalid_finetunejob_prompt_fails_resolution_naming_it():
    kube = FakeKube()
    with_spec(kube, prompt={"userTemplate": "no placeholders"})
    ad(kube)
    s = tick(kube)
    assert s.phase == "Failed" and "FineTuneJob ftj1 spec.prompt.userTemplate: Value error, must contain" in s.message, s.message


def test_a_run_without_prompt_json_is_scored_with_the_finetunejobs_prompt(tmp_path):
    config = world(tmp_path, None)
    config.candidates[0].prompt = CONTRACT.to_wire()
    prompts: list[str] = []
    result = evaluate(config, Storage(), answering(prompts))
    # the custom refusal and `[doc1]` citations count: without the FineTuneJob's contract this fails
    # on refusalRate and citationValidity (tests/pods/test_online_eval_prompt.py)
    assert result.outcome == "Passed", result.message
    assert all(p.startswith("[system] Use the documents.") for p in prompts)


def test_the_published_prompt_json_wins_over_the_spec(tmp_path):
    config = world(tmp_path, CONTRACT)
    config.candidates[0].prompt = PromptContract(refusal="Something else entirely.").to_wire()
    prompts: list[str] = []
    result = evaluate(config, Storage(), answering(prompts))
    assert result.outcome == "Passed", result.message
    assert all(p.startswith("[system] Use the documents.") for p in prompts)


@pytest.mark.parametrize("bad", [{"refusal": ""}, {"refusal": "x", "userTemplate": "{nothing}"}])
def test_a_bad_prompt_in_the_config_is_an_invalid_prompt_error(tmp_path, bad):
    config = world(tmp_path, None)
    config.candidates[0].prompt = {**PromptContract().to_wire(), **bad}
    result = evaluate(config, Storage(), answering([]))
    assert result.outcome == "Error" and result.reason == "InvalidPrompt" and "FineTuneJob's prompt" in result.message
