"""Binding: a validated :class:`~monitor.policy.loader.PolicySet` -> a :class:`CompiledPolicy`.

:func:`compile_policies` resolves every feature name against the catalog, every relative
threshold and clamp against ``max_activation`` and checks latents against ``d_sae`` (the checks
of :func:`~monitor.policy.checks.binding_problems`, all problems reported together), so nothing
can fail by name at the first token. It yields the *columns* the caller must supply
(:attr:`CompiledPolicy.features`: SAE latents in ascending order, then probes by name), each
rule's feature tests with absolute thresholds (:attr:`CompiledRule.leaves`) and, per scope, a
flat :class:`~monitor.policy.compiled.Program`: unique leaves, and the ``any``/``all``/``not``
tree flattened into levels of equal depth (duplicate sub-trees shared, one-child ``any``/``all``
collapsed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from monitor.errors import PolicyError
from monitor.policy.checks import binding_problems
from monitor.policy.compiled import (SCOPES, CompiledRule, FeatureRef, Level, Program,
                                     ResolvedLeaf, SteerSpec)
from monitor.policy.engine import CompiledPolicy
from monitor.policy.loader import PolicySet
from monitor.policy.schema import AllOf, AnyOf, Leaf, Rule
from monitor.policy.tree import Cond, children, is_negated, walk_conditions
from monitor.yaml_source import Loc

if TYPE_CHECKING:
    from monitor.catalog import Catalog


@dataclass
class _LeafSpec:
    column: FeatureRef
    threshold: float
    above: bool
    kind: str
    tokens: int
    at_least: int
    min_tokens: int
    label: str
    leaf: Leaf
    path: Loc

    def key(self) -> tuple:
        return (self.column.kind, self.column.index, self.column.name if self.column.kind ==
                "probe" else None, self.threshold, self.above, self.kind, self.tokens,
                self.at_least, self.min_tokens)

    def resolved(self, column: int) -> ResolvedLeaf:
        written = self.leaf.comparison
        value = getattr(self.leaf, written)
        return ResolvedLeaf(
            column=column, feature=self.column, name=self.leaf.feature,
            comparison="above" if self.above else "below", threshold=self.threshold,
            written=written, written_value=float(value),  # type: ignore[arg-type]
            aggregate=self.kind, tokens=self.tokens,  # type: ignore[arg-type]
            at_least=self.at_least, negated=is_negated(self.path), path=self.path,
            min_tokens=self.min_tokens)


class _Binder:
    """Resolves names and thresholds; collects every problem instead of stopping at the first."""

    def __init__(self, catalog: Catalog | None, d_sae: int) -> None:
        self.catalog = catalog
        self.d_sae = d_sae
        self.latents: dict[int, str | None] = {}
        self.probes: set[str] = set()

    def column(self, feature: str | None, latent: int | None) -> FeatureRef:
        if feature is None:
            assert latent is not None
            self.latents.setdefault(latent, None)
            return FeatureRef("latent", latent, None)
        assert self.catalog is not None  # checked before binding
        entry = self.catalog.get(feature)
        if entry.latent is not None:
            if self.latents.get(entry.latent) is None:
                self.latents[entry.latent] = feature
            return FeatureRef("latent", entry.latent, feature)
        self.probes.add(feature)
        return FeatureRef("probe", None, feature)

    def leaf(self, leaf: Leaf, path: Loc) -> _LeafSpec:
        col = self.column(leaf.feature, leaf.latent)
        if leaf.above is not None:
            thr, above = leaf.above, True
        elif leaf.below is not None:
            thr, above = leaf.below, False
        else:
            assert self.catalog is not None and leaf.feature is not None
            max_act = self.catalog.get(leaf.feature).max_activation
            assert max_act is not None and leaf.above_relative is not None
            thr, above = leaf.above_relative * max_act, True
        agg = leaf.aggregate
        return _LeafSpec(col, float(thr), above, agg.kind, agg.tokens, agg.at_least,
                         agg.min_tokens, leaf.label, leaf, path)

    def steer(self, rule: Rule) -> tuple[SteerSpec, ...]:
        out = []
        for action in rule.actions:
            s = action.steer
            if s is None:
                continue
            target = self.column(s.feature, s.latent)
            if s.clamp is not None:
                op, value = "clamp", s.clamp
            elif s.scale is not None:
                op, value = "scale", s.scale
            else:
                assert self.catalog is not None and s.feature is not None
                max_act = self.catalog.get(s.feature).max_activation
                assert max_act is not None and s.clamp_relative is not None
                op, value = "clamp", s.clamp_relative * max_act
            out.append(SteerSpec(target, op, float(value), s.duration))  # type: ignore[arg-type]
        return tuple(out)


_KIND_ORDER = {"each_token": 0, "window_mean": 1, "count_in_window": 1, "consecutive": 2,
               "scope_mean": 3}


def compile_policies(policy_set: PolicySet, catalog: Catalog | None, *,
                     d_sae: int) -> CompiledPolicy:
    """Bind ``policy_set`` to ``catalog`` and an SAE with ``d_sae`` latents.

    Raises :class:`PolicyError` listing every unresolvable feature name, missing
    ``max_activation``, probe steering without ``along_direction``, latent ``>= d_sae`` and
    enforce rule whose condition cannot be false, each naming the rule and where it was defined.
    """
    errors = binding_problems(policy_set, catalog, d_sae)
    if errors:
        raise PolicyError(f"{len(errors)} problem(s) binding policies to the catalog and SAE:\n  "
                          + "\n  ".join(errors), errors)
    binder = _Binder(catalog, d_sae)
    per_rule: list[tuple[Rule, list[_LeafSpec], Cond]] = []
    steers = []
    for rule in policy_set.rules:
        specs = [binder.leaf(leaf, path) for path, leaf in walk_conditions(rule.when, ("when",))]
        per_rule.append((rule, specs, rule.when))
        steers.append(binder.steer(rule))
    latents = sorted(binder.latents)
    features = tuple([FeatureRef("latent", i, binder.latents[i]) for i in latents]
                     + [FeatureRef("probe", None, n) for n in sorted(binder.probes)])
    column_of = {(f.kind, f.index if f.kind == "latent" else f.name): c
                 for c, f in enumerate(features)}
    compiled_rules = []
    for i, ((rule, specs, _), source) in enumerate(zip(per_rule, policy_set.sources)):
        block = next((a.block.message for a in rule.actions if a.block is not None), None)
        leaves = tuple(s.resolved(_column(column_of, s.column)) for s in specs)
        compiled_rules.append(CompiledRule(
            index=i, id=rule.id, severity=rule.severity, mode=rule.mode, scope=rule.scope,
            actions=tuple(a.kind for a in rule.actions), block_message=block,
            steers=steers[i], source=source, leaves=leaves))
    programs: dict[str, Program] = {
        scope: _build_program(scope, per_rule, compiled_rules, column_of) for scope in SCOPES}
    return CompiledPolicy(features=features,
                          latent_indices=torch.tensor(latents, dtype=torch.long),
                          rules=tuple(compiled_rules), version_id=policy_set.version_id,
                          d_sae=d_sae, programs=programs)


def _column(column_of: dict, ref: FeatureRef) -> int:
    return int(column_of[(ref.kind, ref.index if ref.kind == "latent" else ref.name)])


def _build_program(scope: str, per_rule: Sequence[tuple[Rule, list[_LeafSpec], Cond]],
                   compiled: Sequence[CompiledRule], column_of: dict) -> Program:
    """Flatten the rules covering ``scope`` into leaf arrays and tree levels."""
    chosen = [(rule, specs, cond, compiled[i]) for i, (rule, specs, cond) in enumerate(per_rule)
              if rule.scope in (scope, "both")]
    # Unique leaves, ordered each_token | windows | consecutive | scope_mean.
    uniq: dict[tuple, _LeafSpec] = {}
    for _, specs, _, _ in chosen:
        for s in specs:
            uniq.setdefault(s.key(), s)
    ordered = sorted(uniq.values(), key=lambda s: _KIND_ORDER[s.kind])
    leaf_id = {s.key(): i for i, s in enumerate(ordered)}
    n_leaves = len(ordered)
    true_col = n_leaves

    # Internal nodes, deduplicated; single-child any/all collapse to the child.
    nodes: dict[tuple, tuple[int, str, tuple]] = {}  # key -> (depth, kind, child keys)

    def visit(cond: object, specs_iter: list[_LeafSpec]) -> tuple:
        if isinstance(cond, Leaf):
            return ("leaf", leaf_id[specs_iter.pop(0).key()])
        kind = "any" if isinstance(cond, AnyOf) else "all" if isinstance(cond, AllOf) else "not"
        kids = tuple(visit(c, specs_iter) for _, c in children(cond))  # type: ignore[arg-type]
        if kind != "not" and len(kids) == 1:
            return kids[0]
        key = (kind, kids)
        depth = 1 + max(nodes[k][0] if k[0] != "leaf" else 0 for k in kids)
        nodes.setdefault(key, (depth, kind, kids))
        return key

    roots = [visit(cond, list(specs)) for _, specs, cond, _ in chosen]
    by_depth = sorted(nodes.items(), key=lambda kv: kv[1][0])
    node_id = {key: true_col + 1 + j for j, (key, _) in enumerate(by_depth)}

    def col(key: tuple) -> int:
        return key[1] if key[0] == "leaf" else node_id[key]

    levels = []
    for depth in sorted({d for d, _, _ in nodes.values()}):
        group = [(kind, kids) for _, (d, kind, kids) in by_depth if d == depth]
        width = max(len(k) for _, k in group)
        idx = [[col(k) for k in kids] + [true_col] * (width - len(kids)) for _, kids in group]
        neg_child = [[kind != "all"] * len(kids) + [False] * (width - len(kids))
                     for kind, kids in group]
        neg_out = [kind == "any" for kind, _ in group]
        levels.append(Level(torch.tensor(idx, dtype=torch.long),
                             torch.tensor(neg_child, dtype=torch.bool),
                             torch.tensor(neg_out, dtype=torch.bool)))

    windows = [s for s in ordered if _KIND_ORDER[s.kind] == 1]
    consec = [s for s in ordered if s.kind == "consecutive"]
    means = [s for s in ordered if s.kind == "scope_mean"]
    membership = torch.zeros(len(chosen), n_leaves, dtype=torch.bool)
    for r, (_, specs, _, _) in enumerate(chosen):
        for s in specs:
            membership[r, leaf_id[s.key()]] = True
    return Program(
        rule_cols=torch.tensor([c.index for *_, c in chosen], dtype=torch.long),
        leaf_col=torch.tensor([_column(column_of, s.column) for s in ordered], dtype=torch.long),
        leaf_thr=torch.tensor([s.threshold for s in ordered], dtype=torch.float32),
        leaf_above=torch.tensor([s.above for s in ordered], dtype=torch.bool),
        n_each=sum(1 for s in ordered if s.kind == "each_token"),
        n_window=len(windows), n_consec=len(consec),
        win_mean=torch.tensor([s.kind == "window_mean" for s in windows], dtype=torch.bool),
        win_tokens=torch.tensor([s.tokens for s in windows], dtype=torch.long),
        win_at_least=torch.tensor([s.at_least for s in windows], dtype=torch.long),
        max_window=max((s.tokens for s in windows), default=0),
        cons_tokens=torch.tensor([s.tokens for s in consec], dtype=torch.long),
        max_run=max((s.tokens for s in consec), default=0),
        n_mean=len(means),
        mean_min_tokens=torch.tensor([s.min_tokens for s in means], dtype=torch.long),
        levels=tuple(levels),
        rule_root=torch.tensor([col(k) for k in roots], dtype=torch.long),
        rule_leaves=membership,
        block_rules=torch.tensor([c.enforced and c.block_message is not None
                                  for *_, c in chosen], dtype=torch.bool),
        leaf_labels=tuple(s.label for s in ordered))
