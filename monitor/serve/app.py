"""The FastAPI app: routes, error handlers and the server-sent event relay.

Endpoints:

* ``POST /v1/chat/completions`` — the OpenAI chat API, plain or server-sent events
  (``stream: true``). A blocked request is *not* an HTTP error: it is a normal completion with
  ``finish_reason: "content_filter"`` whose content is the rule's message. Malformed requests
  get a 4xx with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}`` (413
  for a body over the limit, 404 ``model_not_found`` for another model's name); a monitor that
  fails closed, or a decision that cannot be audited, gets 503.
* ``GET /v1/models``, ``GET /v1/models/{id}`` — the served model (clients call these on start).
* ``GET /metrics`` — Prometheus exposition (OpenMetrics on request). ``GET /healthz``.
* ``POST /admin/reload`` — reload the policy files (loopback only, or with the admin token).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from monitor.errors import MonitorError
from monitor.logs import ReportLogger
from monitor.metrics import MonitorMetrics
from monitor.report import policy_store
from monitor.serve.admin import check_admin
from monitor.serve.chat import AuditUnavailable, ChatService, GenerationControl, Prepared, audited
from monitor.serve.limits import BodyLimit, ServeLimits
from monitor.serve.schema import APIError, ChatCompletionRequest, event, model_not_found, usage, validation_error
from monitor.errors import MonitorUnavailable
from monitor.report import Report
from monitor.runtime.hf import Monitor

_log = structlog.get_logger("sae_monitor")

#: Accepted in ``model`` besides the served name: "whatever this server serves".
MODEL_ALIASES = ("default",)


def create_app(monitor: Monitor, metrics: MonitorMetrics | None = None,
               model_name: str = "sae-monitor", *, report_logger: ReportLogger | None = None,
               admin_token: str | None = None, limits: ServeLimits | None = None,
               audit_trail: Any = None, sae_id: str | None = None, **limit_options: Any) -> FastAPI:
    """The FastAPI app serving ``monitor`` (with the body-size guard as middleware).

    ``metrics``: where to record (default: a :class:`MonitorMetrics` on a fresh registry, so two
    apps in one process never collide); it and ``report_logger`` are attached to the monitor.
    ``admin_token``: if set, ``/admin/*`` requires ``Authorization: Bearer <token>`` from any
    client; if not, only loopback clients may call it. ``limits`` (or its fields as keywords:
    ``max_body_bytes``, ``max_prompt_tokens``, ``default_max_tokens``, ``max_tokens_limit``,
    ``max_concurrent``): see :class:`ServeLimits`. ``audit_trail``: a callback such as
    :class:`~monitor.audit.AuditTrail`, run first; a decision it cannot write fails the request
    closed (503, counted as an error, logged). Raises :class:`MonitorError` if the tokenizer has
    no chat template.
    """
    if not getattr(monitor.tokenizer, "chat_template", None):
        raise MonitorError("the tokenizer has no chat template, so chat messages cannot be turned "
                           "into a prompt; set tokenizer.chat_template to a Jinja template")
    if limits is None:
        limits = ServeLimits(**limit_options)
    elif limit_options:
        raise TypeError("pass limits= or its fields as keywords, not both")
    if metrics is None:
        metrics = _fresh_metrics()
    if audit_trail is not None:
        monitor.callbacks.insert(0, audited(audit_trail))
    metrics.attach(monitor, sae_id=sae_id)
    logger = (report_logger or ReportLogger()).attach(monitor)
    service = ChatService(monitor, logger=logger, metrics=metrics, limits=limits)
    created = int(time.time())
    app = FastAPI(title="sae-monitor", description="OpenAI-compatible chat completions under "
                  "SAE feature policies.", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.monitor, app.state.metrics, app.state.service = monitor, metrics, service
    app.state.limits = limits

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        _log.error("request_failed", error_type=type(exc).__name__)
        return APIError(500, "internal error", type="server_error").response()

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "sae-monitor"}

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "policy_version": monitor.policy.version_id}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != model_name:
            raise model_not_found(model_id)
        return model_card()

    @app.get("/metrics")
    async def metrics_endpoint(request: Request) -> Response:
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(metrics.registry), media_type=content_type)

    @app.post("/admin/reload")
    async def reload(request: Request) -> JSONResponse:
        check_admin(request.headers.get("authorization"),
                    request.client.host if request.client else None, admin_token)
        if policy_store(monitor) is None:
            raise APIError(409, "this monitor was given a compiled policy, not policy files; "
                           "there is nothing to reload")
        result = await anyio.to_thread.run_sync(monitor.reload_policies)
        body = {"ok": result.ok, "version_id": result.version_id, "changed": result.changed,
                "error": result.error}
        return JSONResponse(status_code=200 if result.ok else 422, content=body)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest) -> JSONResponse | StreamingResponse:
        if req.model is not None and req.model != model_name and req.model not in MODEL_ALIASES:
            raise model_not_found(req.model)
        prepared = await anyio.to_thread.run_sync(service.prepare, req)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created_at = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _sse(service, prepared, completion_id, created_at, model_name, include_usage),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        control = service.control()
        try:
            done = await anyio.to_thread.run_sync(service.complete, prepared, control,
                                                  limiter=service.limiter)
        except AuditUnavailable as exc:
            raise service.refused_for_audit(exc, completion_id) from exc
        except MonitorUnavailable as exc:
            logger.request_completed(exc.report, prompt=prepared.messages, completion_id=completion_id)
            raise APIError(503, "the safety monitor is unavailable and refuses requests; try again "
                           "later", type="server_error", code="monitor_unavailable") from exc
        if done.report is not None:
            logger.request_completed(done.report, prompt=prepared.messages, response=done.text,
                                     completion_id=completion_id)
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": created_at,
            "model": model_name, "system_fingerprint": _fingerprint(done.report, monitor),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                         "finish_reason": done.finish_reason, "logprobs": None}],
            "usage": usage(done.prompt_tokens, done.completion_tokens)})

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    return app


async def _sse(service: ChatService, prepared: Prepared, completion_id: str, created: int,
               model_name: str, include_usage: bool) -> AsyncIterator[bytes]:
    """Server-sent events for one streamed completion (OpenAI chunk format, then [DONE]).

    If the client goes away (this generator is closed), the generation is cancelled and its
    report is still logged from the worker thread.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    control: GenerationControl = service.control()
    closed = False

    def emit(kind: str, value: Any) -> None:
        if closed:
            if kind == "done" and value is not None:  # the client left; the record stays
                service.logger.request_completed(value, prompt=prepared.messages,
                                                 completion_id=completion_id)
            return
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        except RuntimeError:  # the loop is gone (server shutting down)
            control.cancel()

    worker = asyncio.ensure_future(anyio.to_thread.run_sync(
        service.stream_worker, prepared, control, emit, limiter=service.limiter))

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return event({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                      "model": model_name, "system_fingerprint": None,
                      "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                   "logprobs": None}]})

    pieces: list[str] = []
    finished = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await queue.get()
            if kind == "chunk":
                pieces.append(value)
                yield chunk({"content": value})
                continue
            if kind == "error":
                yield event({"error": _stream_error(service, value, prepared, pieces, completion_id)})
                break
            report: Report | None = value
            blocked = report is not None and 0 in report.blocks
            finish = ("content_filter" if blocked else
                      "length" if control.count >= prepared.gen["max_new_tokens"] else "stop")
            yield chunk({}, finish)
            if include_usage:
                yield event({"id": completion_id, "object": "chat.completion.chunk",
                             "created": created, "model": model_name, "choices": [],
                             "usage": usage(prepared.ids.shape[1], control.count)})
            if report is not None:
                service.logger.request_completed(report, prompt=prepared.messages,
                                                 response="".join(pieces), completion_id=completion_id)
            break
        finished = True
        yield b"data: [DONE]\n\n"
    finally:
        closed = True
        if not finished:
            control.cancel()  # the generation loop sees it at its next step
            _log.info("stream_cancelled", completion_id=completion_id, tokens_generated=control.count)
        worker.add_done_callback(_retrieve)


def _stream_error(service: ChatService, exc: BaseException, prepared: Prepared, pieces: list[str],
                  completion_id: str) -> dict[str, Any]:
    """The error object ending a stream (headers are sent: no status code to change)."""
    if isinstance(exc, AuditUnavailable):
        return service.refused_for_audit(exc, completion_id).body()["error"]
    failed: Report | None = getattr(exc, "report", None)
    if failed is not None:
        service.logger.request_completed(failed, prompt=prepared.messages, response="".join(pieces),
                                         completion_id=completion_id)
    if isinstance(exc, MonitorUnavailable):
        return {"message": "the safety monitor is unavailable and refuses requests",
                "type": "server_error", "param": None, "code": "monitor_unavailable"}
    _log.error("stream_failed", completion_id=completion_id, error_type=type(exc).__name__)
    return {"message": "generation failed", "type": "server_error", "param": None, "code": None}


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # mark it retrieved; stream_worker reports its own errors


def _fingerprint(report: Report | None, monitor: Monitor) -> str:
    return f"policy-{(report.policy_version if report else monitor.policy.version_id)[:16]}"


def _fresh_metrics() -> MonitorMetrics:
    from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

    registry = CollectorRegistry()
    for collector in (ProcessCollector, PlatformCollector, GCCollector):
        collector(registry=registry)
    return MonitorMetrics(registry)
