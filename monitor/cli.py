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
from monitor.errors import DataError, MonitorError

__path__ = [str(Path(__file__).with_suffix(""))]  # TEMPORARY (drift branch): monitor/cli/drift.py importable


def _present(path: Path | None) -> str:
    return "present" if path is not None and path.exists() else "missing"


def cmd_info(args: argparse.Namespace) -> int:
    from monitor import models, sae
    from monitor.wrapper import shipped_policies_dir

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
    try:
        policies: Path | None = shipped_policies_dir()
        policies_note = str(policies)
    except MonitorError as exc:
        policies, policies_note = None, str(exc)
    rows = [
        ("version", __version__, ""),
        ("default model", models.DEFAULT_MODEL_NAME, ""),
        ("  gguf", gguf_note, _present(gguf)),
        ("  converted cache", str(cache) if cache else "-", _present(cache)),
        ("default SAE", str(default_sae), _present(default_sae / "cfg.json")),
        ("policies", policies_note, _present(policies)),
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


def _progress(label: str, quiet: bool):
    if quiet:
        return None

    def report(done: int, total: int) -> None:
        print(f"\r{label} {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

    return report


def _parse_names(pairs: list[str]) -> dict[int, str]:
    names = {}
    for pair in pairs:
        latent, sep, name = pair.partition("=")
        if not sep or not latent.strip().isdigit() or not name.strip():
            raise MonitorError(f"--name {pair!r}: expected LATENT=NAME, e.g. 4711=unsafe_code.shell_injection")
        names[int(latent)] = name.strip()
    return names


def cmd_discover(args: argparse.Namespace) -> int:
    import torch

    from monitor import discover as disc
    from monitor.catalog import load_catalog
    from monitor.data import iter_texts
    from monitor.explain import example_contexts
    from monitor.metrics import sae_identity
    from monitor.models import load_model
    from monitor.sae import load_sae

    names = _parse_names(args.name)
    if (names or args.catalog_top or args.probe) and not args.out:
        raise MonitorError("--name, --catalog-top and --probe write a catalog: give --out CATALOG.yaml")
    if args.out and not (names or args.catalog_top or args.probe):
        raise MonitorError("--out needs features to write: --name LATENT=NAME, --catalog-top N or --probe NAME")
    quiet = args.json or args.quiet
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype))
    sae = load_sae(args.sae)
    sae_id = args.sae_id or (args.sae if args.sae == "default" else sae_identity(sae))
    items = disc.load_discovery_items(tokenizer, data=args.data or (), category=args.category,
                                      positive=args.positive or (), negative=args.negative or (),
                                      per_label=args.per_label, seed=args.seed)
    result = disc.discover(model, tokenizer, sae, items, top=args.top, direction=args.direction,
                           ctx=args.ctx, batch_size=args.batch_size, progress=_progress("texts", quiet))
    report: dict = {"sae": sae_id, **result.to_dict()}
    if not args.json:
        print(result.table("markdown" if args.markdown else "terminal"))
    if args.fit_on:
        moved = disc.transfer(result, args.fit_on, key=args.transfer_key, top=args.top)
        report["transfer"] = moved.to_dict()
        if not args.json:
            print(f"Transfer: latents picked on {args.transfer_key}={args.fit_on}, AUROC elsewhere\n")
            print(moved.table())
    if args.out:
        out = Path(args.out)
        existing = load_catalog(out, sae_id=sae_id, d_sae=sae.cfg.d_sae) if out.exists() else None
        if args.catalog_top:
            auto = disc.to_catalog_entries(result, args.catalog_top, sae_id)
            names = {**{e.latent: e.name for e in auto}, **names}
        corpus = list(iter_texts(args.max_corpus, tokenizer)) if args.max_corpus else [i.text for i in items]
        peaks = disc.max_activations(model, tokenizer, sae, corpus, list(names), ctx=args.ctx,
                                     batch_size=args.batch_size, progress=_progress("max activation", quiet))
        examples = example_contexts(model, tokenizer, sae, result, list(names), ctx=args.ctx)
        entries = disc.to_catalog_entries(result, names, sae_id, peaks, examples=examples) if names else []
        if args.probe:
            from monitor.probes import fit_probe, probe_entry, probe_scores, save_probe

            probe = fit_probe(model, tokenizer, items, result.point, l2=args.probe_l2, ctx=args.ctx,
                              batch_size=args.batch_size, seed=args.seed,
                              progress=_progress("probe", quiet))
            key = args.probe.replace(".", "_")
            save_probe(out.parent / f"{out.stem}.probes.safetensors", key, probe.weight, probe.bias)
            peak = float(probe_scores(model, tokenizer, corpus, result.point, probe.weight, probe.bias,
                                      ctx=args.ctx, batch_size=args.batch_size).max())
            entries.append(probe_entry(args.probe, key, probe, max_activation=peak))
            report["probe"] = {"name": args.probe, **probe.evidence}
            if not args.json:
                print(f"probe {args.probe}: held-out AUROC {probe.evidence.get('auroc_heldout', 'n/a')} "
                      f"({probe.evidence['n_heldout']} texts)")
        catalog = disc.merge_into_catalog(entries, sae_id, result.point.layer, existing)
        catalog.save(out)
        report["catalog"] = {"path": str(out), "written": [e.name for e in entries]}
        if not args.json:
            print(f"wrote {len(entries)} feature(s) to {out}: {', '.join(e.name for e in entries)}")
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from monitor.catalog import load_catalog
    from monitor.data import iter_texts
    from monitor.explain import format_contexts, format_logit_effects, logit_effects, render_html, scan_latents
    from monitor.models import load_model
    from monitor.sae import load_sae

    import torch

    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype))
    sae = load_sae(args.sae)
    name, description = None, None
    if args.latent.isdigit():
        latent = int(args.latent)
    else:
        if not args.catalog:
            raise MonitorError(f"{args.latent!r} is not a latent index; give --catalog to look up feature names")
        entry = load_catalog(args.catalog, d_sae=sae.cfg.d_sae).get(args.latent)
        if entry.latent is None:
            raise MonitorError(f"feature '{args.latent}' is a probe; explain shows SAE latents")
        latent, name, description = entry.latent, entry.name, entry.description or None
    effects = logit_effects(model, tokenizer, sae, latent, k=args.k)
    contexts, histogram, texts = [], None, None
    if args.texts:
        texts = list(iter_texts(args.texts, tokenizer))
        if args.limit:
            texts = texts[:args.limit]
        scan = scan_latents(model, tokenizer, sae, [latent], texts, n=args.n, window=args.window,
                            ctx=args.ctx, batch_size=args.batch_size,
                            progress=_progress("texts", not sys.stderr.isatty()))[latent]
        contexts, histogram = scan.contexts, scan.histogram
    color = not args.no_color and sys.stdout.isatty()
    title = f"latent {latent}" + (f" ({name})" if name else "")
    if texts is not None:
        print(format_contexts(contexts, color=color, title=f"{title}: top {len(contexts)} of {len(texts)} texts, "
                              f"fires on {histogram.density:.2%} of tokens"))
    else:
        print(f"{title}: no --texts given, showing logit effects only")
    print(format_logit_effects(effects))
    if args.html:
        path = render_html(latent, contexts, histogram, effects, args.html, name=name,
                           description=description, texts=texts)
        print(f"wrote {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from monitor.evaluate import run_eval

    print(run_eval(args.data, policies=args.policies, train=args.train, limit=args.limit or None,
                   sae=args.sae, model=args.model, catalog=args.catalog, as_json=args.json,
                   items=args.items, progress=not args.no_progress), end="")
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
    disc = sub.add_parser("discover", help="rank SAE latents (and fit a probe) that separate labeled texts; write a catalog")
    src = disc.add_argument_group("data (give --data, or --positive and --negative)")
    src.add_argument("--data", nargs="+", help="labeled JSONL files (text|messages|prompt+response, label 0/1)")
    src.add_argument("--category", help="keep only rows of this category")
    src.add_argument("--positive", nargs="+", help="JSONL files whose rows all count as label 1")
    src.add_argument("--negative", nargs="+", help="JSONL files whose rows all count as label 0")
    src.add_argument("--per-label", type=int, default=None, help="sample at most N texts per label (pairs kept together)")
    disc.add_argument("--model", default="default")
    disc.add_argument("--sae", default="default")
    disc.add_argument("--sae-id", default=None, help="id written to the catalog's 'sae' (default: 'default' or the SAE's own id)")
    disc.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="model precision (bfloat16 is faster on CPU)")
    disc.add_argument("--top", type=int, default=20, help="latents to show")
    disc.add_argument("--direction", choices=["positive", "negative", "both"], default="positive",
                      help="rank latents firing more on label 1, on label 0, or either")
    disc.add_argument("--fit-on", default=None, metavar="GROUP", help="also pick latents on this group only and report their AUROC on the others")
    disc.add_argument("--transfer-key", default="source", help="what defines a group: source, category, language, cwe, subtype")
    disc.add_argument("--out", default=None, help="catalog YAML to write (merged into it if it exists)")
    disc.add_argument("--name", action="append", default=[], metavar="LATENT=NAME", help="name a latent in the catalog (repeatable)")
    disc.add_argument("--catalog-top", type=int, default=0, metavar="N", help="add the N best latents under provisional names")
    disc.add_argument("--max-corpus", nargs="+", default=None, help="texts over which max_activation is measured (default: the discovery texts)")
    disc.add_argument("--probe", default=None, metavar="NAME", help="also fit a linear probe and add it to the catalog as feature NAME")
    disc.add_argument("--probe-l2", type=float, default=1e-3)
    disc.add_argument("--ctx", type=int, default=256)
    disc.add_argument("--batch-size", type=int, default=8)
    disc.add_argument("--seed", type=int, default=0)
    disc.add_argument("--markdown", action="store_true", help="print tables as Markdown")
    disc.add_argument("--json", action="store_true")
    disc.add_argument("--quiet", action="store_true", help="no progress on stderr")
    disc.set_defaults(func=cmd_discover)

    exp = sub.add_parser("explain", help="top-activating contexts, activation histogram and logit effects of one latent")
    exp.add_argument("latent", metavar="LATENT", help="latent index, or a feature name with --catalog")
    exp.add_argument("--texts", nargs="+", default=None, help="JSONL/text files or directories to scan")
    exp.add_argument("--html", default=None, metavar="OUT.html", help="also write a self-contained dashboard page")
    exp.add_argument("--catalog", default=None, help="catalog to resolve a feature name")
    exp.add_argument("--model", default="default")
    exp.add_argument("--sae", default="default")
    exp.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    exp.add_argument("-n", type=int, default=10, help="contexts to show")
    exp.add_argument("--window", type=int, default=12, help="tokens either side of the peak")
    exp.add_argument("-k", type=int, default=10, help="promoted/suppressed tokens to show")
    exp.add_argument("--limit", type=int, default=0, help="scan only the first N texts")
    exp.add_argument("--ctx", type=int, default=256)
    exp.add_argument("--batch-size", type=int, default=8)
    exp.add_argument("--no-color", action="store_true")
    exp.set_defaults(func=cmd_explain)


    evl = sub.add_parser("eval", help="detection per category: AUROC, TPR at 1%% and 5%% FPR, precision/recall of decisions")
    evl.add_argument("--data", required=True, help="labeled JSONL (text, prompt+response or messages; label; category)")
    evl.add_argument("--policies", help="policy directory or file (default: the shipped policies)")
    evl.add_argument("--train", help="labeled JSONL to fit the baselines on (residual probe; bandit on Python rows)")
    evl.add_argument("--sae", default="default", help="SAE name or directory")
    evl.add_argument("--catalog", help="feature catalog (default: the shipped SAE's)")
    evl.add_argument("--model", default="default", help="'default' or a Hugging Face model directory")
    evl.add_argument("--limit", type=int, default=0, help="evaluate only the first N rows")
    evl.add_argument("--json", action="store_true", help="JSON instead of a markdown table")
    evl.add_argument("--items", action="store_true", help="with --json: include per-item scores and decisions")
    evl.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    evl.set_defaults(func=cmd_eval)

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

    from monitor.policy.cli import add_parser as add_policy_parser

    add_policy_parser(sub)
    # TEMPORARY (drift branch): monitor/cli/drift.py follows the monitor.cli package convention;
    # the lead registers it in COMMAND_MODULES at merge and drops these lines.
    from monitor.cli.drift import add_parser as add_drift_parser, cmd_drift

    add_drift_parser(sub)
    sub.choices["drift"].set_defaults(func=lambda a: cmd_drift(a, sys.stdout, sys.stderr))
    return parser


# Arguments that name input files or directories (never the 'default' SAE or model names).
INPUT_PATH_ARGS = ("data", "texts", "positive", "negative", "train", "catalog", "policies")


def check_input_paths(args: argparse.Namespace) -> None:
    """Fail on a missing input file before a command spends seconds loading the model."""
    for name in INPUT_PATH_ARGS:
        value = getattr(args, name, None)
        for path in [value] if isinstance(value, str) else value or ():
            if not Path(path).exists():
                option = "--" + name.replace("_", "-")
                raise DataError(f"{option} {path}: no such file or directory")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    try:
        check_input_paths(args)
        return func(args)
    except MonitorError as exc:
        print(f"sae-monitor: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
