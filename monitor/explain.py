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
:func:`monitor.explain_html.render_html` for one self-contained page.
Activations are those the monitor sees: position 0 and out-of-range tokens read as zero.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from monitor.capture import HookPoint, resolve_path
from monitor.activations import LabeledText, Progress, as_items, iter_token_activations, sae_encoder
from monitor.discover import DiscoveryResult
from monitor.errors import SAEMismatchError, UnsupportedModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


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
                 progress: Progress | None = None) -> dict[int, LatentScan]:
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
    items = as_items(texts)
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


def visible(piece: str) -> str:
    """Whitespace and control characters made visible, for one-line displays."""
    piece = piece.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")
    return "".join(f"\\x{ord(ch):02x}" if ord(ch) < 32 or ord(ch) == 127 else ch for ch in piece)


@torch.no_grad()
def logit_effects(model: PreTrainedModel, tokenizer: Any, sae: Any, latent: int, k: int = 10) -> LogitEffects:
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
    parts = [visible(t) for t in context.tokens]
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
        tok = visible(tok)
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
    rows = ["promotes:   " + "  ".join(f"'{visible(t)}' {v:+.2f}" for t, v in effects.promoted),
            "suppresses: " + "  ".join(f"'{visible(t)}' {v:+.2f}" for t, v in effects.suppressed)]
    return "\n".join(rows) + "\n"


def __getattr__(name: str) -> Any:
    # render_html moved to monitor.explain_html; the old import path keeps working.
    if name == "render_html":
        from monitor.explain_html import render_html

        return render_html
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
