"""Synthetic RAG records about invented entities (so no model can know the answer without the
context): single-context answerable, two-context answerable with two citations, and unanswerable
items whose contexts talk about something else. Deterministic by seed; used by tests, benches
and `examples/data/generate_synthetic.py`."""

from __future__ import annotations

import random

from ragtune.rag.prompt import DEFAULT_REFUSAL
from ragtune.rag.records import Context, RagRecord

_SYLLABLES = ["ka", "lo", "mir", "ven", "tor", "sa", "ul", "dra", "pen", "zo", "ri", "gal", "fe", "nor", "bi", "ques"]
_COLOURS = ["red", "blue", "green", "amber", "violet", "silver", "black", "white"]
_FRUITS = ["apples", "pears", "plums", "figs", "dates", "lemons", "melons", "grapes"]
_CRAFTS = ["weaving", "pottery", "glassmaking", "shipbuilding", "clockmaking", "brewing", "mining", "printing"]

# (fact sentence, question, answer) templates about an entity {e} with value {v}
_FACTS = [
    ("The capital of {e} is {v}.", "What is the capital of {e}?", "{v}", "name"),
    ("The flag of {e} is mostly {v}.", "What colour is the flag of {e}?", "{v}", "colour"),
    ("Farmers in {e} mainly grow {v}.", "What do farmers in {e} mainly grow?", "{v}", "fruit"),
    ("{e} is famous for its {v}.", "What is {e} famous for?", "its {v}", "craft"),
    ("{e} was founded in the year {v}.", "In which year was {e} founded?", "{v}", "year"),
]


def _name(rng: random.Random, parts: int = 3) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def _value(rng: random.Random, kind: str) -> str:
    if kind == "name":
        return _name(rng, 2)
    if kind == "colour":
        return rng.choice(_COLOURS)
    if kind == "fruit":
        return rng.choice(_FRUITS)
    if kind == "craft":
        return rng.choice(_CRAFTS)
    return str(rng.randint(1100, 1990))


def _filler(rng: random.Random, entity: str) -> str:
    other = _name(rng)
    return rng.choice([
        f"{entity} trades often with {other}.",
        f"Travellers reach {entity} by river from {other}.",
        f"The people of {entity} hold a market every week.",
        f"{other} and {entity} share a long border.",
    ])


def generate(n: int, seed: int = 0, *, unanswerable_fraction: float = 0.2, multi_fraction: float = 0.3,
             refusal: str = DEFAULT_REFUSAL) -> list[RagRecord]:
    """`n` records: about `unanswerable_fraction` unanswerable, `multi_fraction` needing two contexts."""
    rng = random.Random(seed)
    records = []
    for k in range(n):
        entity = _name(rng)
        facts = rng.sample(_FACTS, 2)
        values = [_value(rng, f[3]) for f in facts]
        kind = rng.random()
        rid = f"syn-{seed}-{k}"
        if kind < unanswerable_fraction:
            # contexts about the entity, but not the fact asked for
            asked = next(f for f in _FACTS if f not in facts)
            texts = [facts[0][0].format(e=entity, v=values[0]) + " " + _filler(rng, entity),
                     _filler(rng, entity) + " " + _filler(rng, _name(rng))]
            contexts = [Context(str(i + 1), t) for i, t in enumerate(texts)]
            records.append(RagRecord(rid, asked[1].format(e=entity), contexts, refusal, answerable=False))
        elif kind < unanswerable_fraction + multi_fraction:
            texts = [facts[0][0].format(e=entity, v=values[0]) + " " + _filler(rng, entity),
                     facts[1][0].format(e=entity, v=values[1]) + " " + _filler(rng, entity)]
            order = [0, 1] if rng.random() < 0.5 else [1, 0]
            contexts = [Context(str(pos + 1), texts[i]) for pos, i in enumerate(order)]
            ids = {i: str(pos + 1) for pos, i in enumerate(order)}
            q = f"{facts[0][1].format(e=entity)[:-1]}, and {facts[1][1].format(e=entity)[0].lower()}" \
                f"{facts[1][1].format(e=entity)[1:]}"
            a = (f"{facts[0][2].format(v=values[0])} [{ids[0]}], and {facts[1][2].format(v=values[1])} [{ids[1]}].")
            records.append(RagRecord(rid, q, contexts, a, supporting_context_ids=[ids[0], ids[1]]))
        else:
            gold = facts[0][0].format(e=entity, v=values[0]) + " " + _filler(rng, entity)
            other = _filler(rng, entity) + " " + _filler(rng, _name(rng))
            gold_id = str(rng.randint(1, 2))
            contexts = [Context("1", gold if gold_id == "1" else other), Context("2", gold if gold_id == "2" else other)]
            a = f"{facts[0][2].format(v=values[0]).capitalize()} [{gold_id}]."
            records.append(RagRecord(rid, facts[0][1].format(e=entity), contexts, a, supporting_context_ids=[gold_id]))
    return records
