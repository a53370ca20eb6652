"""Strict request validation and the model endpoints, through a real server and the official
``openai`` client (tiny random model)."""

from __future__ import annotations

import json

import pytest

from tests.test_serve import EVERYWHERE_SHADOW, SHORT, http, make_monitor


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from monitor.serve import ServerThread, create_app

    monitor = make_monitor(tmp_path_factory.mktemp("schema"), EVERYWHERE_SHADOW)
    with ServerThread(create_app(monitor, model_name="tiny-llama")) as running:
        yield running
    monitor.close()


def post(server, body: dict | bytes):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http("POST", server.url + "/v1/chat/completions", raw, {"Content-Type": "application/json"})


MESSAGES = [{"role": "user", "content": SHORT}]


@pytest.mark.parametrize("field,value", [
    ("max_tokens", True), ("max_completion_tokens", True), ("n", True), ("temperature", True),
    ("max_tokens", "4"), ("stream", 1),
])
def test_booleans_and_strings_are_not_numbers(server, field, value):
    status, payload = post(server, {"model": "tiny-llama", "messages": MESSAGES, field: value})
    assert status == 400
    assert payload["error"]["type"] == "invalid_request_error" and payload["error"]["param"] == field


def test_unknown_model_is_404_model_not_found(server):
    status, payload = post(server, {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 2})
    assert status == 404
    assert payload["error"]["code"] == "model_not_found" and payload["error"]["param"] == "model"
    assert "gpt-4o" in payload["error"]["message"]
    for name in ("tiny-llama", "default", None):  # the served name, the alias, or none at all
        body = {"messages": MESSAGES, "max_tokens": 2, **({"model": name} if name else {})}
        assert post(server, body)[0] == 200


def test_lone_surrogate_is_a_clean_400(server):
    body = b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}'
    status, payload = post(server, body)
    assert status == 400
    assert payload["error"]["param"] == "messages.0.content"
    assert payload["error"]["message"] == ("messages.0.content: Value error, contains invalid "
                                           "Unicode (a lone surrogate); send valid UTF-8 text")


def test_models_endpoints_with_the_openai_client(server):
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30)
    (card,) = client.models.list().data
    assert card.id == "tiny-llama" and card.object == "model" and card.owned_by == "sae-monitor"
    assert client.models.retrieve("tiny-llama").id == "tiny-llama"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4o")
    assert err.value.code == "model_not_found"
