"""The weighted canary through a real Gateway API implementation: Traefik (the local platform's
opt-in `gateway` part) in front of the TGI stand-in's stable and canary pods, the operator as a
`kopf run` process, and a bounded client load on loopback through the Gateway during the steps.

What it shows: the canary's measured share of the requests is within 5 points of each step's
weight over at least 1,000 requests, no request fails (steps, promotion, the canary's removal),
the rollout ends promoted, and an operator restart in the middle of a step resumes it with the
same weight and the same pause (nothing rewritten, the step ends when it would have). And, with
`canary.analysis`, that a candidate whose server fails its requests is rolled back on the step's
live metrics with no failed request on the stable path, and that `autoRollback: false` pauses at
weight 0 until a decision is declared in an annotation.
"""

from __future__ import annotations

import http.client
import threading
import time
from typing import Any

import pytest

from ragtune_local.gateway import GATEWAY_NAME, GATEWAY_NAMESPACE
from ragtune_local.testdoubles.tgi_standin.server import ADAPTERS_HEADER

from .test_integration import Operator, ad_body, kube, store, succeeded_finetunejob, tiny  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.platform]

PAUSE_SECONDS = 35
MIN_REQUESTS = 1000
CLIENTS = 4


@pytest.fixture(scope="module")
def gateway(platform) -> int:
    """The Gateway's HTTP port on 127.0.0.1 (Traefik, started once for the test session)."""
    if platform.local is None:
        pytest.skip("the Traefik gateway is a part of the local platform (RAGTUNE_TEST_KUBECONFIG is set)")
    from ragtune_local.testing import _to_stderr

    return platform.local.start_gateway(log=_to_stderr).ports["gateway"]


@pytest.fixture(scope="module")
def prometheus(platform) -> str:
    """The query address of the local platform's Prometheus (scraping ragtune's server pods)."""
    if platform.local is None:
        pytest.skip("the Prometheus part is a part of the local platform (RAGTUNE_TEST_KUBECONFIG is set)")
    from ragtune_local.testing import _to_stderr

    return f"http://127.0.0.1:{platform.local.start_optional('prometheus', 120, log=_to_stderr).ports['prometheus']}"


@pytest.fixture(scope="module")
def operator(platform, tmp_path_factory):
    platform.install_crds()
    op = Operator(platform.kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    yield op
    op.stop()


class Load:
    """CLIENTS keep-alive clients sending `GET /health` through the Gateway with the route's host."""

    def __init__(self, port: int, host: str):
        self.port, self.host = port, host
        self.results: list[tuple[float, float, str]] = []
        """(sent, answered, adapter set that answered) per successful request."""
        self.failures: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CLIENTS)]

    def get(self) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", "/health", headers={"Host": self.host})
            resp = conn.getresponse()
            resp.read()
            return resp.status, resp.getheader(ADAPTERS_HEADER) or ""
        finally:
            conn.close()

    def _run(self) -> None:
        conn = None
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", "/health", headers={"Host": self.host})
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    self.results.append((sent, time.monotonic(), resp.getheader(ADAPTERS_HEADER) or ""))
                else:
                    self.failures.append((sent, f"HTTP {resp.status}"))
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append((sent, repr(exc)))
                if conn is not None:
                    conn.close()
                conn = None

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)


