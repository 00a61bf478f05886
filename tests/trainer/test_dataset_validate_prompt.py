"""`ragtune dataset validate --prompt prompt.json`: answers are checked in the contract's citation
form, and unanswerable records without an answer target its refusal."""

from __future__ import annotations

import json

from ragtune.cli import main
from ragtune.rag.prompt import PromptContract


def test_validate_checks_citations_in_the_prompts_form(tmp_path, capsys):
    rows = [{"id": "a", "question": "Capital of France?", "contexts": [{"id": "1", "text": "Paris is the capital."}],
             "answer": "Paris [doc1]"},
            {"id": "b", "question": "Capital of Peru?", "contexts": [{"id": "1", "text": "Paris."}],
             "answer": "Lima [doc7]"}]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "prompt.json").write_text(PromptContract(citation="[doc{id}]").dumps())
    assert main(["dataset", "validate", str(data), "--prompt", str(tmp_path / "prompt.json")]) == 1
    out = capsys.readouterr().out
    assert "train.jsonl:2" in out and "[doc7]" in out and "train.jsonl:1" not in out
    # under ragtune's default form `[doc1]` is an unknown id `doc1`
    assert main(["dataset", "validate", str(data)]) == 1
    assert "train.jsonl:1" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{}")
    assert main(["dataset", "validate", str(data), "--prompt", str(tmp_path / "bad.json")]) == 1
    assert "field 'refusal' is required" in capsys.readouterr().err
