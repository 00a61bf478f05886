"""`ragtune report compare`: two runs' report.json -> one self-contained comparison page."""

from __future__ import annotations

import copy
import json
import re

from ragtune.api.gates import evaluate_gates
from ragtune.cli import main
from ragtune_trainer.compare import Run, changed_items, item_key, render_compare
from ragtune_trainer.report import write_report

from .test_report import EVIL, LOSS, SPEC, _images, _outcome

REFUSAL = "I cannot answer this from the provided context."


def _write(tmp_path, name: str, outcome) -> dict:
    gates = evaluate_gates(SPEC.evaluation.thresholds, outcome.adapter, outcome.base)
    json_path, _ = write_report(tmp_path / name / "eval", outcome, LOSS, SPEC, gates)
    return json.loads(json_path.read_text())


def _two_runs(tmp_path) -> tuple[Run, Run]:
    a = _outcome()
    b = copy.deepcopy(a)
    b.samples[0]["adapter"] = REFUSAL          # answerable: correct in A, refused in B (worse)
    b.samples[2]["adapter"] = REFUSAL          # near miss: answered in A, refused in B (better)
    b.samples[1]["contexts"] = [{"id": "1", "text": "Dogs bark."}]  # another item: not shared
    b.adapter = b.adapter.model_copy(update={"f1": 0.0, "refusal_rate": 1.0})
    return Run("runs/a", _write(tmp_path, "a", a)), Run("runs/b", _write(tmp_path, "b", b))


def test_items_are_matched_by_question_and_contexts_and_regressions_come_first(tmp_path):
    a, b = _two_runs(tmp_path)
    shared, changed = changed_items(a, b)
    assert shared == 2  # the item whose contexts differ in B is not the same item
    assert [(c["kind"], c["a"], c["b"], c["better"]) for c in changed] == [
        ("answerable", "correct", "refused", False), ("unanswerable", "answered", "refused", True)]
    # regressions first whatever order the items come in
    reversed_a = Run(a.label, {**a.report, "samples": list(reversed(a.report["samples"]))})
    assert [c["better"] for c in changed_items(reversed_a, b)[1]] == [False, True]
    same = {"question": "q", "contexts": [{"id": "9", "text": "t"}]}
    assert item_key(same) == item_key({**same, "contexts": [{"id": "1", "text": "t"}], "id": "other"})


def test_compare_page_shows_both_runs_deltas_changed_items_and_nothing_external(tmp_path):
    a, b = _two_runs(tmp_path)
    page = render_compare(a, b)
    assert "runs/a" in page and "runs/b" in page
    assert re.search(r"<td>F1</td><td class=num>1\.000</td><td class=num>0\.000</td><td class=num>-1\.000</td>", page)
    assert "2 items evaluated by both; 2 changed verdict" in page and "1 worse" in page
    assert page.index("A correct → B refused") < page.index("A answered → B refused")
    assert "<script>" not in page and "&lt;script&gt;" in page  # the question is escaped
    assert EVIL not in page
    images = _images(page)
    assert len(images) == 1 and images[0].width > 300
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "default-src 'none'" in page


def test_cli_reads_run_folders_and_reports_what_is_missing(tmp_path, capsys):
    _two_runs(tmp_path)
    out = tmp_path / "cmp.html"
    assert main(["report", "compare", str(tmp_path / "a"), str(tmp_path / "b" / "eval" / "report.json"),
                 "--out", str(out)]) == 0
    assert "changed verdict" in out.read_text()

    assert main(["report", "compare", str(tmp_path / "a"), str(tmp_path / "nowhere"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "nowhere" in err and "report.json" in err
    (tmp_path / "x.json").write_text('{"metrics": {}}')
    assert main(["report", "compare", str(tmp_path / "a"), str(tmp_path / "x.json"), "--out", str(out)]) == 1
    assert "not a ragtune evaluation report" in capsys.readouterr().err
