"""Loader errors: every problem reported at once, each at its file:line:column."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from monitor.errors import PolicyError
from monitor.policy import load_policies, policy_json_schema
from tests.policy.helpers import D_SAE, make_catalog, write

REPO = Path(__file__).resolve().parents[2]

EXAMPLE = """\
version: "2025-01-15"
rules:
  - id: shell_injection.block
    description: Refuse to write shell commands built from user input
    severity: high
    scope: response
    when:
      all:
        - feature: unsafe_code.shell_injection
          above_relative: 0.4
        - not: {feature: deception.lying, below: 0.5, aggregate: {window_mean: {tokens: 8}}}
        - any:
            - {latent: 7, above: 3.0, aggregate: {consecutive: {tokens: 2}}}
            - {latent: 9, above: 1.0, aggregate: {count_in_window: {tokens: 20, at_least: 3}}}
    actions:
      - log
      - metric
      - alert
      - block: {message: "I can't help with that."}
      - steer:
          feature: unsafe_code.shell_injection
          clamp_relative: 0.1
          duration: rest_of_response
  - id: sycophancy.shadow
    description: Trial a probe-based rule
    severity: low
    mode: shadow
    when: {feature: sycophancy.probe, above: 1.5}
    actions:
      - log
      - steer: {feature: sycophancy.probe, scale: 0.5, along_direction: true}
"""


def problems(tmp_path: Path, text: str, catalog=None, d_sae=None) -> list[str]:
    path = write(tmp_path, "p.yaml", text)
    with pytest.raises(PolicyError) as err:
        load_policies(path, catalog, d_sae=d_sae)
    assert err.value.errors and all(e in str(err.value) for e in err.value.errors)
    return err.value.errors


def rule(when: str = "{latent: 1, above: 1.0}", actions: str = "[log]", extra: str = "") -> str:
    return (f"version: 1\nrules:\n  - id: r\n    description: d\n    severity: low\n"
            f"    when: {when}\n    actions: {actions}\n{extra}")


def test_example_policy_loads(tmp_path):
    catalog = make_catalog(tmp_path)
    policies = load_policies(write(tmp_path, "p.yaml", EXAMPLE), catalog, d_sae=D_SAE)
    assert [r.id for r in policies.rules] == ["shell_injection.block", "sycophancy.shadow"]
    assert str(policies.sources[1]) == f"{tmp_path / 'p.yaml'}:24:5"
    assert policies.files[0].version == "2025-01-15"
    assert policies.rules[0].actions[0].kind == "log"


def test_yaml_syntax_error_is_located(tmp_path):
    errors = problems(tmp_path, "version: 1\nrules:\n  - id: [unclosed\n")
    assert len(errors) == 1 and ":4:1: YAML syntax error" in errors[0]


def test_all_errors_of_a_file_at_once(tmp_path):
    text = """\
version: 1
rules:
  - id: a
    description: d
    severity: hgih
    when: {latent: 1, abvoe: 2.0}
    actions: [lgo]
  - id: b
    description: d
    severity: low
    when: {latent: 1, above: 1.0, aggregate: {window_mean: {tokens: 5000}}}
    actions: [log]
    threshold: 3
