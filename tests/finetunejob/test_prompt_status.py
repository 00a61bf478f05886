"""The prompt contract in FineTuneJob status (from the trainer's termination message) and the
foreign-prompt gap in the AdapterDeployment's offline gate."""

from __future__ import annotations

from ragtune.adapterdeployment.resolve import offline_gate
from ragtune.api.adapterdeployment import GatesSpec
from ragtune.api.common import EvalMetrics
from ragtune.api.finetunejob import FineTuneJobStatus
from ragtune.api.gates import prompt_gap
from ragtune.api.pods import TrainerResult, encode_termination_message
from ragtune.finetunejob.status import parse_result, result_fields

ADAPTER = EvalMetrics(samples=48, f1=0.61, refusal_rate=0.9, false_refusal_rate=0.1)
FOREIGN = EvalMetrics(samples=48, f1=0.40, refusal_rate=0.95, false_refusal_rate=0.6)


def test_status_names_the_published_prompt_and_carries_the_foreign_gap():
    result = TrainerResult(outcome="Succeeded", reason="Completed", run_id="r1", adapter_uri="s3://out/ns/job/r1/",
                           manifest_sha256="a" * 64, prompt_sha256="b" * 64, adapter=ADAPTER, base=ADAPTER,
                           foreign_prompt=FOREIGN, foreign_prompt_gap=prompt_gap(ADAPTER, FOREIGN))
    fields = result_fields(parse_result(encode_termination_message(result)))
    assert fields["adapter"]["promptUri"] == "s3://out/ns/job/r1/adapter/prompt.json"
    assert fields["adapter"]["promptSha256"] == "b" * 64
    assert fields["metrics"]["foreignPrompt"]["f1"] == 0.4 and fields["metrics"]["foreignPromptGap"]["max"] == 0.5
    status = FineTuneJobStatus.model_validate({"phase": "Succeeded", **fields})
    assert status.metrics.foreign_prompt_gap.false_refusal_rate == 0.5


def test_the_adapterdeployment_offline_gate_reads_the_foreign_gap_from_the_run_status():
    gates = GatesSpec.model_validate({"offline": {"maxForeignPromptGap": 0.2}, "requireOfflinePass": False})
    metrics = {"base": ADAPTER.to_wire(), "adapter": ADAPTER.to_wire(), "foreignPrompt": FOREIGN.to_wire()}
    [result] = offline_gate(gates, metrics)
    assert result.metric == "foreignPromptGap" and result.value == 0.5 and not result.passed
    [result] = offline_gate(gates, {"adapter": ADAPTER.to_wire()})  # a run that predates the foreign prompt
    assert result.value is None and not result.passed
