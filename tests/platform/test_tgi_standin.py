"""The TGI stand-in (localplatform/ragtune_local/testdoubles/tgi_standin) behaves like TGI where ragtune depends on it, and its
responses validate against TGI's OpenAPI schemas (the subset ragtune depends on, kept in the repository
at tests/platform/data/tgi-openapi-subset.json with the TGI version it was taken from).

The stand-in only grows where TGI's real contract does: `/v1/completions` (used by ragtune's one
client for both backends) follows TGI's router (`model` read as `adapter_id` unless "tgi", TGI >= 2.2)
and TGI's `CompletionFinal` schema."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ragtune_local.platform import free_port
from ragtune_local.testdoubles.tiny_models import make_adapter, make_base

REPO = Path(__file__).resolve().parents[2]
# TGI's response schemas (Text Generation Inference 3.3.x), in the repository: a clone tests itself.
OPENAPI = Path(__file__).resolve().parent / "data" / "tgi-openapi-subset.json"

pytestmark = pytest.mark.slow


def _to_jsonschema(node):
    """OpenAPI 3.0 -> JSON Schema: `nullable: true` becomes an explicit null alternative."""
    if isinstance(node, list):
        return [_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_jsonschema(v) for k, v in node.items() if k not in ("nullable", "example", "default")}
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


@pytest.fixture(scope="module")
def openapi():
    return json.loads(OPENAPI.read_text())


def validate(openapi, schema_name: str, instance) -> None:
    from jsonschema import Draft202012Validator

    schema = {"$ref": f"#/components/schemas/{schema_name}",
              "components": _to_jsonschema(openapi["components"])}
    Draft202012Validator(schema).validate(instance)


def response_schema(openapi, route: str) -> dict:
    content = openapi["paths"][route]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    return content


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base = make_base(root / "base")
    a1 = make_adapter(base, root / "a1", seed=1)
    a2 = make_adapter(base, root / "a2", seed=2)
    return base, a1, a2


class StandIn:
    def __init__(self, env: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full = {**{k: v for k, v in os.environ.items() if k not in ("MODEL_ID", "LORA_ADAPTERS")},
                "PORT": str(self.port), "HOSTNAME": "127.0.0.1", **env}
        self.proc = subprocess.Popen([sys.executable, "-m", "ragtune_local.testdoubles.tgi_standin"], cwd=REPO, env=full,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def port_open(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def wait(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"stand-in exited {self.proc.returncode}: {self.proc.stdout.read()}")
            if self.port_open():
                return
            time.sleep(0.2)
        raise AssertionError("stand-in did not open its port")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(models):
    base, a1, a2 = models
    s = StandIn({"MODEL_ID": str(base), "LORA_ADAPTERS": f"a1={a1},a2={a2}"})
    # The port opens only after weights and adapters are loaded, as with TGI.
    assert not s.port_open()
    s.wait()
    yield s
    s.stop()


def post(url: str, body: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url: str):
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        data = resp.read()
        return resp.status, json.loads(data) if data else None


PROMPT = "Question: What is the capital of France? Answer:"


def generate(server, adapter=None, **params):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 12, **params}}
    if adapter is not None:
        body["parameters"]["adapter_id"] = adapter
    return post(server.url + "/generate", body)


def test_health_and_info(server, openapi, models):
    assert get(server.url + "/health")[0] == 200
    status, info = get(server.url + "/info")
    assert status == 200 and info["model_id"] == str(models[0])
    validate(openapi, "Info", info)


def test_adapters_change_outputs_and_unknown_id_falls_back_to_base(server, openapi):
    status, base = generate(server)
    assert status == 200
    validate(openapi, "GenerateResponse", base)
    _, a1 = generate(server, "a1")
    _, a2 = generate(server, "a2")
    _, unknown = generate(server, "no-such-adapter")
    assert a1["generated_text"] != base["generated_text"]
    assert a2["generated_text"] != a1["generated_text"]
    # exactly like TGI: 200 and the base model's answer
    assert unknown["generated_text"] == base["generated_text"]
    # greedy decoding is deterministic per adapter, also after switching
    assert generate(server, "a1")[1]["generated_text"] == a1["generated_text"]
    details = a1["details"]
    assert details["generated_tokens"] == len(details["tokens"]) <= 12
    assert details["finish_reason"] in ("length", "eos_token")


def test_compat_route_used_by_inference_client(server, openapi):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.url)
    with_adapter = client.text_generation(PROMPT, adapter_id="a1", max_new_tokens=12, details=False)
    assert with_adapter == generate(server, "a1")[1]["generated_text"]
    base = client.text_generation(PROMPT, max_new_tokens=12)
    assert base == generate(server)[1]["generated_text"]
    status, body = post(server.url + "/", {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
    assert status == 200
    from jsonschema import Draft202012Validator

    Draft202012Validator({**response_schema(openapi, "/"),
                          "components": _to_jsonschema(openapi["components"])}).validate(body)


def test_chat_completions_model_selects_the_adapter(server, openapi):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    status, a1 = post(server.url + "/v1/chat/completions", {"model": "a1", "messages": messages, "max_tokens": 10})
    assert status == 200
    validate(openapi, "ChatCompletion", a1)
    _, base = post(server.url + "/v1/chat/completions", {"model": "tgi", "messages": messages, "max_tokens": 10})
    validate(openapi, "ChatCompletion", base)
    assert a1["choices"][0]["message"]["content"] != base["choices"][0]["message"]["content"]
    assert a1["usage"]["completion_tokens"] <= 10


def test_validation_errors_use_tgi_error_shape(server, openapi):
    status, body = post(server.url + "/generate", {"inputs": "", "parameters": {}})
    assert status == 422
    validate(openapi, "ErrorResponse", body)
    assert body["error_type"] == "validation"


def test_bad_configuration_exits_with_a_clear_message(tmp_path, models):
    s = StandIn({"MODEL_ID": str(models[0]), "LORA_ADAPTERS": f"broken={tmp_path}"})
    out, _ = s.proc.communicate(timeout=120)
    assert s.proc.returncode == 2
    assert "LORA_ADAPTERS broken=" in out and "adapter_config.json" in out


def test_adapter_that_does_not_fit_the_base_crashes_at_start(tmp_path, models):
    """TGI's shard fails when an adapter's tensors do not match the base: the pod crash-loops."""
    other = make_base(tmp_path / "other", hidden=48)
    bad = make_adapter(other, tmp_path / "bad")
    s = StandIn({"MODEL_ID": str(models[0]), "LORA_ADAPTERS": f"bad={bad}"})
    out, _ = s.proc.communicate(timeout=120)
    assert s.proc.returncode == 1 and "failed to load" in out


def test_completions_model_selects_the_adapter_like_tgi_router(server, openapi):
    """TGI's `/v1/completions` (router, since 2.2): `model` other than "tgi" is the adapter id, "tgi"
    the base model, an unknown id silently the base; greedy at temperature 0, the same generation as
    `/generate` (both add special tokens); `CompletionFinal` names the base model; `suffix` refused."""
    def complete(model, prompt=PROMPT, **extra):
        return post(server.url + "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 12,
                                                      "temperature": 0, **extra})

    status, a1 = complete("a1")
    assert status == 200
    validate(openapi, "CompletionFinal", a1)
    assert a1["object"] == "text_completion" and a1["model"] == get(server.url + "/info")[1]["model_id"]
    assert a1["choices"][0]["text"] == generate(server, "a1")[1]["generated_text"]
    base = complete("tgi")[1]["choices"][0]["text"]
    assert base == generate(server)[1]["generated_text"] != a1["choices"][0]["text"]
    assert complete("no-such-adapter")[1]["choices"][0]["text"] == base
    assert a1["choices"][0]["finish_reason"] in ("length", "stop")
    _, batch = complete("a2", prompt=[PROMPT, "Question: Who wrote Hamlet? Answer:"])
    assert [c["index"] for c in batch["choices"]] == [0, 1]
    assert batch["usage"]["completion_tokens"] <= 24
    status, body = complete("a1", suffix="!")
    assert status == 422
    validate(openapi, "ErrorResponse", body)
    assert complete("a1", prompt=[PROMPT] * 5)[0] == 422


def test_the_one_client_drives_the_standin(server):
    """ragtune's client (`online_eval.Completions`, the openai client) against TGI's protocol."""
    from ragtune.pods.online_eval import Completions

    client = Completions(server.url, backend="tgi", base_model="ignored-for-tgi")
    assert client(PROMPT, "a1", 12) == generate(server, "a1")[1]["generated_text"]
    assert client(PROMPT, None, 12) == generate(server)[1]["generated_text"]
    assert client(PROMPT, "no-such-adapter", 12) == client(PROMPT, None, 12)  # TGI's silent fallback


def metrics(server) -> dict[str, float]:
    import urllib.request

    from ragtune.adapterdeployment import analysis

    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {name + (f"{{{','.join(f'{k}={v}' for k, v in sorted(labels.items()))}}}" if labels else ""): value
            for name, labels, value in analysis.parse(text)}


def test_metrics_count_generation_requests_under_tgis_names(server):
    before = metrics(server)
    assert generate(server, "a1")[0] == 200
    assert post(server.url + "/generate", {"inputs": "", "parameters": {}})[0] == 422
    get(server.url + "/health")  # not a generation request: not counted, as in TGI
    after = metrics(server)
    assert after["tgi_request_count"] - before["tgi_request_count"] == 2
    assert after["tgi_request_success"] - before["tgi_request_success"] == 1
    assert after["tgi_request_failure{err=validation}"] - before.get("tgi_request_failure{err=validation}", 0) == 1
    assert after["tgi_request_duration_count"] - before["tgi_request_duration_count"] == 1
    assert 0 < after["tgi_request_generated_tokens_sum"] - before["tgi_request_generated_tokens_sum"] <= 12


def test_fault_injection_fails_generation_while_the_named_adapter_is_loaded(models):
    base, a1, a2 = models
    s = StandIn({"MODEL_ID": str(base), "LORA_ADAPTERS": f"a1={a1},a2={a2}", "STANDIN_FAIL_WITH_ADAPTER": "a2"})
    s.wait()
    try:
        status, body = generate(s, "a1")
        assert status == 424 and "injected fault" in body["error"] and body["error_type"] == "generation"
        assert get(s.url + "/health")[0] == 200  # probes still pass: the pod stays Ready
        m = metrics(s)
        assert m["tgi_request_count"] == 1 and m["tgi_request_success"] == 0
        assert m["tgi_request_failure{err=generation}"] == 1
    finally:
        s.stop()


def test_fault_injection_fails_generation_while_the_named_file_exists(models, tmp_path):
    base, a1, _ = models
    marker = tmp_path / "fail"
    s = StandIn({"MODEL_ID": str(base), "LORA_ADAPTERS": f"a1={a1}", "STANDIN_FAIL_WHILE_FILE": str(marker)})
    s.wait()
    try:
        assert generate(s, "a1")[0] == 200
        marker.touch()
        status, body = generate(s, "a1")
        assert status == 424 and "STANDIN_FAIL_WHILE_FILE" in body["error"]
        marker.unlink()
        assert generate(s, "a1")[0] == 200
    finally:
        s.stop()
