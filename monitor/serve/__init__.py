"""An OpenAI-compatible HTTP service for a monitored model (FastAPI + uvicorn).

* :mod:`monitor.serve.app` — :func:`create_app`: the routes, error handlers, SSE relay;
* :mod:`monitor.serve.chat` — preparing prompts and running monitored generation in threads;
* :mod:`monitor.serve.schema` — the request schema (strict) and OpenAI-shaped errors;
* :mod:`monitor.serve.limits` — :class:`ServeLimits` and the request-body guard;
* :mod:`monitor.serve.admin` — who may reload, and reloads on SIGHUP;
* :mod:`monitor.serve.runner` — :class:`ServerThread`, :func:`run`, :func:`serve_model`.

Generation runs in worker threads (at most ``max_concurrent`` at once, the rest wait without
blocking the event loop), and so do the chat template and tokenization, so health checks,
scrapes and reloads stay responsive while the model works. Non-goals: batching across
requests, tools/function calling, logprobs, ``n > 1``, ``stop`` sequences.
"""

from __future__ import annotations

from monitor.serve.admin import ReloadSignal, check_admin, install_reload_signal
from monitor.serve.app import MODEL_ALIASES, create_app
from monitor.serve.chat import AuditUnavailable, ChatService, GenerationControl
from monitor.serve.limits import BodyLimit, ServeConfigError, ServeLimits
from monitor.serve.runner import ServerThread, run, serve_model
from monitor.serve.schema import APIError, ChatCompletionRequest

__all__ = [
    "APIError",
    "AuditUnavailable",
    "BodyLimit",
    "ChatCompletionRequest",
    "ChatService",
    "GenerationControl",
    "MODEL_ALIASES",
    "ReloadSignal",
    "ServeConfigError",
    "ServeLimits",
    "ServerThread",
    "check_admin",
    "create_app",
    "install_reload_signal",
    "run",
    "serve_model",
]
