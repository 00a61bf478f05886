"""Evaluate MetricThresholds against measured metrics: one implementation for the trainer's
gates, the AdapterDeployment offline gate and the online canary gate."""

from __future__ import annotations

from typing import Any, Optional

from .common import EvalMetrics, GateResult, MetricThresholds, PromptGap

# threshold field -> (metric or derived metric name, comparison)
_RULES = {
    "min_f1": ("f1", ">="),
    "min_exact_match": ("exactMatch", ">="),
    "min_rouge_l": ("rougeL", ">="),
    "min_refusal_rate": ("refusalRate", ">="),
    "max_false_refusal_rate": ("falseRefusalRate", "<="),
    "min_citation_validity": ("citationValidity", ">="),
    "min_grounding_score": ("groundingScore", ">="),
    "min_f1_gain_over_base": ("f1GainOverBase", ">="),
    "min_refusal_gain_over_base": ("refusalRateGainOverBase", ">="),
    "max_foreign_prompt_gap": ("foreignPromptGap", "<="),
}


def prompt_gap(trained: EvalMetrics, foreign: Optional[EvalMetrics]) -> Optional[PromptGap]:
    """Absolute differences of refusal rate, false-refusal rate and F1 between the adapter under
    its trained prompt and under the foreign one; `max` is the largest measured (None: nothing
    measured on both sides)."""
    if foreign is None:
        return None
    diffs = {}
    for name in ("refusal_rate", "false_refusal_rate", "f1"):
        a, b = getattr(trained, name), getattr(foreign, name)
        diffs[name] = None if a is None or b is None else round(abs(a - b), 6)
    measured = [v for v in diffs.values() if v is not None]
    return PromptGap(**diffs, max=max(measured) if measured else None)


def _value(metric: str, adapter: EvalMetrics, base: Optional[EvalMetrics]) -> Optional[float]:
    if metric.endswith("GainOverBase"):
        name = metric[: -len("GainOverBase")]
        a = adapter.to_wire().get(name)
        b = base.to_wire().get(name) if base else None
        return None if a is None or b is None else a - b
    return adapter.to_wire().get(metric)


def _refusal_metric(construction: str, adapter: EvalMetrics) -> tuple[str, Optional[float]]:
    """(`refusalRate` or `refusalRate.<construction>`, value) for the `minRefusalRate` gate."""
    rates = adapter.refusal_by_construction.to_wire() if adapter.refusal_by_construction else {}
    if construction == "all" or not rates:
        return "refusalRate", adapter.refusal_rate
    if construction == "hardest":
        construction = min(rates, key=lambda k: (rates[k], k))
    return f"refusalRate.{construction}", rates.get(construction)


def evaluate_gates(
    thresholds: MetricThresholds, adapter: EvalMetrics, base: Optional[EvalMetrics] = None,
    foreign: Optional[EvalMetrics] = None, intervals: Optional[dict[str, Any]] = None,
) -> list[GateResult]:
    """One GateResult per threshold that is set. A metric that could not be measured fails
    (`foreign`: the adapter under the foreign prompt, for `maxForeignPromptGap`). `intervals`
    (`rag.intervals.bootstrap_intervals`) attach each gated value's interval; with
    `thresholds.confidence` the interval's bound is compared, and a gate without an interval
    fails as not measured at that confidence."""
    results = []
    for field, (metric, comparison) in _RULES.items():
        threshold = getattr(thresholds, field)
        if threshold is None:
            continue
        if field == "min_refusal_rate":
            metric, value = _refusal_metric(thresholds.refusal_construction, adapter)
        elif field == "max_foreign_prompt_gap":
            gap = prompt_gap(adapter, foreign)
            value = gap.max if gap else None
        else:
            value = _value(metric, adapter, base)
        interval = None if field == "max_foreign_prompt_gap" else interval_of(intervals, "adapter", metric)
        compared, bound = value, None
        if thresholds.confidence is not None and field != "max_foreign_prompt_gap":
            bound = None if interval is None else (interval[0] if comparison == ">=" else interval[1])
            compared = bound
        if compared is None:
            passed, margin = False, None
        elif comparison == ">=":
            passed, margin = compared >= threshold, compared - threshold
        else:
            passed, margin = compared <= threshold, threshold - compared
        results.append(GateResult(
            metric=metric, comparison=comparison, threshold=threshold,
            value=None if value is None else round(value, 6),
            passed=passed, margin=None if margin is None else round(margin, 6),
            interval=interval, bound=bound,
        ))
    return results


def interval_of(intervals: Optional[dict[str, Any]], side: str, metric: str) -> Optional[list[float]]:
    """`[low, high]` of one metric from `rag.intervals.bootstrap_intervals` output
    (`*GainOverBase` names read the adapter-minus-base `delta` side)."""
    if not intervals:
        return None
    if metric.endswith("GainOverBase"):
        side, metric = "delta", metric[: -len("GainOverBase")]
    return (intervals.get(side) or {}).get(metric)


def describe_failures(results: list[GateResult]) -> str:
    """`refusalRate 0.61 < 0.80 (short by 0.19); ...` for status messages and events."""
    parts = []
    for r in results:
        if r.passed:
            continue
        if r.value is None:
            parts.append(f"{r.metric} was not measured (needs {r.comparison} {r.threshold:g})")
        elif r.bound is not None:
            end, bad = ("lower", "<") if r.comparison == ">=" else ("upper", ">")
            parts.append(f"{r.metric} {r.value:.3f}, interval {end} bound {r.bound:.3f} {bad} {r.threshold:g} "
                         f"(off by {abs(r.margin):.3f})")
        elif r.margin is None:
            parts.append(f"{r.metric} {r.value:.3f} has no confidence interval (needs {r.comparison} "
                         f"{r.threshold:g} at the configured confidence)")
        else:
            bad = "<" if r.comparison == ">=" else ">"
            parts.append(f"{r.metric} {r.value:.3f} {bad} {r.threshold:g} (off by {abs(r.margin):.3f})")
    return "; ".join(parts)
