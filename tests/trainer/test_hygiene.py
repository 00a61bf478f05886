"""Dataset hygiene (`hygiene.py`): duplicates, near-duplicates, train/test overlap and class
balance, named by file:line, in `ragtune dataset validate`, the training run and the report."""

from __future__ import annotations

import json

import pytest

from ragtune.api.finetunejob import FineTuneJobSpec
from ragtune.cli import main
from ragtune_trainer import data as D
from ragtune_trainer import hygiene as H

from .conftest import write_jsonl


def rec(question, answer="Paris [1]", contexts=("Paris is the capital of France.",), answerable=True, **extra):
    return {"question": question, "answer": answer, "answerable": answerable,
            "contexts": [{"id": str(i), "text": t} for i, t in enumerate(contexts, start=1)], **extra}


def items(tmp_path, name, rows, fmt="rag"):
    path = write_jsonl(tmp_path / name, rows)
    report, examples = D.validate(D.load_rows(path.as_uri()), fmt)
    assert report.ok, report.render()
    return [D.hygiene_item(e) for e in examples]


CLEAN = [rec("What is the capital of France?"),
         rec("What is the capital of Peru?", "Lima [1]", ["Lima is the capital of Peru."]),
         rec("Who founded Rome?", None, ["Cats purr."], answerable=False)]


def test_clean_data_has_no_findings(tmp_path):
    train = items(tmp_path, "train.jsonl", CLEAN)
    test = items(tmp_path, "eval.jsonl", [rec("What is the capital of Chile?", "Santiago [1]",
                                              ["Santiago is the capital of Chile."])])
    report = H.check(train, test)
    assert report.ok and report.overlap == 0 and not report.overlap_examples
    for part in (report.train, report.eval):
        assert part.exact_duplicates == part.near_duplicates == 0 and not part.examples


def test_exact_duplicates_ignore_case_punctuation_spacing_and_context_order(tmp_path):
    two = ("Paris is the capital of France.", "France is in Europe.")
    train = items(tmp_path, "train.jsonl", CLEAN + [
        rec("what is  the capital of FRANCE", "paris [1]", ["Paris is the capital of France."]),  # line 4
        rec("Q?", "A [2]", two, id="x"), rec("q", "a [1]", two[::-1], id="y"),  # lines 5, 6
    ])
    part = H.check(train).train
    assert part.exact_duplicates == 2 and part.near_duplicates == 0
    assert [(f.where.rsplit("/", 1)[-1], f.other.rsplit("/", 1)[-1], f.reason) for f in part.examples] == [
        ("train.jsonl:4", "train.jsonl:1", H.SAME), ("train.jsonl:6", "train.jsonl:5", H.SAME)]


def test_near_duplicates_same_question_or_same_answer_over_same_contexts(tmp_path):
    train = items(tmp_path, "train.jsonl", CLEAN + [
        rec("What is the capital of France?", "It is Paris [1]"),  # 4: same question, other answer
        rec("Which city is France's capital?"),  # 5: reworded question, same answer + contexts
        # 6: a refusal over the same passages as line 3 but another question: refusals share one answer
        rec("Who founded Carthage?", None, ["Cats purr."], answerable=False),
    ])
    part = H.check(train).train
    assert part.exact_duplicates == 0 and part.near_duplicates == 2
    assert [(f.where.rsplit(":", 1)[-1], f.other.rsplit(":", 1)[-1], f.reason) for f in part.examples] == [
        ("4", "1", H.SAME_QUESTION), ("5", "1", H.SAME_SUPPORT)]


def test_train_test_overlap_names_both_lines(tmp_path):
    train = items(tmp_path, "train.jsonl", CLEAN)
    test = items(tmp_path, "eval.jsonl", [
        rec("What is the capital of Chile?", "Santiago [1]", ["Santiago is the capital of Chile."]),
        rec("Who founded ROME"),  # 2: same question as train line 3 (a different item otherwise)
        rec("Peru's capital city?", "Lima [1]", ["Lima is the capital of Peru."]),  # 3: same answer + contexts
    ])
    report = H.check(train, test)
    assert not report.ok and report.overlap == 2
    message = report.overlap_message()
    assert f"{tmp_path.as_uri()}/train.jsonl:3 = {tmp_path.as_uri()}/eval.jsonl:2 (same question)" in message
    assert "train.jsonl:2 = " in message and "eval.jsonl:3 (same answer and contexts)" in message


def test_class_balance_per_source_file(tmp_path):
    (tmp_path / "train").mkdir()
    write_jsonl(tmp_path / "train" / "a.jsonl", CLEAN)  # 2 answerable, 1 unanswerable
    write_jsonl(tmp_path / "train" / "b.jsonl", [rec("Why?", None, [], answerable=False, id="b1")])
    report, examples = D.validate(D.load_rows((tmp_path / "train").as_uri() + "/"), "rag")
    assert report.ok, report.render()
    balance = {b.source.rsplit("/", 1)[-1]: b.to_wire() for b in H.check([D.hygiene_item(e) for e in examples]).train.balance}
    assert balance["a.jsonl"] == {"split": "train", "source": balance["a.jsonl"]["source"], "answerable": 2,
                                  "unanswerable": 1, "answerableShare": 0.6667}
    assert balance["b.jsonl"]["answerable"] == 0 and balance["b.jsonl"]["unanswerable"] == 1


