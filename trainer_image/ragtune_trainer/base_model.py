"""The base model on this machine: the device plan a spec resolves to (dtype, quantisation,
gradient checkpointing, padding-free rows), the model folder (downloaded once from S3), the
tokenizer, and the model with a fresh LoRA adapter (4-bit nf4 underneath for QLoRA)."""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ragtune.api.finetunejob import FineTuneJobSpec, Method
from ragtune.storage import StorageError, sha256_bytes

from .run import RunContext, TrainerFailure, one_line


@dataclass
class Plan:
    """The concrete settings a spec resolves to on this machine."""

    device: str
    dtype: str  # "float32" | "bfloat16" | "float16"
    quantize_bits: Optional[int]
    gradient_checkpointing: bool
    padding_free: bool
    strategy: Optional[str] = None
    """`ddp`, `fsdp`, or None for one process (set by `load_model`, which knows the weights' size)."""


def plan_for(spec: FineTuneJobSpec, cuda: bool, bf16_ok: bool, flash_attention: bool) -> Plan:
    t = spec.training
    if t.precision == "auto":
        dtype = "bfloat16" if cuda and bf16_ok else "float32"
    else:
        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[t.precision]
    if dtype != "float32" and not cuda:
        raise TrainerFailure("InvalidSpec", f"training.precision {t.precision} needs a GPU; use fp32 or auto on CPU")
    quant = spec.quantization
    bits = quant.bits if quant else (4 if spec.method == Method.QLORA else None)
    # Padding-free rows need an attention that keeps packed items apart: flash-attention varlen
    # kernels do; on CPU, SDPA gets a block-diagonal mask from the position ids (correct, but it
    # computes the masked blocks), so length-grouped batches are the default there.
    padding_free = t.packing if t.packing is not None else (cuda and flash_attention)
    checkpointing = t.gradient_checkpointing if t.gradient_checkpointing is not None else cuda
    return Plan("cuda" if cuda else "cpu", dtype, bits, checkpointing, padding_free)


def detect_plan(spec: FineTuneJobSpec) -> Plan:
    import importlib.util

    import torch

    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    flash = cuda and importlib.util.find_spec("flash_attn") is not None
    return plan_for(spec, cuda, bf16, flash)


def resolve_base_model(ctx: RunContext) -> str:
    """A local folder (downloaded from `baseModel.uri` when it is in S3) or the hub id."""
    ref = ctx.spec.base_model
    if not ref.uri:
        return ref.id
    if ref.uri.startswith("file://"):
        from ragtune.storage import local_path

        path = local_path(ref.uri)
        if not (path / "config.json").is_file():
            raise TrainerFailure("BaseModelNotFound", f"baseModel.uri {ref.uri}: no config.json in {path}")
        return str(path)
    cache = Path(os.environ.get("RAGTUNE_MODEL_CACHE", Path.home() / ".cache/ragtune/base-models"))
    dest = cache / sha256_bytes(f"{ref.uri}@{ref.revision}".encode())[:16]
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the ranks of a node share the cache: one downloads
        if not (dest / ".complete").exists():
            try:
                ctx.storage.download_prefix(ref.uri, dest)
            except StorageError as err:
                reason = "BaseModelNotFound" if err.reason == "S3ObjectNotFound" else err.reason
                raise TrainerFailure(reason, f"baseModel.uri: {err}") from err
            if not (dest / "config.json").is_file():
                raise TrainerFailure("BaseModelNotFound", f"baseModel.uri {ref.uri}: no config.json under the prefix")
            (dest / ".complete").write_text(ref.uri)
    return str(dest)


def load_tokenizer(source: str, revision: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as exc:
        raise TrainerFailure("BaseModelNotFound", f"tokenizer of {source}@{revision} not found: {one_line(exc)}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(source: str, revision: str, spec: FineTuneJobSpec, plan: Plan):
    """Base model (4-bit nf4 for QLoRA) with a fresh LoRA adapter on top."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from . import distributed

    w = distributed.world()
    if w.distributed and plan.device == "cuda":
        torch.cuda.set_device(w.local_rank)  # one GPU per process: "cuda" is this rank's
    dtype = getattr(torch, plan.dtype)
    if w.distributed and plan.strategy is None:
        device_bytes = torch.cuda.get_device_properties(w.local_rank).total_memory if plan.device == "cuda" else None
        weights = distributed.weight_bytes(source, plan.quantize_bits, dtype.itemsize) if device_bytes else None
        plan.strategy = distributed.resolve_strategy(spec, w, plan.device, weights, device_bytes)
    kwargs: dict[str, Any] = {"revision": revision, "dtype": dtype}
    if plan.quantize_bits:
        q = spec.quantization
        compute = dtype if (q is None or q.compute_dtype == "auto") else getattr(torch, q.compute_dtype)
        storage = {}
        if plan.strategy == "fsdp" and plan.quantize_bits == 4:
            # FSDP shards parameters of one dtype: the packed 4-bit weights are stored in the compute dtype.
            storage["bnb_4bit_quant_storage"] = compute
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=plan.quantize_bits == 4,
            load_in_8bit=plan.quantize_bits == 8,
            bnb_4bit_quant_type=q.quant_type if q else "nf4",
            bnb_4bit_use_double_quant=q.double_quant if q else True,
            bnb_4bit_compute_dtype=compute,
            **storage,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()} if plan.device == "cuda" else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise TrainerFailure("BaseModelNotFound", f"base model {source}@{revision} not loadable: {one_line(exc)}")
    if not plan.quantize_bits:
        model.to(plan.device)
    else:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.gradient_checkpointing)
    if plan.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    from .methods import peft_config

    targets = spec.lora.target_modules
    try:
        model = get_peft_model(model, peft_config(spec))
    except ValueError as exc:
        raise TrainerFailure("InvalidSpec", f"lora.targetModules {targets}: {one_line(exc)}")
    if plan.device == "cpu":
        from .lora_dropout import use_bits_dropout

        use_bits_dropout(model)
    return model
