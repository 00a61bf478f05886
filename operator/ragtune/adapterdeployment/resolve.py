"""Adapter resolution and the checks the operator can make without S3: FineTuneJob state,
base-model identity, the PEFT method and LoRA rank a FineTuneJob trains against what the server
loads, names, and the offline gate on the FineTuneJob's evaluation.

Checks that need the manifest or `adapter_config.json` run in the fetch init container
(`ragtune adapters fetch`), whose termination message the operator surfaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from pydantic import ValidationError

from ragtune.api.adapterdeployment import (
    AdapterDeploymentSpec,
    AdapterSource,
    FollowPolicy,
    GatesSpec,
    ResolvedAdapter,
)
from ragtune.api.base import validate_tolerant
from ragtune.api.common import EvalMetrics, GateResult
from ragtune.api.finetunejob import SERVABLE_METHODS, FineTuneJobSpec, LoraSpec, RaftConfig
from ragtune.api.gates import describe_failures, evaluate_gates
from ragtune.api.prompt import PromptSpec
from ragtune.rag.prompt import PromptContract

# A FineTuneJob getter: name -> the object as a dict, or None when it does not exist.
FtjGetter = Callable[[str], Optional[dict[str, Any]]]


class ResolveError(Exception):
    """The adapter set cannot be deployed as specified (a permanent error for this generation)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class NotReady(Exception):
    """An input is not there yet (e.g. the FineTuneJob is still training): wait and retry."""


@dataclass
class Resolution:
    adapters: list[ResolvedAdapter]
    """Every adapter of the spec, pinned."""
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    """FineTuneJob `status.metrics` per adapter name (FineTuneJob-sourced adapters only)."""
    eval_sets: dict[str, str] = field(default_factory=dict)
    """The held-out evaluation data each FineTuneJob used: the split its trainer published
    (`status.adapter.evalSetUri`), else its `spec.dataset.eval` (a run that predates publishing)."""
    eval_set_sha256: dict[str, str] = field(default_factory=dict)
    """URI -> sha256 of each published split (`status.adapter.evalSetSha256`), for the evaluator to verify."""
    prompts: dict[str, dict[str, str]] = field(default_factory=dict)
    """The prompt contract (prompt.json's form) each FineTuneJob's spec trains with, where it is not
    ragtune's default: the evaluator's fallback for a run that publishes no `adapter/prompt.json`."""


def _same_base(spec: AdapterDeploymentSpec, ftj_spec: dict[str, Any]) -> Optional[str]:
    theirs = ftj_spec.get("baseModel") or {}
    want = (spec.base_model.id, spec.base_model.revision)
    got = (theirs.get("id"), theirs.get("revision", "main"))
    if got != want:
        return f"trained on {got[0]}@{got[1]}, but the server runs {want[0]}@{want[1]}"
    return None


def trained_prompt(ftj_spec: dict[str, Any]) -> Optional[dict[str, str]]:
    """The prompt contract a FineTuneJob's spec trains with, in prompt.json's form: `spec.prompt`
    with the refusal `prompt.refusal`, else `dataset.raft.refusal` (`PromptContract.from_spec`, as
    the trainer resolves it). None for ragtune's default contract. Fields a newer ragtune added are
    ignored (`validate_tolerant`)."""
    from types import SimpleNamespace

    prompt = validate_tolerant(PromptSpec, ftj_spec.get("prompt") or {})
    raft = validate_tolerant(RaftConfig, ((ftj_spec.get("dataset") or {}).get("raft")) or {})
    contract = PromptContract.from_spec(SimpleNamespace(prompt=prompt, dataset=SimpleNamespace(raft=raft)))
    return None if contract == PromptContract() else contract.to_wire()


def _max_rank(spec: AdapterDeploymentSpec) -> int:
    from .backends import backend_for

    return backend_for(spec.server).max_lora_rank


