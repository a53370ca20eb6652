"""What does a latent respond to? (``sae-monitor explain``)

Three views, in the manner of a Neuronpedia feature dashboard:

* **top contexts**: the texts where the latent fires hardest, with the activation of every token
  around the peak (:func:`top_contexts`, :func:`scan_latents` for several latents and the
  activation histogram in one pass);
* **activation histogram**: how often and how strongly it fires, over in-scope tokens;
* **logit effects**: the tokens its decoder direction most promotes and suppresses when read
  straight through the final norm's scale and the unembedding (:func:`logit_effects`). This
  ignores every layer after the SAE's, so it is a hint about output-side meaning, not a proof.

Renderers: :func:`format_contexts` for terminals (ANSI shading or plain marks) and
:func:`render_html` for one self-contained page (inline CSS and SVG, no scripts, no network).
Activations are those the monitor sees: position 0 and out-of-range tokens read as zero.
"""

from __future__ import annotations

import heapq
import html
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monitor.capture import HookPoint, resolve_path
from monitor.discover import (DiscoveryResult, LabeledText, _as_items, iter_token_activations,
                              sae_encoder)
from monitor.errors import SAEMismatchError, UnsupportedModelError


@dataclass(frozen=True)
class Context:
    """A window of tokens around the peak activation of one latent in one text."""

    item: int                          # index of the text it comes from
    tokens: tuple[str, ...]            # decoded pieces; joined they give the window's text
    activations: tuple[float, ...]     # one per token
    peak: int                          # index into ``tokens`` of the maximum
    start: int                         # token position of ``tokens[0]`` in the scanned window
    truncated_left: bool = False
    truncated_right: bool = False

    @property
    def value(self) -> float:
        """The activation at the peak."""
        return self.activations[self.peak]


@dataclass(frozen=True)
class Histogram:
    """Counts of nonzero activations in ``len(counts)`` equal bins from ``edges[0]`` to ``edges[-1]``."""

    edges: tuple[float, ...]
    counts: tuple[int, ...]
    n_tokens: int      # in-scope tokens scanned
    n_firing: int      # of which the latent was > 0

    @property
    def density(self) -> float:
        """Fraction of scanned tokens where the latent fires."""
        return self.n_firing / self.n_tokens if self.n_tokens else 0.0

    @classmethod
    def of(cls, values: torch.Tensor, n_tokens: int, bins: int = 40) -> Histogram:
        """Histogram of the positive entries of ``values``."""
        values = values.float()
        values = values[values > 0]
        if not len(values):
            return cls(edges=(0.0, 1.0), counts=(0,), n_tokens=n_tokens, n_firing=0)
        top = float(values.max())
        counts = torch.histc(values, bins=bins, min=0.0, max=top)
        edges = torch.linspace(0.0, top, bins + 1)
        return cls(edges=tuple(edges.tolist()), counts=tuple(int(c) for c in counts.tolist()),
                   n_tokens=n_tokens, n_firing=len(values))


@dataclass(frozen=True)
class LatentScan:
    latent: int
    contexts: list[Context]
    histogram: Histogram
    n_texts: int


@dataclass(frozen=True)
class LogitEffects:
    """Tokens the latent's decoder direction pushes up (``promoted``) and down, with the
    logit change per unit of activation, strongest first."""

    latent: int
    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]


# ------------------------------------------------------------------ scanning


def token_pieces(tokenizer: Any, ids: Sequence[int], previous: int | None = None) -> list[str]:
    """The text each token contributes, such that joining the pieces gives the decoded text.

    Decodes incrementally (byte-level tokens that split a character give "" until it is
    complete). ``previous``, the token before ``ids``, keeps a leading space that tokenizers
    strip from the first token of a decode.
    """
    prefix = [] if previous is None else [int(previous)]
    done = tokenizer.decode(prefix, skip_special_tokens=False) if prefix else ""
    pieces = []
    for i in range(len(ids)):
        text = tokenizer.decode(prefix + [int(t) for t in ids[:i + 1]], skip_special_tokens=False)
        if text.endswith("\ufffd") and i + 1 < len(ids):
            pieces.append("")  # an incomplete character: its last byte's token will carry it
            continue
        if text.startswith(done):
            pieces.append(text[len(done):])
        else:  # the decode of the longer sequence rewrote earlier text
            pieces.append(tokenizer.decode([int(ids[i])], skip_special_tokens=False))
        done = text
    return pieces