class StatusLog:
    """Polls the AdapterDeployment: (monotonic time, status) every 0.2 s."""

    def __init__(self, client, namespace: str):
        self.kube, self.namespace = client, namespace
        self.seen: list[tuple[float, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            body = self.kube.get("AdapterDeployment", self.namespace, "chat") or {}
            self.seen.append((time.monotonic(), body.get("status") or {}))
            time.sleep(0.2)

    def traffic(self, status: dict[str, Any]) -> dict[str, Any]:
        return (status.get("candidate") or {}).get("traffic") or {}

    def first(self, pred, after: float = 0.0) -> float:
        return next(t for t, s in self.seen if t >= after and pred(s))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def first_promotion(client, namespace: str) -> None:
    """The first rollout (nothing to split yet: straight to the stable server) is done."""
    wait_until("the first promotion", lambda: (client.get("AdapterDeployment", namespace, "chat").get("status")
                                               or {}).get("phase") == "Ready", 240)


def wait_until(what: str, check, timeout: float):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def test_weights_are_honoured_through_traefik_and_survive_an_operator_restart(
        platform, namespace, tiny, operator, kube, store, gateway):  # noqa: F811
    host = f"{namespace}.gateway.test"
    good, good2 = store("good", tiny["good"]), store("good2", tiny["good2"])
    strategy = {"type": "Canary", "canary": {
        "gatewayRef": {"name": GATEWAY_NAME, "namespace": GATEWAY_NAMESPACE}, "hostnames": [host],
        "steps": [{"weight": 10, "pause": f"{PAUSE_SECONDS}s"}, {"weight": 50, "pause": f"{PAUSE_SECONDS}s"}]}}
    body = ad_body(platform, namespace, tiny, [{"name": "a", **good}], store, strategy=strategy,
                   gates={"online": {"enabled": False}})
    platform.apply(body)
    # First rollout: nothing to split, straight to the stable server; then the route serves it.
    first_promotion(kube, namespace)
    load = Load(gateway, host)
    seen = []
    try:
        wait_until("the stable server through the Gateway", lambda: seen.append(load.get()) or seen[-1] == (200, "a"), 60)
    except AssertionError:
        route = kube.get("HTTPRoute", namespace, "chat-route")
        slices = platform.kubectl("-n", namespace, "get", "endpointslices,pods", "-o", "yaml")
        raise AssertionError(f"gateway answered {seen[-3:]}; route: {route.get('status')}\n{slices}") from None

    log = StatusLog(kube, namespace)
    load.start()
    log.start()
    try:
        body["spec"]["adapters"] = [{"name": "a", **good}, {"name": "b", **good2}]
        platform.apply(body)
        tr = log.traffic
        accepted_1 = wait_until("step 2 accepted", lambda: any(
            tr(s).get("step") == 1 and tr(s).get("stepStartedAt") for _, s in log.seen), 300)
        assert accepted_1
        t_accepted = log.first(lambda s: tr(s).get("step") == 1 and tr(s).get("stepStartedAt"))
        before = tr(log.seen[-1][1])
        # Restart the operator in the middle of step 2.
        time.sleep(max(0.0, t_accepted + 8 - time.monotonic()))
        operator.stop()
        time.sleep(4)
        operator.start()
        wait_until("the promotion", lambda: (log.seen[-1][1].get("phase") == "Ready"
                                             and log.seen[-1][1].get("candidate") is None), 300)
    finally:
        log.stop()
        load.stop()

    assert load.failures == [], f"{len(load.failures)} failed requests, first: {load.failures[:5]}"
    final = log.seen[-1][1]
    assert final["history"][0]["outcome"] == "Promoted"
    assert [a["name"] for a in final["serving"]] == ["a", "b"]

    # The restart resumed step 2: same weight, same start, no weight written twice, and it ended
    # when its pause ran out counted from the Gateway's acceptance (not restarted after the restart).
    during = [tr(s) for _, s in log.seen if tr(s).get("step") == 1 and tr(s).get("stepStartedAt")]
    assert {d["stepStartedAt"] for d in during} == {before["stepStartedAt"]}
    assert {d["weight"] for d in during} == {50}
    changes = max((tr(s).get("changes") or [] for _, s in log.seen), key=len)
    assert [(c["step"], c["weight"]) for c in changes] == [(0, 10), (1, 50), (2, 100), (-1, 0)]
    t_step3 = log.first(lambda s: tr(s).get("step") == 2)
    assert PAUSE_SECONDS - 2 <= t_step3 - t_accepted <= PAUSE_SECONDS + 4, t_step3 - t_accepted

    # The canary's share per step, over the requests sent and answered while the step held.
    for step, weight in ((0, 10), (1, 50)):
        start = log.first(lambda s, step=step: tr(s).get("step") == step and tr(s).get("stepStartedAt")) + 0.5
        # the next weight reaches the route just before the status says so
        end = log.first(lambda s, step=step: (tr(s).get("step") or 0) > step or s.get("candidate") is None,
                        after=start) - 1.0
        inside = [who for sent, done, who in load.results if start <= sent and done <= end]
        share = 100 * sum(who == "a,b" for who in inside) / max(len(inside), 1)
        print(f"step {step + 1}: weight {weight}%, {len(inside)} requests, canary share {share:.1f}%")
        assert len(inside) >= MIN_REQUESTS, f"step {step + 1}: only {len(inside)} requests in {end - start:.1f}s"
        assert abs(share - weight) <= 5, f"step {step + 1}: canary share {share:.1f}% for weight {weight}%"
        assert set(inside) <= {"a", "a,b"}


class GenerateLoad(Load):
    """CLIENTS keep-alive clients sending one-token `POST /generate` through the Gateway: the
    requests the servers' metrics count. (sent, answered, status, adapter set that answered)."""

    BODY = b'{"inputs": "Hello", "parameters": {"max_new_tokens": 1}}'

    def __init__(self, port: int, host: str):
        super().__init__(port, host)
        self.answers: list[tuple[float, float, int, str]] = []

    def reaching_stable(self) -> "GenerateLoad":
        """Once the Gateway routes the host to the stable server (the route follows the first promotion)."""
        wait_until("the stable server through the Gateway", lambda: self.get()[0] == 200, 60)
        return self

    def _run(self) -> None:
        conn = None
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                conn.request("POST", "/generate", body=self.BODY,
                             headers={"Host": self.host, "Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                self.answers.append((sent, time.monotonic(), resp.status, resp.getheader(ADAPTERS_HEADER) or ""))
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append((sent, repr(exc)))
                if conn is not None:
                    conn.close()
                conn = None


def test_a_canary_whose_server_fails_requests_is_rolled_back_by_the_analysis_with_stable_untouched(
        platform, namespace, tiny, operator, kube, store, gateway):  # noqa: F811
    """Item 4 (first half) on live traffic: the candidate's server fails every generation
    (the stand-in's fault injection, while adapter `b` is loaded); the step's analysis on the pods'
    `tgi_request_*` metrics fails, the canary's weight goes to 0, the canary is removed, the rollout
    ends RolledBack naming the metric and its value, and no request answered by stable failed."""
    host = f"{namespace}.gateway.test"
    good, good2 = store("good", tiny["good"]), store("good2", tiny["good2"])
    strategy = {"type": "Canary", "canary": {
        "gatewayRef": {"name": GATEWAY_NAME, "namespace": GATEWAY_NAMESPACE}, "hostnames": [host],
        "steps": [{"weight": 20, "pause": "20s"}, {"weight": 50, "pause": "20s"}],
        "analysis": {"minRequests": 10, "minSuccessRate": 0.95}}}
    body = ad_body(platform, namespace, tiny, [{"name": "a", **good}], store, strategy=strategy,
                   gates={"online": {"enabled": False}}, server={"env": {"STANDIN_FAIL_WITH_ADAPTER": "b"}})
    platform.apply(body)
    first_promotion(kube, namespace)
    load = GenerateLoad(gateway, host).reaching_stable()
    log = StatusLog(kube, namespace)
    load.start()
    log.start()
    try:
        body["spec"]["adapters"] = [{"name": "a", **good}, {"name": "b", **good2}]
        platform.apply(body)
        wait_until("the rollback", lambda: log.seen and log.seen[-1][1].get("phase") == "RolledBack", 400)
        time.sleep(2)  # requests still in flight when the canary went
    finally:
        log.stop()
        load.stop()

    final = log.seen[-1][1]
    record = final["history"][0]
    assert record["outcome"] == "RolledBack" and "AnalysisFailed" in record["reason"]
    assert "canary successRate 0.0000 < minSuccessRate 0.95" in record["reason"], record["reason"]
    assert [a["name"] for a in final["serving"]] == ["a"] and final.get("candidate") is None
    assert kube.get("Deployment", namespace, "chat-tgi-canary") is None
    assert traffic_weights(kube, namespace) == {"chat-tgi": 100}

    # The stable path: every request it answered succeeded; nothing failed below the servers.
    assert load.failures == [], f"{len(load.failures)} requests failed in transport: {load.failures[:5]}"
    stable = [a for a in load.answers if a[3] == "a"]
    canary = [a for a in load.answers if a[3] == "a,b"]
    assert stable and all(status == 200 for _, _, status, _ in stable), \
        [a for a in stable if a[2] != 200][:5]
    assert {a[3] for a in load.answers} <= {"a", "a,b"}, "answers from neither server (the gateway's own errors)"
    assert canary and all(status == 424 for _, _, status, _ in canary)

    # Every measurement in status and an Event; the failure to weight 0, from the status log.
    seen_traffic = [((s.get("candidate") or {}).get("traffic") or {}) for _, s in log.seen]
    measured = max((t.get("measurements") or [] for t in seen_traffic), key=len)
    assert measured[-1]["phase"] == "Failed" and measured[-1]["canary"]["requests"] >= 10
    assert measured[-1]["stable"]["successRate"] == 1.0
    t_failed = log.first(lambda s: ((s.get("candidate") or {}).get("traffic") or {}).get("aborting")
                         or s.get("phase") == "RolledBack")
    last_canary = max(done for _, done, _, _ in canary)
    print(f"analysis failure -> canary weight 0: last canary answer {last_canary - t_failed:+.2f}s after the "
          f"failure was first seen in status; {len(canary)} canary / {len(stable)} stable answers")
    assert last_canary - t_failed <= 5.0
    events = platform.kubectl("-n", namespace, "get", "events", "-o", "jsonpath={.items[*].reason}").split()
    assert "AnalysisFailed" in events and "TrafficShifted" in events


def test_a_set_that_fails_its_bake_after_promotion_is_replaced_by_the_previous_set_by_digest(
        platform, namespace, tiny, operator, kube, store, gateway):  # noqa: F811
    """Item 4 (second half), rollback also after promotion: the candidate passes its analysed
    traffic step and is promoted; then the new stable server goes bad (the stand-in fails every
    generation while a marker file exists) during `strategy.bake`: the bake's analysis fails and the
    previous set is restored onto the stable Deployment by digest, ending RolledBack/BakeFailed."""
    import os
    import tempfile

    from ragtune.adapterdeployment import render
    from ragtune.api.adapterdeployment import ResolvedAdapter

    host = f"{namespace}.gateway.test"
    marker_dir = tempfile.mkdtemp(prefix="ragtune-bake-")
    os.chmod(marker_dir, 0o755)  # the server pods run as another user
    marker = os.path.join(marker_dir, "fail")
    good, good2 = store("good", tiny["good"]), store("good2", tiny["good2"])
    strategy = {"type": "Canary", "bake": "5m", "canary": {
        "gatewayRef": {"name": GATEWAY_NAME, "namespace": GATEWAY_NAMESPACE}, "hostnames": [host],
        "steps": [{"weight": 50, "pause": "15s"}],
        # judged on failures only: on shared cores a just-rolled server's latency is no evidence
        "analysis": {"minRequests": 5, "minSuccessRate": 0.95, "maxP95LatencyRatio": 1000,
                     "minTokensPerSecondRatio": 0}}}
    body = ad_body(platform, namespace, tiny, [{"name": "a", **good}], store, strategy=strategy,
                   gates={"online": {"enabled": False}}, server={"env": {"STANDIN_FAIL_WHILE_FILE": marker}})
    platform.apply(body)
    first_promotion(kube, namespace)
    first = kube.get("AdapterDeployment", namespace, "chat")["status"]["serving"]
    load = GenerateLoad(gateway, host).reaching_stable()
    load.start()
    try:
        body["spec"]["adapters"] = [{"name": "a", **good}, {"name": "b", **good2}]
        platform.apply(body)
        baking = wait_until("the promotion and its bake", lambda: (lambda s: s.get("bake") and s)(
            kube.get("AdapterDeployment", namespace, "chat").get("status") or {}), 400)
        assert [a["name"] for a in baking["serving"]] == ["a", "b"] and baking["history"][0]["outcome"] == "Promoted"
        assert [a["sha256"] for a in baking["bake"]["previous"]] == [good["sha256"]]
        assert baking["bake"]["reference"]["requests"] >= 5  # the previous stable's figures at the step
        open(marker, "w").close()  # the new stable server goes bad
        final = wait_until("the bake's rollback", lambda: (lambda s: s.get("phase") == "RolledBack" and s)(
            kube.get("AdapterDeployment", namespace, "chat").get("status") or {}), 240)
    finally:
        if os.path.exists(marker):
            os.unlink(marker)
        load.stop()
    record = final["history"][0]
    assert record["outcome"] == "RolledBack" and record["reason"].startswith("BakeFailed: new stable successRate")
    assert [(a["name"], a["sha256"]) for a in final["serving"]] == [(a["name"], a["sha256"]) for a in first]
    assert final.get("bake") is None and final["history"][1]["outcome"] == "Promoted"
    template = kube.get("Deployment", namespace, "chat-tgi")["spec"]["template"]
    previous = [ResolvedAdapter.model_validate(a) for a in first]
    assert template["metadata"]["annotations"][render.ANNOTATION_DIGEST] == render.adapter_set_digest(previous)
    wait_until("the restored set answering through the Gateway",
               lambda: load.get() == (200, "a"), 240)
    events = platform.kubectl("-n", namespace, "get", "events", "-o", "jsonpath={.items[*].reason}").split()
    assert "BakeStarted" in events and "BakeFailed" in events


def test_the_analysis_reads_the_servers_counters_from_a_real_prometheus(
        platform, namespace, tiny, operator, kube, store, gateway, prometheus):  # noqa: F811
    """`canary.analysis.prometheus`: the same failing candidate as above, judged on the counters a
    real Prometheus scraped from the pods (service discovery through the API server), queried by the
    operator: rolled back naming the metric, stable untouched."""
    import json as json_
    import urllib.parse
    import urllib.request

    host = f"{namespace}.gateway.test"
    good, good2 = store("good", tiny["good"]), store("good2", tiny["good2"])
    strategy = {"type": "Canary", "canary": {
        "gatewayRef": {"name": GATEWAY_NAME, "namespace": GATEWAY_NAMESPACE}, "hostnames": [host],
        "steps": [{"weight": 50, "pause": "20s"}],
        "analysis": {"minRequests": 10, "minSuccessRate": 0.95, "prometheus": {"address": prometheus}}}}
    body = ad_body(platform, namespace, tiny, [{"name": "a", **good}], store, strategy=strategy,
                   gates={"online": {"enabled": False}}, server={"env": {"STANDIN_FAIL_WITH_ADAPTER": "b"}})
    platform.apply(body)
    first_promotion(kube, namespace)
    load = GenerateLoad(gateway, host).reaching_stable()
    load.start()
    try:
        body["spec"]["adapters"] = [{"name": "a", **good}, {"name": "b", **good2}]
        platform.apply(body)
        final = wait_until("the rollback", lambda: (lambda s: s.get("phase") == "RolledBack" and s)(
            kube.get("AdapterDeployment", namespace, "chat").get("status") or {}), 400)
    finally:
        load.stop()
    record = final["history"][0]
    assert "canary successRate 0.0000 < minSuccessRate 0.95" in record["reason"], record["reason"]
    assert [a["name"] for a in final["serving"]] == ["a"]
    assert traffic_weights(kube, namespace) == {"chat-tgi": 100}
    # What the operator read is what Prometheus holds: the servers' series, by namespace and pod.
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": f'tgi_request_count{{namespace="{namespace}"}}'})
    with urllib.request.urlopen(url, timeout=10) as resp:
        series = json_.loads(resp.read())["data"]["result"]
    assert {s["metric"]["pod"].startswith("chat-tgi-") for s in series} == {True}, series


def test_retrained_runs_are_followed_worse_quality_never_gets_traffic_and_a_good_one_is_promoted(
        platform, namespace, tiny, operator, kube, store, gateway):  # noqa: F811
    """Items 5 and 3 on live traffic: an adapter with `follow: LatestSucceeded`; its FineTuneJob is
    retrained twice while clients keep sending through the Gateway. The first new run is worse (its
    answers equal the base model's): the online quality gate against the canary rolls it back before
    the first traffic step, so no user request reaches it. The second is good: it becomes the next
    candidate by itself, takes its traffic step and is promoted. No request fails."""
    host = f"{namespace}.gateway.test"

    def run(name: str, adapter) -> dict:
        return store(name, adapter)

    succeeded_finetunejob(platform, kube, namespace, store, "rag", run("v1", tiny["good"]))
    strategy = {"type": "Canary", "canary": {
        "gatewayRef": {"name": GATEWAY_NAME, "namespace": GATEWAY_NAMESPACE}, "hostnames": [host],
        "steps": [{"weight": 50, "pause": "10s"}]}}
    body = ad_body(platform, namespace, tiny, [{"name": "support", "fineTuneJobRef": {"name": "rag"},
                                                "follow": "LatestSucceeded"}], store, strategy=strategy)
    platform.apply(body)
    first_promotion(kube, namespace)
    load = Load(gateway, host)
    wait_until("the stable server through the Gateway", lambda: load.get() == (200, "support"), 60)
    log = StatusLog(kube, namespace)
    load.start()
    log.start()
    try:
        v2 = run("v2", tiny["noop"])
        succeeded_finetunejob(platform, kube, namespace, store, "rag", v2, learning_rate=1e-4)
        wait_until("the worse run's rollback", lambda: len(log.seen[-1][1].get("history") or []) == 2
                   and not log.seen[-1][1].get("candidate"), 300)
        v3 = run("v3", tiny["good2"])
        succeeded_finetunejob(platform, kube, namespace, store, "rag", v3, learning_rate=5e-5)
        wait_until("the good run's promotion", lambda: len(log.seen[-1][1].get("history") or []) == 3
                   and not log.seen[-1][1].get("candidate"), 400)
    finally:
        log.stop()
        load.stop()
    final = log.seen[-1][1]
    worse, good = final["history"][1], final["history"][0]
    assert worse["outcome"] == "RolledBack" and worse["reason"].startswith("NoAdapterEffect") and \
        worse["followed"] == ["support"], worse
    assert good["outcome"] == "Promoted" and good["followed"] == ["support"], good
    assert [a["sha256"] for a in final["serving"]] == [v3["sha256"]] and final["phase"] == "Ready"
    assert kube.get("AdapterDeployment", namespace, "chat")["metadata"]["generation"] == 1  # no spec change
    def weights_written(sha: str) -> list[list[tuple[int, int]]]:
        return [[(c["step"], c["weight"]) for c in (s["candidate"].get("traffic") or {}).get("changes") or []]
                for _, s in log.seen if s.get("candidate") and s["candidate"]["adapters"][0]["sha256"] == sha]
    assert weights_written(v2["sha256"]) and not any(weights_written(v2["sha256"]))  # the worse run: no traffic
    assert max(weights_written(v3["sha256"]), key=len) == [(0, 50), (1, 100), (-1, 0)]
    assert load.failures == [], f"{len(load.failures)} failed requests, first: {load.failures[:5]}"
    assert len(load.results) > 100


def traffic_weights(client, namespace: str) -> dict[str, int]:
    from ragtune.adapterdeployment import traffic

    return traffic.live_weights(client.get("HTTPRoute", namespace, "chat-route"))


def test_auto_rollback_false_pauses_at_weight_0_until_the_declared_decision(
        platform, namespace, tiny, operator, kube, store, gateway):  # noqa: F811
    """`strategy.autoRollback: false`: the failed analysis takes the canary out of the route but
    keeps it; `kubectl annotate ... ragtune.dev/rollout-decision='resume <token>'` measures the
    step again (it fails again: a new token), `rollback <new token>` ends RolledBack."""
    host = f"{namespace}.gateway.test"
    good, good2 = store("good", tiny["good"]), store("good2", tiny["good2"])
    strategy = {"type": "Canary", "autoRollback": False, "canary": {
        "gatewayRef": {"name": GATEWAY_NAME, "namespace": GATEWAY_NAMESPACE}, "hostnames": [host],
        "steps": [{"weight": 20, "pause": "20s"}], "analysis": {"minRequests": 10}}}
    body = ad_body(platform, namespace, tiny, [{"name": "a", **good}], store, strategy=strategy,
                   gates={"online": {"enabled": False}}, server={"env": {"STANDIN_FAIL_WITH_ADAPTER": "b"}})
    platform.apply(body)
    first_promotion(kube, namespace)
    load = GenerateLoad(gateway, host).reaching_stable()

    def awaiting(previous=None):
        tr = ((kube.get("AdapterDeployment", namespace, "chat").get("status") or {}).get("candidate") or {}) \
            .get("traffic") or {}
        token = tr.get("awaitingDecision")
        return token if token and token != previous else None

    load.start()
    try:
        body["spec"]["adapters"] = [{"name": "a", **good}, {"name": "b", **good2}]
        platform.apply(body)
        first = wait_until("the pause after the failed analysis", awaiting, 300)
        time.sleep(6)  # paused: no rollback, the canary kept, out of the route
        status = kube.get("AdapterDeployment", namespace, "chat")["status"]
        assert status["phase"] == "RollingOut" and f"'resume {first}'" in status["message"]
        assert kube.get("Deployment", namespace, "chat-tgi-canary") is not None
        assert traffic_weights(kube, namespace) == {"chat-tgi": 100}
        platform.kubectl("-n", namespace, "annotate", "--overwrite", "adapterdeployment/chat",
                         f"ragtune.dev/rollout-decision=resume {first}")
        second = wait_until("the second failure", lambda: awaiting(first), 120)
        platform.kubectl("-n", namespace, "annotate", "--overwrite", "adapterdeployment/chat",
                         f"ragtune.dev/rollout-decision=rollback {second}")
        wait_until("the rollback", lambda: (kube.get("AdapterDeployment", namespace, "chat").get("status")
                                            or {}).get("phase") == "RolledBack", 60)
        time.sleep(2)
    finally:
        load.stop()
    final = kube.get("AdapterDeployment", namespace, "chat")["status"]
    assert f"rolled back on the decision {second}" in final["history"][0]["reason"]
    assert kube.get("Deployment", namespace, "chat-tgi-canary") is None
    assert load.failures == [] and all(status == 200 for _, _, status, who in load.answers if who == "a")
    canary = [a for a in load.answers if a[3] == "a,b"]
    assert canary and all(status == 424 for _, _, status, _ in canary)
