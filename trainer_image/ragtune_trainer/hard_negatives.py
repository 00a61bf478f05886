"""Hard negatives for the RAFT construction: passages retrieved for a question from the dataset's
own passages (BM25), and locating / deleting the answer inside a passage.

Why: distractors and unanswerable items built from random other records are off-topic, so a
model learns "refuse when the passages are about something else". A retriever returns on-topic
passages that may still lack the answer; these helpers build exactly that case.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

from ragtune.rag.metrics import STOPWORDS, normalize_answer, strip_citations

# Answers a passage cannot be checked for by string match (they are judgements, not spans).
_NON_EXTRACTIVE = frozenset({"yes", "no", "true", "false"})
# A sentence ends at . ! ? followed by space and a capital, digit or quote.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def bm25_terms(text: str) -> list[str]:
    """SQuAD-normalised words without stop words: what BM25 matches on."""
    return [t for t in normalize_answer(text).split() if t not in STOPWORDS]


def answer_key(answer: str) -> Optional[str]:
    """The normalised answer span to search passages for, or None when the answer cannot be
    located by string match (empty, or yes/no style)."""
    key = normalize_answer(strip_citations(answer))
    return None if not key or key in _NON_EXTRACTIVE else key


def contains_answer(text: str, key: Optional[str]) -> bool:
    """Whether the normalised `text` contains the normalised answer as whole words."""
    if not key:
        return False
    return f" {key} " in f" {normalize_answer(text)} "


def remove_answer_sentences(text: str, key: str) -> tuple[str, int]:
    """`text` without its sentences that contain the answer, and how many were deleted."""
    sentences = _SENTENCE_END.split(text.strip())
    kept = [s for s in sentences if not contains_answer(s, key)]
    return " ".join(kept).strip(), len(sentences) - len(kept)


@dataclass(frozen=True)
class Passage:
    text: str
    owners: frozenset[int]
    """Indices of the records whose contexts hold this text (the same paragraph can recur)."""


class PassageIndex:
    """The distinct passages of a set of records, ranked for a query by BM25 (bm25s)."""

    def __init__(self, records_contexts: Iterable[Iterable[str]]):
        by_key: dict[str, tuple[str, set[int]]] = {}
        for owner, texts in enumerate(records_contexts):
            for text in texts:
                key = " ".join(normalize_answer(text).split())
                by_key.setdefault(key, (text, set()))[1].add(owner)
        self.keys = list(by_key)
        self.passages = [Passage(text, frozenset(owners)) for text, owners in by_key.values()]
        self._bm25 = None

    def _retriever(self):
        if self._bm25 is None:
            import bm25s

            self._bm25 = bm25s.BM25()
            # An empty-token document keeps bm25s from failing on passages of stop words only.
            self._bm25.index([bm25_terms(p.text) or ["\u2205"] for p in self.passages], show_progress=False)
        return self._bm25

    def ranked(self, query: str) -> list[int]:
        """Passage indices by descending BM25 score for `query`, ties by index (deterministic);
        passages sharing no term with the query are left out."""
        terms = bm25_terms(query)
        if not terms or not self.passages:
            return []
        scores = self._retriever().get_scores(terms)
        order = sorted((i for i in range(len(self.passages)) if scores[i] > 0), key=lambda i: (-float(scores[i]), i))
        return order

    def key(self, text: str) -> str:
        return " ".join(normalize_answer(text).split())
