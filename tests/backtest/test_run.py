"""The local runner: results on disk, resume after a kill, versions from git, summary and diff."""

from __future__ import annotations

import json
import subprocess

import pyarrow.parquet as pq
import pytest

from monitor.backtest.policies import resolve
from monitor.backtest.results import ResultStore
from monitor.backtest.run import BacktestConfig, run_backtest
from monitor.errors import DataError
from tests.backtest.helpers import quantile_threshold, rule_yaml, short_conversations, tiny_parts, write_jsonl, write_policy


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


@pytest.fixture
def job(tmp_path):
    rows = short_conversations(20)
    data = write_jsonl(tmp_path / "logs.jsonl", rows[:10] + ["{broken"] + rows[10:])
    parts = tiny_parts()
    msgs = [r["messages"] for r in rows]
    lo, hi, alert = (quantile_threshold(parts, msgs, 3, 0.8), quantile_threshold(parts, msgs, 3, 0.9),
                     quantile_threshold(parts, msgs, 5, 0.95))
    cand = write_policy(tmp_path / "cand", rule_yaml("r.block", 3, lo), rule_yaml("r.alert", 5, alert, actions="[alert]"))
    old = write_policy(tmp_path / "old", rule_yaml("r.block", 3, hi))
    return data, cand, old


def config(tmp_path, job, out="out", **kw):
    data, cand, old = job
    return BacktestConfig(data=[str(data)], policies=str(cand), against=str(old), out=str(tmp_path / out),
                          batch_size=4, chunk_size=5, **kw)


def strip(rows):
    return [{k: v for k, v in r.items()} for r in rows]


def test_killed_run_resumes_without_loss_or_duplicates(parts, tmp_path, job):
    full = run_backtest(config(tmp_path, job, "full"), parts)
    assert len(full.rows) == 21 and full.summary["skipped"] == 1
    seen = []

    def kill_after_two_chunks(records, tokens):
        seen.append(records)
        if len(seen) == 2:
            raise Killed

    with pytest.raises(Killed):
        run_backtest(config(tmp_path, job, "killed"), parts, progress=kill_after_two_chunks)
    out = tmp_path / "killed"
    # a crash between writing a chunk and committing it: a stray chunk and a torn manifest line
    (out / "chunks" / "part-00099.parquet").write_bytes(b"partial")
    with open(out / "manifest.jsonl", "a") as f:
        f.write('{"chunk": "part-00002.parquet", "keys": ["x"')
    counted = []
    resumed = run_backtest(config(tmp_path, job, "killed"), parts, progress=lambda n, t: counted.append(n))
    assert sum(counted) == 21 - 10  # only the records not committed before the kill were scanned
    assert strip(resumed.rows) == strip(full.rows)
    assert not (out / "chunks" / "part-00099.parquet").exists()
    assert resumed.summary == full.summary
    table = pq.read_table(out / "conversations.parquet")
    assert table.num_rows == 21 and len(set(table.column("key").to_pylist())) == 21
    firings = pq.read_table(out / "firings.parquet").to_pylist()
    assert {f["version"] for f in firings} == {"candidate", "baseline"}
    assert len((out / "conversations.jsonl").read_text().splitlines()) == 21


def test_resume_refuses_other_policy_versions(parts, tmp_path, job):
    run_backtest(config(tmp_path, job), parts)
    data, cand, old = job
    other = BacktestConfig(data=[str(data)], policies=str(old), out=str(tmp_path / "out"))
    with pytest.raises(DataError, match="other policy versions"):
        run_backtest(other, parts)
    with pytest.raises(DataError, match="--resume|another --out"):
        ResultStore(tmp_path / "out", [{"label": "candidate", "version_id": "x", "source": "y"}], resume=False)


