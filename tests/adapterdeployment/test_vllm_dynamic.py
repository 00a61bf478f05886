"""The vLLM dynamic adapter set without a cluster: the rollout's decisions against an in-memory API
server with pods whose sidecar status documents the test writes (a set change updates the
ConfigMap, never the pod template; a step completes only when every ready pod serves the set; a
load failure names pod and adapter and restores the previous set by digest), and the sidecar's
serving proxy and status server over real sockets (LoRA endpoints refused in every spelling,
streaming relayed as it arrives)."""

from __future__ import annotations

import http.client
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from ragtune.adapterdeployment import render
from ragtune.adapterdeployment.rollout import Reconciler
from ragtune.api.adapterdeployment import AdapterDeploymentStatus
from ragtune.api.pods import AdapterSetDocument
from ragtune.pods import serving_proxy
from ragtune.pods.adapter_sync import StatusServer, Syncer

from .fakekube import FakeKube

BASE = {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "12fd25f"}
IMAGE = "ghcr.io/ragtune/ragtune-operator:test"
V1, V2, BAD = "1" * 64, "2" * 64, "3" * 64


def _adapter(name: str, sha: str) -> dict:
    return {"name": name, "uri": f"s3://models/{name}/{sha[:4]}/", "sha256": sha}


class Cluster:
    """FakeKube + the pods of the vLLM Deployments, each with the status document its sidecar serves."""

    def __init__(self, replicas: int = 2):
        self.kube = FakeKube()
        self.reports: dict[str, dict] = {}
        self.reads: list[str] = []
        self.replicas = replicas
        self.pods: dict[str, str] = {}  # pod name -> ip

    def ad(self, adapters: list[dict], **spec) -> None:
        body = {"apiVersion": "ragtune.dev/v1alpha1", "kind": "AdapterDeployment",
                "metadata": {"name": "chat", "namespace": "ns", "uid": "uid-chat", "generation": 1,
                             "resourceVersion": "1"},
                "spec": {"baseModel": BASE, "server": {"backend": "vllm", "gpus": 0, "replicas": self.replicas,
                                                       "vllm": {"maxLoras": 2}},
                         "strategy": {"type": "Direct"}, "gates": {"requireOfflinePass": False},
                         "adapters": adapters, **spec}}
        self.kube.objects[("AdapterDeployment", "ns", "chat")] = body

    def edit(self, adapters: list[dict]) -> None:
        self.kube.merge_patch("AdapterDeployment", "ns", "chat", {"spec": {"adapters": adapters}})

    def status_doc(self, ip: str, port: int):
        assert port == 9090
        self.reads.append(ip)
        return self.reports.get(ip)

    def tick(self) -> AdapterDeploymentStatus:
        Reconciler(self.kube, IMAGE, clock=lambda: self.kube.clock, pod_status=self.status_doc).tick("ns", "chat")
        return AdapterDeploymentStatus.model_validate(self.kube.objects[("AdapterDeployment", "ns", "chat")]
                                                      .get("status", {}))

    def start_pods(self, deployment: str = "chat-server") -> None:
        """The Deployment controller and kubelet: `replicas` running, ready pods of the current template."""
        dep = self.kube.objects[("Deployment", "ns", deployment)]
        template = dep["spec"]["template"]
        for i in range(dep["spec"]["replicas"]):
            name = f"{deployment}-{i}"
            ip = f"10.0.0.{len(self.pods) + 1}"
            self.pods[name] = ip
            self.kube.objects[("Pod", "ns", name)] = {
                "kind": "Pod", "metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}",
                                            "labels": {**template["metadata"]["labels"], "owner": deployment},
                                            "annotations": dict(template["metadata"]["annotations"])},
                "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}],
                           "containerStatuses": [{"name": "vllm", "restartCount": 0},
                                                 {"name": render.SYNC_CONTAINER, "restartCount": 0}]}}
        self.kube.ready(deployment)

    def serve(self, pod: str, loaded: dict[str, str], errors: dict | None = None) -> None:
        self.reports[self.pods[pod]] = {"generation": 1, "desired": "", "loaded": loaded, "errors": errors or {},
                                        "ready": True}

    def desired_set(self) -> dict[str, str]:
        cm = self.kube.objects[("ConfigMap", "ns", "chat-server-adapters")]
        doc = AdapterSetDocument.model_validate_json(cm["data"]["adapters.json"])
        return {a.name: a.sha256 for a in doc.adapters}


