"""Monitored generation behind the API: usage counts, audit failures, abandoned streams."""

from __future__ import annotations

import functools
import http.client as httpclient
import json
import threading
import time

import pytest
import structlog
import torch

from tests.test_serve import EVERYWHERE_SHADOW, LONG, LONG_PROMPT_BLOCK, SHORT, http, make_monitor, wait_for

# Blocks at the third response token: a block that fires mid-response.
THIRD_TOKEN_BLOCK = """
  - id: third_token.block
    description: Blocks once three response tokens have been generated
    severity: high
    scope: response
    when: {feature: test.everywhere, above: -1.0, aggregate: {consecutive: {tokens: 3}}}
    actions: [{block: {message: "Blocked mid-response."}}]
"""


def count_forward_calls(model, delay: float = 0.0, suppress_eos: int | None = None) -> list[int]:
    """Wrap ``model.forward``: count calls, optionally sleep, optionally never choose EOS."""
    calls: list[int] = []
    original = model.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        calls.append(1)
        if delay:
            time.sleep(delay)
        out = original(*args, **kwargs)
        if suppress_eos is not None:
            out.logits[..., suppress_eos] = -1e4
        return out

    model.forward = forward
    return calls


def test_usage_counts_generated_tokens_the_same_way_streamed_or_not(tmp_path):
    from openai import OpenAI

    from monitor.serve import ServerThread, create_app

    monitor = make_monitor(tmp_path, THIRD_TOKEN_BLOCK)
    eos = monitor.model.generation_config.eos_token_id
    calls = count_forward_calls(monitor.model, suppress_eos=eos)
    with ServerThread(create_app(monitor, model_name="tiny")) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        args = dict(model="tiny", messages=[{"role": "user", "content": SHORT}], max_tokens=12,
                    temperature=0)
        plain = client.chat.completions.create(**args)
        plain_calls = len(calls)
        chunks = list(client.chat.completions.create(**args, stream=True,
                                                     stream_options={"include_usage": True}))
    monitor.close()
    assert plain.choices[0].finish_reason == "content_filter"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] \
        == ["content_filter"]
    streamed = chunks[-1].usage
    assert streamed.completion_tokens == plain.usage.completion_tokens
    assert streamed.prompt_tokens == plain.usage.prompt_tokens
    # what was generated: one sampled token per forward pass that produced logits for sampling
    # (the prefill and each decode step; generate() then feeds the last token once more, no sample)
    assert 3 <= plain.usage.completion_tokens <= plain_calls
    assert plain.usage.completion_tokens <= 4  # the block stopped generation at the 3rd token


def test_an_unwritable_audit_log_fails_closed_with_json_503(tmp_path):
    import openai
    from openai import OpenAI

    from monitor.audit import AuditTrail
    from monitor.serve import ServerThread, create_app

    unwritable = tmp_path / "audit.jsonl"
    unwritable.mkdir()  # a directory where the file should be: every write fails (even as root)
    monitor = make_monitor(tmp_path, LONG_PROMPT_BLOCK, EVERYWHERE_SHADOW)
    app = create_app(monitor, model_name="tiny", audit_trail=AuditTrail(unwritable))
    errors = app.state.metrics.requests.labels(outcome="error")
    with structlog.testing.capture_logs() as logs, ServerThread(app) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        blocked = [{"role": "user", "content": LONG}]
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(model="tiny", messages=blocked, max_tokens=4)
        assert err.value.status_code == 503 and err.value.code == "audit_unavailable"
        assert err.value.response.headers["content-type"] == "application/json"
        with pytest.raises(openai.APIError, match="audit log"):
            list(client.chat.completions.create(model="tiny", messages=blocked, max_tokens=4, stream=True))
        # no decision to record: served as usual
        ok = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": SHORT}],
                                            max_tokens=2)
        assert ok.choices[0].finish_reason in ("stop", "length")
    monitor.close()
    assert errors._value.get() == 2
    failures = [e for e in logs if e["event"] == "audit_write_failed"]
    assert len(failures) == 2 and failures[0]["rules"] == ["long_prompt.block"]
    assert failures[0]["log_level"] == "error"


def test_a_disconnected_stream_is_cancelled_and_frees_the_only_slot(tmp_path):
    from monitor.serve import ServerThread, create_app

    monitor = make_monitor(tmp_path, EVERYWHERE_SHADOW)
    eos = monitor.model.generation_config.eos_token_id
    calls = count_forward_calls(monitor.model, delay=0.05, suppress_eos=eos)
    app = create_app(monitor, model_name="tiny", max_concurrent=1)
    with ServerThread(app) as server, structlog.testing.capture_logs() as logs:
        conn = httpclient.HTTPConnection(server.host, server.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", json.dumps({
            "model": "tiny", "messages": [{"role": "user", "content": SHORT}], "max_tokens": 80,
            "temperature": 0, "stream": True}), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        assert b'"role": "assistant"' in response.readline()  # the stream has begun
        assert wait_for(lambda: len(calls) >= 6)  # generation is well under way
        response.close()
        conn.close()  # the client goes away mid-stream
        at_disconnect = len(calls)
        started = time.monotonic()
        status, payload = http("POST", server.url + "/v1/chat/completions", json.dumps({
            "model": "tiny", "messages": [{"role": "user", "content": SHORT}], "max_tokens": 2,
            "temperature": 0}).encode(), {"Content-Type": "application/json"})
        waited = time.monotonic() - started
    monitor.close()
    assert status == 200 and payload["usage"]["completion_tokens"] == 2
    # the abandoned generation stopped within a few steps instead of running to 80 tokens
    assert len(calls) - at_disconnect <= 12, (at_disconnect, len(calls), waited)
    cancelled = [e for e in logs if e["event"] == "stream_cancelled"]
    assert len(cancelled) == 1 and cancelled[0]["tokens_generated"] < 20
    completed = [e for e in logs if e["event"] == "request_completed"]
    assert len(completed) == 2  # the cancelled request is still logged (and counted)
