"""The evaluation report of a run: `eval/report.json` for machines (the operator's offline gate
reads it) and `eval/report.html` for people, self-contained (inline PNG plots, inline CSS, no
scripts) so it can be opened straight from S3 or a browser download."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from ragtune.api.common import EvalMetrics, GateResult
from ragtune.api.finetunejob import FineTuneJobSpec
from ragtune.api.gates import prompt_gap
from ragtune.api.pods import REPORT_HTML, REPORT_JSON
from ragtune.clock import utc_now_iso
from ragtune.rag.metrics import is_refusal
from ragtune.rag.prompt import DEFAULT_REFUSAL, PromptContract, foreign_prompt

from .evaluate import EvalOutcome

REPORT_SCHEMA = "ragtune.dev/eval-report/v1"
EXAMPLES_PER_KIND = 3
"""Side-by-side examples shown per kind (answerable, unanswerable)."""

# Wire name -> label; rates in [0, 1] go on the bar chart, the word count only in the table.
RATE_METRICS = {
    "f1": "F1",
    "exactMatch": "Exact match",
    "rougeL": "ROUGE-L",
    "refusalRate": "Refusal rate",
    "falseRefusalRate": "False refusals (lower is better)",
    "citationValidity": "Citation validity",
    "citationPrecision": "Citation precision",
    "citationRecall": "Citation recall",
    "groundingScore": "Grounding",
}
ALL_METRICS = RATE_METRICS | {"meanAnswerWords": "Mean answer words"}
# Hardest first: how the report orders constructions and picks its unanswerable examples.
CONSTRUCTION_LABELS = {
    "nearMiss": "near miss (on-topic passages, answer absent)",
    "answerRemoved": "answer removed (answer sentences deleted)",
    "userLabelled": "user-labelled (answerable: false)",
    "offTopic": "off-topic (passages about something else)",
}


def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: a diverged loss is reported as null, not as invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _spec_summary(spec: FineTuneJobSpec) -> dict[str, Any]:
    """What was trained, on what, judged how: enough to read the report on its own (no
    placement, S3 or credential settings)."""
    wire = spec.to_wire()
    return {
        "baseModel": {k: wire["baseModel"].get(k) for k in ("id", "revision", "uri") if k in wire["baseModel"]},
        "dataset": wire["dataset"],
        "method": wire["method"],
        "lora": wire["lora"],
        "training": wire["training"],
        "evaluation": wire["evaluation"],
        "prompt": wire["prompt"],
    }


def construction_summary(samples: list[dict], base: EvalMetrics, adapter: EvalMetrics) -> list[dict[str, Any]]:
    """Per unanswerable construction (hardest first): items evaluated, base and adapter refusal."""
    counts = Counter(s.get("construction") for s in samples if not s.get("answerable", True))
    b = base.refusal_by_construction.to_wire() if base.refusal_by_construction else {}
    a = adapter.refusal_by_construction.to_wire() if adapter.refusal_by_construction else {}
    return [{"construction": k, "items": counts[k], "baseRefusalRate": b.get(k), "adapterRefusalRate": a.get(k)}
            for k in CONSTRUCTION_LABELS if counts.get(k)]


def build_report(
    outcome: EvalOutcome, loss_history: list[dict], spec: FineTuneJobSpec, gates: list[GateResult],
    construction: Optional[dict[str, dict[str, int]]] = None, stages: Optional[list[dict]] = None,
    data_hygiene: Optional[dict] = None,
) -> dict[str, Any]:
    """`construction`: the RAFT construction counts of the train and eval splits
    (`build_raft(stats=...)`), reported as they are. `stages`: what each training stage did
    (`{name, steps, seconds, items, lossHistory, ...}`, in order); `lossHistory` stays SFT's.
    `data_hygiene`: `hygiene.HygieneReport.to_wire()` of the data as given (None: not measured)."""
    contract = PromptContract.from_spec(spec)
    metrics = {"base": outcome.base.to_wire(), "adapter": outcome.adapter.to_wire()}
    if outcome.few_shot_base is not None:
        metrics["fewShotBase"] = outcome.few_shot_base.to_wire()
    if outcome.foreign is not None:
        metrics["foreignPrompt"] = outcome.foreign.to_wire()
        metrics["foreignPromptGap"] = prompt_gap(outcome.adapter, outcome.foreign).to_wire()
    if outcome.quantized_adapter is not None:
        metrics["quantizedAdapter"] = outcome.quantized_adapter.to_wire()
    return _finite({
        "schema": REPORT_SCHEMA,
        "createdAt": utc_now_iso(),
        "passed": all(g.passed for g in gates),
        "metrics": metrics,
        "prompt": {"trained": contract.to_wire(), "foreign": foreign_prompt(contract).to_wire(),
                   "augment": spec.prompt.augment},
        "intervals": outcome.intervals,
        "refusalByConstruction": construction_summary(outcome.samples, outcome.base, outcome.adapter),
        "construction": construction or {},
        "dataHygiene": data_hygiene,
        "gates": [g.to_wire() for g in gates],
        "evalSeconds": outcome.seconds,
        "spec": _spec_summary(spec),
        "lossHistory": loss_history,
        "training": training_summary(spec, stages),
        "stages": stages or [{"name": "sft", "lossHistory": loss_history}],
        "samples": outcome.samples,
    })


def training_summary(spec: FineTuneJobSpec, stages: Optional[list[dict]]) -> dict[str, Any]:
    """How SFT training ended and which checkpoint became the adapter: `evalLossOn` (`validation`:
    the loss curve's eval points are the validation split's, which chose the adapter; `heldOut`:
    they are the held-out split's, for information, and the adapter is the last step's),
    `stopReason`, `steps`, and with a validation split `bestStep`, `bestEvalLoss`, `validationItems`."""
    sft = next((s for s in stages or [] if s.get("name") == "sft"), {})
    out: dict[str, Any] = {"evalLossOn": "validation" if sft.get("validationItems") else "heldOut",
                           "stopReason": sft.get("stopReason") or "maxSteps", "steps": sft.get("steps")}
    for key in ("bestStep", "bestEvalLoss", "validationItems"):
        if sft.get(key) is not None:
            out[key] = sft[key]
    if spec.training.early_stopping is not None:
        out["earlyStopping"] = spec.training.early_stopping.to_wire()
    return out


def write_report(
    out_dir: Path, outcome: EvalOutcome, loss_history: list[dict], spec: FineTuneJobSpec,
    gates: list[GateResult], construction: Optional[dict[str, dict[str, int]]] = None,
    stages: Optional[list[dict]] = None, data_hygiene: Optional[dict] = None,
) -> list[Path]:
    """Write `report.json` and `report.html` into `out_dir` (the run's `eval/` folder)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(outcome, loss_history, spec, gates, construction, stages, data_hygiene)
    json_path = out_dir / PurePosixPath(REPORT_JSON).name
    html_path = out_dir / PurePosixPath(REPORT_HTML).name
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    html_path.write_text(render_html(report, outcome), encoding="utf-8")
    return [json_path, html_path]


# --- Plots ----------------------------------------------------------------------------------


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def loss_plot(loss_history: list[dict], eval_label: str = "eval loss", best_step: Optional[int] = None,
              ) -> Optional[str]:
    """Train and eval loss against the optimiser step (the best checkpoint marked when given),
    as base64 PNG; None without data."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    def series(key: str) -> tuple[list, list]:
        # Non-finite losses were nulled by _finite and are skipped here.
        points = [(e["step"], e[key]) for e in loss_history
                  if isinstance(e.get(key), (int, float)) and "step" in e]
        return [s for s, _ in points], [v for _, v in points]

    train, evaluation = series("loss"), series("eval_loss")
    if not train[0] and not evaluation[0]:
        return None
    fig = Figure(figsize=(6.4, 3.4))
    ax = fig.add_subplot()
    if train[0]:
        ax.plot(*train, label="train loss", color="#4c72b0", linewidth=1.4)
    if evaluation[0]:
        ax.plot(*evaluation, label=eval_label, color="#dd8452", marker="o", linewidth=1.4)
    if best_step is not None:
        ax.axvline(best_step, color="#55a868", linestyle="--", linewidth=1.2, label=f"best checkpoint (step {best_step})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def preference_plot(loss_history: list[dict]) -> Optional[str]:
    """The preference stage: DPO loss and the chosen-minus-rejected reward margin per step, as
    base64 PNG; None without data."""
    from matplotlib.figure import Figure

    points = [(e["step"], e.get("loss"), e.get("rewards/margins")) for e in loss_history
              if "step" in e and isinstance(e.get("loss"), (int, float))]
    if not points:
        return None
    steps = [p[0] for p in points]
    fig = Figure(figsize=(6.4, 3.4))
    ax = fig.add_subplot()
    ax.plot(steps, [p[1] for p in points], label="DPO loss", color="#4c72b0", linewidth=1.4)
    ax.set_xlabel("preference step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    margins = [(s, m) for s, _, m in points if isinstance(m, (int, float))]
    if margins:
        twin = ax.twinx()
        twin.plot([s for s, _ in margins], [m for _, m in margins], label="reward margin (chosen - rejected)",
                  color="#55a868", linewidth=1.4)
        twin.set_ylabel("reward margin")
        twin.legend(loc="upper right")
    ax.legend(loc="upper left")
    return _png(fig)


def _training_section(report: dict) -> str:
    """How training ended, which checkpoint is the adapter, and the loss curve (validation or held-out)."""
    t = report.get("training") or {}
    validation = t.get("evalLossOn") == "validation"
    if t.get("stopReason") == "earlyStopping":
        es = t.get("earlyStopping") or {}
        ended = (f"stopped early at step {_e(t.get('steps'))}: the validation loss did not improve by more than "
                 f"{_e(es.get('minDelta', 0.0))} for {_e(es.get('patience'))} validation points")
    else:
        ended = f"ran its planned {_e(t.get('steps'))} steps (max steps)"
    if validation:
        chosen = (f"The published adapter is the best checkpoint by validation loss: <b>step {_e(t.get('bestStep'))}"
                  f"</b> (validation loss {_fmt(t.get('bestEvalLoss'))}, {_e(t.get('validationItems'))} validation "
                  "items carved from the training items). The held-out split was used only for the evaluation "
                  "above.")
    else:
        chosen = ("No validation split (dataset.validationSplit 0): the adapter is the last step's, and the eval "
                  "points below are the held-out split's loss (for information; nothing was selected on them).")
    label = "validation loss" if validation else "eval loss (held-out split)"
    return (f"<p>Training {ended}. {chosen}</p>"
            + _img(loss_plot(report["lossHistory"], label, t.get("bestStep") if validation else None),
                   "loss curve", "No loss history recorded."))


def _stages_section(report: dict) -> str:
    """One line per training stage, and the preference stage's curve (SFT's is the loss plot)."""
    stages = report.get("stages") or []
    if len(stages) < 2:
        return ""
    rows = "".join(f"<tr><td>{_e(s['name'])}</td><td>{_e(s.get('steps'))}</td><td>{_e(s.get('items'))}</td>"
                   f"<td>{_e(s.get('seconds'))}</td></tr>" for s in stages)
    out = (f"<h2>Training stages</h2><table><tr><th>stage</th><th>steps</th><th>rows / pairs</th>"
           f"<th>seconds</th></tr>{rows}</table>")
    for s in stages:
        if s["name"] == "preference":
            held = next((e for e in reversed(s.get("lossHistory") or []) if "eval_rewards/margins" in e), None)
            note = (f"<p>Held-out pairs after the stage: reward margin {_fmt(held['eval_rewards/margins'])}, "
                    f"preference accuracy {_fmt(held.get('eval_rewards/accuracies'))}.</p>") if held else ""
            out += ("<h3>Preference (DPO)</h3>" + note
                    + _img(preference_plot(s.get("lossHistory") or []), "preference loss and reward margin",
                           "No preference history recorded."))
    return out


def metrics_plot(base: EvalMetrics, adapter: EvalMetrics) -> Optional[str]:
    """Grouped bars, base vs adapter, for every rate metric measured on either side."""
    from matplotlib.figure import Figure

    b, a = base.to_wire(), adapter.to_wire()
    names = [n for n in RATE_METRICS if b.get(n) is not None or a.get(n) is not None]
    if not names:
        return None
    fig = Figure(figsize=(max(6.4, 1.0 * len(names)), 3.8))
    ax = fig.add_subplot()
    xs = range(len(names))
    width = 0.38
    for offset, values, label, color in ((-width / 2, b, "base", "#8c8c8c"), (width / 2, a, "adapter", "#55a868")):
        heights = [values.get(n) or 0.0 for n in names]
        bars = ax.bar([x + offset for x in xs], heights, width, label=label, color=color)
        for bar, n in zip(bars, names):
            text = "n/a" if values.get(n) is None else f"{values[n]:.2f}"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(list(xs), [RATE_METRICS[n].replace(" (lower is better)", "\n(lower is better)") for n in names],
                  rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("rate")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


# --- HTML -------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#1a7f37;font-weight:600}.fail{color:#cf222e;font-weight:600}
.badge{display:inline-block;padding:.15rem .6rem;border-radius:1rem;color:#fff}.badge.pass{background:#1a7f37}.badge.fail{background:#cf222e}
.example{border:1px solid #ddd;border-radius:6px;padding:.8rem;margin:1rem 0}
.example .answers{display:grid;grid-template-columns:repeat(auto-fit,minmax(200px,1fr));gap:.6rem}
.example .answers div{background:#f8f8f8;padding:.5rem;border-radius:4px;white-space:pre-wrap}
.ctx{font-size:.85rem;color:#555;white-space:pre-wrap;margin:.2rem 0}
.muted{color:#777}img{max-width:100%}
"""

