"""The HaluEval -> rag conversion of bench/rag_quality.py (no download: a record from the file)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from ragtune_trainer.data import Row, parse_rag

BENCH = Path(__file__).resolve().parents[2] / "bench" / "rag_quality.py"
HALUEVAL_ITEM = {
    "knowledge": "Arthur's Magazine (1844–1846) was an American literary periodical published in Philadelphia "
                 "in the 19th century.First for Women is a woman's magazine published by Bauer Media Group in the USA.",
    "question": "Which magazine was started first Arthur's Magazine or First for Women?",
    "right_answer": "Arthur's Magazine",
    "hallucinated_answer": "First for Women was started first.",
}


def _bench():
    spec = importlib.util.spec_from_file_location("rag_quality_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_knowledge_paragraphs_become_cited_contexts():
    record = _bench().to_rag(0, HALUEVAL_ITEM)
    assert [c["text"][:12] for c in record["contexts"]] == ["Arthur's Mag", "First for Wo"]
    assert record["contexts"][0]["text"].endswith("19th century.")
    assert record["answer"] == "Arthur's Magazine [1][2]"
    assert record["supportingContextIds"] == ["1", "2"]
    assert record["rejected"] == "First for Women was started first. [1][2]"  # the preference stage's pair
    parsed = parse_rag(Row("halueval.jsonl", 1, record))  # what the trainer's loader accepts
    assert parsed.answerable and [c.id for c in parsed.contexts] == ["1", "2"]
    assert parsed.rejected == record["rejected"]
    same = _bench().to_rag(1, dict(HALUEVAL_ITEM, hallucinated_answer="arthur's magazine"))
    assert "rejected" not in same  # never a pair whose sides are the same answer (validation refuses it)


def test_splits_are_disjoint_by_question(tmp_path):
    items = [dict(HALUEVAL_ITEM, question=f"Question {i}?") for i in range(10)]
    items.append(dict(HALUEVAL_ITEM, question="question 3?"))  # duplicate up to case
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    bench = _bench()
    with pytest.raises(SystemExit, match="exceeds the 10 usable records"):
        bench.build_splits(path, 6, 5, seed=1)
    train, held_out, unused = bench.build_splits(path, 6, 3, seed=1)
    assert len(train) == 6 and len(held_out) == 3 and len(unused) == 1
    questions = [{r["question"] for r in part} for part in (train, held_out, unused)]
    assert not questions[0] & questions[1] and not (questions[0] | questions[1]) & questions[2]


def test_independent_set_pairs_questions_with_retrieved_passages_that_lack_the_answer():
    bench = _bench()
    subjects = [("Velmar tower", "312 metres"), ("Draland plums", "Norvia"), ("Ostrava bridge", "Ida Kron"),
                ("Kelso river", "1931"), ("Mirvan lake", "blue"), ("Torvik mine", "copper")]
    records = []
    for i, (subject, answer) in enumerate(subjects):
        item = {"knowledge": f"The {subject} is known for {answer}. The {subject} draws many visitors.",
                "question": f"What is the {subject} known for?", "right_answer": answer}
        records.append(bench.to_rag(i, item))
        # a second record on the same subject whose passage lacks the first one's answer
        other = {"knowledge": f"The {subject} was surveyed in spring. Visitors of the {subject} pay a fee.",
                 "question": f"When was the {subject} surveyed?", "right_answer": "in spring"}
        records.append(bench.to_rag(100 + i, other))
    items = bench.build_independent(records, 6, seed=0)
    unanswerable = [i for i in items if not i["answerable"]]
    assert len(items) == 6 and len(unanswerable) == 3
    for item in unanswerable:
        source = next(r for r in records if r["question"] == item["question"])
        (ctx,) = item["contexts"]
        subject = item["question"].split("the ", 1)[1].split(" known")[0].split(" surveyed")[0]
        assert subject in ctx["text"]  # on topic ...
        assert source["answer"].split(" [")[0] not in ctx["text"]  # ... without the answer
        assert ctx["text"] not in {c["text"] for c in source["contexts"]}
