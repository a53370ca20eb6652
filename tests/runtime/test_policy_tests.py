"""Running policy test cases through a (tiny) model: pass/fail, reasons, peaks, outcomes."""

from __future__ import annotations

import pytest

from monitor.catalog import Catalog, FeatureEntry
from monitor.policy import compile_policies
from monitor.policy.cases import Case, CaseFile, load_case_file
from monitor.policy.loader import SourceRef
from monitor.runtime.policy_tests import run_cases
from monitor.runtime.hf import Monitor
from monitor.testing import tiny_model
from tests.policy.helpers import write
from tests.policy.test_cases import D_SAE, LAYER, POLICY, TESTS, make_sae

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def model_and_sae():
    return tiny_model("llama"), make_sae()


@pytest.fixture
def monitor_for(model_and_sae, tiny_tokenizer):
    """A Monitor on the tiny model running the policy of a CaseFile; closed after the test."""
    made: list[Monitor] = []

    def build(case_file: CaseFile, tokenizer=None, catalog: Catalog | None = None) -> Monitor:
        model, sae = model_and_sae
        policy = compile_policies(case_file.policy_set, catalog, d_sae=D_SAE)
        mon = Monitor(model, tokenizer or tiny_tokenizer, sae=sae, policies=policy,
                      catalog=catalog, self_test=False)
        made.append(mon)
        return mon

    yield build
    for mon in made:
        mon.close()


def test_passing_and_failing_cases_on_a_tiny_model(tmp_path, monitor_for):
    write(tmp_path, "code.yaml", POLICY)
    loaded = load_case_file(write(tmp_path, "code.tests.yaml", TESTS), d_sae=D_SAE)
    mon = monitor_for(loaded)
    passing, failing = run_cases(mon, loaded.cases, policy_set=loaded.policy_set)

    assert passing.passed and passing.failures == () and passing.outcome == "blocked"
    assert set(passing.fired) == {"code.always_block"}
    firing = passing.fired["code.always_block"]
    assert firing.hits > 0 and firing.first_scope == "response" and firing.feature == "latent:0"

    assert not failing.passed and failing.outcome == "blocked"
    assert failing.fired["code.shadow"].first_scope == "prompt"
    never, outcome = failing.failures
    # The rule that did not fire is named, with the peak of its feature against the threshold.
    assert never.startswith("expected rule 'code.never' to fire; it did not: latent:3 peaked at ")
    assert never.endswith("(threshold above 1e+09)")
    assert outcome.startswith("expected outcome allowed, got blocked (blocked by rule "
                              "'code.always_block' at response token ")


def test_a_rule_that_must_not_fire_reports_its_hits(tmp_path, monitor_for):
    write(tmp_path, "code.yaml", POLICY)
    loaded = load_case_file(write(tmp_path, "code.tests.yaml", """\
        cases:
          - name: should be quiet
            text: hello world
            expect: {not_triggers: [code.always_block]}
        """))
    (result,) = run_cases(monitor_for(loaded), loaded.cases, policy_set=loaded.policy_set)
    (reason,) = result.failures
    hits = result.fired["code.always_block"].hits
    assert reason.startswith(f"rule 'code.always_block' fired but must not: {hits} hit(s), "
                             "first at response token ")
    assert "peak latent:0 = " in reason and reason.endswith("(threshold above -1)")


def test_steered_outcome_and_chat_messages(tmp_path, monitor_for):
    write(tmp_path, "s.yaml", """\
        version: 1
        rules:
          - id: s.steer
            description: steer everywhere
            severity: low
            scope: response
            when: {latent: 0, above: -1.0}
            allow_always_true: true
            actions: [{steer: {latent: 0, scale: 0.5}}]
        """)
    loaded = load_case_file(write(tmp_path, "s.tests.yaml", """\
        cases:
          - name: chat is steered
            messages:
              - {role: user, content: "hello"}
              - {role: assistant, content: "hi there"}
            expect: {triggers: [s.steer], outcome: steered}
        """))
    tok = _chat_tokenizer()
    (result,) = run_cases(monitor_for(loaded, tok), loaded.cases, policy_set=loaded.policy_set)
    assert result.passed, result.failures
    # Without a chat template the case fails with a reason instead of raising.
    (no_template,) = run_cases(monitor_for(loaded), loaded.cases)
    assert not no_template.passed and no_template.outcome is None
    assert no_template.failures[0].startswith("could not scan the case: ")


def test_expected_rules_missing_from_the_monitor_policy_fail_the_case(tmp_path, monitor_for):
    write(tmp_path, "code.yaml", POLICY)
    loaded = load_case_file(write(tmp_path, "code.tests.yaml", TESTS))
    case = Case(name="x", source=SourceRef("t.yaml", 1, 1), triggers=("gone",),
                not_triggers=("also.gone",), text="hi")
    (result,) = run_cases(monitor_for(loaded), [case])
    assert result.failures == ("rule 'gone' is not in the policy under test",
                               "rule 'also.gone' is not in the policy under test")


def _chat_tokenizer():
    from monitor.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_relative_thresholds_are_explained_with_the_value_the_policy_resolved(tmp_path,
                                                                              monitor_for):
    catalog = Catalog(sae="tiny", layer=LAYER, features=(
        FeatureEntry(name="code.three", latent=3, max_activation=4e8),))
    write(tmp_path, "r.yaml", """\
        version: 1
        rules:
          - id: r.never
            description: never fires
            severity: low
            when: {feature: code.three, above_relative: 2.5}
            actions: [log]
        """)
    loaded = load_case_file(write(tmp_path, "r.tests.yaml", """\
        cases:
          - name: quiet
            text: hello world
            expect: {triggers: [r.never]}
        """), catalog, d_sae=D_SAE)
    mon = monitor_for(loaded, catalog=catalog)
    (result,) = run_cases(mon, loaded.cases, policy_set=loaded.policy_set)
    (reason,) = result.failures
    assert reason.startswith("expected rule 'r.never' to fire; it did not: code.three peaked at ")
    assert reason.endswith("(threshold above_relative 2.5 = 1e+09)")


def test_a_scope_mean_rule_that_did_not_fire_is_explained_by_its_scope_mean(tmp_path, monitor_for):
    write(tmp_path, "m.yaml", """\
version: "1"
rules:
  - id: m.never
    description: mean far above anything
    severity: low
    scope: response
    when: {latent: 3, above: 1e9, aggregate: {scope_mean: {min_tokens: 2}}}
    actions: [log]
""")
    loaded = load_case_file(write(tmp_path, "m.tests.yaml", """\
cases:
  - name: fires
    prompt: "Write a shell script"
    response: "echo hi there and more"
    expect: {triggers: [m.never]}
"""), d_sae=D_SAE)
    (result,) = run_cases(monitor_for(loaded), loaded.cases, policy_set=loaded.policy_set)
    (reason,) = result.failures
    assert reason.startswith("expected rule 'm.never' to fire; it did not: latent:3 scope mean "
                             "peaked at ")
    assert reason.endswith("(threshold above 1e+09, mean over the whole scope, from 2 tokens)")
