"""An OpenAI-compatible HTTP service for a monitored model (FastAPI + uvicorn).

Endpoints:

* ``POST /v1/chat/completions`` — the OpenAI chat API, plain or server-sent events
  (``stream: true``). Messages go through the tokenizer's chat template, then
  ``Monitor.generate`` / ``Monitor.stream``. A blocked request is *not* an HTTP error: it is a
  normal completion with ``finish_reason: "content_filter"`` whose content is the rule's
  message (non-streaming responses withhold the text generated before the block; a stream has
  already sent the tokens before the one that fired, then sends the message). Malformed
  requests get a 4xx with an OpenAI-style body ``{"error": {"message", "type", "param",
  "code"}}``; a monitor that fails closed gets 503.
* ``GET /metrics`` — Prometheus exposition of the metrics registry (OpenMetrics on request).
* ``GET /healthz`` — liveness, with the active policy version.
* ``POST /admin/reload`` — reload the policy files (also on ``SIGHUP`` under :func:`run`);
  rejected files keep the last good policy and answer 422 with the problems.

Generation runs in worker threads (at most ``max_concurrent`` at once, the rest wait without
blocking the event loop), so health checks, scrapes and reloads stay responsive while the
model works. Non-goals: batching across requests, tools/function calling, logprobs, ``n > 1``,
``stop`` sequences, cancelling a generation whose client went away (it runs to ``max_tokens``).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import structlog
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from monitor.data import token_ids
from monitor.errors import MonitorError
from monitor.logs import ReportLogger
from monitor.metrics import MonitorMetrics
from monitor.report import policy_store
from monitor.errors import Blocked, MonitorUnavailable
from monitor.report import Report
from monitor.runtime.hf import Monitor

_log = structlog.get_logger("sae_monitor")


# ============================================================================ request schema


class TextPart(BaseModel):
    """A text part of a multi-part message content (other part types are not supported)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message. ``developer`` is treated as ``system``."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The supported subset of the OpenAI chat completion request; unknown fields are ignored,
    supported-looking fields we cannot honour (``n > 1``, ``stop``, tools, logprobs) are 400s."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = 1
    stop: str | list[str] | None = None
    tools: list[Any] | None = None
    logprobs: bool | None = None


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": self.type, "param": self.param, "code": self.code}})


# ============================================================================ the app


@dataclass
class _Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    report: Report | None


