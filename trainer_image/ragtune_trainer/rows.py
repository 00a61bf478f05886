"""Training data into training rows: load and validate the files (`data.py`), split off the held-out
items, build the RAFT items for `rag` data, and tokenise every item once into the row the trainer
consumes: `{input_ids, labels (-100 off the answer), length}`.

Shapes between file and batch: data.Row (a parsed line with file:line) -> data.Example (prompt +
completion) -> training row -> batch. The RAFT length check (`fits`) and the rows share one
tokenisation per item (`Tokenised`), and so do validation and the rows of the other formats."""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from ragtune.api.finetunejob import DatasetFormat
from ragtune.rag.prompt import PromptContract, augmented_messages
from ragtune.rag.records import RagRecord
from ragtune.storage import StorageError

from . import data as D
from . import distributed
from . import hygiene as H
from .run import RunContext, TrainerFailure

EVAL_LOSS_ITEMS = 64
"""Held-out items used for the eval loss curve when there is no validation split (generation-based
evaluation uses maxSamples)."""
VALIDATION_MAX_ITEMS = 512
"""At most this many training items go to the validation split (`dataset.validationSplit`): enough
for a steady loss, few enough that a validation point costs a fraction of the training time."""


@dataclass
class PreparedData:
    train: list[dict]
    """Training rows: input_ids, labels, length."""
    eval: list[dict]
    """Held-out rows for the eval loss curve (at most EVAL_LOSS_ITEMS)."""
    eval_records: list[RagRecord]
    """Held-out RAG records for generation-based evaluation (empty for other formats)."""
    datasets: list[dict[str, Optional[str]]]
    """`{uri, etag}` of every file read (for the manifest)."""
    construction: dict[str, dict[str, int]] = field(default_factory=dict)
    """RAFT construction counts (`train`, `eval`): items per construction, fallbacks, drops."""
    few_shot: list[RagRecord] = field(default_factory=list)
    """Training items for the few-shot baseline (`evaluation.fewShot`)."""
    train_records: list[RagRecord] = field(default_factory=list)
    """The RAFT training items (`rag` data): the preference stage renders its pairs from them."""
    hygiene: Optional[dict] = None
    """`hygiene.check` of the records as given (after the split), wire form: the report's `dataHygiene`."""
    validation: list[dict] = field(default_factory=list)
    """Validation rows (`dataset.validationSplit`, carved from the training items); empty without one."""

    @property
    def loss_rows(self) -> list[dict]:
        """The rows the Trainer's eval loop scores while training: the validation split when
        there is one, else (as before validation splits existed) the held-out rows."""
        return self.validation or self.eval


