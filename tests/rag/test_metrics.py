"""RAG metrics: hand-computed expectations on small cases, edge cases included."""

from __future__ import annotations

import pytest

from ragtune.api.common import MetricThresholds
from ragtune.api.gates import describe_failures, evaluate_gates
from ragtune.rag.metrics import (
    DEFAULT_REFUSAL,
    exact_match,
    f1_score,
    grounding_score,
    is_refusal,
    normalize_answer,
    parse_citations,
    rouge_l,
    score,
    strip_citations,
)
from ragtune.rag.records import Context, RagRecord


def test_squad_normalisation_drops_case_punctuation_articles_and_spaces():
    assert normalize_answer("  The Quick,  brown fox! ") == "quick brown fox"
    assert normalize_answer("An apple a day") == "apple day"


def test_f1_and_exact_match():
    # tokens [cat, sat] vs [cat, sat, on, mat]: P = 1, R = 1/2
    assert f1_score("the cat sat", "cat sat on mat") == pytest.approx(2 / 3)
    assert f1_score("dog", "cat") == 0.0
    assert f1_score("", "cat") == 0.0
    assert f1_score("", "") == 1.0
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel Tower in Paris", "Eiffel Tower") == 0.0


def test_rouge_l_is_lcs_f_measure():
    # LCS(x y z w, x z w) = 3: P = 3/4, R = 1
    assert rouge_l("x y z w", "x z w") == pytest.approx(6 / 7)
    # [police killed gunman] vs [gunman was killed by police]: LCS = 1, P = 1/3, R = 1/5
    assert rouge_l("police killed the gunman", "the gunman was killed by police") == pytest.approx(0.25)
    # order matters for ROUGE-L, not for F1
    assert f1_score("y x", "x y") == 1.0
    assert rouge_l("y x", "x y") == pytest.approx(0.5)
    assert rouge_l("", "x y") == 0.0


@pytest.mark.parametrize("text, ids", [
    ("Paris [1].", ["1"]),
    ("Paris [2][3].", ["2", "3"]),
    ("Paris [2, 3] and Lyon [3; 4]", ["2", "3", "4"]),
    ("See [doc-1] and [kb:7].", ["doc-1", "kb:7"]),
    ("No citations here.", []),
    ("Empty [] and [ , ] brackets", []),
])
def test_parse_citations(text, ids):
    assert parse_citations(text) == ids


def test_strip_citations_keeps_the_sentence():
    assert strip_citations("Paris is the capital [1]. It is big [2, 3][doc-4].") == "Paris is the capital. It is big."


@pytest.mark.parametrize("text", [
    DEFAULT_REFUSAL,
    "i cannot answer this from the provided context",
    "I can't answer that question.",
    "I cannot determine this from the contexts.",
    "I don't know.",
    "I’m unable to answer based on these passages.",
    "The context does not mention when he was born.",
    "The provided documents don't say.",
    "This is not mentioned in the provided passages.",
    "The answer is not found in the given context.",
    "There is no information about his wife in the contexts.",
    "The question cannot be answered from the context.",
    "There is not enough information to answer.",
])
def test_refusals_detected(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", [
    "Paris [1].",
    "He could not answer the phone because he was asleep [2].",
    "The documents show that the river is 6650 km long.",
    "No, the magazine was not started first.",
    "I know the answer: 42.",
    "The contexts mention three kings [1][2].",
    "",
])
def test_non_refusals_not_detected(text):
    assert not is_refusal(text)


def test_configured_refusal_is_recognised():
    custom = "Sorry, that is outside my sources."
    assert is_refusal("sorry, that is outside my sources", refusal=custom)
    assert not is_refusal("Sorry, that is outside my sources.")  # not a paraphrase of the default


def test_grounding_ignores_stopwords_and_citations():
    contexts = ["Paris is the capital and largest city of France."]
    assert grounding_score("Paris is the capital of France [1].", contexts) == 1.0
    # content tokens [paris, 9, million, people]; only paris is in the context
    assert grounding_score("Paris has 9 million people", contexts) == pytest.approx(0.25)
    assert grounding_score("It is what it is.", contexts) is None  # nothing but stopwords


