"""The online evaluator asks and scores with the adapter's own prompt contract (its run's
adapter/prompt.json, verified against the manifest), and ragtune's default for runs without one."""

from __future__ import annotations

import json

from ragtune.api.adapterdeployment import OnlineGate
from ragtune.pods.online_eval import CandidateRef, OnlineEvalConfig, evaluate
from ragtune.rag.prompt import PromptContract
from ragtune.storage import Storage
from ragtune_local.testdoubles.tiny_models import fake_adapter, file_put, publish_run

CONTRACT = PromptContract(system="Use the documents. Cite like {citation}. Otherwise say: {refusal}",
                          user_template="<docs>\n{contexts}\n</docs>\nQ: {question}",
                          context_template='<doc id="{id}">{text}</doc>', citation="[doc{id}]",
                          refusal="No answer in the documents.")
RECORDS = [
    {"id": "q1", "question": "What is the capital of France?", "answer": "Paris [doc1]", "answerable": True,
     "contexts": [{"id": "1", "text": "The capital of France is Paris."}], "supportingContextIds": ["1"]},
    {"id": "q2", "question": "What is the boiling point of gold?", "answer": CONTRACT.refusal, "answerable": False,
     "contexts": [{"id": "1", "text": "Gold is a yellow metal."}]},
]
ANSWERS = {"q1": "Paris [doc1]", "q2": "Sorry: no answer in the documents."}
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


def world(tmp_path, contract, tamper: bool = False):
    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    adapter = fake_adapter(tmp_path / "adapter")
    (adapter / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    if contract is not None:
        (adapter / "prompt.json").write_text(contract.dumps())
    run = tmp_path / "run"
    digest = publish_run(file_put(run), adapter, tamper="prompt.json" if tamper else None)
    return OnlineEvalConfig(canary_url="http://canary", eval_set_uri=data.as_uri(),
                            candidates=[CandidateRef(name="support", uri=run.as_uri() + "/", sha256=digest)],
                            gate=OnlineGate.model_validate({"thresholds": {"minRefusalRate": 1.0,
                                                                           "minCitationValidity": 1.0}}))


def answering(prompts: list):
    def generate(url, prompt, adapter):
        prompts.append(prompt)
        qid = next(r["id"] for r in RECORDS if r["question"] in prompt)
        return ANSWERS[qid] if adapter else "I do not know."
    return generate


def test_the_adapters_prompt_json_renders_the_requests_and_scores_the_answers(tmp_path):
    prompts: list[str] = []
    result = evaluate(world(tmp_path, CONTRACT), Storage(), answering(prompts))
    assert result.outcome == "Passed", result.message
    assert all(p.startswith("[system] Use the documents. Cite like [doc2]. Otherwise say: No answer in the documents.")
               and '<doc id="1">' in p for p in prompts)
    [r] = result.results
    # citations in the contract's form and its refusal sentence (paraphrased) are recognised
    assert r.candidate.citation_validity == 1.0 and r.candidate.refusal_rate == 1.0 and r.candidate.f1 == 1.0


def test_a_run_without_prompt_json_gets_ragtunes_default_prompt(tmp_path):
    prompts: list[str] = []
    result = evaluate(world(tmp_path, None), Storage(), answering(prompts))
    assert all("[system] You answer questions using only the numbered contexts" in p and "\n[1] " in p
               for p in prompts)
    # scored with the default contract: `[doc1]` is no valid citation and the custom refusal is no refusal
    assert result.outcome == "Failed" and {g.metric for g in result.results[0].gates if not g.passed} == {
        "refusalRate", "citationValidity"}


def test_a_tampered_prompt_json_is_an_error(tmp_path):
    result = evaluate(world(tmp_path, CONTRACT, tamper=True), Storage(), answering([]))
    assert result.outcome == "Error" and result.reason == "InvalidPrompt"
    assert "prompt.json does not match its sha256" in result.message
