"""Builders for FineTuneJob specs and Job/pod bodies shaped like the API server's."""

from __future__ import annotations

import json
from typing import Any, Optional

from ragtune.api.finetunejob import FineTuneJobSpec
from ragtune.api.pods import TrainerResult, encode_termination_message
from ragtune.finetunejob.render import render_job

META = {"name": "demo", "namespace": "team-a", "uid": "0123456789abcdef", "generation": 1}
RUN_ID = "01234567-g1"


def spec_dict(**overrides: Any) -> dict:
    spec: dict[str, Any] = {
        "baseModel": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "abc123"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/runs"},
        "s3": {"endpoint": "http://minio.local:9000", "credentialsSecretRef": {"name": "s3-credentials"}},
    }
    for path, value in overrides.items():
        node = spec
        keys = path.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return spec


def spec(**overrides: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(spec_dict(**overrides))


def job_body(s: Optional[FineTuneJobSpec] = None, status: Optional[dict] = None, **meta: Any) -> dict:
    body = render_job({**META, **meta}, s or spec(), RUN_ID, "ghcr.io/ragtune/ragtune-trainer:test")
    body["metadata"]["uid"] = "job-uid"
    body["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    body["status"] = status or {}
    return body


def job_condition(type_: str, reason: str = "", message: str = "") -> dict:
    return {"type": type_, "status": "True", "reason": reason, "message": message,
            "lastTransitionTime": "2026-01-01T01:00:00Z"}


def pod_body(name: str = "demo-01234567-g1-abcde", phase: str = "Pending", created: str = "2026-01-01T00:00:01Z",
             waiting: Optional[tuple[str, str]] = None, running: bool = False,
             terminated: Optional[tuple[int, str]] = None, conditions: Optional[list[dict]] = None,
             reason: str = "", message: str = "", deleting: bool = False) -> dict:
    state: dict[str, Any] = {}
    if waiting:
        state["waiting"] = {"reason": waiting[0], "message": waiting[1]}
    if running:
        state["running"] = {"startedAt": created}
    if terminated:
        state["terminated"] = {"exitCode": terminated[0], "reason": "Error" if terminated[0] else "Completed",
                               "message": terminated[1], "finishedAt": created.replace(":00Z", ":30Z")}
    meta: dict[str, Any] = {
        "name": name, "creationTimestamp": created,
        "labels": {"batch.kubernetes.io/job-name": "demo-01234567-g1"},
        "annotations": {"ragtune.dev/finetunejob-name": "demo"},
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T02:00:00Z"
    status: dict[str, Any] = {"phase": phase, "conditions": conditions or []}
    if reason:
        status["reason"] = reason
    if message:
        status["message"] = message
    if state:
        status["containerStatuses"] = [{"name": "trainer", "state": state, "restartCount": 0}]
    return {"metadata": meta, "spec": {"nodeName": "node-1"}, "status": status}


def result_message(**fields: Any) -> str:
    return encode_termination_message(TrainerResult(**fields))


def env_of(job: dict) -> dict[str, dict]:
    return {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


def object_env(job: dict) -> dict:
    return json.loads(env_of(job)["RAGTUNE_OBJECT"]["value"])
