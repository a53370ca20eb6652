"""Checks that need a feature's range: enforce rules whose condition cannot be false are refused."""

from __future__ import annotations

import pytest

from monitor.errors import PolicyError
from monitor.policy import PolicySet, compile_policies, load_policies
from monitor.policy.checks import always_true_reasons, binding_problems
from tests.policy.helpers import make_catalog, rules_from_yaml, write


def policy(when: str, *, mode: str = "enforce", extra: str = "") -> str:
    return (f"version: 1\nrules:\n  - id: r\n    description: d\n    severity: high\n"
            f"    mode: {mode}\n    when: {when}\n    actions: [log, {{block: {{message: refused}}}}]\n"
            f"{extra}")


ALWAYS = [
    ("{latent: 1, above: -5}", "latent 1 is never negative, so 'above: -5' always holds"),
    ("{latent: 1, above: -0.5, aggregate: {window_mean: {tokens: 8}}}", "'above: -0.5'"),
    ("{latent: 1, above: -1, aggregate: {count_in_window: {tokens: 8, at_least: 1}}}",
     "'above: -1'"),
    ("{latent: 1, above: -1, aggregate: {consecutive: {tokens: 1}}}", "'above: -1'"),
    ("{latent: 1, above: -1, aggregate: {scope_mean: {min_tokens: 1}}}", "'above: -1'"),
    ("{any: [{latent: 2, above: 3}, {latent: 1, above: -1}]}", "latent 1 is never negative"),
    ("{all: [{latent: 2, above: -3}, {latent: 1, above: -1}]}", "latent 2 is never negative, "
     "so 'above: -3' always holds; latent 1"),
    ("{not: {latent: 1, below: 0}}", "latent 1 is never negative, so 'below: 0' never holds"),
    ("{not: {all: [{latent: 1, below: -2}, {latent: 2, above: 1}]}}", "'below: -2' never holds"),
]

CAN_FAIL = [
    "{latent: 1, above: 0}",  # a latent at exactly 0 does not pass
    "{latent: 1, above: -1, aggregate: {consecutive: {tokens: 4}}}",  # false on short texts
    "{latent: 1, above: -1, aggregate: scope_mean}",  # false before min_tokens (default 8)
    "{latent: 1, above: -1, aggregate: {count_in_window: {tokens: 8, at_least: 2}}}",
    "{latent: 1, below: 1e9}",  # above every plausible value, but not provably: left alone
    "{latent: 1, below: -1}",  # never true: harmless
    "{all: [{latent: 2, above: 3}, {latent: 1, above: -1}]}",
    "{not: {latent: 1, above: -1}}",
    "{feature: sycophancy.probe, above: -5}",  # a probe's score has no known range
]


@pytest.mark.parametrize(("when", "reason"), ALWAYS)
def test_always_true_enforce_conditions_are_refused_with_the_reason(tmp_path, when, reason):
    path = write(tmp_path, "p.yaml", policy(when))
    with pytest.raises(PolicyError) as err:
        load_policies(path)
    (error,) = err.value.errors
    assert error.startswith(f"{path}:7:11: rules[0] (id: r).when: this condition holds on every "
                            "monitored token whatever the model does (")
    assert reason in error
    assert error.endswith("so this enforce rule would act on every request. Fix the threshold, "
                          "or add 'allow_always_true: true' to the rule if that is intended")


@pytest.mark.parametrize(("when", "reason"), ALWAYS)
def test_the_override_and_shadow_mode_accept_them(tmp_path, when, reason):
    load_policies(write(tmp_path, "a.yaml", policy(when, extra="    allow_always_true: true\n")))
    load_policies(write(tmp_path, "b.yaml", policy(when, mode="shadow")))


@pytest.mark.parametrize("when", CAN_FAIL)
def test_conditions_that_can_be_false_load(tmp_path, when):
    catalog = make_catalog(tmp_path)
    load_policies(write(tmp_path, "p.yaml", policy(when)), catalog)


def test_a_catalog_feature_is_judged_once_the_catalog_says_it_is_a_latent(tmp_path):
    catalog = make_catalog(tmp_path)
    text = policy("{feature: toxicity.insult, above: -1}")
    path = write(tmp_path, "p.yaml", text)
    policy_set = load_policies(path)  # no catalog: the feature's kind is not known yet
    errors = binding_problems(policy_set, catalog, 64)
    assert errors == [f"{path}:3:5: rule 'r': when: this condition holds on every monitored token "
                      "whatever the model does (feature 'toxicity.insult' (SAE latent 3) is never "
                      "negative, so 'above: -1' always holds), so this enforce rule would act on "
                      "every request. Fix the threshold, or add 'allow_always_true: true' to the "
                      "rule if that is intended"]
    with pytest.raises(PolicyError) as err:
        compile_policies(policy_set, catalog, d_sae=64)
    assert err.value.errors == errors
    with pytest.raises(PolicyError, match=":7:11: .*'above: -1' always holds"):
        load_policies(path, catalog)


def test_rules_built_in_code_are_checked_when_compiled():
    rules = rules_from_yaml("""
    - {id: every, description: d, severity: high, when: {latent: 3, above: -2},
       actions: [{steer: {latent: 3, clamp: 0}}]}
    """)
    with pytest.raises(PolicyError, match="rule 'every': when: this condition holds"):
        compile_policies(PolicySet.from_rules(rules), None, d_sae=8)
    assert always_true_reasons(rules[0].when, None) == [
        "latent 3 is never negative, so 'above: -2' always holds"]
