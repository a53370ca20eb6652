"""Showing a :class:`~monitor.drift.result.DriftResult`: terminal table, JSON, HTML report.

The HTML page is self-contained (inline CSS and SVG, no script, no external reference) so it
can be attached to a CI run or a review: per candidate, rule firing rates under base and
candidate with the candidate's interval, the catalog features, the most-moved latents with
their top contexts, and for a checkpoint series a line chart of the drift score and of each
rule's firing rate across checkpoints.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

from monitor.drift.result import CandidateDrift, DriftResult

_VERDICT_MARK = {"increased": "▲ increased", "decreased": "▼ decreased", "unchanged": "  unchanged"}


def to_json(result: DriftResult, *, include_text: bool = False) -> str:
    return json.dumps(result.to_dict(include_text=include_text), indent=2)


def _rows(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]


def candidate_table(c: CandidateDrift, fdr: float) -> str:
    lines = [f"candidate {c.candidate}   drift score {c.drift_score:.2f}   "
             f"({c.seconds:.0f} s)"]
    lines.append(f"rules (firing rate over prompts x passes; verdict at FDR {fdr:g}):")
    lines += ["  " + s for s in _rows(
        ["rule", "mode", "base", "candidate", "delta", "95% CI", "p", "verdict"],
        [[r.id, r.mode, f"{r.base_rate:.3f}", f"{r.candidate_rate:.3f}", f"{r.delta:+.3f}",
          f"[{r.ci_low:+.3f}, {r.ci_high:+.3f}]", f"{r.p_value:.4f}", _VERDICT_MARK[r.verdict]] for r in c.rules])]
    lines.append(f"catalog features (teacher-forced mean activation; |t| null from random latents: {c.null_t:.1f}):")
    lines += ["  " + s for s in _rows(
        ["feature", "base", "candidate", "delta", "95% CI", "t", "q", "resp. peak b/c", "verdict"],
        [[f.name, f"{f.base_mean:.3f}", f"{f.candidate_mean:.3f}", f"{f.delta:+.3f}",
          f"[{f.ci_low:+.3f}, {f.ci_high:+.3f}]", f"{f.t:+.1f}", f"{f.q_value:.4f}",
          f"{f.base_response_peak:.2f}/{f.candidate_response_peak:.2f}", _VERDICT_MARK[f.verdict]]
         for f in c.features])]
    lines.append(f"latents moved (BH at {fdr:g}): {c.n_latents_up} up, {c.n_latents_down} down; top up: "
                 + (", ".join(f"{s.latent}{' (' + s.name + ')' if s.name else ''} {s.delta:+.3f}"
                              for s in c.latents_up[:5]) or "none"))
    lines.append(f"difference lens (first {c.lens.tokens} tokens of texts): |diff| {c.lens.norm:.3f} "
                 f"({c.lens.relative_norm:.1%} of the residual); points to "
                 + ", ".join(f"{e.name} ({e.cosine:+.2f})" for e in c.lens.top_latents[:5]))
    if c.directions:
        lines.append("concept directions (teacher-forced shift of the mean residual, candidate - base; "
                     "relative: in units of the pairs' own separation):")
        lines += ["  " + s for s in _rows(
            ["direction", "pairs", "shift", "relative", "95% CI", "null", "score", "p", "verdict"],
            [[d.name, str(d.pairs), f"{d.delta:+.4f}", f"{d.relative:+.3f}", f"[{d.ci_low:+.3f}, {d.ci_high:+.3f}]",
              f"{d.null_delta:.4f}", f"{d.score:.2f}", f"{d.p_value:.4f}", _VERDICT_MARK[d.verdict]]
             for d in c.directions])]
    if c.preferences:
        lines.append("pair preference (change of log p(concept side) - log p(contrast side), nats per pair):")
        lines += ["  " + s for s in _rows(
            ["pairs file", "pairs", "base margin", "shift", "95% CI", "pairs moved up", "p", "verdict"],
            [[q.name, str(q.pairs), f"{q.base_margin:+.2f}", f"{q.delta:+.3f}", f"[{q.ci_low:+.3f}, {q.ci_high:+.3f}]",
              f"{q.share_up:.0%}", f"{q.p_value:.4f}", _VERDICT_MARK[q.verdict]] for q in c.preferences])]
    lines.append(f"FVU: base {c.fvu.base:.3f}, candidate {c.fvu.candidate:.3f}"
                 + ("  WARNING: clearly worse" if c.fvu.worse else ""))
    lines.append(f"KL(base||candidate) per token, first {c.kl.tokens} tokens: {c.kl.mean:.4f} "
                 f"[{c.kl.ci_low:.4f}, {c.kl.ci_high:.4f}]")
    lines += [f"warning: {w}" for w in c.warnings]
    return "\n".join(lines)


def table(result: DriftResult) -> str:
    """The terminal report: one block per candidate, then a series summary when there are several."""
    parts = [f"drift check: base {result.base}, {len(result.candidates)} candidate(s), "
             f"{result.settings.get('prompts')} prompts x {len(result.settings.get('passes', []))} passes, "
             f"{result.settings.get('texts')} texts"]
    parts += [candidate_table(c, result.fdr) for c in result.candidates]
    if len(result.candidates) > 1:
        rows = [[c.candidate, f"{c.drift_score:.2f}", f"{c.kl.mean:.4f}", str(c.n_latents_up),
                 ",".join(c.enforce_increased) or "-"] for c in result.candidates]
        parts.append("series:\n" + "\n".join("  " + s for s in _rows(
            ["candidate", "drift score", "KL", "latents up", "enforce rules increased"], rows)))
    parts.append("exit code: 1 (an enforce rule's firing rate increased)" if result.exit_code
                 else "exit code: 0 (no enforce rule's firing rate increased)")
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------ HTML

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0}td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child{text-align:left}.increased{color:#b00020;font-weight:600}
.decreased{color:#1565c0;font-weight:600}.warn{background:#fff3cd;padding:6px 10px;border-radius:4px}
.ctx{font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap;background:#f6f6f6;
margin:2px 0 2px 16px;padding:2px 6px}.legend{font-size:12px;color:#555}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def rates_svg(c: CandidateDrift, width: int = 640) -> str:
    """Horizontal bars per rule: base rate (grey), candidate rate (colour by verdict) with the
    candidate's 95% interval (base rate + CI of the difference)."""
    row_h, left, plot_w = 34, 260, width - 280
    height = 30 + row_h * max(1, len(c.rules))
    out = [f'<svg class="rates" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'role="img" aria-label="rule firing rates">']
    for k in range(0, 11, 2):
        x = left + plot_w * k / 10
        out.append(f'<line x1="{x:.1f}" y1="18" x2="{x:.1f}" y2="{height - 6}" stroke="#eee"/>'
                   f'<text x="{x:.1f}" y="12" font-size="10" text-anchor="middle">{k / 10:.1f}</text>')
    for i, r in enumerate(c.rules):
        y = 22 + i * row_h
        colour = {"increased": "#d32f2f", "decreased": "#1976d2"}.get(r.verdict, "#7b8794")
        lo = min(1.0, max(0.0, r.base_rate + r.ci_low))
        hi = min(1.0, max(0.0, r.base_rate + r.ci_high))
        out.append(f'<text x="{left - 6}" y="{y + 14}" font-size="11" text-anchor="end">{_e(r.id)}</text>')
        out.append(f'<rect class="bar-base" x="{left}" y="{y}" width="{plot_w * r.base_rate:.1f}" height="11" fill="#c5c9ce"/>')
        out.append(f'<rect class="bar-cand" x="{left}" y="{y + 13}" width="{plot_w * r.candidate_rate:.1f}" '
                   f'height="11" fill="{colour}"/>')
        out.append(f'<line class="ci" x1="{left + plot_w * lo:.1f}" y1="{y + 18.5}" x2="{left + plot_w * hi:.1f}" '
                   f'y2="{y + 18.5}" stroke="#111" stroke-width="1.5"/>')
    out.append("</svg>")
    return "".join(out)


def latents_svg(c: CandidateDrift, width: int = 640) -> str:
    """Bars of the change of mean activation of the most-moved latents (up in red, down in blue)."""
    shifts = list(c.latents_up) + list(c.latents_down)
    row_h, left = 20, 220
    height = 20 + row_h * max(1, len(shifts))
    scale = max((abs(s.delta) for s in shifts), default=1.0) or 1.0
    mid, half = left + (width - left - 20) / 2, (width - left - 20) / 2
    out = [f'<svg class="latents" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'role="img" aria-label="most moved latents">',
           f'<line x1="{mid:.1f}" y1="4" x2="{mid:.1f}" y2="{height - 4}" stroke="#999"/>']
    for i, s in enumerate(shifts):
        y = 10 + i * row_h
        w = half * abs(s.delta) / scale
        x = mid if s.delta >= 0 else mid - w
        label = f"{s.latent}" + (f" {s.name}" if s.name else "")
        out.append(f'<text x="{left - 6}" y="{y + 11}" font-size="11" text-anchor="end">{_e(label)}</text>'
                   f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="13" '
                   f'fill="{"#d32f2f" if s.delta >= 0 else "#1976d2"}"/>'
                   f'<text x="{mid + (4 if s.delta < 0 else -4):.1f}" y="{y + 11}" font-size="10" '
                   f'text-anchor="{"start" if s.delta < 0 else "end"}">{s.delta:+.3f}</text>')
    out.append("</svg>")
    return "".join(out)


def series_svg(result: DriftResult, width: int = 720, height: int = 260) -> str:
    """Line chart over the checkpoint series: drift score (left axis) and each rule's
    candidate firing rate (right axis, 0..1), one point per candidate in order."""
    cands = result.candidates
    left, right, top, bottom = 50, 60, 20, 50
    pw, ph = width - left - right, height - top - bottom
    n = len(cands)

    def x(i: int) -> float:
        return left + (pw * i / (n - 1) if n > 1 else pw / 2)

    score_max = max([c.drift_score for c in cands] + [1.0])
    out = [f'<svg class="series" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'role="img" aria-label="checkpoint series">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>']
    for i, c in enumerate(cands):
        label = Path(c.candidate).name or c.candidate
        out.append(f'<text x="{x(i):.1f}" y="{height - bottom + 16}" font-size="10" text-anchor="middle">{_e(label[-18:])}</text>')
    points = " ".join(f"{x(i):.1f},{top + ph * (1 - c.drift_score / score_max):.1f}" for i, c in enumerate(cands))
    out.append(f'<polyline class="score" points="{points}" fill="none" stroke="#6a1b9a" stroke-width="2.5"/>')
    out += [f'<circle cx="{x(i):.1f}" cy="{top + ph * (1 - c.drift_score / score_max):.1f}" r="3.5" fill="#6a1b9a"/>'
            for i, c in enumerate(cands)]
    palette = ["#1976d2", "#388e3c", "#f57c00", "#7b1fa2", "#00838f", "#5d4037", "#c2185b"]
    rule_ids = [r.id for r in cands[0].rules] if cands else []
    for k, rid in enumerate(rule_ids):
        rates = [next((r.candidate_rate for r in c.rules if r.id == rid), 0.0) for c in cands]
        pts = " ".join(f"{x(i):.1f},{top + ph * (1 - v):.1f}" for i, v in enumerate(rates))
        out.append(f'<polyline class="rate" points="{pts}" fill="none" stroke="{palette[k % len(palette)]}" '
                   f'stroke-width="1.5" stroke-dasharray="4 3"/>')
    out.append(f'<text x="{left - 6}" y="{top + 8}" font-size="10" text-anchor="end">{score_max:.1f}</text>'
               f'<text x="{left - 6}" y="{top + ph}" font-size="10" text-anchor="end">0</text>'
               f'<text x="{left + pw + 6}" y="{top + 8}" font-size="10">rate 1</text>'
               f'<text x="{left + pw + 6}" y="{top + ph}" font-size="10">0</text>')
    out.append("</svg>")
    legend = ['<span style="color:#6a1b9a">━ drift score</span>'] + [
        f'<span style="color:{palette[k % len(palette)]}">┅ {_e(rid)} rate</span>' for k, rid in enumerate(rule_ids)]
    return "".join(out) + f'<div class="legend">{" &nbsp; ".join(legend)}</div>'


def _candidate_html(c: CandidateDrift, fdr: float) -> str:
    parts = [f"<h2>Candidate {_e(c.candidate)}</h2>",
             f"<p>Drift score <b>{c.drift_score:.2f}</b> · KL per token {c.kl.mean:.4f} "
             f"[{c.kl.ci_low:.4f}, {c.kl.ci_high:.4f}] · FVU base {c.fvu.base:.3f}, candidate {c.fvu.candidate:.3f} · "
             f"{c.n_latents_up} latents up, {c.n_latents_down} down (BH at {fdr:g})</p>"]
    parts += [f'<p class="warn">{_e(w)}</p>' for w in c.warnings]
    parts.append("<h3>Rule firing rates (grey: base, colour: candidate with its 95% interval)</h3>")
    parts.append(rates_svg(c))
    parts.append("<table><tr><th>rule</th><th>mode</th><th>base</th><th>candidate</th><th>delta</th><th>95% CI</th>"
                 "<th>p</th><th>verdict</th></tr>" + "".join(
                     f'<tr><td>{_e(r.id)}</td><td>{_e(r.mode)}</td><td>{r.base_rate:.3f}</td><td>{r.candidate_rate:.3f}</td>'
                     f'<td>{r.delta:+.3f}</td><td>[{r.ci_low:+.3f}, {r.ci_high:+.3f}]</td><td>{r.p_value:.4f}</td>'
                     f'<td class="{r.verdict}">{r.verdict}</td></tr>' for r in c.rules) + "</table>")
    parts.append(f"<h3>Catalog features (teacher-forced; null |t| from random latents {c.null_t:.1f})</h3>")
    parts.append("<table><tr><th>feature</th><th>base</th><th>candidate</th><th>delta</th><th>95% CI</th><th>t</th>"
                 "<th>q</th><th>response peak base / cand.</th><th>verdict</th></tr>" + "".join(
                     f'<tr><td>{_e(f.name)}</td><td>{f.base_mean:.3f}</td><td>{f.candidate_mean:.3f}</td>'
                     f'<td>{f.delta:+.3f}</td><td>[{f.ci_low:+.3f}, {f.ci_high:+.3f}]</td><td>{f.t:+.1f}</td>'
                     f'<td>{f.q_value:.4f}</td><td>{f.base_response_peak:.2f} / {f.candidate_response_peak:.2f}</td>'
                     f'<td class="{f.verdict}">{f.verdict}</td></tr>' for f in c.features) + "</table>")
    if c.directions:
        parts.append("<h3>Concept directions (teacher-forced shift of the mean residual along what separates "
                     "each minimal-pair set's two sides)</h3>")
        parts.append("<table><tr><th>direction</th><th>pairs</th><th>shift</th><th>relative to separation</th>"
                     "<th>95% CI</th><th>null (random directions)</th><th>score</th><th>p</th><th>verdict</th></tr>"
                     + "".join(f'<tr><td>{_e(d.name)}</td><td>{d.pairs}</td><td>{d.delta:+.4f}</td>'
                               f'<td>{d.relative:+.3f}</td><td>[{d.ci_low:+.3f}, {d.ci_high:+.3f}]</td>'
                               f'<td>{d.null_delta:.4f}</td><td>{d.score:.2f}</td><td>{d.p_value:.4f}</td>'
                               f'<td class="{d.verdict}">{d.verdict}</td></tr>' for d in c.directions) + "</table>")
    if c.preferences:
        parts.append("<h3>Pair preference (change of log p(concept side) − log p(contrast side), nats per pair)</h3>")
        parts.append("<table><tr><th>pairs file</th><th>pairs</th><th>base margin</th><th>shift</th><th>95% CI</th>"
                     "<th>pairs moved up</th><th>p</th><th>verdict</th></tr>"
                     + "".join(f'<tr><td>{_e(q.name)}</td><td>{q.pairs}</td><td>{q.base_margin:+.2f}</td>'
                               f'<td>{q.delta:+.3f}</td><td>[{q.ci_low:+.3f}, {q.ci_high:+.3f}]</td>'
                               f'<td>{q.share_up:.0%}</td><td>{q.p_value:.4f}</td>'
                               f'<td class="{q.verdict}">{q.verdict}</td></tr>' for q in c.preferences) + "</table>")
    parts.append("<h3>Most-moved latents</h3>")
    parts.append(latents_svg(c))
    for s in list(c.latents_up) + list(c.latents_down):
        if s.contexts:
            parts.append(f"<p>latent {s.latent}{' (' + _e(s.name) + ')' if s.name else ''}: "
                         f"{s.base_mean:.3f} → {s.candidate_mean:.3f}</p>")
            parts += [f'<div class="ctx">{_e(t)}</div>' for t in s.contexts]
    parts.append(f"<h3>Activation-difference lens (first {c.lens.tokens} tokens of unrelated texts)</h3>")
    parts.append(f"<p>|mean difference| {c.lens.norm:.3f} ({c.lens.relative_norm:.1%} of the residual). Points to:</p>")
    parts.append("<table><tr><th>latent / feature</th><th>cosine</th><th>percentile</th></tr>" + "".join(
        f"<tr><td>{_e(e.name)}</td><td>{e.cosine:+.3f}</td><td>{e.percentile:.3f}</td></tr>"
        for e in list(c.lens.top_latents) + list(c.lens.features)) + "</table>")
    return "".join(parts)


def render_html(result: DriftResult, path: str | Path) -> Path:
    """Write the self-contained HTML report to ``path``; returns the path."""
    path = Path(path)
    body = [f"<h1>Fine-tuning drift against {_e(result.base)}</h1>",
            f"<p>{result.settings.get('prompts')} prompts × {len(result.settings.get('passes', []))} passes "
            f"({', '.join(map(str, result.settings.get('passes', [])))}), {result.settings.get('texts')} texts; "
            f"verdicts at false-discovery rate {result.fdr:g}. Exit code {result.exit_code}.</p>"]
    if len(result.candidates) > 1:
        body += ["<h2>Checkpoint series</h2>", series_svg(result)]
    body += [_candidate_html(c, result.fdr) for c in result.candidates]
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>sae-monitor drift</title>'
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
