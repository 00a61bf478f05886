"""Dataset hygiene: duplicates, near-duplicates, train/test overlap and class balance over loaded
items, each finding named by `file:line`. Pure (no torch, no I/O); `ragtune dataset validate` and
the training run (`rows.prepare_data`) both call `check`.

What counts as the same item (every text compared after `normalise`: Unicode NFKC, case-folded,
words only, so case, punctuation and spacing differences do not hide a copy):
- **exact duplicate**: same question, same contexts (as a set: their order does not matter) and
  same answer (its `[n]` citation marks left out);
- **near-duplicate**: not exact, but the same question, or the same answer over the same contexts
  (a reworded question). The second key is only built for answerable items with contexts: a
  refusal's answer is one fixed sentence, so for them it would only mean "same passages";
- **train/test overlap**: an eval item that shares either key with a training item.
Keys are digests in dicts: one pass, O(n) time and O(n) small keys for 100k rows. No fuzzy
(shingle) similarity: that costs a MinHash index per item, and the two keys already catch copies
that differ in case, punctuation, context order or the question's wording.

Class balance: answerable vs unanswerable items (`answerable: false`) per source file, for `rag`
data; the other formats have no such label and report none.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

MAX_EXAMPLES = 20
"""Findings listed by file:line per kind (every one is counted)."""

SAME = "exact duplicate"
SAME_QUESTION = "same question"
SAME_SUPPORT = "same answer and contexts"

_WORDS = re.compile(r"\w+")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
"""Citation marks: their numbers follow the order contexts are listed in, which is no difference."""


def normalise(text: str) -> str:
    return " ".join(_WORDS.findall(unicodedata.normalize("NFKC", text).casefold()))


def _digest(*parts: str) -> bytes:
    return hashlib.blake2b("\x1f".join(parts).encode("utf-8"), digest_size=16).digest()


@dataclass(frozen=True)
class Item:
    """What hygiene compares of one loaded record."""

    where: str
    """file:line (or row) the record came from."""
    source: str
    """The file's URI (class balance is per file)."""
    question: str
    contexts: tuple[str, ...] = ()
    answer: str = ""
    answerable: Optional[bool] = None
    """None: a format without the label (messages, prompt-completion)."""


@dataclass(frozen=True)
class _Keys:
    exact: bytes
    question: Optional[bytes]
    support: Optional[bytes]


def _keys(item: Item) -> _Keys:
    q = normalise(item.question)
    contexts = sorted(normalise(c) for c in item.contexts)
    answer = normalise(_BRACKETS.sub(" ", item.answer))
    support = _digest("support", answer, *contexts) if contexts and answer and item.answerable is not False else None
    return _Keys(_digest("exact", q, answer, *contexts), _digest("question", q) if q else None, support)


@dataclass
class Finding:
    where: str
    other: str
    """The earlier item (a duplicate) or the training item (an overlap) it repeats."""
    reason: str

    def to_wire(self) -> dict:
        return {"where": self.where, "other": self.other, "reason": self.reason}


@dataclass
class Balance:
    split: str
    source: str
    answerable: int
    unanswerable: int

    @property
    def answerable_share(self) -> float:
        return self.answerable / max(self.answerable + self.unanswerable, 1)

    def to_wire(self) -> dict:
        return {"split": self.split, "source": self.source, "answerable": self.answerable,
                "unanswerable": self.unanswerable, "answerableShare": round(self.answerable_share, 4)}


@dataclass
class SplitHygiene:
    name: str
    items: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    examples: list[Finding] = field(default_factory=list)
    """The first MAX_EXAMPLES duplicates and near-duplicates."""
    balance: list[Balance] = field(default_factory=list)

    def to_wire(self) -> dict:
        return {"items": self.items, "exactDuplicates": self.exact_duplicates, "nearDuplicates": self.near_duplicates,
                "examples": [f.to_wire() for f in self.examples], "balance": [b.to_wire() for b in self.balance]}


