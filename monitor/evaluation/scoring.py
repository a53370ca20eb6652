"""The policy's continuous score and which rules belong to which category.

Which rules belong to a category: a rule whose id is the category or starts with
``<category>.``; otherwise one that reads a catalog feature named ``<category>.*``.

The continuous score. A rule only says fired / did not fire, and AUROC needs a ranking. For
each rule, its *evidence leaves* are the feature tests that ask for a value **above** a
threshold (``above`` or ``above_relative``) and are not inside a ``not``. Per item, a leaf's
score is its relative margin at the item's peak, ``(peak - threshold) / |threshold|`` (the
margin the engine uses to name a hit's driving feature), where ``peak`` is the feature's
maximum over the item's scoped tokens (``Report.peaks["response"]``). A rule's score is the max
over its evidence leaves, the category's score the max over its rules. So a score > 0 means
some evidence feature crossed its threshold somewhere in scope; when a rule fires on an
evidence leaf, its score is > 0. Guards (``not``, ``below``) and aggregations (windows, runs)
can only stop a rule from firing and are ignored by the score: they enter the decisions.
Rules without evidence leaves count for decisions only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from monitor.errors import MonitorError
from monitor.policy import CompiledPolicy, PolicySet
from monitor.policy.schema import AllOf, AnyOf, Leaf, Not


def rule_conditions(policy: CompiledPolicy, policy_set: PolicySet | None) -> list[Any]:
    """The ``when`` condition of each compiled rule, in rule order."""
    if policy_set is not None:
        if policy_set.version_id != policy.version_id:
            raise MonitorError(f"the policy set given (version {policy_set.version_id}) is not the one the "
                               f"monitor runs (version {policy.version_id})")
        return [policy_set.rule(r.id).when for r in policy.rules]
    whens = [getattr(r, "when", None) for r in policy.rules]
    if any(w is None for w in whens):
        raise MonitorError("evaluate needs the rules' conditions: pass policy_set= (the PolicySet "
                           "the monitor's policy was compiled from, e.g. load_policies(DIR))")
    return whens


def evidence_leaves(cond: Any, negated: bool = False) -> list[Leaf]:
    """The leaves of ``cond`` that ask for a value above a threshold, outside any ``not``."""
    if isinstance(cond, Leaf):
        return [cond] if not negated and cond.below is None else []
    if isinstance(cond, Not):
        return evidence_leaves(cond.not_, not negated)
    if isinstance(cond, (AnyOf, AllOf)):
        kids = cond.any if isinstance(cond, AnyOf) else cond.all
        return [leaf for kid in kids for leaf in evidence_leaves(kid, negated)]
    return []


def all_leaves(cond: Any) -> list[Leaf]:
    """Every leaf of ``cond``."""
    if isinstance(cond, Leaf):
        return [cond]
    if isinstance(cond, Not):
        return all_leaves(cond.not_)
    kids = cond.any if isinstance(cond, AnyOf) else cond.all
    return [leaf for kid in kids for leaf in all_leaves(kid)]


class RuleScorer:
    """Turns a report's per-feature peaks into one continuous score per rule (vectorised).

    ``scores(peaks)`` takes ``peaks[F]`` (columns of ``policy.features``) and returns ``[R]``:
    per rule the max relative margin of its evidence leaves, ``-inf`` for rules without
    evidence leaves or without scoped tokens.
    """

    def __init__(self, policy: CompiledPolicy, conditions: Sequence[Any], catalog: Any = None) -> None:
        column = {}
        for c, ref in enumerate(policy.features):
            column[(ref.kind, ref.index if ref.kind == "latent" else ref.name)] = c
        cols, thrs, owners = [], [], []
        self.evidence_rules: set[int] = set()
        for r, cond in enumerate(conditions):
            for leaf in evidence_leaves(cond):
                if leaf.latent is not None:
                    key: tuple = ("latent", leaf.latent)
                else:
                    entry = catalog.get(leaf.feature)
                    key = ("latent", entry.latent) if entry.latent is not None else ("probe", leaf.feature)
                if leaf.above is not None:
                    thr = float(leaf.above)
                else:  # an evidence leaf has exactly one of above / above_relative (never below)
                    assert leaf.above_relative is not None
                    thr = float(leaf.above_relative) * float(catalog.get(leaf.feature).max_activation)
                cols.append(column[key])
                thrs.append(thr)
                owners.append(r)
                self.evidence_rules.add(r)
        self.n_rules = len(conditions)
        self.cols = torch.tensor(cols, dtype=torch.long)
        self.thr = torch.tensor(thrs, dtype=torch.float64)
        self.owner = torch.tensor(owners, dtype=torch.long)

    def scores(self, peaks: torch.Tensor | None) -> torch.Tensor:
        out = torch.full((self.n_rules,), -math.inf, dtype=torch.float64)
        if peaks is None or not len(self.cols):
            return out
        value = peaks.double()[self.cols]
        margin = (value - self.thr) / self.thr.abs().clamp(min=1e-6)
        margin = torch.where(torch.isfinite(value), margin, torch.full_like(margin, -math.inf))
        return out.scatter_reduce(0, self.owner, margin, reduce="amax", include_self=True)


def rule_categories(policy: CompiledPolicy, conditions: Sequence[Any], categories: Iterable[str]
                    ) -> dict[str, list[int]]:
    """Rule indices per category (see the module docstring)."""
    cats = set(categories)
    out: dict[str, list[int]] = {c: [] for c in sorted(cats)}
    for r, (rule, cond) in enumerate(zip(policy.rules, conditions)):
        by_id = [c for c in cats if rule.id == c or rule.id.startswith(c + ".")]
        if by_id:
            chosen = {max(by_id, key=len)}
        else:
            chosen = {c for leaf in all_leaves(cond) if leaf.feature for c in cats
                      if leaf.feature.startswith(c + ".")}
        for c in chosen:
            out[c].append(r)
    return out
