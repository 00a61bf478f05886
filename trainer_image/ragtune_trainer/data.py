"""Training data: load JSONL/Parquet from `s3://` or `file://`, validate every row (with file and
line), build the RAFT training set and the train/eval split, and tokenise with the loss mask.

Three record formats (spec.dataset.format):
- `rag`: {id?, question, contexts: [{id, text}], answer, answerable?, supportingContextIds?, rejected?}
  (`rejected`: a wrong answer, the other side of a preference pair; see `preference.py`)
- `messages`: {messages: [{role, content}, ...]} ending with an assistant turn (the target)
- `prompt-completion`: {prompt, completion} (plain text, no chat template)
"""

from __future__ import annotations

import io
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from ragtune.api.finetunejob import DatasetFormat, DistractorStrategy, RaftConfig, UnanswerableMix
from ragtune.rag.metrics import parse_citations
from ragtune.rag.prompt import DEFAULT_REFUSAL, PromptContract, apply_template, build_messages
from ragtune.rag.records import Context, RagRecord
from ragtune.storage import Storage, StorageError, local_path

from .hygiene import Item

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
MAX_REPORTED_ERRORS = 200  # the report counts every bad row; it prints the first ones in full


# --- Loading ---------------------------------------------------------------------------


@dataclass
class Row:
    source: str
    """URI of the file the row came from."""
    line: int
    """1-based line (JSONL) or row number (Parquet)."""
    data: Any
    """The parsed object, or None when the line is not valid JSON (see `parse_error`)."""
    parse_error: Optional[str] = None

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass
class LoadedData:
    uri: str
    rows: list[Row]
    objects: list[dict[str, Optional[str]]]
    """`{uri, etag}` of every object read (for the manifest)."""


def resolve_objects(uri: str, storage: Storage) -> list[tuple[str, Optional[str]]]:
    """A single object, or every data file under a prefix -> [(uri, etag)]."""
    if not uri.endswith("/"):
        info = storage.head(uri)
        if info is not None:
            return [(info.uri if uri.startswith("s3://") else uri, info.etag)]
    objects = [o for o in storage.list(uri.rstrip("/") + "/") if o.uri.lower().endswith(DATA_SUFFIXES)]
    if not objects:
        raise StorageError("S3ObjectNotFound", f"{uri}: no such object, and no {'/'.join(DATA_SUFFIXES)} files under it")
    return [(o.uri, o.etag) for o in objects]


def load_rows(uri: str, storage: Optional[Storage] = None) -> LoadedData:
    """Read every row of every file at `uri` (object or prefix). Unparseable lines become rows with
    `parse_error` so validation reports them with the rest."""
    storage = storage or Storage()
    rows: list[Row] = []
    objects = []
    for obj_uri, etag in resolve_objects(uri, storage):
        objects.append({"uri": obj_uri, "etag": etag})
        if obj_uri.lower().endswith(".parquet"):
            rows.extend(_parquet_rows(obj_uri, storage))
        else:
            rows.extend(_jsonl_rows(obj_uri, storage.get_bytes(obj_uri)))
    return LoadedData(uri=uri, rows=rows, objects=objects)


def _jsonl_rows(uri: str, data: bytes) -> list[Row]:
    rows = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return [Row(uri, 1, None, f"not UTF-8 text ({exc})")]
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(Row(uri, n, json.loads(line)))
        except json.JSONDecodeError as exc:
            rows.append(Row(uri, n, None, f"invalid JSON: {exc.msg} at column {exc.colno}"))
    return rows


def _parquet_rows(uri: str, storage: Storage) -> list[Row]:
    import pyarrow.parquet as pq

    if uri.startswith("s3://"):
        table = pq.read_table(io.BytesIO(storage.get_bytes(uri)))
    else:
        table = pq.read_table(local_path(uri))
    return [Row(uri, i, d) for i, d in enumerate(table.to_pylist(), start=1)]


# --- Parsing ---------------------------------------------------------------------------


@dataclass
class Example:
    """One training item: a prompt (chat messages, or raw text) and the completion the loss is on."""

    prompt: Union[list[dict], str]
    completion: str
    record: Optional[RagRecord] = None
    where: str = ""
    """file:line of the row it was parsed from (set by `validate`; hygiene names items by it)."""
    source: str = ""
    """URI of that file."""


