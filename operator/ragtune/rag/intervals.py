"""Bootstrap confidence intervals for the evaluation metrics and the adapter-minus-base deltas.

With the few dozen held-out items a run evaluates, a metric moves by several points when a
handful of answers change: an interval says how much of a difference is noise. The bootstrap is
*paired*: each draw resamples the item indices once and scores every side (base, adapter) on
those same items, so a delta's interval reflects the per-item pairing. Each item is scored once
with `metrics.score` (`item_values`) and a draw aggregates those values (`aggregate`, equal to
`score` on the drawn set), so every interval is of exactly the metric the gates read and 1,000
draws cost well under a second. Percentile intervals; the draws
come from a seeded generator, so the same evaluation gives the same intervals.

Wire form (report.json `intervals`, and per gate in status): `[low, high]` per metric wire name,
with `refusalRate.<construction>` for the per-construction refusal rates, under `base`, `adapter`
and `delta` (adapter - base).
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from ragtune.api.common import EvalMetrics
from ragtune.api.prompt import DEFAULT_CITATION

from .metrics import _get, parse_citations, score

DEFAULT_DRAWS = 1000
DEFAULT_CONFIDENCE = 0.95


def flat_metrics(metrics: EvalMetrics) -> dict[str, float]:
    """Wire name -> value for every measured number, `refusalRate.<construction>` included."""
    wire = metrics.to_wire()
    out = {k: float(v) for k, v in wire.items() if isinstance(v, (int, float)) and k != "samples"}
    for construction, rate in (wire.get("refusalByConstruction") or {}).items():
        if rate is not None:
            out[f"refusalRate.{construction}"] = float(rate)
    return out


def item_values(items: Sequence[Any], answers: Sequence[str], prompt: Any = None) -> list[dict[str, float]]:
    """Each item's contribution to every metric, from `metrics.score` on that item alone: every
    metric but citation validity is a mean over the items where it is defined, so a resampled set's
    metric is the mean of its items' values; citation validity is a ratio of sums, so each item
    also carries its cited-id count (`_cited`) as the weight."""
    citation = prompt.citation if prompt is not None else DEFAULT_CITATION
    labelled = any(_get(r, "construction") for r in items)
    rows = []
    for record, answer in zip(items, answers):
        values = flat_metrics(score([record], [answer], prompt=prompt))
        values["_cited"] = float(len(parse_citations(answer or "", citation)))
        if labelled and "refusalRate" in values and not any(k.startswith("refusalRate.") for k in values):
            values["refusalRate.userLabelled"] = values["refusalRate"]  # as `score` counts it in a labelled set
        rows.append(values)
    return rows


def aggregate(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """The set's metrics from its items' values (equal to `flat_metrics(score(set))`, rounding aside)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    cited = valid = 0.0
    for row in rows:
        for name, value in row.items():
            if name == "citationValidity":
                cited += row["_cited"]
                valid += value * row["_cited"]
            elif name != "_cited":
                sums[name] = sums.get(name, 0.0) + value
                counts[name] = counts.get(name, 0) + 1
    out = {name: sums[name] / counts[name] for name in sums}
    if cited:
        out["citationValidity"] = valid / cited
    return out


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def bootstrap_intervals(
    items: Sequence[Any],
    predictions: dict[str, Sequence[str]],
    prompt: Any = None,
    *,
    draws: int = DEFAULT_DRAWS,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired bootstrap over items: `predictions` maps a side (`base`, `adapter`) to its answers
    to `items`; `prompt` as for `metrics.score`. Returns `{confidence, draws, <side>: {metric:
    [low, high]}, delta: {...}}`; `delta` (adapter - base) when both sides are given. A metric
    without a value in some draws (e.g. no unanswerable item drawn) is taken over the draws that
    have one."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    sides = list(predictions)
    for side in sides:
        if len(predictions[side]) != len(items):
            raise ValueError(f"{side}: {len(predictions[side])} answers for {len(items)} items")
    per_item = {side: item_values(items, predictions[side], prompt) for side in sides}
    samples: dict[str, dict[str, list[float]]] = {side: {} for side in sides + ["delta"]}
    rng = random.Random(seed)
    n = len(items)
    for _ in range(draws if n else 0):
        idx = [rng.randrange(n) for _ in range(n)]
        values = {side: aggregate([per_item[side][i] for i in idx]) for side in sides}
        for side in sides:
            for name, value in values[side].items():
                samples[side].setdefault(name, []).append(value)
        if "base" in values and "adapter" in values:
            for name in values["adapter"].keys() & values["base"].keys():
                samples["delta"].setdefault(name, []).append(values["adapter"][name] - values["base"][name])
    tail = (1 - confidence) / 2
    out: dict[str, Any] = {"confidence": confidence, "draws": draws}
    for side, per_metric in samples.items():
        if side == "delta" and not per_metric:
            continue
        out[side] = {}
        for name, values in sorted(per_metric.items()):
            values.sort()
            out[side][name] = [round(_percentile(values, tail), 6), round(_percentile(values, 1 - tail), 6)]
    return out
