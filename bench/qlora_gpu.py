"""QLoRA speed and memory on a GPU: our trainer vs the same plain SFTTrainer recipe, in one run.

An 8B-shaped Llama (Llama-3-8B dimensions, random weights: speed does not depend on them) in 4-bit
nf4 with double quantisation, LoRA r16 on all linear layers, bf16 compute, gradient checkpointing,
RAG-shaped items of 1024-2048 tokens whose last 1/16-1/8 is the answer. Two runs, each from
a fresh load of the same base model:

- `plain`: SFTTrainer + SFTConfig(bf16, gradient checkpointing, padding to the longest item in a
  random batch, completion-only loss through the model's full LM head) + the peft config;
- `ragtune`: the trainer of `ragtune train` with its GPU plan (length-grouped batches, or padding-free
  rows when flash-attention is installed; LM head only on answer positions).

Prints JSON per run: answer (loss-bearing) tokens/s, all non-padding tokens/s, peak GPU memory,
MFU (model FLOPs 6*N + attention, per non-padding token, over the GPU's dense bf16 peak), and the
ratios ours/plain. Targets (issue 3): >= 2x tokens/s and <= 0.6x peak memory.

Needs a CUDA GPU for the real shape; without one it prints {"skipped": ...} and exits 0.
`--shape tiny --device cpu` runs the same code on CPU in seconds (the test suite does that).
Usage: python bench/qlora_gpu.py [--steps 12] [--batch-size 2] [--seq-len 2048] [--shape llama-8b]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import benchio

SEED = 0
SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab (Llama-3-8B)
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0}
"""Dense bf16 peaks by device-name substring (first match wins: the PCIe entry precedes 'H100')."""


def build_model(shape: str, seq_len: int, device: str, cache: Path) -> Path:
    """A random-weight Llama of `shape`, saved once (bf16 on GPU, fp32 on CPU) with a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = cache / f"random-llama-{shape}"
    if (out / ".complete").exists():
        return out
    dims = SHAPES[shape]
    config = LlamaConfig(**dims, max_position_embeddings=max(seq_len, 4096), rope_theta=500000.0,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(SEED)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out, max_shard_size="4GB")
    del model
    vocab = {f"t{i}": i for i in range(dims["vocab_size"])}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="t3")),
                                  pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3")
    tok.save_pretrained(out)
    (out / ".complete").write_text(shape)
    return out