"""
    errors = problems(tmp_path, text)
    assert len(errors) == 5
    assert ":5:15: rules[0] (id: a).severity: 'hgih' is not one of" in errors[0]
    assert "did you mean 'high'?" in errors[0]
    assert ":6:23: rules[0] (id: a).when.abvoe: unknown key 'abvoe'; did you mean 'above'?" \
        in errors[1]
    assert ":7:15: rules[0] (id: a).actions[0]: unknown key 'lgo'; did you mean 'log'?" in errors[2]
    assert ":11:69: rules[1] (id: b).when.aggregate.window_mean.tokens:" in errors[3]
    assert "less than or equal to 4096" in errors[3]
    assert ":13:5: rules[1] (id: b).threshold: unknown key 'threshold'" in errors[4]


@pytest.mark.parametrize("when, where, message", [
    ("{latent: 1, above: abc}", ":6:30:", "valid number"),
    ("{latent: -1, above: 1}", ":6:20:", "greater than or equal to 0"),
    ("{latent: 1}", ":6:11:", "give exactly one of 'above', 'below', 'above_relative'"),
    ("{latent: 1, above: 1, below: 0}", ":6:11:", "(got 'above', 'below')"),
    ("{latent: 1, above_relative: 0.5}", ":6:11:", "above_relative needs a catalog 'feature'"),
    ("{feature: a.b, above_relative: 20}", ":6:42:", "less than or equal to 10"),
    ("{latent: 1, above: .nan}", ":6:30:", "finite number"),
    ("{any: []}", ":6:17:", "needs at least 1 item(s), got 0"),
    ("{all: []}", ":6:17:", "needs at least 1 item(s), got 0"),
    ("{any: [{latent: 1, above: 1}], all: [{latent: 1, above: 1}]}", ":6:11:",
     "exactly one key 'any', 'all' or 'not'"),
    ("{latent: 1, above: 1, aggregate: {count_in_window: {tokens: 3, at_least: 4}}}", ":6:62:",
     "at_least (4) cannot exceed tokens (3)"),
    ("{latent: 1, above: 1, aggregate: {consecutive: {tokens: 0}}}", ":6:67:",
     "greater than or equal to 1"),
    ("{latent: 1, above: 1, aggregate: {windw_mean: {tokens: 3}}}", ":6:45:",
     "did you mean 'window_mean'?"),
    ("{latent: 1, above: 1, aggregate: {each_token: {}, consecutive: {tokens: 2}}}", ":6:44:",
     "give exactly one of 'each_token'"),
    ("[1, 2]", ":6:11:", "a condition is either a feature test"),
])
def test_condition_errors(tmp_path, when, where, message):
    errors = problems(tmp_path, rule(when=when))
    assert len(errors) == 1, errors
    assert where in errors[0] and message in errors[0], errors[0]


@pytest.mark.parametrize("actions, where, message", [
    ("[]", ":7:14:", "needs at least 1 item(s)"),
    ("[{block: {}}]", ":7:23:", "missing required key 'message'"),
    ("[{block: {message: no}}]", ":7:33:", "put the text in quotes"),
    ("[{steer: {latent: 1}}]", ":7:23:", "give exactly one of 'clamp', 'clamp_relative', 'scale'"),
    ("[{steer: {latent: 1, clamp: 0, duration: forever}}]", ":7:55:",
     "'forever' is not one of rest_of_response, while_active"),
    ("[{steer: {latent: 1, clamp_relative: 0.5}}]", ":7:23:", "clamp_relative needs a catalog"),
    ("[{log: {}, metric: {}}]", ":7:15:", "(got 'log', 'metric')"),
])
def test_action_errors(tmp_path, actions, where, message):
    errors = problems(tmp_path, rule(actions=actions))
    assert len(errors) == 1, errors
    assert where in errors[0] and message in errors[0], errors[0]


def test_top_level_errors(tmp_path):
    assert "missing required key 'version'" in problems(tmp_path, "rules: []\n")[0]
    assert "file is empty" in problems(tmp_path, "# nothing\n")[0]
    assert "must be a mapping" in problems(tmp_path, "- a\n")[0]
    assert ":3:1:" in problems(tmp_path, "version: 1\nrules: []\nrules: []\n")[0]
    assert "did you mean 'rules'?" in problems(tmp_path, "version: 1\nruls: []\n")[0]


def test_catalog_errors_with_did_you_mean(tmp_path):
    catalog = make_catalog(tmp_path)
    errors = problems(tmp_path, rule(
        when="{feature: unsafe_code.shell_injecton, above: 1}",
        actions="[{steer: {feature: sycophancy.probe, clamp: 0}}, "
                "{steer: {feature: toxicity.insult, clamp_relative: 0.5}}]"), catalog)
    assert len(errors) == 3
    assert ":6:21: rules[0] (id: r).when.feature: unknown feature 'unsafe_code.shell_injecton'" \
        in errors[0] and "did you mean 'unsafe_code.shell_injection'?" in errors[0]
    assert "along_direction: true" in errors[1] and ":7:" in errors[1]
    assert "toxicity.insult' has no max_activation" in errors[2]
    errors = problems(tmp_path, rule(when="{feature: toxicity.insult, above_relative: 0.5}"),
                      catalog)
    assert "has no max_activation" in errors[0]


def test_latent_range_with_d_sae(tmp_path):
    errors = problems(tmp_path, rule(when="{any: [{latent: 1, above: 1}, {latent: 64, above: 1}]}"),
                      d_sae=64)
    assert len(errors) == 1 and "when.any[1].latent: latent 64 is out of range" in errors[0]


def test_duplicate_rule_ids_within_and_across_files(tmp_path):
    one = rule().replace("rules:\n", "rules:\n  - {id: r, description: d, severity: low, "
                                     "when: {latent: 2, above: 1}, actions: [log]}\n")
    errors = problems(tmp_path, one)
    assert "duplicate rule id 'r' (first defined at line 3)" in errors[0] and ":4:9:" in errors[0]
    write(tmp_path, "a.yaml", rule())
    write(tmp_path, "b.yaml", rule())
    (tmp_path / "p.yaml").unlink()
    with pytest.raises(PolicyError) as err:
        load_policies(tmp_path)
    (msg,) = err.value.errors
    assert f"{tmp_path / 'b.yaml'}:3:9:" in msg and f"also defined at {tmp_path / 'a.yaml'}:3:5" \
        in msg


def test_directory_skips_test_case_files_and_reports_all_files(tmp_path):
    write(tmp_path, "a.yaml", rule())
    write(tmp_path, "a.tests.yaml", "not: [a policy")
    write(tmp_path, ".hidden.yaml", "broken: [")
    write(tmp_path, "notes.txt", "ignored")
    policies = load_policies(tmp_path)
    assert [f.path for f in policies.files] == [str(tmp_path / "a.yaml")]
    write(tmp_path, "b.yml", "version: 1\nrules: [{id: x}]\n")
    write(tmp_path, "c.yaml", "version: [")
    with pytest.raises(PolicyError) as err:
        load_policies([tmp_path, tmp_path / "a.yaml"])
    assert {e.split(":")[0] for e in err.value.errors} == {str(tmp_path / "b.yml"),
                                                           str(tmp_path / "c.yaml")}


def test_missing_paths_and_empty_directory(tmp_path):
    with pytest.raises(PolicyError, match="no such policy file"):
        load_policies(tmp_path / "nope.yaml")
    with pytest.raises(PolicyError, match="holds no policy files"):
        load_policies(tmp_path)


def test_version_id_is_a_content_hash(tmp_path):
    a = load_policies(write(tmp_path, "a.yaml", rule()))
    b = load_policies(write(tmp_path, "b.yaml", "# comment\n" + rule().replace("1.0", "1.00")))
    c = load_policies(write(tmp_path, "c.yaml", rule(when="{latent: 1, above: 2.0}")))
    assert a.version_id == b.version_id != c.version_id
    assert len(a.version_id) == 16


def test_policy_set_is_immutable(tmp_path):
    policies = load_policies(write(tmp_path, "a.yaml", rule()))
    with pytest.raises(Exception):
        policies.rules = ()  # type: ignore[misc]
    with pytest.raises(Exception):
        policies.rules[0].severity = "high"  # type: ignore[misc]


def test_committed_json_schema_is_current():
    committed = json.loads((REPO / "policies" / "schema.json").read_text(encoding="utf-8"))
    assert committed == policy_json_schema(), (
        "policies/schema.json is stale; regenerate it with: python -c \"from monitor.policy "
        "import write_json_schema as w; w('policies/schema.json')\"")


def test_write_json_schema_matches_committed_bytes(tmp_path):
    from monitor.policy import write_json_schema

    write_json_schema(tmp_path / "schema.json")
    committed = (REPO / "policies" / "schema.json").read_bytes()
    assert (tmp_path / "schema.json").read_bytes() == committed


# ---------------------------------------------------------------------------- hostile files


def test_alias_bomb_is_refused_with_its_line(tmp_path):
    from tests.test_yaml_source import ALIAS_BOMB

    errors = problems(tmp_path, "version: 1\nrules: []\n" + ALIAS_BOMB)
    assert errors == [f"{tmp_path / 'p.yaml'}:7:8: aliases ('*name' references) would add more "
                      "than 10,000 values to this document, the limit; a document that grows like "
                      "this from aliases is refused (an alias bomb): write the values out or use "
                      "fewer aliases"]


def test_deeply_nested_conditions_are_refused_with_their_line(tmp_path):
    chain = "{not: " * 3000 + "{latent: 1, above: 1}" + "}" * 3000  # was a RecursionError
    (error,) = problems(tmp_path, rule(when=chain))
    # the file, `rules` and the rule are 3 levels, so the 62nd `{not:` is the 65th (col 11 + 6*61)
    assert error.startswith(f"{tmp_path / 'p.yaml'}:6:377: nested more than 64 levels of "
                            "mappings and lists deep (limit 64)")


def test_oversized_policy_file_names_its_size_and_the_limit(tmp_path):
    padding = "# " + "x" * 78 + "\n"
    text = rule() + padding * (1024 * 1024 // len(padding) + 1)
    errors = problems(tmp_path, text)
    size = len(text.encode())
    assert errors == [f"{tmp_path / 'p.yaml'}: policy file is {size:,} bytes, over the limit of "
                      "1,048,576 bytes; split it into smaller files"]


@pytest.mark.parametrize("when, actions, where", [
    ("{latent: true, above: 1}", "[log]", ":6:20:"),
    ("{latent: 1, above: yes}", "[log]", ":6:30:"),
    ("{latent: 1, above: 1, aggregate: {consecutive: {tokens: on}}}", "[log]", ":6:67:"),
    ("{latent: 1, above: 1}", "[{steer: {latent: false, clamp: 0}}]", ":7:32:"),
    ("{latent: 1, above: 1}", "[{steer: {latent: 1, scale: true}}]", ":7:42:"),
])
def test_booleans_are_not_numbers(tmp_path, when, actions, where):
    (error,) = problems(tmp_path, rule(when=when, actions=actions))
    assert where in error and "a boolean, where a number belongs" in error, error


def test_unreadable_entries_of_a_policy_directory_are_errors_not_omissions(tmp_path):
    write(tmp_path, "a.yaml", rule())
    (tmp_path / "dangling.yaml").symlink_to(tmp_path / "gone.yaml")
    (tmp_path / "loop.yml").symlink_to(tmp_path / "loop.yml")
    os.mkfifo(tmp_path / "fifo.yaml")
    (tmp_path / "sub.yaml").mkdir()
    with pytest.raises(PolicyError) as err:
        load_policies(tmp_path)
    assert [e.split(": ", 1)[0] for e in err.value.errors] == [
        str(tmp_path / n) for n in ("dangling.yaml", "fifo.yaml", "loop.yml", "sub.yaml")]
    text = "\n".join(err.value.errors)
    assert f"broken symbolic link to '{tmp_path / 'gone.yaml'}'" in text
    assert "symbolic link loop" in text and "not a regular file" in text
    assert "is a directory, not a policy file" in text
    with pytest.raises(PolicyError, match="broken symbolic link"):
        load_policies(tmp_path / "dangling.yaml")  # named directly too


def test_version_ids_of_existing_policies_are_unchanged(tmp_path):
    # Computed with the loader before `allow_always_true` existed; audit logs key on it.
    assert load_policies(write(tmp_path, "p.yaml", EXAMPLE)).version_id == "1a9bc5690527f10a"
