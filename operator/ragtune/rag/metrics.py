"""RAG generator quality metrics, in pure Python (no torch, no numpy).

The trainer scores base vs adapter on the held-out split with these functions, and the online
canary evaluator runs the same code in the slim operator image, so both report comparable
numbers (docs/architecture.md, Evaluation).

Conventions:
- F1 / exact match follow SQuAD v1.1 normalisation (lower case, no punctuation, no articles
  a/an/the, single spaces). ROUGE-L is the LCS-based F-measure (beta = 1) over the same tokens.
- Citations (`[2]`, `[2][3]`, `[2, 3]`, `[doc-1]`) are stripped from answers and references
  before any text comparison: they are scored separately.
- A metric whose population is empty is `None`, never 0 (e.g. F1 on an all-unanswerable set).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Mapping, Optional, Sequence

from ragtune.api.common import EvalMetrics, RefusalByConstruction
from ragtune.api.prompt import DEFAULT_CITATION, DEFAULT_REFUSAL

# --- Normalisation ------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, drop punctuation and articles, collapse spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


# --- Citations ----------------------------------------------------------------------------

# A context id: word characters plus `.:-` (`2`, `doc-1`, `kb:42`). One mark holds one id or a
# comma/semicolon separated list; adjacent marks (`[2][3]`) are just two citations. The marks are
# the prompt contract's `citation` (`[{id}]` by default, e.g. `[doc{id}]`): text before and after `{id}`.
_ID = r"[A-Za-z0-9][\w.:-]*"


def _marks(citation: str) -> tuple[str, str, str]:
    """(opening bracket, what each id of a list repeats, closing text): `[doc{id}]` is `[`, `doc`,
    `]` and lists as `[doc1, doc2]`."""
    before, _, after = citation.partition("{id}")
    before, after = before.rstrip(), after.lstrip()
    if before[:1] in ("[", "(", "<"):
        return before[:1], before[1:].strip(), after
    return "", before, after


@lru_cache(maxsize=64)
def citation_regex(citation: str = DEFAULT_CITATION) -> re.Pattern[str]:
    """Citations in the form `citation`; group 1 is the list of ids inside the marks."""
    lead, inner, after = _marks(citation)
    one = f"{re.escape(inner)}{_ID}" if inner else _ID
    return re.compile(rf"{re.escape(lead)}\s*({one}(?:\s*[,;]\s*{one})*)\s*{re.escape(after)}")


def split_citation_group(group: str, citation: str = DEFAULT_CITATION) -> list[str]:
    """The ids of one mark's id list."""
    inner = _marks(citation)[1]
    ids = []
    for cid in re.split(r"\s*[,;]\s*", group.strip()):
        ids.append(cid[len(inner):] if inner and cid.startswith(inner) else cid)
    return ids


def parse_citations(text: str, citation: str = DEFAULT_CITATION) -> list[str]:
    """Cited context ids in order of first appearance, without duplicates."""
    cited: dict[str, None] = {}
    for group in citation_regex(citation).findall(text):
        for cid in split_citation_group(group, citation):
            cited.setdefault(cid, None)
    return list(cited)


def strip_citations(text: str, citation: str = DEFAULT_CITATION) -> str:
    """The answer without its citation markers (and without the space left before them)."""
    text = citation_regex(citation).sub("", text)
    text = re.sub(r"\s+([.,;:!?])", r"\1", text)
    return " ".join(text.split())


# --- Refusal detection --------------------------------------------------------------------

# Contractions expanded first so each pattern only needs the long form.
_CONTRACTIONS = [
    (re.compile(r"\bcan\s*['’]?\s*t\b|\bcan not\b"), "cannot"),
    (re.compile(r"\b(do|does|did|is|are|was|were|could|would)n['’]t\b"), r"\1 not"),
    (re.compile(r"\bi['’]m\b"), "i am"),
]
_SOURCE = r"(?:provided |given |supplied |retrieved )?(?:context|contexts|passages?|documents?|sources?|texts?|information|excerpts?)"
_VERB = r"(?:contain|mention|provide|include|say|state|specify|give|answer|have|discuss|address|describe|cover|indicate)s?"

