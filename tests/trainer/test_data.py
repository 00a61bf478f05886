from collections import Counter

import pytest

from ragtune.api.finetunejob import RaftConfig
from ragtune.rag.records import Context, RagRecord
from ragtune.storage import Storage, StorageError
from ragtune_trainer import data as D

from .conftest import write_jsonl

GOOD = {"id": "g", "question": "Who?", "contexts": [{"id": "1", "text": "Ann wrote it."}], "answer": "Ann [1]"}


def _validate(path, fmt="rag", **kw):
    return D.validate(D.load_rows(path.as_uri()), fmt, **kw)


def test_every_bad_row_is_reported_with_file_and_line(tmp_path):
    rows = [
        GOOD,
        {"id": "a", "contexts": [{"id": "1", "text": "x"}], "answer": "x"},               # 2 missing question
        dict(GOOD, id="b", answer="  "),                                                 # 3 empty answer
        dict(GOOD, id="c", answer="Ann [4]"),                                            # 4 unknown citation
        dict(GOOD, id="d", contexts=[{"id": "1", "text": "x"}, {"id": "1", "text": "y"}]),  # 5 duplicate ids
        "{not json",                                                                     # 6 invalid JSON
        dict(GOOD, id="e", answerable=False, answer=""),                                 # 7 fine: refusal target
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    report, examples = _validate(path)
    text = report.render()
    where = path.as_uri()
    for line, words in [(2, "question"), (3, "'answer' is empty"), (4, "[4]"), (5, "duplicate context id"),
                        (6, "invalid JSON")]:
        assert f"{where}:{line}: " in text and words in text.split(f"{where}:{line}: ")[1].splitlines()[0]
    assert f"{where}:1:" not in text and f"{where}:7:" not in text
    assert not report.ok and "5 invalid row(s)" in report.summary and "7 record(s)" in report.summary
    assert [e.record.id for e in examples] == ["g", "e"]
    assert examples[1].completion == RaftConfig().refusal


def test_over_length_rows_are_reported_after_tokenisation(tmp_path, tiny_tokenizer):
    long = dict(GOOD, id="long", contexts=[{"id": "1", "text": "Ann wrote it. " * 40}])
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD, long])
    report, _ = _validate(path, tokenizer=tiny_tokenizer, max_seq_length=100)
    assert [e.where for e in report.errors] == [f"{path.as_uri()}:2"]
    assert "maxSeqLength 100" in report.errors[0].message and report.max_tokens > 100


def test_messages_and_prompt_completion_formats(tmp_path):
    msgs = write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
    ])
    report, ex = _validate(msgs, "messages")
    assert len(ex) == 1 and ex[0].completion == "hello" and "last message must be the assistant" in report.render()
    pc = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "completion": "4"}, {"prompt": "x"}])
    report, ex = _validate(pc, "prompt-completion")
    assert len(ex) == 1 and f"{pc.as_uri()}:2: missing field(s): completion" in report.render()


