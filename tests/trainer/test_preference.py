"""The preference (DPO) stage: `rejected` answers in rag records (validated with file and line), the
pairs it trains on (the SFT prompt and tokenisation), and a real run with a tiny random Llama:
SFT, then DPO on the same adapter, the margin moving the right way, the stages in the artifacts."""

from __future__ import annotations

import json

import pytest

from ragtune.api.finetunejob import RaftConfig
from ragtune.api.pods import EXIT_PERMANENT
from ragtune.cli import main
from ragtune.rag.prompt import DEFAULT_REFUSAL, PromptContract
from ragtune.rag.records import RagRecord
from ragtune_trainer import data as D
from ragtune_trainer.preference import preference_pairs
from ragtune_trainer.rows import Tokenised, rag_example

from .conftest import write_jsonl
from .test_train_run import in_cluster, job_spec


def with_rejected(records: list[RagRecord]) -> list[dict]:
    """Every record with a wrong answer: the next record's answer (its citations kept), or a
    made-up answer where refusing is right."""
    rows = []
    for i, r in enumerate(records):
        d = r.to_dict()
        other = records[(i + 1) % len(records)]
        wrong = other.answer if other.answerable and other.answer != r.answer else records[(i + 2) % len(records)].answer
        d["rejected"] = wrong if r.answerable else "It is " + wrong
        rows.append(d)
    return rows


def test_rejected_is_validated_with_file_and_line(tmp_path, records):
    good = records[0].to_dict()
    rows = [dict(good, id="ok", rejected="wrong [1]"), dict(good, id="n", rejected=5), dict(good, id="e", rejected=" "),
            dict(good, id="same", rejected=" " + good["answer"]), dict(good, id="none")]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    report, examples = D.validate(D.load_rows(path.as_uri()), "rag")
    errors = {e.where.rsplit(":", 1)[1]: e for e in report.errors}
    assert sorted(errors) == ["2", "3", "4"], report.render()
    assert "field 'rejected' must be a string" in errors["2"].message
    assert errors["3"].kind == "empty rejected" and errors["4"].kind == "rejected equals answer"
    assert str(errors["4"]).startswith(f"{path.as_uri()}:4: ")
    assert [e.record.rejected for e in examples] == ["wrong [1]", None]


def test_raft_keeps_rejected_and_renumbers_its_citations(records):
    rows = with_rejected(records[:20])
    parsed = [RagRecord.from_dict(r) for r in rows]
    built = D.build_raft(parsed, RaftConfig(distractors=2, unanswerable_fraction=0.3), seed=3)
    by_id = {r["id"]: r for r in rows}
    assert all(item.rejected is not None for item in built)
    for item in built:
        source = by_id[item.id]
        shown = {c.text: c.id for c in item.contexts}
        for ctx in source["contexts"]:  # a citation of a passage still shown follows its new number
            if f"[{ctx['id']}]" in source["rejected"] and ctx["text"] in shown and item.answerable:
                assert f"[{shown[ctx['text']]}]" in item.rejected
    refused = [i for i in built if not i.answerable and i.construction != "userLabelled"]
    assert refused and all(i.answer == DEFAULT_REFUSAL for i in refused)


def test_pairs_are_the_sft_rows_prompt_with_both_answers(records, tiny_tokenizer):
    prompt = PromptContract()
    items = [RagRecord.from_dict(r) for r in with_rejected(records[:12])]
    items[3].rejected = None  # no pair for a record without a wrong answer
    pairs = preference_pairs(items, tiny_tokenizer, prompt, max_seq_length=512)
    assert len(pairs.rows) == 11
    tokenised = Tokenised(tiny_tokenizer)
    for item, pair in zip([r for r in items if r.rejected is not None], pairs.rows):
        sft_row = tokenised(rag_example(item, prompt))  # the row SFT trains on, same prompt and answer
        assert pair["prompt_ids"] + pair["chosen_ids"] == sft_row["input_ids"]
        assert sft_row["labels"][:len(pair["prompt_ids"])] == [-100] * len(pair["prompt_ids"])
        rejected = D.tokenize(tiny_tokenizer, D.Example(prompt.messages(item), item.rejected))
        assert pair["prompt_ids"] + pair["rejected_ids"] == rejected["input_ids"]
        assert pair["chosen_ids"] != pair["rejected_ids"]
    short = preference_pairs(items, tiny_tokenizer, prompt, max_seq_length=8)
    assert not short.rows and short.counts["droppedOverLength"] == 11


