"""Analysis of the traffic steps on live metrics (`strategy.canary.analysis`, analysis.py): the
Prometheus text of the TGI stand-in (TGI's metric names) and of vLLM, the figures and verdicts,
and the rollout against the in-memory API server with real HTTP `/metrics` endpoints on loopback
(the stand-in's own `Metrics`) as the canary's and the stable server's pods."""

from __future__ import annotations

import copy
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ragtune.adapterdeployment import analysis
from ragtune.api.adapterdeployment import AnalysisSpec, ServerMeasurement
from ragtune_local.platform import free_port
from ragtune_local.testdoubles.tgi_standin.server import Metrics

from .fakekube import FakeKube
from .test_rollout import ad, edit, ftj, passed, tick
from .test_traffic import CANARY, accept, weights

VLLM_TEXT = """# HELP http_requests_total Total number of requests by method, status and handler.
# TYPE http_requests_total counter
http_requests_total{handler="/v1/completions",method="POST",status="2xx"} 95.0
http_requests_total{handler="/v1/completions",method="POST",status="5xx"} 5.0
http_requests_total{handler="/v1/models",method="GET",status="2xx"} 7.0
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.5",model_name="m"} 50.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="1.0",model_name="m"} 90.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="m"} 95.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="m"} 95.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="m"} 60.0
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 1200.0
"""


def tgi_text(successes: list[tuple[float, int]], failures: int = 0) -> str:
    m = Metrics()
    for seconds, tokens in successes:
        m.record(seconds, tokens, None)
    for _ in range(failures):
        m.record(0.01, None, "generation")
    return m.text()


def test_tgi_counters_from_the_standins_metrics_under_tgis_names():
    text = tgi_text([(0.1, 10), (0.3, 30)], failures=1)
    names = {name for name, _, _ in analysis.parse(text)}
    assert {"tgi_request_count", "tgi_request_success", "tgi_request_failure", "tgi_request_duration_bucket",
            "tgi_request_duration_sum", "tgi_request_generated_tokens_sum"} <= names
    c = analysis.counters(text, "tgi")
    assert (c["requests"], c["success"], c["tokens"]) == (3, 2, 40) and c["seconds"] == pytest.approx(0.4)
    assert c["le:+Inf"] == 2 and c["le:0.128"] == 1


def test_vllm_counters_count_the_completion_endpoints_and_their_2xx():
    c = analysis.counters(VLLM_TEXT, "vllm")
    assert (c["requests"], c["success"], c["tokens"], c["seconds"]) == (100, 95, 1200, 60)
    m = analysis.measure([c])
    assert m.success_rate == 0.95 and m.tokens_per_second == 20.0
    # rank 0.95 * 95 = 90.25: past the 1.0 bucket, in +Inf: the highest finite bound, as Prometheus
    assert m.p95_latency_seconds == 1.0


def test_quantile_interpolates_inside_the_bucket_like_prometheus():
    assert analysis.quantile(0.5, {0.1: 0, 0.2: 10, 0.4: 20, float("inf"): 20}) == pytest.approx(0.2)
    assert analysis.quantile(0.95, {0.1: 0, 0.2: 10, 0.4: 20, float("inf"): 20}) == pytest.approx(0.38)
    assert analysis.quantile(0.95, {}) is None and analysis.quantile(0.95, {1.0: 0, float("inf"): 0}) is None


def test_a_restarted_pod_counts_from_zero_and_a_new_pod_from_nothing():
    before = {"requests": 100.0, "success": 100.0}
    assert analysis.increase({"requests": 130.0, "success": 120.0}, before) == {"requests": 30.0, "success": 20.0}
    assert analysis.increase({"requests": 7.0, "success": 7.0}, before) == {"requests": 7.0, "success": 7.0}
    assert analysis.increase({"requests": 7.0}, None) == {"requests": 7.0}


def _m(requests, rate, p95, tps) -> ServerMeasurement:
    return ServerMeasurement(pods=1, requests=requests, success_rate=rate, p95_latency_seconds=p95,
                             tokens_per_second=tps)


