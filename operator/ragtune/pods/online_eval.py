"""`ragtune eval online`: the canary evaluation Job.

Reads rag records from S3, asks the canary for answers with each candidate adapter and with the
base model (no adapter id), and the stable server with the adapter of the same name that serves
now (if any); scores them with `ragtune.rag.metrics.score`; applies the online gate
(thresholds, maximum regression against what serves now, proof that the adapter is applied:
TGI silently serves the base model for an unknown adapter id, vLLM answers 404); writes an
`OnlineEvalResult` JSON termination message. Configuration comes as JSON in `RAGTUNE_EVAL_CONFIG`.

Both backends are asked through ONE client (`Completions`): the `openai` client on the
OpenAI-compatible `/v1/completions`, which TGI (>= 2.2) and vLLM both serve, with the adapter as
`model`. The prompt is rendered here with the adapter's own chat template, as in training, and
sent as is, so what is measured does not depend on a server's chat templating.
"""

from __future__ import annotations

import json
import logging
import os
import random
from typing import Any, Callable, Optional

from pydantic import ValidationError

from ragtune.api.adapterdeployment import OnlineGate, OnlineGateResult
from ragtune.api.common import GateResult
from ragtune.api.gates import describe_failures, evaluate_gates
from ragtune.api.pods import (
    EVAL_CONFIG_ENV,
    CandidateRef,
    OnlineEvalConfig,
    OnlineEvalResult,
)
from ragtune.rag.prompt import FALLBACK_CHAT_TEMPLATE, PromptContract
from ragtune.rag.records import RagRecord

log = logging.getLogger("ragtune.online_eval")


Generate = Callable[[str, str, Optional[str]], str]
"""(base_url, prompt, adapter id or None) -> answer."""

TGI_BASE_MODEL = "tgi"
"""TGI's name for the base model on its OpenAI-compatible routes: any other `model` is read as the
`adapter_id` (router: `model.filter(|m| m != "tgi")`, TGI >= 2.2)."""


class AdapterNotServed(RuntimeError):
    """The server says it serves no model of that name (vLLM: 404). TGI never says so: it answers
    an unknown adapter id with the base model, which the `differsFromBase` gate catches."""


class Completions:
    """Greedy completions from a TGI or vLLM server, the same request for both: `POST /v1/completions`
    with `model` = the adapter's name, or the base model's name for no adapter (vLLM: its served
    name, `--served-model-name`; TGI: "tgi")."""

    def __init__(self, base_url: str, *, backend: str, base_model: Optional[str] = None,
                 timeout: float = 120.0, max_retries: int = 2):
        from openai import OpenAI

        if backend == "vllm" and not base_model:
            raise ValueError("backend vllm: the base model's served name is needed to ask it without an adapter")
        self.base_url = base_url.rstrip("/")
        self.base_name = base_model if backend == "vllm" else TGI_BASE_MODEL
        # The servers take no API key in-cluster; the client insists on one and would otherwise
        # read OPENAI_API_KEY from the environment and send it.
        self.client = OpenAI(base_url=self.base_url + "/v1", api_key="none", timeout=timeout,
                             max_retries=max_retries)

    def __call__(self, prompt: str, adapter: Optional[str], max_tokens: int) -> str:
        from openai import NotFoundError

        model = adapter or self.base_name
        try:
            out = self.client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
        except NotFoundError as exc:
            raise AdapterNotServed(f"{self.base_url} serves no model {model!r}: {exc.message}"[:400]) from None
        return out.choices[0].text


def server_generate(config: OnlineEvalConfig) -> Generate:
    """`Generate` over one `Completions` client per server URL."""
    clients: dict[str, Completions] = {}

    def generate(url: str, prompt: str, adapter: Optional[str]) -> str:
        if url not in clients:
            clients[url] = Completions(url, backend=config.backend, base_model=config.base_model)
        return clients[url](prompt, adapter, config.gate.max_new_tokens)
    return generate


class EvalSetDigestMismatch(ValueError):
    """The evaluation set is not the one the FineTuneJob published."""


