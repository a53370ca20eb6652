"""Binding: columns, resolved thresholds, shared leaves, and every binding error at once."""

from __future__ import annotations

import pytest
import torch

from monitor.errors import PolicyError
from monitor.policy import FeatureRef, PolicySet, ResolvedLeaf, compile_policies
from tests.policy.helpers import compiled, make_catalog, ones, rules_from_yaml


def test_catalog_names_relative_values_and_probe_columns(tmp_path):
    catalog = make_catalog(tmp_path)
    policy = compiled("""
    - id: combo
      description: names, relative thresholds, probes
      severity: critical
      when:
        any:
          - {feature: unsafe_code.shell_injection, above_relative: 0.5}   # > 5.0
          - {latent: 7, above: 100}
          - {feature: sycophancy.probe, above: 1.0}
          - {latent: 3, above: 0.0}
      actions:
        - steer: {feature: deception.lying, clamp_relative: 0.25, duration: rest_of_response}
        - steer: {feature: sycophancy.probe, clamp: 0, along_direction: true}
    """, catalog)
    assert policy.features == (
        FeatureRef("latent", 3, None), FeatureRef("latent", 7, "unsafe_code.shell_injection"),
        FeatureRef("latent", 12, "deception.lying"), FeatureRef("probe", None, "sycophancy.probe"))
    assert policy.latent_indices.tolist() == [3, 7, 12]
    state = policy.new_state(1)
    feats = torch.tensor([[[0.0, 6.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0], [1.0, 6.0, 0.0, 3.0]]])
    r = policy.step(state, feats, ones(1, 3), "response")
    assert [h.token_index for h in r.hits] == [0, 2]
    # token 2: latent 3 is 1.0 over a threshold of 0 (huge relative margin) -> it drives.
    assert [(h.feature, h.activation) for h in r.hits] == [
        ("unsafe_code.shell_injection", 6.0), ("latent:3", 1.0)]
    by_rule = {(d.latent, d.probe): d for d in r.steer}
    assert by_rule[(12, None)].value == pytest.approx(1.0)  # 0.25 * max_activation 4.0
    assert by_rule[(None, "sycophancy.probe")].op == "clamp"


def test_duplicate_columns_and_leaves_are_shared():
    policy = compiled("""
    - {id: a, description: x, severity: low, when: {latent: 5, above: 1}, actions: [log]}
    - {id: b, description: x, severity: low, when: {any: [{latent: 5, above: 1}]},
       actions: [log]}
    """)
    assert policy.features == (FeatureRef("latent", 5, None),)
    r = policy.step(policy.new_state(1), torch.full((1, 2, 1), 2.0), ones(1, 2), "response")
    assert r.fired.all()


def test_compile_errors_name_rule_and_source(tmp_path):
    catalog = make_catalog(tmp_path)
    rules = rules_from_yaml("""
    - {id: far, description: x, severity: low, when: {latent: 64, above: 1}, actions: [log]}
    - {id: typo, description: x, severity: low, when: {feature: deception.lyng, above: 1},
       actions: [log]}
    - {id: probe, description: x, severity: low, when: {latent: 1, above: 1},
       actions: [{steer: {feature: sycophancy.probe, clamp: 0}}]}
    - {id: rel, description: x, severity: low,
       when: {feature: toxicity.insult, above_relative: 0.5}, actions: [log]}
    """)
    with pytest.raises(PolicyError) as err:
        compile_policies(PolicySet.from_rules(rules), catalog, d_sae=64)
    text = "\n".join(err.value.errors)
    assert "rule 'far': when.latent: latent 64 is out of range" in text
    assert "did you mean 'deception.lying'?" in text
    assert "along_direction: true" in text
    assert "has no max_activation" in text
    assert len(err.value.errors) == 4
    with pytest.raises(PolicyError, match="no catalog"):
        compile_policies(PolicySet.from_rules(rules[1:2]), None, d_sae=64)


def test_resolved_leaves_carry_absolute_thresholds_columns_and_negation(tmp_path):
    catalog = make_catalog(tmp_path)
    policy = compiled("""
    - id: combo
      description: every kind of leaf
      severity: high
      mode: shadow
      when:
        all:
          - {feature: unsafe_code.shell_injection, above_relative: 0.5}
          - not: {any: [{latent: 3, below: 0.25}, {feature: sycophancy.probe, above: 1.0,
                         aggregate: {window_mean: {tokens: 4}}}]}
      actions: [log]
    """, catalog)
    leaves = policy.resolved_leaves("combo")
    assert leaves == policy.rule("combo").leaves
    assert leaves == (
        ResolvedLeaf(column=1, feature=FeatureRef("latent", 7, "unsafe_code.shell_injection"),
                     name="unsafe_code.shell_injection", comparison="above", threshold=5.0,
                     written="above_relative", written_value=0.5, aggregate="each_token",
                     tokens=1, at_least=1, negated=False, path=("when", "all", 0)),
        ResolvedLeaf(column=0, feature=FeatureRef("latent", 3, None), name=None,
                     comparison="below", threshold=0.25, written="below", written_value=0.25,
                     aggregate="each_token", tokens=1, at_least=1, negated=True,
                     path=("when", "all", 1, "not", "any", 0)),
        ResolvedLeaf(column=2, feature=FeatureRef("probe", None, "sycophancy.probe"),
                     name="sycophancy.probe", comparison="above", threshold=1.0,
                     written="above", written_value=1.0, aggregate="window_mean", tokens=4,
                     at_least=1, negated=True, path=("when", "all", 1, "not", "any", 1)))
    assert [leaf.label for leaf in leaves] == [
        "unsafe_code.shell_injection", "latent:3", "sycophancy.probe"]
    assert all(policy.features[leaf.column] == leaf.feature for leaf in leaves)
    with pytest.raises(KeyError):
        policy.resolved_leaves("nope")