def _mixed_set():
    items = [
        {"question": "Capital of France?", "answer": "Paris [1]", "answerable": True,
         "contexts": [{"id": "1", "text": "Paris is the capital of France."},
                      {"id": "2", "text": "Berlin is the capital of Germany."}],
         "supportingContextIds": ["1"]},
        {"question": "Length of the Nile?", "answer": "6650 km [a]", "answerable": True,
         "contexts": [{"id": "a", "text": "The river Nile is 6650 km long."}],
         "supportingContextIds": ["a"]},
        {"question": "Who is the cat's owner?", "answer": DEFAULT_REFUSAL, "answerable": False,
         "contexts": [{"id": "1", "text": "Cats purr."}]},
        {"question": "What do dogs do?", "answer": DEFAULT_REFUSAL, "answerable": False,
         "contexts": [{"id": "1", "text": "Cats purr."}]},
    ]
    predictions = [
        "Paris [1][2]",                       # right, one valid extra citation
        "It is about 6650 kilometres [b]",    # partial answer, invalid citation
        DEFAULT_REFUSAL,                      # correct refusal (8 words)
        "Dogs bark [1].",                     # should have refused; ungrounded
    ]
    return items, predictions


def test_score_hand_computed():
    items, predictions = _mixed_set()
    m = score(items, predictions)
    # item 2: tokens [it, is, about, 6650, kilometres] vs [6650, km]: P = 1/5, R = 1/2
    partial = 2 * 0.2 * 0.5 / 0.7
    assert m.samples == 4
    assert m.f1 == pytest.approx((1 + partial) / 2, abs=1e-6)
    assert m.exact_match == 0.5
    assert m.rouge_l == pytest.approx((1 + partial) / 2, abs=1e-6)
    assert m.refusal_rate == 0.5
    assert m.false_refusal_rate == 0.0
    assert m.citation_validity == 0.75        # [1] [2] valid, [b] not, [1] valid
    assert m.citation_precision == 0.25       # mean(1/2, 0/1)
    assert m.citation_recall == 0.5           # mean(1/1, 0/1)
    assert m.grounding_score == 0.5           # mean(1, 1/2 (6650 yes, kilometres no), 0)
    assert m.mean_answer_words == 4.0         # mean(1, 5, 8, 2)


def test_score_accepts_rag_record_objects():
    items, predictions = _mixed_set()
    records = [
        RagRecord(id=str(i), question=d["question"], answer=d["answer"], answerable=d["answerable"],
                  contexts=[Context(**c) for c in d["contexts"]],
                  supporting_context_ids=d.get("supportingContextIds", []))
        for i, d in enumerate(items)
    ]
    assert score(records, predictions) == score(items, predictions)


def test_unanswerable_only_set_has_no_answer_metrics():
    items, predictions = _mixed_set()
    m = score(items[2:], predictions[2:])
    assert m.f1 is None and m.exact_match is None and m.rouge_l is None
    assert m.false_refusal_rate is None and m.citation_recall is None
    assert m.refusal_rate == 0.5


def test_all_refusals():
    items, _ = _mixed_set()
    m = score(items, [DEFAULT_REFUSAL] * 4)
    assert m.refusal_rate == 1.0
    assert m.false_refusal_rate == 1.0
    assert m.f1 == 0.0
    assert m.grounding_score is None        # refusals make no claims
    assert m.citation_validity is None      # nothing cited
    assert m.citation_precision is None
    assert m.citation_recall == 0.0         # gold contexts exist but none was cited


def test_empty_predictions_and_empty_set():
    items, _ = _mixed_set()
    m = score(items, ["", "", "", ""])
    assert m.f1 == 0.0 and m.refusal_rate == 0.0 and m.mean_answer_words == 0.0
    assert m.grounding_score is None
    empty = score([], [])
    assert empty.samples == 0 and empty.f1 is None and empty.mean_answer_words is None