# The report never needs scripts or remote resources; forbid them in case it is served as a page.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _ci(intervals: Optional[dict], side: str, name: str) -> str:
    ci = ((intervals or {}).get(side) or {}).get(name)
    return "" if not ci else f"<br><span class=muted>[{ci[0]:.3f}, {ci[1]:.3f}]</span>"


def _metrics_table(base: dict, adapter: dict, intervals: Optional[dict] = None,
                   few_shot: Optional[dict] = None, shots: int = 0) -> str:
    rows = []
    for name, label in ALL_METRICS.items():
        b, a = base.get(name), adapter.get(name)
        delta = "" if a is None or b is None else f"{a - b:+.3f}"
        shot = "" if few_shot is None else f"<td class=num>{_fmt(few_shot.get(name))}</td>"
        rows.append(f"<tr><td>{_e(label)}</td><td class=num>{_fmt(b)}{_ci(intervals, 'base', name)}</td>{shot}"
                    f"<td class=num>{_fmt(a)}{_ci(intervals, 'adapter', name)}</td>"
                    f"<td class=num>{delta}{_ci(intervals, 'delta', name)}</td></tr>")
    shot_head = "" if few_shot is None else f"<th>base, {shots}-shot</th>"
    note = "" if not intervals else (
        f"<p class=muted>[low, high]: paired bootstrap {intervals['confidence']:.0%} intervals over the "
        f"{base.get('samples', 0)} items ({intervals['draws']} draws); a difference whose interval spans 0 "
        "may be noise.</p>")
    return (f"<table><tr><th>metric</th><th>base</th>{shot_head}<th>adapter</th><th>adapter - base</th></tr>"
            + "".join(rows) + "</table>" + note)


