"""The audit trail: one durable JSON line per block/steer, rotation-safe and thread-safe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import torch

from monitor.audit import AuditTrail, decisions
from monitor.policy import Hit, SteerDirective
from monitor.report import BlockInfo, Report
from tests.test_serve import LONG, LONG_PROMPT_BLOCK, SHORT, STEER_FIRST, make_monitor

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"time", "request_id", "rule", "action", "scope", "row", "token_index", "feature",
          "activation", "policy_version"}


def report(request_id: str = "req-1") -> Report:
    return Report(
        request_id=request_id, policy_version="v3",
        hits=[Hit("b", 0, 4, "response", "enforce", "high", ("block",), "test.everywhere", 2.0),
              Hit("s", 1, 0, "response", "enforce", "low", ("steer",), "latent:1", float("nan"))],
        blocks={0: BlockInfo(0, "b", "no", "response", 4)},
        steers=[SteerDirective(1, "s", 1, None, "scale", 0.5, "while_active", 0, "response")])


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_line_per_decision_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = tmp_path / "audit" / "decisions.jsonl"
    with AuditTrail(path) as trail:
        trail(Report(request_id="quiet", policy_version="v3"))
        assert not path.exists()  # no decision, no file
        trail(report())
    block, steer = lines(path)
    assert set(block) == FIELDS and block["action"] == "block" and block["rule"] == "b"
    assert block["feature"] == "test.everywhere" and block["activation"] == 2.0
    assert block["token_index"] == 4 and block["scope"] == "response" and block["policy_version"] == "v3"
    assert block["time"].endswith("+00:00")
    assert steer["action"] == "steer" and steer["activation"] is None  # NaN is not valid JSON
    assert (steer["target"], steer["op"], steer["value"], steer["duration"]) == ("latent:1", "scale", 0.5, "while_active")
    assert len(synced) >= 2  # one fsync per decision (plus the new file's directory)
    assert [d.action for d in decisions(report())] == ["block", "steer"]


def test_line_survives_sigkill_right_after_the_callback(tmp_path):
    """A real monitored request is blocked; the next callback SIGKILLs the process at once."""
    path = tmp_path / "audit.jsonl"
    script = textwrap.dedent(f"""
        import os, signal
        import torch
        from monitor.audit import AuditTrail
        from monitor.testing import rule_yaml, tiny_monitor
        trail = AuditTrail({str(path)!r})
        kill = lambda report: os.kill(os.getpid(), signal.SIGKILL)
        rules = rule_yaml(rule_id="long_prompt.block", above=-1.0, scope="prompt")
        monitor = tiny_monitor(rules=rules, callbacks=[trail, kill])
        ids = torch.tensor([monitor.tokenizer("a prompt long enough to monitor")["input_ids"]])
        monitor.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=monitor.tokenizer.pad_token_id)
        print("not killed")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert "not killed" not in done.stdout
    (entry,) = lines(path)
    assert entry["action"] == "block" and entry["rule"] == "long_prompt.block" and entry["scope"] == "prompt"


def test_rotation_by_rename_and_by_delete(tmp_path):
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path)
    trail(report("first"))
    path.rename(tmp_path / "audit.jsonl.1")  # logrotate: rename, the writer must reopen
    trail(report("second"))
    assert [e["request_id"] for e in lines(tmp_path / "audit.jsonl.1")] == ["first", "first"]
    assert [e["request_id"] for e in lines(path)] == ["second", "second"]
    path.unlink()
    trail(report("third"))
    assert [e["request_id"] for e in lines(path)] == ["third", "third"]
    path.write_text("")  # copytruncate: appends continue at the new end
    trail(report("fourth"))
    assert [e["request_id"] for e in lines(path)] == ["fourth", "fourth"]
    trail.close()


def test_concurrent_writers_and_rotation_lose_nothing(tmp_path):
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path)
    barrier = threading.Barrier(6)

    def work(n: int) -> None:
        barrier.wait()
        for i in range(40):
            trail(report(f"t{n}-{i}"))
            if n == 0 and i == 20:
                path.rename(tmp_path / "audit.jsonl.1")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    trail.close()
    entries = lines(tmp_path / "audit.jsonl.1") + lines(path)
    assert len(entries) == 6 * 40 * 2
    ids = [e["request_id"] for e in entries]
    assert sorted(set(ids)) == sorted(f"t{n}-{i}" for n in range(6) for i in range(40))


def test_real_monitor_block_and_steer(tmp_path):
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path)
    monitor = make_monitor(tmp_path, LONG_PROMPT_BLOCK, STEER_FIRST, callbacks=[trail])
    for text in (SHORT, LONG):
        ids = torch.tensor([monitor.tokenizer(text)["input_ids"]])
        monitor.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=monitor.tokenizer.pad_token_id)
    steer, block = lines(path)
    assert steer["action"] == "steer" and steer["rule"] == "latent1.steer" and steer["feature"] == "latent:1"
    assert steer["token_index"] == 0 and steer["scope"] == "response" and steer["target"] == "latent:1"
    assert block["action"] == "block" and block["feature"] == "test.everywhere"
    assert block["token_index"] == 40  # position 0 is not monitored; the 40th monitored token fires
    assert {steer["policy_version"], block["policy_version"]} == {monitor.policy.version_id}
    assert steer["request_id"] != block["request_id"]
    monitor.close()
    trail.close()