def parse_rag(row: Row, refusal: str = DEFAULT_REFUSAL) -> RagRecord:
    """A `rag` row -> RagRecord; ValueError names the problem. The id defaults to file:line and an
    unanswerable record without an answer targets the refusal."""
    d = row.data
    if not isinstance(d, dict):
        raise ValueError(f"record must be a JSON object, got {type(d).__name__}")
    d = dict(d)
    d.setdefault("id", f"{Path(row.source).name}:{row.line}")
    if d.get("answerable") is False and not d.get("answer"):
        d["answer"] = refusal
    return RagRecord.from_dict(d)


def parse_example(row: Row, fmt: DatasetFormat, refusal: str = DEFAULT_REFUSAL,
                  prompt: Optional[PromptContract] = None) -> Example:
    d = row.data
    if fmt == DatasetFormat.RAG:
        record = parse_rag(row, refusal)
        return Example(build_messages(record, refusal=refusal, prompt=prompt)[:2], record.answer, record)
    if not isinstance(d, dict):
        raise ValueError(f"record must be a JSON object, got {type(d).__name__}")
    if fmt == DatasetFormat.MESSAGES:
        messages = d.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("missing field(s): messages (a list of {role, content})")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be {{role: system|user|assistant, content: string}}")
        if messages[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's (the training target)")
        if not any(m["role"] == "user" for m in messages):
            raise ValueError("messages need at least one user turn")
        return Example([dict(role=m["role"], content=m["content"]) for m in messages[:-1]], messages[-1]["content"])
    missing = [k for k in ("prompt", "completion") if not isinstance(d.get(k), str)]
    if missing:
        raise ValueError(f"missing field(s): {', '.join(missing)} (strings)")
    return Example(d["prompt"], d["completion"])


# --- Validation ------------------------------------------------------------------------


@dataclass
class RowError:
    where: str
    kind: str
    """Short category for the summary, e.g. `missing field`, `empty answer`."""
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class ValidationReport:
    uri: str
    format: str
    files: int
    rows: int
    errors: list[RowError] = field(default_factory=list)
    max_tokens: Optional[int] = None

    @property
    def ok(self) -> bool:
        return not self.errors and self.rows > 0

    @property
    def summary(self) -> str:
        if self.rows == 0:
            return f"{self.uri}: no records in {self.files} file(s)"
        head = f"{self.uri}: {self.rows} record(s) in {self.files} file(s), format {self.format}"
        if self.max_tokens is not None:
            head += f", longest {self.max_tokens} tokens"
        if not self.errors:
            return head + ": valid"
        bad_rows = len({e.where for e in self.errors})
        kinds = ", ".join(f"{k}: {n}" for k, n in Counter(e.kind for e in self.errors).most_common())
        return f"{head}: {bad_rows} invalid row(s) ({kinds})"

    def render(self) -> str:
        lines = [str(e) for e in self.errors[:MAX_REPORTED_ERRORS]]
        if len(self.errors) > MAX_REPORTED_ERRORS:
            lines.append(f"... and {len(self.errors) - MAX_REPORTED_ERRORS} more")
        return "\n".join(lines + [self.summary])


def _rag_errors(record: RagRecord, prompt: Optional[PromptContract] = None) -> list[tuple[str, str]]:
    errors = []
    if not record.question.strip():
        errors.append(("empty question", "field 'question' is empty"))
    if record.answerable and not record.answer.strip():
        errors.append(("empty answer", "field 'answer' is empty (set answerable: false for a refusal target)"))
    if record.answerable and not record.contexts:
        errors.append(("no contexts", "field 'contexts' is empty on an answerable record"))
    ids = [c.id for c in record.contexts]
    dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dupes:
        errors.append(("duplicate context id", f"duplicate context id(s) {', '.join(dupes)} in 'contexts'"))
    for i, c in enumerate(record.contexts):
        if not c.text.strip():
            errors.append(("empty context", f"contexts[{i}] (id {c.id}) has empty text"))
    known = set(ids)
    cite = (prompt or PromptContract()).cite
    unknown = [c for c in parse_citations(record.answer, (prompt or PromptContract()).citation) if c not in known]
    if unknown:
        errors.append(("unknown citation", f"answer cites context id(s) {', '.join(cite(u) for u in unknown)} "
                                           f"that are not in 'contexts' (ids: {', '.join(ids) or 'none'})"))
    if record.rejected is not None:
        if not record.rejected.strip():
            errors.append(("empty rejected", "field 'rejected' is empty (leave it out when there is no wrong answer)"))
        elif " ".join(record.rejected.split()) == " ".join(record.answer.split()):
            errors.append(("rejected equals answer", "field 'rejected' is the same text as the answer "
                                                     "(a preference pair needs a different, wrong answer)"))
    missing_support = [s for s in record.supporting_context_ids if s not in known]
    if missing_support:
        errors.append(("unknown supporting id", f"supportingContextIds {', '.join(missing_support)} not in 'contexts'"))
    return errors


def validate(
    data: LoadedData,
    fmt: DatasetFormat | str = DatasetFormat.RAG,
    *,
    tokenizer=None,
    max_seq_length: Optional[int] = None,
    refusal: str = DEFAULT_REFUSAL,
    encode: Optional[Callable[[Example], dict]] = None,
    prompt: Optional[PromptContract] = None,
) -> tuple[ValidationReport, list[Example]]:
    """Check every row; returns the report and the parsed examples of the valid rows. With a
    tokenizer, rows longer than `max_seq_length` tokens (prompt + answer) are errors too. `encode`
    replaces `tokenize(tokenizer, example)` (the trainer passes its memo, so an item checked here is
    not tokenised again for training). `prompt` (default: ragtune's prompt with `refusal`) renders
    the rows and gives the citation form answers are checked in."""
    fmt = DatasetFormat(fmt)
    report = ValidationReport(uri=data.uri, format=fmt.value, files=len(data.objects), rows=len(data.rows))
    examples = []
    seen_ids: dict[str, str] = {}
    for row in data.rows:
        if row.parse_error:
            report.errors.append(RowError(row.where, "invalid JSON", row.parse_error))
            continue
        try:
            example = parse_example(row, fmt, refusal, prompt)
        except ValueError as exc:
            kind = "missing field" if str(exc).startswith("missing field") else "malformed record"
            report.errors.append(RowError(row.where, kind, str(exc)))
            continue
        problems = _rag_errors(example.record, prompt) if example.record else []
        if example.record:
            first = seen_ids.setdefault(example.record.id, row.where)
            if first != row.where:
                problems.append(("duplicate record id", f"record id {example.record.id!r} already used at {first}"))
        elif not example.completion.strip():
            problems.append(("empty answer", "the target (completion / last assistant message) is empty"))
        if tokenizer is not None and not problems:
            n = len((encode(example) if encode else tokenize(tokenizer, example))["input_ids"])
            report.max_tokens = max(report.max_tokens or 0, n)
            if max_seq_length is not None and n > max_seq_length:
                problems.append(("over-length", f"{n} tokens after tokenisation > maxSeqLength {max_seq_length}"))
        report.errors.extend(RowError(row.where, kind, msg) for kind, msg in problems)
        if not problems:
            example.where, example.source = row.where, row.source
            examples.append(example)
    return report, examples


def hygiene_item(example: Example) -> Item:
    """What `hygiene.check` compares of an example: a `rag` record's question, context texts,
    answer and label; for the other formats the user turns (or the prompt) and the target."""
    r = example.record
    if r is not None:
        return Item(example.where, example.source, r.question, tuple(c.text for c in r.contexts), r.answer,
                    r.answerable)
    question = example.prompt if isinstance(example.prompt, str) else \
        "\n".join(m["content"] for m in example.prompt if m["role"] == "user")
    return Item(example.where, example.source, question, (), example.completion)


# --- Tokenisation ----------------------------------------------------------------------


def tokenize(tokenizer, example: Example) -> dict[str, list[int]]:
    """`input_ids` and `completion_mask` (1 on the answer tokens, incl. the end-of-turn token)."""
    if isinstance(example.prompt, str):
        prompt_ids = tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
        completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            completion_ids = completion_ids + [tokenizer.eos_token_id]
    else:
        prompt_text = apply_template(tokenizer, example.prompt, add_generation_prompt=True)
        full_text = apply_template(
            tokenizer, example.prompt + [{"role": "assistant", "content": example.completion}],
            add_generation_prompt=False,
        )
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        if full_text.startswith(prompt_text):
            completion_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
        else:  # templates that rewrite earlier turns: split the full tokenisation at the prompt length
            full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
            completion_ids = full_ids[len(prompt_ids):]
    return {"input_ids": prompt_ids + completion_ids,
            "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids)}


# --- RAFT and splits -------------------------------------------------------------------


def split(items: list, eval_fraction: float, seed: int, groups: Optional[list[int]] = None) -> tuple[list, list]:
    """Deterministic shuffle-split: (train, eval), each non-empty when there are >= 2 items (>= 2
    groups). `groups` (`hygiene.groups`): items of one group land on the same side, whole groups
    are shuffled and taken while they fit the eval share; one per item (the default) is the plain
    shuffle-split."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups if groups is not None else range(len(items))):
        members.setdefault(g, []).append(i)
    order = list(members)
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(items) * eval_fraction)), len(items) - 1) if len(items) > 1 else 0
    eval_idx: set[int] = set()
    for g in order:
        if len(eval_idx) + len(members[g]) <= n_eval:
            eval_idx.update(members[g])
        if len(eval_idx) == n_eval:
            break
    if not eval_idx and len(order) > 1:  # every group is bigger than the eval share: hold out the smallest
        eval_idx.update(min((members[g] for g in order), key=len))
    return ([x for i, x in enumerate(items) if i not in eval_idx], [x for i, x in enumerate(items) if i in eval_idx])


# The held-out split is built the hard way whatever the recipe (RaftConfig docstring).
EVAL_MIX = UnanswerableMix(near_miss=1, answer_removed=1, off_topic=1)


def evaluation_raft(raft: RaftConfig) -> RaftConfig:
    """The construction of the held-out split: the recipe's counts and refusal, with similar
    distractors and equal parts of every unanswerable construction."""
    return raft.model_copy(update={"distractor_strategy": DistractorStrategy.SIMILAR, "unanswerable_mix": EVAL_MIX})


def _allocate(n: int, weights: dict[str, float], rng: random.Random) -> list[str]:
    """`n` construction labels in proportion to `weights` (largest remainder), shuffled."""
    total = sum(weights.values())
    exact = {k: n * w / total for k, w in weights.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: (counts[k] - exact[k], k))[: n - sum(counts.values())]:
        counts[k] += 1
    labels = [k for k in weights for _ in range(counts[k])]
    rng.shuffle(labels)
    return labels


def build_raft(
    records: list[RagRecord],
    raft: RaftConfig,
    seed: int,
    *,
    fits: Optional[Callable[[RagRecord], bool]] = None,
    stats: Optional[Counter] = None,
) -> list[RagRecord]:
    """RAFT items, each labelled with its `construction`:
    - answerable records get `raft.distractors` contexts of other records (the BM25-nearest to
      the question for `similar`, random ones for `random`);
    - `unanswerableFraction` of them become refusals, built per `raft.unanswerableMix`
      (nearMiss / answerRemoved / offTopic, see UnanswerableMix);
    - records marked `answerable: false` pass through (`userLabelled`), with distractors.
    Gold passages and exact duplicates of an item's own contexts are never distractors. A
    constructed refusal whose contexts still contain the answer string is dropped. Deterministic
    by seed; `fits` drops distractors until an item fits. `stats` counts what happened
    (items per construction, fallbacks, drops)."""
    from .hard_negatives import PassageIndex, answer_key, contains_answer, remove_answer_sentences

    stats = stats if stats is not None else Counter()
    rng = random.Random(seed)
    answerable = [i for i, r in enumerate(records) if r.answerable]
    n_refuse = round(len(answerable) * raft.unanswerable_fraction)
    to_refuse = sorted(rng.sample(answerable, n_refuse)) if n_refuse else []
    mix = raft.unanswerable_mix
    weights = {k: w for k, w in (("nearMiss", mix.near_miss), ("answerRemoved", mix.answer_removed),
                                 ("offTopic", mix.off_topic)) if w > 0}
    kinds = dict(zip(to_refuse, _allocate(n_refuse, weights, rng)))
    index = PassageIndex([c.text for c in r.contexts] for r in records)
    similar = raft.distractor_strategy == DistractorStrategy.SIMILAR
    out = []
    for i, rec in enumerate(records):
        kind = kinds.get(i, "answerable" if rec.answerable else "userLabelled")
        gold = set(rec.supporting_context_ids) or {c.id for c in rec.contexts}
        key = answer_key(rec.answer) if rec.answerable else None
        own = list(rec.contexts)
        if kind == "answerRemoved":
            own, deleted = [], 0
            for c in rec.contexts:
                if c.id in gold and key:
                    text, n = remove_answer_sentences(c.text, key)
                    deleted += n
                    if text:
                        own.append(Context(c.id, text))
                else:
                    own.append(c)
            if not deleted:  # answer not found in a gold passage (or yes/no): build a near miss
                stats["answerRemovedNotLocated"] += 1
                kind, own = "nearMiss", list(rec.contexts)
        if kind in ("nearMiss", "offTopic"):
            own = [c for c in rec.contexts if c.id not in gold]
        refuse = kind != "answerable"
        wanted = raft.distractors
        if kind == "nearMiss":  # the gold passages' places are taken by their nearest neighbours
            wanted += len(rec.contexts) - len(own)
        elif refuse and not own:
            wanted += 1  # never an empty prompt
        excluded = {index.key(c.text) for c in rec.contexts}

        def usable(p, count: bool = False) -> bool:
            if i in p.owners or index.key(p.text) in excluded:
                return False
            if refuse and contains_answer(p.text, key):
                if count:  # a retrieved, on-topic passage that states the answer: not a negative
                    stats["answerBearingSkipped"] += 1
                return False
            return True

        if kind == "nearMiss" or (similar and kind != "offTopic"):
            picked = []
            for j in index.ranked(rec.question):
                if len(picked) == wanted:
                    break
                if usable(index.passages[j], count=True):
                    picked.append(j)
            if len(picked) < wanted:  # too few passages share a word with the question
                stats["similarShort"] += 1
                rest = [j for j in range(len(index.passages)) if j not in picked and usable(index.passages[j])]
                picked += rng.sample(rest, min(wanted - len(picked), len(rest)))
        else:
            candidates = [j for j, p in enumerate(index.passages) if usable(p)]
            picked = rng.sample(candidates, min(wanted, len(candidates)))
        used_ids = {c.id for c in rec.contexts}
        distractors = []
        for j in picked:
            new_id = _fresh_id(used_ids)
            used_ids.add(new_id)
            distractors.append(Context(new_id, index.passages[j].text))
        contexts = own + distractors
        rng.shuffle(contexts)
        if refuse and rec.answerable and any(contains_answer(c.text, key) for c in contexts):
            stats[f"dropped.{kind}.answerStillPresent"] += 1
            continue
        item = RagRecord(
            id=rec.id,
            question=rec.question,
            contexts=contexts,
            answer=raft.refusal if refuse else rec.answer,
            answerable=not refuse,
            supporting_context_ids=[] if refuse else list(rec.supporting_context_ids),
            construction=kind,
            rejected=rec.rejected,  # on a constructed refusal: a wrong answer where refusing is right
        )
        while fits is not None and not fits(item) and len(item.contexts) > 1 \
                and any(c in distractors for c in item.contexts):
            drop = next(c for c in reversed(item.contexts) if c in distractors)
            item.contexts.remove(drop)
        stats[kind] += 1
        out.append(_renumber(item))
    return out


_CITATION_GROUP = re.compile(r"\[([^\[\]]+)\]")


def _renumber(item: RagRecord) -> RagRecord:
    """Number the contexts 1..n in the order shown and rewrite citations to match. Without this the
    ids leak the construction (distractors get ids after the record's own, so a prompt without
    `[1]` would mean "refuse"), a shortcut the model would learn instead of reading."""
    mapping = {c.id: str(k) for k, c in enumerate(item.contexts, start=1)}

    def rewrite(match: re.Match) -> str:
        ids = [part.strip() for part in match.group(1).split(",")]
        if not all(i in mapping for i in ids):
            return match.group(0)  # not a citation of a shown context: leave the text alone
        return "[" + ", ".join(mapping[i] for i in ids) + "]"

    item.contexts = [Context(mapping[c.id], c.text) for c in item.contexts]
    item.supporting_context_ids = [mapping[i] for i in item.supporting_context_ids if i in mapping]
    if item.answerable:
        item.answer = _CITATION_GROUP.sub(rewrite, item.answer)
    if item.rejected is not None:  # its citations point at the same passages as the answer's
        item.rejected = _CITATION_GROUP.sub(rewrite, item.rejected)
    return item


def _fresh_id(used: set[str]) -> str:
    n = len(used) + 1
    while str(n) in used:
        n += 1
    return str(n)
