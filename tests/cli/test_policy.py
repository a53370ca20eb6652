"""``policy check`` and ``policy test``: exit codes, tables, located errors, never a traceback."""

from __future__ import annotations

import argparse
import io
import json

import pytest

from monitor.cli.common import build_parents
from monitor.cli.policy import add_parser, check_policies, run_policy_tests, sae_width
from monitor.testing import tiny_model, tiny_tokenizer
from tests.policy.helpers import CATALOG_YAML, write
from tests.policy.test_cases import D_SAE, POLICY, TESTS, make_sae

FEATURE_POLICY = """\
version: 2
rules:
  - id: shell.block
    description: d
    severity: high
    scope: response
    when: {feature: unsafe_code.shell_injection, above: 4.0}
    actions: [log, metric, {block: {message: nope}}]
"""


def check(paths, **kwargs) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = check_policies([str(p) for p in paths], out=out, err=err, **kwargs)
    return status, out.getvalue(), err.getvalue()


def run_tests(paths, **kwargs) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = run_policy_tests([str(p) for p in paths], out=out, err=err, **kwargs)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny llama + tokenizer and a tiny SAE saved to disk, as the CLI loads them."""
    root = tmp_path_factory.mktemp("artifacts")
    tiny_model("llama").save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    make_sae().save(root / "sae")
    return root


# ---------------------------------------------------------------------------- check


def test_check_valid_directory_prints_the_rule_table(tmp_path):
    write(tmp_path, "code.yaml", POLICY)
    write(tmp_path, "code.tests.yaml", TESTS)
    status, out, err = check([tmp_path], sae="none")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["RULE", "SCOPE", "FEATURES", "ACTIONS", "MODE"]
    assert lines[1].split() == ["code.always_block", "response", "latent:0", "log,", "block",
                                "enforce"]
    assert lines[3].split() == ["code.shadow", "prompt", "latent:1", "log,", "block", "shadow"]
    assert lines[-1].startswith("OK: 3 rule(s) in 1 policy file(s), version ")
    assert lines[-1].endswith("; 2 test case(s) in 1 test file(s)")


def test_check_reports_every_error_of_every_file_located(tmp_path):
    a = write(tmp_path, "a.yaml", POLICY.replace("above: 1e9", "abvoe: 1e9"))
    b = write(tmp_path, "b.yaml", POLICY.replace("code.", "b.").replace("severity: low",
                                                                        "severity: lo"))
    status, out, err = check([tmp_path], sae="none")
    assert status == 1 and out == ""
    lines = err.splitlines()
    assert lines[-1] == "2 problems"
    assert lines[0].startswith(f"{a}:13:") and "unknown key 'abvoe'" in lines[0]
    assert lines[1].startswith(f"{b}:12:") and "'lo' is not one of" in lines[1]
    assert "Traceback" not in err


def test_check_with_a_catalog_and_an_sae_width_from_cfg_json_only(tmp_path):
    catalog = write(tmp_path, "cat.yaml", CATALOG_YAML)
    sae_dir = tmp_path / "sae"
    sae_dir.mkdir()  # only cfg.json: check must not need the weights
    (sae_dir / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 8,
                                                  "d_sae": 64}))
    assert sae_width(sae_dir) == 64
    policies = tmp_path / "policies"
    policies.mkdir()
    good = write(policies, "good.yaml", FEATURE_POLICY)
    status, out, _ = check([good], sae=sae_dir, catalog=catalog)
    assert status == 0
    assert out.splitlines()[1].split() == ["shell.block", "response",
                                           "unsafe_code.shell_injection", "log,", "metric,",
                                           "block", "enforce"]
    bad = write(policies, "bad.yaml", FEATURE_POLICY.replace("shell.block", "x")
                .replace("unsafe_code.shell_injection", "unsafe_code.shell_injektion")
                + "  - id: y\n    description: d\n    severity: low\n"
                  "    when: {latent: 64, above: 1}\n    actions: [log]\n")
    status, _, err = check([bad], sae=sae_dir, catalog=catalog)
    assert status == 1
    assert err.splitlines() == [
        f"{bad}:7:21: rules[0] (id: x).when.feature: unknown feature "
        "'unsafe_code.shell_injektion' (not in catalog for SAE 'test-sae'); did you mean "
        "'unsafe_code.shell_injection'?",
        f"{bad}:12:20: rules[1] (id: y).when.latent: latent 64 is out of range for an SAE with "
        "64 latents (valid: 0..63)",
        "2 problems"]


def test_check_needs_a_catalog_for_feature_names(tmp_path):
    policy = write(tmp_path, "p.yaml", FEATURE_POLICY)
    status, _, err = check([policy], sae="none")
    assert status == 1
    assert err.strip() == (f"{policy}:3:5: rule 'shell.block': uses feature names "
                           "(unsafe_code.shell_injection) but no catalog was given to resolve "
                           "them; pass --catalog")


def test_check_reports_test_file_errors_and_bad_inputs_without_traceback(tmp_path):
    write(tmp_path, "code.yaml", POLICY)
    tests = write(tmp_path, "code.tests.yaml", "cases:\n  - name: a\n    text: x\n"
                  "    expect: {triggers: [code.nevr]}\n")
    status, _, err = check([tmp_path], sae="none")
    assert status == 1 and err.startswith(f"{tests}:4:25: ") and "did you mean 'code.never'" in err
    status, _, err = check([tests], sae="none")  # a test file given directly
    assert status == 1 and err.startswith(f"{tests}:4:25: ")
    status, _, err = check([tmp_path / "code.yaml"], sae=tmp_path / "no-sae")
    assert status == 1 and "no-sae" in err and "Traceback" not in err
    status, _, err = check([tmp_path / "missing.yaml"], sae="none")
    missing = tmp_path / "missing.yaml"
    assert status == 1 and err.strip() == f"{missing}: no such policy file or directory"
    write(tmp_path, "cat.yaml", "sae: s\nlayer: 1\nfeatures:\n  - {name: a.b, latnt: 3}\n")
    status, _, err = check([tmp_path / "code.yaml"], sae="none", catalog=tmp_path / "cat.yaml")
    assert status == 1 and err.startswith(f"{tmp_path / 'cat.yaml'}:4:")


# ---------------------------------------------------------------------------- test


def test_policy_test_passes_and_fails_on_a_tiny_model(tmp_path, saved):
    write(tmp_path, "code.yaml", POLICY)
    tests = write(tmp_path, "code.tests.yaml", TESTS)
    write(tmp_path, "untested.yaml", POLICY.replace("code.", "u."))
    status, out, err = run_tests([tmp_path], model=saved / "model", sae=saved / "sae",
                                 self_test=False)
    assert status == 1, err
    lines = out.splitlines()
    assert lines[0] == f"note: {tmp_path / 'untested.yaml'} has no test file (untested.tests.yaml)"
    assert lines[1] == f"{tests} (policy: code.yaml)"
    assert lines[2] == "  PASS  everything is blocked"
    assert lines[3] == f"  FAIL  the quiet rule fires  ({tests}:8:5)"
    assert lines[4].startswith("          - expected rule 'code.never' to fire; it did not: "
                               "latent:3 peaked at ")
    assert "expected outcome allowed, got blocked" in lines[5]
    assert lines[-1] == "1 passed, 1 failed"

    only_passing = write(tmp_path, "code.tests.yaml", TESTS.split("  - name: the quiet")[0])
    status, out, _ = run_tests([only_passing], model=saved / "model", sae=saved / "sae",
                               self_test=False, verbose=True)
    assert status == 0 and out.splitlines()[-1] == "1 passed, 0 failed"
    assert "outcome blocked; fired: code.always_block: " in out


def test_policy_test_rejects_bad_files_before_loading_any_model(tmp_path, saved):
    write(tmp_path, "code.yaml", POLICY)
    tests = write(tmp_path, "code.tests.yaml", "cases:\n  - name: a\n    txt: x\n"
                  "    expect: {outcome: allowed}\n")
    status, out, err = run_tests([tmp_path], model=tmp_path / "no-model", sae=saved / "sae")
    assert status == 2 and out == ""
    lines = err.splitlines()
    assert lines[0].startswith(f"{tests}:2:5: cases[0] (name: a): a case needs exactly one input")
    assert lines[1].startswith(f"{tests}:3:5: cases[0] (name: a).txt: unknown key 'txt'; did "
                               "you mean 'text'?")
    assert "no-model" not in err and "Traceback" not in err


def test_policy_test_exit_2_when_nothing_can_run(tmp_path, saved):
    write(tmp_path, "code.yaml", POLICY)
    status, _, err = run_tests([tmp_path], model=saved / "model", sae=saved / "sae")
    assert status == 2 and err.startswith("no test cases found")
    write(tmp_path, "code.tests.yaml", TESTS)
    status, _, err = run_tests([tmp_path], model=tmp_path / "no-model", sae=saved / "sae")
    assert status == 2 and "not a Hugging Face model directory" in err
    status, _, err = run_tests([tmp_path / "nope"], model=saved / "model", sae=saved / "sae")
    assert status == 2 and "no such policy file, test file or directory" in err


# ---------------------------------------------------------------------------- argparse


def test_add_parser_wires_check_and_test(tmp_path):
    parser = argparse.ArgumentParser(prog="sae-monitor")
    add_parser(parser.add_subparsers(dest="command"), build_parents())
    args = parser.parse_args(["policy", "check", str(write(tmp_path, "p.yaml", POLICY)),
                              "--sae", "none"])
    out, err = io.StringIO(), io.StringIO()
    assert args.func(args, out, err) == 0 and "code.always_block" in out.getvalue()
    args = parser.parse_args(["policy", "test", "x", "--model", "m", "--sae", "s", "-v"])
    assert (args.paths, args.model, args.sae, args.catalog, args.verbose) == (
        ["x"], "m", "s", None, True)
    assert args.func.__name__ == "cmd_test"
    with pytest.raises(SystemExit):
        parser.parse_args(["policy"])


def test_sae_width_of_a_saved_sae(saved):
    assert sae_width(saved / "sae") == D_SAE
    assert sae_width("none") is None


def test_the_sae_file_names_check_reads_are_the_loaders():
    import monitor.sae
    from monitor.cli import policy

    assert (policy.SAELENS_CFG, policy.SPARSIFY_WEIGHTS) == (monitor.sae.SAELENS_CFG,
                                                             monitor.sae.SPARSIFY_WEIGHTS)
    assert policy.SHIPPED_DIR == monitor.sae.SHIPPED_DIR.resolve()
