"""The explain page: one self-contained HTML dashboard for a latent (``sae-monitor explain --html``).

Inline CSS and SVG only: no scripts, fonts or network requests, so the page can be mailed or
attached to a review. Reads what :mod:`monitor.explain` computed (contexts, histogram, logit
effects); computes nothing itself.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monitor.explain import Context, Histogram, LogitEffects, visible

_CSS = """
:root { --ink:#1d2330; --muted:#667085; --line:#e4e7ec; --card:#ffffff; --bg:#f5f6f8;
        --up:#1a7f4b; --down:#b42318; --fire:255,115,0; }
* { box-sizing:border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
       font:14px/1.45 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
header { padding:20px 28px 14px; background:var(--card); border-bottom:1px solid var(--line); }
h1 { margin:0; font-size:22px; } h1 .name { color:var(--muted); font-weight:500; margin-left:8px; }
.desc { margin:6px 0 0; color:var(--muted); }
.stats { display:flex; flex-wrap:wrap; gap:10px; margin-top:14px; }
.stat { background:var(--bg); border:1px solid var(--line); border-radius:8px; padding:6px 12px; }
.stat b { display:block; font-size:16px; } .stat span { color:var(--muted); font-size:12px; }
main { display:grid; grid-template-columns:340px minmax(0,1fr); gap:20px; padding:20px 28px; }
section { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:14px 16px;
          margin-bottom:20px; }
h2 { margin:0 0 10px; font-size:13px; text-transform:uppercase; letter-spacing:.06em; color:var(--muted); }
.note { color:var(--muted); font-size:12px; margin:6px 0 0; }
table.logits { width:100%; border-collapse:collapse; font-size:13px; table-layout:fixed; margin-bottom:10px; }
table.logits td { padding:2px 4px; vertical-align:middle; }
table.logits td.tok { width:46%; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
table.logits td.v { text-align:right; font-variant-numeric:tabular-nums; width:52px; }
.bar div { height:10px; border-radius:2px; }
.up .bar div { background:var(--up); opacity:.75; } .down .bar div { background:var(--down); opacity:.75; }
.chip { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; white-space:pre;
        background:#f2f4f7; border:1px solid var(--line); border-radius:4px; padding:0 4px; }
h3 { margin:0 0 4px; font-size:12px; } .up h3 { color:var(--up); } .down h3 { color:var(--down); }
svg text { font:11px sans-serif; fill:var(--muted); }
.ex { display:flex; gap:12px; padding:9px 0; border-top:1px solid var(--line); }
.ex:first-of-type { border-top:none; }
.ex .val { flex:0 0 64px; text-align:right; font-variant-numeric:tabular-nums; font-weight:600; }
.ex .val small { display:block; font-weight:400; color:var(--muted); font-size:11px; }
.toks { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:13px;
        white-space:pre-wrap; word-break:break-word; line-height:1.75; }
.toks span.t { border-radius:3px; padding:1px 0; }
.toks span.pk { outline:2px solid rgb(var(--fire)); outline-offset:0; font-weight:700; }
.toks .nl { color:#98a2b3; } .toks .cut { color:#98a2b3; }
footer { padding:0 28px 24px; color:var(--muted); font-size:12px; }
"""


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _token_html(tok: str, a: float, scale: float, peak: bool) -> str:
    pieces = []
    for n, line in enumerate(tok.split("\n")):
        if n:
            pieces.append('<span class="nl">↵</span>\n')
        if line:
            pieces.append(_esc(line.replace("\t", "    ")))
    body = "".join(pieces) or "&#8203;"
    if a <= 0:
        return body
    alpha = 0.12 + 0.78 * min(a / scale, 1.0)
    cls = "t pk" if peak else "t"
    return (f'<span class="{cls}" style="background:rgba(var(--fire),{alpha:.3f})" '
            f'title="{_esc(repr(tok))}: {a:.3f}">{body}</span>')


def _examples_html(contexts: Sequence[Context], texts: Sequence[str] | None) -> str:
    if not contexts:
        return '<p class="note">The latent never fired on the scanned texts.</p>'
    scale = max(c.value for c in contexts) or 1.0
    rows = []
    for c in contexts:
        toks = "".join(_token_html(t, a, scale, i == c.peak)
                       for i, (t, a) in enumerate(zip(c.tokens, c.activations)))
        left = '<span class="cut">…</span>' if c.truncated_left else ""
        right = '<span class="cut">…</span>' if c.truncated_right else ""
        origin = _esc(texts[c.item][:80]) if texts is not None and c.item < len(texts) else f"text {c.item}"
        rows.append(f'<div class="ex"><div class="val">{c.value:.2f}<small>text {c.item}</small></div>'
                    f'<div class="toks" title="{origin}">{left}{toks}{right}</div></div>')
    return "\n".join(rows)


def _histogram_svg(h: Histogram, width: int = 306, height: int = 150) -> str:
    left, bottom, top = 34, 22, 8
    plot_w, plot_h = width - left - 6, height - bottom - top
    peak = max(h.counts) if h.counts else 0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="activation histogram">']
    parts.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
                 'stroke="#98a2b3"/>')
    if peak:
        bar_w = plot_w / len(h.counts)
        for i, count in enumerate(h.counts):
            if not count:
                continue
            bh = max(1.0, plot_h * count / peak)
            x = left + i * bar_w
            parts.append(f'<rect class="bar" x="{x + 0.5:.1f}" y="{top + plot_h - bh:.1f}" '
                         f'width="{max(bar_w - 1, 0.5):.1f}" height="{bh:.1f}" fill="rgb(255,115,0)" '
                         f'fill-opacity="0.8"><title>{h.edges[i]:.2f}–{h.edges[i + 1]:.2f}: '
                         f'{count} tokens</title></rect>')
        parts.append(f'<text x="{left - 4}" y="{top + 9}" text-anchor="end">{peak}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">0</text>')
    parts.append(f'<text x="{left}" y="{height - 6}">0</text>')
    parts.append(f'<text x="{left + plot_w}" y="{height - 6}" text-anchor="end">{h.edges[-1]:.2f}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">activation</text>')
    parts.append("</svg>")
    return "".join(parts)


def _logits_html(effects: LogitEffects) -> str:
    scale = max([abs(v) for _, v in effects.promoted + effects.suppressed] + [1e-9])

    def table(rows: list[tuple[str, float]]) -> str:
        body = "".join(f'<tr><td class="tok" title="{_esc(repr(t))}"><span class="chip">'
                       f'{_esc(visible(t))}</span></td>'
                       f'<td class="bar"><div style="width:{100 * abs(v) / scale:.0f}%"></div></td>'
                       f'<td class="v">{v:+.2f}</td></tr>' for t, v in rows)
        return f'<table class="logits">{body}</table>'

    return (f'<div class="up"><h3>Promoted</h3>{table(effects.promoted)}</div>'
            f'<div class="down"><h3>Suppressed</h3>{table(effects.suppressed)}</div>')


def render_html(latent: int, contexts: Sequence[Context], histogram: Histogram | None,
                logit_effects: LogitEffects | None, out_path: str | Path, *,
                name: str | None = None, description: str | None = None,
                stats: Mapping[str, Any] | None = None, texts: Sequence[str] | None = None) -> Path:
    """Write a self-contained dashboard page for ``latent`` to ``out_path`` and return the path.

    Sections: a header with ``name``, ``description`` and ``stats`` (e.g. AUROC from
    discovery); the top contexts with each token shaded in proportion to its activation (hover
    shows the value; the peak is outlined); the activation histogram as inline SVG; and the
    promoted and suppressed tokens. Inline CSS only: no scripts, fonts or network requests.
    """
    cards = []
    if contexts:
        cards.append(("max activation (shown)", f"{max(c.value for c in contexts):.3f}"))
    if histogram is not None:
        cards.append(("firing density", f"{histogram.density:.3%}"))
        cards.append(("tokens scanned", f"{histogram.n_tokens:,}"))
    for key, value in (stats or {}).items():
        cards.append((str(key), f"{value:.3f}" if isinstance(value, float) else str(value)))
    stat_html = "".join(f'<div class="stat"><b>{_esc(v)}</b><span>{_esc(k)}</span></div>' for k, v in cards)
    title = f"Latent {latent}" + (f" · {name}" if name else "")
    side = []
    if logit_effects is not None:
        side.append('<section id="logits"><h2>Logit effects</h2>' + _logits_html(logit_effects)
                    + '<p class="note">Decoder direction × final-norm scale × unembedding; '
                    'layers after the SAE are ignored.</p></section>')
    if histogram is not None:
        side.append(f'<section id="histogram"><h2>Activation density</h2>{_histogram_svg(histogram)}'
                    f'<p class="note">{histogram.n_firing:,} of {histogram.n_tokens:,} tokens fire '
                    f'({histogram.density:.3%}); bars count the nonzero activations.</p></section>')
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title><style>{_CSS}</style></head>
<body>
<header><h1>Latent {latent}{f'<span class="name">{_esc(name)}</span>' if name else ''}</h1>
{f'<p class="desc">{_esc(description)}</p>' if description else ''}
<div class="stats">{stat_html}</div></header>
<main><div class="side">{''.join(side)}</div>
<div><section id="examples"><h2>Top activations</h2>
{_examples_html(contexts, texts)}</section></div></main>
<footer>Generated by sae-monitor. Shading is proportional to activation, on one scale for all
examples; the outlined token is each text's peak.</footer>
</body></html>
"""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(page, encoding="utf-8")
    return out_path
