"""Detection statistics, vectorised over many candidate scores at once.

Discovery scores thousands of latents against the same labels, so every function takes scores
``[n_items]`` or ``[n_items, n_scores]`` and returns one value per score column. Ties count
half, as in the Mann-Whitney definition of AUROC; this matters because most latents are zero
on most texts.
"""

from __future__ import annotations

import torch


def _columns(scores: torch.Tensor) -> tuple[torch.Tensor, bool]:
    scores = torch.as_tensor(scores, dtype=torch.float64)
    return (scores[:, None], True) if scores.dim() == 1 else (scores, False)


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve per score column: P(pos > neg) + 0.5 P(pos == neg)."""
    cols, squeeze = _columns(scores)
    labels = torch.as_tensor(labels).bool()
    pos, neg = cols[labels].T.contiguous(), cols[~labels].T.contiguous()
    if pos.shape[1] == 0 or neg.shape[1] == 0:
        raise ValueError("AUROC needs at least one positive and one negative item")
    neg_sorted = neg.sort(dim=1).values
    below = torch.searchsorted(neg_sorted, pos, right=False).double()
    below_or_equal = torch.searchsorted(neg_sorted, pos, right=True).double()
    wins = (below + 0.5 * (below_or_equal - below)).sum(dim=1)
    result = wins / (pos.shape[1] * neg.shape[1])
    return result[0] if squeeze else result


def tpr_at_fpr(scores: torch.Tensor, labels: torch.Tensor, fpr: float) -> torch.Tensor:
    """True-positive rate at the strictest threshold whose false-positive rate is <= ``fpr``.

    The threshold is the smallest value that at most ``floor(fpr * n_neg)`` negatives exceed;
    a positive counts when its score is strictly above it.
    """
    cols, squeeze = _columns(scores)
    labels = torch.as_tensor(labels).bool()
    pos, neg = cols[labels], cols[~labels]
    allowed = int(fpr * neg.shape[0])
    neg_desc = neg.sort(dim=0, descending=True).values
    threshold = neg_desc[min(allowed, neg.shape[0] - 1)]
    result = (pos > threshold).double().mean(dim=0)
    return result[0] if squeeze else result


def precision_recall(predicted: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Precision and recall of binary decisions (precision is 1.0 when nothing is predicted)."""
    predicted = torch.as_tensor(predicted).bool()
    labels = torch.as_tensor(labels).bool()
    tp = float((predicted & labels).sum())
    precision = tp / float(predicted.sum()) if predicted.any() else 1.0
    recall = tp / float(labels.sum()) if labels.any() else 0.0
    return precision, recall