class ChatService:
    """Translates OpenAI requests into monitored generation (the work behind the routes)."""

    def __init__(self, monitor: Monitor, *, logger: ReportLogger, default_max_tokens: int,
                 max_tokens_limit: int, max_concurrent: int) -> None:
        self.monitor = monitor
        self.tokenizer = monitor.tokenizer
        self.logger = logger
        self.default_max_tokens = default_max_tokens
        self.max_tokens_limit = max_tokens_limit
        self.limiter = anyio.CapacityLimiter(max_concurrent)
        config = getattr(monitor.model, "config", None)
        self.context_length = (getattr(config, "max_position_embeddings", None)
                               or getattr(config, "n_positions", None))
        self.eos_ids = set(_eos_ids(monitor))
        self.pad_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                       else next(iter(sorted(self.eos_ids)), 0))

    # ------------------------------------------------------------------ preparation
    def prepare(self, req: ChatCompletionRequest) -> tuple[torch.Tensor, dict[str, Any], list[dict]]:
        """Validate what pydantic cannot, apply the chat template; (ids, generate kwargs, messages)."""
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        for name in ("stop", "tools", "logprobs"):
            if getattr(req, name):
                raise APIError(400, f"'{name}' is not supported by this server", param=name)
        max_new = req.max_completion_tokens or req.max_tokens or self.default_max_tokens
        if max_new > self.max_tokens_limit:
            raise APIError(400, f"max_tokens must be at most {self.max_tokens_limit}, got {max_new}",
                           param="max_tokens")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:
            ids = token_ids(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                             tokenize=True))
        except Exception as exc:  # noqa: BLE001 - a template may reject a conversation shape
            raise APIError(400, f"the chat template rejected these messages: {exc}",
                           param="messages") from exc
        if self.context_length and len(ids) + max_new > self.context_length:
            raise APIError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_new}) exceeds "
                           f"the model's context length of {self.context_length} tokens",
                           param="messages", code="context_length_exceeded")
        gen: dict[str, Any] = {"max_new_tokens": max_new}
        if req.temperature == 0:
            gen["do_sample"] = False
        elif req.temperature is not None or req.top_p is not None:
            gen["do_sample"] = True
            if req.temperature is not None:
                gen["temperature"] = req.temperature
            if req.top_p is not None:
                gen["top_p"] = req.top_p
        return torch.tensor([ids], dtype=torch.long), gen, messages

    # ------------------------------------------------------------------ plain
    def complete(self, ids: torch.Tensor, gen: dict[str, Any]) -> _Completion:
        """Blocking: one monitored generate (run in a worker thread)."""
        prompt_len = ids.shape[1]
        try:
            out = self.monitor.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        pad_token_id=self.pad_id, **gen)
            report = self.monitor.last_report
        except Blocked as exc:
            out, report = None, exc.report
        if report is not None and 0 in report.blocks:
            message = report.blocks[0].message
            return _Completion(message, "content_filter", prompt_len, self._count(message), report)
        assert out is not None
        new = out[0, prompt_len:].tolist()  # one row: never padded
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        stopped = bool(new) and new[-1] in self.eos_ids
        finish = "length" if len(new) >= gen["max_new_tokens"] and not stopped else "stop"
        return _Completion(text, finish, prompt_len, len(new), report)

    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ streaming
    def stream_worker(self, ids: torch.Tensor, gen: dict[str, Any], emit: Callable[[str, Any], None],
                      cancelled: threading.Event) -> None:
        """Blocking: iterate ``Monitor.stream``, emitting ("chunk", text) then ("done", report)
        or ("error", exception). Runs in one worker thread (the report is thread-local)."""
        try:
            report: Report | None = None
            try:
                for chunk in self.monitor.stream(ids, **gen):
                    if not cancelled.is_set():  # after a disconnect, drain: the report still
                        emit("chunk", chunk)    # reaches the callbacks (metrics, audit)
                report = self.monitor.last_report
            except Blocked as exc:  # block_behavior="raise": the message was not yielded
                report = exc.report
                emit("chunk", report.blocks[0].message)
            emit("done", report)
        except BaseException as exc:  # noqa: BLE001 - forwarded to the event loop
            emit("error", exc)


def create_app(monitor: Monitor, metrics: MonitorMetrics | None = None,
               model_name: str = "sae-monitor", *, report_logger: ReportLogger | None = None,
               admin_token: str | None = None, default_max_tokens: int = 256,
               max_tokens_limit: int = 4096, max_concurrent: int = 1,
               sae_id: str | None = None) -> FastAPI:
    """The FastAPI app serving ``monitor``.

    ``metrics``: where to record (default: a :class:`MonitorMetrics` on a fresh registry, so two
    apps in one process never collide); it and ``report_logger`` are attached to the monitor
    (callbacks and policy-reload subscriptions). ``admin_token``: if set, ``/admin/reload``
    requires ``Authorization: Bearer <token>``. ``max_concurrent``: generations running at
    once (one model on one device gains little from more). Raises :class:`MonitorError` if the
    tokenizer has no chat template.
    """
    if not getattr(monitor.tokenizer, "chat_template", None):
        raise MonitorError("the tokenizer has no chat template, so chat messages cannot be turned "
                           "into a prompt; set tokenizer.chat_template to a Jinja template")
    if metrics is None:
        from prometheus_client import (
            CollectorRegistry,
            GCCollector,
            PlatformCollector,
            ProcessCollector,
        )

        registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=registry)
        metrics = MonitorMetrics(registry)
    metrics.attach(monitor, sae_id=sae_id)
    logger = (report_logger or ReportLogger()).attach(monitor)
    service = ChatService(monitor, logger=logger, default_max_tokens=default_max_tokens,
                          max_tokens_limit=max_tokens_limit, max_concurrent=max_concurrent)
    app = FastAPI(title="sae-monitor", description="OpenAI-compatible chat completions under "
                  "SAE feature policies.", docs_url=None, redoc_url=None)
    app.state.monitor, app.state.metrics, app.state.service = monitor, metrics, service

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "policy_version": monitor.policy.version_id}

    @app.get("/metrics")
    async def metrics_endpoint(request: Request) -> Response:
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(metrics.registry), media_type=content_type)

    @app.post("/admin/reload")
    async def reload(request: Request) -> JSONResponse:
        if admin_token is not None and request.headers.get("authorization") != f"Bearer {admin_token}":
            raise APIError(401, "missing or wrong admin token", type="authentication_error")
        if policy_store(monitor) is None:
            raise APIError(409, "this monitor was given a compiled policy, not policy files; "
                           "there is nothing to reload")
        result = await anyio.to_thread.run_sync(monitor.reload_policies)
        body = {"ok": result.ok, "version_id": result.version_id, "changed": result.changed,
                "error": result.error}
        return JSONResponse(status_code=200 if result.ok else 422, content=body)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest) -> JSONResponse | StreamingResponse:
        ids, gen, messages = service.prepare(req)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _sse(service, ids, gen, messages, completion_id, created, model_name, include_usage),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            done = await anyio.to_thread.run_sync(service.complete, ids, gen, limiter=service.limiter)
        except MonitorUnavailable as exc:
            logger.request_completed(exc.report, prompt=messages, completion_id=completion_id)
            raise APIError(503, "the safety monitor is unavailable and refuses requests; try again "
                           "later", type="server_error", code="monitor_unavailable") from exc
        if done.report is not None:
            logger.request_completed(done.report, prompt=messages, response=done.text,
                                     completion_id=completion_id)
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": created,
            "model": model_name, "system_fingerprint": _fingerprint(done.report, monitor),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                         "finish_reason": done.finish_reason, "logprobs": None}],
            "usage": _usage(done.prompt_tokens, done.completion_tokens)})

    return app


