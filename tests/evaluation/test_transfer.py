"""Leave-one-group-out: a detector that only tells sources apart scores 0.5 on a new source."""

from __future__ import annotations

import pytest
import torch

from monitor.evaluation.baselines import probe_fitter
from monitor.evaluation.transfer import leave_one_group_out
from monitor.stats import auroc

# Three sources of 40 items; the positive rate differs by source (80%, 20%, 50%).
SOURCES = ["a"] * 40 + ["b"] * 40 + ["c"] * 40
LABELS = torch.tensor([1] * 32 + [0] * 8 + [1] * 8 + [0] * 32 + [1] * 20 + [0] * 20)


def one_hot_sources() -> torch.Tensor:
    return torch.tensor([[s == "a", s == "b", s == "c"] for s in SOURCES], dtype=torch.float32)


def memoriser(x: torch.Tensor, y: torch.Tensor):
    """Remembers every training row's label; anything unseen scores 0.5."""
    table = {tuple(row.tolist()): float(label) for row, label in zip(x, y)}
    return lambda z: torch.tensor([table.get(tuple(row.tolist()), 0.5) for row in z])


def per_group_auroc(scores: torch.Tensor) -> dict[str, float]:
    out = {}
    for g in ("a", "b", "c"):
        mask = torch.tensor([s == g for s in SOURCES])
        out[g] = float(auroc(scores[mask], LABELS[mask]))
    return out


def test_memorising_rows_scores_half_on_the_left_out_source():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(SOURCES), 5, generator=g)            # every row unique, no concept at all
    in_sample = memoriser(x, LABELS)(x)
    assert float(auroc(in_sample, LABELS)) == 1.0             # fitted and tested on the same rows
    folds = leave_one_group_out(x, LABELS, SOURCES, memoriser)
    assert per_group_auroc(folds.scores) == {"a": 0.5, "b": 0.5, "c": 0.5}
    assert folds.groups == ("a", "b", "c") and folds.fold.tolist() == [0] * 40 + [1] * 40 + [2] * 40


def test_a_real_probe_on_source_identity_only_scores_half_on_each_left_out_source():
    x = one_hot_sources()
    fit = probe_fitter()
    in_sample = fit(x, LABELS)(x)
    assert float(auroc(in_sample, LABELS)) > 0.75             # the base rates differ by source
    folds = leave_one_group_out(x, LABELS, SOURCES, fit)
    assert per_group_auroc(folds.scores) == {"a": 0.5, "b": 0.5, "c": 0.5}


def test_a_concept_that_transfers_survives_leaving_sources_out():
    g = torch.Generator().manual_seed(1)
    concept = LABELS.float()[:, None] * 2 + 0.3 * torch.randn(len(SOURCES), 1, generator=g)
    x = torch.cat([concept, one_hot_sources() * 5], dim=1)
    benign = torch.cat([0.3 * torch.randn(50, 1, generator=g), torch.zeros(50, 3)], dim=1)
    folds = leave_one_group_out(x, LABELS, SOURCES, probe_fitter(), benign_x=benign)
    assert all(v > 0.95 for v in per_group_auroc(folds.scores).values())
    assert set(folds.benign) == {0, 1, 2} and all(len(s) == 50 for s in folds.benign.values())


def test_groups_without_a_fit_are_skipped_and_named():
    labels = torch.tensor([1, 1, 0, 0, 1, 0])
    groups = ["a", "a", "b", "b", "c", "c"]
    folds = leave_one_group_out(torch.randn(6, 2), labels, groups, memoriser)
    assert not folds.skipped and bool(folds.covered.all())
    folds = leave_one_group_out(torch.randn(4, 2), labels[:4], groups[:4], memoriser)
    assert set(folds.skipped) == {"a", "b"} and "only label" in folds.skipped["a"]
    assert not bool(folds.covered.any())
    with pytest.raises(ValueError, match="one entry per item"):
        leave_one_group_out(torch.randn(3, 2), labels[:3], groups, memoriser)
