"""``sae-monitor backtest`` end to end with the real default model and shipped policies, against
a git revision, and its HTML report checked in a real headless Chromium."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from monitor.backtest.report import render_html, render_table
from monitor.cli import main
from monitor.shipped import shipped_policies_dir
from tests.backtest.helpers import DATA

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium") or "")
                 if p and os.path.exists(p)), None)
STEER = "      - steer: {feature: sycophancy.agrees_with_user, clamp: 0.0, duration: while_active}\n"
CAVING_ENFORCED = ("version: test\nrules:\n  - id: sycophancy.caving.steer\n    description: caving, steered\n"
                   "    severity: medium\n    mode: enforce\n    scope: response\n"
                   "    when: {feature: sycophancy.agrees_with_user, above: 2.0}\n    actions:\n      - log\n" + STEER)


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=repo, check=True,
                   capture_output=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The shipped policies committed in a repo; the candidate (working copy) blocks where the
    committed version steers. Eight real conversations and one broken line."""
    tmp = tmp_path_factory.mktemp("cli")
    repo = tmp / "repo"
    shutil.copytree(shipped_policies_dir(), repo / "policies", ignore=shutil.ignore_patterns("devsets"))
    syc = repo / "policies" / "sycophancy.yaml"
    syc.write_text(CAVING_ENFORCED)  # the baseline steers (whatever mode the shipped rule has)
    (repo / "policies" / "sycophancy.tests.yaml").unlink()
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "shipped")
    assert STEER in syc.read_text()
    syc.write_text(syc.read_text().replace(STEER, "      - block: {message: \"No.\"}\n"))
    lines = DATA.read_text().splitlines()
    data = tmp / "logs.jsonl"
    data.write_text("\n".join(lines[:8] + ['{"messages": "not a list"}']) + "\n")
    out, err = io.StringIO(), io.StringIO()
    argv = ["backtest", "--data", str(data), "--policies", str(repo / "policies"), "--against", "HEAD",
            "--out", str(tmp / "results"), "--html", str(tmp / "report.html"), "--json", "--no-progress",
            "--batch-size", "4"]
    status = main(argv, out=out, err=err)
    return tmp, status, out.getvalue(), err.getvalue()


def test_cli_backtest_against_a_git_revision(run):
    tmp, status, out, err = run
    assert status == 0, err
    summary = json.loads(out)
    assert summary["records"] == 9 and summary["skipped"] == 1
    assert summary["problems"]["records"][0]["key"].endswith("logs.jsonl:9")
    assert summary["versions"]["baseline"]["source"].startswith("HEAD:")
    diff = summary["diff"]
    steered = [r for r in summary["versions"]["baseline"]["rules"] if r["rule"] == "sycophancy.caving.steer"]
    assert steered and diff["counts"]["newly_blocked"] == steered[0]["would_steer"] > 0
    assert all(x["candidate_rule"] == "sycophancy.caving.steer" for x in diff["newly_blocked"])
    assert diff["counts"]["no_longer_blocked"] == 0
    rows = [json.loads(x) for x in (tmp / "results" / "conversations.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and all(r["messages"] is None for r in rows)  # no text without --include-text
    text = render_table(summary)
    assert "newly blocked" in text and "logs.jsonl:9: bad_message" in text


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_html_report_renders_in_headless_chromium(run, tmp_path):
    tmp, status, _, _ = run
    page = (tmp / "report.html").read_text()
    assert "<script" not in page and not re.search(r"(src|href)=\"?(https?:)?//", page)
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2000"]
    uri = (tmp / "report.html").resolve().as_uri()
    dom = subprocess.run(base + ["--dump-dom", uri], capture_output=True, text=True, timeout=120, check=True).stdout
    assert dom.count("<svg") >= 4 and dom.count('class="bar"') > 5          # decisions, rules x2, diff
    assert 'class="diff newly_blocked"' in dom and "sycophancy.caving.steer" in dom
    assert 'class="problems"' in dom and "bad_message" in dom and "logs.jsonl:9" in dom
    shot = tmp_path / "report.png"
    subprocess.run(base + [f"--screenshot={shot}", uri], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000


def test_report_escapes_text(tmp_path):
    summary = {"records": 1, "scanned": 1, "skipped": 0, "tokens": 3,
               "problems": {"counts": {}, "records": []},
               "versions": {"candidate": {"source": "<b>x</b>", "version_id": "v", "decisions": {
                   d: 0 for d in ("block", "steer", "alert", "log", "allow")},
                   "rates": {d: 0.0 for d in ("block", "steer", "alert", "log", "allow")},
                   "rules": [{"rule": "r<script>", "mode": "enforce", "action": "block", "conversations": 1,
                              "tokens": 1, "rate": 1.0, "would_block": 1, "would_alert": 0, "would_steer": 0,
                              "examples": [{"key": "k", "id": "i", "text_sha256": "sha256:0", "turn": 1,
                                            "scope": "response", "token": 0, "activation": 1.0,
                                            "messages": [{"role": "user", "content": "<img src=x>"}]}]}]}}}
    page = render_html(summary, tmp_path / "r.html").read_text()
    assert "<script" not in page and "<img" not in page and "&lt;img src=x&gt;" in page


def test_cli_refuses_an_unknown_dtype_in_one_line(tmp_path):
    """``--dtype`` other than float32/bfloat16: exit 2 and one line naming the option and the
    valid values, before the model is loaded."""
    out, err = io.StringIO(), io.StringIO()
    status = main(["backtest", "--data", str(DATA), "--dtype", "float16", "--no-progress",
                   "--out", str(tmp_path / "r")], out=out, err=err)
    assert status == 2
    assert "--dtype" in err.getvalue() and "float32, bfloat16" in err.getvalue() and "'float16'" in err.getvalue()
    assert "Traceback" not in err.getvalue() and not (tmp_path / "r").exists()