def build_rows(n: int, seq_len: int, vocab: int) -> list[dict]:
    """RAG-shaped items: a long prompt (contexts + question) and a short answer, varied lengths."""
    rng = random.Random(SEED)
    rows = []
    for _ in range(n):
        length = rng.randint(seq_len // 2, seq_len)
        answer = rng.randint(length // 16, length // 8)
        ids = [rng.randrange(4, vocab) for _ in range(length - 1)] + [2]
        rows.append({"input_ids": ids, "completion_mask": [0] * (length - answer) + [1] * answer,
                     "labels": [-100] * (length - answer) + ids[length - answer:], "length": length})
    return rows


def flops_per_token(shape: str, mean_len: float) -> float:
    """Model FLOPs per trained token: 6*N (weights, forward + backward) + 12*L*d*T/2 (causal attention)."""
    d = SHAPES[shape]
    h, f, layers, v = d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"], d["vocab_size"]
    kv = h * d["num_key_value_heads"] // d["num_attention_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * f
    params = layers * per_layer + h * v  # LM head (the embedding is a lookup)
    return 6 * params + 12 * layers * h * mean_len / 2


def peak_tflops(device: str, override: float | None) -> float | None:
    if override:
        return override
    if device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")


def counting(trainer_cls):
    """Counts answer tokens and non-padding tokens of training batches."""

    class Counting(trainer_cls):
        answer_tokens = 0
        tokens = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.answer_tokens += int((inputs["labels"][:, 1:] != -100).sum())
                mask = inputs.get("attention_mask")
                self.tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return Counting


def run_plain(model_dir: Path, rows, args, device: str, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=dtype,
                                                 device_map={"": 0} if device == "cuda" else "cpu")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    config = SFTConfig(output_dir=str(out / "plain"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                       learning_rate=2e-4, bf16=device == "cuda", activation_checkpointing=True,
                       max_length=args.seq_len, packing=False, completion_only_loss=True, report_to="none", save_strategy="no", logging_steps=1,
                       seed=SEED, use_cpu=device == "cpu", disable_tqdm=True)
    data = Dataset.from_list([{"input_ids": r["input_ids"], "completion_mask": r["completion_mask"]} for r in rows])
    trainer = counting(SFTTrainer)(model=model, args=config, train_dataset=data,
                                   processing_class=AutoTokenizer.from_pretrained(model_dir), peft_config=lora_config())
    return _timed("plain", trainer, device, config)


def run_ragtune(model_dir: Path, rows, args, device: str, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    from ragtune.api.finetunejob import FineTuneJobSpec
    from ragtune_trainer import base_model as B
    from ragtune_trainer import sft as S

    spec = FineTuneJobSpec.model_validate({
        "baseModel": {"id": "random-llama", "uri": model_dir.as_uri()},
        "dataset": {"train": "file:///unused.jsonl"}, "method": "qlora", "output": {"uri": "file:///unused"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "training": {"maxSteps": args.steps, "batchSize": args.batch_size, "learningRate": 2e-4, "seed": SEED,
                     "lrScheduler": "linear", "warmupRatio": 0, "maxSeqLength": args.seq_len,
                     "checkpointIntervalSteps": args.steps + 1},
        "resources": {"gpus": 1 if device == "cuda" else 0},
    })
    plan = B.detect_plan(spec)
    if device == "cpu":  # the smoke run: the CPU plan, but with the GPU plan's checkpointing
        plan.gradient_checkpointing = True
    torch.manual_seed(SEED)
    model = B.load_model(str(model_dir), "main", spec, plan)
    sampling = S.sampling_strategy(plan, S.random_batch_padding([r["length"] for r in rows], args.batch_size, SEED))
    config = S.build_sft_config(spec, plan, out / "ragtune", args.steps, has_eval=False, sampling=sampling)
    config.save_strategy = "no"
    data = Dataset.from_list([{k: r[k] for k in ("input_ids", "labels", "length")} for r in rows])
    trainer = counting(S.make_trainer_class())(model=model, args=config, train_dataset=data,
                                               processing_class=AutoTokenizer.from_pretrained(model_dir))
    result = _timed("ragtune", trainer, device, config)
    # checkpointing is switched on on the model (load_model), not through the SFTConfig
    result["settings"].update(activation_checkpointing=plan.gradient_checkpointing, padding_free=plan.padding_free)
    return result


def _timed(name: str, trainer, device: str, config) -> dict:
    import torch
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # stdout carries the JSON only
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "steps": trainer.state.global_step, "seconds": round(seconds, 2),
        "answer_tokens_per_s": round(trainer.answer_tokens / seconds, 1),
        "tokens_per_s": round(trainer.tokens / seconds, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "final_loss": next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), None),
        "settings": {"bf16": config.bf16, "activation_checkpointing": config.activation_checkpointing,
                     "batch_size": config.per_device_train_batch_size, "sampler": config.train_sampling_strategy},
    }
    print(f"# {name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def _release(device: str) -> None:
    """Frees the finished run's model and optimiser before the next run loads its own."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU (default: by name)")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ragtune-bench-models")
    args = p.parse_args(argv)

    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and args.shape != "tiny":
        return {"bench": "qlora_gpu", "skipped": "no CUDA device here (the 8B shape needs a GPU; "
                "--shape tiny --device cpu runs the same code on CPU)"}
    model_dir = build_model(args.shape, args.seq_len, device, args.cache)
    rows = build_rows(args.steps * args.batch_size, args.seq_len, SHAPES[args.shape]["vocab_size"])
    mean_len = sum(r["length"] for r in rows) / len(rows)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name, run in (("plain", run_plain), ("ragtune", run_ragtune)):
            runs[name] = run(model_dir, rows, args, device, Path(tmp))
            _release(device)
    peak = peak_tflops(device, args.peak_tflops)
    for r in runs.values():
        r["mfu"] = round(r["tokens_per_s"] * flops_per_token(args.shape, mean_len) / (peak * 1e12), 4) if peak else None
    ours, plain = runs["ragtune"], runs["plain"]
    return {
        "bench": "qlora_gpu",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "shape": args.shape, "seq_len": args.seq_len, "mean_item_tokens": round(mean_len, 1),
        "batch_size": args.batch_size, "steps": args.steps, "peak_bf16_tflops": peak,
        "runs": runs,
        "speedup_answer_tokens": round(ours["answer_tokens_per_s"] / plain["answer_tokens_per_s"], 2),
        "speedup_tokens": round(ours["tokens_per_s"] / plain["tokens_per_s"], 2),
        "peak_memory_ratio": (round(ours["peak_memory_gib"] / plain["peak_memory_gib"], 2)
                              if device == "cuda" else None),
    }


if __name__ == "__main__":
    sys.exit(benchio.run(main))