@torch.no_grad()
def scan_latents(model: nn.Module, tokenizer: Any, sae: Any, latents: Sequence[int],
                 texts: Sequence[str | LabeledText], *, n: int = 10, window: int = 12,
                 bins: int = 40, ctx: int = 256, batch_size: int = 8, point: HookPoint | None = None,
                 progress: Callable[[int, int], None] | None = None) -> dict[int, LatentScan]:
    """One pass over ``texts``: for each latent its ``n`` top contexts (one per text, the text's
    peak token ± ``window`` tokens) and the histogram of its nonzero activations.

    Texts stream through in length-sorted batches; memory holds the nonzero activations and
    ``n`` windows per latent. Texts where a latent never fires give it no context.
    """
    latents = [int(j) for j in latents]
    d_sae = sae.cfg.d_sae
    if any(not 0 <= j < d_sae for j in latents):
        raise SAEMismatchError(f"latents {latents} out of range for an SAE with {d_sae} latents "
                               f"(valid: 0..{d_sae - 1})")
    items = _as_items(texts)
    point = point or sae.hook_point
    heaps: list[list[tuple[float, int, Context]]] = [[] for _ in latents]
    nonzero: list[list[torch.Tensor]] = [[] for _ in latents]
    n_tokens = 0
    for tb in iter_token_activations(model, tokenizer, items, point, sae_encoder(sae, latents),
                                     ctx=ctx, batch_size=batch_size, progress=progress):
        flat = tb.acts[tb.scope]                                   # [tokens, L]
        n_tokens += flat.shape[0]
        for c in range(len(latents)):
            col = flat[:, c]
            nonzero[c].append(col[col > 0])
        peak_val, peak_pos = tb.acts.max(dim=1)                    # [b, L]
        floor = torch.tensor([h[0][0] if len(h) >= n else 0.0 for h in heaps])
        candidates = ((peak_val > floor) & (peak_val > 0)).nonzero().tolist()
        for r, c in candidates:
            value, item = float(peak_val[r, c]), tb.indices[r]
            key = (value, -item)
            heap = heaps[c]
            if len(heap) >= n and key <= heap[0][:2]:
                continue
            length, p = tb.lengths[r], int(peak_pos[r, c])
            s, e = max(0, p - window), min(length, p + window + 1)
            ids = tb.ids[r, s:e].tolist()
            context = Context(item=item, tokens=tuple(token_pieces(tokenizer, ids,
                                                                   int(tb.ids[r, s - 1]) if s else None)),
                              activations=tuple(tb.acts[r, s:e, c].tolist()), peak=p - s, start=s,
                              truncated_left=s > 0, truncated_right=e < length)
            entry = (value, -item, context)
            if len(heap) < n:
                heapq.heappush(heap, entry)
            else:
                heapq.heapreplace(heap, entry)
    out = {}
    for c, j in enumerate(latents):
        ranked = [ctx_ for _, _, ctx_ in sorted(heaps[c], key=lambda h: (-h[0], -h[1]))]
        values = torch.cat(nonzero[c]) if nonzero[c] else torch.zeros(0)
        out[j] = LatentScan(latent=j, contexts=ranked, histogram=Histogram.of(values, n_tokens, bins),
                            n_texts=len(items))
    return out


def top_contexts(model: nn.Module, tokenizer: Any, sae: Any, latent: int,
                 texts: Sequence[str | LabeledText], n: int = 10, window: int = 12,
                 **kwargs: Any) -> list[Context]:
    """The ``n`` contexts where ``latent`` fires hardest, strongest first (see :func:`scan_latents`)."""
    return scan_latents(model, tokenizer, sae, [latent], texts, n=n, window=window, **kwargs)[latent].contexts


def example_contexts(model: nn.Module, tokenizer: Any, sae: Any, result: DiscoveryResult,
                     latents: Sequence[int], *, k: int = 3, window: int = 8,
                     ctx: int = 256) -> dict[int, list[str]]:
    """Short marked-up contexts (``…text «peak» text…``) for catalog evidence: for each latent,
    its top contexts among the ``k`` positive items of ``result`` where it is highest."""
    out: dict[int, list[str]] = {}
    for j in latents:
        chosen = result.top_items(int(j), k)
        if not chosen:
            out[int(j)] = []
            continue
        contexts = top_contexts(model, tokenizer, sae, int(j), [result.items[i] for i in chosen],
                                n=k, window=window, ctx=ctx, point=result.point)
        out[int(j)] = [context_text(c) for c in contexts]
    return out


# ------------------------------------------------------------------ logit effects


_FINAL_NORMS = ("model.norm", "model.language_model.norm", "language_model.model.norm",
                "model.decoder.final_layer_norm", "transformer.ln_f", "gpt_neox.final_layer_norm",
                "transformer.norm", "norm")


