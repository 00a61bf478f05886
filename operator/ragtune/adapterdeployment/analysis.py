"""Analysis of a traffic step on live signals (`spec.strategy.canary.analysis`).

At the start of a step's window the rollout scrapes `/metrics` of every ready pod of the canary
and of the stable server (the serving port: TGI serves its metrics there; vLLM's sidecar proxy
forwards `/metrics` to vLLM) and keeps the counters in `status.candidate.traffic.baseline`. When
the step's pause is over it scrapes again (and at every look during the pause, where only a Failed
verdict counts: traffic.py); the differences are the step's requests:

- requests and successes: TGI `tgi_request_count` / `tgi_request_success`; vLLM
  `http_requests_total` on its completion endpoints, successes the `2xx` ones;
- p95 latency: `histogram_quantile(0.95)` of the request-duration histogram's bucket increases
  (TGI `tgi_request_duration`, vLLM `vllm:e2e_request_latency_seconds`), interpolated inside
  the bucket as Prometheus does;
- tokens/s: generated tokens over request seconds (TGI `tgi_request_generated_tokens_sum` /
  `tgi_request_duration_sum`, vLLM `vllm:generation_tokens_total` /
  `vllm:e2e_request_latency_seconds_sum`): the speed a client sees, independent of the canary's
  share of the traffic.

A counter lower than its baseline means the pod restarted: it counts from 0 (Prometheus'
`increase()`); a pod missing from the baseline (new) counts from 0 too. The verdict: fewer than
`minRequests` canary requests is Inconclusive; a success rate below `minSuccessRate`, a p95
above `maxP95LatencySeconds` or above `maxP95LatencyRatio` x stable's, or tokens/s below
`minTokensPerSecondRatio` x stable's is Failed (the ratios only when stable itself saw
`minRequests`); else Successful.
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse
import urllib.request
from typing import Any, Iterable, Optional

from ragtune.api.adapterdeployment import AnalysisSpec, PrometheusSource, ServerMeasurement
from ragtune.api.pods import SERVER_METRICS_PATH

SCRAPE_TIMEOUT = 3.0
VLLM_COMPLETION_HANDLERS = ("/v1/completions", "/v1/chat/completions")
SERIES = {
    "tgi": {"tgi_request_count": "requests", "tgi_request_success": "success",
            "tgi_request_duration_bucket": "le", "tgi_request_duration_sum": "seconds",
            "tgi_request_generated_tokens_sum": "tokens"},
    "vllm": {"vllm:e2e_request_latency_seconds_bucket": "le", "vllm:e2e_request_latency_seconds_sum": "seconds",
             "vllm:generation_tokens_total": "tokens"},
}
"""Per backend: the sample each counter comes from (`le`: the duration histogram's buckets). vLLM's
requests and successes are `http_requests_total` on its completion handlers (`counters`)."""
_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def read_metrics(ip: str, port: int) -> Optional[str]:
    """A pod's Prometheus text (`GET /metrics`), None when it does not answer."""
    host = f"[{ip}]" if ":" in ip else ip
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{SERVER_METRICS_PATH}", timeout=SCRAPE_TIMEOUT) as resp:
            return resp.read(4 << 20).decode(errors="replace")
    except (OSError, ValueError):
        return None


def parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample of the Prometheus text format. (Not
    prometheus_client's parser: it renames a counter without the `_total` suffix, which is how TGI
    exposes `tgi_request_count`, to `tgi_request_count_total`, and it rejects a whole scrape for
    one malformed line, where this skips the line.)"""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), value))
    return out


def counters(text: str, backend: str) -> dict[str, float]:
    """The counters one measurement needs from one pod's Prometheus text (`counters_of`)."""
    return counters_of(parse(text), backend)


def counters_of(samples: Iterable[tuple[str, dict[str, str], float]], backend: str) -> dict[str, float]:
    """The counters one measurement needs from one pod's samples: `requests`, `success`,
    `seconds`, `tokens` and `le:<bound>` (cumulative duration buckets, successful requests)."""
    out: dict[str, float] = {"requests": 0.0, "success": 0.0, "seconds": 0.0, "tokens": 0.0}

    def add(key: str, value: float) -> None:
        out[key] = out.get(key, 0.0) + value

    series = SERIES["vllm" if backend == "vllm" else "tgi"]
    for name, labels, value in samples:
        key = series.get(name)
        if key == "le":
            add(f"le:{labels.get('le')}", value)
        elif key is not None:
            add(key, value)
        elif backend == "vllm" and name == "http_requests_total" and labels.get("handler") in VLLM_COMPLETION_HANDLERS:
            add("requests", value)
            if labels.get("status", "").startswith("2"):
                add("success", value)
    return out


def increase(now: dict[str, float], before: Optional[dict[str, float]]) -> dict[str, float]:
    """Per-counter increase; a pod whose request counter went down restarted: all from 0."""
    before = before or {}
    if now.get("requests", 0.0) < before.get("requests", 0.0):
        before = {}
    return {k: max(v - before.get(k, 0.0), 0.0) for k, v in now.items()}


def quantile(q: float, buckets: dict[float, float]) -> Optional[float]:
    """`histogram_quantile(q)` over cumulative bucket counts {upper bound: count}."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower, below = 0.0, 0.0
    for b in bounds:
        count = buckets[b]
        if count >= rank:
            if math.isinf(b):
                return lower  # in the +Inf bucket: the highest finite bound, as Prometheus
            if count == below:
                return b
            return lower + (b - lower) * (rank - below) / (count - below)
        lower, below = b, count
    return bounds[-1]


def measure(deltas: list[dict[str, float]]) -> ServerMeasurement:
    """One server's figures from its pods' counter increases."""
    total: dict[str, float] = {}
    for d in deltas:
        for k, v in d.items():
            total[k] = total.get(k, 0.0) + v
    requests = int(round(total.get("requests", 0.0)))
    m = ServerMeasurement(pods=len(deltas), requests=requests)
    if requests:
        m.success_rate = round(min(total.get("success", 0.0) / requests, 1.0), 4)
    buckets = {float(k[3:]): v for k, v in total.items() if k.startswith("le:")}
    p95 = quantile(0.95, buckets)
    m.p95_latency_seconds = None if p95 is None else round(p95, 4)
    if total.get("seconds", 0.0) > 0:
        m.tokens_per_second = round(total.get("tokens", 0.0) / total["seconds"], 2)
    return m


def judge(spec: AnalysisSpec, canary: ServerMeasurement, stable: ServerMeasurement,
          names: tuple[str, str] = ("canary", "stable")) -> tuple[str, str]:
    """(Successful | Failed | Inconclusive, the metric that decided it with its value). `names`:
    what the message calls the judged server and the one it is compared with (the bake judges the
    new stable server against the previous one's recorded figures)."""
    subject, other = names
    if canary.requests < spec.min_requests:
        return "Inconclusive", (f"{subject} requests {canary.requests} < minRequests {spec.min_requests}: "
                                "too few to judge")
    rate = canary.success_rate or 0.0
    if rate < spec.min_success_rate:
        return "Failed", (f"{subject} successRate {rate:.4f} < minSuccessRate {spec.min_success_rate} "
                          f"({canary.requests} requests)")
    p95 = canary.p95_latency_seconds
    if spec.max_p95_latency_seconds is not None and p95 is not None and p95 > spec.max_p95_latency_seconds:
        return "Failed", f"{subject} p95LatencySeconds {p95:.4f} > maxP95LatencySeconds {spec.max_p95_latency_seconds}"
    compared = stable.requests >= spec.min_requests
    if compared and p95 is not None and stable.p95_latency_seconds:
        ratio = p95 / stable.p95_latency_seconds
        if ratio > spec.max_p95_latency_ratio:
            return "Failed", (f"{subject} p95LatencySeconds {p95:.4f} is {ratio:.2f}x {other}'s "
                              f"{stable.p95_latency_seconds:.4f} > maxP95LatencyRatio {spec.max_p95_latency_ratio}")
    if compared and canary.tokens_per_second is not None and stable.tokens_per_second:
        ratio = canary.tokens_per_second / stable.tokens_per_second
        if ratio < spec.min_tokens_per_second_ratio:
            return "Failed", (f"{subject} tokensPerSecond {canary.tokens_per_second} is {ratio:.2f}x {other}'s "
                              f"{stable.tokens_per_second} < minTokensPerSecondRatio "
                              f"{spec.min_tokens_per_second_ratio}")
    note = "" if compared else f"; {other} saw {stable.requests} requests: ratios not judged"
    return "Successful", (f"{subject} successRate {rate:.4f}, p95LatencySeconds {p95}, tokensPerSecond "
                          f"{canary.tokens_per_second} over {canary.requests} requests{note}")


def figures(m: ServerMeasurement) -> str:
    return (f"{m.requests} requests, successRate {m.success_rate}, p95 {m.p95_latency_seconds}s, "
            f"{m.tokens_per_second} tokens/s")


def take(pods: dict[str, tuple[str, int]], backend: str, scrape=read_metrics) -> dict[str, dict[str, float]]:
    """{`<track>/<pod>`: counters} of the pods that answered; `pods` maps keys to (ip, port)."""
    out = {}
    for key, (ip, port) in sorted(pods.items()):
        text = scrape(ip, port)
        if text is not None:
            out[key] = counters(text, backend)
    return out


class QueryFailed(Exception):
    """The Prometheus query gave no usable answer (the measurement cannot be taken)."""


def series_names(backend: str) -> list[str]:
    """The metric names `counters_of` reads for `backend`."""
    return sorted(SERIES["vllm" if backend == "vllm" else "tgi"]) + (["http_requests_total"] if backend == "vllm" else [])


def promql(source: PrometheusSource, namespace: str, pod_names: Iterable[str], backend: str) -> str:
    """One instant-vector selector for every series `counters_of` reads, of the named pods.
    Metric, namespace and pod names are restricted to characters that need no quoting in PromQL
    (`[a-zA-Z0-9_:]`, DNS labels); a regex dot is escaped."""
    pods = "|".join(sorted(p.replace(".", "\\\\.") for p in pod_names))
    return (f'{{__name__=~"{"|".join(series_names(backend))}",{source.namespace_label}="{namespace}",'
            f'{source.pod_label}=~"{pods}"}}')


def query_prometheus(source: PrometheusSource, namespace: str, pods: dict[str, str],
                     backend: str) -> dict[str, dict[str, float]]:
    """{`<track>/<pod>`: counters} of the pods in `pods` (key -> pod name) from one instant query
    to `source` (`/api/v1/query`, through `checked_get`); a pod without series is left out, as a
    pod that does not answer a scrape is. Raises QueryFailed with what went wrong."""
    if not pods:
        return {}
    url = f"{source.address.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode(
        {"query": promql(source, namespace, pods.values(), backend)})
    try:
        body = json.loads(checked_get(url, float(source.timeout_seconds)))
    except (OSError, ValueError) as exc:  # unreachable, or not JSON (QueryFailed passes through)
        raise QueryFailed(f"Prometheus at {source.address}: {type(exc).__name__}: {exc}") from None
    if body.get("status") != "success" or (body.get("data") or {}).get("resultType") != "vector":
        raise QueryFailed(f"Prometheus at {source.address}: {body.get('errorType', 'error')}: "
                          f"{body.get('error', 'not an instant vector')}")
    key_of = {name: key for key, name in pods.items()}
    samples: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for item in body["data"].get("result") or []:
        labels = item.get("metric") or {}
        key = key_of.get(labels.get(source.pod_label, ""))
        try:
            value = float((item.get("value") or [0, "nan"])[1])
        except (TypeError, ValueError, IndexError):
            continue
        if key is not None and not math.isnan(value):
            samples.setdefault(key, []).append((labels.get("__name__", ""), labels, value))
    return {key: counters_of(found, backend) for key, found in samples.items()}


def checked_get(url: str, timeout: float) -> bytes:
    """GET `url` over a connection to an address the policy allows (`ragtune.storage.connect_checked`,
    checked when the connection is made, as for S3); a non-2xx answer is QueryFailed."""
    import http.client
    import ssl

    from ragtune.addresses import AddressPolicy
    from ragtune.storage import AddressForbidden, connect_checked

    parts = urllib.parse.urlsplit(url)
    policy = AddressPolicy.from_env()
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)

    class Checked(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = connect_checked(host, port, timeout, policy)

    class CheckedTLS(http.client.HTTPSConnection):
        def connect(self) -> None:
            sock = connect_checked(host, port, timeout, policy)
            self.sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)

    conn = (CheckedTLS if parts.scheme == "https" else Checked)(host, port, timeout=timeout)
    try:
        conn.request("GET", f"{parts.path}?{parts.query}", headers={"Accept": "application/json"})
        resp = conn.getresponse()
        data = resp.read(8 << 20)
    except AddressForbidden as exc:
        raise QueryFailed(f"Prometheus address refused: {exc}") from None
    finally:
        conn.close()
    if resp.status // 100 != 2:
        raise QueryFailed(f"Prometheus at {parts.scheme}://{parts.netloc}: HTTP {resp.status}: {data[:300]!r}")
    return data


def compare(baseline: dict[str, dict[str, float]], now: dict[str, dict[str, float]]) \
        -> tuple[ServerMeasurement, ServerMeasurement]:
    """(canary, stable) figures between two `take` results."""
    by_track: dict[str, list[dict[str, Any]]] = {"canary": [], "stable": []}
    for key, counts in now.items():
        by_track.setdefault(key.split("/", 1)[0], []).append(increase(counts, baseline.get(key)))
    return measure(by_track["canary"]), measure(by_track["stable"])
