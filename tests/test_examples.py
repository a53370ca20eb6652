"""Each example program (and the dashboard preview tool) runs, on the real default model, and
does what it says."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TOOLS = ROOT / "tools"


def run(name: str, *args: str, where: Path = EXAMPLES) -> str:
    # the checkout under test, even where the installed package is another copy
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, str(where / name), *args], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_quickstart_blocks_the_shell_request_and_answers_the_other():
    out = run("quickstart.py")
    assert "Paris" in out
    assert "[allowed]" in out and "[blocked]" in out and "unsafe_code.shell_execution.block" in out


def test_pipeline_dropin_runs_and_reports():
    out = run("pipeline_dropin.py")
    assert "[allowed]" in out or "[blocked]" in out or "[steered]" in out


def test_steering_example_measures_both_conditions():
    results = json.loads(run("steering.py", "--n", "2", "--max-new-tokens", "24", "--json"))
    assert results["coding_prompts"] == 2 and results["opinion_prompts"] == 2
    assert results["unsafe_features"] and results["sycophancy_feature"]
    for key in ("insecure_completions_baseline", "insecure_completions_steered",
                "praise_words_baseline", "praise_words_steered"):
        assert isinstance(results[key], int)
    # clamping a feature really changes what the model writes
    examples = results["examples"]
    assert examples["code_baseline"] != examples["code_steered"] or examples["opinion_baseline"] != examples["opinion_steered"]


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus")
def test_dashboard_preview_demo_draws_every_panel_it_can(tmp_path):
    out = run("dashboard_preview.py", "--demo", "--rounds", "1", "--max-tokens", "8",
              "--out", str(tmp_path / "preview.html"), where=TOOLS)
    drawn, total = map(int, re.search(r"(\d+) of (\d+) panels have data", out).groups())
    # Only the steering panel may be empty: the shipped policies enforce no steer rule.
    assert total == 12 and drawn >= 11, out
    page = (tmp_path / "preview.html").read_text()
    assert "unsafe_code.shell_execution.block" in page and "policy_version" in page