def _final_norm_scale(model: nn.Module) -> torch.Tensor | None:
    for path in _FINAL_NORMS:
        node = resolve_path(model, path)
        weight = getattr(node, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 1:
            scale = weight.detach().float()
            # Gemma's RMSNorm multiplies by (1 + weight).
            return scale + 1 if "gemma" in type(node).__name__.lower() else scale
    return None


def _visible(piece: str) -> str:
    """Whitespace and control characters made visible, for one-line displays."""
    piece = piece.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")
    return "".join(f"\\x{ord(ch):02x}" if ord(ch) < 32 or ord(ch) == 127 else ch for ch in piece)


@torch.no_grad()
def logit_effects(model: nn.Module, tokenizer: Any, sae: Any, latent: int, k: int = 10) -> LogitEffects:
    """The ``k`` tokens whose logits ``W_dec[latent] @ (final_norm.weight * W_U).T`` raises most
    and the ``k`` it lowers most. Vocabulary rows past the tokenizer's size are ignored."""
    if not 0 <= latent < sae.cfg.d_sae:
        raise SAEMismatchError(f"latent {latent} out of range for an SAE with {sae.cfg.d_sae} "
                               f"latents (valid: 0..{sae.cfg.d_sae - 1})")
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise UnsupportedModelError(f"{type(model).__name__} has no output embedding (lm_head) "
                                    "to read logit effects through")
    unembed = head.weight.detach()                                   # [vocab, d_model]
    direction = sae.W_dec[latent].detach().float()
    scale = _final_norm_scale(model)
    if scale is not None and scale.shape == direction.shape:
        direction = direction * scale
    effects = (unembed.float() @ direction)[:len(tokenizer)]
    k = min(k, len(effects))
    up = torch.topk(effects, k)
    down = torch.topk(-effects, k)

    def text_of(i: int) -> str:
        text = tokenizer.decode([i], skip_special_tokens=False)
        # a byte of a multi-byte character decodes to U+FFFD alone; its raw token says more
        return str(tokenizer.convert_ids_to_tokens(i)) if "\ufffd" in text else text

    def named(ids: torch.Tensor, values: torch.Tensor) -> list[tuple[str, float]]:
        return [(text_of(int(i)), float(v)) for i, v in zip(ids.tolist(), values.tolist())]

    return LogitEffects(latent=latent, promoted=named(up.indices, up.values),
                        suppressed=named(down.indices, -down.values))


# ------------------------------------------------------------------ terminal rendering

_SHADES = (230, 229, 222, 221, 215, 214, 208, 202)   # xterm-256 backgrounds, light to strong


def context_text(context: Context, marks: tuple[str, str] = ("«", "»")) -> str:
    """One line of plain text with the peak token marked and newlines shown as ↵."""
    parts = [_visible(t) for t in context.tokens]
    parts[context.peak] = f"{marks[0]}{parts[context.peak]}{marks[1]}"
    return ("…" if context.truncated_left else "") + "".join(parts) + \
        ("…" if context.truncated_right else "")


def format_context(context: Context, *, color: bool = True, scale: float | None = None) -> str:
    """One context as one line. ``color``: tokens shaded by activation (ANSI 256 colours), the
    peak in bold. Without colour, firing tokens are wrapped ``«token»`` and the peak reads
    ``«token=1.23»``."""
    scale = scale or max(context.value, 1e-9)
    out = ["…" if context.truncated_left else ""]
    for i, (tok, a) in enumerate(zip(context.tokens, context.activations)):
        tok = _visible(tok)
        if a <= 0:
            out.append(tok)
        elif color:
            shade = _SHADES[min(len(_SHADES) - 1, int(len(_SHADES) * min(a / scale, 1.0)))]
            bold = "1;" if i == context.peak else ""
            out.append(f"\x1b[{bold}30;48;5;{shade}m{tok}\x1b[0m")
        else:
            out.append(f"«{tok}={a:.2f}»" if i == context.peak else f"«{tok}»")
    out.append("…" if context.truncated_right else "")
    return "".join(out)


def format_contexts(contexts: Sequence[Context], *, color: bool = True,
                    title: str | None = None) -> str:
    """Numbered contexts, strongest first, shaded on one common scale."""
    scale = max((c.value for c in contexts), default=1.0)
    lines = [title] if title else []
    if not contexts:
        lines.append("  (the latent never fired on these texts)")
    for rank, c in enumerate(contexts, 1):
        lines.append(f"{rank:>3}. {c.value:8.3f}  text {c.item:<5} "
                     + format_context(c, color=color, scale=scale))
    return "\n".join(lines) + "\n"


def format_logit_effects(effects: LogitEffects) -> str:
    rows = ["promotes:   " + "  ".join(f"'{_visible(t)}' {v:+.2f}" for t, v in effects.promoted),
            "suppresses: " + "  ".join(f"'{_visible(t)}' {v:+.2f}" for t, v in effects.suppressed)]
    return "\n".join(rows) + "\n"


# ------------------------------------------------------------------ HTML page

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
                       f'{_esc(_visible(t))}</span></td>'
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