async def _sse(service: ChatService, ids: torch.Tensor, gen: dict[str, Any], messages: list[dict],
               completion_id: str, created: int, model_name: str,
               include_usage: bool) -> AsyncIterator[bytes]:
    """Server-sent events for one streamed completion (OpenAI chunk format, then [DONE])."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    cancelled = threading.Event()

    def emit(kind: str, value: Any) -> None:
        if cancelled.is_set():
            return
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        except RuntimeError:  # the loop is gone (server shutting down)
            cancelled.set()

    worker = asyncio.ensure_future(anyio.to_thread.run_sync(
        service.stream_worker, ids, gen, emit, cancelled, limiter=service.limiter))

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                "model": model_name, "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                **extra}
        return _event(body)

    pieces: list[str] = []
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await queue.get()
            if kind == "chunk":
                pieces.append(value)
                yield chunk({"content": value})
                continue
            if kind == "error":
                failed: Report | None = getattr(value, "report", None)
                if failed is not None:
                    service.logger.request_completed(failed, prompt=messages, response="".join(pieces),
                                                     completion_id=completion_id)
                if isinstance(value, MonitorUnavailable):
                    error = {"message": "the safety monitor is unavailable and refuses requests",
                             "type": "server_error", "param": None, "code": "monitor_unavailable"}
                else:
                    _log.error("stream_failed", completion_id=completion_id, error=repr(value))
                    error = {"message": "generation failed", "type": "server_error", "param": None,
                             "code": None}
                yield _event({"error": error})
                break
            report: Report | None = value
            blocked = report is not None and 0 in report.blocks
            response_tokens = report.tokens_monitored.get("response", 0) if report else 0
            finish = ("content_filter" if blocked else
                      "length" if response_tokens >= gen["max_new_tokens"] else "stop")
            yield chunk({}, finish)
            if include_usage:
                yield _event({"id": completion_id, "object": "chat.completion.chunk",
                              "created": created, "model": model_name, "choices": [],
                              "usage": _usage(ids.shape[1], service._count("".join(pieces)))})
            if report is not None:
                service.logger.request_completed(report, prompt=messages, response="".join(pieces),
                                                 completion_id=completion_id)
            break
        yield b"data: [DONE]\n\n"
    finally:
        cancelled.set()  # a client that went away stops the relay; generation runs out
        worker.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # mark it retrieved; stream_worker reports its own errors


def _event(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _fingerprint(report: Report | None, monitor: Monitor) -> str:
    return f"policy-{(report.policy_version if report else monitor.policy.version_id)[:16]}"


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON")
    where = ".".join(loc) or "body"
    message = f"{where}: {first.get('msg', 'invalid value')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return APIError(400, message, param=where if loc else None)


def _eos_ids(monitor: Monitor) -> list[int]:
    ids: list[int] = []
    for source in (getattr(getattr(monitor.model, "generation_config", None), "eos_token_id", None),
                   monitor.tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.append(source)
        elif source:
            ids.extend(int(i) for i in source)
    return ids



# ============================================================================ running


def install_reload_signal(monitor: Monitor, signum: int = signal.SIGHUP) -> Any:
    """Reload ``monitor``'s policies when ``signum`` arrives (main thread only); returns the
    previous handler. The reload runs in a new thread, never inside the signal handler."""

    def reload_in_thread() -> None:
        try:
            result = monitor.reload_policies()
            _log.info("policy_reload_signal", ok=result.ok, version_id=result.version_id)
        except MonitorError as exc:
            _log.error("policy_reload_signal_failed", error=str(exc))

    def handler(_signum: int, _frame: Any) -> None:
        threading.Thread(target=reload_in_thread, name="policy-reload-signal", daemon=True).start()

    return signal.signal(signum, handler)


class ServerThread:
    """A uvicorn server for ``app`` in a background thread on an already bound socket (port 0
    picks a free port). For tests and embedding: ``with ServerThread(app) as server: server.url``."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, *,
                 log_level: str = "warning") -> None:
        import uvicorn

        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = host, self.socket.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"uvicorn did not start on {self.url} within {timeout}s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)
        self.socket.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run(host: str = "127.0.0.1", port: int = 8000, *, monitor: Monitor,
        metrics: MonitorMetrics | None = None, model_name: str = "sae-monitor",
        log_level: str = "info", reload_signal: bool = True, **app_options: Any) -> None:
    """Serve ``monitor`` with uvicorn until SIGINT/SIGTERM; SIGHUP reloads the policies.

    ``app_options`` go to :func:`create_app` (``admin_token``, ``max_concurrent``, ...). Logging
    is not configured here; call :func:`monitor.logs.configure_json_logging` first if wanted.
    """
    import uvicorn

    app = create_app(monitor, metrics, model_name, **app_options)
    previous = None
    if reload_signal and hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
        previous = install_reload_signal(monitor)
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                      access_log=False)).run()
    finally:
        if previous is not None:
            signal.signal(signal.SIGHUP, previous)


