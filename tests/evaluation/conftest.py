"""A tiny random Llama with a LoRA adapter and a tokenizer built here: no hub, seconds on CPU."""

from __future__ import annotations

import pytest

from ragtune.rag.metrics import DEFAULT_REFUSAL
from ragtune.rag.records import Context, RagRecord

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_records() -> list[RagRecord]:
    facts = [
        ("Paris is the capital of France.", "What is the capital of France?", "Paris"),
        ("The Nile is 6650 km long.", "How long is the Nile?", "6650 km"),
        ("Mount Everest is 8849 metres high.", "How high is Everest?", "8849 metres"),
        ("Arthur's Magazine was started in 1844.", "When did Arthur's Magazine start?", "1844"),
        ("The Oberoi Group has its head office in Delhi.", "Where is the Oberoi head office?", "Delhi"),
    ]
    records = []
    for i, (text, question, answer) in enumerate(facts):
        records.append(RagRecord(
            id=f"r{i}", question=question, answer=f"{answer} [{i + 1}]",
            contexts=[Context(str(i + 1), text), Context("9", "Cats purr when they are content.")],
            supporting_context_ids=[str(i + 1)],
        ))
    records.append(RagRecord(
        id="u0", question="Who owns the cat?", answer=DEFAULT_REFUSAL, answerable=False,
        contexts=[Context("1", "Cats purr when they are content.")],
    ))
    return records


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [r.question + " " + r.answer + " " + c.text for r in make_records() for c in r.contexts]
    tok.train_from_iterator(corpus + [DEFAULT_REFUSAL], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture
def tiny_peft_model(tiny_tokenizer):
    """Random tiny Llama + LoRA whose B matrices are perturbed (peft initialises them to zero,
    which would make the adapter a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id,
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model