@pytest.mark.slow
def test_dpo_stage_continues_the_sft_adapter_and_moves_the_margin(tiny_model_dir, records, tmp_path):
    from safetensors import safe_open

    train = write_jsonl(tmp_path / "data" / "train.jsonl", with_rejected(records[:40]))
    spec = job_spec(tiny_model_dir, str(train), tmp_path / "out", **{
        "training.maxSteps": 2,
        "training.preference": {"enabled": True, "steps": 8, "beta": 0.5, "learningRate": 0.01},
        "evaluation.maxSamples": 4, "evaluation.fewShot": 0,
        "evaluation.thresholds": {"maxFalseRefusalRate": 1.0},
    })
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"apiVersion": "ragtune.dev/v1alpha1", "kind": "FineTuneJob",
                               "metadata": {"name": "dpo", "namespace": "dev"}, "spec": spec}))
    assert main(["train", "-f", str(job), "--run-id", "r1"]) == 0
    run = tmp_path / "out/dev/dpo/r1"
    manifest = json.loads((run / "manifest.json").read_text())
    assert [s["name"] for s in manifest["stages"]] == ["sft", "preference"]
    assert [s["steps"] for s in manifest["stages"]] == [2, 8]
    sft, pref = json.loads((run / "eval/report.json").read_text())["stages"]
    assert sft["name"] == "sft" and any("loss" in e for e in sft["lossHistory"])
    assert pref["items"] == pref["pairs"]["answerable"] + sum(v for k, v in pref["pairs"].items()
                                                              if k not in ("answerable", "heldOut"))
    logged = [e for e in pref["lossHistory"] if "rewards/margins" in e]
    assert len(logged) >= 8
    # The first step is scored before any update: the policy is the reference (the SFT adapter).
    assert logged[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    last = logged[-3:]  # chosen gains on rejected relative to the reference, and the DPO loss falls
    assert min(e["rewards/margins"] for e in last) > 0.2
    assert sum(e["rewards/accuracies"] for e in last) / len(last) >= 0.5
    assert max(e["loss"] for e in last) < logged[0]["loss"]
    assert any("eval_rewards/margins" in e for e in pref["lossHistory"])  # held-out pairs scored
    html = (run / "eval/report.html").read_text()
    assert "Training stages" in html and "preference loss and reward margin" in html
    # The published adapter is the one trained adapter: no frozen reference copy in it.
    with safe_open(str(run / "adapter/adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(".ref." in k for k in keys)
    assert json.loads((run / "adapter/adapter_config.json").read_text())["r"] == 4


def test_preference_without_pairs_fails_before_training(tiny_model_dir, train_file, tmp_path, monkeypatch):
    spec = job_spec(tiny_model_dir, train_file.as_uri(), tmp_path / "out",
                    **{"training.preference": {"enabled": True, "steps": 1}})
    code, result = in_cluster(monkeypatch, tmp_path, spec)
    assert code == EXIT_PERMANENT and result["reason"] == "InvalidDataset"
    assert "training.preference is enabled but no training record has a 'rejected' answer" in result["message"]
    assert train_file.as_uri() in result["message"]
    assert not list((tmp_path / "out").rglob("checkpoint-*"))  # failed before the first SFT step


@pytest.mark.slow
def test_dpo_on_a_qlora_adapter_publishes_it_in_the_dtype_sft_trained(tiny_model_dir, records, tmp_path):
    """DPO on a 4-bit base (trl trains the adapter weights in bf16 there): the run publishes a
    float32 adapter, as SFT-only QLoRA runs do."""
    from safetensors import safe_open

    train = write_jsonl(tmp_path / "data" / "train.jsonl", with_rejected(records[:24]))
    spec = job_spec(tiny_model_dir, str(train), tmp_path / "out", **{
        "method": "qlora", "training.maxSteps": 1,
        "training.preference": {"enabled": True, "steps": 2, "learningRate": 0.01},
        "evaluation.maxSamples": 1, "evaluation.maxNewTokens": 2, "evaluation.fewShot": 0,
    })
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"apiVersion": "ragtune.dev/v1alpha1", "kind": "FineTuneJob",
                               "metadata": {"name": "qdpo", "namespace": "dev"}, "spec": spec}))
    assert main(["train", "-f", str(job), "--run-id", "r1"]) == 0
    run = tmp_path / "out/dev/qdpo/r1"
    assert [s["name"] for s in json.loads((run / "manifest.json").read_text())["stages"]] == ["sft", "preference"]
    with safe_open(str(run / "adapter/adapter_model.safetensors"), "pt") as f:
        dtypes = {str(f.get_tensor(k).dtype) for k in f.keys()}
    assert dtypes == {"torch.float32"}


