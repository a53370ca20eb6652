"""Policy test cases: the *.tests.yaml format (errors at file:line:column), no model needed.

Running cases through a model is tested in tests/runtime/test_policy_tests.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.errors import PolicyError
from monitor.policy.cases import Case, find_case_files, load_case_file, load_case_files
from monitor.policy.loader import SourceRef
from monitor.sae import SAE
from monitor.yaml_source import MAX_DEPTH
from monitor.testing import tied_sae
from tests.policy.helpers import write
from tests.test_yaml_source import ALIAS_BOMB

LAYER = 2
D_SAE = 16

# A ReLU latent is >= 0, so `above: -1.0` fires on every monitored token and `above: 1e9` never
# (an enforce rule must say `allow_always_true: true` for that).
POLICY = """\
version: "1"
rules:
  - id: code.always_block
    description: fires on every response token
    severity: high
    scope: response
    when: {latent: 0, above: -1.0}
    allow_always_true: true
    actions: [log, {block: {message: BLOCKED}}]
  - id: code.never
    description: never fires
    severity: low
    when: {latent: 3, above: 1e9}
    actions: [log]
  - id: code.shadow
    description: reports every prompt token
    severity: info
    mode: shadow
    scope: prompt
    when: {latent: 1, above: -1.0}
    actions: [log, {block: {message: never enforced}}]
"""

TESTS = """\
cases:
  - name: everything is blocked
    text: "import os; os.system(cmd)"
    expect:
      triggers: [code.always_block]
      not_triggers: [code.never]
      outcome: blocked
  - name: the quiet rule fires
    prompt: "Write a shell script"
    response: "echo hi"
    expect:
      triggers: [code.never, code.shadow]
      outcome: allowed
