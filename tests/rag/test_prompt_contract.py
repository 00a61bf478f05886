"""The prompt contract (`spec.prompt` -> `ragtune.rag.prompt.PromptContract`): the default is
today's prompt byte for byte, custom contracts render and score in their own id style, prompt.json
round-trips, the foreign prompt and the augmentation variants are what the docs say."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from ragtune.api import FineTuneJobSpec
from ragtune.api.common import EvalMetrics, MetricThresholds
from ragtune.api.gates import evaluate_gates, prompt_gap
from ragtune.rag.metrics import parse_citations, score, strip_citations
from ragtune.rag.prompt import (
    DEFAULT_REFUSAL,
    ID_STYLES,
    PARAPHRASES,
    USER_LAYOUTS,
    PromptContract,
    augment_variant,
    augmented_messages,
    build_messages,
    foreign_prompt,
)
from ragtune.rag.records import Context, RagRecord

# ragtune's prompt as it was before the contract existed (rag/prompt.py of the previous release).
OLD_SYSTEM = (
    "You answer questions using only the numbered contexts you are given. "
    "Cite every context you use by its id in square brackets, for example [2]. "
    "Do not use outside knowledge. If the contexts do not contain the answer, reply exactly: {refusal}"
)


def old_messages(record: RagRecord, refusal: str = DEFAULT_REFUSAL) -> list[dict]:
    contexts = "\n".join(f"[{c.id}] {c.text}" for c in record.contexts) or "(no contexts)"
    return [{"role": "system", "content": OLD_SYSTEM.format(refusal=refusal)},
            {"role": "user", "content": f"Contexts:\n{contexts}\n\nQuestion: {record.question}"}]


MINIMAL = {"baseModel": {"id": "tiny/model"}, "dataset": {"train": "s3://data/train.jsonl"},
           "output": {"uri": "s3://runs/out"}}
RECORDS = [
    RagRecord("a", "Who wrote {contexts} Hamlet?", [Context("2", "Shakespeare wrote it {question}."),
                                                     Context("kb:7", "Bob read it.")], "Shakespeare [2]"),
    RagRecord("b", "Who?", [], DEFAULT_REFUSAL, answerable=False),
]


@pytest.mark.parametrize("record", RECORDS, ids=["contexts-and-braces", "no-contexts"])
def test_default_contract_renders_byte_identical_to_the_old_prompt(record):
    spec = FineTuneJobSpec.model_validate(MINIMAL)
    contract = PromptContract.from_spec(spec)
    assert contract == PromptContract()
    assert contract.messages(record) == old_messages(record)
    assert build_messages(record) == old_messages(record)
    custom = FineTuneJobSpec.model_validate({**MINIMAL, "dataset": {**MINIMAL["dataset"], "raft": {"refusal": "NOPE."}}})
    assert PromptContract.from_spec(custom).messages(record) == old_messages(record, "NOPE.")


def test_prompt_refusal_takes_the_place_of_raft_refusal():
    spec = FineTuneJobSpec.model_validate({**MINIMAL, "prompt": {"refusal": "Not in my sources."},
                                           "dataset": {**MINIMAL["dataset"], "raft": {"refusal": "NOPE."}}})
    assert PromptContract.from_spec(spec).refusal == "Not in my sources."


XML = {"system": "Use the documents. Cite like {citation}. Otherwise say: {refusal}",
       "userTemplate": "<docs>\n{contexts}\n</docs>\nQ: {question}",
       "contextTemplate": '<doc id="{id}">{text}</doc>', "citation": "[doc{id}]",
       "refusal": "No answer in the documents."}


def test_custom_contract_renders_and_round_trips_as_prompt_json(tmp_path):
    spec = FineTuneJobSpec.model_validate({**MINIMAL, "prompt": XML})
    contract = PromptContract.from_spec(spec)
    system, user = contract.messages(RECORDS[0])
    assert system["content"] == "Use the documents. Cite like [doc2]. Otherwise say: No answer in the documents."
    # one-pass placeholders: braces inside the question and the contexts stay as they are
    assert user["content"] == ('<docs>\n<doc id="2">Shakespeare wrote it {question}.</doc>\n'
                               '<doc id="kb:7">Bob read it.</doc>\n</docs>\nQ: Who wrote {contexts} Hamlet?')
    path = tmp_path / "prompt.json"
    path.write_text(contract.dumps())
    assert json.loads(path.read_text())["schema"] == "ragtune.dev/prompt/v1"
    assert PromptContract.load(path) == contract
    # what a client has: a question and {id, text} dicts
    assert contract.messages(question=RECORDS[0].question,
                             contexts=[{"id": c.id, "text": c.text} for c in RECORDS[0].contexts]) == [system, user]


@pytest.mark.parametrize("data, field", [
    ({"userTemplate": "Q: {question}"}, "userTemplate"),
    ({"userTemplate": "{contexts} {question} {context}"}, "userTemplate"),
    ({"system": "Say {refusal} or {answer}"}, "system"),
    ({"contextTemplate": "{text}"}, "contextTemplate"),
    ({"citation": "{id}"}, "citation"),
    ({"citation": "[{id}] and {text}"}, "citation"),
])
def test_bad_templates_are_refused_naming_the_field(data, field):
    with pytest.raises(ValidationError) as err:
        FineTuneJobSpec.model_validate({**MINIMAL, "prompt": data})
    assert field in str(err.value)
    with pytest.raises(ValueError, match=f"field '{field}"):
        PromptContract.from_wire({**PromptContract().to_wire(), **data})


def test_prompt_json_errors_name_the_file():
    with pytest.raises(ValueError, match="p.json:1: not JSON"):
        PromptContract.loads("{", "p.json")
    with pytest.raises(ValueError, match="p.json: field 'refusal' is required"):
        PromptContract.loads(json.dumps({"schema": "ragtune.dev/prompt/v1"}), "p.json")
    # JSON braces are text, not placeholders
    PromptContract.from_wire({**PromptContract().to_wire(), "userTemplate": 'Reply as {"a": 1}.\n{contexts}\n{question}'})


def test_citations_and_scores_follow_the_configured_id_style_and_refusal():
    contract = PromptContract(citation="[doc{id}]", refusal="No answer in the documents.")
    assert parse_citations("Paris [doc1, doc2] and [doc3][4]", contract.citation) == ["1", "2", "3"]
    assert strip_citations("Paris [doc1].", contract.citation) == "Paris."
    items = [{"question": "q", "answer": "Paris [doc1]", "answerable": True, "supportingContextIds": ["1"],
              "contexts": [{"id": "1", "text": "Paris is the capital."}]},
             {"question": "q", "answer": "No answer in the documents.", "answerable": False,
              "contexts": [{"id": "1", "text": "Lyon."}]}]
    predictions = ["Paris [doc1]", "Sadly: no answer in the documents"]
    m = score(items, predictions, prompt=contract)
    assert (m.f1, m.citation_validity, m.citation_recall, m.refusal_rate) == (1.0, 1.0, 1.0, 1.0)
    default = score(items, predictions)  # ragtune's id style and refusal do not see them
    assert default.citation_validity == 0.0 and default.citation_recall == 0.0 and default.refusal_rate == 0.0


def test_foreign_prompt_is_fixed_other_wording_and_never_an_augmentation_variant():
    contract = PromptContract(citation="[doc{id}]")
    foreign = foreign_prompt(contract)
    assert foreign.refusal == contract.refusal and foreign.citation == contract.citation
    system, user = foreign.messages(RECORDS[0])
    assert "[doc2]" in system["content"] and "Document [doc2]:\nShakespeare" in user["content"]
    assert foreign.system not in PARAPHRASES + (contract.system,)
    assert foreign.user_template not in USER_LAYOUTS + (contract.user_template,)
    assert foreign.context_template not in [t for t, _ in ID_STYLES]
    assert foreign_prompt(contract) == foreign  # fixed


def test_augmentation_is_deterministic_varied_and_keeps_answers_consistent():
    import random

    contract = PromptContract()
    record = RagRecord("a", "Who wrote Hamlet?", [Context("2", "Shakespeare wrote it."), Context("7", "Bob.")],
                       "Shakespeare [2], read by Bob [7]")
    runs = [[augmented_messages(contract, record, 42, i, 0.5) for i in range(200)] for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0] != [augmented_messages(contract, record, 43, i, 0.5) for i in range(200)]
    own = contract.messages(record, answer=record.answer)
    varied = [m for m in runs[0] if m != own]
    assert 60 <= len(varied) <= 140  # about half
    assert all(m == own for m in (augmented_messages(contract, record, 42, i, 1e-9) for i in range(50)))
    seen = {"paraphrase": 0, "system placement": 0, "shuffled": 0, "doc ids": 0, "paren ids": 0}
    for system, user, answer in varied:
        seen["paraphrase"] += system["content"].startswith(tuple(p[:30] for p in PARAPHRASES))
        seen["system placement"] += "Contexts:" in system["content"]
        text = system["content"] + user["content"]
        seen["shuffled"] += text.index("Bob.") < text.index("Shakespeare wrote")
        if "[doc2]" in text:
            seen["doc ids"] += 1
            assert answer["content"] == "Shakespeare [doc2], read by Bob [doc7]"
        if "Source (2)" in text:
            seen["paren ids"] += 1
            assert answer["content"] == "Shakespeare (2), read by Bob (7)"
    assert all(seen.values()), seen
    # the refusal is the contract: never varied
    for i in range(50):
        assert augment_variant(contract, random.Random(i))[0].refusal == contract.refusal


def test_foreign_prompt_gap_is_the_largest_absolute_difference_and_gateable():
    trained = EvalMetrics(samples=10, f1=0.60, refusal_rate=0.90, false_refusal_rate=0.10)
    foreign = EvalMetrics(samples=10, f1=0.52, refusal_rate=0.95, false_refusal_rate=0.40)
    gap = prompt_gap(trained, foreign)
    assert (gap.f1, gap.refusal_rate, gap.false_refusal_rate, gap.max) == (0.08, 0.05, 0.3, 0.3)
    gate = MetricThresholds(max_foreign_prompt_gap=0.1)
    [result] = evaluate_gates(gate, trained, None, foreign)
    assert result.metric == "foreignPromptGap" and not result.passed and result.value == 0.3
    [result] = evaluate_gates(MetricThresholds(max_foreign_prompt_gap=0.3), trained, None, foreign)
    assert result.passed
    [result] = evaluate_gates(gate, trained)  # not measured (e.g. an online gate): fails
    assert not result.passed and result.value is None


def test_ragtune_prompt_render_formats_a_request_as_the_adapter_was_trained(tmp_path, capsys):
    from ragtune.cli import main

    contract = PromptContract(context_template='<doc id="{id}">{text}</doc>', refusal="No answer in the documents.")
    (tmp_path / "prompt.json").write_text(contract.dumps())
    contexts = [{"id": "1", "text": "Paris is the capital of France."}, {"id": "2", "text": "Lyon."}]
    (tmp_path / "ctx.jsonl").write_text("".join(json.dumps(c) + "\n" for c in contexts))
    args = ["prompt", "render", "--prompt", str(tmp_path / "prompt.json"), "--question", "Capital of France?",
            "--contexts", str(tmp_path / "ctx.jsonl")]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["messages"] == contract.messages(question="Capital of France?",
                                                                               contexts=contexts)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>")}))
    assert main(args + ["--tokenizer-config", str(tmp_path / "tokenizer_config.json")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("<|system|>") and '<doc id="1">Paris' in text and text.endswith("<|assistant|>")
    (tmp_path / "bad.jsonl").write_text(json.dumps(contexts[0]) + "\n{\"id\": 3}\n")
    assert main(args[:-1] + [str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:2: a context must be an object with 'id' and 'text'" in capsys.readouterr().err
