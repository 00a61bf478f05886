import pytest

from ragtune.api.finetunejob import RaftConfig
from ragtune.rag.prompt import DEFAULT_REFUSAL, build_messages, render_prompt
from ragtune.rag.records import Context, RagRecord


def test_default_refusal_is_the_api_default():
    assert DEFAULT_REFUSAL == RaftConfig().refusal


def test_from_dict_accepts_camel_and_snake_case_and_round_trips():
    camel = {"id": 7, "question": "q?", "contexts": [{"id": 1, "text": "a"}], "answer": "a [1]",
             "answerable": True, "supportingContextIds": [1]}
    snake = dict(camel, supporting_context_ids=[1])
    del snake["supportingContextIds"]
    for d in (camel, snake):
        r = RagRecord.from_dict(d)
        assert r.id == "7" and r.contexts == [Context("1", "a")] and r.supporting_context_ids == ["1"]
    assert RagRecord.from_dict(RagRecord.from_dict(camel).to_dict()) == RagRecord.from_dict(camel)


@pytest.mark.parametrize("bad, field", [
    ({"question": "q", "contexts": [], "answer": "a"}, "id"),
    ({"id": 1, "contexts": [], "answer": "a"}, "question"),
    ({"id": 1, "question": "q", "contexts": "x", "answer": "a"}, "contexts"),
    ({"id": 1, "question": "q", "contexts": [{"id": 1}], "answer": "a"}, "contexts[0]"),
    ({"id": 1, "question": "q", "contexts": [], "answer": "a", "answerable": "yes"}, "answerable"),
])
def test_from_dict_names_the_bad_field(bad, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[")):
        RagRecord.from_dict(bad)


def test_messages_number_contexts_and_instruct_citations_and_refusal():
    r = RagRecord("x", "Who?", [Context("2", "Ann wrote it."), Context("7", "Bob read it.")], "Ann [2]")
    system, user, assistant = build_messages(r, with_answer=True, refusal="NOPE.")
    assert system["role"] == "system" and "NOPE." in system["content"] and "[2]" in system["content"]
    assert "only" in system["content"]
    assert "[2] Ann wrote it.\n[7] Bob read it." in user["content"] and user["content"].endswith("Question: Who?")
    assert assistant == {"role": "assistant", "content": "Ann [2]"}
    assert len(build_messages(r)) == 2


def test_render_prompt_uses_chat_template_with_generation_prompt(tiny_tokenizer):
    r = RagRecord("x", "Who?", [Context("1", "Ann wrote it.")], "Ann [1]")
    text = render_prompt(tiny_tokenizer, r)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "[1] Ann wrote it." in text and "Ann [1]" not in text


def test_render_prompt_merges_system_into_user_when_template_refuses_system(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    text = render_prompt(tok, RagRecord("x", "Who?", [Context("1", "Ann.")], "Ann [1]"))
    assert text.startswith("<user>You answer questions") and "Question: Who?" in text


def test_render_prompt_without_any_template_uses_fallback(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    text = render_prompt(tok, RagRecord("x", "Who?", [Context("1", "Ann.")], "Ann [1]"))
    assert text.startswith("<|system|>\n") and text.endswith("<|assistant|>\n")
