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
    parsed = parse_rag(Row("halueval.jsonl", 1, record))  # what the trainer's loader accepts
    assert parsed.answerable and [c.id for c in parsed.contexts] == ["1", "2"]


def test_splits_are_disjoint_by_question(tmp_path):
    items = [dict(HALUEVAL_ITEM, question=f"Question {i}?") for i in range(10)]
    items.append(dict(HALUEVAL_ITEM, question="question 3?"))  # duplicate up to case
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    bench = _bench()
    with pytest.raises(SystemExit, match="exceeds the 10 usable records"):
        bench.build_splits(path, 6, 5, seed=1)
    train, held_out = bench.build_splits(path, 6, 4, seed=1)
    assert len(train) == 6 and len(held_out) == 4
    assert not {r["question"] for r in train} & {r["question"] for r in held_out}
