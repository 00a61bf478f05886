"""Publishing a run: the adapter folder (what TGI loads), the evaluation report, the held-out
split (`EVAL_SET_JSONL`, the online gate's default data), the TensorBoard event files when
`training.reportTo` asks for them, every file uploaded with its digest,
and manifest.json LAST, so a reader that finds a manifest finds everything it lists."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ragtune.api.common import GateResult
from ragtune.api.finetunejob import FineTuneJobSpec
from ragtune.api.pods import ADAPTER_DIR, EVAL_SET_JSONL, MANIFEST, PROMPT_JSON, Manifest, ManifestFile, StageSummary
from ragtune.clock import utc_now_iso
from ragtune.rag.prompt import PromptContract
from ragtune.rag.records import RagRecord
from ragtune.storage import folder_digests, join, sha256_bytes, sha256_file

from .run import RunContext, TrainerFailure


@dataclass
class Published:
    manifest_sha256: str
    adapter_size_bytes: int
    report_uri: Optional[str]
    prompt_sha256: str
    eval_set_uri: Optional[str] = None
    eval_set_sha256: Optional[str] = None


def publish_run(ctx: RunContext, model, tokenizer, outcome, log_history: list[dict], gates: list[GateResult],
                datasets: list[dict], passed: bool, construction: Optional[dict] = None,
                stages: Sequence[StageSummary] = (), stage_reports: Optional[list[dict]] = None,
                eval_records: Sequence[RagRecord] = (), data_hygiene: Optional[dict] = None) -> Published:
    """Write the adapter (and the report when there was an evaluation, and the held-out split when
    there is one), upload, manifest last. `stages` go into the manifest; `stage_reports` (each
    stage's summary and log history) into the report."""
    out = ctx.work_dir / "run"
    adapter_files = write_adapter(model, tokenizer, ctx.spec, out / ADAPTER_DIR)
    prompt_path = out / PROMPT_JSON
    report_files: list[Path] = []
    if outcome is not None:
        from .report import write_report

        report_files = write_report(out / "eval", outcome, log_history, ctx.spec, gates, construction,
                                    stages=stage_reports, data_hygiene=data_hygiene)
    eval_set = write_eval_set(eval_records, out / EVAL_SET_JSONL) if eval_records else None
    from . import tracking  # training.reportTo: the event files, written under `out` while training

    manifest = publish(ctx, out, adapter_files + report_files + ([eval_set] if eval_set else [])
                       + tracking.files(ctx), datasets, passed, stages)
    return Published(
        manifest_sha256=sha256_bytes(manifest),
        adapter_size_bytes=sum(p.stat().st_size for p in adapter_files),
        report_uri=join(ctx.run_uri, "eval/report.html") if report_files else None,
        prompt_sha256=sha256_file(prompt_path),
        eval_set_uri=join(ctx.run_uri, EVAL_SET_JSONL) if eval_set else None,
        eval_set_sha256=sha256_file(eval_set) if eval_set else None,
    )


def write_eval_set(records: Sequence[RagRecord], path: Path) -> Path:
    """The held-out split as the trainer evaluated it: one `rag` record a line, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r.to_dict(), ensure_ascii=False, sort_keys=True) + "\n" for r in records),
                    encoding="utf-8")
    return path


def write_adapter(model, tokenizer, spec: FineTuneJobSpec, out: Path) -> list[Path]:
    """adapter_config.json + adapter_model.safetensors at top level (what TGI loads) + tokenizer,
    and prompt.json: the prompt contract clients format requests with."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for required in ("adapter_config.json", "adapter_model.safetensors"):
        if not (out / required).is_file():
            raise TrainerFailure("InternalError", f"adapter export wrote no {required}")
    # TGI matches adapters to the served model by id, not by our local download path. (Patched in
    # the file: set on the model before saving, peft would try to look the id up on the hub.)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(base_model_name_or_path=spec.base_model.id, revision=spec.base_model.revision)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "prompt.json").write_text(PromptContract.from_spec(spec).dumps(), encoding="utf-8")
    return sorted(p for p in out.rglob("*") if p.is_file())


def publish(ctx: RunContext, root: Path, files: list[Path], datasets: list[dict], passed: bool,
            stages: Sequence[StageSummary] = ()) -> bytes:
    """Upload every file, then manifest.json last. A stale manifest from an earlier attempt is
    removed first, so readers never pair an old manifest with new files."""
    import peft
    import torch
    import transformers
    import trl

    storage = ctx.storage
    storage.delete_prefix(join(ctx.run_uri, MANIFEST))
    entries = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        storage.upload(path, join(ctx.run_uri, rel))
        entries.append(ManifestFile(path=rel, sha256=sha256_file(path), size=path.stat().st_size))
    manifest = Manifest(
        run_id=ctx.run_id,
        base_model={"id": ctx.spec.base_model.id, "revision": ctx.spec.base_model.revision,
                    "uri": ctx.spec.base_model.uri},
        files=entries,
        base_model_files=base_model_files(ctx),
        datasets=datasets,
        image=ctx.image,
        versions={"torch": torch.__version__, "transformers": transformers.__version__,
                  "peft": peft.__version__, "trl": trl.__version__, "ragtune": _ragtune_version()},
        evaluation_passed=passed,
        stages=list(stages),
        created_at=utc_now_iso(),
        job=ctx.job,
    )
    data = json.dumps(manifest.to_wire(), indent=2).encode()
    storage.put_bytes(join(ctx.run_uri, MANIFEST), data)
    return data


def base_model_files(ctx: RunContext) -> list[ManifestFile]:
    """Digests of the base weights the run trained on, when they came from `baseModel.uri` (the
    folder `resolve_base_model` placed them in; resolving again finds the completed download)."""
    if not ctx.spec.base_model.uri:
        return []
    from .base_model import resolve_base_model

    return [ManifestFile(path=path, sha256=digest, size=size)
            for path, (digest, size) in folder_digests(resolve_base_model(ctx)).items()]


def _ragtune_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ragtune")
    except PackageNotFoundError:
        return "unknown"