@pytest.fixture
def served() -> Cluster:
    """A vLLM AdapterDeployment serving support@V1 on two pods."""
    c = Cluster()
    c.ad([_adapter("support", V1)])
    s = c.tick()
    assert s.candidate.step == "Promoting" and c.desired_set() == {"support": V1}
    assert c.kube.kinds("Deployment") == ["chat-server"] and c.kube.kinds("ConfigMap") == ["chat-server-adapters"]
    c.start_pods()
    c.serve("chat-server-0", {"support": V1})
    s = c.tick()
    assert s.candidate is not None and "chat-server-1" in s.message, "one ready pod does not serve it yet"
    c.serve("chat-server-1", {"support": V1})
    s = c.tick()
    assert s.phase == "Ready" and [(a.name, a.sha256) for a in s.serving] == [("support", V1)], s
    loaded = next(x for x in s.conditions if x.type == "AdaptersLoaded")
    assert loaded.status == "True" and "all 2 ready pod(s) of chat-server serve support@111111111111" in loaded.message
    return c


def test_a_new_set_rewrites_the_configmap_not_the_pods_and_completes_when_every_pod_serves_it(served):
    c = served
    template = json.dumps(c.kube.objects[("Deployment", "ns", "chat-server")]["spec"], sort_keys=True)
    c.edit([_adapter("support", V2), _adapter("legal", V1)])
    c.kube.writes.clear()
    c.reads.clear()
    s = c.tick()
    assert c.desired_set() == {"support": V2, "legal": V1}
    assert [w for w in c.kube.writes if w[1] != "AdapterDeployment"] == [("replace", "ConfigMap", "chat-server-adapters")]
    assert json.dumps(c.kube.objects[("Deployment", "ns", "chat-server")]["spec"], sort_keys=True) == template
    assert s.phase == "RollingOut" and ("Normal", "Promoting") in [e[:2] for e in c.kube.events]
    # one pod has swapped, the other not yet: not done
    c.serve("chat-server-0", {"support": V2, "legal": V1})
    c.reads.clear()
    s = c.tick()
    assert s.candidate is not None and "chat-server-1" in s.message
    assert sorted(c.reads) == ["10.0.0.1", "10.0.0.2"], "one status document per pod per tick"
    c.serve("chat-server-1", {"support": V2, "legal": V1})
    s = c.tick()
    assert s.phase == "Ready" and {a.name: a.sha256 for a in s.serving} == {"support": V2, "legal": V1}
    assert s.history[0].outcome == "Promoted"
    # idle: no status documents are read between rollouts
    c.reads.clear()
    c.tick()
    assert c.reads == []


def test_a_pod_that_cannot_load_the_adapter_is_named_and_the_previous_set_is_restored_by_digest(served):
    c = served
    c.edit([_adapter("support", BAD)])
    c.tick()
    assert c.desired_set() == {"support": BAD}
    c.serve("chat-server-1", {"support": V1}, errors={"support": {
        "reason": "ChecksumMismatch", "sha256": BAD,
        "message": "adapter support: adapter/adapter_model.safetensors has sha256 0000… (10 bytes), the manifest says 1111…"}})
    s = c.tick()
    assert s.phase == "RolledBack" and s.candidate is None
    assert c.desired_set() == {"support": V1}, "the serving set is back in the ConfigMap"
    assert [(a.name, a.sha256) for a in s.serving] == [("support", V1)]
    cond = next(x for x in s.conditions if x.type == "AdaptersLoaded")
    assert cond.status == "False" and cond.reason == "AdapterLoadFailed"
    assert "pod chat-server-1: adapter support@333333333333 not loaded: ChecksumMismatch" in cond.message
    warnings = [e for e in c.kube.events if e[0] == "Warning"]
    assert warnings and warnings[-1][1] == "AdapterLoadFailed" and "pod chat-server-1" in warnings[-1][2] \
        and "adapter support" in warnings[-1][2]
    assert s.history[0].outcome == "RolledBack" and "AdapterLoadFailed" in s.history[0].reason
    assert c.kube.kinds("Pod") == ["chat-server-0", "chat-server-1"], "no pod was replaced"