REFUSAL_PATTERNS: tuple[re.Pattern[str], ...] = tuple(re.compile(p) for p in (
    # "I cannot answer", "we are unable to determine", "I could not find"
    r"\b(?:i|we)\s+(?:cannot|am unable to|are unable to|am not able to|could not|do not have enough information to)\s+"
    r"(?:answer|determine|find|tell|say|know|provide)",
    # "cannot answer this", "this cannot be answered / determined"
    r"\bcannot\s+(?:be\s+)?(?:answer|answered|determine|determined)\b",
    r"\bunable to (?:answer|determine)\b",
    r"\b(?:i|we) do not know\b",
    # "the context does not mention ...", "the passages do not say"
    rf"\b{_SOURCE}\s+(?:does|do|did)\s+not\s+{_VERB}\b",
    # "not mentioned in the provided context", "not found in the documents"
    rf"\bnot\s+(?:mentioned|provided|found|included|stated|given|specified|available|contained|present|addressed|covered)"
    rf"\s+in\s+(?:the\s+|any\s+of\s+the\s+)?{_SOURCE}",
    # "there is no information about", "no relevant information"
    r"\bno\s+(?:relevant\s+|such\s+)?(?:information|mention|details?)\s+(?:about|on|regarding|of|in|is|was)\b",
    r"\b(?:not|insufficient)\s+(?:enough\s+|sufficient\s+)?information\s+(?:to|in|about)\b",
    r"\binsufficient\s+(?:information|context)\b",
))


def _refusal_form(text: str) -> str:
    text = text.lower()
    for pattern, repl in _CONTRACTIONS:
        text = pattern.sub(repl, text)
    return " ".join(text.split())


def is_refusal(text: str, refusal: str = DEFAULT_REFUSAL) -> bool:
    """Whether an answer declines to answer.

    True when the answer contains the configured refusal sentence (case, spacing, apostrophe style and
    trailing punctuation ignored) or a common paraphrase from REFUSAL_PATTERNS: "I cannot
    answer", "I don't know", "the context does not mention ...", "not found in the provided
    documents", "there is no information about ...". Detection is lexical: an answer that
    gives content *and* a refusal phrase counts as a refusal, and one that states a fact
    about the world such as "he could not answer the phone" does not.
    """
    form = _refusal_form(text)
    if not form:
        return False
    wanted = _refusal_form(refusal).rstrip(string.punctuation + " ")
    if wanted and wanted in form:
        return True
    return any(p.search(form) for p in REFUSAL_PATTERNS)


# --- Text similarity ----------------------------------------------------------------------


def f1_score(prediction: str, reference: str) -> float:
    """SQuAD token F1 (two empty strings match perfectly)."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    # One row of the DP table at a time: O(len(a) * len(b)) time, O(len(b)) memory.
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta = 1) over normalised tokens."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


# --- Grounding ----------------------------------------------------------------------------

# Function words carry no claim about the world: leaving them in would make any fluent
# answer look grounded.
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had
has have having he her here hers herself him himself his how i if in into is it its itself just
me more most my myself no nor not now of off on once only or other our ours ourselves out over
own same she should so some such than that the their theirs them themselves then there these
they this those through to too under until up very was we were what when where which while who
whom why will with would you your yours yourself yourselves based according context provided
answer
""".split())


def content_tokens(text: str, citation: str = DEFAULT_CITATION) -> list[str]:
    return [t for t in tokens(strip_citations(text, citation)) if t not in STOPWORDS]


def grounding_score(answer: str, contexts: Iterable[str], citation: str = DEFAULT_CITATION) -> Optional[float]:
    """Share of the answer's content tokens (stopwords removed) that occur in the contexts;
    None when the answer has no content tokens."""
    words = content_tokens(answer, citation)
    if not words:
        return None
    vocabulary = set()
    for text in contexts:
        vocabulary.update(tokens(text))
    return sum(w in vocabulary for w in words) / len(words)


def answer_words(text: str, citation: str = DEFAULT_CITATION) -> int:
    return len(strip_citations(text, citation).split())


# --- Scoring a set ------------------------------------------------------------------------


@dataclass
class _Item:
    """The fields of a rag record the metrics need, whatever form the record came in."""

    answer: str
    answerable: bool
    context_ids: list[str]
    context_texts: list[str]
    supporting_ids: list[str] = field(default_factory=list)
    construction: Optional[str] = None


# Unanswerable constructions (RagRecord.construction) -> RefusalByConstruction field.
UNANSWERABLE_CONSTRUCTIONS = {
    "offTopic": "off_topic",
    "nearMiss": "near_miss",
    "answerRemoved": "answer_removed",
    "userLabelled": "user_labelled",
}


def construction_of(record: Any) -> str:
    """The construction label of an item; unlabelled unanswerable items are the user's own."""
    label = _get(record, "construction")
    if label:
        return str(label)
    answerable = _get(record, "answerable")
    return "answerable" if answerable is None or answerable else "userLabelled"