def load_records(storage, uri: str, sha256: Optional[str] = None) -> list[dict[str, Any]]:
    """JSONL rag records from an object or a prefix of `.jsonl` objects; errors name file and line.
    With `sha256`, `uri` must be one object with that digest (EvalSetDigestMismatch otherwise)."""
    from ragtune.storage import sha256_bytes

    if sha256:
        uris = [uri]
    else:
        uris = [uri] if not uri.endswith("/") and storage.exists(uri) else \
            [o.uri for o in storage.list(uri) if o.uri.endswith((".jsonl", ".json"))]
    if not uris:
        raise ValueError(f"{uri}: no evaluation records found")
    records = []
    for u in uris:
        data = storage.get_bytes(u)
        if sha256 and sha256_bytes(data) != sha256:
            raise EvalSetDigestMismatch(f"{u}: sha256 {sha256_bytes(data)}, but the FineTuneJob published {sha256}")
        for lineno, line in enumerate(data.decode().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{u}:{lineno}: not JSON: {exc.msg}") from None
            for key in ("question", "contexts", "answer"):
                if key not in record:
                    raise ValueError(f"{u}:{lineno}: rag record lacks field {key!r}")
            records.append(record)
    return records


def sample(records: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    if len(records) <= n:
        return list(records)
    return random.Random(seed).sample(records, n)


def messages_for(record: dict[str, Any], prompt: PromptContract = PromptContract()) -> list[dict[str, str]]:
    """System + user turns for a rag record, exactly as in training (`ragtune.rag.prompt`)."""
    return prompt.messages(RagRecord.from_dict({"id": "", **record}))


def adapter_prompt(storage, cand: CandidateRef) -> PromptContract:
    """The prompt contract the adapter was trained with: its run's `adapter/prompt.json`, verified
    against the manifest (pinned by digest); for runs that predate it, the contract of its
    FineTuneJob's spec the operator passed (`CandidateRef.prompt`), else ragtune's default."""
    from ragtune.api.pods import MANIFEST, PROMPT_JSON, Manifest
    from ragtune.storage import sha256_bytes

    def fallback() -> PromptContract:
        return PromptContract.from_wire(cand.prompt, f"adapter {cand.name}: the FineTuneJob's prompt") \
            if cand.prompt else PromptContract()

    base = cand.uri.rstrip("/") + "/"
    if not storage.exists(base + MANIFEST):  # never deployed (the fetcher refuses it): nothing to read
        return fallback()
    raw = storage.get_bytes(base + MANIFEST)
    if cand.sha256 and sha256_bytes(raw) != cand.sha256:
        raise ValueError(f"adapter {cand.name}: {base}{MANIFEST} does not match the pinned sha256")
    listed = {f.path: f.sha256 for f in Manifest.model_validate_json(raw).files}
    if PROMPT_JSON not in listed:
        return fallback()
    data = storage.get_bytes(base + PROMPT_JSON)
    if sha256_bytes(data) != listed[PROMPT_JSON]:
        raise ValueError(f"adapter {cand.name}: {base}{PROMPT_JSON} does not match its sha256 in the manifest")
    return PromptContract.loads(data, base + PROMPT_JSON)


def chat_template(storage, run_uri: str) -> tuple[str, dict[str, str]]:
    """The adapter's chat template (as saved with its tokenizer) and its special tokens."""
    base = run_uri.rstrip("/") + "/adapter/"
    specials: dict[str, str] = {}
    template = None
    if storage.exists(base + "tokenizer_config.json"):
        config = json.loads(storage.get_bytes(base + "tokenizer_config.json"))
        template = config.get("chat_template")
        for key in ("bos_token", "eos_token"):
            if isinstance(config.get(key), str):
                specials[key] = config[key]
    if not template and storage.exists(base + "chat_template.jinja"):
        template = storage.get_bytes(base + "chat_template.jinja").decode()
    return template or FALLBACK_CHAT_TEMPLATE, specials


def render_prompt(template: str, specials: dict[str, str], messages: list[dict[str, str]]) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    # The environment transformers' apply_chat_template uses, so prompts match training.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)
    try:
        return compiled.render(messages=messages, add_generation_prompt=True, **specials)
    except ValueError:  # templates without a system role: merge it into the first user turn
        merged = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
        return compiled.render(messages=merged + messages[2:], add_generation_prompt=True, **specials)


def gate_candidate(name: str, gate: OnlineGate, items: list[dict[str, Any]], candidate: list[str],
                   base: list[str], baseline: Optional[list[str]],
                   prompt: PromptContract = PromptContract()) -> OnlineGateResult:
    from ragtune.rag.intervals import bootstrap_intervals
    from ragtune.rag.metrics import score

    cand_m, base_m = score(items, candidate, prompt=prompt), score(items, base, prompt=prompt)
    baseline_m = score(items, baseline, prompt=prompt) if baseline is not None else None
    intervals = None
    if gate.thresholds.confidence is not None:  # the paired intervals the gates compare
        intervals = bootstrap_intervals(items, {"base": base, "adapter": candidate}, prompt,
                                        confidence=gate.thresholds.confidence)
    results = evaluate_gates(gate.thresholds, cand_m, base_m, intervals=intervals)
    if baseline_m is not None:
        for metric in ("f1", "refusalRate"):
            was = baseline_m.to_wire().get(metric)
            now = cand_m.to_wire().get(metric)
            if was is None:
                continue
            threshold = round(was - gate.max_regression, 6)
            results.append(GateResult(metric=f"{metric}VsServing", comparison=">=", threshold=threshold,
                                      value=now, passed=now is not None and now >= threshold,
                                      margin=None if now is None else round(now - threshold, 6)))
    differs = sum(c.strip() != b.strip() for c, b in zip(candidate, base)) / max(len(items), 1)
    if gate.require_adapter_effect:
        need = round(1 / max(len(items), 1), 6)
        results.append(GateResult(metric="differsFromBase", comparison=">=", threshold=need,
                                  value=round(differs, 6), passed=differs >= need, margin=round(differs - need, 6)))
    return OnlineGateResult(adapter=name, candidate=cand_m, base=base_m, baseline=baseline_m,
                            differs_from_base=round(differs, 6), gates=results,
                            passed=all(r.passed for r in results))


def run_report(storage, cand: CandidateRef) -> dict[str, Any]:
    """The run's `eval/report.json`, verified: manifest digest as pinned, report digest as listed."""
    from ragtune.api.pods import MANIFEST, REPORT_JSON, Manifest
    from ragtune.storage import sha256_bytes

    base = cand.uri.rstrip("/") + "/"
    raw = storage.get_bytes(base + MANIFEST)
    if cand.sha256 and sha256_bytes(raw) != cand.sha256:
        raise ValueError(f"adapter {cand.name}: {base}{MANIFEST} does not match the pinned sha256")
    listed = {f.path: f.sha256 for f in Manifest.model_validate_json(raw).files}
    if REPORT_JSON not in listed:
        raise ValueError(f"adapter {cand.name}: the run's manifest lists no {REPORT_JSON} for the offline gate")
    report = storage.get_bytes(base + REPORT_JSON)
    if sha256_bytes(report) != listed[REPORT_JSON]:
        raise ValueError(f"adapter {cand.name}: {base}{REPORT_JSON} does not match its sha256 in the manifest")
    data = json.loads(report)
    return {**(data.get("metrics") or {}), "passed": data.get("passed")}


def offline_check(config: OnlineEvalConfig, storage) -> dict[str, list[GateResult]]:
    from ragtune.adapterdeployment.resolve import offline_gate

    return {c.name: offline_gate(config.offline, run_report(storage, c)) for c in config.candidates if c.offline}


def evaluate(config: OnlineEvalConfig, storage, generate: Generate) -> OnlineEvalResult:
    from ragtune.adapterdeployment.resolve import offline_failures

    try:
        offline = offline_check(config, storage)
    except (ValueError, ValidationError) as exc:
        return OnlineEvalResult(outcome="Error", reason="OfflineReportInvalid", message=str(exc)[:500])
    failures = offline_failures(offline)
    if failures:
        return OnlineEvalResult(outcome="Failed", reason="OfflineGateFailed", message=failures, offline=offline)
    if not config.canary_url:
        return OnlineEvalResult(outcome="Passed", reason="Passed", offline=offline,
                                message=f"{len(offline)} adapter(s) passed the offline gate on their run's report")
    if not config.eval_set_uri:
        return OnlineEvalResult(outcome="Error", reason="InvalidEvalSet", message="no evaluation set configured")
    try:
        items = sample(load_records(storage, config.eval_set_uri, config.eval_set_sha256), config.gate.samples,
                       config.seed)
    except EvalSetDigestMismatch as exc:
        return OnlineEvalResult(outcome="Error", reason="EvalSetDigestMismatch", message=str(exc), offline=offline)
    except ValueError as exc:
        return OnlineEvalResult(outcome="Error", reason="InvalidEvalSet", message=str(exc))
    budget = config.gate.max_new_tokens
    results = []
    base_cache: dict[tuple[str, PromptContract], list[str]] = {}
    for cand in config.candidates:
        template, specials = chat_template(storage, cand.uri)
        try:
            contract = adapter_prompt(storage, cand)
        except (ValueError, ValidationError) as exc:
            return OnlineEvalResult(outcome="Error", reason="InvalidPrompt", message=str(exc)[:500], offline=offline)
        prompts = [render_prompt(template, specials, messages_for(r, contract)) for r in items]
        key = (template, contract)  # the base model's answers depend on both
        try:
            if key not in base_cache:
                base_cache[key] = [generate(config.canary_url, p, None) for p in prompts]
            answers = [generate(config.canary_url, p, cand.name) for p in prompts]
        except AdapterNotServed as exc:  # vLLM's answer to a name it does not serve: no proof of the adapter
            return OnlineEvalResult(outcome="Failed", reason="AdapterNotServed", offline=offline,
                                    message=f"adapter {cand.name}: the canary {exc}")
        except Exception as exc:
            return OnlineEvalResult(outcome="Error", reason="CanaryUnreachable",
                                    message=f"querying the canary at {config.canary_url}: {type(exc).__name__}: {exc}")
        baseline = None
        if cand.serving and config.stable_url:
            try:
                baseline = [generate(config.stable_url, p, cand.name) for p in prompts]
            except Exception as exc:
                return OnlineEvalResult(outcome="Error", reason="StableUnreachable",
                                        message=f"querying the stable server at {config.stable_url}: {exc}")
        log.info("adapter %s: %d items answered (budget %d tokens)", cand.name, len(items), budget)
        results.append(gate_candidate(cand.name, config.gate, items, answers, base_cache[key], baseline, contract))
    failed = [r for r in results if not r.passed]
    if not failed:
        return OnlineEvalResult(outcome="Passed", reason="Passed", offline=offline,
                                message=f"{len(results)} adapter(s) passed on {len(items)} items", results=results)
    first = failed[0]
    metrics = {g.metric for g in first.gates if not g.passed}
    reason = ("NoAdapterEffect" if metrics == {"differsFromBase"} else
              "Regression" if metrics and all(m.endswith("VsServing") for m in metrics) else "GateFailed")
    message = "; ".join(f"adapter {r.adapter}: {describe_failures(r.gates)}" for r in failed)
    return OnlineEvalResult(outcome="Failed", reason=reason, message=message, results=results, offline=offline)


def _fit(result: OnlineEvalResult) -> OnlineEvalResult:
    """Keep the termination message within 4 KiB: drop base/baseline metrics, then passed gates."""
    from ragtune.api.pods import TERMINATION_MESSAGE_LIMIT

    def size(r: OnlineEvalResult) -> int:
        return len(json.dumps(r.to_wire(), separators=(",", ":")).encode())

    if size(result) <= TERMINATION_MESSAGE_LIMIT:
        return result
    slim = result.model_copy(deep=True)
    for r in slim.results:
        r.base = r.baseline = None
    for r in slim.results:
        if size(slim) <= TERMINATION_MESSAGE_LIMIT:
            break
        r.gates = [g for g in r.gates if not g.passed]
    return slim


def main(args) -> int:
    from ragtune.storage import Storage, StorageError

    from .fetch import write_termination_message

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    raw = os.environ.get(EVAL_CONFIG_ENV) if args.config is None else open(args.config).read()
    try:
        config = OnlineEvalConfig.model_validate_json(raw or "")
    except ValidationError as exc:
        result = OnlineEvalResult(outcome="Error", reason="InvalidConfig",
                                  message=f"{EVAL_CONFIG_ENV}: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}")
    else:
        storage = Storage(config.s3)
        try:
            result = evaluate(config, storage, server_generate(config))
        except StorageError as exc:  # S3 unreachable, denied, missing, or a forbidden address
            result = OnlineEvalResult(outcome="Error", reason=exc.reason, message=str(exc)[:500])
    write_termination_message(_fit(result))
    print(json.dumps({"outcome": result.outcome, "reason": result.reason, "message": result.message}))
    return 0 if result.outcome == "Passed" else 1
