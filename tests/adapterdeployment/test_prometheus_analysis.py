"""`strategy.canary.analysis.prometheus`: the traffic analysis reads the pods' counters from a
Prometheus query API instead of scraping the pods. Here against a Prometheus-shaped HTTP server on
loopback that answers `/api/v1/query` from the stand-in metrics of the pods it "scraped" (the real
Prometheus is in test_gateway_canary.py)."""

from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from ragtune.adapterdeployment import analysis
from ragtune.api.adapterdeployment import AnalysisSpec, PrometheusSource
from ragtune_local.platform import free_port

from .fakekube import FakeKube
from .test_analysis import analysed_rollout, pods  # noqa: F401  (fixture)
from .test_rollout import tick
from .test_traffic import weights


class FakePrometheus:
    """`GET /api/v1/query`: an instant vector of the series `texts()` ({pod: Prometheus text})
    holds, labelled `namespace="ns"` and `pod`, filtered by the query's pod regex and names."""

    def __init__(self, texts, status: int = 200):
        self.queries: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)["query"][0]
                outer.queries.append(query)
                names = query.split('__name__=~"', 1)[1].split('"', 1)[0].split("|")
                wanted = query.split('pod=~"', 1)[1].split('"', 1)[0].replace("\\\\.", ".").split("|")
                result = [{"metric": {"__name__": name, **labels, "namespace": "ns", "pod": pod, "job": "x"},
                           "value": [1.0, repr(value)]}
                          for pod, text in texts().items() if pod in wanted
                          for name, labels, value in analysis.parse(text) if name in names]
                body = json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}}).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.address = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def pod_texts(kube: FakeKube, p: dict):
    by_ip = {"127.0.0.61": p["stable"], "127.0.0.62": p["canary"]}
    return lambda: {name: by_ip[obj["status"]["podIP"]].metrics.text()
                    for (kind, _, name), obj in list(kube.objects.items())
                    if kind == "Pod" and (obj.get("status") or {}).get("podIP") in by_ip}


@pytest.fixture()
def loopback_allowed(monkeypatch):
    monkeypatch.setenv("RAGTUNE_S3_ALLOW_LOOPBACK", "true")


def test_failing_canary_requests_seen_through_prometheus_roll_back(pods, loopback_allowed):  # noqa: F811
    port, p = pods
    kube = FakeKube()
    prom = FakePrometheus(pod_texts(kube, p))
    try:
        analysed_rollout(kube, port, prometheus={"address": prom.address})
        p["canary"].serve(10, fail=20)
        p["stable"].serve(300)
        kube.clock += 120
        s = tick(kube)
    finally:
        prom.close()
    assert weights(kube) == {"chat-tgi": 100}
    assert "canary successRate 0.3333 < minSuccessRate 0.99" in s.candidate.traffic.aborting
    m = s.candidate.traffic.measurements[-1]
    assert (m.canary.requests, m.stable.requests) == (30, 300)
    assert prom.queries and all('namespace="ns"' in q and "tgi_request_count" in q for q in prom.queries)


def test_a_healthy_canary_through_prometheus_passes_its_step(pods, loopback_allowed):  # noqa: F811
    port, p = pods
    kube = FakeKube()
    prom = FakePrometheus(pod_texts(kube, p))
    try:
        analysed_rollout(kube, port, prometheus={"address": prom.address})
        p["canary"].serve(30)
        p["stable"].serve(270)
        kube.clock += 120
        s = tick(kube)
    finally:
        prom.close()
    assert s.candidate.traffic.measurements[-1].phase == "Successful" and weights(kube)["chat-tgi-canary"] == 50
    assert prom.queries, "the figures came from Prometheus, not from scraping the pods"


def test_a_failed_query_measures_nothing_and_says_why(pods, loopback_allowed):  # noqa: F811
    port, p = pods
    kube = FakeKube()
    prom = FakePrometheus(pod_texts(kube, p), status=503)
    try:
        analysed_rollout(kube, port, prometheus={"address": prom.address})
        p["canary"].serve(30)
        kube.clock += 120
        s = tick(kube)
    finally:
        prom.close()
    assert s.candidate.traffic.measurements[-1].phase == "Inconclusive"
    assert weights(kube)["chat-tgi-canary"] == 10  # held, not passed


def test_the_query_selects_the_pods_and_series_of_the_backend():
    source = PrometheusSource(address="http://prometheus.monitoring:9090", pod_label="kubernetes_pod")
    q = analysis.promql(source, "team-a", ["chat-tgi-7d9f", "chat.x-1"], "vllm")
    assert q.startswith('{__name__=~"vllm:e2e_request_latency_seconds_bucket|')
    assert "http_requests_total" in q and 'namespace="team-a"' in q
    assert 'kubernetes_pod=~"chat-tgi-7d9f|chat\\\\.x-1"' in q


def test_the_address_is_checked_at_admission_and_when_the_operator_connects(monkeypatch):
    with pytest.raises(ValidationError, match="cloud-metadata"):
        AnalysisSpec.model_validate({"prometheus": {"address": "http://169.254.169.254"}})
    monkeypatch.setenv("RAGTUNE_S3_ALLOW_LOOPBACK", "false")
    source = PrometheusSource(address="http://localhost:9")  # admitted (a name), refused at connect time
    with pytest.raises(analysis.QueryFailed, match="refused to connect to localhost"):
        analysis.query_prometheus(source, "ns", {"canary/p": "p"}, "tgi")
