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

import math
import re
import urllib.request
from typing import Any, Optional

from ragtune.api.adapterdeployment import AnalysisSpec, ServerMeasurement
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
    """The counters one measurement needs from one pod: `requests`, `success`, `seconds`,
    `tokens` and `le:<bound>` (cumulative duration buckets, successful requests)."""
    out: dict[str, float] = {"requests": 0.0, "success": 0.0, "seconds": 0.0, "tokens": 0.0}

    def add(key: str, value: float) -> None:
        out[key] = out.get(key, 0.0) + value

    series = SERIES["vllm" if backend == "vllm" else "tgi"]
    for name, labels, value in parse(text):
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


def compare(baseline: dict[str, dict[str, float]], now: dict[str, dict[str, float]]) \
        -> tuple[ServerMeasurement, ServerMeasurement]:
    """(canary, stable) figures between two `take` results."""
    by_track: dict[str, list[dict[str, Any]]] = {"canary": [], "stable": []}
    for key, counts in now.items():
        by_track.setdefault(key.split("/", 1)[0], []).append(increase(counts, baseline.get(key)))
    return measure(by_track["canary"]), measure(by_track["stable"])
