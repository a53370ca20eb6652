"""Who may reload: loopback only without a token; with one, the token (constant-time compare,
bearer scheme in any case). Driven at the ASGI level so the client address can be a remote one."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.test_serve import EVERYWHERE_SHADOW, make_monitor


def asgi(app, method: str, path: str, *, client: str, headers: dict | None = None) -> tuple[int, dict]:
    """One request through the ASGI app as if from ``client``; (status, JSON body)."""
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "server": ("127.0.0.1", 8000),
             "client": (client, 50000),
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body)


@pytest.fixture
def monitor(tmp_path):
    made = make_monitor(tmp_path, EVERYWHERE_SHADOW)
    yield made
    made.close()


def test_without_a_token_admin_answers_only_loopback(monitor):
    from monitor.serve import create_app

    app = create_app(monitor)
    for remote in ("10.1.2.3", "192.168.0.7", "2001:db8::1", "::ffff:10.0.0.1"):
        status, body = asgi(app, "POST", "/admin/reload", client=remote)
        assert status == 403 and body["error"]["code"] == "admin_forbidden", remote
    for local in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        assert asgi(app, "POST", "/admin/reload", client=local)[0] == 200, local


def test_with_a_token_every_client_needs_it(monitor, monkeypatch):
    import hmac

    import monitor.serve.admin as admin
    from monitor.serve import create_app

    compared = []
    original = hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return original(a, b)

    monkeypatch.setattr(admin.hmac, "compare_digest", spy)
    app = create_app(monitor, admin_token="s3cret")
    for client in ("10.1.2.3", "127.0.0.1"):
        assert asgi(app, "POST", "/admin/reload", client=client)[0] == 401
        assert asgi(app, "POST", "/admin/reload", client=client,
                    headers={"Authorization": "Bearer wrong"})[0] == 401
        for scheme in ("Bearer", "bearer", "BEARER"):
            status, body = asgi(app, "POST", "/admin/reload", client=client,
                                headers={"Authorization": f"{scheme} s3cret"})
            assert status == 200 and body["ok"], (client, scheme)
    assert (b"wrong", b"s3cret") in compared and (b"s3cret", b"s3cret") in compared
