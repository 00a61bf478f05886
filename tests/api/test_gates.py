from ragtune.api import EvalMetrics, MetricThresholds
from ragtune.api.gates import describe_failures, evaluate_gates


def test_gates_compare_absolute_and_relative_to_base():
    base = EvalMetrics(samples=10, f1=0.40, refusal_rate=0.10, false_refusal_rate=0.0)
    adapter = EvalMetrics(samples=10, f1=0.55, refusal_rate=0.70, false_refusal_rate=0.20)
    thresholds = MetricThresholds(
        min_refusal_rate=0.8, max_false_refusal_rate=0.15, min_f1_gain_over_base=0.1, min_f1=0.5
    )
    results = {r.metric: r for r in evaluate_gates(thresholds, adapter, base)}
    assert set(results) == {"refusalRate", "falseRefusalRate", "f1GainOverBase", "f1"}
    assert not results["refusalRate"].passed and abs(results["refusalRate"].margin + 0.1) < 1e-9
    assert not results["falseRefusalRate"].passed and abs(results["falseRefusalRate"].margin + 0.05) < 1e-9
    assert results["f1GainOverBase"].passed and abs(results["f1GainOverBase"].value - 0.15) < 1e-9
    assert results["f1"].passed
    text = describe_failures(list(results.values()))
    assert "refusalRate 0.700 < 0.8" in text and "falseRefusalRate 0.200 > 0.15" in text and "f1 " not in text


def test_unmeasured_metric_fails_the_gate():
    (result,) = evaluate_gates(MetricThresholds(min_citation_validity=0.9), EvalMetrics(samples=3))
    assert not result.passed and result.value is None
    assert "not measured" in describe_failures([result])


def test_no_thresholds_means_no_gates():
    assert evaluate_gates(MetricThresholds(), EvalMetrics()) == []
