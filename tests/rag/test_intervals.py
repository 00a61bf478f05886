"""Paired bootstrap intervals: of exactly the metrics `score` computes, and honest about noise."""

from __future__ import annotations

import pytest

from ragtune.api.common import EvalMetrics, MetricThresholds
from ragtune.api.gates import describe_failures, evaluate_gates
from ragtune.rag.intervals import aggregate, bootstrap_intervals, flat_metrics, item_values
from ragtune.rag.metrics import score
from ragtune.rag.prompt import DEFAULT_REFUSAL

CTX = [{"id": "1", "text": "Paris is the capital of France."}, {"id": "2", "text": "Lyon is a city in France."}]


def _items(n: int) -> list[dict]:
    items = []
    for i in range(n):
        if i % 3 == 0:
            items.append({"question": f"q{i}", "contexts": CTX, "answer": DEFAULT_REFUSAL, "answerable": False,
                          "construction": "nearMiss" if i % 2 else None})
        else:
            items.append({"question": f"q{i}", "contexts": CTX, "answer": "Paris [1]", "answerable": True,
                          "supportingContextIds": ["1"]})
    return items


def _answers(items: list[dict], good_every: int) -> list[str]:
    out = []
    for i, item in enumerate(items):
        good = i % good_every != 0
        if item["answerable"]:
            out.append("Paris is the capital [1][7]" if good else DEFAULT_REFUSAL)
        else:
            out.append(DEFAULT_REFUSAL if good else "Lyon [2]")
    return out


def test_aggregating_item_values_is_score_on_the_set():
    items = _items(30)
    answers = _answers(items, good_every=4)
    expected = flat_metrics(score(items, answers))
    got = aggregate(item_values(items, answers))
    assert set(got) == set(expected)
    assert "citationValidity" in got and "refusalRate.nearMiss" in got and "refusalRate.userLabelled" in got
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name


def test_intervals_contain_the_point_estimate_narrow_with_more_items_and_pair_the_delta():
    small, large = _items(24), _items(240)
    for items in (small, large):
        base, adapter = _answers(items, good_every=2), _answers(items, good_every=5)
        ci = bootstrap_intervals(items, {"base": base, "adapter": adapter}, draws=400, seed=1)
        point = flat_metrics(score(items, adapter))
        for name in ("f1", "refusalRate", "falseRefusalRate", "citationValidity"):
            lo, hi = ci["adapter"][name]
            assert lo <= point[name] + 1e-9 and point[name] <= hi + 1e-9, name
        lo, hi = ci["delta"]["f1"]
        assert lo <= point["f1"] - flat_metrics(score(items, base))["f1"] <= hi
    assert ci["delta"]["f1"][0] > 0  # on 240 items the adapter is better beyond noise
    width = lambda items: (lambda ci: ci["adapter"]["f1"][1] - ci["adapter"]["f1"][0])(  # noqa: E731
        bootstrap_intervals(items, {"adapter": _answers(items, 4)}, draws=400, seed=1))
    assert width(large) < width(small) / 2
    again = bootstrap_intervals(small, {"adapter": _answers(small, 3)}, draws=100, seed=5)
    assert again == bootstrap_intervals(small, {"adapter": _answers(small, 3)}, draws=100, seed=5)  # seeded


def test_a_gate_under_confidence_compares_the_interval_bound():
    adapter = EvalMetrics(samples=48, f1=0.62, false_refusal_rate=0.08)
    base = EvalMetrics(samples=48, f1=0.50)
    intervals = {"adapter": {"f1": [0.48, 0.75], "falseRefusalRate": [0.02, 0.19]},
                 "delta": {"f1": [-0.03, 0.27]}}
    point = MetricThresholds(min_f1=0.55, max_false_refusal_rate=0.15, min_f1_gain_over_base=0.05)
    assert all(g.passed for g in evaluate_gates(point, adapter, base, intervals=intervals))

    strict = point.model_copy(update={"confidence": 0.95})
    results = evaluate_gates(strict, adapter, base, intervals=intervals)
    assert [(g.metric, g.passed, g.bound) for g in results] == [
        ("f1", False, 0.48), ("falseRefusalRate", False, 0.19), ("f1GainOverBase", False, -0.03)]
    assert results[0].value == 0.62 and results[0].interval == [0.48, 0.75]
    assert "f1 0.620, interval lower bound 0.480 < 0.55" in describe_failures(results)
    # without intervals a confidence gate cannot pass
    missing = evaluate_gates(strict, adapter, base)
    assert not any(g.passed for g in missing) and "no confidence interval" in describe_failures(missing)
