"""``sae-monitor serve``: the OpenAI-compatible chat API under policy (see :mod:`monitor.serve`)."""

from __future__ import annotations

import argparse
import os
from typing import TextIO

from monitor.cli.common import Parents, Subparsers, positive_int


def add_parser(subparsers: Subparsers, parents: Parents) -> None:
    """Register ``serve``."""
    serve = subparsers.add_parser(
        "serve", parents=[parents.model, parents.sae, parents.catalog],
        help="OpenAI-compatible chat API under policy, with /metrics, /healthz and /admin/reload (SIGHUP reloads too)")
    serve.add_argument("--policies", nargs="+", help="policy files or directories (default: the shipped policies)")
    serve.add_argument("--engine", choices=["transformers", "vllm", "auto"], default="transformers",
                       help="generation engine: transformers (default), vllm (needs sae-monitor[vllm]; "
                            "continuous batching) or auto (vllm where installed)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model-name", help="model name reported in responses (default: the model directory's name)")
    serve.add_argument("--audit-log", metavar="PATH", help="append every block/steer decision to this JSONL file (fsynced, rotation-safe)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    serve.add_argument("--log-text", action="store_true", help="log prompt/response text (default: sha256 digests only)")
    serve.add_argument("--no-json-logs", action="store_true", help="do not configure structlog JSON logging on stdout")
    serve.add_argument("--watch", type=float, default=0.0, metavar="SECONDS", help="also reload when policy files change, polling every SECONDS")
    serve.add_argument("--on-error", choices=["auto", "open", "closed"], default="auto", help="when monitoring fails: serve unmonitored (open), refuse (closed), or closed if any enforce rule (auto)")
    serve.add_argument("--no-self-test", action="store_true", help="skip the SAE fit check at startup")
    limits = serve.add_argument_group("request limits (refused at once, in OpenAI's error shape)")
    limits.add_argument("--max-concurrent", type=positive_int, default=None,
                        help="generations running at once (default: 1 with transformers, 64 with vllm)")
    limits.add_argument("--max-tokens", type=positive_int, default=256, help="max_tokens when a request sets none")
    limits.add_argument("--max-tokens-limit", type=positive_int, default=None, metavar="N",
                        help="the most max_tokens a request may ask for (default 4096)")
    limits.add_argument("--max-prompt-tokens", type=positive_int, default=None, metavar="N",
                        help="longest prompt after the chat template (default: the model's context)")
    limits.add_argument("--max-body-bytes", type=positive_int, default=None, metavar="N",
                        help="largest request body (default 4 MiB)")
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Serve until interrupted. The admin token comes from ``SAE_MONITOR_ADMIN_TOKEN`` (never a
    flag, so it stays out of ``ps``)."""
    from monitor.serve import serve_model

    given = {name: getattr(args, name) for name in ("max_tokens_limit", "max_prompt_tokens",
                                                    "max_body_bytes", "max_concurrent")}
    serve_model(args.model, sae=args.sae, policies=args.policies, catalog=args.catalog,
                host=args.host, port=args.port, model_name=args.model_name,
                audit_log=args.audit_log, json_logs=not args.no_json_logs, log_text=args.log_text,
                log_level=args.log_level, watch_interval=args.watch or None, on_error=args.on_error,
                self_test=not args.no_self_test, engine=args.engine,
                default_max_tokens=args.max_tokens,
                admin_token=os.environ.get("SAE_MONITOR_ADMIN_TOKEN") or None,
                **{name: value for name, value in given.items() if value is not None})
    return 0