"""


def make_sae() -> SAE:
    return tied_sae(LAYER, d_sae=D_SAE)


def problems(path: Path, **kwargs) -> list[str]:
    with pytest.raises(PolicyError) as err:
        load_case_file(path, **kwargs)
    assert err.value.errors and all(e in str(err.value) for e in err.value.errors)
    return err.value.errors


# ---------------------------------------------------------------------------- loading


def test_valid_file_loads_with_default_policy_and_case_positions(tmp_path):
    policy = write(tmp_path, "code.yaml", POLICY)
    tests = write(tmp_path, "code.tests.yaml", TESTS)
    loaded = load_case_file(tests, d_sae=D_SAE)
    assert loaded.policies == (policy,)
    assert [r.id for r in loaded.policy_set.rules] == ["code.always_block", "code.never",
                                                       "code.shadow"]
    first, second = loaded.cases
    assert first == Case(name="everything is blocked", source=SourceRef(str(tests), 2, 5),
                         triggers=("code.always_block",), not_triggers=("code.never",),
                         outcome="blocked", text="import os; os.system(cmd)")
    assert (second.prompt, second.response, second.outcome) == ("Write a shell script", "echo hi",
                                                                 "allowed")


def test_policy_key_names_one_or_several_files(tmp_path):
    write(tmp_path, "a.yaml", POLICY)
    write(tmp_path, "b.yml", POLICY.replace("code.", "other."))
    tests = write(tmp_path, "anything.tests.yml", "policy: [a.yaml, b.yml]\ncases:\n"
                  "  - name: c\n    text: x\n    expect: {triggers: [other.never, code.never]}\n")
    assert [p.name for p in load_case_file(tests).policies] == ["a.yaml", "b.yml"]
    single = write(tmp_path, "s.tests.yaml", "policy: a.yaml\ncases:\n"
                   "  - name: c\n    messages: [{role: user, content: hi}]\n"
                   "    expect: {outcome: allowed}\n")
    case = load_case_file(single).cases[0]
    assert case.messages == ({"role": "user", "content": "hi"},)


def test_every_problem_of_a_test_file_is_reported_at_its_line(tmp_path):
    write(tmp_path, "code.yaml", POLICY)
    tests = write(tmp_path, "code.tests.yaml", """\
        cases:
          - name: one
            text: a
            expect: {triggers: [code.always_blok], not_trigger: [code.never]}
          - name: one
            prompt: only a prompt
            expect: {outcome: blokked}
          - name: two
            text: a
            messages: [{role: user, content: hi}]
            expect: {}
          - name: three
            text: a
            expect: {triggers: [code.never], not_triggers: [code.never]}
        """)
    errs = problems(tests, d_sae=D_SAE)
    where = f"{tests}:"
    assert errs == [
        f"{where}4:25: cases[0] (name: one).expect.triggers[0]: unknown rule id "
        "'code.always_blok' (not defined in code.yaml); did you mean 'code.always_block'?",
        f"{where}4:44: cases[0] (name: one).expect.not_trigger: unknown key 'not_trigger'; did "
        "you mean 'not_triggers'? (valid keys: triggers, not_triggers, outcome)",
        f"{where}5:5: cases[1] (name: one): 'prompt' needs a 'response' (or write the whole chat "
        "as 'messages')",
        f"{where}5:11: cases[1] (name: one).name: duplicate case name 'one' (first used at line "
        "2); case names must be unique",
        f"{where}7:23: cases[1] (name: one).expect.outcome: 'blokked' is not one of allowed, "
        "blocked, steered; did you mean 'blocked'?",
        f"{where}8:5: cases[2] (name: two): a case needs exactly one input: 'messages', 'text', "
        "or 'response' (with an optional 'prompt'); got 'messages', 'text'",
        f"{where}11:13: cases[2] (name: two).expect: expect needs at least one of 'triggers', "
        "'not_triggers' or 'outcome'; a case that expects nothing tests nothing",
        f"{where}14:13: cases[3] (name: three).expect: rule 'code.never' is listed in both "
        "'triggers' and 'not_triggers'",
    ]


@pytest.mark.parametrize("text, expected", [
    ("cases: [\n", ":2:1: YAML syntax error"),
    ("", ":1:1: the file is empty; a test file needs 'cases'"),
    ("- a\n- b\n", ":1:1: a test file must be a mapping"),
    ("cases: []\n", ":1:8: cases: needs at least 1 item(s), got 0"),
    ("policy: missing.yaml\ncases: []\n", ":1:9: policy: policy file 'missing.yaml' not found"),
    ("policy: []\ncases: []\n", ":1:9: policy: 'policy' is an empty list"),
    ("cases:\n  - name: a\n    text: x\n    expect: {outcome: allowed}\n    expected: 1\n",
     ":5:5: cases[0] (name: a).expected: unknown key 'expected'; did you mean 'expect'?"),
])
def test_malformed_test_files(tmp_path, text, expected):
    write(tmp_path, "p.yaml", POLICY)
    tests = write(tmp_path, "p.tests.yaml", text)
    assert any(e.startswith(str(tests)) and expected in e for e in problems(tests)), problems(tests)


def test_a_test_file_without_its_policy_says_how_to_name_one(tmp_path):
    tests = write(tmp_path, "lonely.tests.yaml", "cases:\n  - {name: a, text: x, expect: "
                  "{outcome: allowed}}\n")
    assert problems(tests) == [f"{tests}:1:1: no policy file 'lonely.yaml' beside this test "
                               "file; name the policy under test with 'policy:'"]


def test_errors_in_the_policy_under_test_point_into_the_policy(tmp_path):
    policy = write(tmp_path, "p.yaml", POLICY.replace("above: 1e9", "abvoe: 1e9"))
    tests = write(tmp_path, "p.tests.yaml", TESTS)
    errs = problems(tests)
    assert errs and all(e.startswith(f"{policy}:") for e in errs)
    assert any("unknown key 'abvoe'; did you mean 'above'?" in e for e in errs)
    out_of_range = write(tmp_path, "p.yaml", POLICY.replace("latent: 3", "latent: 99"))
    assert any(e.startswith(f"{out_of_range}:13:20:") and "out of range" in e
               for e in problems(tests, d_sae=D_SAE))


def test_load_case_files_reports_all_files_together(tmp_path):
    write(tmp_path, "a.yaml", POLICY)
    write(tmp_path, "b.yaml", POLICY.replace("code.", "b."))
    a = write(tmp_path, "a.tests.yaml", "cases: []\n")
    b = write(tmp_path, "b.tests.yaml", "cases: 3\n")
    with pytest.raises(PolicyError) as err:
        load_case_files([a, b])
    assert [e.split(":")[0] for e in err.value.errors] == [str(a), str(b)]


def test_find_case_files(tmp_path):
    write(tmp_path, "a.yaml", POLICY)
    a_tests = write(tmp_path, "a.tests.yaml", TESTS)
    b = write(tmp_path, "b.yaml", POLICY)
    (tmp_path / "sub").mkdir()
    found = find_case_files([tmp_path])
    assert (found.case_files, found.untested, found.errors) == ((a_tests,), (b,), ())
    assert find_case_files(tmp_path / "a.yaml").case_files == (a_tests,)
    assert find_case_files([a_tests, tmp_path / "a.yaml"]).case_files == (a_tests,)
    assert find_case_files(b).untested == (b,)
    assert find_case_files(tmp_path / "nope.yaml").errors == (
        f"{tmp_path / 'nope.yaml'}: no such policy file, test file or directory",)
    assert "holds no policy or test files" in find_case_files(tmp_path / "sub").errors[0]


# ---------------------------------------------------------------------------- hostile files


def test_alias_bombs_and_deep_nesting_in_test_files_are_refused_with_their_line(tmp_path):
    write(tmp_path, "code.yaml", POLICY)
    bomb = write(tmp_path, "code.tests.yaml", TESTS + ALIAS_BOMB)
    (error,) = problems(bomb)
    assert error.startswith(f"{bomb}:{TESTS.count(chr(10)) + 5}:8: aliases ('*name' references) would add more than")
    deep = write(tmp_path, "code.tests.yaml", "cases: " + "[" * 3000 + "]" * 3000 + "\n")
    (error,) = problems(deep)
    assert error.startswith(f"{deep}:1:{8 + MAX_DEPTH - 1}: nested more than {MAX_DEPTH} levels")


def test_a_broken_link_named_like_a_test_file_is_found_and_reported(tmp_path):
    write(tmp_path, "code.yaml", POLICY)
    link = tmp_path / "code.tests.yaml"
    link.symlink_to(tmp_path / "moved.tests.yaml")
    found = find_case_files([tmp_path])
    assert found.case_files == (link,) and found.untested == ()
    assert find_case_files(tmp_path / "code.yaml").case_files == (link,)
    (error,) = problems(link)
    assert error.startswith(f"{link}: broken symbolic link to ")
