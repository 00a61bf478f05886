"""RAG records and the grounded-answer prompt: one place, so training, evaluation and the online
evaluator all show the model exactly the same text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ragtune.api.finetunejob import RaftConfig

DEFAULT_REFUSAL: str = RaftConfig.model_fields["refusal"].default
"""The refusal the model is taught when the contexts lack the answer (`RaftConfig.refusal`)."""

SYSTEM_TEMPLATE = (
    "You answer questions using only the numbered contexts you are given. "
    "Cite every context you use by its id in square brackets, for example [2]. "
    "Do not use outside knowledge. If the contexts do not contain the answer, reply exactly: {refusal}"
)

# Used only for tokenizers that ship no chat template (base models): a plain, unambiguous layout.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


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
        return cls(
            id=str(d["id"]),
            question=str(d["question"]),
            contexts=parsed,
            answer=str(d["answer"]),
            answerable=answerable,
            supporting_context_ids=[str(s) for s in support],
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
        }


def _get(d: dict, *keys: str) -> Any:
    for k in keys:
        if k in d:
            return d[k]
    return None


def system_prompt(refusal: str = DEFAULT_REFUSAL) -> str:
    return SYSTEM_TEMPLATE.format(refusal=refusal)


def user_prompt(record: RagRecord) -> str:
    contexts = "\n".join(f"[{c.id}] {c.text}" for c in record.contexts) or "(no contexts)"
    return f"Contexts:\n{contexts}\n\nQuestion: {record.question}"


def build_messages(record: RagRecord, *, with_answer: bool = False, refusal: str = DEFAULT_REFUSAL) -> list[dict]:
    """System + user turns (+ the assistant's reference answer when `with_answer`)."""
    messages = [
        {"role": "system", "content": system_prompt(refusal)},
        {"role": "user", "content": user_prompt(record)},
    ]
    if with_answer:
        messages.append({"role": "assistant", "content": record.answer})
    return messages


def apply_template(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    """`apply_chat_template` to text, tolerating templates without a system role (merged into the
    first user turn) and tokenizers without any template (FALLBACK_CHAT_TEMPLATE)."""
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
    kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template)
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except Exception as exc:  # jinja raise_exception(): e.g. "System role not supported"
        if messages[0]["role"] != "system" or "system" not in str(exc).lower():
            raise
        merged = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
        return tokenizer.apply_chat_template(merged + messages[2:], **kwargs)


def render_prompt(tokenizer, record: RagRecord, *, refusal: str = DEFAULT_REFUSAL) -> str:
    """The generation prompt for `record` in the tokenizer's chat template."""
    return apply_template(tokenizer, build_messages(record, refusal=refusal), add_generation_prompt=True)