def test_wrong_answers_are_told_apart_from_acceptable_ones():
    from ragtune.rag.records import Context
    from ragtune_trainer.preference import wrong_answer

    prompt = PromptContract()
    known = RagRecord("a", "What is Kalo famous for?", [Context("1", "Kalo is famous for its pottery.")], "its pottery [1]")
    unknown = RagRecord("u", "What is Kalo famous for?", [Context("1", "Ulven trades with Sapen.")], DEFAULT_REFUSAL,
                        answerable=False)
    assert wrong_answer(known, "its pottery [1]", prompt) is None
    assert wrong_answer(known, DEFAULT_REFUSAL, prompt) == "falseRefusal"
    assert wrong_answer(known, "glassmaking [1]", prompt) == "wrong"
    assert wrong_answer(known, "its glassmaking weaving pottery [1]", prompt) == "ungrounded"  # F1 0.67, grounded 1/3
    assert wrong_answer(unknown, "its pottery [1]", prompt) == "answeredUnanswerable"
    assert wrong_answer(unknown, DEFAULT_REFUSAL, prompt) is None


@pytest.mark.slow
def test_automatic_pairs_take_the_sft_models_own_wrong_answers(tiny_model_dir, train_file, tmp_path):
    spec = job_spec(tiny_model_dir, str(train_file), tmp_path / "out", **{
        "training.maxSteps": 1,
        "training.preference": {"enabled": True, "steps": 2, "automaticPairs": 6, "learningRate": 0.01},
        "evaluation.maxSamples": 2, "evaluation.maxNewTokens": 4, "evaluation.fewShot": 0,
    })
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"apiVersion": "ragtune.dev/v1alpha1", "kind": "FineTuneJob",
                               "metadata": {"name": "auto", "namespace": "dev"}, "spec": spec}))
    assert main(["train", "-f", str(job), "--run-id", "r1"]) == 0  # the data has no 'rejected' at all
    run = tmp_path / "out/dev/auto/r1"
    pref = json.loads((run / "eval/report.json").read_text())["stages"][1]
    counts = pref["pairs"]
    assert counts["automatic.answered"] == 6 and 0 < counts["automatic"] <= 6
    assert counts["automatic"] == sum(v for k, v in counts.items() if k.startswith("automatic.")
                                      and k != "automatic.answered")
    assert pref["items"] == counts["automatic"]
    assert [s["name"] for s in json.loads((run / "manifest.json").read_text())["stages"]] == ["sft", "preference"]


