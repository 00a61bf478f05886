"""report.json + self-contained report.html with embedded plots."""

from __future__ import annotations

import base64
import io
import json
import re

from PIL import Image

from ragtune.api.common import EvalMetrics, MetricThresholds
from ragtune.api.finetunejob import FineTuneJobSpec
from ragtune.api.gates import evaluate_gates, prompt_gap
from ragtune_trainer.evaluate import EvalOutcome, evaluate_run
from ragtune_trainer.report import write_report

from .conftest import make_records

SPEC = FineTuneJobSpec.model_validate({
    "baseModel": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "abc123",
                  "tokenSecretRef": {"name": "hf-token"}},
    "dataset": {"train": "s3://data/train.jsonl"},
    "output": {"uri": "s3://runs/out"},
    "s3": {"endpoint": "http://minio:9000", "credentialsSecretRef": {"name": "s3-credentials"}},
    "evaluation": {"thresholds": {"minRefusalRate": 0.8, "maxFalseRefusalRate": 0.2}},
})

EVIL = "<script>alert('x')</script> & <b>bold</b>"


def _outcome() -> EvalOutcome:
    samples = [
        {"id": "a1", "question": EVIL, "contexts": [{"id": "1", "text": "ctx " + EVIL}], "answerable": True,
         "reference": "Paris [1]", "base": "London", "adapter": "Paris [1]"},
        {"id": "u1", "question": "Who?", "contexts": [{"id": "1", "text": "Cats purr."}], "answerable": False,
         "construction": "offTopic",
         "reference": "I cannot answer this from the provided context.", "base": "Bob",
         "adapter": "I cannot answer this from the provided context."},
        {"id": "u2", "question": "How tall is the tower?", "contexts": [{"id": "1", "text": "The tower is red."}],
         "answerable": False, "construction": "nearMiss",
         "reference": "I cannot answer this from the provided context.", "base": "Bob", "adapter": "400 m [1]"},
    ]
    return EvalOutcome(
        base=EvalMetrics(samples=3, f1=0.0, refusal_rate=0.0, false_refusal_rate=0.0, mean_answer_words=1.0,
                         refusal_by_construction={"offTopic": 0.0, "nearMiss": 0.0}),
        adapter=EvalMetrics(samples=3, f1=1.0, refusal_rate=0.5, false_refusal_rate=0.5, mean_answer_words=5.0,
                            refusal_by_construction={"offTopic": 1.0, "nearMiss": 0.0}),
        samples=samples, seconds=1.5,
    )


LOSS = [{"step": 1, "loss": 2.5, "epoch": 0.1}, {"step": 2, "loss": 2.1}, {"step": 2, "eval_loss": 2.3},
        {"step": 3, "loss": float("nan")}, {"step": 4, "loss": 1.7}, {"step": 4, "eval_loss": 1.9}]


def _images(page: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(data)))
            for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_json_and_html(tmp_path):
    outcome = _outcome()
    gates = evaluate_gates(SPEC.evaluation.thresholds, outcome.adapter, outcome.base)
    paths = write_report(tmp_path / "eval", outcome, LOSS, SPEC, gates)
    assert [p.name for p in paths] == ["report.json", "report.html"]

    report = json.loads(paths[0].read_text())
    assert report["passed"] is False  # false refusals 0.5 > 0.2
    # minRefusalRate applies to the hardest construction: near miss, 0.0
    assert {g["metric"]: g["passed"] for g in report["gates"]} == {"refusalRate.nearMiss": False,
                                                                  "falseRefusalRate": False}
    assert report["metrics"]["adapter"]["refusalRate"] == 0.5 and report["metrics"]["base"]["f1"] == 0.0
    assert report["refusalByConstruction"] == [
        {"construction": "nearMiss", "items": 1, "baseRefusalRate": 0.0, "adapterRefusalRate": 0.0},
        {"construction": "offTopic", "items": 1, "baseRefusalRate": 0.0, "adapterRefusalRate": 1.0}]
    assert report["samples"][0]["question"] == EVIL
    assert report["lossHistory"][3]["loss"] is None  # NaN is not JSON
    assert report["spec"]["baseModel"] == {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "abc123"}
    assert "s3" not in report["spec"] and "hf-token" not in paths[0].read_text()

    page = paths[1].read_text()
    images = _images(page)
    assert len(images) == 2  # metric bars + loss curve
    assert all(img.format == "PNG" and img.width > 300 and img.height > 200 for img in images)
    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing fetched from elsewhere
    assert "gates failed" in page and "FAIL" in page
    assert "Paris [1]" in page and "Cats purr." in page
    # the hardest unanswerable case (near miss answered with a citation) is the first one shown
    assert page.index("400 m [1]") < page.index("Cats purr.") and "near miss (on-topic" in page


