"""The policy's continuous score and rule categories."""

from __future__ import annotations

import math

import pytest
import torch

from monitor.evaluation.scoring import RuleScorer, rule_categories
from monitor.policy import PolicySet, compile_policies
from tests.policy.helpers import make_catalog, rules_from_yaml


def test_rule_scorer_reads_evidence_leaves_only(tmp_path):
    catalog = make_catalog(tmp_path)
    rules = rules_from_yaml("""
        - id: r1
          description: any of two
          severity: low
          when: {any: [{latent: 1, above: 2.0}, {latent: 2, above: 4.0}]}
          actions: [log]
        - id: r2
          description: guarded
          severity: low
          when: {all: [{latent: 1, above: 1.0}, {not: {latent: 3, above: 0.0}}]}
          actions: [log]
        - id: r3
          description: below only
          severity: low
          when: {latent: 4, below: 1.0}
          actions: [log]
        - id: shell.block
          description: relative threshold through the catalog
          severity: high
          when: {feature: unsafe_code.shell_injection, above_relative: 0.5}
          actions: [log]
    """)
    policy_set = PolicySet.from_rules(rules)
    policy = compile_policies(policy_set, catalog, d_sae=64)
    scorer = RuleScorer(policy)                      # the compiled policy's resolved leaves only
    peaks = torch.tensor([3.0, 2.0, 9.0, 0.0, 7.5])  # latents 1, 2, 3, 4, 7
    assert [f.index for f in policy.features] == [1, 2, 3, 4, 7]
    scores = scorer.scores(peaks)
    assert scores[:2].tolist() == [0.5, 2.0] and scores[2] == -math.inf
    assert float(scores[3]) == pytest.approx(0.5)  # (7.5 - 5) / 5
    assert scorer.scores(None).tolist() == [-math.inf] * 4
    cats = rule_categories(policy, ["unsafe_code", "r1"])
    assert cats == {"r1": [0], "unsafe_code": [3]}


def test_scope_mean_leaves_are_scored_on_the_scope_mean(tmp_path):
    rules = rules_from_yaml("""
        - id: m
          description: mean-pooled probe
          severity: low
          when: {any: [{latent: 1, above: 2.0, aggregate: scope_mean}, {latent: 2, above: 4.0}]}
          actions: [log]
    """)
    policy = compile_policies(PolicySet.from_rules(rules), None, d_sae=64)
    scorer = RuleScorer(policy)
    peaks = torch.tensor([9.0, 2.0])   # latent 1 peaks at 9 ...
    means = torch.tensor([3.0, 1.0])   # ... but its mean over the scope is 3
    assert scorer.scores(peaks, means).tolist() == [0.5]  # max((3-2)/2, (2-4)/4)
    assert scorer.scores(peaks).tolist() == [-0.5]  # no means: only the peak-scored leaf counts