def test_other_formats_compare_prompt_and_target_without_balance(tmp_path):
    train = items(tmp_path, "train.jsonl", [{"prompt": "Say hi.", "completion": "hi"},
                                            {"prompt": "say HI", "completion": "hi"},
                                            {"prompt": "Say bye.", "completion": "hi"}], "prompt-completion")
    part = H.check(train).train
    # the same completion alone is no near-duplicate: there are no contexts
    assert (part.exact_duplicates, part.near_duplicates, part.balance) == (1, 0, [])
    # a prompt without words has no question key: its exact copy still overlaps
    test = items(tmp_path, "eval.jsonl", [{"prompt": "???", "completion": "hi"}], "prompt-completion")
    report = H.check(train + items(tmp_path, "more.jsonl", [{"prompt": "?", "completion": "hi"}],
                                   "prompt-completion"), test)
    assert report.overlap == 1 and report.overlap_examples[0].reason == H.SAME


def test_grouped_split_keeps_copies_on_one_side_and_is_the_plain_split_without_copies():
    unique = [H.Item(f"f:{n}", "f", f"question {n}") for n in range(50)]
    for seed in range(5):
        assert D.split(unique, 0.2, seed) == D.split(unique, 0.2, seed, groups=H.groups(unique))
    copies = unique + [H.Item(f"f:{50 + n}", "f", f"QUESTION {n}?") for n in range(0, 50, 3)]
    for seed in range(5):
        train, test = D.split(copies, 0.2, seed, groups=H.groups(copies))
        assert train and test and len(test) <= round(0.2 * len(copies))
        report = H.check(train, test)
        assert report.overlap == 0, report.overlap_message()


def test_groups_join_items_through_either_key():
    a = H.Item("f:1", "f", "Q one", ("ctx",), "ans")
    b = H.Item("f:2", "f", "Q two", ("ctx",), "ans")  # same answer + contexts as a
    c = H.Item("f:3", "f", "q two?", ("other",), "x")  # same question as b
    d = H.Item("f:4", "f", "Q four", ("ctx",), "refusal", answerable=False)
    assert H.groups([a, b, c, d]) == [0, 0, 0, 3]


