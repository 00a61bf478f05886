"""Tiny random Llama models, LoRA adapters and published adapter runs for serving tests.

Everything is created locally (no Hub): a byte-level BPE tokenizer trained on a few sentences,
a 2-layer Llama with random weights, and LoRA adapters whose B matrices are perturbed so the
adapter really changes the outputs (peft initialises B to zero, i.e. a no-op adapter).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

TINY_BASE_ID = "ragtune-tests/tiny-llama"
TINY_BASE_REVISION = "0000000000000000000000000000000000000001"

_CORPUS = [
    "Answer the question using only the provided context.",
    "Context: [1] The capital of France is Paris. [2] The Seine flows through Paris.",
    "Question: What is the capital of France? Answer: Paris [1]",
    "I cannot answer this from the provided context.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    return fast


def make_base(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Save a random tiny Llama + tokenizer in Hugging Face layout at `path`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = Path(path)
    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init is small; widen it so greedy decoding does not collapse onto one token.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_adapter(base: Path, out: Path, seed: int = 1, r: int = 4,
                 target_modules: tuple[str, ...] = ("q_proj", "v_proj"), scale: float = 1.0) -> Path:
    """Save a LoRA adapter for `base` at `out` (adapter_config.json + adapter_model.safetensors at
    top level, plus the tokenizer as the trainer writes it). `scale` 0 gives a no-op adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(target_modules),
                                                  lora_dropout=0.0, task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def publish_run(put: Callable[[str, bytes], None], adapter_dir: Path, *, run_id: str = "run-1",
                base_id: str = TINY_BASE_ID, base_revision: str = TINY_BASE_REVISION,
                report: Optional[dict[str, Any]] = None, tamper: Optional[str] = None,
                omit_manifest: bool = False) -> str:
    """Write an adapter run in the artifact contract layout (adapter/, eval/report.json,
    manifest.json last) through `put(path relative to the run prefix, bytes)`; return the
    manifest's sha256. `tamper` names an adapter file whose stored bytes differ from the
    manifest's digest."""
    files = []
    for f in sorted(Path(adapter_dir).iterdir()):
        if not f.is_file():
            continue
        data = f.read_bytes()
        files.append({"path": f"adapter/{f.name}", "sha256": sha256_bytes(data), "size": len(data)})
        put(f"adapter/{f.name}", data + b"tampered" if tamper == f.name else data)
    if report is not None:
        data = json.dumps(report).encode()
        files.append({"path": "eval/report.json", "sha256": sha256_bytes(data), "size": len(data)})
        put("eval/report.json", data)
    manifest = json.dumps({
        "schema": "ragtune.dev/manifest/v1", "runId": run_id,
        "baseModel": {"id": base_id, "revision": base_revision}, "files": files,
        "versions": {}, "createdAt": datetime.now(timezone.utc).isoformat(),
    }, indent=2).encode()
    if not omit_manifest:
        put("manifest.json", manifest)
    return sha256_bytes(manifest)


def file_put(root: Path) -> Callable[[str, bytes], None]:
    """`put` for a local run folder (file:// URIs)."""
    def put(rel: str, data: bytes) -> None:
        path = Path(root) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return put


def s3_put(s3, bucket: str, prefix: str) -> Callable[[str, bytes], None]:
    """`put` for a run under s3://bucket/prefix/."""
    prefix = prefix.strip("/") + "/"
    return lambda rel, data: s3.put_object(Bucket=bucket, Key=prefix + rel, Body=data)


def fake_adapter(folder: Path, r: int = 8, target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
                 **config: Any) -> Path:
    """An adapter-shaped folder without torch (the fetcher never parses the weights)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(target_modules), **config}))
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 8)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": None}))
    return folder
