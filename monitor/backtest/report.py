"""Rendering a backtest summary: a terminal table, JSON, and a self-contained HTML report.

Last stage (read -> scan -> results -> summary/diff -> **report**). Input is the summary dict
of :func:`monitor.backtest.summary.summarize`; nothing here reads results or models. The HTML
page has no script and no external resource: plots are inline SVG, every text is escaped.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monitor.backtest.scan import DECISIONS

COLORS = {"block": "#c0392b", "steer": "#8e44ad", "alert": "#d68910", "log": "#2e86c1", "allow": "#7f8c8d"}
VERSION_COLORS = ("#1f6f8b", "#b9770e")


def render_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2, ensure_ascii=False)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return out


def render_table(summary: dict[str, Any], problems_shown: int = 5) -> str:
    """The terminal summary: totals, decisions and rules per version, the diff, the problems."""
    lines = [f"records {summary['records']}  scanned {summary['scanned']}  skipped {summary['skipped']}  "
             f"tokens {summary['tokens']}  dtype {summary.get('dtype', 'float32')}"]
    for label, v in summary["versions"].items():
        lines += ["", f"[{label}] {v.get('source', '')}  version {v.get('version_id', '')}"]
        lines.append("  " + "  ".join(f"{d} {v['decisions'][d]} ({_pct(v['rates'][d])})" for d in DECISIONS))
        rows = [(r["rule"], r["mode"], r["action"], r["conversations"], _pct(r["rate"]), r["would_block"],
                 r["would_alert"], r["would_steer"]) for r in v["rules"]]
        if rows:
            lines += ["  " + x for x in _table(("rule", "mode", "action", "convs", "rate", "block", "alert", "steer"),
                                               rows)]
        else:
            lines.append("  no rule fired")
    d = summary.get("diff")
    if d:
        c = d["counts"]
        lines += ["", f"diff {d['candidate']} vs {d['baseline']}: newly blocked {c['newly_blocked']}, "
                      f"no longer blocked {c['no_longer_blocked']}, changed action {c['changed_action']}"]
        for kind in ("newly_blocked", "no_longer_blocked", "changed_action"):
            for item in d[kind][:problems_shown]:
                lines.append(f"  {kind:<18} {item['key']}  {item[d['baseline']]} -> {item[d['candidate']]}  "
                             f"({item[d['candidate'] + '_rule'] or item[d['baseline'] + '_rule']})")
        for r in d["rules"]:
            lines.append(f"  rule {r['rule']}: {r[d['baseline']]} -> {r[d['candidate']]} conversations")
    p = summary["problems"]
    if p["counts"]:
        lines += ["", "skipped records: " + ", ".join(f"{k} {n}" for k, n in p["counts"].items())]
        shown: dict[str, int] = {}
        for rec in p["records"]:
            shown[rec["kind"]] = shown.get(rec["kind"], 0) + 1
            if shown[rec["kind"]] <= problems_shown:
                lines.append(f"  {rec['key']}: {rec['kind']}: {rec['detail']}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- HTML

def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _bars_svg(groups: Sequence[tuple[str, Sequence[tuple[str, float, str]]]], title: str, fmt: str = "pct",
              width: int = 720) -> str:
    """Horizontal grouped bars: ``groups`` of (label, [(series, value, color)]); values in [0, 1]
    for ``pct``, else counts scaled to the largest."""
    bar_h, gap, left = 14, 10, 260
    n_bars = sum(len(s) for _, s in groups)
    height = 30 + n_bars * bar_h + len(groups) * gap + 10
    top = max([v for _, s in groups for _, v, _ in s] + [1e-9]) if fmt != "pct" else 1.0
    parts = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="{_e(title)}">', f'<text x="4" y="16" class="ttl">{_e(title)}</text>']
    y = 28
    for label, series in groups:
        parts.append(f'<text x="{left - 6}" y="{y + bar_h * len(series) / 2 + 4}" text-anchor="end">{_e(label)}</text>')
        for name, value, color in series:
            w = max(0.0, (width - left - 80) * value / top)
            shown = _pct(value) if fmt == "pct" else f"{value:g}"
            parts.append(f'<rect class="bar" x="{left}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" fill="{color}">'
                         f'<title>{_e(name)}: {_e(shown)}</title></rect>')
            parts.append(f'<text x="{left + w + 4:.1f}" y="{y + bar_h - 4}" class="val">{_e(name)} {_e(shown)}</text>')
            y += bar_h
        y += gap
    parts.append("</svg>")
    return "".join(parts)


CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
table{border-collapse:collapse;margin:8px 0 20px}td,th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4}code{font-size:12px}.plot text{font-size:11px}.plot .ttl{font-size:13px;font-weight:600}
.kpi{display:inline-block;margin-right:24px}td code,td small{word-break:break-all}.kpi b{font-size:20px;display:block}"""


