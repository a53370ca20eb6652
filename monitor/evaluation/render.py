"""Rendering an :class:`~monitor.evaluation.harness.EvalResult`: Markdown tables or JSON.

Markdown: one table of every scorer per category (AUROC, TPR at 1%/5% FPR against the data's
negatives, TPR at 1% benign FPR, pair accuracy, the decisions), then the minimal-pair outcomes
(P-C / P-V / P-B / P-R), then the same measures per group (``group_by``), then the notes.
"""

from __future__ import annotations

import json

from monitor.evaluation.harness import EvalResult
from monitor.evaluation.measures import Measures


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _pair_acc(m: Measures) -> str:
    return _fmt(m.pairs.accuracy) if m.pairs is not None else "–"


def render_markdown(result: EvalResult, *, title: str = "") -> str:
    """The tables described in the module docstring, followed by the notes."""
    lines = []
    if title:
        lines += [f"## {title}", ""]
    benign = f", {result.benign} benign items" if result.benign else ""
    lines += [f"Policy version `{result.policy_version}`, {result.n_items} items{benign}.", "",
              "| category | scorer | items (pos/neg) | AUROC | TPR@1%FPR | TPR@5%FPR | TPR@1% benign FPR "
              "| pair acc | decision | flagged | precision | recall | benign flagged |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    notes = []
    for cat in result.categories:
        if not cat.measures:
            lines.append(f"| {cat.category} | (none) | {cat.items} ({cat.positives}/{cat.items - cat.positives}) "
                         "| – | – | – | – | – | – | – | – | – | – |")
        for m in cat.measures:
            lines.append(f"| {cat.category} | {m.scorer} | {m.n} ({m.positives}/{m.negatives}) | {_fmt(m.auroc)} "
                         f"| {_fmt(m.tpr_at_1pct_fpr)} | {_fmt(m.tpr_at_5pct_fpr)} "
                         f"| {_fmt(m.tpr_at_1pct_benign_fpr)} | {_pair_acc(m)} | {m.decision} | {m.flagged} "
                         f"| {_fmt(m.precision)} | {_fmt(m.recall)} | {_fmt(m.benign_flagged_rate)} |")
        notes += [f"- {cat.category}: {note}" for note in cat.notes]
        if cat.rules:
            notes.append(f"- {cat.category}: rules {', '.join(cat.rules)}")
    paired = [(cat.category, m.scorer, m.pairs) for cat in result.categories for m in cat.measures
              if m.pairs is not None and m.pairs.both_correct is not None]
    if paired:
        lines += ["", "Minimal pairs, at each detector's decision (P-C both correct, P-V both flagged, "
                  "P-B both passed, P-R reversed):", "",
                  "| category | scorer | pairs | pair acc | ties | P-C | P-V | P-B | P-R |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for category, scorer, p in paired:
            lines.append(f"| {category} | {scorer} | {p.pairs} | {_fmt(p.accuracy)} | {p.ties} "
                         f"| {_fmt(p.both_correct)} | {_fmt(p.both_positive)} | {_fmt(p.both_negative)} "
                         f"| {_fmt(p.reversed)} |")
    grouped = [(cat.category, g) for cat in result.categories for g in cat.groups]
    if grouped:
        key = grouped[0][1].key
        lines += ["", f"Per {key}:", "",
                  f"| category | {key} | scorer | items (pos/neg) | AUROC | TPR@1% benign FPR | pair acc "
                  "| flagged | recall |",
                  "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for category, g in grouped:
            for m in g.measures:
                lines.append(f"| {category} | {g.group or '(none)'} | {m.scorer} | {m.n} ({m.positives}/{m.negatives}) "
                             f"| {_fmt(m.auroc)} | {_fmt(m.tpr_at_1pct_benign_fpr)} | {_pair_acc(m)} "
                             f"| {m.flagged} | {_fmt(m.recall)} |")
    notes += [f"- {note}" for note in result.notes]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def render_json(result: EvalResult, *, items: bool = False) -> str:
    return json.dumps(result.to_dict(items=items), indent=2) + "\n"
