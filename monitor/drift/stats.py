"""Paired statistics for drift: bootstrap intervals, sign-flip permutation tests, BH, a null.

Every function takes per-item paired differences ``diff[n_items, n_cols]`` (candidate minus
base on the same prompt or text) and handles all columns at once: one matrix product per
resampling scheme, never a Python loop per latent or rule. Resampling draws come from a
seeded generator, so a report is reproducible.

* :func:`bootstrap_ci`: percentile interval of the mean difference, resampling items.
* :func:`sign_flip_pvalues`: two-sided paired permutation test. Under "the models do not
  differ", each item's two measurements are exchangeable, so the sign of its difference is
  random; the p-value is the share of sign assignments whose mean is at least as extreme as
  observed (with the +1 correction, so it is never 0). All-zero columns get p = 1.
* :func:`benjamini_hochberg`: q-values (step-up adjusted p-values).
* :func:`t_stat`: mean over standard error, the effect size the null from random latents uses.
"""

from __future__ import annotations

import torch


def _as2d(diff: torch.Tensor) -> torch.Tensor:
    diff = torch.as_tensor(diff, dtype=torch.float64)
    return diff[:, None] if diff.dim() == 1 else diff


def bootstrap_ci(diff: torch.Tensor, *, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low, high)`` per column: the ``alpha/2`` and ``1 - alpha/2`` quantiles of the
    bootstrap distribution of the mean difference (items resampled with replacement)."""
    d = _as2d(diff)
    n = d.shape[0]
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n, (n_boot, n), generator=g)
    weights = torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(n_boot, n, dtype=torch.float64)) / n
    means = weights @ d                                              # [n_boot, cols]
    q = torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)
    low, high = torch.quantile(means, q, dim=0)
    return low, high


def sign_flip_pvalues(diff: torch.Tensor, *, n_perm: int = 2000, seed: int = 0) -> torch.Tensor:
    """Two-sided paired permutation p-values per column, ``(1 + #extreme) / (1 + n_perm)``."""
    d = _as2d(diff)
    n = d.shape[0]
    g = torch.Generator().manual_seed(seed + 1)
    signs = torch.randint(0, 2, (n_perm, n), generator=g).double() * 2 - 1
    observed = d.mean(dim=0).abs()
    null = (signs @ d / n).abs()                                      # [n_perm, cols]
    # a tolerance so that floating-point noise never makes an exact tie "less extreme"
    extreme = (null >= observed - 1e-12 * (1 + observed)).sum(dim=0)
    p = (1 + extreme.double()) / (1 + n_perm)
    return torch.where(d.abs().sum(dim=0) == 0, torch.ones_like(p), p)


def benjamini_hochberg(p: torch.Tensor) -> torch.Tensor:
    """Benjamini–Hochberg q-values: reject column ``i`` at FDR ``q`` when ``q_i <= q``."""
    p = torch.as_tensor(p, dtype=torch.float64).flatten()
    m = p.numel()
    if m == 0:
        return p
    order = torch.argsort(p)
    ranked = p[order] * m / torch.arange(1, m + 1, dtype=torch.float64)
    adjusted = torch.flip(torch.cummin(torch.flip(ranked, [0]), 0).values, [0]).clamp(max=1.0)
    q = torch.empty_like(p)
    q[order] = adjusted
    return q


def t_stat(diff: torch.Tensor) -> torch.Tensor:
    """Mean difference over its standard error per column (0 where the difference is constant 0)."""
    d = _as2d(diff)
    n = d.shape[0]
    mean = d.mean(dim=0)
    se = d.std(dim=0, unbiased=True) / n ** 0.5 if n > 1 else torch.zeros_like(mean)
    return torch.where(se > 0, mean / se.clamp_min(1e-30), torch.sign(mean) * torch.where(mean != 0, 1e6, 0.0))


def random_null(t: torch.Tensor, eligible: torch.Tensor, *, n: int = 500, seed: int = 0,
                quantile: float = 0.95) -> tuple[float, int]:
    """The ``quantile`` of ``|t|`` over ``n`` random eligible latents (fine-tuning moves every
    latent a little; a feature "moved" only if it moved more than most random ones).
    Returns ``(threshold, latents used)``; ``(inf, 0)`` when no latent is eligible."""
    pool = torch.nonzero(eligible).flatten()
    if pool.numel() == 0:
        return float("inf"), 0
    g = torch.Generator().manual_seed(seed + 2)
    pick = pool[torch.randperm(pool.numel(), generator=g)[:n]]
    values = t.double()[pick].abs()
    return float(torch.quantile(values, quantile)), int(pick.numel())