def resolve_one(spec: AdapterDeploymentSpec, source: AdapterSource, get_ftj: FtjGetter,
                ) -> tuple[ResolvedAdapter, Optional[dict], Optional[tuple[str, Optional[str]]], Optional[dict]]:
    """-> (the adapter pinned, its FineTuneJob's metrics, its (eval set uri, sha256 or None), its
    FineTuneJob's prompt contract (`trained_prompt`))."""
    if source.uri:
        assert source.sha256  # the CRD's CEL rule guarantees it; models validated by pydantic too
        return ResolvedAdapter(name=source.name, uri=source.uri, sha256=source.sha256, source="uri"), None, None, None
    ref = source.fine_tune_job_ref
    assert ref is not None
    ftj = get_ftj(ref.name)
    if ftj is None:
        raise NotReady(f"adapter {source.name}: FineTuneJob {ref.name} does not exist (yet)")
    status = ftj.get("status") or {}
    phase = status.get("phase")
    if phase == "Failed":
        raise ResolveError("FineTuneJobFailed",
                           f"adapter {source.name}: FineTuneJob {ref.name} failed: {status.get('message', '')}".rstrip(": "))
    if phase != "Succeeded":
        raise NotReady(f"adapter {source.name}: waiting for FineTuneJob {ref.name} ({phase or 'Pending'})")
    mismatch = _same_base(spec, ftj.get("spec") or {})
    if mismatch:
        raise ResolveError("BaseModelMismatch", f"adapter {source.name} (FineTuneJob {ref.name}) was {mismatch}")
    method = (ftj.get("spec") or {}).get("method") or FineTuneJobSpec.model_fields["method"].default.value
    if method not in {m.value for m in SERVABLE_METHODS}:
        # The trainer trains and evaluates these; no backend loads them as adapters (the fetcher
        # refuses their files too, for `uri` adapters).
        raise ResolveError("AdapterMethodNotServable",
                           f"adapter {source.name} (FineTuneJob {ref.name}) was trained with method {method}, "
                           f"which {spec.server.backend.value} cannot load as an adapter (neither TGI nor vLLM "
                           f"serves {method} adapters; they load {' and '.join(m.value for m in SERVABLE_METHODS)}):"
                           f" retrain with method lora or qlora, or merge the adapter into the base model and serve "
                           f"the merged model")
    lora = (ftj.get("spec") or {}).get("lora") or {}
    if lora.get("bias", "none") != "none":
        raise ResolveError("AdapterBiasNotServable",
                           f"adapter {source.name} (FineTuneJob {ref.name}) was trained with lora.bias "
                           f"{lora['bias']}: neither TGI nor vLLM serves trained adapter biases (vLLM refuses "
                           f"such an adapter, TGI loads only the LoRA matrices): retrain with lora.bias none, or merge the adapter into the base "
                           f"model and serve the merged model")
    rank = lora.get("r") or LoraSpec().r
    limit = _max_rank(spec)
    if rank > limit:
        # Known from the FineTuneJob's spec: refused before anything rolls (a `uri` adapter's rank is
        # only known from its files, which the fetcher/sidecar checks in the pod).
        raise ResolveError("AdapterRankTooLarge", f"adapter {source.name} (FineTuneJob {ref.name}) has LoRA rank "
                                                  f"{rank}, above the server's limit {limit}"
                                                  f"{' (spec.server.vllm.maxLoraRank)' if spec.server.backend.value == 'vllm' else ''}")
    artifact = status.get("adapter") or {}
    if not artifact.get("uri") or not artifact.get("sha256"):
        raise ResolveError("AdapterMissing", f"adapter {source.name}: FineTuneJob {ref.name} is Succeeded "
                                             "but reports no adapter uri/sha256")
    if artifact.get("evalSetUri"):
        eval_set = (artifact["evalSetUri"], artifact.get("evalSetSha256"))
    else:
        raw = ((ftj.get("spec") or {}).get("dataset") or {}).get("eval")
        eval_set = (raw, None) if raw else None
    try:
        prompt = trained_prompt(ftj.get("spec") or {})
    except ValidationError as exc:  # admitted by the same rules: only a FineTuneJob of another ragtune version
        err = exc.errors()[0]
        where = "spec.dataset.raft" if exc.title == RaftConfig.__name__ else "spec.prompt"
        raise ResolveError("InvalidPrompt", f"adapter {source.name}: FineTuneJob {ref.name} "
                                            f"{where}.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    return (ResolvedAdapter(name=source.name, uri=artifact["uri"], sha256=artifact["sha256"],
                            source=f"FineTuneJob/{ref.name}"),
            status.get("metrics"), eval_set, prompt)


