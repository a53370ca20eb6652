"""``sae-monitor demo`` on the real default model under the shipped policies."""

from __future__ import annotations

import io
import re

import pytest

from monitor.cli import main
from monitor.cli.demo import PROMPTS

pytestmark = pytest.mark.e2e


def test_demo_shows_each_prompt_its_outcome_and_the_rules_that_blocked():
    out, err = io.StringIO(), io.StringIO()
    assert main(["demo", "--max-new-tokens", "12"], out=out, err=err) == 0
    text = out.getvalue()
    blocks = text.split("=" * 100)[1:-1]
    assert len(blocks) == len(PROMPTS)
    outcomes = [re.search(r"^outcome: (\w+)", b, re.MULTILINE).group(1) for b in blocks]
    assert outcomes[0] == "ALLOWED"                                   # the capital of France
    assert outcomes[2] == "BLOCKED"                                   # the shell command
    assert "blocked by unsafe_code.shell_execution.block at response token" in blocks[2]
    assert "blocked by backdoor.concealment.block at prompt token" in blocks[4]  # hidden camera
    for block in blocks:  # every watched feature's peaks are listed
        assert "unsafe_code.probe" in block and "backdoor.concealment" in block
