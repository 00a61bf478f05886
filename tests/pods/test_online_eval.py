"""The online gate (`ragtune eval online`) with scripted server answers and local eval data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragtune.api.adapterdeployment import OnlineGate
from ragtune.pods.online_eval import (
    CandidateRef,
    OnlineEvalConfig,
    OnlineEvalResult,
    evaluate,
    render_prompt,
)
from ragtune.storage import Storage

REFUSAL = "I cannot answer this from the provided context."
RECORDS = [
    {"id": "q1", "question": "What is the capital of France?", "answer": "Paris [1]", "answerable": True,
     "contexts": [{"id": "1", "text": "The capital of France is Paris."}], "supportingContextIds": ["1"]},
    {"id": "q2", "question": "Who wrote Hamlet?", "answer": "Shakespeare [1]", "answerable": True,
     "contexts": [{"id": "1", "text": "Hamlet was written by Shakespeare."}], "supportingContextIds": ["1"]},
    {"id": "q3", "question": "What is the boiling point of gold?", "answer": REFUSAL, "answerable": False,
     "contexts": [{"id": "1", "text": "Gold is a yellow metal."}]},
]
GOOD = {"q1": "Paris [1]", "q2": "Shakespeare [1]", "q3": REFUSAL}
BASE = {"q1": "France is a country in Europe", "q2": "Hamlet is a play", "q3": "It boils at 2970 degrees"}


@pytest.fixture
def world(tmp_path):
    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}", "eos_token": "</s>"}))
    return data.as_uri(), run.as_uri() + "/"


def scripted(canary: dict, stable: dict | None = None):
    """`generate` that answers by question id, per server and adapter."""
    calls = []

    def generate(url: str, prompt: str, adapter):
        calls.append((url, adapter))
        qid = next(r["id"] for r in RECORDS if r["question"] in prompt)
        assert prompt.endswith("[assistant] ") and "[system] You answer questions" in prompt
        table = stable if url == "http://stable" else canary
        return table[adapter or "base"][qid]
    generate.calls = calls
    return generate


def config(world, **gate) -> OnlineEvalConfig:
    data, run = world
    return OnlineEvalConfig(canary_url="http://canary", stable_url="http://stable",
                            candidates=[CandidateRef(name="support", uri=run, serving="baseline" in gate)],
                            eval_set_uri=data, gate=OnlineGate.model_validate(
                                {k: v for k, v in gate.items() if k != "baseline"}))


def test_good_adapter_passes_with_metrics_for_candidate_and_base(world):
    gen = scripted({"support": GOOD, "base": BASE})
    result = evaluate(config(world, thresholds={"minF1": 0.9, "minRefusalRate": 1.0}), Storage(), gen)
    assert result.outcome == "Passed", result.message
    r = result.results[0]
    assert r.candidate.f1 == 1.0 and r.candidate.refusal_rate == 1.0
    assert r.base.refusal_rate == 0.0 and r.differs_from_base == 1.0
    assert {g.metric for g in r.gates} == {"f1", "refusalRate", "differsFromBase"}
    assert ("http://canary", None) in gen.calls and ("http://canary", "support") in gen.calls


def test_unknown_adapter_served_as_base_is_caught(world):
    gen = scripted({"support": BASE, "base": BASE})
    result = evaluate(config(world), Storage(), gen)
    assert result.outcome == "Failed" and result.reason == "NoAdapterEffect"
    assert "differsFromBase 0.000 < 0.333333" in result.message


def test_regression_against_the_adapter_serving_now(world):
    worse = {**GOOD, "q2": "Marlowe [1]"}
    gen = scripted({"support": worse, "base": BASE}, stable={"support": GOOD})
    result = evaluate(config(world, maxRegression=0.1, baseline=True), Storage(), gen)
    assert result.outcome == "Failed" and result.reason == "Regression"
    assert "f1VsServing 0.500 < 0.9" in result.message
    assert result.results[0].baseline.f1 == 1.0
    assert ("http://stable", "support") in gen.calls


def test_threshold_failure_names_metric_and_margin(world):
    gen = scripted({"support": {**GOOD, "q3": "Gold boils at 2970 degrees"}, "base": BASE})
    result = evaluate(config(world, thresholds={"minRefusalRate": 0.8}), Storage(), gen)
    assert result.reason == "GateFailed" and "refusalRate 0.000 < 0.8 (off by 0.800)" in result.message


def test_invalid_eval_set_names_file_and_line(tmp_path, world):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    cfg = config(world).model_copy(update={"eval_set_uri": bad.as_uri()})
    result = evaluate(cfg, Storage(), scripted({}))
    assert result.outcome == "Error" and result.reason == "InvalidEvalSet"
    assert f"{bad.as_uri()}:2" in result.message


def test_unreachable_canary_is_an_error_not_a_pass(world):
    def down(url, prompt, adapter):
        raise ConnectionError("connection refused")
    result = evaluate(config(world), Storage(), down)
    assert result.outcome == "Error" and result.reason == "CanaryUnreachable"


def test_a_name_the_server_does_not_serve_fails_the_proof(world):
    """vLLM answers a model name it does not serve with 404 (TGI would serve the base model)."""
    from ragtune.pods.online_eval import AdapterNotServed

    def vllm(url, prompt, adapter):
        if adapter:
            raise AdapterNotServed(f"{url} serves no model {adapter!r}: The model does not exist.")
        return BASE["q1"]
    result = evaluate(config(world), Storage(), vllm)
    assert result.outcome == "Failed" and result.reason == "AdapterNotServed"
    assert result.message == "adapter support: the canary http://canary serves no model 'support': The model does not exist."


def test_the_client_names_the_base_model_per_backend():
    from ragtune.pods.online_eval import Completions

    assert Completions("http://tgi:80/", backend="tgi", base_model="org/base").base_name == "tgi"
    assert Completions("http://vllm:8000", backend="vllm", base_model="org/base").base_name == "org/base"
    with pytest.raises(ValueError, match="served name"):
        Completions("http://vllm:8000", backend="vllm")


def test_sampling_is_bounded_and_deterministic(world):
    gen = scripted({"support": GOOD, "base": BASE})
    cfg = config(world, samples=2)
    a = evaluate(cfg, Storage(), gen)
    b = evaluate(cfg, Storage(), gen)
    assert a.results[0].candidate.samples == 2 and a.to_wire() == b.to_wire()


def test_templates_without_system_role_get_it_merged():
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                "supported') }}{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>")
    prompt = render_prompt(template, {}, [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert prompt == "<user>S\n\nU<assistant>"


def test_cli_writes_a_structured_termination_message(tmp_path, monkeypatch, world):
    from ragtune.cli import main

    term = tmp_path / "term"
    monkeypatch.setenv("RAGTUNE_TERMINATION_MESSAGE_PATH", str(term))
    monkeypatch.setenv("RAGTUNE_EVAL_CONFIG", json.dumps({"canaryUrl": "http://127.0.0.1:9"}))
    assert main(["eval", "online"]) == 1
    result = OnlineEvalResult.model_validate_json(term.read_text())
    assert result.outcome == "Error" and result.reason == "InvalidConfig" and "candidates" in result.message


# --- offline gate of `uri` adapters on their run's eval/report.json ---------------------------


def published_run(tmp_path: Path, report: dict, **kw) -> CandidateRef:
    from ragtune_local.testdoubles.tiny_models import (
        fake_adapter,
        file_put,
        publish_run,
    )

    run = tmp_path / "published"
    digest = publish_run(file_put(run), fake_adapter(tmp_path / "adapter"), report=report, **kw)
    return CandidateRef(name="support", uri=run.as_uri() + "/", sha256=digest, offline=True)


REPORT = {"passed": True, "metrics": {"base": {"f1": 0.2}, "adapter": {"f1": 0.45}}}


def offline_only(cand: CandidateRef, **offline) -> OnlineEvalConfig:
    return OnlineEvalConfig(candidates=[cand], offline={"offline": offline})


def test_offline_gate_on_the_run_report(tmp_path):
    cand = published_run(tmp_path, REPORT)
    result = evaluate(offline_only(cand, minF1=0.4, minF1GainOverBase=0.2), Storage(), scripted({}))
    assert result.outcome == "Passed" and {g.metric for g in result.offline["support"]} == {
        "f1", "f1GainOverBase", "fineTuneJobGatesPassed"}
    result = evaluate(offline_only(cand, minF1=0.5), Storage(), scripted({}))
    assert result.outcome == "Failed" and result.reason == "OfflineGateFailed"
    assert result.message == "adapter support: f1 0.450 < 0.5 (off by 0.050)"


def test_offline_gate_refuses_a_missing_or_tampered_report(tmp_path):
    cand = published_run(tmp_path, REPORT)
    (Path(cand.uri[len("file://"):]) / "eval" / "report.json").write_text(json.dumps({**REPORT, "passed": True, "x": 1}))
    result = evaluate(offline_only(cand), Storage(), scripted({}))
    assert result.reason == "OfflineReportInvalid" and "does not match its sha256" in result.message
    no_report = published_run(tmp_path / "b", None)
    result = evaluate(offline_only(no_report), Storage(), scripted({}))
    assert result.reason == "OfflineReportInvalid" and "lists no eval/report.json" in result.message


def test_prompt_rendering_matches_transformers(tmp_path):
    """Rendering the adapter's chat template without transformers gives transformers' prompt."""
    from ragtune.pods.online_eval import messages_for
    from ragtune_local.testdoubles.tiny_models import make_tokenizer

    tokenizer = make_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}{{ bos_token }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    messages = messages_for(RECORDS[0])
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render_prompt(tokenizer.chat_template, {"bos_token": "<s>"}, messages) == expected


def test_an_eval_set_that_is_not_the_published_split_is_refused(world):
    """`evalSetSha256` (the split a FineTuneJob published): a changed object is not evaluated on."""
    from ragtune.storage import local_path, sha256_file

    data, _ = world
    gen = scripted({"support": GOOD, "base": BASE})
    ok = config(world).model_copy(update={"eval_set_sha256": sha256_file(local_path(data))})
    assert evaluate(ok, Storage(), gen).outcome == "Passed"
    bad = config(world).model_copy(update={"eval_set_sha256": "0" * 64})
    result = evaluate(bad, Storage(), gen)
    assert result.outcome == "Error" and result.reason == "EvalSetDigestMismatch"
    assert data in result.message and "0" * 64 in result.message