def test_errors_about_an_older_digest_or_an_unreachable_server_do_not_fail_the_step(served):
    c = served
    c.edit([_adapter("support", V2)])
    c.tick()
    c.serve("chat-server-0", {"support": V1}, errors={"support": {"reason": "ChecksumMismatch", "sha256": BAD}})
    c.serve("chat-server-1", {"support": V1}, errors={"support": {"reason": "ServerUnreachable", "sha256": V2}})
    s = c.tick()
    assert s.candidate is not None and s.phase == "RollingOut", s.message


def test_removing_an_adapter_is_a_configmap_change_too(served):
    c = served
    c.edit([_adapter("support", V1), _adapter("legal", V2)])
    c.tick()
    for pod in c.pods:
        c.serve(pod, {"support": V1, "legal": V2})
    assert c.tick().phase == "Ready"
    c.edit([_adapter("legal", V2)])
    s = c.tick()
    assert c.desired_set() == {"legal": V2} and s.candidate is not None
    for pod in c.pods:
        c.serve(pod, {"legal": V2})
    s = c.tick()
    assert s.phase == "Ready" and [a.name for a in s.serving] == ["legal"]


def test_an_unreachable_sidecar_counts_as_not_serving(served):
    c = served
    c.edit([_adapter("support", V2)])
    c.tick()
    c.serve("chat-server-0", {"support": V2})
    c.reports.pop(c.pods["chat-server-1"])
    assert c.tick().candidate is not None


def test_the_configmap_is_written_before_the_first_deployment_and_deleted_when_nothing_served():
    c = Cluster(replicas=1)
    c.ad([_adapter("support", BAD)])
    c.tick()
    writes = [w for w in c.kube.writes if w[1] != "AdapterDeployment"]
    assert writes.index(("create", "ConfigMap", "chat-server-adapters")) < writes.index(("create", "Deployment", "chat-server"))
    c.start_pods()
    c.serve("chat-server-0", {}, errors={"support": {"reason": "DigestMismatch", "sha256": BAD, "message": "x"}})
    s = c.tick()
    assert s.phase == "RolledBack"
    assert c.kube.kinds("Deployment") == [] and c.kube.kinds("ConfigMap") == [] and c.kube.kinds("Service") == []


# --- the serving proxy ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", [
    "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/load_lora_adapter/", "//v1//load_lora_adapter",
    "/v1/./load_lora_adapter", "/v1/x/../load_lora_adapter", "/v1/%6coad_lora_adapter", "/v1/%256coad_lora_adapter",
    "/V1/LOAD_LORA_ADAPTER", "/v1/load_lora_adapter?x=1", "http://pod:8080/v1/load_lora_adapter",
    # vLLM 0.32 also mounts SageMaker's register/unregister routes on the same loader
    "/adapters", "/adapters/support", "//Adapters/", "/%61dapters/x",
])
def test_the_lora_endpoints_are_refused_in_every_spelling(target):
    assert serving_proxy.refused(target)


@pytest.mark.parametrize("target", ["/v1/completions", "/v1/models", "/health", "/metrics", "/v1/chat/completions?a=b",
                                    "/invocations", "/adaptersx"])
def test_everything_else_is_forwarded(target):
    assert not serving_proxy.refused(target)