@pytest.mark.parametrize("canary,stable,phase,words", [
    (_m(5, 1.0, 0.1, 100), _m(50, 1.0, 0.1, 100), "Inconclusive", "canary requests 5 < minRequests 20"),
    (_m(40, 0.9, 0.1, 100), _m(400, 1.0, 0.1, 100), "Failed", "canary successRate 0.9000 < minSuccessRate 0.99"),
    (_m(40, 1.0, 0.5, 100), _m(400, 1.0, 0.1, 100), "Failed", "5.00x stable's 0.1000 > maxP95LatencyRatio 2.0"),
    (_m(40, 1.0, 0.1, 40), _m(400, 1.0, 0.1, 100), "Failed", "tokensPerSecond 40.0 is 0.40x stable's"),
    (_m(40, 1.0, 0.1, 95), _m(400, 1.0, 0.1, 100), "Successful", "over 40 requests"),
    (_m(40, 1.0, 9.0, 1), _m(3, 1.0, 0.1, 100), "Successful", "stable saw 3 requests: ratios not judged"),
])
def test_verdicts_name_the_metric_and_its_value(canary, stable, phase, words):
    got, message = analysis.judge(AnalysisSpec(), canary, stable)
    assert got == phase and words in message, message


def test_absolute_p95_limit():
    got, message = analysis.judge(AnalysisSpec(max_p95_latency_seconds=0.2), _m(40, 1.0, 0.3, 100),
                                  _m(1, 1.0, 0.3, 100))
    assert got == "Failed" and "p95LatencySeconds 0.3000 > maxP95LatencySeconds 0.2" in message


# --- the rollout, with real /metrics endpoints ---------------------------------------------------


