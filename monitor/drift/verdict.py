"""From two models' measurements to verdicts: rules, catalog features, latents, lens, FVU, KL.

Pure functions over the tensors the behavioural and teacher-forced passes produce (no model).

Verdicts are taken at a stated false-discovery rate ``fdr``, with Benjamini–Hochberg within
each family (the rules; the catalog features; all SAE latents):

* a **rule** increased/decreased when its q-value is at most ``fdr`` (paired permutation test
  over prompts of the per-prompt change in "fired at least once", averaged over passes);
* a **catalog feature** increased/decreased when its q-value is at most ``fdr`` *and* its paired
  t statistic is beyond the null from random latents (the 95th percentile of ``|t|`` over 500
  random active latents): any fine-tune nudges every latent, and with hundreds of items a
  nudge is "significant"; a feature has moved only when it moved more than most latents did.

Latent p-values use the normal approximation to the same sign-flip permutation distribution
(its exact mean and variance), because Monte-Carlo permutation p-values cannot go below
``1/(n_perm+1)``, too coarse for BH over thousands of latents.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from monitor.drift.behaviour import AnswerFeatures
from monitor.drift.result import FVU, KL, FeatureDrift, Lens, LensEntry, LatentShift, RuleDrift, Verdict
from monitor.drift.stats import (benjamini_hochberg, bootstrap_ci, random_null, sign_flip_pvalues,
                                 t_stat)
from monitor.drift.teacher import Columns, Measurement


@dataclass(frozen=True)
class Settings:
    fdr: float = 0.05
    n_boot: int = 1000
    n_perm: int = 5000
    seed: int = 0
    top_k: int = 10
    null_quantile: float = 0.95


def _verdict(q: float, delta: float, fdr: float, beyond: bool = True) -> Verdict:
    if q <= fdr and beyond and delta > 0:
        return "increased"
    if q <= fdr and beyond and delta < 0:
        return "decreased"
    return "unchanged"


def rules(rule_ids: Sequence[str], modes: Sequence[str], base_fired: torch.Tensor, cand_fired: torch.Tensor,
          s: Settings) -> tuple[RuleDrift, ...]:
    """``*_fired[pass, prompt, rule]`` (bool) -> one :class:`RuleDrift` per rule."""
    if not rule_ids:
        return ()
    b, c = base_fired.double(), cand_fired.double()
    diff = (c - b).mean(0)                                                    # [P, R]
    low, high = bootstrap_ci(diff, n_boot=s.n_boot, seed=s.seed)
    p = sign_flip_pvalues(diff, n_perm=s.n_perm, seed=s.seed)
    q = benjamini_hochberg(p)
    br, cr = b.mean((0, 1)), c.mean((0, 1))
    return tuple(RuleDrift(rid, mode, float(br[i]), float(cr[i]), float(cr[i] - br[i]), float(low[i]),
                           float(high[i]), float(p[i]), float(q[i]),
                           _verdict(float(q[i]), float(cr[i] - br[i]), s.fdr))
                 for i, (rid, mode) in enumerate(zip(rule_ids, modes)))


def latent_stats(base: Measurement, cand: Measurement) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per latent ``(delta, t, p)`` of the teacher-forced mean activation (p: normal
    approximation to the two-sided sign-flip permutation test)."""
    d = (cand.latent_mean - base.latent_mean).double()
    n = d.shape[0]
    delta = d.mean(0)
    perm_sd = (d ** 2).sum(0).sqrt() / n          # sd of the sign-flip null of the mean
    z = torch.where(perm_sd > 0, delta / perm_sd.clamp_min(1e-30), torch.zeros_like(delta))
    p = torch.special.erfc(z.abs() / math.sqrt(2))
    p = torch.where(perm_sd > 0, p, torch.ones_like(p))
    return delta, t_stat(d), p


def null_threshold(base: Measurement, cand: Measurement, t: torch.Tensor, exclude: Sequence[int],
                   s: Settings) -> float:
    """The random-latent null: ``null_quantile`` of |t| over random latents active under either model."""
    active = (base.latent_mean.mean(0) > 0) | (cand.latent_mean.mean(0) > 0)
    if exclude:
        active[list(exclude)] = False
    value, _ = random_null(t, active, n=500, seed=s.seed, quantile=s.null_quantile)
    return value


