"""Running the app: a test/embedding server thread, :func:`run` and :func:`serve_model`.

:func:`serve_model` (what ``sae-monitor serve`` runs) installs the SIGHUP handler before it
loads anything, so a reload signal sent while the model loads is queued instead of killing the
process, and it hands the audit trail to the app, which fails a request closed when its
decision cannot be written.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Literal

import structlog
from fastapi import FastAPI

from monitor.logs import ReportLogger
from monitor.metrics import MonitorMetrics
from monitor.report import policy_store
from monitor.serve.admin import ReloadSignal
from monitor.serve.app import create_app
from monitor.serve.limits import ServeLimits
from monitor.runtime.hf import Monitor

_log = structlog.get_logger("sae_monitor")


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
        log_level: str = "info", reload_signal: bool | ReloadSignal = True, **app_options: Any) -> None:
    """Serve ``monitor`` with uvicorn until SIGINT/SIGTERM; SIGHUP reloads the policies.

    ``app_options`` go to :func:`create_app` (``admin_token``, ``max_concurrent``, ...).
    ``reload_signal``: True installs the SIGHUP handler now; an installed :class:`ReloadSignal`
    (from before the model loaded) gets the monitor, and runs a reload queued meanwhile. Logging
    is not configured here; call :func:`monitor.logs.configure_json_logging` first if wanted.
    """
    import uvicorn

    app = create_app(monitor, metrics, model_name, **app_options)
    handler: ReloadSignal | None = None
    if isinstance(reload_signal, ReloadSignal):
        handler = reload_signal
    elif reload_signal and hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
        handler = ReloadSignal().install()
    if handler is not None:
        handler.attach(monitor)
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                      access_log=False)).run()
    finally:
        if handler is not None:
            handler.restore()


def serve_model(model: str = "default", *, sae: str = "default",
                policies: str | list[str] | None = None, catalog: str | None = None,
                host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
                audit_log: str | None = None, json_logs: bool = True, log_text: bool = False,
                log_level: str = "info", watch_interval: float | None = None,
                on_error: Literal["open", "closed", "auto"] = "auto", self_test: bool = True,
                engine: str = "transformers", **app_options: Any) -> None:
    """Load a model, SAE, catalog and policies, then :func:`run` (what ``sae-monitor serve``
    does). ``model``/``sae``: ``"default"`` or a local directory; ``policies``: files or
    directories (default: the shipped ones); ``audit_log``: JSONL path for
    :class:`~monitor.audit.AuditTrail`; ``json_logs``: configure structlog JSON lines on
    stdout; ``watch_interval``: also reload when policy files change (seconds);
    ``app_options``: :func:`create_app` keywords (``admin_token``, the :class:`ServeLimits`
    fields); ``engine``: ``transformers``, ``vllm`` (vLLM's async engine with continuous
    batching, :func:`monitor.runtime.vllm.serve.serving_engine`; needs ``sae-monitor[vllm]``) or
    ``auto`` (vLLM where installed)."""
    from monitor.audit import AuditTrail
    from monitor.logs import configure_json_logging
    from monitor.runtime.vllm.setup import resolve_engine
    from monitor.runtime.wrap import from_default, wrap

    if resolve_engine(engine) == "vllm":
        _serve_vllm(model, sae=sae, policies=policies, catalog=catalog, host=host, port=port,
                    model_name=model_name, audit_log=audit_log, json_logs=json_logs, log_text=log_text,
                    log_level=log_level, on_error=on_error, **app_options)
        return

    if json_logs:
        configure_json_logging(level=log_level, log_text=log_text)
    # checked before the (slow) load: contradictory limits fail in a second, not after it
    limits = app_options.pop("limits", None) or ServeLimits(
        **{name: app_options.pop(name) for name in ServeLimits.FIELDS if name in app_options})
    reload: ReloadSignal | bool = False
    if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
        reload = ReloadSignal().install()  # before the (slow) load: SIGHUP must never kill us
    _log.info("serve_loading", model=model, sae=sae)
    trail = AuditTrail(audit_log) if audit_log else None
    options: dict[str, Any] = dict(sae=sae, policies=policies, catalog=catalog, on_error=on_error,
                                   self_test=self_test)
    try:
        if model == "default":
            monitor = from_default(**options)
        else:
            from monitor.models import load_model

            loaded, tokenizer = load_model(model)
            monitor = wrap(loaded, tokenizer, **options)
    except BaseException:
        if isinstance(reload, ReloadSignal):
            reload.restore()
        raise
    store = policy_store(monitor)
    if watch_interval and store is not None:
        store.watch(watch_interval)
    name = model_name or ("sae-monitor-default" if model == "default" else Path(model).name)
    _log.info("serve_starting", host=host, port=port, model=name,
              policy_version=monitor.policy.version_id, audit_log=audit_log)
    try:
        run(host, port, monitor=monitor, model_name=name, log_level=log_level,
            report_logger=ReportLogger(log_text=log_text), audit_trail=trail,
            reload_signal=reload, limits=limits, **app_options)
    finally:
        if store is not None:
            store.stop()
        monitor.close()
        if trail is not None:
            trail.close()


def _serve_vllm(model: str, *, sae: str, policies: str | list[str] | None, catalog: str | None, host: str,
                port: int, model_name: str | None, audit_log: str | None, json_logs: bool, log_text: bool,
                log_level: str, on_error: str, max_model_len: int = 2048,
                engine_args: dict[str, Any] | None = None, **app_options: Any) -> None:
    """``serve_model(engine="vllm")``: the same app, served by vLLM's async engine
    (continuous batching; ``max_concurrent`` defaults to 64 here)."""
    from monitor.audit import AuditTrail
    from monitor.logs import ReportLogger, configure_json_logging
    from monitor.runtime.vllm.serve import serving_engine

    if json_logs:
        configure_json_logging(level=log_level, log_text=log_text)
    engine = serving_engine(model, sae=sae, policies=policies, catalog=catalog, on_error=on_error,
                            max_model_len=max_model_len, engine_args=engine_args)
    trail = AuditTrail(audit_log) if audit_log else None
    name = model_name or ("sae-monitor-default" if model == "default" else Path(model).name)
    app_options.setdefault("max_concurrent", 64)
    try:
        run(host, port, monitor=engine, model_name=name, log_level=log_level,  # type: ignore[arg-type]
            report_logger=ReportLogger(log_text=log_text), audit_trail=trail, **app_options)
    finally:
        engine.close()
        if trail is not None:
            trail.close()
