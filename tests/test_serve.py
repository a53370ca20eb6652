"""The OpenAI-compatible service, end to end: the official ``openai`` client against a real
uvicorn server on 127.0.0.1 serving a tiny random model under real policies.

The helpers at the top (tiny SAE, catalog, policies, monitor) are shared by the other
observability tests.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from monitor.catalog import Catalog, FeatureEntry
from monitor.policy import PolicyStore
from monitor.sae import SAE
from monitor.runtime.hf import Monitor
from monitor.testing import tied_sae, tiny_model, tiny_tokenizer

LAYER = 2
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CATALOG = Catalog(sae="tiny-test-sae", layer=LAYER, features=(
    FeatureEntry(name="test.everywhere", latent=0, description="ReLU latent, always >= 0",
                 max_activation=10.0),))
BLOCK_MESSAGE = "Request blocked by policy."
SHORT = "Hello there"
LONG = "Please " + "tell me everything about it " * 3  # > 40 monitored prompt tokens
CANARY = "zebra-canary-7731"

# Latent 0 is a ReLU (>= 0), so "above -1" holds at every token: `consecutive 40` in the prompt
# fires exactly when the prompt has 40 monitored tokens, i.e. long prompts are blocked.
LONG_PROMPT_BLOCK = f"""
  - id: long_prompt.block
    description: Blocks prompts of 40 or more monitored tokens
    severity: high
    scope: prompt
    when: {{feature: test.everywhere, above: -1.0, aggregate: {{consecutive: {{tokens: 40}}}}}}
    actions: [log, metric, alert, {{block: {{message: "{BLOCK_MESSAGE}"}}}}]
"""
EVERYWHERE_SHADOW = """
  - id: everywhere.shadow
    description: Fires on every token, never acts
    severity: info
    mode: shadow
    scope: both
    when: {feature: test.everywhere, above: -1.0}
    actions: [metric]
"""
STEER_FIRST = """
  - id: latent1.steer
    description: Clamps latent 1 from the first response token on
    severity: medium
    scope: response
    allow_always_true: true
    when: {latent: 1, above: -1.0}
    actions: [log, {steer: {latent: 1, clamp: 0.0, duration: rest_of_response}}]
"""
RAW_LATENT_SHADOW = """
  - id: raw_latent.shadow
    description: A raw latent rule (its feature label is latent:3)
    severity: low
    mode: shadow
    scope: response
    when: {latent: 3, above: -1.0}
    actions: [log]
"""


def policies_yaml(*rules: str) -> str:
    return "version: 'test'\nrules:" + "".join(rules)


def make_sae() -> SAE:
    return tied_sae(LAYER)


def chat_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_monitor(tmp_path: Path, *rules: str, **options) -> Monitor:
    """A Monitor over a tiny llama whose policies live in ``tmp_path/policies/p.yaml``."""
    directory = tmp_path / "policies"
    directory.mkdir(exist_ok=True)
    (directory / "p.yaml").write_text(policies_yaml(*rules))
    store = PolicyStore(directory, CATALOG, 16)
    return Monitor(tiny_model("llama"), chat_tokenizer(), sae=make_sae(), policies=store,
                   catalog=CATALOG, self_test=False, **options)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON or text) without raising on 4xx/5xx."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw, ctype = response.status, response.read(), response.headers.get("content-type", "")
    except urllib.error.HTTPError as err:
        status, raw, ctype = err.code, err.read(), err.headers.get("content-type", "")
    return status, (json.loads(raw) if "json" in ctype else raw.decode())


# ============================================================================ fixtures


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(monitor, app, server, client) with a long-prompt block rule and a shadow rule."""
    from openai import OpenAI

    from monitor.serve import ServerThread, create_app

    tmp = tmp_path_factory.mktemp("serve")
    monitor = make_monitor(tmp, LONG_PROMPT_BLOCK, EVERYWHERE_SHADOW)
    app = create_app(monitor, model_name="tiny-llama", admin_token=None)
    with ServerThread(app) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="not-used", max_retries=0, timeout=60)
        yield monitor, app, server, client
    monitor.close()