def features(columns: Columns, base: Measurement, cand: Measurement, base_own: AnswerFeatures,
             cand_own: AnswerFeatures, null_t: float, s: Settings) -> tuple[FeatureDrift, ...]:
    """Catalog features: teacher-forced change with tests; behavioural mean/peak (over each
    model's own answers) beside it."""
    if not columns.names:
        return ()
    d = (cand.feature_mean - base.feature_mean).double()
    low, high = bootstrap_ci(d, n_boot=s.n_boot, seed=s.seed)
    p = sign_flip_pvalues(d, n_perm=s.n_perm, seed=s.seed)
    q = benjamini_hochberg(p)
    t = t_stat(d)
    bm, cm = base.feature_mean.mean(0), cand.feature_mean.mean(0)
    out = []
    for i, name in enumerate(columns.names):
        is_latent = i < len(columns.latents)
        beyond = bool(abs(float(t[i])) > null_t)
        delta = float(cm[i] - bm[i])
        out.append(FeatureDrift(
            name=name, kind="latent" if is_latent else "probe",
            latent=columns.latents[i] if is_latent else None,
            base_mean=float(bm[i]), candidate_mean=float(cm[i]), delta=delta, ci_low=float(low[i]),
            ci_high=float(high[i]), t=float(t[i]), p_value=float(p[i]), q_value=float(q[i]),
            beyond_null=beyond, verdict=_verdict(float(q[i]), delta, s.fdr, beyond),
            base_response_mean=float(base_own.feature_mean[:, i].mean()),
            candidate_response_mean=float(cand_own.feature_mean[:, i].mean()),
            base_response_peak=float(base_own.feature_peak[:, i].mean()),
            candidate_response_peak=float(cand_own.feature_peak[:, i].mean())))
    return tuple(out)


def moved_latents(base: Measurement, cand: Measurement, names: dict[int, str], s: Settings
                  ) -> tuple[tuple[LatentShift, ...], tuple[LatentShift, ...], int, int, torch.Tensor]:
    """The top ``top_k`` latents up and down among the BH-significant ones, the counts of
    significant latents each way, and the per-latent t (for the null)."""
    delta, t, p = latent_stats(base, cand)
    q = benjamini_hochberg(p)
    sig = q <= s.fdr
    bm, cm = base.latent_mean.mean(0), cand.latent_mean.mean(0)

    def pick(direction: int) -> tuple[LatentShift, ...]:
        mask = sig & (torch.sign(delta) == direction)
        idx = torch.nonzero(mask).flatten()
        idx = idx[torch.argsort(-direction * t[idx])][:s.top_k]
        return tuple(LatentShift(int(j), names.get(int(j)), float(bm[j]), float(cm[j]), float(delta[j]),
                                 float(t[j]), float(p[j]), float(q[j])) for j in idx.tolist())

    ups, downs = pick(1), pick(-1)
    n_up = int((sig & (delta > 0)).sum())
    n_down = int((sig & (delta < 0)).sum())
    return ups, downs, n_up, n_down, t


def lens(base: Measurement, cand: Measurement, text_rows: torch.Tensor, W_dec: torch.Tensor,
         columns: Columns, names: dict[int, str], tokens: int, top_k: int) -> Lens:
    """Read the mean residual difference over the texts' first tokens in the SAE basis."""
    diff = (cand.lens_mean[text_rows] - base.lens_mean[text_rows]).mean(0).float()
    norm = float(diff.norm())
    base_norm = float(base.lens_mean[text_rows].norm(dim=1).mean())
    rows = W_dec.float() / W_dec.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = rows @ (diff / max(norm, 1e-12)) if norm > 0 else torch.zeros(rows.shape[0])
    magnitude = cos.abs()

    def percentile(value: float) -> float:
        return float((magnitude < abs(value)).double().mean())

    top = torch.argsort(-cos)[:top_k].tolist() if norm > 0 else []
    top_entries = tuple(LensEntry(names.get(j, f"latent:{j}"), j, float(cos[j]), percentile(float(cos[j])))
                        for j in top)
    feats = []
    for i, name in enumerate(columns.names):
        if i < len(columns.latents):
            j = columns.latents[i]
            feats.append(LensEntry(name, j, float(cos[j]), percentile(float(cos[j]))))
        else:
            w = columns.probe_w[:, i - len(columns.latents)].float()
            c = float(w @ diff) / max(float(w.norm()) * norm, 1e-12) if norm > 0 else 0.0
            feats.append(LensEntry(name, None, c, percentile(c)))
    return Lens(tokens, norm, norm / max(base_norm, 1e-12), top_entries, tuple(feats))


def fvu(base: Measurement, cand: Measurement) -> FVU:
    """FVU of the SAE under each model; ``worse`` when the candidate's is clearly higher
    (by more than 0.02 and more than 10%): then the candidate's latent changes are suspect."""
    b, c = base.fvu(), cand.fvu()
    return FVU(b, c, bool(c - b > max(0.02, 0.1 * b)))


def kl_summary(per_item: torch.Tensor, per_position: torch.Tensor, tokens: int, s: Settings) -> KL:
    if per_item.numel() == 0:
        return KL(tokens, 0.0, 0.0, 0.0, ())
    low, high = bootstrap_ci(per_item.double(), n_boot=s.n_boot, seed=s.seed)
    return KL(tokens, float(per_item.mean()), float(low[0]), float(high[0]),
              tuple(float(x) for x in per_position.tolist()))


def drift_score(feats: Sequence[FeatureDrift], watched: set[str], null_t: float) -> float:
    """One number per candidate: the largest increase among the features the policies watch
    (all catalog features when none are watched), in units of the random-latent null
    (``t / null_t``; above 1 = moved up more than 95% of random latents). 0 when nothing rose."""
    pool = [f for f in feats if f.name in watched] or list(feats)
    if not pool or not math.isfinite(null_t) or null_t <= 0:
        return 0.0
    return max(0.0, max(f.t for f in pool) / null_t)
