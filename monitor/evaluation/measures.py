"""Detection measures: pure functions of scores, decisions, labels, pairs and benign traffic.

* **AUROC** and **TPR at 1% / 5% FPR** against the negatives of the evaluation data;
* **TPR at 1% FPR on benign traffic** (Apollo's convention): the threshold is set so that at
  most 1% of a benign set (general text and ordinary chat, no concept at all) scores above it,
  and the TPR is the fraction of positives above that threshold. Hard negatives (the fixed
  side of a pair) make the first FPR; ordinary traffic makes this one, which is what an
  operator's alert rate depends on;
* **decisions**: flagged count, precision, recall, and the fraction of benign items flagged;
* **minimal pairs** (items sharing a ``pair_id``, one of each label): *pair accuracy*, the
  fraction of pairs whose positive side scores strictly higher (ties count as misses and are
  counted), and PrimeVul's four outcomes at the detector's own decision: **P-C** both correct,
  **P-V** both predicted positive ("vulnerable"), **P-B** both predicted negative ("benign"),
  **P-R** reversed. They sum to 1.

A :class:`Detection` holds one detector's output over all evaluation items. A detector fitted
per fold (leave-one-group-out) carries a fold id per item and a benign score vector per fold:
each item is judged against the benign threshold of the detector that was fitted without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from monitor.stats import auroc, precision_recall, tpr_at_fpr

FPR_POINTS = (0.01, 0.05)
BENIGN_FPR = 0.01


@dataclass(frozen=True)
class PairMeasures:
    """Minimal-pair outcomes over ``pairs`` complete pairs (fractions of ``pairs``)."""

    pairs: int
    accuracy: float | None          # positive side strictly higher
    ties: int
    both_correct: float | None      # P-C
    both_positive: float | None     # P-V
    both_negative: float | None     # P-B
    reversed: float | None          # P-R


@dataclass(frozen=True)
class Measures:
    """Detection measures of one scorer on a set of items; None where undefined."""

    scorer: str
    n: int
    positives: int
    negatives: int
    auroc: float | None
    tpr_at_1pct_fpr: float | None
    tpr_at_5pct_fpr: float | None
    decision: str
    flagged: int
    precision: float | None
    recall: float | None
    tpr_at_1pct_benign_fpr: float | None = None
    benign: int = 0
    benign_flagged_rate: float | None = None
    pairs: PairMeasures | None = None


def benign_threshold(benign_scores: torch.Tensor, fpr: float = BENIGN_FPR) -> float:
    """The strictest threshold that at most ``floor(fpr * m)`` of the ``m`` benign scores
    exceed (the rule of :func:`monitor.stats.tpr_at_fpr`); a score counts when strictly above."""
    values = torch.as_tensor(benign_scores, dtype=torch.float64)
    if not len(values):
        raise ValueError("a benign threshold needs at least one benign score")
    ordered = values.sort(descending=True).values
    return float(ordered[min(int(fpr * len(values)), len(values) - 1)])


def pair_measures(scores: torch.Tensor | None, decisions: torch.Tensor | None, labels: torch.Tensor,
                  pair_ids: Sequence[str | None]) -> PairMeasures | None:
    """Pair accuracy and P-C/P-V/P-B/P-R over the complete pairs among the items given (the
    first item of each label per ``pair_id``); None when there is no complete pair."""
    labels = torch.as_tensor(labels).bool()
    pos_of: dict[str, int] = {}
    neg_of: dict[str, int] = {}
    for i, pid in enumerate(pair_ids):
        if pid is not None and pid != "":
            (pos_of if bool(labels[i]) else neg_of).setdefault(pid, i)
    both = [pid for pid in pos_of if pid in neg_of]
    if not both:
        return None
    pos = torch.tensor([pos_of[p] for p in both])
    neg = torch.tensor([neg_of[p] for p in both])
    accuracy, ties = None, 0
    if scores is not None:
        s = torch.as_tensor(scores, dtype=torch.float64)
        accuracy = float((s[pos] > s[neg]).double().mean())
        ties = int((s[pos] == s[neg]).sum())
    outcome: list[float | None] = [None] * 4
    if decisions is not None:
        d = torch.as_tensor(decisions).bool()
        dp, dn = d[pos], d[neg]
        outcome = [float(x.double().mean()) for x in (dp & ~dn, dp & dn, ~dp & ~dn, ~dp & dn)]
    return PairMeasures(len(both), accuracy, ties, *outcome)


def measure(scorer: str, scores: torch.Tensor | None, decisions: torch.Tensor, labels: torch.Tensor,
            decision: str, *, pair_ids: Sequence[str | None] | None = None,
            benign_thresholds: torch.Tensor | None = None, benign: int = 0,
            benign_flagged_rate: float | None = None, has_decisions: bool = True) -> Measures:
    """Measures from continuous ``scores`` (None: decisions only) and boolean ``decisions``.

    ``benign_thresholds [n]``: per item, the 1%-benign-FPR threshold of the detector that
    scored it (see :func:`benign_threshold`); ``pair_ids`` adds the pair measures.
    ``has_decisions=False`` marks a ranking-only scorer (no pair outcomes).
    """
    labels = torch.as_tensor(labels).bool()
    decisions = torch.as_tensor(decisions).bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    ranked = scores is not None and n_pos > 0 and n_neg > 0
    s_all = torch.as_tensor(scores if scores is not None else torch.zeros(len(labels)), dtype=torch.float64)
    precision, recall = precision_recall(decisions, labels)
    benign_tpr = None
    if scores is not None and benign_thresholds is not None and n_pos:
        s = torch.as_tensor(scores, dtype=torch.float64)
        benign_tpr = float((s[labels] > benign_thresholds[labels]).double().mean())
    pairs = None
    if pair_ids is not None:
        pairs = pair_measures(scores, decisions if has_decisions else None, labels, pair_ids)
    return Measures(
        scorer=scorer, n=len(labels), positives=n_pos, negatives=n_neg,
        auroc=float(auroc(s_all, labels)) if ranked else None,
        tpr_at_1pct_fpr=float(tpr_at_fpr(s_all, labels, FPR_POINTS[0])) if ranked else None,
        tpr_at_5pct_fpr=float(tpr_at_fpr(s_all, labels, FPR_POINTS[1])) if ranked else None,
        decision=decision, flagged=int(decisions.sum()),
        precision=precision if bool(decisions.any()) else None,
        recall=recall if n_pos else None,
        tpr_at_1pct_benign_fpr=benign_tpr, benign=benign, benign_flagged_rate=benign_flagged_rate,
        pairs=pairs)


@dataclass(frozen=True)
class Detection:
    """One detector's output over the evaluation items, ready to be measured on any subset.

    ``scores [n]`` (float64; None: decisions only), ``decisions [n]`` (bool; None: ranking
    only), ``covered [n]``: which items the detector scored at all (bandit: Python rows).
    ``fold [n]`` and ``benign_scores``/``benign_decisions`` (fold -> ``[m]``) as in the module
    docstring; a detector fitted once has fold 0 everywhere.
    """

    scorer: str
    decision: str
    scores: torch.Tensor | None
    decisions: torch.Tensor | None
    covered: torch.Tensor
    fold: torch.Tensor
    benign_scores: Mapping[int, torch.Tensor] = field(default_factory=dict)
    benign_decisions: Mapping[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def single(cls, scorer: str, decision: str, scores: torch.Tensor | None, decisions: torch.Tensor | None,
               covered: torch.Tensor | None = None, benign_scores: torch.Tensor | None = None,
               benign_decisions: torch.Tensor | None = None) -> Detection:
        """A detector fitted once (or not at all) over ``n`` items."""
        n = len(scores if scores is not None else decisions)  # type: ignore[arg-type]
        return cls(scorer, decision, scores, decisions,
                   torch.ones(n, dtype=torch.bool) if covered is None else covered,
                   torch.zeros(n, dtype=torch.long),
                   {0: benign_scores} if benign_scores is not None else {},
                   {0: benign_decisions} if benign_decisions is not None else {})

    def measure(self, idx: Sequence[int], labels: torch.Tensor, pair_ids: Sequence[str | None],
                label: str | None = None) -> Measures | None:
        """Measures on items ``idx`` (labels and pair ids of all items); None when it covers none."""
        idx_t = torch.as_tensor(list(idx), dtype=torch.long)
        idx_t = idx_t[self.covered[idx_t]] if len(idx_t) else idx_t
        if not len(idx_t):
            return None
        scores = self.scores[idx_t] if self.scores is not None else None
        decisions = self.decisions[idx_t] if self.decisions is not None else torch.zeros(len(idx_t), dtype=torch.bool)
        folds = self.fold[idx_t]
        thresholds, benign, flagged = None, 0, None
        if self.benign_scores and scores is not None:
            by_fold = {f: benign_threshold(s) for f, s in self.benign_scores.items() if len(s)}
            if all(int(f) in by_fold for f in folds.unique().tolist()):
                thresholds = torch.tensor([by_fold[int(f)] for f in folds], dtype=torch.float64)
        used = sorted({int(f) for f in folds.tolist()})
        if self.benign_scores:
            benign = max(len(self.benign_scores.get(f, ())) for f in used)
        if self.benign_decisions and self.decisions is not None:
            rates = [float(self.benign_decisions[f].double().mean()) for f in used
                     if f in self.benign_decisions and len(self.benign_decisions[f])]
            flagged = sum(rates) / len(rates) if rates else None
        return measure(label or self.scorer, scores, decisions, labels[idx_t], self.decision,
                       pair_ids=[pair_ids[i] for i in idx_t.tolist()], benign_thresholds=thresholds,
                       benign=benign, benign_flagged_rate=flagged, has_decisions=self.decisions is not None)
