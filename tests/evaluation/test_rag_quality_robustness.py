"""bench/rag_quality.py's prompt-robustness figures: trained vs foreign prompt per item, the gap
and paired bootstrap intervals (pure Python, no model)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ragtune.rag.prompt import DEFAULT_REFUSAL

BENCH = Path(__file__).resolve().parents[2] / "bench" / "rag_quality.py"


def _bench():
    spec = importlib.util.spec_from_file_location("rag_quality_bench_robustness", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sample(answerable: bool, trained: str, foreign: str, reference: str = "Paris [1]") -> dict:
    return {"answerable": answerable, "adapter": trained, "foreign": foreign,
            "reference": reference if answerable else DEFAULT_REFUSAL}


def test_gap_and_intervals_of_trained_vs_foreign_prompt():
    samples = ([sample(True, "Paris [1]", "Paris [1]")] * 6
               + [sample(True, "Paris [1]", "Paris [1] " + DEFAULT_REFUSAL)] * 4  # glued refusals under the foreign prompt
               + [sample(False, DEFAULT_REFUSAL, DEFAULT_REFUSAL)] * 5)
    r = _bench().bootstrap_robustness(samples, DEFAULT_REFUSAL)
    assert r["falseRefusalRate"]["trained"] == 0.0 and r["falseRefusalRate"]["foreign"] == 0.4
    assert r["falseRefusalRate"]["gap"] == 0.4 and r["refusalRate"]["gap"] == 0.0
    low, high = r["falseRefusalRate"]["gapCI95"]
    assert 0.0 < low <= 0.4 <= high < 1.0
    assert r["goal"]["refusalRateGap<=0.1"] and not r["goal"]["falseRefusalRateGap<=0.1"] and not r["goalMet"]


def test_no_foreign_answers_no_figures():
    assert _bench().bootstrap_robustness([{"answerable": True, "adapter": "x", "reference": "x"}], DEFAULT_REFUSAL) == {}
