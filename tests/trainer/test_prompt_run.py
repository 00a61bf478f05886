"""A real tiny run under a custom prompt contract with `prompt.augment`: the contract is published
as adapter/prompt.json (in the manifest with its digest), evaluation scores the foreign prompt
beside it, and the gap reaches the report, the termination message and the gates."""

import json

import pytest

from ragtune.api import FineTuneJobSpec
from ragtune.api.pods import TERMINATION_MESSAGE_LIMIT
from ragtune.rag.prompt import PromptContract
from ragtune.storage import sha256_file

from .test_train_run import in_cluster, job_spec

pytestmark = pytest.mark.slow

PROMPT = {"system": "Use the documents. Cite like {citation}. Otherwise say: {refusal}",
          "userTemplate": "<docs>\n{contexts}\n</docs>\nQ: {question}",
          "contextTemplate": '<doc id="{id}">{text}</doc>', "citation": "[{id}]",
          "refusal": "No answer in the documents.", "augment": True}


def test_custom_prompt_is_published_and_the_foreign_gap_is_measured(monkeypatch, tiny_model_dir, train_file,
                                                                      tmp_path):
    spec = job_spec(tiny_model_dir, train_file.as_uri(), tmp_path / "out", prompt=PROMPT,
                    **{"evaluation.thresholds": {"maxForeignPromptGap": 1.0}})
    code, result = in_cluster(monkeypatch, tmp_path, spec)
    assert code == 0, result
    run = tmp_path / "out" / "ns" / "job" / result["runId"]
    prompt_json = run / "adapter" / "prompt.json"
    contract = PromptContract.load(prompt_json)
    assert contract == PromptContract.from_spec(FineTuneJobSpec.model_validate(spec))
    assert contract.refusal == "No answer in the documents." and contract.context_template == PROMPT["contextTemplate"]
    listed = {f["path"]: f["sha256"] for f in json.loads((run / "manifest.json").read_text())["files"]}
    assert listed["adapter/prompt.json"] == sha256_file(prompt_json) == result["promptSha256"]

    # the foreign condition: in the termination message (within the kubelet's limit), gated, reported
    assert len(json.dumps(result, separators=(",", ":")).encode()) <= TERMINATION_MESSAGE_LIMIT
    assert result["foreignPrompt"]["samples"] == result["adapter"]["samples"] == 6
    assert result["foreignPromptGap"]["max"] is not None
    [gate] = [g for g in result["gates"] if g["metric"] == "foreignPromptGap"]
    assert gate["value"] == result["foreignPromptGap"]["max"] and gate["passed"]
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["metrics"]["foreignPrompt"] == result["foreignPrompt"]
    assert report["prompt"]["trained"] == contract.to_wire() and report["prompt"]["augment"] is True
    assert report["prompt"]["foreign"]["system"] != contract.system
    assert all("foreign" in s for s in report["samples"])
    # prompt.augment rendered some training items differently (counted with the RAFT construction)
    assert report["construction"]["train"]["promptVariants"] > 0
    assert "Trained vs foreign prompt" in (run / "eval" / "report.html").read_text()