class Pod:
    """A `/metrics` endpoint on its own loopback IP, answering what its `Metrics` holds."""

    def __init__(self, ip: str, port: int):
        self.metrics = Metrics()
        metrics = self.metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                data = metrics.text().encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((ip, port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve(self, n: int, fail: int = 0, seconds: float = 0.05, tokens: int = 8) -> None:
        for _ in range(n):
            self.metrics.record(seconds, tokens, None)
        for _ in range(fail):
            self.metrics.record(seconds, None, "generation")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def pods():
    port = free_port()
    made = {track: Pod(ip, port) for track, ip in (("stable", "127.0.0.61"), ("canary", "127.0.0.62"))}
    yield port, made
    for p in made.values():
        p.close()


def running(kube: FakeKube, deployment: str, ip: str) -> None:
    pod = kube.add_pod(deployment)
    pod["status"].update(phase="Running", podIP=ip)


def analysed_rollout(kube: FakeKube, port: int, auto_rollback: bool = True, bake: str | None = None,
                     **analysis_spec):
    """First rollout promoted, then a second one at its first step with the route accepted."""
    strategy = copy.deepcopy(CANARY)
    strategy["canary"]["analysis"] = {"minRequests": 20, **analysis_spec}
    strategy["autoRollback"] = auto_rollback
    if bake:
        strategy["bake"] = bake
    ftj(kube, "ftj1")
    ad(kube, strategy=strategy, gates={"online": {"evalSetUri": "s3://data/eval.jsonl"}},
       server={"gpus": 0, "port": port})
    tick(kube)
    kube.ready("chat-tgi-canary")
    tick(kube)
    kube.finish_job("chat-eval-g1", passed())
    tick(kube)
    kube.ready("chat-tgi")
    tick(kube)
    accept(kube)
    running(kube, "chat-tgi", "127.0.0.61")
    ftj(kube, "ftj2", sha="b")
    edit(kube, adapters=[{"name": "support", "fineTuneJobRef": {"name": "ftj2"}}])
    tick(kube)
    kube.ready("chat-tgi-canary")
    running(kube, "chat-tgi-canary", "127.0.0.62")
    tick(kube)
    kube.finish_job("chat-eval-g2", passed())
    s = tick(kube)
    assert s.candidate.step == "Traffic" and weights(kube)["chat-tgi-canary"] == 10
    accept(kube)
    return tick(kube)  # the window opens: baseline scraped


def test_a_healthy_canary_passes_each_analysed_step_with_every_figure_in_status_and_events(pods):
    port, p = pods
    kube = FakeKube()
    p["stable"].serve(500)  # before the window: not counted
    s = analysed_rollout(kube, port)
    assert set(s.candidate.traffic.baseline) == {k for k in s.candidate.traffic.baseline if "/" in k} and \
        {k.split("/")[0] for k in s.candidate.traffic.baseline} == {"canary", "stable"}
    p["stable"].serve(270)
    p["canary"].serve(30)
    kube.clock += 120
    s = tick(kube)
    m = s.candidate.traffic.measurements[-1]
    assert m.phase == "Successful" and m.step == 0 and m.weight == 10
    assert (m.canary.requests, m.stable.requests) == (30, 270) and m.canary.success_rate == 1.0
    assert m.canary.p95_latency_seconds is not None and m.canary.tokens_per_second == pytest.approx(160.0)
    assert weights(kube)["chat-tgi-canary"] == 50 and s.candidate.traffic.step == 1
    assert any(r == "AnalysisSuccessful" and "step 1/3 at 10%" in msg for _, r, msg in kube.events)


def test_too_few_canary_requests_hold_the_step_instead_of_passing(pods):
    port, p = pods
    kube = FakeKube()
    analysed_rollout(kube, port)
    p["canary"].serve(3)
    p["stable"].serve(100)
    kube.clock += 120
    s = tick(kube)
    assert s.candidate.traffic.step == 0 and weights(kube)["chat-tgi-canary"] == 10
    assert s.candidate.traffic.measurements[-1].phase == "Inconclusive"
    assert "paused: analysis inconclusive" in s.message and "canary requests 3 < minRequests 20" in s.message
    kube.clock += 60
    s = tick(kube)
    assert "paused, measuring again" in s.message and s.candidate.traffic.step == 0
    p["canary"].serve(25)  # measured from the new window: the 3 earlier ones do not count
    kube.clock += 60
    s = tick(kube)
    assert s.candidate.traffic.measurements[-1].canary.requests == 25
    assert s.candidate.traffic.step == 1 and weights(kube)["chat-tgi-canary"] == 50


def test_failing_canary_requests_send_the_weight_to_0_then_remove_the_canary_and_roll_back(pods):
    port, p = pods
    kube = FakeKube()
    analysed_rollout(kube, port)
    stable_before = copy.deepcopy(kube.objects[("Deployment", "ns", "chat-tgi")])
    p["canary"].serve(10, fail=20)
    p["stable"].serve(300)
    kube.clock += 120
    s = tick(kube)
    assert weights(kube) == {"chat-tgi": 100}, "weight 0 in the tick that saw the failure"
    assert s.candidate.traffic.aborting and "canary successRate 0.3333 < minSuccessRate 0.99" in \
        s.candidate.traffic.aborting
    assert kube.get("Deployment", "ns", "chat-tgi-canary") is not None  # until the Gateway took it
    accept(kube)
    tick(kube)
    kube.clock += 3
    s = tick(kube)
    assert s.phase == "RolledBack" and s.candidate is None
    assert s.history[0].outcome == "RolledBack" and "AnalysisFailed" in s.history[0].reason
    assert "successRate 0.3333" in s.history[0].reason
    assert kube.get("Deployment", "ns", "chat-tgi-canary") is None
    assert kube.objects[("Deployment", "ns", "chat-tgi")]["spec"] == stable_before["spec"]
    assert [a.sha256[0] for a in s.serving] == ["a"]
    assert any(r == "AnalysisFailed" for _, r, _m in kube.events)


def test_a_failure_within_failure_limit_measures_the_step_again(pods):
    port, p = pods
    kube = FakeKube()
    analysed_rollout(kube, port, failureLimit=1)
    p["canary"].serve(20, fail=5)
    p["stable"].serve(300)
    kube.clock += 120
    s = tick(kube)
    assert s.candidate.traffic.failed_measurements == 1 and s.candidate.traffic.step == 0
    assert weights(kube)["chat-tgi-canary"] == 10 and not s.candidate.traffic.aborting
    p["canary"].serve(30)
    p["stable"].serve(300)
    kube.clock += 120
    s = tick(kube)
    assert s.candidate.traffic.step == 1 and [m.phase for m in s.candidate.traffic.measurements] == \
        ["Failed", "Successful"]


def test_a_failure_ends_the_step_before_its_pause_is_over_a_success_does_not(pods):
    port, p = pods
    kube = FakeKube()
    analysed_rollout(kube, port)
    p["canary"].serve(25)
    p["stable"].serve(200)
    kube.clock += 10
    s = tick(kube)  # good so far: nothing recorded, the pause goes on
    assert s.candidate.traffic.measurements == [] and "110s left" in s.message
    p["canary"].serve(0, fail=25)
    kube.clock += 5
    s = tick(kube)
    assert weights(kube) == {"chat-tgi": 100}, "a failure seen 15 s into a 120 s step: weight 0 at once"
    m = s.candidate.traffic.measurements[-1]
    assert m.phase == "Failed" and m.canary.requests == 50 and m.canary.success_rate == 0.5


def decide(kube: FakeKube, value: str) -> None:
    """What `kubectl annotate` (or a GitOps sync) does: metadata only, no new generation."""
    meta = kube.objects[("AdapterDeployment", "ns", "chat")]["metadata"]
    meta.setdefault("annotations", {})["ragtune.dev/rollout-decision"] = value


def paused_after_a_failure(kube: FakeKube, port: int, p: dict):
    analysed_rollout(kube, port, auto_rollback=False)
    p["canary"].serve(0, fail=30)
    p["stable"].serve(300)
    kube.clock += 120
    s = tick(kube)
    token = s.candidate.traffic.awaiting_decision
    assert re.fullmatch(r"g2-\d{8}T\d{6}Z", token or ""), token
    assert token and weights(kube) == {"chat-tgi": 100}, "the failing canary gets no traffic while paused"
    accept(kube)
    kube.clock += 60
    s = tick(kube)
    assert s.phase == "RollingOut" and s.candidate is not None, "autoRollback: false waits, it does not roll back"
    assert kube.get("Deployment", "ns", "chat-tgi-canary") is not None
    assert f"'rollback {token}'" in s.message and "successRate 0.0000" in s.message
    return token


def test_auto_rollback_false_pauses_at_weight_0_and_rolls_back_on_the_declared_decision(pods):
    port, p = pods
    kube = FakeKube()
    token = paused_after_a_failure(kube, port, p)
    decide(kube, "rollback g0-m0")  # a decision for another failure: ignored
    assert tick(kube).candidate is not None
    decide(kube, f"rollback {token}")
    tick(kube)
    kube.clock += 3
    s = tick(kube)
    assert s.phase == "RolledBack" and s.candidate is None and kube.get("Deployment", "ns", "chat-tgi-canary") is None
    assert f"rolled back on the decision {token}" in s.history[0].reason
    assert any(r == "DecisionApplied" for _, r, _m in kube.events)


def test_auto_rollback_false_resumes_the_step_on_the_declared_decision(pods):
    port, p = pods
    kube = FakeKube()
    token = paused_after_a_failure(kube, port, p)
    decide(kube, f"resume {token}")
    s = tick(kube)
    assert weights(kube)["chat-tgi-canary"] == 10 and s.candidate.traffic.failed_measurements == 0
    assert not s.candidate.traffic.aborting and not s.candidate.traffic.awaiting_decision
    accept(kube)
    tick(kube)  # the new window opens
    p["canary"].serve(30)
    p["stable"].serve(300)
    kube.clock += 120
    s = tick(kube)
    assert s.candidate.traffic.step == 1 and s.candidate.traffic.measurements[-1].phase == "Successful"