@pytest.mark.slow
def test_sigterm_in_the_preference_stage_and_the_retry_reruns_it_from_the_finished_sft(tiny_model_dir, records,
                                                                                       tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import threading

    from ragtune.api.pods import EXIT_RETRYABLE, PROGRESS_PREFIX

    train = write_jsonl(tmp_path / "data" / "train.jsonl", with_rejected(records[:24]))
    spec = job_spec(tiny_model_dir, train.as_uri(), tmp_path / "out", **{
        "training.maxSteps": 2, "training.checkpointIntervalSteps": 50,
        # An idle machine runs these steps in ~0.1 s each: enough of them to stop one mid-stage.
        "training.preference": {"enabled": True, "steps": 30, "learningRate": 0.01},
        "evaluation.maxSamples": 2, "evaluation.maxNewTokens": 2, "evaluation.fewShot": 0,
    })
    obj = {"apiVersion": "ragtune.dev/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "job", "namespace": "ns", "uid": "feedbeef0000", "generation": 1}, "spec": spec}
    env = dict(os.environ, RAGTUNE_OBJECT=json.dumps(obj), RAGTUNE_RUN_ID="resume",
               RAGTUNE_TERMINATION_MESSAGE_PATH=str(tmp_path / "term1"))
    cmd = [sys.executable, "-m", "ragtune.cli", "train", "--in-cluster"]
    proc = subprocess.Popen(cmd + ["--work-dir", str(tmp_path / "w1")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    in_stage = threading.Event()

    def watch():
        for line in proc.stdout:
            if line.startswith(PROGRESS_PREFIX):
                p = json.loads(line[len(PROGRESS_PREFIX):])
                if p.get("stage") == "preference" and p.get("step", 0) >= 1:
                    in_stage.set()

    threading.Thread(target=watch, daemon=True).start()
    try:
        assert in_stage.wait(300), "the preference stage never started"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = json.loads((tmp_path / "term1").read_text())
    assert proc.returncode == EXIT_RETRYABLE and first["reason"] == "Preempted", first
    assert "of the preference stage" in first["message"]
    run = tmp_path / "out/ns/job/resume"
    assert (run / "checkpoints/checkpoint-2/COMPLETE").exists() and not (run / "manifest.json").exists()

    env["RAGTUNE_TERMINATION_MESSAGE_PATH"] = str(tmp_path / "term2")
    done = subprocess.run(cmd + ["--work-dir", str(tmp_path / "w2")], env=env, capture_output=True, text=True,
                          timeout=600)
    second = json.loads((tmp_path / "term2").read_text())
    assert done.returncode == 0 and second["reason"] == "Completed", done.stderr[-2000:]
    # SFT is taken over from its final checkpoint (no training time), the stage runs in full.
    assert [(s["name"], s["steps"]) for s in second["stages"]] == [("sft", 2), ("preference", 30)]
    assert second["stages"][0]["seconds"] == 0.0
    assert "trained 2 sft + 30 preference steps" in second["message"]


def test_the_local_progress_bar_counts_each_training_stage_from_zero():
    from ragtune.api.finetunejob import TrainingProgress
    from ragtune_trainer.cli import ProgressBar

    bar = ProgressBar()
    try:
        for p in [TrainingProgress(stage="loading"), TrainingProgress(stage="training", step=0, total_steps=4),
                  TrainingProgress(stage="training", step=4, total_steps=4)]:
            bar(p)
        assert (bar.bar.n, bar.bar.total) == (4, 4)
        bar(TrainingProgress(stage="preference", step=0, total_steps=8))
        bar(TrainingProgress(stage="preference", step=3, total_steps=8))
        assert (bar.bar.n, bar.bar.total) == (3, 8) and bar.bar.desc.startswith("preference")
        bar(TrainingProgress(stage="evaluating", step=4, total_steps=4))
        assert (bar.bar.n, bar.bar.total) == (3, 8)  # evaluation does not move the step count
    finally:
        bar.close()
