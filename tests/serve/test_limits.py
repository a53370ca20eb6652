"""Request limits: an oversized body is refused at once, a long prompt is tokenized off the
event loop (``/healthz`` keeps answering) and refused by the prompt-token limit."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from tests.test_serve import EVERYWHERE_SHADOW, SHORT, http, make_monitor


def healthz_latencies(url: str, busy: threading.Thread) -> list[float]:
    """Time /healthz calls for as long as ``busy`` runs (at least one)."""
    latencies = []
    while True:
        started = time.monotonic()
        assert http("GET", url + "/healthz")[0] == 200
        latencies.append(time.monotonic() - started)
        if not busy.is_alive():
            return latencies
        time.sleep(0.05)


def test_a_50_mb_body_is_refused_at_once_and_healthz_keeps_answering(tmp_path):
    from monitor.serve import ServerThread, create_app

    monitor = make_monitor(tmp_path, EVERYWHERE_SHADOW)
    with ServerThread(create_app(monitor, max_body_bytes=1_000_000)) as server:
        body = (b'{"messages": [{"role": "user", "content": "' + b"hello world " * 4_400_000 + b'"}]}')
        assert len(body) > 50_000_000
        result: dict = {}

        def upload() -> None:
            with socket.create_connection((server.host, server.port), timeout=60) as conn:
                conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Type: application/json\r\n"
                             + f"Content-Length: {len(body)}\r\n\r\n".encode())
                sent = 0
                try:  # the server answers and closes without reading the body
                    while sent < len(body):
                        sent += conn.send(body[sent:sent + 65536])
                except OSError:
                    pass
                result["sent"] = sent
                result["answer"] = conn.recv(65536).decode(errors="replace")

        uploader = threading.Thread(target=upload)
        uploader.start()
        latencies = healthz_latencies(server.url, uploader)
        uploader.join(60)
        head, _, payload = result["answer"].partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 413")
        error = json.loads(payload)["error"]
        assert error["code"] == "request_too_large" and "1000000 bytes" in error["message"]
        assert result["sent"] < len(body)  # refused before the body was read
        assert max(latencies) < 1.0, latencies
    monitor.close()


def test_a_long_prompt_is_tokenized_off_the_event_loop_then_refused(tmp_path):
    from monitor.serve import ServerThread, create_app

    monitor = make_monitor(tmp_path, EVERYWHERE_SHADOW)
    app = create_app(monitor, max_body_bytes=8_000_000, max_prompt_tokens=50)
    with ServerThread(app) as server:
        text = "hello world " * 100_000  # 1.2 MB: seconds of tokenization on this tokenizer
        result: dict = {}
        poster = threading.Thread(target=lambda: result.setdefault("r", http(
            "POST", server.url + "/v1/chat/completions",
            json.dumps({"messages": [{"role": "user", "content": text}]}).encode(),
            {"Content-Type": "application/json"})))
        started = time.monotonic()
        poster.start()
        latencies = healthz_latencies(server.url, poster)
        poster.join(120)
        took = time.monotonic() - started
        status, payload = result["r"]
        assert status == 400 and payload["error"]["code"] == "prompt_too_long"
        assert "1200" in payload["error"]["message"] and "at most 50" in payload["error"]["message"]
        assert len(latencies) >= 3 and max(latencies) < 1.0, (took, latencies)
        # a prompt within the limit is served as before
        ok = http("POST", server.url + "/v1/chat/completions",
                  json.dumps({"messages": [{"role": "user", "content": SHORT}], "max_tokens": 2}).encode(),
                  {"Content-Type": "application/json"})
        assert ok[0] == 200
    monitor.close()


def test_limits_are_validated_before_the_model_loads(monkeypatch):
    from monitor.errors import MonitorError
    from monitor.serve import ServeLimits, serve_model

    def never(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the limits were checked")

    monkeypatch.setattr("monitor.runtime.wrap.from_default", never)
    with pytest.raises(MonitorError, match=r"default_max_tokens \(8192\) exceeds max_tokens_limit \(4096\)"):
        serve_model(json_logs=False, default_max_tokens=8192)
    with pytest.raises(MonitorError, match="max_body_bytes"):
        ServeLimits(max_body_bytes=0)
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        ServeLimits(max_prompt_tokens=True)
    with pytest.raises(ValueError, match="exceeds max_tokens_limit"):
        ServeLimits(default_max_tokens=100, max_tokens_limit=10)
