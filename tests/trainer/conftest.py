"""Trainer test fixtures: a word-level tokenizer with a ChatML template and a tiny random Llama,
built here from a config (no hub), plus synthetic RAG data files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ragtune.api.prompt import DEFAULT_REFUSAL, DEFAULT_SYSTEM
from ragtune_trainer.synthetic import generate

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_WORD = r"\w+|[^\w\s]"


def build_tokenizer(texts: list[str], out: Path):
    """Word-level tokenizer over `texts` (+ system prompt and refusal), saved to `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = set()
    for t in list(texts) + [DEFAULT_SYSTEM, DEFAULT_REFUSAL, "system user assistant Contexts Question"]:
        words.update(re.findall(_WORD, t))
    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(specials + sorted(words))}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return fast


def build_model(tokenizer, out: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0, poison: bool = False):
    """Tiny random Llama saved to `out`; `poison` puts inf into one weight (a corrupt checkpoint -> NaN loss)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    if poison:
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    return model


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def records():
    return generate(80, seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, records) -> Path:
    """Folder with a tiny Llama + tokenizer covering the synthetic data's words."""
    out = tmp_path_factory.mktemp("tiny-llama")
    texts = [t for r in records for t in [r.question, r.answer] + [c.text for c in r.contexts]]
    tokenizer = build_tokenizer(texts, out)
    build_model(tokenizer, out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def train_file(tmp_path, records) -> Path:
    return write_jsonl(tmp_path / "data" / "train.jsonl", [r.to_dict() for r in records])