def _foreign_section(report: dict) -> str:
    metrics = report["metrics"]
    foreign = metrics.get("foreignPrompt")
    if foreign is None:
        return "<p class=muted>The foreign prompt was not evaluated.</p>"
    adapter, gap = metrics["adapter"], metrics.get("foreignPromptGap") or {}
    rows = "".join(f"<tr><td>{_e(ALL_METRICS[n])}</td><td class=num>{_fmt(adapter.get(n))}</td>"
                   f"<td class=num>{_fmt(foreign.get(n))}</td><td class=num>{_fmt(gap.get(n))}</td></tr>"
                   for n in ("f1", "refusalRate", "falseRefusalRate", "citationValidity", "groundingScore"))
    f = report["prompt"]["foreign"]
    augment = "with" if report["prompt"].get("augment") else "without"
    return (f"<p>The adapter ({augment} prompt augmentation) on the same items under a fixed foreign prompt it "
            f"never saw in training; gap = |trained - foreign|, largest {_fmt(gap.get('max'))}.</p>"
            "<table><tr><th>metric</th><th>trained prompt</th><th>foreign prompt</th><th>gap</th></tr>"
            + rows + "</table>"
            f"<details><summary>foreign prompt</summary><div class=ctx>{_e(f['system'])}\n\n"
            f"{_e(f['userTemplate'])}</div></details>")


