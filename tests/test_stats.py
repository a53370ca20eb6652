import pytest
import torch

from monitor.stats import auroc, precision_recall, tpr_at_fpr


def test_auroc_known_values():
    labels = torch.tensor([1, 1, 0, 0])
    assert float(auroc(torch.tensor([0.9, 0.8, 0.1, 0.2]), labels)) == 1.0
    assert float(auroc(torch.tensor([0.1, 0.2, 0.9, 0.8]), labels)) == 0.0
    # one pair inverted out of four: 0.75
    assert float(auroc(torch.tensor([0.9, 0.15, 0.1, 0.2]), labels)) == pytest.approx(0.75)
    # all tied: 0.5
    assert float(auroc(torch.zeros(4), labels)) == 0.5


def test_auroc_vectorised_matches_columns_and_bruteforce():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (40, 7), generator=g).float()
    labels = torch.rand(40, generator=g) > 0.5
    per_column = auroc(scores, labels)
    for j in range(7):
        pos, neg = scores[labels, j], scores[~labels, j]
        brute = ((pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()).mean()
        assert float(per_column[j]) == pytest.approx(float(brute))


def test_tpr_at_fpr_known():
    neg = torch.arange(100).float()  # 0..99
    pos = torch.tensor([99.5, 98.5, 50.0, 200.0])
    scores = torch.cat([pos, neg])
    labels = torch.cat([torch.ones(4), torch.zeros(100)])
    # 1% FPR: one negative (99) may exceed; threshold 98 -> positives above 98: 99.5, 98.5, 200
    assert float(tpr_at_fpr(scores, labels, 0.01)) == pytest.approx(0.75)
    # 0% FPR: threshold 99 -> 99.5 and 200
    assert float(tpr_at_fpr(scores, labels, 0.0)) == pytest.approx(0.5)


def test_precision_recall():
    assert precision_recall(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 1, 0])) == (0.5, 0.5)
    assert precision_recall(torch.tensor([0, 0]), torch.tensor([1, 0])) == (1.0, 0.0)