def render_html(summary: dict[str, Any], path: str | Path, title: str = "Policy backtest") -> Path:
    """Write the HTML report for ``summary`` to ``path`` and return it."""
    s = summary
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{CSS}</style>"
           f"</head><body><h1>{_e(title)}</h1><section id='totals'>"]
    for name in ("records", "scanned", "skipped", "tokens"):
        out.append(f"<span class='kpi'><b>{_e(s[name])}</b>{_e(name)}</span>")
    out.append("</section><h2>Policy versions</h2><table><tr><th>label</th><th>source</th><th>version</th></tr>")
    for label, v in s["versions"].items():
        out.append(f"<tr><td>{_e(label)}</td><td>{_e(v.get('source', ''))}</td><td><code>{_e(v.get('version_id', ''))}"
                   "</code></td></tr>")
    out.append("</table><h2>Decisions</h2>")
    labels = list(s["versions"])
    groups = [(d, [(label, s["versions"][label]["rates"][d], COLORS[d]) for label in labels]) for d in DECISIONS]
    out.append(_bars_svg(groups, "share of scanned conversations per decision"))
    for i, (label, v) in enumerate(s["versions"].items()):
        out.append(f"<h2>Rules: {_e(label)}</h2>")
        if not v["rules"]:
            out.append("<p>No rule fired.</p>")
            continue
        out.append(_bars_svg([(r["rule"], [(label, r["rate"], VERSION_COLORS[i % 2])]) for r in v["rules"]],
                             f"{label}: share of conversations where each rule fired"))
        out.append("<table class='rules'><tr><th>rule</th><th>mode</th><th>action</th><th>conversations</th>"
                   "<th>rate</th><th>would block</th><th>would alert</th><th>would steer</th><th>examples</th></tr>")
        for r in v["rules"]:
            ex = "<br>".join(_example_html(x) for x in r["examples"])
            out.append(f"<tr class='rule'><td>{_e(r['rule'])}</td><td>{_e(r['mode'])}</td><td>{_e(r['action'])}</td>"
                       f"<td>{r['conversations']}</td><td>{_pct(r['rate'])}</td><td>{r['would_block']}</td>"
                       f"<td>{r['would_alert']}</td><td>{r['would_steer']}</td><td>{ex}</td></tr>")
        out.append("</table>")
    d = s.get("diff")
    if d:
        out.append(f"<h2 id='diff'>Diff: {_e(d['candidate'])} against {_e(d['baseline'])}</h2>")
        out.append(_bars_svg([(k.replace("_", " "), [("conversations", float(n), COLORS['block'])])
                              for k, n in d["counts"].items()], "conversations whose decision changes", fmt="count"))
        for kind in ("newly_blocked", "no_longer_blocked", "changed_action"):
            items = d[kind]
            out.append(f"<h3>{_e(kind.replace('_', ' '))} ({len(items)})</h3>")
            if items:
                out.append(f"<table class='diff {kind}'><tr><th>conversation</th><th>{_e(d['baseline'])}</th>"
                           f"<th>{_e(d['candidate'])}</th><th>rule</th></tr>")
                for it in items[:200]:
                    rule = it[d['candidate'] + '_rule'] or it[d['baseline'] + '_rule'] or ""
                    out.append(f"<tr><td>{_example_html(it)}</td><td>{_e(it[d['baseline']])}</td>"
                               f"<td>{_e(it[d['candidate']])}</td><td>{_e(rule)}</td></tr>")
                out.append("</table>")
        if d["rules"]:
            out.append("<table class='rulediff'><tr><th>rule</th><th>baseline</th><th>candidate</th><th>change</th></tr>")
            for r in d["rules"]:
                out.append(f"<tr><td>{_e(r['rule'])}</td><td>{r[d['baseline']]}</td><td>{r[d['candidate']]}</td>"
                           f"<td>{r['change']:+d}</td></tr>")
            out.append("</table>")
    p = s["problems"]
    out.append(f"<h2 id='problems'>Skipped records ({s['skipped']})</h2>")
    if p["counts"]:
        out.append("<table class='problems'><tr><th>where</th><th>kind</th><th>why</th></tr>")
        for rec in p["records"][:500]:
            out.append(f"<tr><td><code>{_e(rec['key'])}</code></td><td>{_e(rec['kind'])}</td><td>{_e(rec['detail'])}</td></tr>")
        out.append("</table>")
    else:
        out.append("<p>None.</p>")
    out.append("</body></html>\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(out), encoding="utf-8")
    return path


def _example_html(x: dict[str, Any]) -> str:
    where = f" turn {x['turn']} {x['scope']} token {x['token']}" if "turn" in x else ""
    text = ""
    if x.get("messages"):
        text = "<br><small>" + _e(" | ".join(f"{m['role']}: {m['content'][:160]}" for m in x["messages"])) + "</small>"
    digest = x.get("text_sha256") or ""
    return (f"<code>{_e(x['key'])}</code>{_e(where)}<br><small title=\"{_e(digest)}\">{_e(digest[:23])}</small>"
            f"{text}")
