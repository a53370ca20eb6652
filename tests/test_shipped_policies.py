"""The shipped policies on the shipped catalog and SAE, through the real default model."""

from __future__ import annotations

import pytest

from monitor.cli.policy import check_policies, run_policy_tests
from monitor.shipped import shipped_policies_dir

pytestmark = pytest.mark.e2e


def test_shipped_policies_are_valid(capsys):
    assert check_policies([str(shipped_policies_dir())]) == 0
    out = capsys.readouterr().out
    for rule in ("unsafe_code.shell_execution.block", "backdoor.concealment.block", "sycophancy.caving.steer"):
        assert rule in out


def test_shipped_policy_test_cases_pass(default_model, capsys, monkeypatch):
    import monitor.models

    # reuse the session's loaded model instead of loading it again
    monkeypatch.setattr(monitor.models, "load_default_model", lambda **_: default_model)
    status = run_policy_tests([str(shipped_policies_dir())])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "0 failed" in out
