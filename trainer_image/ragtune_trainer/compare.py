"""`ragtune report compare RUN_A RUN_B`: one self-contained HTML page comparing two runs' evaluations.

Input is each run's `eval/report.json` (report.py). The page shows both adapters' metrics side by
side with B - A (and the confidence intervals where a report carries them), a plot of the same,
refusal per unanswerable construction, and the held-out items whose verdict changed between the two
adapters — matched by question and contexts, so two runs on different eval splits compare on the
items they share (the count is shown). Same rules as the run report: inline CSS and PNG, no
scripts, no remote resources (a Content-Security-Policy forbids them).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Optional

from ragtune.rag.metrics import f1_score, is_refusal, strip_citations
from ragtune.rag.prompt import DEFAULT_CITATION, DEFAULT_REFUSAL

from .report import _CSP, _CSS, ALL_METRICS, CONSTRUCTION_LABELS, RATE_METRICS, _e, _fmt, _img, _png

CORRECT_F1 = 0.5
"""An answer to an answerable item counts as correct from this token F1 on (citations stripped)."""
MAX_CHANGED_SHOWN = 40


@dataclass(frozen=True)
class Run:
    """One side of the comparison: a label (the run's URI or path) and its report.json."""

    label: str
    report: dict[str, Any]

    @property
    def refusal(self) -> str:
        return ((self.report.get("prompt") or {}).get("trained") or {}).get("refusal") or DEFAULT_REFUSAL

    @property
    def citation(self) -> str:
        return ((self.report.get("prompt") or {}).get("trained") or {}).get("citation") or DEFAULT_CITATION

    @property
    def adapter(self) -> dict[str, Any]:
        return self.report["metrics"]["adapter"]


def item_key(sample: dict[str, Any]) -> str:
    """Items are the same when question and contexts are (ids differ between splits)."""
    contexts = [c.get("text", "") for c in sample.get("contexts") or []]
    return hashlib.sha256(json.dumps([sample.get("question"), contexts]).encode()).hexdigest()[:16]


def verdict(sample: dict[str, Any], answer: Optional[str], run: Run) -> str:
    """`correct`, `wrong`, `refused` (answerable) or `refused`, `answered` (unanswerable), judged
    with the run's own refusal sentence and citation form."""
    refused = is_refusal(answer or "", run.refusal)
    if not sample.get("answerable", True):
        return "refused" if refused else "answered"
    if refused:
        return "refused"
    f1 = f1_score(strip_citations(answer or "", run.citation),
                  strip_citations(sample.get("reference") or "", run.citation))
    return "correct" if f1 >= CORRECT_F1 else "wrong"


GOOD = {("answerable", "correct"), ("unanswerable", "refused")}


def changed_items(a: Run, b: Run) -> tuple[int, list[dict[str, Any]]]:
    """(items both runs evaluated, those whose adapter verdict differs), improvements last."""
    b_samples = {item_key(s): s for s in b.report.get("samples") or []}
    shared, changed = 0, []
    for sample in a.report.get("samples") or []:
        other = b_samples.get(item_key(sample))
        if other is None:
            continue
        shared += 1
        kind = "answerable" if sample.get("answerable", True) else "unanswerable"
        va, vb = verdict(sample, sample.get("adapter"), a), verdict(other, other.get("adapter"), b)
        if va != vb:
            better = (kind, vb) in GOOD
            changed.append({"sample": sample, "kind": kind, "a": va, "b": vb, "better": better,
                            "answerA": sample.get("adapter"), "answerB": other.get("adapter")})
    changed.sort(key=lambda c: c["better"])  # regressions first: what a reviewer must see
    return shared, changed


def _interval(report: dict[str, Any], side: str, metric: str) -> str:
    """` [low, high]` when the report carries a confidence interval for the metric."""
    ci = ((report.get("intervals") or {}).get(side) or {}).get(metric)
    return "" if not ci else f" <span class=muted>[{ci[0]:.3f}, {ci[1]:.3f}]</span>"


def _metrics_table(a: Run, b: Run) -> str:
    rows = []
    for name, label in ALL_METRICS.items():
        va, vb = a.adapter.get(name), b.adapter.get(name)
        if va is None and vb is None:
            continue
        delta = "" if va is None or vb is None else f"{vb - va:+.3f}"
        rows.append(f"<tr><td>{_e(label)}</td><td class=num>{_fmt(va)}{_interval(a.report, 'adapter', name)}</td>"
                    f"<td class=num>{_fmt(vb)}{_interval(b.report, 'adapter', name)}</td>"
                    f"<td class=num>{delta}</td></tr>")
    return ("<table><tr><th>metric (adapter)</th><th>A</th><th>B</th><th>B - A</th></tr>"
            + "".join(rows) + "</table>")


def _construction_table(a: Run, b: Run) -> str:
    ra = {r["construction"]: r for r in a.report.get("refusalByConstruction") or []}
    rb = {r["construction"]: r for r in b.report.get("refusalByConstruction") or []}
    rows = [f"<tr><td>{_e(label)}</td><td class=num>{_fmt((ra.get(k) or {}).get('adapterRefusalRate'))}</td>"
            f"<td class=num>{_fmt((rb.get(k) or {}).get('adapterRefusalRate'))}</td></tr>"
            for k, label in CONSTRUCTION_LABELS.items() if k in ra or k in rb]
    if not rows:
        return "<p class=muted>Neither run evaluated unanswerable items by construction.</p>"
    return ("<table><tr><th>construction (hardest first)</th><th>A refusal</th><th>B refusal</th></tr>"
            + "".join(rows) + "</table>")


def comparison_plot(a: Run, b: Run) -> Optional[str]:
    """Grouped bars, adapter A vs adapter B, for every rate metric either measured."""
    from matplotlib.figure import Figure

    names = [n for n in RATE_METRICS if a.adapter.get(n) is not None or b.adapter.get(n) is not None]
    if not names:
        return None
    fig = Figure(figsize=(max(6.4, 1.0 * len(names)), 3.8))
    ax = fig.add_subplot()
    width = 0.38
    for offset, values, label, color in ((-width / 2, a.adapter, "A", "#4c72b0"), (width / 2, b.adapter, "B", "#dd8452")):
        bars = ax.bar([x + offset for x in range(len(names))], [values.get(n) or 0.0 for n in names], width,
                      label=label, color=color)
        for bar, n in zip(bars, names):
            text = "n/a" if values.get(n) is None else f"{values[n]:.2f}"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(list(range(len(names))), [RATE_METRICS[n].replace(" (lower is better)", "\n(lower is better)")
                                            for n in names], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("rate")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _changed_section(shared: int, changed: list[dict[str, Any]]) -> str:
    if not shared:
        return "<p class=muted>The two runs share no held-out items (different eval splits).</p>"
    worse = sum(not c["better"] for c in changed)
    head = (f"<p>{shared} items evaluated by both; {len(changed)} changed verdict: "
            f"<span class=fail>{worse} worse</span> in B, <span class=pass>{len(changed) - worse} better</span>"
            f"{f'; the first {MAX_CHANGED_SHOWN} shown, regressions first' if len(changed) > MAX_CHANGED_SHOWN else ''}"
            ".</p>")
    cards = []
    for c in changed[:MAX_CHANGED_SHOWN]:
        s = c["sample"]
        contexts = "".join(f"<div class=ctx>[{_e(x.get('id'))}] {_e(x.get('text'))}</div>" for x in s.get("contexts", []))
        mark = '<span class="pass">better</span>' if c["better"] else '<span class="fail">worse</span>'
        cards.append(
            f"<div class=example><div>{mark} <b>{_e(s.get('question'))}</b> <span class=muted>({_e(c['kind'])}: "
            f"A {_e(c['a'])} → B {_e(c['b'])})</span></div>{contexts}"
            f"<div class=answers><div><b>reference</b>\n{_e(s.get('reference'))}</div>"
            f"<div><b>A</b>\n{_e(c['answerA'])}</div><div><b>B</b>\n{_e(c['answerB'])}</div></div></div>")
    return head + "".join(cards)


def _run_line(tag: str, run: Run) -> str:
    spec = run.report.get("spec") or {}
    model = spec.get("baseModel") or {}
    return (f"<li><b>{tag}</b> {_e(run.label)}: {_e(model.get('id'))}@{_e(model.get('revision'))}, "
            f"method {_e(spec.get('method'))}, {_e(run.adapter.get('samples', 0))} items, "
            f"gates {'passed' if run.report.get('passed') else 'failed'} "
            f"<span class=muted>({_e(run.report.get('createdAt'))})</span></li>")


def render_compare(a: Run, b: Run) -> str:
    shared, changed = changed_items(a, b)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<title>ragtune comparison: {_e(a.label)} vs {_e(b.label)}</title><style>{_CSS}</style></head><body>
<h1>ragtune run comparison</h1>
<ul>{_run_line("A", a)}{_run_line("B", b)}</ul>
<h2>Adapter metrics</h2>{_metrics_table(a, b)}
{_img(comparison_plot(a, b), "adapter A vs adapter B metrics", "No metrics measured.")}
<h2>Refusal by construction</h2>{_construction_table(a, b)}
<h2>Items that changed verdict</h2>{_changed_section(shared, changed)}
</body></html>
"""
