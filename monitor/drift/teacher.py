"""Teacher-forced pass: fixed token sequences through one model, measured in the SAE basis.

The same transcripts and texts go through both models, so differences are the models', not
sampling noise. Per item (a transcript's response tokens, or a text's tokens) we keep:

* the mean of every SAE latent (the per-latent change of mean activation is their difference);
* the mean and peak of each watched feature column (catalog latents and probes);
* the SAE's reconstruction error and the residual's moments, for the FVU under this model;
* the mean residual over the item's first ``lens_tokens`` tokens (after the first token, an
  attention sink with a huge norm), for the activation-difference lens (Minder et al. 2025).

The forward pass stops after the SAE's layer (:func:`monitor.capture.forward_through`). The
per-token KL between two models' next-token distributions needs full forwards of both, so
:func:`next_token_kl` runs them side by side on the first ``n_tokens`` tokens of each item.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from monitor.capture import forward_through
from monitor.sae import SAE

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Item:
    """A token sequence and the position from which its tokens are scored."""

    ids: tuple[int, ...]
    score_from: int = 1


@dataclass(frozen=True)
class Columns:
    """Watched feature columns: ``names[i]`` is SAE latent ``latents[i]`` for the first
    ``len(latents)`` names, then a probe ``x @ probe_w[:, j] + probe_b[j]``."""

    names: tuple[str, ...]
    latents: tuple[int, ...]
    probe_w: torch.Tensor  # [d_in, n_probes]
    probe_b: torch.Tensor  # [n_probes]

    def of(self, resid: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        """The columns from a float32 residual and its full SAE encoding ``acts[..., d_sae]``."""
        return self._join(resid, acts[..., list(self.latents)])

    def encoder(self, sae: SAE) -> Callable[[torch.Tensor], torch.Tensor]:
        """``resid -> columns`` encoding only the watched latents (for per-step use while
        generating, where the full encoding is not needed)."""
        subset = sae.subset_encoder(list(self.latents))
        dtype = sae.W_enc.dtype

        def encode(resid: torch.Tensor) -> torch.Tensor:
            x = resid.to(dtype)
            return self._join(x.float(), subset(x).float())

        return encode

    def _join(self, resid: torch.Tensor, latent_acts: torch.Tensor) -> torch.Tensor:
        parts = [latent_acts]
        if self.probe_w.shape[1]:
            parts.append(resid @ self.probe_w + self.probe_b)
        return torch.cat(parts, dim=-1)


@dataclass(frozen=True)
class Measurement:
    """Per-item measurements of one model (``N`` items)."""

    latent_mean: torch.Tensor    # [N, d_sae]
    feature_mean: torch.Tensor   # [N, F]
    feature_peak: torch.Tensor   # [N, F]
    n_tokens: torch.Tensor       # [N] scored tokens
    sse: torch.Tensor            # [N] sum of squared reconstruction error
    sum_x: torch.Tensor          # [N, d_in]
    sum_sq: torch.Tensor         # [N] sum of squared norms
    lens_mean: torch.Tensor      # [N, d_in] mean residual over the first lens_tokens scored tokens
    latent_peak: torch.Tensor    # [N, d_sae] peak activation over the scored tokens (0 if none)

    def fvu(self, rows: torch.Tensor | None = None) -> float:
        """Fraction of the residual's variance (around its mean) the SAE fails to reconstruct."""
        sel = slice(None) if rows is None else rows
        n = float(self.n_tokens[sel].sum())
        if n == 0:
            return float("nan")
        total = float(self.sum_sq[sel].sum()) - float((self.sum_x[sel].sum(0) ** 2).sum()) / n
        return float(self.sse[sel].sum()) / max(total, 1e-12)