def serve_model(model: str = "default", *, sae: str = "default",
                policies: str | list[str] | None = None, catalog: str | None = None,
                host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
                audit_log: str | None = None, json_logs: bool = True, log_text: bool = False,
                log_level: str = "info", watch_interval: float | None = None,
                on_error: Literal["open", "closed", "auto"] = "auto", self_test: bool = True,
                **app_options: Any) -> None:
    """Load a model, SAE, catalog and policies, then :func:`run` (what ``sae-monitor serve``
    does). ``model``/``sae``: ``"default"`` or a local directory; ``policies``: files or
    directories (default: the shipped ones); ``audit_log``: JSONL path for
    :class:`~monitor.audit.AuditTrail`; ``json_logs``: configure structlog JSON lines on
    stdout; ``watch_interval``: also reload when policy files change (seconds)."""
    from pathlib import Path

    from monitor.audit import AuditTrail
    from monitor.logs import configure_json_logging
    from monitor.runtime.wrap import from_default, wrap

    if json_logs:
        configure_json_logging(level=log_level, log_text=log_text)
    trail = AuditTrail(audit_log) if audit_log else None
    options: dict[str, Any] = dict(sae=sae, policies=policies, catalog=catalog, on_error=on_error,
                                   self_test=self_test, callbacks=[trail] if trail else [])
    if model == "default":
        monitor = from_default(**options)
    else:
        from monitor.models import load_model

        loaded, tokenizer = load_model(model)
        monitor = wrap(loaded, tokenizer, **options)  # type: ignore[assignment]
    store = policy_store(monitor)
    if watch_interval and store is not None:
        store.watch(watch_interval)
    name = model_name or ("sae-monitor-default" if model == "default" else Path(model).name)
    _log.info("serve_starting", host=host, port=port, model=name,
              policy_version=monitor.policy.version_id, audit_log=audit_log)
    try:
        run(host, port, monitor=monitor, model_name=name, log_level=log_level,
            report_logger=ReportLogger(log_text=log_text), **app_options)
    finally:
        if store is not None:
            store.stop()
        monitor.close()
        if trail is not None:
            trail.close()