def test_parquet_and_prefix_loading_with_etags(tmp_path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "ds"
    write_jsonl(folder / "a.jsonl", [r.to_dict() for r in records[:3]])
    pq.write_table(pa.Table.from_pylist([r.to_dict() for r in records[3:5]]), folder / "b.parquet")
    (folder / "notes.txt").write_text("ignored")
    loaded = D.load_rows(folder.as_uri())
    assert len(loaded.rows) == 5 and [o["uri"].rsplit("/", 1)[1] for o in loaded.objects] == ["a.jsonl", "b.parquet"]
    assert all(o["etag"] for o in loaded.objects)
    report, ex = D.validate(loaded)
    assert report.ok and {e.record.id for e in ex} == {r.id for r in records[:5]}
    assert loaded.rows[3].where.endswith("b.parquet:1")


def test_missing_dataset_is_object_not_found(tmp_path):
    with pytest.raises(StorageError) as err:
        D.load_rows((tmp_path / "none.jsonl").as_uri(), Storage())
    assert err.value.reason == "S3ObjectNotFound"


def test_tokenize_masks_everything_but_the_answer_and_end_of_turn(tiny_tokenizer, records):
    r = records[0]
    ex = D.Example(D.build_messages(r)[:2], r.answer, r)
    t = D.tokenize(tiny_tokenizer, ex)
    answer = [i for i, m in zip(t["input_ids"], t["completion_mask"]) if m]
    assert tiny_tokenizer.decode(answer).replace(" ", "") == r.answer.replace(" ", "") + "<|im_end|>"
    assert tiny_tokenizer.unk_token_id not in t["input_ids"]
    assert t["completion_mask"][: -len(answer)] == [0] * (len(t["input_ids"]) - len(answer))


def test_random_off_topic_recipe_is_deterministic_and_keeps_the_old_construction(records):
    raft = RaftConfig(distractors=2, unanswerable_fraction=0.5, distractor_strategy="random",
                      unanswerable_mix={"offTopic": 1, "nearMiss": 0, "answerRemoved": 0})
    answerable = [r for r in records if r.answerable]
    a = D.build_raft(answerable, raft, seed=3)
    assert a == D.build_raft(answerable, raft, seed=3) and a != D.build_raft(answerable, raft, seed=4)
    refused = [x for x in a if not x.answerable]
    assert len(refused) == round(len(answerable) * 0.5)
    assert {x.construction for x in refused} == {"offTopic"} and {x.construction for x in a if x.answerable} == {"answerable"}
    for item, src in zip(a, answerable):
        assert len({c.id for c in item.contexts}) == len(item.contexts)
        src_texts = {c.text for c in src.contexts}
        distractors = [c for c in item.contexts if c.text not in src_texts]
        own_left = len(item.contexts) - len(distractors)
        assert len(distractors) == 2 + (0 if own_left else 1)  # a refusal item never has an empty prompt
        if item.answerable:
            # ids are renumbered in display order (tested below); the text and contexts stay
            assert item.answer.split("[")[0] == src.answer.split("[")[0] and src_texts <= {c.text for c in item.contexts}
        else:
            gold = {c.text for c in src.contexts if c.id in src.supporting_context_ids}
            assert item.answer == raft.refusal and not gold & {c.text for c in item.contexts}


# Four records about two subjects: a retriever would return the other record's passage on the
# same subject, never the off-topic ones.
def _topical_records():
    def rec(rid, question, text, answer):
        return RagRecord(rid, question, [Context("1", text)], f"{answer} [1]", True, ["1"])

    return [
        rec("tower-height", "How tall is the Velmar tower in Ostrava?",
            "The Velmar tower in Ostrava is 312 metres tall. It was finished in 1931.", "312 metres"),
        rec("tower-architect", "Who designed the Velmar tower in Ostrava?",
            "The Velmar tower in Ostrava was designed by Ida Kron. Its lift was added later.", "Ida Kron"),
        rec("plum-export", "Which country buys most plums from Draland?",
            "Draland sells most of its plums to Norvia. Plum trees cover the hills.", "Norvia"),
        rec("plum-harvest", "When are plums harvested in Draland?",
            "Plums in Draland are harvested in late August. Farmers dry many of them.", "late August"),
    ]


def test_similar_distractors_are_the_nearest_other_passages_never_gold_or_duplicates():
    records = _topical_records()
    # an exact duplicate of tower-height's passage in another record must never be its distractor
    records.append(RagRecord("dup", "Is the Velmar tower old?", [Context("1", records[0].contexts[0].text + "  ")],
                             "yes [1]", True, ["1"]))
    raft = RaftConfig(distractors=1, unanswerable_fraction=0)
    items = {r.id: r for r in D.build_raft(records, raft, seed=0)}
    def distractor(item, source):
        (d,) = [c.text for c in item.contexts if c.text != source.contexts[0].text]
        return d
    assert distractor(items["tower-height"], records[0]) == records[1].contexts[0].text
    assert distractor(items["plum-export"], records[2]) == records[3].contexts[0].text
    assert distractor(items["plum-harvest"], records[3]) == records[2].contexts[0].text
    assert D.build_raft(records, raft, seed=0) == D.build_raft(records, raft, seed=0)


def test_near_miss_replaces_gold_with_on_topic_passages_without_the_answer():
    records = _topical_records()
    raft = RaftConfig(distractors=0, unanswerable_fraction=0.9,
                      unanswerable_mix={"nearMiss": 1, "answerRemoved": 0, "offTopic": 0})
    stats = Counter()
    items = {r.id: r for r in D.build_raft(records, raft, seed=0, stats=stats)}
    item = items["tower-height"]
    assert item.construction == "nearMiss" and not item.answerable and item.answer == raft.refusal
    assert [c.text for c in item.contexts] == [records[1].contexts[0].text]  # on topic, same count, no answer
    assert stats["nearMiss"] == 4


def test_answer_removed_deletes_the_answer_sentence_and_falls_back_when_not_located():
    records = _topical_records() + [RagRecord("yn", "Is the Velmar tower in Ostrava?",
                                              [Context("1", "The Velmar tower stands in Ostrava.")], "yes [1]", True, ["1"])]
    raft = RaftConfig(distractors=1, unanswerable_fraction=0.9,
                      unanswerable_mix={"nearMiss": 0, "answerRemoved": 1, "offTopic": 0})
    stats = Counter()
    items = {r.id: r for r in D.build_raft(records, raft, seed=0, stats=stats)}
    item = items["tower-height"]
    assert item.construction == "answerRemoved"
    texts = [c.text for c in item.contexts]
    assert "It was finished in 1931." in texts and not any("312" in t for t in texts)
    assert len(texts) == 2  # the rest of the gold passage + one distractor
    assert items["yn"].construction == "nearMiss" and stats["answerRemovedNotLocated"] == 1


def test_unanswerable_items_that_still_hold_the_answer_are_dropped_and_counted():
    records = _topical_records()
    # a non-gold context of the record itself states the answer: removing the gold is not enough
    records[0] = RagRecord("tower-height", records[0].question,
                           [records[0].contexts[0], Context("2", "Guides say: 312 metres of steel.")],
                           "312 metres [1]", True, ["1"])
    raft = RaftConfig(distractors=1, unanswerable_fraction=0.9,
                      unanswerable_mix={"nearMiss": 1, "answerRemoved": 0, "offTopic": 0})
    stats = Counter()
    items = D.build_raft(records, raft, seed=0, stats=stats)
    assert "tower-height" not in {i.id for i in items} and stats["dropped.nearMiss.answerStillPresent"] == 1
    # candidate passages holding the answer are skipped, not used
    assert all("Norvia" not in c.text for i in items if i.id == "plum-export" for c in i.contexts)


def test_user_labelled_unanswerables_pass_through_and_the_mix_follows_the_weights(records):
    raft = RaftConfig(distractors=1, unanswerable_fraction=0.6,
                      unanswerable_mix={"nearMiss": 0.5, "answerRemoved": 0.25, "offTopic": 0.25})
    stats = Counter()
    items = D.build_raft(records, raft, seed=1, stats=stats)
    users = [r for r in records if not r.answerable]
    assert users and stats["userLabelled"] == len(users)
    by_id = {i.id: i for i in items}
    for r in users:
        assert by_id[r.id].construction == "userLabelled" and {c.text for c in r.contexts} <= {c.text for c in by_id[r.id].contexts}
    n = round(sum(r.answerable for r in records) * 0.6)
    built = stats["nearMiss"] + stats["answerRemoved"] + stats["offTopic"] + sum(v for k, v in stats.items() if k.startswith("dropped."))
    assert built == n and stats["nearMiss"] > stats["offTopic"] > 0
    assert stats["answerRemoved"] + stats["answerRemovedNotLocated"] > 0


def test_evaluation_construction_is_hard_whatever_the_recipe():
    easy = RaftConfig(distractors=3, unanswerable_fraction=0.3, distractor_strategy="random",
                      unanswerable_mix={"offTopic": 1, "nearMiss": 0, "answerRemoved": 0})
    hard = D.evaluation_raft(easy)
    assert hard.distractor_strategy.value == "similar" and hard.distractors == 3 and hard.unanswerable_fraction == 0.3
    assert hard.unanswerable_mix.near_miss == hard.unanswerable_mix.answer_removed == hard.unanswerable_mix.off_topic > 0


def test_raft_config_stays_backward_compatible_and_rejects_an_empty_mix():
    from pydantic import ValidationError

    raft = RaftConfig.model_validate({"distractors": 2, "unanswerableFraction": 0.25})
    assert raft.distractors == 2 and raft.distractor_strategy.value == "similar"
    # the unanswerable construction stays what it was until the bench shows the mix is better
    assert (raft.unanswerable_mix.off_topic, raft.unanswerable_mix.near_miss, raft.unanswerable_mix.answer_removed) == (1, 0, 0)
    with pytest.raises(ValidationError, match="at least one of nearMiss"):
        RaftConfig.model_validate({"unanswerableMix": {"nearMiss": 0, "answerRemoved": 0, "offTopic": 0}})
    with pytest.raises(ValidationError, match="distractorStrategy"):
        RaftConfig.model_validate({"distractorStrategy": "nearest"})


def test_raft_drops_distractors_until_the_item_fits():
    recs = [RagRecord(str(i), "q", [Context("1", f"text {i}")], "a [1]", supporting_context_ids=["1"]) for i in range(5)]
    out = D.build_raft(recs, RaftConfig(distractors=3, unanswerable_fraction=0), 0, fits=lambda r: len(r.contexts) <= 2)
    assert all(len(r.contexts) == 2 and any(c.text == f"text {r.id}" for c in r.contexts) for r in out)


def test_split_is_deterministic_and_disjoint():
    items = list(range(50))
    train, held = D.split(items, 0.2, seed=1)
    assert (train, held) == D.split(items, 0.2, seed=1) and len(held) == 10
    assert sorted(train + held) == items


def test_cli_validate_prints_report_and_exit_code(tmp_path, capsys):
    from ragtune.cli import main

    good = write_jsonl(tmp_path / "good.jsonl", [GOOD])
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, dict(GOOD, id="x", answer="")])
    assert main(["dataset", "validate", str(good)]) == 0
    assert "valid" in capsys.readouterr().out
    assert main(["dataset", "validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{bad.as_uri()}:2: field 'answer' is empty" in out and "1 invalid row(s)" in out


def test_raft_numbers_contexts_in_display_order_and_rewrites_citations():
    """Context ids must not leak how an item was built (e.g. refusal items never showing [1])."""
    from ragtune.api.finetunejob import RaftConfig
    from ragtune.rag.records import Context, RagRecord
    from ragtune_trainer.data import build_raft

    records = [RagRecord(f"r{i}", f"q{i}", [Context("1", f"a{i}"), Context("2", f"b{i}")],
                         "x [1] and y [2, 1]", True, ["1", "2"]) for i in range(8)]
    items = build_raft(records, RaftConfig(distractors=2, unanswerable_fraction=0.25), seed=3)
    for item, source in zip(items, records):
        assert [c.id for c in item.contexts] == [str(k) for k in range(1, len(item.contexts) + 1)]
        if item.answerable:
            shown = {c.text: c.id for c in item.contexts}
            first, second = shown[f"a{source.id[1:]}"], shown[f"b{source.id[1:]}"]
            assert item.answer == f"x [{first}] and y [{second}, {first}]"
            assert sorted(item.supporting_context_ids) == sorted([first, second])
    assert any(not i.answerable for i in items) and any(i.answerable for i in items)


def test_prepare_data_builds_the_held_out_split_the_hard_way_whatever_the_recipe(tmp_path, tiny_tokenizer, records):
    from ragtune.api.finetunejob import FineTuneJobSpec
    from ragtune_trainer import rows as Rows
    from ragtune_trainer.run import RunContext

    train = write_jsonl(tmp_path / "train.jsonl", [r.to_dict() for r in records])
    job = FineTuneJobSpec.model_validate({
        "baseModel": {"id": "tiny"}, "output": {"uri": (tmp_path / "out").as_uri()},
        "dataset": {"train": train.as_uri(), "evalSplit": 0.5, "raft": {
            "distractors": 1, "unanswerableFraction": 0.6, "distractorStrategy": "random",
            "unanswerableMix": {"offTopic": 1, "nearMiss": 0, "answerRemoved": 0}}},
    })
    prepared = Rows.prepare_data(RunContext(spec=job, run_id="r", run_uri="file:///unused/"), tiny_tokenizer)
    built = prepared.construction
    assert built["train"].get("nearMiss", 0) == built["train"].get("answerRemoved", 0) == 0 and built["train"]["offTopic"]
    assert built["eval"]["nearMiss"] and built["eval"]["offTopic"] and \
        built["eval"].get("answerRemoved", 0) + built["eval"].get("answerRemovedNotLocated", 0)
    assert {r.construction for r in prepared.eval_records} >= {"nearMiss", "offTopic", "answerable"}