class Tokenised:
    """Each example's training row, tokenised on first use and remembered (keyed by the example's
    text), so checking an item's length and training on it cost one tokenisation."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._rows: dict[str, dict] = {}
        self.calls = 0
        """Tokenisations done (what the cache saved is the number of lookups minus this)."""

    def __call__(self, example: D.Example) -> dict:
        key = json.dumps([example.prompt, example.completion])
        row = self._rows.get(key)
        if row is None:
            self.calls += 1
            t = D.tokenize(self.tokenizer, example)
            labels = [tok if m else -100 for tok, m in zip(t["input_ids"], t["completion_mask"])]
            row = self._rows[key] = {"input_ids": t["input_ids"], "labels": labels, "length": len(labels)}
        return row


def rag_example(record: RagRecord, prompt: PromptContract) -> D.Example:
    return D.Example(prompt.messages(record), record.answer, record)


def augmented_examples(records: list[RagRecord], ctx: RunContext, prompt: PromptContract, tokenised: Tokenised,
                       ) -> tuple[list[D.Example], int]:
    """`prompt.augment`: a share of the items under prompt variations (an item whose variation
    would exceed maxSeqLength keeps the contract's rendering) -> (examples, variations used)."""
    spec = ctx.spec
    examples, varied = [], 0
    for i, r in enumerate(records):
        turns = augmented_messages(prompt, r, spec.training.seed, i, spec.prompt.augment_fraction)
        example = D.Example(turns[:2], turns[2]["content"], r)
        if turns[:2] != prompt.messages(r) and tokenised(example)["length"] <= spec.training.max_seq_length:
            varied += 1
        else:
            example = rag_example(r, prompt)
        examples.append(example)
    return examples, varied


def load_and_check(uri: str, ctx: RunContext, tokenised: Tokenised) -> tuple[D.LoadedData, list[D.Example]]:
    spec = ctx.spec
    prompt = PromptContract.from_spec(spec)
    try:
        loaded = D.load_rows(uri, ctx.storage)
    except StorageError as err:
        raise TrainerFailure(err.reason, f"dataset: {err}") from err
    report, examples = D.validate(loaded, spec.dataset.format, tokenizer=tokenised.tokenizer,
                                  max_seq_length=spec.training.max_seq_length, refusal=prompt.refusal,
                                  encode=tokenised, prompt=prompt)
    if not report.ok:
        raise TrainerFailure("InvalidDataset", report.render())
    return loaded, examples


def few_shot_examples(records: list[RagRecord], k: int) -> list[RagRecord]:
    """`k` training items, answerable and unanswerable in turn (answerable first), in data order
    (already seeded by the RAFT construction)."""
    answerable = [r for r in records if r.answerable]
    unanswerable = [r for r in records if not r.answerable]
    out: list[RagRecord] = []
    while len(out) < k and (answerable or unanswerable):
        for pool in (answerable, unanswerable):
            if pool and len(out) < k:
                out.append(pool.pop(0))
    return out


def prepare_data(ctx: RunContext, tokenizer) -> PreparedData:
    spec = ctx.spec
    ds, seed = spec.dataset, spec.training.seed
    prompt = PromptContract.from_spec(spec)
    tokenised = Tokenised(tokenizer)
    train_data, train_ex = load_and_check(ds.train, ctx, tokenised)
    objects = list(train_data.objects)
    if ds.eval:
        eval_data, eval_ex = load_and_check(ds.eval, ctx, tokenised)
        objects += eval_data.objects
        hygiene = H.check([D.hygiene_item(e) for e in train_ex], [D.hygiene_item(e) for e in eval_ex])
        if not hygiene.ok:  # gates measured on trained items would pass a memorising adapter
            raise TrainerFailure("InvalidDataset", hygiene.overlap_message())
    else:  # copies of an item stay on one side, so the held-out split never repeats a training item
        items = [D.hygiene_item(e) for e in train_ex]
        train_idx, eval_idx = D.split(list(range(len(items))), ds.eval_split, seed, groups=H.groups(items))
        train_ex, eval_ex = [train_ex[i] for i in train_idx], [train_ex[i] for i in eval_idx]
        hygiene = H.check([items[i] for i in train_idx], [items[i] for i in eval_idx], eval_origin="split")
    if distributed.world().main:
        print(f"ragtune train: data hygiene: {hygiene.summary()}", file=sys.stderr)
    train_ex, val_ex = validation_split(train_ex, ds.validation_split, seed, ds.train)
    eval_records: list[RagRecord] = []
    construction: dict[str, dict[str, int]] = {}
    few_shot: list[RagRecord] = []
    train_recs: list[RagRecord] = []
    if ds.format == DatasetFormat.RAG:
        max_len = spec.training.max_seq_length

        def fits(record: RagRecord) -> bool:
            return tokenised(rag_example(record, prompt))["length"] <= max_len

        train_stats, eval_stats = Counter(), Counter()
        raft = ds.raft.model_copy(update={"refusal": prompt.refusal})  # unanswerable items target the contract's refusal
        train_recs = D.build_raft([e.record for e in train_ex], raft, seed, fits=fits, stats=train_stats)
        # The held-out items are built the hard way whatever the recipe: recipes are gated on one test.
        eval_records = D.build_raft([e.record for e in eval_ex], D.evaluation_raft(raft), seed + 1, fits=fits,
                                    stats=eval_stats)
        if spec.prompt.augment:
            train_ex, train_stats["promptVariants"] = augmented_examples(train_recs, ctx, prompt, tokenised)
        else:
            train_ex = [rag_example(r, prompt) for r in train_recs]
        eval_ex = [rag_example(r, prompt) for r in eval_records]
        construction = {"train": dict(train_stats), "eval": dict(eval_stats)}
        if val_ex:  # built like the training items (the recipe), without prompt variations
            val_stats = Counter()
            val_recs = D.build_raft([e.record for e in val_ex], raft, seed + 2, fits=fits, stats=val_stats)
            val_ex = [rag_example(r, prompt) for r in val_recs]
            construction["validation"] = dict(val_stats)
        few_shot = few_shot_examples(train_recs, spec.evaluation.few_shot)
    train_rows = [tokenised(ex) for ex in train_ex]
    if not train_rows:
        raise TrainerFailure("InvalidDataset", f"{ds.train}: no training records left after the eval split")
    return PreparedData(
        train=train_rows,
        eval=[tokenised(ex) for ex in eval_ex[:EVAL_LOSS_ITEMS]],
        eval_records=eval_records,
        datasets=objects,
        construction=construction,
        few_shot=few_shot,
        train_records=train_recs,
        hygiene=hygiene.to_wire(),
        validation=[tokenised(ex) for ex in val_ex],
    )


def validation_split(train_ex: list[D.Example], fraction: float, seed: int, uri: str,
                     ) -> tuple[list[D.Example], list[D.Example]]:
    """(training, validation) examples: `fraction` of the training items (at most
    VALIDATION_MAX_ITEMS), copies of an item on one side, seeded apart from the held-out split.
    0: no validation split."""
    if fraction <= 0:
        return train_ex, []
    items = [D.hygiene_item(e) for e in train_ex]
    if len(items) < 2:
        raise TrainerFailure("InvalidDataset", f"{uri}: dataset.validationSplit needs at least 2 training items "
                                               f"after the held-out split, found {len(items)}")
    share = min(fraction, VALIDATION_MAX_ITEMS / len(items))
    train_idx, val_idx = D.split(list(range(len(items))), share, seed + 2, groups=H.groups(items))
    return [train_ex[i] for i in train_idx], [train_ex[i] for i in val_idx]