def test_unlabelled_items_whose_reference_is_a_refusal_are_unanswerable():
    item = {"question": "q", "answer": DEFAULT_REFUSAL, "contexts": [{"id": "1", "text": "t"}]}
    m = score([item], ["I don't know."])
    assert m.refusal_rate == 1.0 and m.f1 is None


def test_bad_input_names_the_problem():
    items, predictions = _mixed_set()
    with pytest.raises(ValueError, match="4 items but 3 predictions"):
        score(items, predictions[:3])
    with pytest.raises(ValueError, match="item 0: field 'answer'"):
        score([{"question": "q", "contexts": []}], ["x"])


def test_scores_feed_the_gates():
    items, predictions = _mixed_set()
    adapter = score(items, predictions)
    base = score(items, ["Paris"] * 4)
    gates = evaluate_gates(MetricThresholds(min_refusal_rate=0.5, min_f1_gain_over_base=0.1), adapter, base)
    by_metric = {g.metric: g for g in gates}
    assert by_metric["refusalRate"].passed
    # base F1 = mean(1, 0) = 0.5; adapter 0.642857 -> gain 0.142857 >= 0.1
    assert by_metric["f1GainOverBase"].value == pytest.approx(0.142857, abs=1e-6)
    assert by_metric["f1GainOverBase"].passed


def test_metrics_import_no_torch_or_numpy():
    # The slim operator image (online canary evaluation) has neither.
    import subprocess
    import sys

    code = ("import sys, ragtune.rag.metrics; "
            "print(sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _constructed_set():
    ctx = [{"id": "1", "text": "The tower is 312 metres tall."}]
    def item(construction, answerable=False):
        return {"question": "q", "contexts": ctx, "answerable": answerable, "construction": construction,
                "answer": "312 metres [1]" if answerable else DEFAULT_REFUSAL, "supportingContextIds": ["1"]}
    items = [item("answerable", True), item("offTopic"), item("offTopic"), item("nearMiss"), item("nearMiss"),
             item("answerRemoved"), {"question": "q", "contexts": ctx, "answer": DEFAULT_REFUSAL, "answerable": False}]
    predictions = ["312 metres [1]", DEFAULT_REFUSAL, DEFAULT_REFUSAL, "312 metres [1]", DEFAULT_REFUSAL,
                   "400 m [1]", "I don't know."]
    return items, predictions


def test_refusal_is_reported_per_construction():
    m = score(*_constructed_set())
    assert m.refusal_rate == pytest.approx(4 / 6, abs=1e-6)
    by = m.refusal_by_construction
    assert (by.off_topic, by.near_miss, by.answer_removed, by.user_labelled) == (1.0, 0.5, 0.0, 1.0)
    assert m.to_wire()["refusalByConstruction"] == {"offTopic": 1.0, "nearMiss": 0.5, "answerRemoved": 0.0,
                                                    "userLabelled": 1.0}
    # without any construction label (an online evaluation set) there is no breakdown
    items, predictions = _mixed_set()
    assert score(items, predictions).refusal_by_construction is None


def test_refusal_gate_takes_the_hardest_construction_by_default_or_the_named_one():
    m = score(*_constructed_set())
    (gate,) = evaluate_gates(MetricThresholds(min_refusal_rate=0.5), m)
    assert gate.metric == "refusalRate.answerRemoved" and gate.value == 0.0 and not gate.passed
    (gate,) = evaluate_gates(MetricThresholds(min_refusal_rate=0.5, refusal_construction="nearMiss"), m)
    assert gate.metric == "refusalRate.nearMiss" and gate.passed
    (gate,) = evaluate_gates(MetricThresholds(min_refusal_rate=0.5, refusal_construction="all"), m)
    assert gate.metric == "refusalRate" and gate.value == pytest.approx(4 / 6, abs=1e-6)
    assert "refusalRate.answerRemoved 0.000 < 0.5" in describe_failures(
        evaluate_gates(MetricThresholds(min_refusal_rate=0.5), m))