def _served_note(report: dict) -> str:
    """QLoRA: every figure is on the unquantised base (what servers load); the 4-bit one beside it."""
    metrics = report["metrics"]
    quantized = metrics.get("quantizedAdapter")
    if quantized is None:
        return ""
    adapter = metrics["adapter"]
    shown = ", ".join(f"{ALL_METRICS[n]} {_fmt(adapter.get(n))} (4-bit base: {_fmt(quantized.get(n))})"
                      for n in ("f1", "refusalRate", "falseRefusalRate") if adapter.get(n) is not None)
    return (f"<p>QLoRA: the adapter trained on a 4-bit base, but servers load it onto the unquantised base, so "
            f"every figure and gate here is on that base. Adapter: {_e(shown)}.</p>")


def _gates_table(gates: list[dict]) -> str:
    if not gates:
        return "<p class=muted>No thresholds configured: the run passes on evaluation.</p>"
    rows = []
    for g in gates:
        verdict = '<span class="pass">pass</span>' if g["passed"] else '<span class="fail">FAIL</span>'
        ci = g.get("interval")
        shown = _fmt(g.get("value")) + ("" if not ci else f" <span class=muted>[{ci[0]:.3f}, {ci[1]:.3f}]</span>")
        compared = "" if g.get("bound") is None else " (interval bound)"
        rows.append(f"<tr><td>{_e(g['metric'])}</td><td class=num>{shown}</td>"
                    f"<td>{_e(g['comparison'])} {_e(g['threshold'])}{compared}</td>"
                    f"<td class=num>{_fmt(g.get('margin'))}</td><td>{verdict}</td></tr>")
    return ("<table><tr><th>metric</th><th>value</th><th>threshold</th><th>margin</th><th>result</th></tr>"
            + "".join(rows) + "</table>")


