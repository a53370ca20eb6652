"""The one condition-tree walker: every feature test, in file order, with its path."""

from __future__ import annotations

from monitor.policy.schema import Leaf, Rule
from monitor.policy.tree import children, is_negated, leaves, walk_conditions
from tests.policy.helpers import rules_from_yaml


def test_walk_yields_every_leaf_depth_first_with_its_path():
    (rule,) = rules_from_yaml("""
    - id: r
      description: d
      severity: low
      when:
        all:
          - {latent: 1, above: 1}
          - not: {any: [{latent: 2, above: 2}, {all: [{latent: 3, below: 3}]}]}
          - {latent: 4, above: 4}
      actions: [log]
    """)
    walked = list(walk_conditions(rule.when, ("rules", 0, "when")))
    assert [(loc, leaf.latent) for loc, leaf in walked] == [
        (("rules", 0, "when", "all", 0), 1),
        (("rules", 0, "when", "all", 1, "not", "any", 0), 2),
        (("rules", 0, "when", "all", 1, "not", "any", 1, "all", 0), 3),
        (("rules", 0, "when", "all", 2), 4)]
    assert [is_negated(loc) for loc, _ in walked] == [False, True, True, False]
    assert [leaf.latent for leaf in leaves(rule.when)] == [1, 2, 3, 4]
    assert [step for step, _ in children(rule.when)] == [("all", 0), ("all", 1), ("all", 2)]


def test_a_leaf_walks_to_itself_and_double_negation_cancels():
    leaf = Leaf.model_validate({"latent": 0, "above": 1})
    assert list(walk_conditions(leaf)) == [((), leaf)] and children(leaf) == ()
    rule = Rule.model_validate({"id": "r", "description": "d", "severity": "low",
                                "when": {"not": {"not": {"latent": 0, "above": 1}}},
                                "actions": ["log"]})
    ((loc, _),) = walk_conditions(rule.when)
    assert loc == ("not", "not") and not is_negated(loc)
