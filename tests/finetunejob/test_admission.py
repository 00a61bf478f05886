"""Bad input is refused by the real API server at admission (schema + CEL), naming the field;
the shipped examples are accepted (server-side dry run)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.platform, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

FTJ = {
    "apiVersion": "ragtune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "bad"},
    "spec": {"baseModel": {"id": "tiny/model"}, "dataset": {"train": "s3://data/train.jsonl"},
             "output": {"uri": "s3://out/runs"}},
}
AD = {
    "apiVersion": "ragtune.dev/v1alpha1", "kind": "AdapterDeployment", "metadata": {"name": "bad"},
    "spec": {"baseModel": {"id": "tiny/model"}, "adapters": [{"name": "a1", "fineTuneJobRef": {"name": "ftj"}}]},
}


def _with(base: dict, path: str, value) -> dict:
    obj = copy.deepcopy(base)
    node = obj["spec"]
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node.setdefault(k, {})
    last = keys[-1]
    if value is _DELETE:
        del node[last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return obj


_DELETE = object()

INVALID = [
    # id, object, field the error must name
    ("ftj-no-output", _with(FTJ, "output", _DELETE), "spec.output"),
    ("ftj-http-dataset", _with(FTJ, "dataset.train", "http://example.com/train.jsonl"), "spec.dataset.train"),
    ("ftj-bucket-uppercase", _with(FTJ, "dataset.train", "s3://Bad_Bucket/x"), "spec.dataset.train"),
    ("ftj-bucket-dotdot", _with(FTJ, "output.uri", "s3://a..b/runs"), "spec.output.uri"),
    ("ftj-lora-rank-0", _with(FTJ, "lora", {"r": 0}), "spec.lora.r"),
    ("ftj-method-unknown", _with(FTJ, "method", "full"), "spec.method"),
    ("ftj-qlora-8bit", _with(FTJ, "quantization", {"bits": 8}), "spec.quantization.bits"),
    ("ftj-lora-4bit", _with(_with(FTJ, "method", "lora"), "quantization", {"bits": 4}), "spec.quantization.bits"),
    ("ftj-eval-is-train", _with(FTJ, "dataset.eval", "s3://data/train.jsonl"), "spec.dataset.eval"),
    ("ftj-preference-not-rag", _with(_with(FTJ, "dataset.format", "messages"), "training",
                                     {"preference": {"enabled": True}}), "spec.training.preference.enabled"),
    ("ftj-dora-quantized", _with(_with(FTJ, "method", "dora"), "quantization", {"bits": 8}), "spec.quantization"),
    ("ftj-preference-beta-0", _with(FTJ, "training", {"preference": {"beta": 0}}), "spec.training.preference.beta"),
    ("ftj-early-stopping-no-validation", _with(FTJ, "training", {"earlyStopping": {"patience": 2}}),
     "spec.training.earlyStopping"),
    ("ftj-8bit-optimizer-on-cpu", _with(_with(FTJ, "training", {"optimizer": "paged_adamw_8bit"}), "resources",
                                        {"gpus": 0}), "spec.training.optimizer"),
    ("ftj-ia3-bias", _with(_with(FTJ, "method", "ia3"), "lora", {"bias": "all"}), "spec.lora.bias"),
    ("ftj-report-to-mlflow", _with(FTJ, "training", {"reportTo": ["mlflow"]}), "spec.training.reportTo"),
    ("ftj-metadata-endpoint", _with(FTJ, "s3", {"endpoint": "http://169.254.169.254/latest"}), "spec.s3.endpoint"),
    ("ftj-gcp-metadata", _with(FTJ, "s3", {"endpoint": "http://metadata.google.internal"}), "spec.s3.endpoint"),
    ("ftj-short-deadline", _with(FTJ, "activeDeadlineSeconds", 10), "spec.activeDeadlineSeconds"),
    ("ftj-negative-gpus", _with(FTJ, "resources", {"gpus": -1}), "spec.resources.gpus"),
    ("ftj-zero-nodes", _with(FTJ, "resources", {"nodes": 0}), "spec.resources.nodes"),
    ("ftj-fsdp-8bit", _with(_with(_with(FTJ, "method", "lora"), "quantization", {"bits": 8}),
                            "training", {"distributed": {"strategy": "fsdp"}}), "spec.training.distributed.strategy"),
    ("ftj-strategy-unknown", _with(FTJ, "training", {"distributed": {"strategy": "deepspeed"}}),
     "spec.training.distributed.strategy"),
    ("ftj-bad-memory", _with(FTJ, "resources", {"memory": "lots"}), "spec.resources.memory"),
    ("ftj-unknown-field", _with(FTJ, "epochs", 3), "spec.epochs"),
    ("ftj-prompt-unknown-placeholder", _with(FTJ, "prompt", {"userTemplate": "{contexts}\n{question} {context}"}),
     "spec.prompt.userTemplate"),
    ("ftj-prompt-no-question", _with(FTJ, "prompt", {"userTemplate": "Contexts: {contexts}"}), "spec.prompt.userTemplate"),
    ("ftj-prompt-system-placeholder", _with(FTJ, "prompt", {"system": "Say {refusal} or {answer}"}), "spec.prompt.system"),
    ("ftj-prompt-context-no-id", _with(FTJ, "prompt", {"contextTemplate": "{text}"}), "spec.prompt.contextTemplate"),
    ("ftj-prompt-citation-no-marks", _with(FTJ, "prompt", {"citation": "{id}"}), "spec.prompt.citation"),
    ("ad-both-sources", _with(AD, "adapters.0", {"name": "a1", "fineTuneJobRef": {"name": "x"},
                                                 "uri": "s3://out/r/", "sha256": "a" * 64}), "spec.adapters[0]"),
    ("ad-uri-without-sha", _with(AD, "adapters.0", {"name": "a1", "uri": "s3://out/r/"}), "spec.adapters[0].sha256"),
    ("ad-bad-adapter-name", _with(AD, "adapters.0", {"name": "Bad Name", "fineTuneJobRef": {"name": "x"}}),
     "spec.adapters[0].name"),
    ("ad-too-many-replicas", _with(AD, "server", {"replicas": 500}), "spec.server.replicas"),
]


@pytest.fixture(scope="module")
def crds(platform):
    platform.install_crds()


@pytest.mark.parametrize("obj, field", [(o, f) for _, o, f in INVALID], ids=[i for i, _, _ in INVALID])
def test_invalid_specs_are_refused_naming_the_field(platform, crds, obj, field):
    out = platform.kubectl("apply", "--dry-run=server", "--validate=strict", "-n", "default", "-f", "-",
                           input=yaml.safe_dump(obj), check=False)
    assert "created (server dry run)" not in out, f"accepted: {yaml.safe_dump(obj)}"
    assert field in out, f"the error does not name {field}: {out}"


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_accepted(platform, crds, example):
    out = platform.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", str(example))
    assert "(server dry run)" in out


def test_a_preference_stage_is_accepted(platform, crds):
    obj = _with(FTJ, "training", {"preference": {"enabled": True, "beta": 0.2, "steps": 10, "learningRate": 1e-5}})
    out = platform.kubectl("apply", "--dry-run=server", "--validate=strict", "-n", "default", "-f", "-",
                           input=yaml.safe_dump(obj), check=False)
    assert "created (server dry run)" in out, out


def test_training_control_is_accepted(platform, crds):
    obj = _with(_with(_with(FTJ, "dataset.validationSplit", 0.1), "lora", {"bias": "lora_only"}), "training", {
        "earlyStopping": {"patience": 2, "minDelta": 0.01}, "evalIntervalSteps": 10, "optimizer": "adafactor",
        "weightDecay": 0.01, "maxGradNorm": 0.5, "reportTo": ["tensorboard"]})
    out = platform.kubectl("apply", "--dry-run=server", "--validate=strict", "-n", "default", "-f", "-",
                           input=yaml.safe_dump(obj), check=False)
    assert "created (server dry run)" in out, out


def test_a_custom_prompt_contract_is_accepted(platform, crds):
    prompt = {"system": "Answer from the documents only. Cite like {citation}. Else say: {refusal}",
              "userTemplate": 'Reply as {"answer": ...}.\n<documents>\n{contexts}\n</documents>\nQuestion: {question}',
              "contextTemplate": '<doc id="{id}">{text}</doc>', "citation": "[doc{id}]",
              "refusal": "The documents do not answer this.", "augment": True}
    obj = _with(_with(FTJ, "prompt", prompt), "evaluation", {"thresholds": {"maxForeignPromptGap": 0.1}})
    out = platform.kubectl("apply", "--dry-run=server", "--validate=strict", "-n", "default", "-f", "-",
                           input=yaml.safe_dump(obj), check=False)
    assert "created (server dry run)" in out, out
