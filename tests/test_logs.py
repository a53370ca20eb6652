"""Structured decision logs: events and fields (structlog's capture_logs), real JSON output,
text privacy by default, and no logging configuration at import."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys

import pytest
import structlog
import torch
from structlog.testing import capture_logs

from monitor.logs import HashText, ReportLogger, configure_json_logging, text_digest
from monitor.policy import Hit, ReloadResult, SteerDirective
from monitor.report import BlockInfo, Report
from tests.test_serve import (
    CANARY,
    EVERYWHERE_SHADOW,
    LONG,
    LONG_PROMPT_BLOCK,
    STEER_FIRST,
    make_monitor,
    policies_yaml,
)


@pytest.fixture
def restore_structlog():
    saved = structlog.get_config()
    yield
    structlog.reset_defaults()
    structlog.configure(**saved)


def report() -> Report:
    return Report(
        request_id="req-42", policy_version="v7",
        hits=[Hit("b.rule", 0, 5, "prompt", "enforce", "high", ("log", "alert", "block"), "test.everywhere", 3.5),
              Hit("m.rule", 0, 6, "prompt", "shadow", "info", ("metric",), "latent:9", 0.5),
              Hit("s.rule", 1, 0, "response", "enforce", "medium", ("log", "steer"), "latent:1", 1.25)],
        blocks={0: BlockInfo(0, "b.rule", "no", "prompt", 5)},
        steers=[SteerDirective(1, "s.rule", 1, None, "clamp", 0.0, "rest_of_response", 0, "response")],
        row_outcomes=["blocked", "steered"])


def test_one_event_per_hit_block_and_steer():
    with capture_logs() as logs:
        ReportLogger()(report())
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("rule_hit", "error"),  # alert action -> error level
        ("rule_hit", "debug"),  # metric only -> debug
        ("rule_hit", "info"),  # log action -> info
        ("request_blocked", "error"),  # the blocking rule alerts
        ("request_steered", "info"),
    ]
    first = logs[0]
    assert {k: first[k] for k in ("request_id", "rule", "action", "mode", "feature", "activation",
                                  "token_index", "scope", "severity", "policy_version", "alert")} == {
        "request_id": "req-42", "rule": "b.rule", "action": ["log", "alert", "block"], "mode": "enforce",
        "feature": "test.everywhere", "activation": 3.5, "token_index": 5, "scope": "prompt",
        "severity": "high", "policy_version": "v7", "alert": True}
    blocked, steered = logs[3], logs[4]
    assert blocked["action"] == "block" and blocked["feature"] == "test.everywhere" and blocked["activation"] == 3.5
    assert steered["action"] == "steer" and steered["rule"] == "s.rule" and steered["token_index"] == 0
    assert steered["feature"] == "latent:1" and steered["target"] == "latent:1" and steered["op"] == "clamp"
    assert not any(k in e for e in logs for k in ("prompt", "response", "text"))


def test_reload_events(tmp_path):
    monitor = make_monitor(tmp_path, EVERYWHERE_SHADOW)
    logger = ReportLogger().attach(monitor)
    ReportLogger.attach(logger, monitor)  # idempotent
    assert monitor.callbacks.count(logger) == 1
    with capture_logs() as logs:
        (tmp_path / "policies" / "p.yaml").write_text(policies_yaml(EVERYWHERE_SHADOW, STEER_FIRST))
        good = monitor.reload_policies()
        (tmp_path / "policies" / "p.yaml").write_text("version: 1\nrules: [{id: x}]\n")
        monitor.reload_policies()
    ours = [e for e in logs if e["event"] in ("policy_reload_succeeded", "policy_reload_failed")]
    assert [(e["event"], e["log_level"]) for e in ours] == [
        ("policy_reload_succeeded", "info"), ("policy_reload_failed", "error")]
    assert ours[0]["version_id"] == good.version_id and ours[0]["changed"] is True
    assert "x" in ours[1]["error"] and ours[1]["version_id"] == good.version_id
    with capture_logs() as logs:
        logger.observe_reload(ReloadResult(True, None, "v", False))
    assert logs == [{"event": "policy_reload_succeeded", "log_level": "info", "version_id": "v", "changed": False}]
    monitor.close()


def test_real_json_lines_from_a_monitored_request(tmp_path, restore_structlog):
    stream = io.StringIO()
    configure_json_logging(stream)
    monitor = make_monitor(tmp_path, LONG_PROMPT_BLOCK, EVERYWHERE_SHADOW)
    logger = ReportLogger().attach(monitor)
    prompt = f"{CANARY} {LONG}"
    ids = torch.tensor([monitor.tokenizer(prompt)["input_ids"]])
    monitor.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                     pad_token_id=monitor.tokenizer.pad_token_id)
    report = monitor.last_report
    logger.request_completed(report, prompt=prompt, response="a response")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    events = [e["event"] for e in lines]
    assert events.count("request_blocked") == 1 and events[-1] == "request_completed"
    assert "rule_hit" in events  # the alerting block rule's hit (shadow metric-only hits are debug)
    assert all(e["rule"] != "everywhere.shadow" for e in lines if e["event"] == "rule_hit")
    blocked = next(e for e in lines if e["event"] == "request_blocked")
    assert blocked["level"] == "error" and blocked["rule"] == "long_prompt.block"
    assert blocked["request_id"] == report.request_id and blocked["feature"] == "test.everywhere"
    assert blocked["timestamp"].endswith("Z")
    done = lines[-1]
    assert done["prompt_sha256"] == "sha256:" + hashlib.sha256(prompt.encode()).hexdigest()
    assert done["response_sha256"] == text_digest("a response") and done["outcome"] == "blocked"
    assert CANARY not in stream.getvalue() and "a response" not in stream.getvalue()
    monitor.close()


def test_text_is_opt_in_and_redactable(restore_structlog):
    def redact_emails(_logger, _method, event_dict):
        for key in ("prompt", "response"):
            if isinstance(event_dict.get(key), str):
                event_dict[key] = event_dict[key].replace("alice@example.com", "[email]")
        return event_dict

    stream = io.StringIO()
    configure_json_logging(stream, processors=[redact_emails], log_text=True)
    ReportLogger(log_text=True).request_completed(report(), prompt="mail alice@example.com", response="ok")
    line = json.loads(stream.getvalue())
    assert line["prompt"] == "mail [email]" and line["response"] == "ok"

    # An emitter that passes text cannot leak it through a log_text=False configuration.
    stream = io.StringIO()
    configure_json_logging(stream)
    ReportLogger(log_text=True).request_completed(report(), prompt="secret words", response=None)
    line = json.loads(stream.getvalue())
    assert "prompt" not in line and line["prompt_sha256"] == text_digest("secret words")
    assert "secret" not in stream.getvalue()

    # No text and no hash at all.
    with capture_logs() as logs:
        ReportLogger(text_hash=False).request_completed(report(), prompt="p", response="r")
    assert not {"prompt", "response", "prompt_sha256", "response_sha256"} & set(logs[0])


def test_level_filter_and_hash_processor(restore_structlog):
    stream = io.StringIO()
    configure_json_logging(stream, level="warning")
    ReportLogger()(report())
    assert [json.loads(x)["event"] for x in stream.getvalue().splitlines()] == ["rule_hit", "request_blocked"]
    event = HashText()(None, "info", {"event": "x", "messages": [{"role": "user", "content": "hi"}]})
    assert event == {"event": "x", "messages_sha256": text_digest([{"role": "user", "content": "hi"}])}


def test_importing_the_package_configures_no_logging():
    code = ("import structlog, logging\n"
            "import monitor.logs, monitor.metrics, monitor.audit, monitor.serve\n"
            "assert not structlog.is_configured(), 'structlog configured at import'\n"
            "assert not logging.getLogger().handlers, 'root logging handlers added at import'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
