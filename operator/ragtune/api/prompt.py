"""`spec.prompt`: the prompt contract of a FineTuneJob (docs/architecture.md, The RAG contract).

The grounded-answer prompt is part of what an adapter is: the model is trained, evaluated offline
and online, and served with exactly this rendering (`ragtune.rag.prompt`), and the run publishes it
as `adapter/prompt.json` so clients can format their requests the same way. The defaults are the
prompt ragtune has always used, so a spec without `prompt` trains byte-identical prompts.

Templates use `{name}` placeholders that are replaced once, literally: a question or context that
itself contains `{question}` stays as it is. Every template allows only its own placeholders (a
typo such as `{context}` is refused at admission, naming the field); other braces, e.g. JSON, are
plain text.
"""

from __future__ import annotations

import re
from typing import Annotated, Optional

from pydantic import AfterValidator, Field

from .base import ApiModel, cel, k8s_extensions

DEFAULT_REFUSAL = "I cannot answer this from the provided context."
"""The refusal sentence ragtune teaches when `prompt.refusal` and `dataset.raft.refusal` are unset."""

DEFAULT_SYSTEM = (
    "You answer questions using only the numbered contexts you are given. "
    "Cite every context you use by its id in square brackets, for example {citation}. "
    "Do not use outside knowledge. If the contexts do not contain the answer, reply exactly: {refusal}"
)
DEFAULT_USER_TEMPLATE = "Contexts:\n{contexts}\n\nQuestion: {question}"
DEFAULT_CONTEXT_TEMPLATE = "[{id}] {text}"
DEFAULT_CITATION = "[{id}]"

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PLACEHOLDER_CEL = "[{][A-Za-z_][A-Za-z0-9_]*[}]"


def _placeholder_rules(allowed: tuple[str, ...], required: tuple[str, ...]) -> dict:
    """CEL on a template string: `required` present, nothing but `allowed` as a placeholder."""
    stripped = "self" + "".join(f".replace('{{{name}}}', '')" for name in allowed)
    rules = [cel(f"!{stripped}.matches('{_PLACEHOLDER_CEL}')",
                 "only the placeholders " + ", ".join("{" + n + "}" for n in allowed) + " are allowed",
                 reason="FieldValueInvalid")]
    for name in required:
        rules.append(cel(f"self.contains('{{{name}}}')", f"must contain the placeholder {{{name}}}",
                         reason="FieldValueRequired"))
    return k8s_extensions(*rules)


def _check_placeholders(allowed: tuple[str, ...], required: tuple[str, ...]):
    def check(text: str) -> str:
        unknown = sorted({m for m in PLACEHOLDER.findall(text) if m not in allowed})
        if unknown:
            raise ValueError("unknown placeholder(s) " + ", ".join("{" + u + "}" for u in unknown)
                             + "; only " + ", ".join("{" + n + "}" for n in allowed) + " are allowed")
        missing = [n for n in required if "{" + n + "}" not in text]
        if missing:
            raise ValueError("must contain the placeholder(s) " + ", ".join("{" + n + "}" for n in missing))
        return text
    return check


def _template(max_length: int, allowed: tuple[str, ...], required: tuple[str, ...] = ()):
    return Annotated[str, Field(min_length=1, max_length=max_length,
                                json_schema_extra=_placeholder_rules(allowed, required)),
                     AfterValidator(_check_placeholders(allowed, required))]


SystemTemplate = _template(4096, ("refusal", "citation"))
UserTemplate = _template(2048, ("contexts", "question"), ("contexts", "question"))
ContextTemplate = _template(256, ("id", "text"), ("id", "text"))


def _check_citation(text: str) -> str:
    _check_placeholders(("id",), ("id",))(text)
    before, _, after = text.partition("{id}")
    if not before.strip() or not after.strip() or "{id}" in after or "{" in before + after or "}" in before + after:
        raise ValueError("must be text, {id}, text with no other braces, e.g. [{id}] or [doc{id}] "
                         "(the marks on both sides are how citations are found in answers)")
    return text


CitationTemplate = Annotated[
    str,
    Field(min_length=5, max_length=32, json_schema_extra=k8s_extensions(cel(
        "self.matches('^[^{}]*[^{}\\\\s][^{}]*[{]id[}][^{}]*[^{}\\\\s][^{}]*$')",
        "must be text, {id}, text with no other braces, e.g. [{id}] or [doc{id}]",
        reason="FieldValueInvalid"))),
    AfterValidator(_check_citation),
]


class PromptSpec(ApiModel):
    """The grounded-answer prompt the adapter is trained, evaluated and served with. Published as
    `adapter/prompt.json` (listed in `manifest.json` with its sha256); `ragtune prompt render` and
    `ragtune.rag.prompt.PromptContract` format requests from it exactly as in training."""

    system: SystemTemplate = DEFAULT_SYSTEM
    """System turn. Placeholders: `{refusal}` (the refusal sentence) and `{citation}` (an example
    citation, `citation` with id 2)."""
    user_template: UserTemplate = DEFAULT_USER_TEMPLATE
    """User turn; must contain `{contexts}` (the formatted contexts) and `{question}`, no other
    placeholder."""
    context_template: ContextTemplate = DEFAULT_CONTEXT_TEMPLATE
    """How one context is shown: `{id}` (the record's context id) and `{text}`, e.g.
    `[{id}] {text}`, `[doc{id}] {text}` or `<doc id="{id}">{text}</doc>`."""
    context_separator: str = Field("\n", max_length=16)
    """Between two formatted contexts."""
    citation: CitationTemplate = DEFAULT_CITATION
    """How the answer cites a context: marks around `{id}`, e.g. `[{id}]` or `[doc{id}]`.
    Evaluation finds citations in this form (several ids in one mark may be separated by `,` or `;`)."""
    refusal: Optional[str] = Field(None, min_length=1, max_length=512)
    """The refusal sentence the model is taught when the contexts lack the answer (and that
    evaluation looks for, beside common paraphrases). Empty: `dataset.raft.refusal`."""
    augment: bool = False
    """Train on prompt variations so the adapter keeps its behaviour under other applications'
    prompts: a fixed set of paraphrased instructions, shuffled context order, other id styles
    and contexts in the system turn instead of the user turn (deterministic by `training.seed`).
    Evaluation always uses this prompt, and scores a fixed foreign prompt beside it."""
    augment_fraction: float = Field(0.5, gt=0, le=1)
    """With `augment`: share of training items rendered with a variation (the rest with this prompt)."""