def _construction_table(rows: list[dict]) -> str:
    if not rows:
        return "<p class=muted>No unanswerable items evaluated.</p>"
    body = "".join(f"<tr><td>{_e(CONSTRUCTION_LABELS[r['construction']])}</td><td class=num>{r['items']}</td>"
                   f"<td class=num>{_fmt(r['baseRefusalRate'])}</td><td class=num>{_fmt(r['adapterRefusalRate'])}</td></tr>"
                   for r in rows)
    return ("<table><tr><th>construction (hardest first)</th><th>items</th><th>base refusal</th>"
            "<th>adapter refusal</th></tr>" + body + "</table>")


def _hygiene_table(hygiene: Optional[dict]) -> str:
    """Per split: items, duplicates, answerable share per file; then the overlap."""
    if not hygiene:
        return "<p class=muted>Not measured.</p>"
    rows = []
    for name in ("train", "eval"):
        part = hygiene.get(name)
        if not part:
            continue
        balance = "; ".join(f"{_e(b['source'].rsplit('/', 1)[-1])}: {b['answerable']} / {b['unanswerable']} "
                            f"({b['answerableShare']:.0%} answerable)" for b in part["balance"]) or "-"
        rows.append(f"<tr><td>{name}</td><td class=num>{part['items']}</td><td class=num>{part['exactDuplicates']}"
                    f"</td><td class=num>{part['nearDuplicates']}</td><td>{balance}</td></tr>")
    origin = {"split": "held out of the training file, copies kept on one side",
              "file": "a separate file"}.get(hygiene.get("evalOrigin") or "", "none")
    return ("<table><tr><th>split</th><th>items</th><th>exact duplicates</th><th>near-duplicates</th>"
            "<th>answerable / unanswerable per file</th></tr>" + "".join(rows) + "</table>"
            f"<p>Train/test overlap: <b>{hygiene.get('overlap', 0)}</b> <span class=muted>(eval: {origin})</span></p>")