class _Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Upstream.seen.append((self.path, body))
        if self.path == "/stream":  # SSE: no length, pieces with pauses
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for i in range(3):
                self.wfile.write(f"data: {i}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.3)
            self.close_connection = True
            return
        data = json.dumps({"echo": json.loads(body)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST


@pytest.fixture
def proxy():
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    server = serving_proxy.ServingProxy(("127.0.0.1", 0), upstream.server_address)
    stop = serving_proxy.serve_in_thread(server)
    _Upstream.seen = []
    yield SimpleNamespace(port=server.server_address[1])
    stop()
    upstream.shutdown()
    upstream.server_close()


def test_the_proxy_forwards_requests_and_refuses_lora_updates_with_a_clear_body(proxy):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": "support"}), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read()) == {"echo": {"model": "support"}}
    # same keep-alive connection
    conn.request("POST", "/v1/%6Coad_lora_adapter", body=json.dumps({"lora_name": "x", "lora_path": "/etc"}))
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 403 and "runtime LoRA endpoints are not served on this port" in body["error"]["message"]
    assert [p for p, _ in _Upstream.seen] == ["/v1/completions"], "vLLM never saw the LoRA request"


def test_the_proxy_relays_a_stream_as_it_arrives(proxy):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    started = time.monotonic()
    conn.request("POST", "/stream", body=b"{}")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    first = resp.read1(100)
    first_at = time.monotonic() - started
    rest = resp.read()
    assert first.startswith(b"data: 0") and first_at < 0.25, f"first event after {first_at:.2f}s: not streamed"
    assert (first + rest).count(b"data: ") == 3


def test_the_status_server_reports_readiness_only_once_the_set_is_loaded():
    server = StatusServer(("127.0.0.1", 0))
    stop = serving_proxy.serve_in_thread(server)
    try:
        syncer = Syncer(storage=None, admin=None, dest=None, max_rank=16)

        def get(path):
            conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        server.publish(syncer.status(healthy=True))
        assert get("/ready")[0] == 503
        syncer.loaded, syncer.synced, syncer.desired_digest = {"support": V1}, True, "d"
        server.publish(syncer.status(healthy=True))
        code, doc = get("/status")
        assert code == 200 and doc == {"generation": 0, "desired": "d", "loaded": {"support": V1}, "errors": {},
                                       "ready": True}
        assert get("/ready")[0] == 200
        server.publish(syncer.status(healthy=False))  # vLLM stopped answering
        assert get("/ready")[0] == 503
    finally:
        stop()


def test_a_restarted_operator_does_not_rewrite_the_set_while_pods_load_it(served):
    c = served
    c.edit([_adapter("support", V2)])
    c.tick()
    c.kube.writes.clear()
    for _ in range(3):  # every tick is a fresh Reconciler, as after an operator restart
        s = c.tick()
    assert s.candidate is not None and [w for w in c.kube.writes if w[1] != "AdapterDeployment"] == []


def test_the_vllm_canary_gets_its_own_configmap_and_is_promoted_only_when_its_pods_serve_the_set():
    from ragtune.pods.online_eval import OnlineEvalResult

    c = Cluster(replicas=1)
    c.ad([_adapter("support", V1)], strategy={"type": "Direct"})
    c.tick()
    c.start_pods()
    c.serve("chat-server-0", {"support": V1})
    assert c.tick().phase == "Ready"
    body = c.kube.objects[("AdapterDeployment", "ns", "chat")]
    body["spec"]["strategy"] = {"type": "Canary"}
    body["spec"]["gates"]["online"] = {"evalSetUri": "s3://data/eval.jsonl"}
    c.edit([_adapter("support", V2)])
    s = c.tick()
    assert s.candidate.step == "Canary"
    writes = [w for w in c.kube.writes if w[1] in ("ConfigMap", "Deployment")]
    assert writes[-2:] == [("create", "ConfigMap", "chat-server-canary-adapters"),
                           ("create", "Deployment", "chat-server-canary")]
    cm = c.kube.objects[("ConfigMap", "ns", "chat-server-canary-adapters")]
    assert {a.name: a.sha256 for a in AdapterSetDocument.model_validate_json(cm["data"]["adapters.json"]).adapters} \
        == {"support": V2}
    assert c.desired_set() == {"support": V1}, "the stable set is untouched during the canary"
    c.start_pods("chat-server-canary")
    c.serve("chat-server-canary-0", {"support": V1})  # ready, but not serving the candidate yet
    assert c.tick().candidate.step == "Canary"
    c.serve("chat-server-canary-0", {"support": V2})
    assert c.tick().candidate.step == "OnlineGate"
    job = render.eval_job_name("chat", 2)
    c.kube.finish_job(job, OnlineEvalResult(outcome="Passed", reason="Passed", message="ok", results=[
        {"adapter": "support", "passed": True, "differsFromBase": 0.8}]).model_dump_json(by_alias=True))
    s = c.tick()
    assert s.candidate.step == "Promoting" and c.desired_set() == {"support": V2}
    c.serve("chat-server-0", {"support": V2})
    s = c.tick()
    assert s.phase == "Ready" and "chat-server-canary-adapters" not in c.kube.kinds("ConfigMap")
    assert "chat-server-canary" not in c.kube.kinds("Deployment")


def test_switching_a_served_tgi_deployment_to_vllm_replaces_the_server_once_vllm_serves():
    c = Cluster(replicas=1)
    c.ad([_adapter("support", V1)])
    body = c.kube.objects[("AdapterDeployment", "ns", "chat")]
    body["spec"]["server"] = {"gpus": 0}  # TGI
    c.tick()
    c.kube.ready("chat-tgi")
    s = c.tick()
    assert s.phase == "Ready" and s.deployment_name == "chat-tgi"
    c.kube.merge_patch("AdapterDeployment", "ns", "chat", {"spec": {"server": {
        "backend": "vllm", "gpus": 0, "replicas": 1, "vllm": {"maxLoras": 2}}}})
    c.tick()
    assert set(c.kube.kinds("Deployment")) == {"chat-tgi", "chat-server"}, "TGI keeps serving meanwhile"
    c.start_pods()
    c.serve("chat-server-0", {"support": V1})
    s = c.tick()
    assert s.phase == "Ready" and s.deployment_name == "chat-server" and s.endpoint == "http://chat-server.ns.svc:8080"
    assert c.kube.kinds("Deployment") == ["chat-server"] and c.kube.kinds("Service") == ["chat-server"]
    assert ("Normal", "ServerReplaced") in [e[:2] for e in c.kube.events]


def test_the_sidecar_reloads_the_set_after_vllm_restarted(tmp_path, monkeypatch):
    """vLLM came back without its run-time adapters: the sidecar must not keep reporting them loaded."""
    import threading as _threading

    from ragtune.pods import adapter_sync

    class FakeVllm:
        def __init__(self, url):
            self.base_url, self.served, self.loads, self.down = url, {}, [], 0

        def healthy(self):
            if len(self.loads) == 1 and self.down == 0:  # restart once, right after the first load
                self.served, self.down = {}, 1
            if 0 < self.down <= 2:
                self.down += 1
                return False
            return True

        def served_loras(self):
            return dict(self.served)

        def load(self, name, path):
            self.loads.append(name)
            self.served[name] = str(path)

        def unload(self, name):
            self.served.pop(name, None)

    admins = []
    monkeypatch.setattr(adapter_sync, "VllmAdmin", lambda url: admins.append(FakeVllm(url)) or admins[-1])
    monkeypatch.setattr(adapter_sync, "fetch_adapter",
                        lambda storage, name, uri, digest, target, **kw: target.mkdir(parents=True, exist_ok=True))
    desired = tmp_path / "adapters.json"
    desired.write_text(json.dumps({"generation": 1, "digest": "d", "adapters": [_adapter("support", V1)]}))
    reports, stop = [], _threading.Event()

    def on_report(report):
        reports.append(report)
        if len(admins[0].loads) == 2 and report["ready"]:
            stop.set()
    args = SimpleNamespace(desired=str(desired), server="http://127.0.0.1:1", dest=str(tmp_path / "a"), status=None,
                           expect_base_model=None, allowed_target_module=None, target_modules_from_base=None,
                           max_rank=16, interval=0.01, once=False, status_listen=None, listen=None)
    timer = _threading.Timer(10, stop.set)
    timer.start()
    adapter_sync.run(args, storage=object(), stop=stop, on_report=on_report)
    timer.cancel()
    assert admins[0].loads == ["support", "support"], "loaded again after the restart"
    assert [r["ready"] for r in reports] == [True, False, True], "not ready while vLLM is down"
    assert reports[-1]["loaded"] == {"support": V1}
