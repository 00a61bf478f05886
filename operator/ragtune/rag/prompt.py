"""The grounded-answer prompt: the one rendering that training, offline evaluation, the online
evaluator and clients use, so the model always sees exactly the text it was trained on."""

from __future__ import annotations

from ragtune.api.finetunejob import RaftConfig

from .records import RagRecord

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