def pick_examples(samples: list[dict], per_kind: int = EXAMPLES_PER_KIND, refusal: str = DEFAULT_REFUSAL) -> list[dict]:
    """A few answerable and unanswerable items. Answerable: those where base and adapter differ
    first. Unanswerable: the hardest cases first - the adapter answered instead of refusing, on
    the hardest construction."""
    rank = {k: n for n, k in enumerate(CONSTRUCTION_LABELS)}
    answerable = [s for s in samples if s.get("answerable", True)]
    answerable.sort(key=lambda s: s.get("base") == s.get("adapter"))  # stable: differing ones first
    unanswerable = [s for s in samples if not s.get("answerable", True)]
    unanswerable.sort(key=lambda s: (is_refusal(s.get("adapter") or "", refusal),
                                     rank.get(s.get("construction"), len(rank))))
    return answerable[:per_kind] + unanswerable[:per_kind]


def _example(sample: dict) -> str:
    contexts = "".join(f"<div class=ctx>[{_e(c.get('id'))}] {_e(c.get('text'))}</div>"
                       for c in sample.get("contexts", []))
    kind = "answerable" if sample.get("answerable", True) else \
        f"unanswerable, {sample.get('construction') or 'userLabelled'} (should refuse)"
    return (f"<div class=example><div><b>{_e(sample.get('question'))}</b> "
            f"<span class=muted>({_e(sample.get('id'))}, {kind})</span></div>{contexts}"
            f"<div class=answers><div><b>reference</b>\n{_e(sample.get('reference'))}</div>"
            f"<div><b>base</b>\n{_e(sample.get('base'))}</div>"
            + (f"<div><b>base, few-shot</b>\n{_e(sample['fewShotBase'])}</div>" if "fewShotBase" in sample else "")
            + f"<div><b>adapter</b>\n{_e(sample.get('adapter'))}</div>"
            + (f"<div><b>adapter, foreign prompt</b>\n{_e(sample['foreign'])}</div>" if "foreign" in sample else "")
            + "</div></div>")


def _img(png: Optional[str], alt: str, missing: str) -> str:
    if png is None:
        return f"<p class=muted>{_e(missing)}</p>"
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{png}">'


def _shape(spec: dict) -> str:
    """The adapter's shape: rank and alpha for LoRA-based methods; IA3 has neither."""
    lora = spec["lora"]
    if spec["method"] == "ia3":
        return f"(IA3 on {_e(', '.join(lora['targetModules']))})"
    return f"({'DoRA' if spec['method'] == 'dora' else 'LoRA'} r={_e(lora['r'])}, alpha={_e(lora['alpha'])})"


def render_html(report: dict, outcome: EvalOutcome) -> str:
    spec = report["spec"]
    model = spec["baseModel"]
    passed = report["passed"]
    badge = f'<span class="badge {"pass" if passed else "fail"}">{"gates passed" if passed else "gates failed"}</span>'
    base, adapter = report["metrics"]["base"], report["metrics"]["adapter"]
    refusal = report["prompt"]["trained"]["refusal"]
    examples = "".join(_example(s) for s in pick_examples(report["samples"], refusal=refusal)) \
        or "<p class=muted>No samples.</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<title>ragtune evaluation: {_e(model.get('id'))}</title><style>{_CSS}</style></head><body>
<h1>ragtune evaluation report {badge}</h1>
<p>Base model <b>{_e(model.get('id'))}</b>@{_e(model.get('revision'))}, method {_e(spec['method'])}
{_shape(spec)}; {_e(base.get('samples', 0))} held-out items
from {_e(spec['dataset'].get('eval') or spec['dataset']['train'])}; evaluation took {_e(report['evalSeconds'])} s.
<span class=muted>{_e(report['createdAt'])}</span></p>
{_served_note(report)}
<h2>Gates</h2>{_gates_table(report['gates'])}
<h2>Base vs adapter</h2>{_metrics_table(base, adapter, report.get('intervals'), report['metrics'].get('fewShotBase'),
                                         report['spec']['evaluation'].get('fewShot', 0))}
{_img(metrics_plot(outcome.base, outcome.adapter), "base vs adapter metrics", "No metrics measured.")}
<h2>Refusal by construction</h2>{_construction_table(report['refusalByConstruction'])}
<h2>Data hygiene</h2>{_hygiene_table(report.get('dataHygiene'))}
<h2>Trained vs foreign prompt</h2>{_foreign_section(report)}
<h2>Training loss</h2>
{_training_section(report)}
{_stages_section(report)}
<h2>Examples (unanswerable: hardest cases first)</h2>{examples}
</body></html>
"""