def greedy_text(monitor: Monitor, content: str, max_new_tokens: int = 8) -> str:
    ids = monitor.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    prompt = torch.tensor([list(ids)])
    with torch.no_grad():
        out = monitor.model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                     max_new_tokens=max_new_tokens,
                                     pad_token_id=monitor.tokenizer.pad_token_id)
    return monitor.tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)


# ============================================================================ tests


def test_plain_completion_matches_greedy_generation(served):
    monitor, app, _, client = served
    response = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": SHORT}], max_tokens=8, temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == greedy_text(monitor, SHORT)
    assert choice.finish_reason in ("stop", "length")
    assert response.model == "tiny-llama" and response.object == "chat.completion"
    assert response.usage.completion_tokens <= 8 and response.usage.prompt_tokens > 0
    assert monitor.policy.version_id[:16] in response.system_fingerprint


def test_streaming_yields_the_same_text(served):
    monitor, _, _, client = served
    stream = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": SHORT}], max_tokens=8,
        temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert content == greedy_text(monitor, SHORT)
    assert finishes in (["stop"], ["length"])
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0
    assert len({c.id for c in chunks}) == 1


def test_blocked_request_is_a_content_filter_completion(served):
    _, app, _, client = served
    blocks = app.state.metrics.blocks.labels(rule="long_prompt.block")
    before = blocks._value.get()
    response = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": LONG}], max_tokens=8, temperature=0)
    assert response.choices[0].finish_reason == "content_filter"
    assert response.choices[0].message.content == BLOCK_MESSAGE
    assert blocks._value.get() == before + 1


def test_blocked_stream_ends_with_the_message(served):
    _, _, _, client = served
    chunks = list(client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": LONG}], max_tokens=8,
        temperature=0, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == BLOCK_MESSAGE  # a prompt block: nothing was generated before it
    assert chunks[-1].choices[0].finish_reason == "content_filter"


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "not valid JSON"),
    (json.dumps({"messages": []}).encode(), "messages"),
    (json.dumps({"model": "x"}).encode(), "messages"),
    (json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(), "role"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 2}).encode(), "n=1"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "stop": ["\n"]}).encode(), "stop"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}).encode(),
     "content"),
])
def test_malformed_requests_get_a_clear_400(served, body, fragment):
    _, _, server, _ = served
    status, payload = http("POST", server.url + "/v1/chat/completions", body,
                           {"Content-Type": "application/json"})
    assert status == 400
    assert payload["error"]["type"] == "invalid_request_error"
    assert fragment in payload["error"]["message"]


def test_context_overflow_and_openai_client_errors(served):
    import openai

    _, _, _, client = served
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": SHORT}],
                                       max_tokens=120)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-llama", messages=[])
    assert "messages" in err.value.message
    status, payload = http("GET", served[2].url + "/v1/nope")
    assert status == 404 and payload["error"]["type"] == "not_found_error"