@dataclass
class HygieneReport:
    train: SplitHygiene
    eval: Optional[SplitHygiene] = None
    eval_origin: str = "file"
    """`file` (dataset.eval / --eval) or `split` (held out of the training file, grouped by the keys)."""
    overlap: int = 0
    """Eval items that share a question, or an answer over the same contexts, with a training item."""
    overlap_examples: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Duplicates are warnings; train/test overlap is not."""
        return self.overlap == 0

    def to_wire(self) -> dict:
        return {"train": self.train.to_wire(), "eval": self.eval.to_wire() if self.eval else None,
                "evalOrigin": self.eval_origin if self.eval else None, "overlap": self.overlap,
                "overlapExamples": [f.to_wire() for f in self.overlap_examples]}

    def overlap_message(self) -> str:
        """The failure text: every listed overlap as `train:line = eval:line (reason)`."""
        lines = [f"{f.other} = {f.where} ({f.reason})" for f in self.overlap_examples]
        if self.overlap > len(lines):
            lines.append(f"... and {self.overlap - len(lines)} more")
        return (f"train/test overlap: {self.overlap} eval item(s) repeat a training item "
                "(remove them from one side):\n" + "\n".join(lines))

    def summary(self) -> str:
        """One log line: items, duplicates and the first one named, per split, and the overlap."""
        parts = []
        for part in (self.train, self.eval):
            if part is not None:
                first = f" (first: {part.examples[0].where} repeats {part.examples[0].other})" if part.examples else ""
                parts.append(f"{part.name} {part.items} item(s), {part.exact_duplicates} exact duplicate(s), "
                             f"{part.near_duplicates} near-duplicate(s){first}")
        if self.eval is not None:
            parts.append(f"train/test overlap {self.overlap}")
        return "; ".join(parts)

    def render(self) -> str:
        """The CLI's summary: counts, every listed finding, the balance per file."""
        out = []
        for part in (self.train, self.eval):
            if part is None:
                continue
            out.append(f"{part.name}: {part.items} item(s), {part.exact_duplicates} exact duplicate(s), "
                       f"{part.near_duplicates} near-duplicate(s)")
            out += [f"  warning: {f.where} repeats {f.other} ({f.reason})" for f in part.examples]
            shown = len(part.examples)
            if part.exact_duplicates + part.near_duplicates > shown:
                out.append(f"  ... and {part.exact_duplicates + part.near_duplicates - shown} more")
            out += [f"  balance {b.source}: {b.answerable} answerable ({b.answerable_share:.1%}), "
                    f"{b.unanswerable} unanswerable ({1 - b.answerable_share:.1%})" for b in part.balance]
        if self.eval is not None:
            out.append(self.overlap_message() if self.overlap else "train/test overlap: none")
        return "\n".join(out)


def _split(name: str, items: Sequence[Item], keys: Sequence[_Keys]) -> SplitHygiene:
    result = SplitHygiene(name=name, items=len(items))
    first: dict[bytes, str] = {}
    for item, k in zip(items, keys):
        reason, other = None, None
        if k.exact in first:
            reason, other = SAME, first[k.exact]
            result.exact_duplicates += 1
        else:
            for key, why in ((k.question, SAME_QUESTION), (k.support, SAME_SUPPORT)):
                if key is not None and key in first:
                    reason, other = why, first[key]
                    result.near_duplicates += 1
                    break
        if reason is not None and len(result.examples) < MAX_EXAMPLES:
            result.examples.append(Finding(item.where, other, reason))
        for key in (k.exact, k.question, k.support):
            if key is not None:
                first.setdefault(key, item.where)
    counts: dict[str, Counter] = {}
    for item in items:
        if item.answerable is not None:
            counts.setdefault(item.source, Counter())[item.answerable] += 1
    result.balance = [Balance(name, src, c[True], c[False]) for src, c in counts.items()]
    return result


def check(train: Sequence[Item], eval: Optional[Sequence[Item]] = None, eval_origin: str = "file") -> HygieneReport:
    train_keys = [_keys(i) for i in train]
    report = HygieneReport(train=_split("train", train, train_keys))
    if eval is None:
        return report
    eval_keys = [_keys(i) for i in eval]
    report.eval, report.eval_origin = _split("eval", eval, eval_keys), eval_origin
    seen: dict[bytes, str] = {}
    for item, k in zip(train, train_keys):
        for key in (k.question, k.support, k.exact):
            if key is not None:
                seen.setdefault(key, item.where)
    for item, k in zip(eval, eval_keys):  # (exact last: it only adds copies whose question has no words)
        for key, why in ((k.question, SAME_QUESTION), (k.support, SAME_SUPPORT), (k.exact, SAME)):
            if key is not None and key in seen:
                report.overlap += 1
                if len(report.overlap_examples) < MAX_EXAMPLES:
                    report.overlap_examples.append(Finding(item.where, seen[key], why))
                break
    return report


def groups(items: Iterable[Item]) -> list[int]:
    """A group number per item: items sharing a question or an answer over the same contexts,
    directly or through others, get the same one (a split that keeps groups whole cannot put a
    copy of a training item into the held-out set)."""
    parent: list[int] = []

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[bytes, int] = {}
    for n, item in enumerate(items):
        parent.append(n)
        k = _keys(item)
        for key in (k.exact, k.question, k.support):
            if key is None:
                continue
            if key in owner:
                a, b = root(owner[key]), root(n)
                if a != b:
                    parent[max(a, b)] = min(a, b)  # the earliest item stays the root
            else:
                owner[key] = n
    return [root(i) for i in range(len(parent))]
