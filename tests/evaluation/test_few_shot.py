"""The few-shot baseline: the base model prompted with training items first, beside the zero-shot base."""

from __future__ import annotations

import json

from ragtune.api.finetunejob import FineTuneJobSpec
from ragtune.rag.prompt import PromptContract, render_prompt
from ragtune.rag.records import Context, RagRecord
from ragtune_trainer.evaluate import evaluate_run
from ragtune_trainer.report import write_report
from ragtune_trainer.rows import few_shot_examples

from .conftest import make_records
from .test_report import SPEC


class _Template:
    """A tokenizer stand-in whose chat template shows the turns in order."""

    chat_template = "x"

    def apply_chat_template(self, messages, **_):
        return "\n".join(f"<{m['role']}>{m['content']}" for m in messages)


def test_examples_alternate_answerable_and_unanswerable_in_data_order():
    records = make_records()  # five answerable, then one unanswerable
    picked = few_shot_examples(records, 3)
    assert [r.id for r in picked] == ["r0", "u0", "r1"]
    assert few_shot_examples(records, 0) == [] and len(few_shot_examples(records[:2], 5)) == 2


def test_examples_come_as_earlier_turns_under_the_same_contract():
    contract = PromptContract(citation="[doc{id}]")
    shot = RagRecord(id="s", question="Where is the Louvre?", answer="Paris [doc1]",
                     contexts=[Context("1", "The Louvre is in Paris.")])
    target = make_records()[0]
    text = render_prompt(_Template(), target, prompt=contract, examples=[shot])
    roles = [line.split(">")[0] for line in text.splitlines() if line.startswith("<")]
    assert roles == ["<system", "<user", "<assistant", "<user"]
    assert text.index("Where is the Louvre?") < text.index("Paris [doc1]") < text.index(target.question)
    assert "The Louvre is in Paris." in text
    assert render_prompt(_Template(), target, prompt=contract) == text.replace(
        text[text.index("<user"):text.index("<user>", text.index("<assistant"))], "")


def test_evaluation_and_report_carry_the_few_shot_base(tmp_path, tiny_peft_model, tiny_tokenizer):
    spec = FineTuneJobSpec.model_validate({**SPEC.to_wire(), "evaluation": {"maxNewTokens": 4, "fewShot": 2}})
    records = make_records()
    outcome = evaluate_run(tiny_peft_model, tiny_tokenizer, records, spec, few_shot=few_shot_examples(records, 2))
    assert outcome.few_shot_base is not None and outcome.few_shot_base.samples == len(records)
    assert all("fewShotBase" in s for s in outcome.samples)
    json_path, html_path = write_report(tmp_path, outcome, [], spec, [])
    report = json.loads(json_path.read_text())
    assert report["metrics"]["fewShotBase"] == outcome.few_shot_base.to_wire()
    assert "<th>base, 2-shot</th>" in html_path.read_text()
    plain = evaluate_run(tiny_peft_model, tiny_tokenizer, records, spec)
    assert plain.few_shot_base is None and not any("fewShotBase" in s for s in plain.samples)