def pad_batch(items: Sequence[Item], pad: int, ctx: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Right-padded ids, the attention mask (None when no row is padded: the model then keeps
    its fast causal path; an explicit mask makes CPU attention materialise ``[B, H, T, T]``)
    and the scored positions."""
    seqs = [list(it.ids[:ctx]) for it in items]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    pos = torch.arange(width)[None, :]
    scored = attn.bool() & (pos >= torch.tensor([it.score_from for it in items])[:, None])
    return ids, None if bool(attn.all()) else attn, scored


@torch.no_grad()
def measure(model: Any, tokenizer: Any, sae: SAE, columns: Columns, items: Sequence[Item], *,
            batch_size: int = 16, ctx: int = 256, lens_tokens: int = 8, max_batch_tokens: int = 2048,
            progress: Progress | None = None) -> Measurement:
    """Run ``items`` through ``model`` up to the SAE's layer and measure them (see module doc).

    Items go in length buckets (:func:`monitor.runtime.scan.length_buckets`) of at most
    ``batch_size`` items and ``max_batch_tokens`` padded tokens; per-item results do not depend
    on the batching (right padding under a causal mask) beyond float rounding."""
    from monitor.runtime.scan import length_buckets

    point = sae.hook_point
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    special = torch.tensor(sorted({int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}), dtype=torch.long)
    dtype = sae.W_enc.dtype
    n, d_in, d_sae, f = len(items), sae.cfg.d_in, sae.cfg.d_sae, len(columns.names)
    out = dict(latent_mean=torch.zeros(n, d_sae), feature_mean=torch.zeros(n, f), feature_peak=torch.zeros(n, f),
               n_tokens=torch.zeros(n), sse=torch.zeros(n, dtype=torch.float64),
               sum_x=torch.zeros(n, d_in, dtype=torch.float64), sum_sq=torch.zeros(n, dtype=torch.float64),
               lens_mean=torch.zeros(n, d_in), latent_peak=torch.zeros(n, d_sae))
    for rows in length_buckets([min(len(it.ids), ctx) for it in items], batch_size, max_batch_tokens):
        ids, attn, scored = pad_batch([items[i] for i in rows], pad, ctx)
        captured: list[torch.Tensor] = []
        forward_through(model, {point: lambda r: captured.append(r.detach())}, input_ids=ids, attention_mask=attn)
        resid = captured[0].to(dtype)
        mask = scored & ~torch.isin(ids, special) & sae.input_mask(resid).cpu()
        acts = sae.encode(resid).float()
        m = mask[..., None].float()
        count = m.sum(1).clamp_min(1.0)
        feats = columns.of(resid.float(), acts)
        err = ((sae.decode(acts.to(dtype), resid) - resid).float() ** 2).sum(-1)
        x = resid.double() * m
        # lens: the first `lens_tokens` scored positions of each item
        rank = torch.cumsum(mask.long(), dim=1)
        lens = (mask & (rank <= lens_tokens))[..., None].float()
        idx = torch.tensor(rows)
        out["latent_mean"][idx] = (acts * m).sum(1) / count
        out["latent_peak"][idx] = (acts * m).amax(1)     # acts >= 0: masked positions count as 0
        out["feature_mean"][idx] = (feats * m).sum(1) / count
        out["feature_peak"][idx] = feats.masked_fill(~mask[..., None], float("-inf")).amax(1).clamp_min(0.0) \
            if feats.shape[-1] else torch.zeros(len(rows), 0)
        out["n_tokens"][idx] = m.sum((1, 2))
        out["sse"][idx] = (err.double() * mask).sum(1)
        out["sum_x"][idx] = x.sum(1)
        out["sum_sq"][idx] = (x ** 2).sum((1, 2))
        out["lens_mean"][idx] = (resid.float() * lens).sum(1) / lens.sum(1).clamp_min(1.0)
        if progress is not None:
            progress(len(rows))
    return Measurement(**out)


@torch.no_grad()
def next_token_kl(base: Any, candidate: Any, tokenizer: Any, items: Sequence[Item], *, n_tokens: int = 32,
                  batch_size: int = 8, progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``KL(base || candidate)`` of the next-token distributions over each item's
    first ``n_tokens`` positions. Returns ``(per_item_mean [N], per_position_mean [n_tokens])``
    (positions no item reaches are NaN)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    per_item = torch.zeros(len(items))
    pos_sum = torch.zeros(n_tokens, dtype=torch.float64)
    pos_count = torch.zeros(n_tokens, dtype=torch.float64)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        ids, attn, _ = pad_batch(chunk, pad, n_tokens)
        lp = torch.log_softmax(base(input_ids=ids, attention_mask=attn, use_cache=False).logits.float(), -1)
        lq = torch.log_softmax(candidate(input_ids=ids, attention_mask=attn, use_cache=False).logits.float(), -1)
        real = torch.ones_like(ids) if attn is None else attn
        kl = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0) * real          # [B, T]
        per_item[start:start + len(chunk)] = kl.sum(1) / real.sum(1).clamp_min(1)
        width = kl.shape[1]
        pos_sum[:width] += kl.sum(0).double()
        pos_count[:width] += real.sum(0).double()
        if progress is not None:
            progress(len(chunk))
    return per_item, (pos_sum / pos_count).float()
