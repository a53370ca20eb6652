"""The policy's continuous score and which rules belong to which category.

Which rules belong to a category: a rule whose id is the category or starts with
``<category>.``; otherwise one that reads a catalog feature named ``<category>.*``.

The continuous score. A rule only says fired / did not fire, and AUROC needs a ranking. For
each rule, its *evidence leaves* are the feature tests that ask for a value **above** a
threshold (``above`` or ``above_relative``) and are not inside a ``not``. Per item, a leaf's
score is its relative margin at the item's peak, ``(peak - threshold) / |threshold|`` (the
margin the engine uses to name a hit's driving feature), where ``peak`` is the feature's
maximum over the item's scoped tokens (``Report.peaks["response"]``). A ``scope_mean`` leaf is
scored on the feature's **mean** over the scoped tokens instead (``Report.means("response")``):
the value a mean-pooled probe was fitted on and the one its test compares at the scope's last
token. A rule's score is the max over its evidence leaves, the category's score the max over
its rules. So a score > 0 means some evidence feature crossed its threshold somewhere in scope
(for a ``scope_mean`` leaf: the whole-scope mean did); when a rule fires on an evidence leaf
other than a ``scope_mean``, its score is > 0. A ``scope_mean`` test fires on the *running*
mean at any token from ``min_tokens`` on, so it can fire with a final mean under its
threshold: read its decisions (flag rates) beside the score. Guards (``not``, ``below``) and
the other aggregations (windows, runs) can only stop a rule from firing and are ignored by the
score: they enter the decisions. Rules without evidence leaves count for decisions only.

Everything here reads the compiled policy's resolved leaves (:class:`ResolvedLeaf`: column,
absolute threshold, comparison, negation), so the score needs neither the policy files nor
the catalog.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from monitor.errors import MonitorError
from monitor.policy import CompiledPolicy, PolicySet
from monitor.policy.compiled import CompiledRule, ResolvedLeaf


def check_policy_set(policy: CompiledPolicy, policy_set: PolicySet | None) -> None:
    """Refuse a ``policy_set`` that is not the one ``policy`` was compiled from (None: nothing
    to check; the compiled policy carries what scoring needs)."""
    if policy_set is not None and policy_set.version_id != policy.version_id:
        raise MonitorError(f"the policy set given (version {policy_set.version_id}) is not the one the "
                           f"monitor runs (version {policy.version_id})")


def evidence_leaves(rule: CompiledRule) -> list[ResolvedLeaf]:
    """The leaves of ``rule`` that ask for a value above a threshold, outside any ``not``."""
    return [leaf for leaf in rule.leaves if leaf.comparison == "above" and not leaf.negated]


class RuleScorer:
    """Turns a report's per-feature peaks and means into one continuous score per rule
    (vectorised).

    ``scores(peaks, means)`` takes ``peaks[F]`` and ``means[F]`` (columns of
    ``policy.features``; ``means`` is read by ``scope_mean`` leaves only) and returns ``[R]``:
    per rule the max relative margin of its evidence leaves, ``-inf`` for rules without
    evidence leaves or without scoped tokens.
    """

    def __init__(self, policy: CompiledPolicy) -> None:
        cols, thrs, owners, mean = [], [], [], []
        self.evidence_rules: set[int] = set()
        for r, rule in enumerate(policy.rules):
            for leaf in evidence_leaves(rule):
                cols.append(leaf.column)
                thrs.append(float(leaf.threshold))
                owners.append(r)
                mean.append(leaf.aggregate == "scope_mean")
                self.evidence_rules.add(r)
        self.n_rules = len(policy.rules)
        self.cols = torch.tensor(cols, dtype=torch.long)
        self.thr = torch.tensor(thrs, dtype=torch.float64)
        self.owner = torch.tensor(owners, dtype=torch.long)
        self.use_mean = torch.tensor(mean, dtype=torch.bool)

    def scores(self, peaks: torch.Tensor | None, means: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.full((self.n_rules,), -math.inf, dtype=torch.float64)
        if peaks is None or not len(self.cols):
            return out
        value = peaks.double()[self.cols]
        if bool(self.use_mean.any()):
            at_mean = (means.double()[self.cols] if means is not None
                       else torch.full_like(value, math.nan))
            value = torch.where(self.use_mean, at_mean, value)
        margin = (value - self.thr) / self.thr.abs().clamp(min=1e-6)
        margin = torch.where(torch.isfinite(value), margin, torch.full_like(margin, -math.inf))
        return out.scatter_reduce(0, self.owner, margin, reduce="amax", include_self=True)


def rule_categories(policy: CompiledPolicy, categories: Iterable[str]) -> dict[str, list[int]]:
    """Rule indices per category (see the module docstring)."""
    cats = set(categories)
    out: dict[str, list[int]] = {c: [] for c in sorted(cats)}
    for r, rule in enumerate(policy.rules):
        by_id = [c for c in cats if rule.id == c or rule.id.startswith(c + ".")]
        if by_id:
            chosen = {max(by_id, key=len)}
        else:
            chosen = {c for leaf in rule.leaves if leaf.name for c in cats if leaf.name.startswith(c + ".")}
        for c in chosen:
            out[c].append(r)
    return out
