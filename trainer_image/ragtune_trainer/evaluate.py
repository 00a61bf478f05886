"""Held-out evaluation: the same prompts answered by the base model (adapter disabled) and by
the adapter, scored with `ragtune.rag.metrics.score`; and the adapter once more under the fixed
foreign prompt (`ragtune.rag.prompt.foreign_prompt`), so the report shows whether it keeps its
behaviour in another application's prompt. That third pass costs 50% more generation.

Generation is greedy so base and adapter are compared on their most likely answers and the
numbers are reproducible. On CPU it is the slowest part of a small run, hence: prompts sorted by
length (little padding per batch), batched with left padding, KV cache on, no autograd.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from ragtune.api.common import EvalMetrics
from ragtune.api.finetunejob import FineTuneJobSpec
from ragtune.rag.intervals import DEFAULT_CONFIDENCE, bootstrap_intervals
from ragtune.rag.metrics import construction_of, score
from ragtune.rag.prompt import PromptContract, foreign_prompt, render_prompt
from ragtune.rag.records import RagRecord

Progress = Callable[[int, int], None]
"""`progress(done, total)`: items generated so far over the three passes (base, adapter, adapter
under the foreign prompt)."""

# Tokens (prompt + new) per generation batch: keeps activation + KV-cache memory bounded while
# still batching many short prompts together.
TOKEN_BUDGET = 16384
MAX_BATCH = 32


@dataclass
class EvalOutcome:
    base: EvalMetrics
    adapter: EvalMetrics
    foreign: Optional[EvalMetrics] = None
    """The adapter under the foreign prompt."""
    few_shot_base: Optional[EvalMetrics] = None
    """The base model prompted with `evaluation.fewShot` training items first."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    """Per item: id, question, contexts, answerable, construction (how the item was built),
    reference, base, adapter, foreign (answers)."""
    seconds: float = 0.0
    intervals: Optional[dict[str, Any]] = None
    """Paired bootstrap intervals of base, adapter and adapter - base (`rag.intervals`)."""
    quantized_adapter: Optional[EvalMetrics] = None
    """QLoRA: the adapter on the 4-bit base it trained on; every other figure is on the
    unquantised base that servers load (`served.py`)."""


def _eos_ids(model, tokenizer) -> list[int]:
    """Every token that ends an answer: the tokenizer's EOS and the model's generation EOS
    (chat models often end turns with a token such as `<|im_end|>` that is not the EOS)."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, configured):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and token not in ids:
                ids.append(int(token))
    return ids


def generate_answers(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    progress: Optional[Callable[[int], None]] = None,
    max_batch: int = MAX_BATCH,
) -> list[str]:
    """Greedy answers to chat-formatted `prompts`, in the order given."""
    import torch

    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    eos = _eos_ids(model, tokenizer)
    if not eos:
        raise ValueError("the tokenizer has no EOS token and the model's generation config names none")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(prompts)

    start = 0
    while start < len(order):
        # The longest prompt of a batch is its last one (sorted), so the budget check is exact.
        size = 1
        while (start + size < len(order) and size < max_batch
               and (size + 1) * (len(encoded[order[start + size]]) + max_new_tokens) <= TOKEN_BUDGET):
            size += 1
        batch = order[start:start + size]
        width = max(len(encoded[i]) for i in batch)
        # Left padding: every row's last prompt token sits at the same position, where
        # generation continues.
        ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in batch], device=device)
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in batch], device=device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                do_sample=False, temperature=None, top_p=None, top_k=None,
                use_cache=True, pad_token_id=pad, eos_token_id=eos,
            )
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for i, text in zip(batch, texts):
            answers[i] = text.strip()
        start += size
        if progress:
            progress(size)
    return answers


def evaluate_run(
    model,
    tokenizer,
    records: list[RagRecord],
    spec: FineTuneJobSpec,
    progress: Optional[Progress] = None,
    few_shot: Sequence[RagRecord] = (),
) -> EvalOutcome:
    """Answer at most `spec.evaluation.maxSamples` held-out records with the adapter disabled
    (base) and enabled (adapter) under the spec's prompt, and with the adapter under the foreign
    prompt, and the base with the `few_shot` training items first (when given); score each.
    `model` must be a peft model."""
    if not hasattr(model, "disable_adapter"):
        raise TypeError(f"evaluate_run needs a peft model (with disable_adapter()), got {type(model).__name__}")
    started = time.monotonic()
    records = records[: spec.evaluation.max_samples]
    contract = PromptContract.from_spec(spec)
    prompts = [render_prompt(tokenizer, r, prompt=contract) for r in records]
    foreign_prompts = [render_prompt(tokenizer, r, prompt=foreign_prompt(contract)) for r in records]
    shot_prompts = [render_prompt(tokenizer, r, prompt=contract, examples=few_shot) for r in records] if few_shot else []
    total, done = 3 * len(records) + len(shot_prompts), 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    max_new = spec.evaluation.max_new_tokens
    was_training = model.training
    model.eval()  # no dropout: greedy answers must be deterministic
    try:
        with model.disable_adapter():
            base_answers = generate_answers(model, tokenizer, prompts, max_new, advance)
            shot_answers = generate_answers(model, tokenizer, shot_prompts, max_new, advance) if shot_prompts else []
        adapter_answers = generate_answers(model, tokenizer, prompts, max_new, advance)
        foreign_answers = generate_answers(model, tokenizer, foreign_prompts, max_new, advance)
    finally:
        model.train(was_training)

    samples = [
        {
            "id": r.id,
            "question": r.question,
            "contexts": [{"id": c.id, "text": c.text} for c in r.contexts],
            "answerable": r.answerable,
            "construction": construction_of(r),
            "reference": r.answer,
            "base": b,
            "adapter": a,
            "foreign": f,
            **({"fewShotBase": shot_answers[i]} if shot_answers else {}),
        }
        for i, (r, b, a, f) in enumerate(zip(records, base_answers, adapter_answers, foreign_answers))
    ]
    confidence = spec.evaluation.thresholds.confidence or DEFAULT_CONFIDENCE
    return EvalOutcome(
        base=score(records, base_answers, prompt=contract),
        adapter=score(records, adapter_answers, prompt=contract),
        foreign=score(records, foreign_answers, prompt=contract),
        few_shot_base=score(records, shot_answers, prompt=contract) if shot_answers else None,
        samples=samples,
        seconds=round(time.monotonic() - started, 3),
        intervals=bootstrap_intervals(records, {"base": base_answers, "adapter": adapter_answers}, contract,
                                      confidence=confidence, seed=spec.training.seed),
    )