def test_cli_fails_on_overlap_naming_the_lines(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", CLEAN)
    test = write_jsonl(tmp_path / "eval.jsonl", [rec("Who founded Rome?", None, ["Dogs bark."], answerable=False)])
    assert main(["dataset", "validate", str(train), "--eval", str(test)]) == 1
    out = capsys.readouterr().out
    assert "train.jsonl:3 = " in out and "eval.jsonl:1 (same question)" in out
    assert "train/test overlap: 1 eval item(s)" in out


def test_cli_duplicates_warn_and_clean_data_passes(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", CLEAN + [CLEAN[0]])
    test = write_jsonl(tmp_path / "eval.jsonl", [rec("What is the capital of Chile?", "Santiago [1]",
                                                     ["Santiago is the capital of Chile."])])
    assert main(["dataset", "validate", str(train), "--eval", str(test)]) == 0
    out = capsys.readouterr().out
    assert "train: 4 item(s), 1 exact duplicate(s), 0 near-duplicate(s)" in out
    assert "warning: " in out and "train.jsonl:4 repeats " in out and "train.jsonl:1 (exact duplicate)" in out
    assert "train.jsonl: 3 answerable (75.0%), 1 unanswerable (25.0%)" in out
    assert "train/test overlap: none" in out


def test_cli_invalid_records_still_fail_and_are_left_out_of_hygiene(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", CLEAN + ["{not json"])
    assert main(["dataset", "validate", str(train)]) == 1
    out = capsys.readouterr().out
    assert "train.jsonl:4: invalid JSON" in out and "train: 3 item(s)" in out


def test_report_has_a_data_hygiene_section(tmp_path):
    from ragtune.api.common import EvalMetrics
    from ragtune_trainer.evaluate import EvalOutcome
    from ragtune_trainer.report import write_report

    spec = FineTuneJobSpec.model_validate({"baseModel": {"id": "tiny"}, "dataset": {"train": "s3://data/train.jsonl"},
                                           "output": {"uri": "s3://runs/out"}})
    train = items(tmp_path, "train.jsonl", CLEAN + [CLEAN[1]])
    hygiene = H.check(train[:3], train[3:], eval_origin="split").to_wire()
    outcome = EvalOutcome(base=EvalMetrics(samples=0), adapter=EvalMetrics(samples=0), samples=[], seconds=0.1)
    json_path, html_path = write_report(tmp_path / "eval", outcome, [], spec, [], data_hygiene=hygiene)
    report = json.loads(json_path.read_text())
    assert report["dataHygiene"]["overlap"] == 1 and report["dataHygiene"]["train"]["items"] == 3
    assert report["dataHygiene"]["train"]["balance"][0]["answerableShare"] == 0.6667
    page = html_path.read_text()
    assert "<h2>Data hygiene</h2>" in page and "Train/test overlap: <b>1</b>" in page
    assert "train.jsonl: 2 / 1 (67% answerable)" in page
    _, html_path = write_report(tmp_path / "none", outcome, [], spec, [])
    assert "Data hygiene</h2><p class=muted>Not measured." in html_path.read_text()


@pytest.fixture
def prepare(tmp_path, tiny_tokenizer):
    from ragtune_trainer import rows as Rows
    from ragtune_trainer import run as R

    def run(dataset: dict):
        job = FineTuneJobSpec.model_validate({
            "baseModel": {"id": "tiny"}, "dataset": dataset, "output": {"uri": (tmp_path / "out").as_uri()},
            "training": {"maxSeqLength": 512}})
        return Rows.prepare_data(R.RunContext(spec=job, run_id="r", run_uri="file:///unused/"), tiny_tokenizer)
    return run


def test_training_run_fails_on_overlap_and_reports_hygiene(tmp_path, records, prepare):
    from ragtune_trainer.run import TrainerFailure

    rows = [r.to_dict() for r in records[:30]]
    train = write_jsonl(tmp_path / "train.jsonl", rows[:20] + [dict(rows[0], id="dup")])
    test = write_jsonl(tmp_path / "eval.jsonl", rows[20:] + [dict(rows[5], id="copy")])
    with pytest.raises(TrainerFailure) as failure:
        prepare({"train": train.as_uri(), "eval": test.as_uri()})
    assert failure.value.reason == "InvalidDataset"
    assert f"{train.as_uri()}:6 = {test.as_uri()}:11 (same question)" in str(failure.value)

    test = write_jsonl(tmp_path / "eval.jsonl", rows[20:])
    hygiene = prepare({"train": train.as_uri(), "eval": test.as_uri()}).hygiene
    assert hygiene["overlap"] == 0 and hygiene["evalOrigin"] == "file"
    assert hygiene["train"]["exactDuplicates"] == 1 and hygiene["eval"]["items"] == 10


def test_training_split_keeps_copies_out_of_the_held_out_items(tmp_path, records, prepare, capsys):
    rows = [r.to_dict() for r in records[:30]]
    copies = [dict(r, id=f"copy-{n}", question=r["question"].upper()) for n, r in enumerate(rows[:15])]
    train = write_jsonl(tmp_path / "train.jsonl", rows + copies)
    prepared = prepare({"train": train.as_uri(), "evalSplit": 0.3})
    hygiene = prepared.hygiene
    assert hygiene["evalOrigin"] == "split" and hygiene["overlap"] == 0
    assert hygiene["train"]["items"] + hygiene["eval"]["items"] == 45
    held_out = {r.question.lower() for r in prepared.eval_records}
    trained = {r.question.lower() for r in prepared.train_records}
    assert held_out and not held_out & trained
    log = capsys.readouterr().err
    assert "ragtune train: data hygiene: train " in log and "near-duplicate(s) (first: " in log
    assert log.rstrip().endswith("train/test overlap 0")


def test_trainer_pod_reports_overlap_as_invalid_dataset_before_loading_the_model(monkeypatch, tmp_path, records,
                                                                                 tiny_model_dir, capsys):
    from ragtune.api.pods import EXIT_PERMANENT

    rows = [r.to_dict() for r in records[:12]]
    train = write_jsonl(tmp_path / "train.jsonl", rows[:10])
    test = write_jsonl(tmp_path / "eval.jsonl", rows[10:] + [dict(rows[2], id="again", answer=rows[2]["answer"])])
    spec = {"baseModel": {"id": "test/tiny-llama", "uri": tiny_model_dir.as_uri()},
            "dataset": {"train": train.as_uri(), "eval": test.as_uri()}, "output": {"uri": (tmp_path / "out").as_uri()},
            "training": {"maxSeqLength": 512}, "resources": {"gpus": 0}}
    term = tmp_path / "termination"
    monkeypatch.setenv("RAGTUNE_OBJECT", json.dumps({"metadata": {"name": "job", "namespace": "ns", "uid": "u1"},
                                                     "spec": spec}))
    monkeypatch.setenv("RAGTUNE_TERMINATION_MESSAGE_PATH", str(term))
    monkeypatch.setattr("ragtune_trainer.train.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["train", "--in-cluster", "--work-dir", str(tmp_path / "work")]) == EXIT_PERMANENT
    result = json.loads(term.read_text())
    assert result["reason"] == "InvalidDataset"
    assert f"{train.as_uri()}:3 = {test.as_uri()}:3 (same question)" in result["message"]
    assert "train/test overlap: 1 eval item(s)" in capsys.readouterr().err
