"""The ``sae-monitor`` command line.

Each subcommand is a small function taking parsed arguments; any :class:`MonitorError` is
printed as one plain line (no traceback) and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from monitor import __version__
from monitor.errors import MonitorError

ROOT_POLICIES = Path(__file__).resolve().parent.parent / "policies"


def _present(path: Path | None) -> str:
    return "present" if path is not None and path.exists() else "missing"


def cmd_info(args: argparse.Namespace) -> int:
    from monitor import models, sae

    try:
        gguf: Path | None = models.default_model_gguf()
        gguf_note = str(gguf)
    except MonitorError as exc:
        gguf, gguf_note = None, str(exc)
    try:
        cache = models.default_model_cache_dir()
    except MonitorError:
        cache = None
    default_sae = sae.SHIPPED_DIR / "default"
    rows = [
        ("version", __version__, ""),
        ("default model", models.DEFAULT_MODEL_NAME, ""),
        ("  gguf", gguf_note, _present(gguf)),
        ("  converted cache", str(cache) if cache else "-", _present(cache)),
        ("default SAE", str(default_sae), _present(default_sae / "cfg.json")),
        ("policies", str(ROOT_POLICIES), _present(ROOT_POLICIES)),
    ]
    if args.json:
        print(json.dumps({name.strip(): {"value": value, "status": status} for name, value, status in rows}, indent=2))
    else:
        for name, value, status in rows:
            print(f"{name:<18} {value}" + (f"  [{status}]" if status else ""))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from monitor.train import TrainConfig, run_training

    cfg = TrainConfig(d_sae=args.d_sae, k=args.k, architecture=args.architecture,
                      batch_tokens=args.batch_tokens, lr=args.lr, epochs=args.epochs, seed=args.seed)
    run_training(model=args.model, data=args.data, layer=args.layer, site=args.site,
                 max_tokens=args.tokens, ctx=args.ctx, out=Path(args.out), cfg=cfg)
    return 0


def cmd_sae_eval(args: argparse.Namespace) -> int:
    from monitor.data import iter_texts
    from monitor.models import load_model
    from monitor.sae import load_sae
    from monitor.sae_eval import evaluate_sae

    model, tokenizer = load_model(args.model)
    sae = load_sae(args.sae)
    texts = list(iter_texts([args.texts], tokenizer))
    if args.limit:
        texts = texts[: args.limit]
    result = evaluate_sae(model, tokenizer, sae, texts, ctx=args.ctx, progress=not args.json)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        for key, value in result.to_dict().items():
            print(f"{key:<14} {value:.4f}" if isinstance(value, float) else f"{key:<14} {value}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from monitor.serve import serve_model

    serve_model(args.model, sae=args.sae, policies=args.policies, catalog=args.catalog,
                host=args.host, port=args.port, model_name=args.model_name,
                audit_log=args.audit_log, json_logs=not args.no_json_logs, log_text=args.log_text,
                log_level=args.log_level, watch_interval=args.watch or None, on_error=args.on_error,
                self_test=not args.no_self_test, max_concurrent=args.max_concurrent,
                default_max_tokens=args.max_tokens,
                admin_token=os.environ.get("SAE_MONITOR_ADMIN_TOKEN") or None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae-monitor", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"sae-monitor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    info = sub.add_parser("info", help="show the default model, SAE and policy paths and whether each is present")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    train = sub.add_parser("train", help="train a BatchTopK/TopK SAE for a model at one layer")
    train.add_argument("--model", default="default", help="'default' or a Hugging Face model directory")
    train.add_argument("--data", nargs="+", required=True, help="JSONL ({text} or {messages}), text or source files, or directories")
    train.add_argument("--layer", type=int, required=True)
    train.add_argument("--site", choices=["resid_post", "resid_pre"], default="resid_post")
    train.add_argument("--tokens", type=int, default=2_000_000, help="activation tokens to extract")
    train.add_argument("--ctx", type=int, default=256)
    train.add_argument("--d-sae", type=int, default=8192)
    train.add_argument("--k", type=int, default=32)
    train.add_argument("--architecture", choices=["batchtopk", "topk"], default="batchtopk")
    train.add_argument("--batch-tokens", type=int, default=4096)
    train.add_argument("--lr", type=float, default=8e-4)
    train.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", required=True, help="output directory (resumes if it holds a checkpoint)")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("sae-eval", help="FVU, L0, dead latents and CE loss recovered on given texts")
    ev.add_argument("--texts", required=True)
    ev.add_argument("--sae", default="default")
    ev.add_argument("--model", default="default")
    ev.add_argument("--ctx", type=int, default=256)
    ev.add_argument("--limit", type=int, default=0, help="evaluate only the first N texts")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_sae_eval)
    serve = sub.add_parser("serve", help="OpenAI-compatible chat API under policy, with /metrics, /healthz and /admin/reload (SIGHUP reloads too)")
    serve.add_argument("--model", default="default", help="'default' or a Hugging Face model directory")
    serve.add_argument("--sae", default="default", help="'default' or an SAE directory")
    serve.add_argument("--policies", nargs="+", help="policy files or directories (default: the shipped policies)")
    serve.add_argument("--catalog", help="feature catalog YAML (default: the shipped SAE's catalog)")
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
    serve.add_argument("--max-concurrent", type=int, default=1, help="generations running at once (default 1)")
    serve.add_argument("--max-tokens", type=int, default=256, help="max_tokens when a request sets none")
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    try:
        return func(args)
    except MonitorError as exc:
        print(f"sae-monitor: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