def test_summary_and_diff_agree_with_the_rows(parts, tmp_path, job):
    outcome = run_backtest(config(tmp_path, job), parts)
    rows = [r for r in outcome.rows if r["status"] == "scanned"]
    s = outcome.summary
    cand_blocks = {r["key"] for r in rows if r["candidate_decision"] == "block"}
    base_blocks = {r["key"] for r in rows if r["baseline_decision"] == "block"}
    assert cand_blocks > base_blocks, "the candidate's lower threshold blocks more"
    assert {x["key"] for x in s["diff"]["newly_blocked"]} == cand_blocks - base_blocks
    assert s["diff"]["counts"]["no_longer_blocked"] == 0
    rule = next(r for r in s["versions"]["candidate"]["rules"] if r["rule"] == "r.block")
    assert rule["would_block"] == rule["conversations"] == len(cand_blocks)
    assert rule["rate"] == pytest.approx(len(cand_blocks) / len(rows))
    assert all(set(e) >= {"key", "text_sha256", "turn", "token"} and "messages" not in e for e in rule["examples"])
    assert s["problems"]["counts"] == {"malformed": 1} and s["problems"]["records"][0]["key"].endswith(":11")
    with_text = run_backtest(config(tmp_path, job, "text", include_text=True), parts)
    ex = next(r for r in with_text.summary["versions"]["candidate"]["rules"] if r["rule"] == "r.block")["examples"][0]
    assert ex["messages"][0]["role"] == "user"


def test_against_a_git_revision(parts, tmp_path):
    repo = tmp_path / "repo"
    pol = write_policy(repo / "policies", rule_yaml("r.block", 3, 0.6))

    def git(*a):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *a], cwd=repo, check=True,
                       capture_output=True)

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "v1")
    write_policy(pol, rule_yaml("r.block", 3, 0.35))
    git("commit", "-qam", "v2")
    write_policy(pol, rule_yaml("r.block", 3, 0.2))  # uncommitted working copy: the candidate
    versions = resolve(pol, "HEAD~1", None, 16, workdir=tmp_path / "materialised")
    assert versions[1].source == f"HEAD~1:{pol.as_posix()}"
    assert "0.6" in (tmp_path / "materialised" / "policies" / "p.yaml").read_text()
    assert versions[0].policy.version_id != versions[1].policy.version_id
    from monitor.errors import PolicyError

    with pytest.raises(PolicyError, match="neither a directory nor a revision"):
        resolve(pol, "no-such-rev", None, 16)
    data = write_jsonl(tmp_path / "d.jsonl", short_conversations(6))
    out = run_backtest(BacktestConfig(data=[str(data)], policies=str(pol), against="HEAD", out=str(tmp_path / "o")),
                       parts)
    assert json.loads((tmp_path / "o" / "run.json").read_text())["versions"][1]["source"].startswith("HEAD:")
    assert out.summary["versions"]["baseline"]["version_id"] != out.summary["versions"]["candidate"]["version_id"]


def test_too_long_conversation_is_counted_and_reported_with_file_and_line(parts, tmp_path):
    """Skipped, not windowed: a ``too_long`` row with its length, counted in the summary and
    listed by file:line in the table; the records around it are scanned."""
    from monitor.backtest.report import render_table

    long = {"id": "long", "messages": [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "y"}]}
    data = write_jsonl(tmp_path / "logs.jsonl", short_conversations(3) + [long] + short_conversations(2))
    pol = write_policy(tmp_path / "pol", rule_yaml("r.block", 3, 0.5))
    out = run_backtest(BacktestConfig(data=[str(data)], policies=str(pol), out=str(tmp_path / "o")), parts)
    s = out.summary
    assert (s["records"], s["scanned"], s["skipped"]) == (6, 5, 1)
    assert s["problems"]["counts"] == {"too_long": 1}
    (rec,) = s["problems"]["records"]
    assert rec["key"] == f"{data}:4" and rec["detail"].startswith("322 tokens") and "not windowed" in rec["detail"]
    row = next(r for r in out.rows if r["key"] == rec["key"])
    assert (row["status"], row["problem"], row["replay"]) == ("skipped", "too_long", None)
    table = render_table(s)
    assert "skipped records: too_long 1" in table and f"{data}:4: too_long: 322 tokens" in table


def test_dtype_is_validated_recorded_and_not_mixed_on_resume(parts, tmp_path, job):
    """``BacktestConfig.dtype``: refused when unknown (before any work), written to run.json and
    the summary, and a run directory of one precision is not resumed at another."""
    from monitor.backtest.scan import DtypeError

    with pytest.raises(DtypeError, match="--dtype"):
        config(tmp_path, job, dtype="half")
    outcome = run_backtest(config(tmp_path, job, dtype="bfloat16"), parts)
    assert outcome.summary["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "out" / "run.json").read_text())["dtype"] == "bfloat16"
    assert sum(r["candidate_decision"] == "block" for r in outcome.rows) > 0
    with pytest.raises(DataError, match="--dtype bfloat16"):
        run_backtest(config(tmp_path, job), parts)
