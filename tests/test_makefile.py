"""`make test` installs the system tools its real-part tests need (or says exactly how)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "--no-print-directory", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_make_test_depends_on_the_system_tools():
    plan = make("-n", "test").stdout
    assert "for cmd in prometheus promtool chromium" in plan  # the check runs first
    assert "apt-get install" in plan and "pytest" in plan


def test_a_user_without_root_is_told_the_exact_apt_get_command():
    result = make("system-deps", "SYSTEM_COMMANDS=promtool no-such-tool-7731", "USER_ID=1000")
    assert result.returncode != 0
    assert "no-such-tool-7731" in result.stderr
    assert ("sudo apt-get update && sudo apt-get install -y --no-install-recommends "
            "prometheus chromium") in result.stderr


def test_nothing_is_installed_when_the_tools_are_there():
    result = make("system-deps", "SYSTEM_COMMANDS=sh", "USER_ID=1000")
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""


def test_extras_are_one_list_and_each_list_has_its_own_stamp():
    plan = make("-n", "install", "EXTRAS=dev ray peft", "VENV=/nonexistent-venv").stdout
    assert "pip install -q -e '.[dev,ray,peft]'" in plan
    assert "touch /nonexistent-venv/.installed-dev-ray-peft" in plan


def test_ci_runs_make_test():
    assert "exec make test" in (ROOT / ".ci" / "run").read_text()
