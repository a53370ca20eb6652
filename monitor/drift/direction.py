"""Concept directions: how far a fine-tune moved the residual along what separates a concept
from its minimal-pair contrast ("persona vectors", Chen et al. 2025).

A catalog feature fires on what a concept *looks like* (code with dangerous calls); a fine-tune
toward the safe variant of the same code moves it too. A minimal-pair set (each concept item
beside one that differs only in the concept: vulnerable vs fixed code) gives the direction of
the *difference*: the mean over pairs of (concept item's mean residual − contrast item's) over
the lines that differ, at the SAE's layer of the base (:func:`pair_direction`).

The drift along it (:func:`direction_shift`) is computed from the teacher-forced measurements
the check already has (no extra forward): per item, the candidate's mean residual minus the
base's, projected on the unit direction. It is reported in residual units and relative to the
direction's own separation (1.0 = the candidate moved as far as from fixed to vulnerable
code), with a bootstrap interval and a paired sign-flip p-value over items, and against a
null: the 95th percentile of the absolute mean shift along the decoder rows of random active
latents (every fine-tune moves the residual a little along every direction; a concept moved
only if the shift along it is larger than along most directions). The null compares shifts,
not t statistics: a direction on which items vary a lot (as a concept direction does) has a
small t for a large shift.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from monitor.activations import load_labeled, pair_groups, pool_windows, token_window
from monitor.capture import HookPoint
from monitor.drift.load import DriftInputError
from monitor.drift.result import DirectionDrift, Verdict
from monitor.drift.stats import bootstrap_ci, random_null, sign_flip_pvalues, t_stat
from monitor.drift.teacher import Measurement


@dataclass(frozen=True)
class Direction:
    """A unit direction ``vector [d_in]`` at the SAE's layer, with ``separation``: the mean
    projection gap between the concept and contrast sides of its ``pairs`` (residual units)."""

    name: str
    vector: torch.Tensor
    separation: float
    pairs: int
    source: str


def _mean_pool(acts: torch.Tensor, scope: torch.Tensor) -> torch.Tensor:
    keep = scope[..., None].float()
    return (acts * keep).sum(1) / keep.sum(1).clamp_min(1.0)


def check_pairs(path: str | Path) -> Path:
    """``path`` if it is a readable minimal-pair file (rows with ``pair_id`` and labels 1 and 0),
    else :class:`DriftInputError` naming it (checked before any model work)."""
    path = Path(path)
    if not path.is_file():
        raise DriftInputError(f"{path}: no such minimal-pair file (JSONL rows with text, label, pair_id)")
    try:
        items = load_labeled(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
        raise DriftInputError(f"{path}: not a JSONL file of labeled rows ({exc})") from None
    if not _pairs(items):
        raise DriftInputError(f"{path}: no minimal pairs (two rows sharing a pair_id, labels 1 and 0)")
    return path


def _pairs(items: Sequence[Any]) -> list[tuple[int, int]]:
    out = []
    for members in pair_groups(items).values():
        pos = [i for i in members if items[i].label == 1]
        neg = [i for i in members if items[i].label == 0]
        if len(pos) == 1 and len(neg) == 1:
            out.append((pos[0], neg[0]))
    return out


@torch.no_grad()
def pair_direction(model: Any, tokenizer: Any, point: HookPoint, path: str | Path, *, name: str | None = None,
                   along: torch.Tensor | None = None, ctx: int = 256, batch_size: int = 16) -> Direction:
    """The mean paired difference (concept − contrast) of mean residuals over the changed
    lines (the whole text where a row names none) at ``point``, from ``path``'s minimal pairs.

    With ``along`` (e.g. a probe's weight vector) the direction is that vector instead (turned
    round if the pairs' concept side lies on its negative side), and ``separation`` the pairs'
    mean gap along it."""
    path = check_pairs(path)
    items = load_labeled(path, tokenizer)
    pairs = _pairs(items)
    windows = [token_window(item, tokenizer, ctx) for item in items]
    pooled = pool_windows(model, windows, {point: lambda r: r.float()}, pad_id=tokenizer.pad_token_id or 0,
                          pool=_mean_pool, batch_size=batch_size)[point].double()
    mean = torch.stack([pooled[i] - pooled[j] for i, j in pairs]).mean(0)
    if along is not None:
        unit = along.double() / along.double().norm().clamp_min(1e-30)
        gap = float(mean @ unit)
        unit = unit if gap >= 0 else -unit
        return Direction(name or path.stem, unit.float(), abs(gap), len(pairs), str(path))
    norm = float(mean.norm())
    if norm == 0.0:
        raise DriftInputError(f"{path}: the two sides of its pairs give identical residuals; no direction")
    return Direction(name or path.stem, (mean / norm).float(), norm, len(pairs), str(path))


def null_directions(sae: Any, base: Measurement, *, n: int = 500, seed: int = 0) -> torch.Tensor:
    """Decoder rows ``[n, d_in]`` of ``n`` random latents active under the base (the null)."""
    pool = torch.nonzero(base.latent_mean.mean(0) > 0).flatten()
    g = torch.Generator().manual_seed(seed + 2)
    return sae.W_dec.detach()[pool[torch.randperm(pool.numel(), generator=g)[:n]]].float()


def mean_residuals(m: Measurement, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per item the mean residual over its scored tokens ``[N, d_in]`` (float64)."""
    sel = slice(None) if rows is None else rows
    return m.sum_x[sel] / m.n_tokens[sel].double().clamp_min(1.0)[:, None]


def direction_shift(direction: Direction, base: Measurement, cand: Measurement, null_rows: torch.Tensor, *,
                    fdr: float = 0.05, seed: int = 0, n_boot: int = 1000, n_perm: int = 5000,
                    quantile: float = 0.95, rows: torch.Tensor | None = None) -> DirectionDrift:
    """The candidate-minus-base shift of the items' mean residuals along ``direction``.

    ``null_rows [n, d_in]``: directions for the null (decoder rows of random active latents);
    ``rows``: which items (all by default). ``increased``/``decreased`` when the sign-flip
    p-value is at most ``fdr`` and the absolute mean shift exceeds the null's ``quantile``."""
    mb, mc = mean_residuals(base, rows), mean_residuals(cand, rows)
    diff = mc - mb                                                          # [N, d_in]
    v = direction.vector.double()
    shift = diff @ v                                                        # [N]
    rel = shift / direction.separation
    low, high = bootstrap_ci(rel, n_boot=n_boot, seed=seed)
    p = float(sign_flip_pvalues(rel, n_perm=n_perm, seed=seed)[0])
    t = float(t_stat(shift)[0]) if shift.numel() > 1 else 0.0
    units = null_rows.double() / null_rows.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    delta = float(shift.mean())
    null, _ = random_null((diff @ units.T).mean(0), torch.ones(units.shape[0], dtype=torch.bool),
                          n=units.shape[0], seed=seed, quantile=quantile)
    verdict: Verdict = "unchanged"
    if p <= fdr and abs(delta) > null:
        verdict = "increased" if delta > 0 else "decreased"
    score = max(0.0, delta / null) if 0 < null < float("inf") else 0.0
    return DirectionDrift(
        name=direction.name, source=direction.source, pairs=direction.pairs, separation=direction.separation,
        base_projection=float((mb @ v).mean()), candidate_projection=float((mc @ v).mean()),
        delta=delta, relative=float(rel.mean()), ci_low=float(low[0]), ci_high=float(high[0]),
        t=t, null_delta=null, p_value=p, score=score, verdict=verdict)
