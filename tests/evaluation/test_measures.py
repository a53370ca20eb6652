"""Detection measures on tiny inputs with hand-computed expected values."""

from __future__ import annotations

import math

import pytest
import torch

from monitor.evaluation.measures import Detection, benign_threshold, measure, pair_measures

# Five complete pairs (positive score, negative score), one positive without its partner and
# one unpaired negative. At the decision "score > 0.4":
#   p1 (0.9, 0.1): pos higher; flagged/passed  -> P-C
#   p2 (0.2, 0.8): reversed;   passed/flagged  -> P-R
#   p3 (0.5, 0.5): tie;        flagged/flagged -> P-V
#   p4 (0.7, 0.3): pos higher; flagged/passed  -> P-C
#   p5 (0.1, 0.2): reversed;   passed/passed   -> P-B
SCORES = [0.9, 0.1, 0.2, 0.8, 0.5, 0.5, 0.7, 0.3, 0.1, 0.2, 0.95, 0.0]
LABELS = [1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0]
PAIRS = ["p1", "p1", "p2", "p2", "p3", "p3", "p4", "p4", "p5", "p5", "alone", None]


def test_pair_accuracy_and_primevul_outcomes():
    scores = torch.tensor(SCORES, dtype=torch.float64)
    p = pair_measures(scores, scores > 0.4, torch.tensor(LABELS), PAIRS)
    assert p is not None and p.pairs == 5
    assert p.accuracy == pytest.approx(2 / 5) and p.ties == 1
    assert (p.both_correct, p.both_positive, p.both_negative, p.reversed) == pytest.approx((2 / 5, 1 / 5, 1 / 5, 1 / 5))
    assert p.both_correct + p.both_positive + p.both_negative + p.reversed == pytest.approx(1.0)
    ranking_only = pair_measures(scores, None, torch.tensor(LABELS), PAIRS)
    assert ranking_only.accuracy == pytest.approx(2 / 5) and ranking_only.both_correct is None
    assert pair_measures(scores, None, torch.tensor(LABELS), [None] * len(LABELS)) is None


def test_benign_threshold_and_tpr_at_one_percent_benign_fpr():
    benign = torch.arange(200, dtype=torch.float64) / 100          # 0.00 .. 1.99
    # 1% of 200 = 2 benign items may score above: the threshold is the 3rd highest, 1.97.
    assert benign_threshold(benign) == pytest.approx(1.97)
    positives = torch.tensor([1.98, 1.97, 2.5, 0.0], dtype=torch.float64)
    labels = torch.tensor([1, 1, 1, 1, 0, 0])
    scores = torch.cat([positives, torch.tensor([5.0, -1.0], dtype=torch.float64)])
    m = measure("s", scores, scores > 1.0, labels, "score > 1", benign_thresholds=torch.full((6,), 1.97),
                benign=200, benign_flagged_rate=0.495)
    assert m.tpr_at_1pct_benign_fpr == pytest.approx(2 / 4)       # 1.98 and 2.5; 1.97 is not above
    assert m.auroc == pytest.approx(4 / 8)                          # each positive beats -1 only
    assert m.tpr_at_1pct_fpr == 0.0                                 # nothing beats the negative at 5.0
    assert (m.flagged, m.precision, m.recall) == (4, pytest.approx(3 / 4), pytest.approx(3 / 4))
    assert (m.benign, m.benign_flagged_rate) == (200, 0.495)
    with pytest.raises(ValueError, match="benign"):
        benign_threshold(torch.zeros(0))


def test_detection_judges_each_item_by_its_own_folds_benign_threshold():
    # Fold 0's benign scores put its threshold at 0.5 (1% of 10 = 0: the highest), fold 1's at 5.0.
    det = Detection("probe", "score > 0", scores=torch.tensor([0.6, 0.6, 4.0, 6.0, 0.0, 0.1], dtype=torch.float64),
                    decisions=torch.tensor([True, True, True, True, False, True]),
                    covered=torch.tensor([True, True, True, True, True, False]),
                    fold=torch.tensor([0, 0, 1, 1, 0, 1]),
                    benign_scores={0: torch.linspace(0.0, 0.5, 10, dtype=torch.float64),
                                   1: torch.linspace(0.0, 5.0, 10, dtype=torch.float64)},
                    benign_decisions={0: torch.tensor([True] + [False] * 9), 1: torch.tensor([True] * 5 + [False] * 5)})
    labels = torch.tensor([1, 1, 1, 1, 0, 0])
    m = det.measure(range(6), labels, [None] * 6)
    assert (m.n, m.positives, m.negatives) == (5, 4, 1)             # item 5 is not covered
    # fold 0: 0.6 > 0.5 twice; fold 1: 4.0 < 5.0, 6.0 > 5.0  -> 3 of 4
    assert m.tpr_at_1pct_benign_fpr == pytest.approx(3 / 4)
    assert m.benign_flagged_rate == pytest.approx((0.1 + 0.5) / 2)
    assert m.benign == 10
    only_fold_1 = det.measure([2, 3], labels, [None] * 6)
    assert only_fold_1.tpr_at_1pct_benign_fpr == pytest.approx(1 / 2) and only_fold_1.auroc is None
    assert det.measure([5], labels, [None] * 6) is None


def test_single_detection_without_benign_has_no_benign_measures():
    det = Detection.single("feature x", "none (ranking only)", torch.tensor([0.0, 2.0, 1.0, 3.0]), None)
    m = det.measure([0, 1, 2, 3], torch.tensor([0, 1, 0, 1]), ["a", "a", "b", "b"])
    assert m.auroc == 1.0 and m.tpr_at_1pct_benign_fpr is None and m.flagged == 0 and m.precision is None
    assert m.pairs.accuracy == 1.0 and m.pairs.both_correct is None
    assert not math.isnan(m.recall)
