"""The grounded-answer prompt: the one rendering that training, offline evaluation, the online
evaluator and clients use, so the model always sees exactly the text it was trained on.

A `PromptContract` is `spec.prompt` with its refusal sentence resolved; a run publishes it as
`adapter/prompt.json`. Clients format requests with it:

    from ragtune.rag.prompt import PromptContract
    contract = PromptContract.load("prompt.json")
    messages = contract.messages(question="...", contexts=[{"id": "1", "text": "..."}])

Also here: the fixed *foreign* prompt that evaluation scores beside the trained one, and the
prompt variations `prompt.augment` trains on (docs/architecture.md, The RAG contract).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from ragtune.api.prompt import (
    DEFAULT_CITATION,
    DEFAULT_CONTEXT_TEMPLATE,
    DEFAULT_REFUSAL,
    DEFAULT_SYSTEM,
    DEFAULT_USER_TEMPLATE,
    PLACEHOLDER,
    PromptSpec,
)

from .records import Context, RagRecord

__all__ = ["DEFAULT_REFUSAL", "FOREIGN_PROMPT", "PromptContract", "apply_template", "augmented_messages",
           "build_messages", "foreign_prompt", "render_prompt"]

PROMPT_SCHEMA = "ragtune.dev/prompt/v1"
NO_CONTEXTS = "(no contexts)"
"""The contexts block of an item without contexts."""
EXAMPLE_ID = "2"
"""The id `{citation}` in the system text shows."""

# Used only for tokenizers that ship no chat template (base models): a plain, unambiguous layout.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def fill(template: str, **values: str) -> str:
    """Replace the `{name}` placeholders of `values` in one pass: inserted text is never scanned
    again (a question containing `{contexts}` stays as it is), unknown names stay literal."""
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def _contexts_of(contexts: Iterable[Any]) -> list[Context]:
    out = []
    for c in contexts:
        if isinstance(c, Context):
            out.append(c)
        else:
            out.append(Context(id=str(c["id"]), text=str(c["text"])))
    return out


@dataclass(frozen=True)
class PromptContract:
    """`spec.prompt` with the refusal resolved: everything needed to render a request."""

    system: str = DEFAULT_SYSTEM
    user_template: str = DEFAULT_USER_TEMPLATE
    context_template: str = DEFAULT_CONTEXT_TEMPLATE
    context_separator: str = "\n"
    citation: str = DEFAULT_CITATION
    refusal: str = DEFAULT_REFUSAL
    contexts_in: str = "user"
    """`system`: the contexts block goes into the system turn (an augmentation variant only:
    `spec.prompt` always puts `{contexts}` in the user template)."""

    # --- construction and the published form ---------------------------------------------

    @classmethod
    def from_spec(cls, spec) -> "PromptContract":
        """The contract of a FineTuneJobSpec: `spec.prompt`, refusal `prompt.refusal` or else
        `dataset.raft.refusal`."""
        p: PromptSpec = spec.prompt
        return cls(system=p.system, user_template=p.user_template, context_template=p.context_template,
                   context_separator=p.context_separator, citation=p.citation,
                   refusal=p.refusal or spec.dataset.raft.refusal)

    def to_wire(self) -> dict[str, str]:
        """prompt.json: the keys of `spec.prompt` (camelCase), refusal resolved."""
        return {"schema": PROMPT_SCHEMA, "system": self.system, "userTemplate": self.user_template,
                "contextTemplate": self.context_template, "contextSeparator": self.context_separator,
                "citation": self.citation, "refusal": self.refusal}

    def dumps(self) -> str:
        return json.dumps(self.to_wire(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_wire(cls, data: Any, source: str = "prompt.json") -> "PromptContract":
        """Parse prompt.json, validated like `spec.prompt`; ValueError names the source and field."""
        from pydantic import ValidationError

        if not isinstance(data, dict):
            raise ValueError(f"{source}: must be a JSON object")
        data = dict(data)
        schema = data.pop("schema", PROMPT_SCHEMA)
        if schema != PROMPT_SCHEMA:
            raise ValueError(f"{source}: schema {schema!r} is not {PROMPT_SCHEMA!r}")
        if not data.get("refusal"):
            raise ValueError(f"{source}: field 'refusal' is required")
        try:
            spec = PromptSpec.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ValueError(f"{source}: field '{'.'.join(map(str, err['loc']))}': {err['msg']}") from None
        return cls(system=spec.system, user_template=spec.user_template, context_template=spec.context_template,
                   context_separator=spec.context_separator, citation=spec.citation, refusal=spec.refusal)

    @classmethod
    def loads(cls, text: Union[str, bytes], source: str = "prompt.json") -> "PromptContract":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}:{exc.lineno}: not JSON: {exc.msg}") from None
        return cls.from_wire(data, source)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "PromptContract":
        return cls.loads(Path(path).read_bytes(), str(path))

    # --- rendering --------------------------------------------------------------------------

    def cite(self, cid: str) -> str:
        return fill(self.citation, id=str(cid))

    def system_text(self) -> str:
        return fill(self.system, refusal=self.refusal, citation=self.cite(EXAMPLE_ID))

    def contexts_text(self, contexts: Sequence[Any]) -> str:
        parts = [fill(self.context_template, id=c.id, text=c.text) for c in _contexts_of(contexts)]
        return self.context_separator.join(parts) or NO_CONTEXTS

    def messages(self, record: Optional[RagRecord] = None, *, question: Optional[str] = None,
                 contexts: Optional[Sequence[Any]] = None, answer: Optional[str] = None) -> list[dict]:
        """System + user turns for a record (or a question and its contexts, as a client has
        them), plus the assistant turn when `answer` is given."""
        if record is not None:
            question, contexts = record.question, record.contexts
        if question is None:
            raise ValueError("a question is needed")
        block = self.contexts_text(contexts or [])
        system = self.system_text()
        if self.contexts_in == "system":
            system = f"{system}\n\nContexts:\n{block}"
            block = ""
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": fill(self.user_template, contexts=block, question=question)}]
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        return messages

    # --- citations in answers ----------------------------------------------------------------

    def parse_citations(self, text: str) -> list[str]:
        from .metrics import parse_citations

        return parse_citations(text, self.citation)

    def recite(self, answer: str, to: "PromptContract") -> str:
        """`answer` with its citations (in this contract's form) written in `to`'s form."""
        from .metrics import citation_regex, split_citation_group

        pattern = citation_regex(self.citation)
        return pattern.sub(lambda m: "".join(to.cite(c) for c in split_citation_group(m.group(1), self.citation)),
                           answer)


def build_messages(record: RagRecord, *, with_answer: bool = False, refusal: str = DEFAULT_REFUSAL,
                   prompt: Optional[PromptContract] = None) -> list[dict]:
    """System + user turns (+ the assistant's reference answer when `with_answer`) under `prompt`
    (default: ragtune's prompt with the refusal `refusal`)."""
    contract = prompt or PromptContract(refusal=refusal)
    return contract.messages(record, answer=record.answer if with_answer else None)


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


def render_prompt(tokenizer, record: RagRecord, *, refusal: str = DEFAULT_REFUSAL,
                  prompt: Optional[PromptContract] = None, examples: Sequence[RagRecord] = ()) -> str:
    """The generation prompt for `record` in the tokenizer's chat template; `examples` (few-shot)
    come first as earlier user/assistant turns under the same contract, after the system turn."""
    messages = build_messages(record, refusal=refusal, prompt=prompt)
    if examples:
        contract = prompt or PromptContract(refusal=refusal)
        shots = [turn for ex in examples for turn in contract.messages(ex, answer=ex.answer)[1:]]
        messages = messages[:1] + shots + messages[1:]
    return apply_template(tokenizer, messages, add_generation_prompt=True)


# --- The foreign prompt ------------------------------------------------------------------------

FOREIGN_PROMPT = {
    "system": ("You are a helpful assistant for a customer support team. Read the documents the user "
               "provides and answer their question. Only use facts from those documents, and reference "
               "the document you used like {citation}. If the answer is not in the documents, say: {refusal}"),
    "user_template": "Here are the relevant documents:\n\n{contexts}\n\nCustomer question: {question}\n"
                     "Please answer concisely.",
    "context_template": "Document {citation}:\n{text}",
    "context_separator": "\n\n",
}
"""Another application's wording of the same task, never used in training (not one of the
augmentation variants): evaluation scores the adapter under it beside the trained prompt. It
keeps the contract's refusal sentence and citation form, so the metrics stay comparable; in
`context_template`, `{citation}` stands for the contract's citation of the context's id."""


def foreign_prompt(contract: PromptContract) -> PromptContract:
    f = FOREIGN_PROMPT
    return replace(contract, system=f["system"], user_template=f["user_template"],
                   context_template=f["context_template"].replace("{citation}", contract.citation),
                   context_separator=f["context_separator"], contexts_in="user")


# --- Augmentation --------------------------------------------------------------------------------

PARAPHRASES = (
    "Answer the question with information from the supplied passages only. Whenever you rely on a "
    "passage, cite it by its id, like {citation}. Never add facts that are not in the passages. When the "
    "passages do not answer the question, respond with exactly: {refusal}",
    "Use the retrieved documents below and nothing else to answer. Mark each document you draw on with its "
    "id, for example {citation}. If none of the documents contains the answer, say exactly: {refusal}",
    "You are a careful assistant. Rely solely on the provided sources and cite each source you use as "
    "{citation}. If the sources are insufficient, your whole reply must be: {refusal}",
)
"""Paraphrased system instructions `prompt.augment` trains on (beside the contract's own)."""
USER_LAYOUTS = (
    "Question: {question}\n\nSources:\n{contexts}",
    "{contexts}\n\n{question}",
    "Passages:\n{contexts}\n\nAnswer this question: {question}",
)
"""Other user-turn layouts (beside the contract's own)."""
SYSTEM_PLACEMENT_USER = ("Question: {question}", "{question}")
"""User turns of the variants that put the contexts into the system turn."""
ID_STYLES = (
    ("[doc{id}] {text}", "[doc{id}]"),
    ('<doc id="{id}">{text}</doc>', "[{id}]"),
    ("Source ({id}): {text}", "({id})"),
)
"""Other (context template, citation) pairs (beside the contract's own)."""
SEPARATORS = ("\n", "\n\n")


def augment_variant(contract: PromptContract, rng: random.Random) -> tuple[PromptContract, bool]:
    """A random variation of `contract` (system wording, user layout, id style, separator, where
    the contexts go) and whether to shuffle the context order. The refusal sentence never changes:
    it is the contract clients detect."""
    system = rng.choice((contract.system,) + PARAPHRASES)
    context_template, citation = rng.choice(((contract.context_template, contract.citation),) + ID_STYLES)
    variant = replace(contract, system=system, context_template=context_template, citation=citation,
                      context_separator=rng.choice(SEPARATORS))
    if rng.random() < 0.25:
        variant = replace(variant, contexts_in="system", user_template=rng.choice(SYSTEM_PLACEMENT_USER))
    else:
        variant = replace(variant, user_template=rng.choice((contract.user_template,) + USER_LAYOUTS))
    return variant, rng.random() < 0.5


def augmented_messages(contract: PromptContract, record: RagRecord, seed: int, index: int,
                       fraction: float) -> list[dict]:
    """Prompt turns + assistant answer for training item `index`: a variation (with the answer's
    citations rewritten into the variation's form) for a `fraction` of items, the contract's own
    rendering for the rest. Deterministic by (seed, index)."""
    rng = random.Random(seed * 1_000_003 + index)
    if rng.random() >= fraction:
        return contract.messages(record, answer=record.answer)
    variant, shuffle = augment_variant(contract, rng)
    contexts = list(record.contexts)
    if shuffle:
        rng.shuffle(contexts)
    shown = replace(record, contexts=contexts)
    return variant.messages(shown, answer=contract.recite(record.answer, variant))