def test_healthz_and_metrics(served):
    monitor, _, server, client = served
    status, payload = http("GET", server.url + "/healthz")
    assert status == 200 and payload == {"status": "ok", "model": "tiny-llama",
                                         "policy_version": monitor.policy.version_id}
    client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": SHORT}],
                                   max_tokens=4, temperature=0)
    status, text = http("GET", server.url + "/metrics")
    assert status == 200
    assert 'sae_monitor_requests_total{outcome="allowed"}' in text
    assert 'sae_monitor_rule_triggers_total{action="metric",mode="shadow",rule="everywhere.shadow",severity="info"}' in text
    assert f'policy_version="{monitor.policy.version_id}"' in text and 'sae="tiny-test-sae"' in text
    assert "process_cpu_seconds_total" in text or "python_info" in text
    request = urllib.request.Request(server.url + "/metrics",
                                     headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["content-type"].startswith("application/openmetrics-text")
        assert response.read().decode().rstrip().endswith("# EOF")


def test_generation_does_not_block_the_event_loop(tmp_path):
    """While a generation is stuck in a worker thread, /healthz and /metrics still answer."""
    from openai import OpenAI

    from monitor.serve import ServerThread, create_app

    entered, release = threading.Event(), threading.Event()

    def slow_callback(_report):
        entered.set()
        release.wait(30)

    monitor = make_monitor(tmp_path, EVERYWHERE_SHADOW, callbacks=[slow_callback])
    with ServerThread(create_app(monitor)) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        result = {}
        caller = threading.Thread(target=lambda: result.setdefault("r", client.chat.completions.create(
            model="sae-monitor", messages=[{"role": "user", "content": SHORT}], max_tokens=4, temperature=0)))
        caller.start()
        try:
            assert entered.wait(30), "the generation never reached the callback"
            started = time.monotonic()
            assert http("GET", server.url + "/healthz")[0] == 200
            assert http("GET", server.url + "/metrics")[0] == 200
            assert time.monotonic() - started < 5
        finally:
            release.set()
            caller.join(30)
        assert result["r"].choices[0].finish_reason in ("stop", "length")
    monitor.close()


def test_admin_reload_and_sighup(tmp_path):
    from monitor.serve import ServerThread, create_app, install_reload_signal

    monitor = make_monitor(tmp_path, EVERYWHERE_SHADOW)
    app = create_app(monitor, admin_token="s3cret")
    reloads = app.state.metrics.reloads
    policy_file = tmp_path / "policies" / "p.yaml"
    first = monitor.policy.version_id
    with ServerThread(app) as server:
        url = server.url + "/admin/reload"
        auth = {"Authorization": "Bearer s3cret"}
        assert http("POST", url)[0] == 401
        policy_file.write_text(policies_yaml(EVERYWHERE_SHADOW, LONG_PROMPT_BLOCK))
        status, body = http("POST", url, headers=auth)
        assert status == 200 and body["ok"] and body["changed"] and body["version_id"] != first
        assert monitor.policy.version_id == body["version_id"]
        assert [r.id for r in monitor.policy.rules] == ["everywhere.shadow", "long_prompt.block"]
        second = body["version_id"]

        policy_file.write_text(policies_yaml(EVERYWHERE_SHADOW).replace("above: -1.0", "abvoe: -1.0"))
        status, body = http("POST", url, headers=auth)
        assert status == 422 and not body["ok"] and "abvoe" in body["error"]
        assert monitor.policy.version_id == second  # the last good policy stays
        assert reloads.labels(result="success")._value.get() == 1
        assert reloads.labels(result="failure")._value.get() == 1
        _, text = http("GET", server.url + "/metrics")
        assert 'sae_monitor_policy_reloads_total{result="failure"} 1.0' in text
        assert f'policy_version="{second}"' in text

        policy_file.write_text(policies_yaml(EVERYWHERE_SHADOW))
        previous = install_reload_signal(monitor)
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            assert wait_for(lambda: reloads.labels(result="success")._value.get() == 2)
        finally:
            signal.signal(signal.SIGHUP, previous)
        assert monitor.policy.version_id == first
    monitor.close()


def test_reload_without_policy_files_is_409(tmp_path):
    from monitor.policy import compile_policies, load_policies
    from monitor.serve import ServerThread, create_app

    (tmp_path / "p.yaml").write_text(policies_yaml(EVERYWHERE_SHADOW))
    fixed = compile_policies(load_policies(tmp_path / "p.yaml", CATALOG, d_sae=16), CATALOG, d_sae=16)
    monitor = Monitor(tiny_model("llama"), chat_tokenizer(), sae=make_sae(), policies=fixed,
                      catalog=CATALOG, self_test=False)
    with ServerThread(create_app(monitor)) as server:
        status, body = http("POST", server.url + "/admin/reload")
        assert status == 409 and "nothing to reload" in body["error"]["message"]
    monitor.close()


def test_create_app_refuses_a_tokenizer_without_chat_template(tmp_path):
    from monitor.errors import MonitorError
    from monitor.serve import create_app

    monitor = make_monitor(tmp_path, EVERYWHERE_SHADOW)
    monitor.tokenizer.chat_template = None
    with pytest.raises(MonitorError, match="chat template"):
        create_app(monitor)
    monitor.close()


def test_serve_model_process_logs_audits_reloads_on_sighup_and_stops_on_sigterm(tmp_path):
    """What ``sae-monitor serve`` runs, as its own process: model, SAE, catalog and policies
    from disk, JSON logs on stdout, an audit file, SIGHUP reloads (one sent while the model
    loads is queued, not fatal), SIGTERM stops cleanly."""
    import subprocess
    import sys

    import yaml

    root = Path(__file__).resolve().parent.parent
    model_dir, sae_dir, policy_dir = tmp_path / "model", tmp_path / "sae", tmp_path / "policies"
    tiny_model("llama").save_pretrained(model_dir)
    chat_tokenizer().save_pretrained(model_dir)
    make_sae().save(sae_dir)
    policy_dir.mkdir()
    (policy_dir / "p.yaml").write_text(policies_yaml(LONG_PROMPT_BLOCK))
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump(CATALOG.model_dump(mode="json")))
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (f"from monitor.serve import serve_model\n"
            f"serve_model({str(model_dir)!r}, sae={str(sae_dir)!r}, policies=[{str(policy_dir)!r}], "
            f"catalog={str(catalog)!r}, port={port}, audit_log={str(tmp_path / 'audit.jsonl')!r}, "
            f"self_test=False, log_level='info')\n")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    try:
        # SIGHUP while the model is still loading: queued, then run once the monitor exists
        assert wait_for(lambda: any('"serve_loading"' in line for line in lines), timeout=120), \
            "serve_model never logged serve_loading"
        process.send_signal(signal.SIGHUP)
        def up() -> bool:
            assert process.poll() is None, process.communicate()[1]
            try:
                return http("GET", url + "/healthz")[0] == 200
            except OSError:
                return False

        assert wait_for(up, timeout=120, interval=0.2)
        body = json.dumps({"model": "model", "messages": [{"role": "user", "content": CANARY + LONG[:60]}],
                           "max_tokens": 4}).encode()
        status, payload = http("POST", url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        assert status == 200 and payload["choices"][0]["finish_reason"] == "content_filter"
        assert payload["model"] == "model"
        (policy_dir / "p.yaml").write_text(policies_yaml(LONG_PROMPT_BLOCK, EVERYWHERE_SHADOW))
        process.send_signal(signal.SIGHUP)
        assert wait_for(lambda: 'sae_monitor_policy_reloads_total{result="success"} 2.0'
                        in http("GET", url + "/metrics")[1], timeout=30)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(10)
        stdout, stderr = "".join(lines), process.stderr.read()
    # uvicorn shuts down gracefully, then re-raises the signal (exit status of SIGTERM).
    assert process.returncode in (0, -signal.SIGTERM), stderr
    assert "Application shutdown complete" in stderr
    events = [json.loads(line) for line in stdout.splitlines()]
    names = [e["event"] for e in events]
    for name in ("serve_loading", "policy_reload_signal_queued_run", "serve_starting", "rule_hit",
                 "request_blocked", "request_completed", "policy_reload_succeeded"):
        assert name in names
    assert CANARY not in stdout
    (audit,) = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert audit["rule"] == "long_prompt.block" and audit["action"] == "block"


def test_a_monitor_that_fails_closed_answers_503(tmp_path, monkeypatch):
    import openai
    from openai import OpenAI

    from monitor.serve import ServerThread, create_app

    monitor = make_monitor(tmp_path, LONG_PROMPT_BLOCK, on_error="closed")

    def broken(self, _resid):
        raise RuntimeError("SAE exploded")

    monkeypatch.setattr("monitor.runtime.encoder.FeatureEncoder.encode", broken)
    app = create_app(monitor)
    with ServerThread(app) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": SHORT}]
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(model="sae-monitor", messages=messages, max_tokens=4)
        assert err.value.status_code == 503 and err.value.code == "monitor_unavailable"
        with pytest.raises(openai.APIError, match="unavailable"):
            list(client.chat.completions.create(model="sae-monitor", messages=messages, max_tokens=4, stream=True))
    assert app.state.metrics.requests.labels(outcome="error")._value.get() == 2
    monitor.close()