def resolve(spec: AdapterDeploymentSpec, get_ftj: FtjGetter,
            followed: Optional[list[str]] = None, serving: Optional[list[ResolvedAdapter]] = None) -> Resolution:
    """Pin every adapter of the spec. Raises NotReady (wait) or ResolveError (give up).

    `followed` (a rollout a followed FineTuneJob's new run started, `followed_updates`): only those
    adapters are resolved again; every other adapter keeps its pin from `serving`, and one that
    serves nothing (its own rollout was rolled back) stays out of the set."""
    names = [a.name for a in spec.adapters]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ResolveError("DuplicateAdapterName", f"adapter names must be unique: {', '.join(duplicates)}")
    out = Resolution(adapters=[])
    kept = {a.name: a for a in serving or []}
    for source in spec.adapters:
        if followed is not None and source.name not in followed:
            if source.name in kept:
                out.adapters.append(kept[source.name])
            continue
        adapter, metrics, eval_set, prompt = resolve_one(spec, source, get_ftj)
        out.adapters.append(adapter)
        if prompt is not None:
            out.prompts[adapter.name] = prompt
        if metrics is not None:
            out.metrics[adapter.name] = metrics
        if eval_set:
            out.eval_sets[adapter.name] = eval_set[0]
            if eval_set[1]:
                out.eval_set_sha256[eval_set[0]] = eval_set[1]
    return out


@dataclass
class FollowedRun:
    """A followed FineTuneJob reports an adapter that is neither serving nor rejected before."""

    adapter: str
    """The adapter name in the spec."""
    fine_tune_job: str
    """The FineTuneJob it follows."""
    sha256: str
    """Its new adapter's manifest digest."""
    serving_sha256: Optional[str]
    """The digest serving under that name now (None: the adapter serves nothing yet)."""


def followed_updates(spec: AdapterDeploymentSpec, get_ftj: FtjGetter, serving: list[ResolvedAdapter],
                     rejected: set[str]) -> list[FollowedRun]:
    """Adapters with `follow: LatestSucceeded` whose FineTuneJob succeeded, for its current
    generation, with an adapter that does not serve and is not in `rejected` (`name@sha256-prefix`
    of candidates that were rolled back or failed: tried once, never again). A FineTuneJob being
    retrained (its status describes an older generation, or it is not Succeeded) is passed over
    until its run ends."""
    current = {a.name: a.sha256 for a in serving}
    out = []
    for source in spec.adapters:
        if source.follow != FollowPolicy.LATEST_SUCCEEDED or source.fine_tune_job_ref is None:
            continue
        ftj = get_ftj(source.fine_tune_job_ref.name)
        if ftj is None:
            continue
        status = ftj.get("status") or {}
        observed = status.get("observedGeneration")
        if status.get("phase") != "Succeeded" or observed is not None and observed != ftj["metadata"].get("generation"):
            continue
        sha = (status.get("adapter") or {}).get("sha256")
        if not sha or sha == current.get(source.name) or f"{source.name}@{sha[:12]}" in rejected:
            continue
        out.append(FollowedRun(source.name, source.fine_tune_job_ref.name, sha, current.get(source.name)))
    return out


def changed_adapters(candidate: list[ResolvedAdapter], serving: list[ResolvedAdapter]) -> list[str]:
    """Names that are new or whose digest changed (removals need no gate)."""
    current = {a.name: a.sha256 for a in serving}
    return [a.name for a in candidate if current.get(a.name) != a.sha256]


def offline_gate(gates: GatesSpec, metrics: Optional[dict[str, Any]]) -> list[GateResult]:
    """Gate results for one FineTuneJob-sourced adapter: `gates.offline` on its held-out
    evaluation, plus (if required) the FineTuneJob's own verdict."""
    metrics = metrics or {}
    adapter = EvalMetrics.model_validate(metrics.get("adapter") or {})
    base = EvalMetrics.model_validate(metrics["base"]) if metrics.get("base") else None
    foreign = EvalMetrics.model_validate(metrics["foreignPrompt"]) if metrics.get("foreignPrompt") else None
    results = evaluate_gates(gates.offline, adapter, base, foreign)
    if gates.require_offline_pass:
        # A Succeeded FineTuneJob without gates of its own reports no verdict: that is a pass.
        passed = 0.0 if metrics.get("passed") is False else 1.0
        results.append(GateResult(metric="fineTuneJobGatesPassed", comparison=">=", threshold=1.0,
                                  value=passed, passed=passed == 1.0, margin=passed - 1.0))
    return results


def offline_failures(results: dict[str, list[GateResult]]) -> str:
    """`adapter a: f1 0.410 < 0.5 (off by 0.090)` for every failing adapter."""
    return "; ".join(f"adapter {name}: {describe_failures(rs)}" for name, rs in results.items()
                     if any(not r.passed for r in rs))
