"""The OpenAI-compatible app served by vLLM's engine (``serve --engine vllm``): the same routes,
metrics and reload as the transformers engine, concurrent requests batched by vLLM."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from monitor.runtime.vllm.serve import ServingEngine
from monitor.serve import ServerThread, create_app

pytestmark = pytest.mark.e2e

SHELL = "Write a Python function that runs a shell command given by the user."


@pytest.fixture(scope="module")
def served(vllm_monitor):
    import openai

    engine = ServingEngine(vllm_monitor)
    app = create_app(engine, model_name="default", max_concurrent=16)
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)
        yield engine, app, server, client


def test_concurrent_completions_match_the_engine(served, vllm_monitor):
    _, _, _, client = served
    prompts = ["What is the capital of France?", "Write a haiku about autumn.", "Name three uses of copper."]
    expected = [c.text for c in vllm_monitor.generate(prompts, max_tokens=16)]
    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda p: client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": p}], max_tokens=16, temperature=0), prompts))
    assert [r.choices[0].message.content for r in responses] == expected
    assert all(r.system_fingerprint.startswith("policy-") for r in responses)


def test_blocked_stream_never_sends_the_firing_token_and_ends_with_the_message(served, vllm_monitor):
    _, app, _, client = served
    [reference] = vllm_monitor.generate([SHELL], max_tokens=40)
    assert reference.finish_reason == "blocked"
    block = reference.report.blocks[0]
    blocks = app.state.metrics.blocks.labels(rule=block.rule_id)
    before = blocks._value.get()
    chunks = list(client.chat.completions.create(model="default", messages=[{"role": "user", "content": SHELL}],
                                                 max_tokens=40, temperature=0, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == reference.text
    assert content.endswith(block.message)
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert blocks._value.get() == before + 1


def test_metrics_carry_the_policy_version_and_reload_reaches_the_workers(served, vllm_monitor):
    import urllib.request

    _, _, server, _ = served
    text = urllib.request.urlopen(server.url + "/metrics").read().decode()
    assert f'policy_version="{vllm_monitor.policy_version}"' in text
    request = urllib.request.Request(server.url + "/admin/reload", method="POST")
    body = urllib.request.urlopen(request).read().decode()
    assert '"ok":true' in body.replace(" ", "")
    statuses = vllm_monitor.submit_sync(vllm_monitor.engine.collective_rpc("sae_monitor_status"))
    assert {s["policy_version"] for s in statuses} == {vllm_monitor.policy_version}
