"""The paired statistics against closed forms and simulated nulls."""

from __future__ import annotations

import math

import torch

from monitor.drift.stats import benjamini_hochberg, bootstrap_ci, random_null, sign_flip_pvalues, t_stat


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    g = torch.Generator().manual_seed(0)
    small = torch.randn(30, generator=g) + 1.0
    large = torch.randn(600, generator=g) + 1.0
    lo_s, hi_s = bootstrap_ci(small, seed=1)
    lo_l, hi_l = bootstrap_ci(large, seed=1)
    assert lo_s[0] < small.mean() < hi_s[0] and lo_l[0] < large.mean() < hi_l[0]
    assert (hi_l - lo_l)[0] < (hi_s - lo_s)[0] / 2
    # about the normal-theory width 2 * 1.96 * sd / sqrt(n)
    expected = 2 * 1.96 * float(large.std()) / math.sqrt(600)
    assert abs(float(hi_l[0] - lo_l[0]) - expected) < 0.25 * expected


def test_bootstrap_of_a_constant_is_a_point():
    lo, hi = bootstrap_ci(torch.zeros(20, 3))
    assert torch.all(lo == 0) and torch.all(hi == 0)


def test_sign_flip_pvalues_are_uniform_under_the_null_and_small_under_a_shift():
    g = torch.Generator().manual_seed(3)
    null = torch.randn(40, 400, generator=g)
    p = sign_flip_pvalues(null, n_perm=500, seed=0)
    assert 0.03 < float((p <= 0.05).double().mean()) < 0.08     # ~5% false positives
    shifted = torch.randn(40, 5, generator=g) + 1.0
    assert torch.all(sign_flip_pvalues(shifted, n_perm=500) < 0.01)


def test_sign_flip_exact_for_a_tiny_case():
    # 3 items all +1: only the all-plus and all-minus assignments reach |mean| = 1, so p ~ 2/8
    p = sign_flip_pvalues(torch.ones(3, 1), n_perm=20000, seed=0)
    assert abs(float(p[0]) - 0.25) < 0.02


def test_all_zero_differences_get_p_one():
    assert sign_flip_pvalues(torch.zeros(10, 2)).tolist() == [1.0, 1.0]


def test_benjamini_hochberg_matches_the_step_up_rule():
    p = torch.tensor([0.01, 0.04, 0.03, 0.005, 0.5])
    q = benjamini_hochberg(p)
    # sorted p: .005 .01 .03 .04 .5 -> p*m/rank: .025 .025 .05 .05 .5, then running min from the top
    expected = torch.tensor([0.025, 0.05, 0.05, 0.025, 0.5], dtype=torch.float64)
    assert torch.allclose(q, expected)
    assert benjamini_hochberg(torch.tensor([])).numel() == 0


def test_t_stat_and_random_null():
    d = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    t = t_stat(d)
    assert math.isclose(float(t[0]), 2.0 / (1.0 / math.sqrt(3)), rel_tol=1e-9) and float(t[1]) == 0.0
    values = torch.arange(100, dtype=torch.float64)
    threshold, used = random_null(values, torch.ones(100, dtype=torch.bool), n=100, quantile=0.95)
    assert used == 100 and abs(threshold - 94.05) < 1e-6
    assert random_null(values, torch.zeros(100, dtype=torch.bool)) == (float("inf"), 0)
