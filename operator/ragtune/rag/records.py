"""RAG records: the wire form of the rows users give (JSONL/Parquet) and the parsed form every
consumer (trainer, offline and online evaluation) works with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Context:
    id: str
    text: str


@dataclass
class RagRecord:
    id: str
    question: str
    contexts: list[Context]
    answer: str
    answerable: bool = True
    supporting_context_ids: list[str] = field(default_factory=list)
    construction: Optional[str] = None
    """How an item was built (`answerable`, `offTopic`, `nearMiss`, `answerRemoved`,
    `userLabelled`); set by the RAFT construction, None on records as users give them."""
    rejected: Optional[str] = None
    """A wrong answer to the same prompt (e.g. a hallucination): the `rejected` side of a
    preference pair whose `chosen` side is `answer` (the refusal on unanswerable items). Only the
    preference stage (`training.preference`) reads it."""

    @classmethod
    def from_dict(cls, d: dict) -> "RagRecord":
        """Parse a record with camelCase or snake_case keys; ValueError names the bad field."""
        if not isinstance(d, dict):
            raise ValueError(f"record must be a JSON object, got {type(d).__name__}")
        missing = [k for k in ("id", "question", "contexts", "answer") if d.get(k) is None]
        if missing:
            raise ValueError(f"missing field(s): {', '.join(missing)}")
        contexts = d["contexts"]
        if not isinstance(contexts, list):
            raise ValueError("field 'contexts' must be a list of {id, text}")
        parsed = []
        for i, c in enumerate(contexts):
            if not isinstance(c, dict) or c.get("id") is None or c.get("text") is None:
                raise ValueError(f"field 'contexts[{i}]' must be an object with 'id' and 'text'")
            parsed.append(Context(id=str(c["id"]), text=str(c["text"])))
        answerable = d.get("answerable", True)
        if not isinstance(answerable, bool):
            raise ValueError(f"field 'answerable' must be true or false, got {answerable!r}")
        support = _get(d, "supportingContextIds", "supporting_context_ids") or []
        if not isinstance(support, list):
            raise ValueError("field 'supportingContextIds' must be a list of context ids")
        rejected = d.get("rejected")
        if rejected is not None and not isinstance(rejected, str):
            raise ValueError(f"field 'rejected' must be a string (a wrong answer), got {type(rejected).__name__}")
        return cls(
            id=str(d["id"]),
            question=str(d["question"]),
            contexts=parsed,
            answer=str(d["answer"]),
            answerable=answerable,
            supporting_context_ids=[str(s) for s in support],
            construction=str(d["construction"]) if d.get("construction") is not None else None,
            rejected=rejected,
        )

    def to_dict(self) -> dict:
        """camelCase wire form (what the JSONL files hold)."""
        return {
            "id": self.id,
            "question": self.question,
            "contexts": [{"id": c.id, "text": c.text} for c in self.contexts],
            "answer": self.answer,
            "answerable": self.answerable,
            "supportingContextIds": list(self.supporting_context_ids),
            **({"construction": self.construction} if self.construction else {}),
            **({"rejected": self.rejected} if self.rejected is not None else {}),
        }


def _get(d: dict, *keys: str) -> Any:
    for k in keys:
        if k in d:
            return d[k]
    return None
