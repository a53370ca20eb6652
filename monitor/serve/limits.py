"""What one request may cost the service, and the guard that refuses an oversized body.

A request body is read by the server before any route runs; without a limit, a 50 MB body
keeps a worker busy for tens of seconds and its JSON and tokenization used to run on the event
loop, stalling ``/healthz`` for everyone. :class:`BodyLimit` answers 413 as soon as a
``Content-Length`` over the limit arrives (nothing of the body is read) and stops reading a
chunked body the moment it passes the limit. The prompt-token limit is checked after the chat
template runs (in a worker thread), before any generation.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from monitor.errors import MonitorError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ServeConfigError(MonitorError, ValueError):
    """A service limit is not a positive integer, or the limits contradict each other."""


@dataclass(frozen=True)
class ServeLimits:
    """Per-request limits of the HTTP service (each refused at once, OpenAI's error shape).

    ``max_body_bytes``: request bodies above it get 413. ``max_prompt_tokens``: prompts (after
    the chat template) above it get 400 ``prompt_too_long``; None means only the model's context
    length applies. ``default_max_tokens``: completion length when the request names none;
    ``max_tokens_limit``: the most a request may ask for (400 above). ``max_concurrent``:
    generations running at once (the rest wait, without blocking the event loop).
    """

    max_body_bytes: int = 4 * 1024 * 1024
    max_prompt_tokens: int | None = None
    default_max_tokens: int = 256
    max_tokens_limit: int = 4096
    max_concurrent: int = 1

    FIELDS = ("max_body_bytes", "max_prompt_tokens", "default_max_tokens", "max_tokens_limit",
              "max_concurrent")

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "default_max_tokens", "max_tokens_limit", "max_concurrent"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ServeConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_prompt_tokens is not None and (isinstance(self.max_prompt_tokens, bool)
                                                   or not isinstance(self.max_prompt_tokens, int)
                                                   or self.max_prompt_tokens < 1):
            raise ServeConfigError(f"max_prompt_tokens must be a positive integer or None, got "
                             f"{self.max_prompt_tokens!r}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ServeConfigError(f"default_max_tokens ({self.default_max_tokens}) exceeds "
                             f"max_tokens_limit ({self.max_tokens_limit})")


class BodyLimit:
    """ASGI middleware: 413 for request bodies over ``max_bytes``, decided before reading them.

    A body within the limit is read here and replayed to the app, so the app never sees a
    partial body; the connection of a refused request is closed after the answer.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send, declared)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send, None)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, declared: int | None) -> None:
        size = f"{declared} bytes" if declared is not None else "more than that"
        body = json.dumps({"error": {
            "message": f"the request body is too large: the limit is {self.max_bytes} bytes, this "
                       f"one is {size}", "type": "invalid_request_error", "param": None,
            "code": "request_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
