"""The held-out split a run published, from the trainer's termination message into FineTuneJob status."""

from __future__ import annotations

from ragtune.api.finetunejob import FineTuneJobStatus
from ragtune.api.pods import EVAL_SET_JSONL, TrainerResult, encode_termination_message
from ragtune.finetunejob.status import parse_result, result_fields

RUN = "s3://out/ns/job/r1/"


def result(**fields) -> TrainerResult:
    return TrainerResult(outcome="Succeeded", reason="Completed", run_id="r1", adapter_uri=RUN,
                         manifest_sha256="a" * 64, **fields)


def test_status_names_the_published_split_and_its_digest():
    published = result(eval_set_uri=RUN + EVAL_SET_JSONL, eval_set_sha256="e" * 64)
    fields = result_fields(parse_result(encode_termination_message(published)))
    assert fields["adapter"]["evalSetUri"] == "s3://out/ns/job/r1/eval/heldout.jsonl"
    assert fields["adapter"]["evalSetSha256"] == "e" * 64
    status = FineTuneJobStatus.model_validate({"phase": "Succeeded", **fields})
    assert status.adapter.eval_set_uri == RUN + EVAL_SET_JSONL and status.adapter.eval_set_sha256 == "e" * 64


def test_a_run_without_a_split_names_none():
    fields = result_fields(parse_result(encode_termination_message(result())))
    assert "evalSetUri" not in fields["adapter"] and "evalSetSha256" not in fields["adapter"]