def test_report_without_loss_history_or_gates(tmp_path):
    paths = write_report(tmp_path, _outcome(), [], SPEC, [])
    report = json.loads(paths[0].read_text())
    assert report["passed"] is True and report["gates"] == []
    page = paths[1].read_text()
    assert len(_images(page)) == 1
    assert "No loss history recorded." in page and "No thresholds configured" in page


def test_report_from_a_real_evaluation(tmp_path, tiny_peft_model, tiny_tokenizer):
    spec = SPEC.model_copy(update={"evaluation": SPEC.evaluation.model_copy(update={"max_new_tokens": 6})})
    outcome = evaluate_run(tiny_peft_model, tiny_tokenizer, make_records(), spec)
    gates = evaluate_gates(MetricThresholds(min_f1=0.9), outcome.adapter, outcome.base)
    json_path, html_path = write_report(tmp_path, outcome, LOSS, spec, gates)
    report = json.loads(json_path.read_text())
    assert len(report["samples"]) == len(make_records())
    assert report["metrics"]["adapter"] == outcome.adapter.to_wire()
    assert report["intervals"] == outcome.intervals and report["intervals"]["confidence"] == 0.95
    assert {"base", "adapter", "delta"} <= set(report["intervals"])
    assert report["passed"] is False
    assert len(_images(html_path.read_text())) == 2


def test_per_construction_metrics_fit_the_termination_message():
    """Base and adapter metrics with every rate and the per-construction refusal, every gate set
    and failing, a long message: the trainer's result still fits the kubelet's 4 KiB."""
    from ragtune.api.pods import TERMINATION_MESSAGE_LIMIT, TrainerResult, encode_termination_message

    rate = 0.123456
    m = EvalMetrics(samples=100000, f1=rate, exact_match=rate, rouge_l=rate, refusal_rate=rate,
                    false_refusal_rate=rate, citation_validity=rate, citation_precision=rate, citation_recall=rate,
                    grounding_score=rate, mean_answer_words=12.123456,
                    refusal_by_construction={"offTopic": rate, "nearMiss": rate, "answerRemoved": rate,
                                             "userLabelled": rate})
    thresholds = MetricThresholds(min_f1=0.99, min_exact_match=0.99, min_rouge_l=0.99, min_refusal_rate=0.99,
                                  max_false_refusal_rate=0.01, min_citation_validity=0.99, min_grounding_score=0.99,
                                  min_f1_gain_over_base=0.5, min_refusal_gain_over_base=0.5,
                                  max_foreign_prompt_gap=0.01, confidence=0.95)
    foreign = m.model_copy(update={"f1": 0.654321})
    ci = [0.012345, 0.234567]
    names = ["f1", "exactMatch", "rougeL", "refusalRate", "falseRefusalRate", "citationValidity", "groundingScore",
             "refusalRate.answerRemoved"]
    intervals = {"adapter": {n: ci for n in names}, "delta": {"f1": ci, "refusalRate": ci}}
    gates = evaluate_gates(thresholds, m, m, foreign, intervals=intervals)
    assert sum(g.interval is not None for g in gates) >= 8
    assert not any(g.passed for g in gates) and "refusalRate.answerRemoved" in {g.metric for g in gates}
    result = TrainerResult(outcome="Failed", reason="GateFailed", message="x" * 1000, run_id="r" * 40,
                           adapter_uri="s3://bucket/" + "k" * 200, manifest_sha256="a" * 64, adapter_size_bytes=10**9,
                           report_uri="s3://bucket/" + "k" * 200 + "/eval/report.html", base=m, adapter=m,
                           prompt_sha256="b" * 64, foreign_prompt=foreign, foreign_prompt_gap=prompt_gap(m, foreign),
                           passed=False, gates=gates, steps=100000, train_seconds=123456.7,
                           eval_set_uri="s3://bucket/" + "k" * 200 + "/eval/heldout.jsonl", eval_set_sha256="e" * 64)
    text = encode_termination_message(result)
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    decoded = TrainerResult.model_validate_json(text)
    assert decoded.eval_set_uri == result.eval_set_uri and decoded.eval_set_sha256 == "e" * 64
    assert decoded.message == "x" * 200  # the message goes before the gates (it repeats them)
    assert decoded.adapter.refusal_by_construction.near_miss == rate and len(decoded.gates) == len(gates)
    assert all(g.bound == 0.012345 or g.bound == 0.234567 for g in decoded.gates if g.metric != "foreignPromptGap")
    # what the foreign-prompt gap needs survives (the report keeps the full foreign metrics)
    assert decoded.foreign_prompt.f1 == 0.654321 and decoded.foreign_prompt_gap.max == round(0.654321 - rate, 6)
