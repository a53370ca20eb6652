"""Leave-one-group-out: fit a trainable detector on every group but one, test on that one.

A detector that is measured on the sources it was fitted on can score well by learning what
the sources look like instead of the concept. Leaving each source (or any field: language,
CWE) out in turn and scoring only the left-out items measures what a new source would see.
:func:`leave_one_group_out` takes any fitter, so the same split serves dense probes and a
memorising control (see the tests: a detector that can only tell sources apart scores 0.5 on
a source it never saw).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

Scorer = Callable[[torch.Tensor], torch.Tensor]
Fit = Callable[[torch.Tensor, torch.Tensor], Scorer]


@dataclass(frozen=True)
class Folds:
    """Out-of-group scores of one detector.

    ``scores [n]`` float64: item ``i`` scored by the detector fitted without its group (NaN
    where that group was skipped); ``fold [n]``: the index into ``groups`` of item ``i``'s
    group; ``benign``: per fold, that detector's scores on the benign items; ``skipped``:
    group -> why it has no fit.
    """

    groups: tuple[str, ...]
    scores: torch.Tensor
    fold: torch.Tensor
    benign: dict[int, torch.Tensor] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def covered(self) -> torch.Tensor:
        return ~torch.isnan(self.scores)


def leave_one_group_out(x: torch.Tensor, labels: torch.Tensor, groups: Sequence[str], fit: Fit, *,
                        benign_x: torch.Tensor | None = None) -> Folds:
    """For each group ``g``: ``fit(x[not g], labels[not g])`` scores ``x[g]`` (and ``benign_x``).

    A group is skipped (its items stay NaN) when the items outside it lack either label, or
    when there is only one group. ``x [n, D]``, ``labels [n]`` 0/1, ``groups`` one name per item.
    """
    labels = torch.as_tensor(labels).long()
    if len(groups) != len(x) or len(labels) != len(x):
        raise ValueError(f"x, labels and groups must have one entry per item; got {len(x)}, "
                         f"{len(labels)} and {len(groups)}")
    names = tuple(dict.fromkeys(groups))
    member = torch.tensor([names.index(g) for g in groups], dtype=torch.long)
    scores = torch.full((len(x),), math.nan, dtype=torch.float64)
    benign: dict[int, torch.Tensor] = {}
    skipped: dict[str, str] = {}
    for f, name in enumerate(names):
        test = member == f
        train = ~test
        have = {int(v) for v in labels[train].unique().tolist()}
        if have != {0, 1}:
            skipped[name] = ("it is the only group" if not bool(train.any())
                             else f"the other groups hold only label {sorted(have)}")
            continue
        score = fit(x[train], labels[train])
        scores[test] = score(x[test]).double()
        if benign_x is not None:
            benign[f] = score(benign_x).double()
    return Folds(names, scores, member, benign, skipped)
