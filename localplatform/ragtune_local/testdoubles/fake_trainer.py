"""A stand-in trainer for the controller tests (a test double, not the real trainer).

It honours the pod contract (RAGTUNE_OBJECT, RAGTUNE_RUN_ID, termination message, progress lines,
exit codes) and does no training. The FineTuneJob picks a behaviour through its
`spec.dataset.train` URI: `s3://fake-trainer/<scenario>[/<seconds>]`:

- `succeed[/N]`: report progress for N seconds (default 1), then succeed with an adapter and metrics;
- `gate-fail`: fail with GateFailed, metrics and gates (exit EXIT_PERMANENT);
- `invalid-dataset`: fail with InvalidDataset (exit EXIT_PERMANENT);
- `retryable`: fail with S3Unreachable (exit EXIT_RETRYABLE);
- `no-result`: exit 0 without a termination message.
Run by the local platform's pod runner for the image `ragtune.test/fake-trainer`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from ragtune.api.common import EvalMetrics, GateResult
from ragtune.api.pods import (
    DEFAULT_TERMINATION_PATH,
    ENV_OBJECT,
    ENV_RUN_ID,
    ENV_TERMINATION_PATH,
    EXIT_PERMANENT,
    EXIT_RETRYABLE,
    PROGRESS_PREFIX,
    TrainerResult,
    encode_termination_message,
    run_prefix,
)

SHA = "ab" * 32


def _write(result: TrainerResult) -> None:
    with open(os.environ.get(ENV_TERMINATION_PATH, DEFAULT_TERMINATION_PATH), "w") as f:
        f.write(encode_termination_message(result))


def main() -> int:
    obj = json.loads(os.environ[ENV_OBJECT])
    rid = os.environ[ENV_RUN_ID]
    spec, meta = obj["spec"], obj["metadata"]
    parts = spec["dataset"]["train"].split("/")[3:]
    scenario = parts[0] if parts else "succeed"
    seconds = float(parts[1]) if len(parts) > 1 else 1.0
    prefix = run_prefix(spec["output"]["uri"], meta["namespace"], meta["name"], rid)

    def on_term(*_):
        _write(TrainerResult(outcome="Failed", reason="Interrupted", message="SIGTERM: checkpointed and stopped",
                             run_id=rid))
        sys.exit(EXIT_RETRYABLE)

    signal.signal(signal.SIGTERM, on_term)
    total = max(int(seconds), 1)
    start = time.monotonic()
    step = 0
    while True:
        step += 1
        progress = {"step": min(step, total), "totalSteps": total, "loss": round(2.0 / step, 4),
                    "percent": min(100, int(100 * step / total)), "stage": "training"}
        print(PROGRESS_PREFIX + json.dumps(progress), flush=True)
        if time.monotonic() - start >= seconds:
            break
        time.sleep(min(1.0, seconds))

    base = EvalMetrics(samples=8, f1=0.40, refusal_rate=0.20)
    adapter = EvalMetrics(samples=8, f1=0.70, refusal_rate=0.90)
    if scenario == "succeed":
        _write(TrainerResult(outcome="Succeeded", reason="Completed", message="fake run completed", run_id=rid,
                             adapter_uri=prefix, manifest_sha256=SHA, adapter_size_bytes=1234,
                             report_uri=prefix + "eval/report.html", base=base, adapter=adapter, passed=True,
                             steps=total, train_seconds=seconds))
        return 0
    if scenario == "gate-fail":
        gate = GateResult(metric="refusalRate", comparison=">=", threshold=0.95, value=0.9, passed=False, margin=-0.05)
        _write(TrainerResult(outcome="Failed", reason="GateFailed", message="refusalRate 0.900 < 0.95",
                             run_id=rid, adapter_uri=prefix, manifest_sha256=SHA, base=base, adapter=adapter,
                             passed=False, gates=[gate]))
        return EXIT_PERMANENT
    if scenario == "invalid-dataset":
        _write(TrainerResult(outcome="Failed", reason="InvalidDataset",
                             message="train.jsonl line 3: field 'question' is missing", run_id=rid))
        return EXIT_PERMANENT
    if scenario == "retryable":
        _write(TrainerResult(outcome="Failed", reason="S3Unreachable", message="cannot reach the S3 endpoint",
                             run_id=rid))
        return EXIT_RETRYABLE
    if scenario == "no-result":
        return 0
    print(f"unknown scenario {scenario!r}", file=sys.stderr)
    return EXIT_PERMANENT


if __name__ == "__main__":
    sys.exit(main())