def _get(record: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        if isinstance(record, Mapping):
            if name in record:
                return record[name]
        elif hasattr(record, name):
            return getattr(record, name)
    return default


def _item(record: Any, index: int, refusal: str) -> _Item:
    """Accepts wire dicts (camelCase) and objects with snake_case attributes (RagRecord)."""
    answer = _get(record, "answer")
    if not isinstance(answer, str):
        raise ValueError(f"item {index}: field 'answer' must be a string, got {type(answer).__name__}")
    contexts = _get(record, "contexts", default=[]) or []
    ids, texts = [], []
    for c in contexts:
        cid, text = _get(c, "id"), _get(c, "text")
        if text is None:
            raise ValueError(f"item {index}: every entry of 'contexts' needs a 'text'")
        ids.append(str(cid) if cid is not None else str(len(ids) + 1))
        texts.append(str(text))
    answerable = _get(record, "answerable")
    if answerable is None:
        # Unlabelled items: a reference that is itself a refusal marks an unanswerable item.
        answerable = not is_refusal(answer, refusal)
    supporting = _get(record, "supportingContextIds", "supporting_context_ids", default=None) or []
    construction = _get(record, "construction")
    if not answerable and construction not in UNANSWERABLE_CONSTRUCTIONS:
        construction = "userLabelled"
    return _Item(answer, bool(answerable), ids, texts, [str(s) for s in supporting], construction)


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 6)


def score(
    items: Sequence[Any],
    predictions: Sequence[str],
    refusal: str = DEFAULT_REFUSAL,
    prompt: Any = None,
) -> EvalMetrics:
    """Score model answers against rag records.

    `items` are rag records (dicts with `question`, `contexts[{id, text}]`, `answer`,
    `answerable`, `supportingContextIds`, or objects with the same snake_case attributes);
    `predictions[i]` is the model's answer to `items[i]`. `prompt` (a
    `ragtune.rag.prompt.PromptContract`) gives the refusal sentence and the citation form (default:
    `refusal` and `[<id>]`); prompts show each context under its record id, so cited ids are
    compared with context ids as they are.

    - F1 / exact match / ROUGE-L: answerable items, citations stripped from both sides.
    - refusal rate: unanswerable items, pooled and per construction (`construction` of the
      item: offTopic / nearMiss / answerRemoved / userLabelled, where any item carries one;
      unlabelled unanswerable items then count as userLabelled);
      false-refusal rate: answerable items.
    - citation validity: share of all cited ids that name a context of the item's prompt.
    - citation precision / recall: answerable items with gold `supportingContextIds`, averaged
      per item (precision only over items that cite something; recall counts silence as 0).
    - grounding: mean over non-refusing answers of the share of content tokens in the contexts.
    - mean answer words: all items, citations stripped.
    """
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} items but {len(predictions)} predictions")
    citation = DEFAULT_CITATION
    if prompt is not None:
        refusal, citation = prompt.refusal, prompt.citation

    f1s, ems, rouges, refused_unans, refused_ans = [], [], [], [], []
    cited_total = cited_valid = 0
    precisions, recalls, groundings, lengths = [], [], [], []
    refused_by: dict[str, list[float]] = {}
    labelled = False
    for i, (record, prediction) in enumerate(zip(items, predictions)):
        item = _item(record, i, refusal)
        labelled = labelled or bool(_get(record, "construction"))
        prediction = prediction or ""
        refused = is_refusal(prediction, refusal)
        lengths.append(answer_words(prediction, citation))

        cited = parse_citations(prediction, citation)
        cited_total += len(cited)
        cited_valid += sum(c in item.context_ids for c in cited)

        if item.answerable:
            answer, reference = strip_citations(prediction, citation), strip_citations(item.answer, citation)
            f1s.append(f1_score(answer, reference))
            ems.append(exact_match(answer, reference))
            rouges.append(rouge_l(answer, reference))
            refused_ans.append(float(refused))
            gold = set(item.supporting_ids)
            if gold:
                hits = len(gold.intersection(cited))
                recalls.append(hits / len(gold))
                if cited:
                    precisions.append(hits / len(cited))
        else:
            refused_unans.append(float(refused))
            refused_by.setdefault(UNANSWERABLE_CONSTRUCTIONS[item.construction], []).append(float(refused))

        if not refused:
            grounded = grounding_score(prediction, item.context_texts, citation)
            if grounded is not None:
                groundings.append(grounded)

    return EvalMetrics(
        samples=len(items),
        f1=_round(_mean(f1s)),
        exact_match=_round(_mean(ems)),
        rouge_l=_round(_mean(rouges)),
        refusal_rate=_round(_mean(refused_unans)),
        refusal_by_construction=RefusalByConstruction(
            **{k: _round(_mean(v)) for k, v in refused_by.items()}) if refused_by and labelled else None,
        false_refusal_rate=_round(_mean(refused_ans)),
        citation_validity=_round(cited_valid / cited_total if cited_total else None),
        citation_precision=_round(_mean(precisions)),
        citation_recall=_round(_mean(recalls)),
        grounding_score=_round(_mean(groundings)),
        mean_answer_words=_round(_mean([float(n) for n in lengths])),
    )
