"""evaluate_run on a tiny random Llama + LoRA adapter (peft), on CPU."""

from __future__ import annotations

import pytest

from ragtune.api.finetunejob import FineTuneJobSpec
from ragtune.rag.prompt import render_prompt
from ragtune_trainer.evaluate import evaluate_run, generate_answers

from .conftest import make_records


def _spec(max_samples: int = 64, max_new_tokens: int = 8) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({
        "baseModel": {"id": "tiny-llama"},
        "dataset": {"train": "file:///data/train.jsonl"},
        "output": {"uri": "file:///data/out"},
        "evaluation": {"maxSamples": max_samples, "maxNewTokens": max_new_tokens},
    })


def test_base_and_adapter_answers_differ_and_are_scored(tiny_peft_model, tiny_tokenizer):
    records = make_records()
    calls = []
    tiny_peft_model.train()
    outcome = evaluate_run(tiny_peft_model, tiny_tokenizer, records, _spec(),
                           progress=lambda done, total: calls.append((done, total)))

    assert [s["id"] for s in outcome.samples] == [r.id for r in records]
    assert sum(s["base"] != s["adapter"] for s in outcome.samples) >= len(records) // 2
    assert outcome.base.samples == outcome.adapter.samples == len(records)
    assert outcome.base.refusal_rate is not None and outcome.base.f1 is not None
    assert outcome.samples[-1]["answerable"] is False
    assert outcome.samples[0]["reference"] == "Paris [1]"
    assert outcome.samples[0]["contexts"][0] == {"id": "1", "text": "Paris is the capital of France."}
    # three passes: base, adapter, adapter under the foreign prompt
    assert calls[-1] == (3 * len(records), 3 * len(records))
    assert outcome.foreign is not None and outcome.foreign.samples == len(records)
    assert all("foreign" in s for s in outcome.samples)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert outcome.seconds > 0
    assert tiny_peft_model.training  # mode restored after evaluation


def test_batched_left_padded_answers_match_one_by_one(tiny_peft_model, tiny_tokenizer):
    records = make_records()
    outcome = evaluate_run(tiny_peft_model, tiny_tokenizer, records, _spec())
    prompts = [render_prompt(tiny_tokenizer, r) for r in records]
    # Prompts have different lengths, so batches really are padded.
    assert len({len(tiny_tokenizer(p)["input_ids"]) for p in prompts}) > 1
    one_by_one = generate_answers(tiny_peft_model, tiny_tokenizer, prompts, 8, max_batch=1)
    assert [s["adapter"] for s in outcome.samples] == one_by_one
    with tiny_peft_model.disable_adapter():
        base_one_by_one = generate_answers(tiny_peft_model, tiny_tokenizer, prompts, 8, max_batch=1)
    assert [s["base"] for s in outcome.samples] == base_one_by_one


def test_max_samples_limits_the_evaluated_items(tiny_peft_model, tiny_tokenizer):
    outcome = evaluate_run(tiny_peft_model, tiny_tokenizer, make_records(), _spec(max_samples=2))
    assert len(outcome.samples) == 2 and outcome.adapter.samples == 2
    # only answerable items among the first two: no refusal rate, but a false-refusal rate
    assert outcome.adapter.refusal_rate is None and outcome.adapter.false_refusal_rate is not None


def test_needs_a_peft_model(tiny_peft_model, tiny_tokenizer):
    with pytest.raises(TypeError, match="peft model"):
        evaluate_run(tiny_peft_model.get_base_model(), tiny_tokenizer, make_records(), _spec())
