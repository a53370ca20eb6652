"""Research commands: ``train`` an SAE, ``sae-eval`` it, ``discover`` latents (and write a
catalog), ``explain`` one latent, ``eval`` detection per category.

Each loads the model only inside its command function, after the arguments and input paths
were checked, so a typo costs no model load.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, TextIO

from monitor.cli.common import Parents, Subparsers, progress_line
from monitor.errors import MonitorError


def add_parser(subparsers: Subparsers, parents: Parents) -> None:
    """Register ``train``, ``sae-eval``, ``discover``, ``explain`` and ``eval``."""
    p = parents
    train = subparsers.add_parser("train", parents=[p.model, p.ctx, p.seed],
                                  help="train a BatchTopK/TopK SAE for a model at one layer")
    train.add_argument("--data", nargs="+", required=True, help="JSONL ({text} or {messages}), text or source files, or directories")
    train.add_argument("--layer", type=int, required=True)
    train.add_argument("--site", choices=["resid_post", "resid_pre"], default="resid_post")
    train.add_argument("--tokens", type=int, default=2_000_000, help="activation tokens to extract")
    train.add_argument("--d-sae", type=int, default=8192)
    train.add_argument("--k", type=int, default=32)
    train.add_argument("--architecture", choices=["batchtopk", "topk"], default="batchtopk")
    train.add_argument("--batch-tokens", type=int, default=4096)
    train.add_argument("--lr", type=float, default=8e-4)
    train.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--out", required=True, help="output directory (resumes if it holds a checkpoint)")
    train.set_defaults(func=cmd_train)

    ev = subparsers.add_parser("sae-eval", parents=[p.model, p.sae, p.ctx, p.limit, p.json],
                               help="FVU, L0, dead latents and CE loss recovered on given texts")
    ev.add_argument("--texts", required=True)
    ev.set_defaults(func=cmd_sae_eval)

    disc = subparsers.add_parser(
        "discover", parents=[p.model, p.sae, p.dtype, p.ctx, p.batch_size, p.seed, p.json],
        help="rank SAE latents (and fit a probe) that separate labeled texts; write a catalog")
    src = disc.add_argument_group("data (give --data, or --positive and --negative)")
    src.add_argument("--data", nargs="+", help="labeled JSONL files (text|messages|prompt+response, label 0/1)")
    src.add_argument("--category", help="keep only rows of this category")
    src.add_argument("--positive", nargs="+", help="JSONL files whose rows all count as label 1")
    src.add_argument("--negative", nargs="+", help="JSONL files whose rows all count as label 0")
    src.add_argument("--per-label", type=int, default=None, help="sample at most N texts per label (pairs kept together)")
    disc.add_argument("--sae-id", default=None, help="id written to the catalog's 'sae' (default: 'default' or the SAE's own id)")
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
    disc.add_argument("--markdown", action="store_true", help="print tables as Markdown")
    disc.add_argument("--quiet", action="store_true", help="no progress on stderr")
    disc.set_defaults(func=cmd_discover)

    exp = subparsers.add_parser(
        "explain", parents=[p.model, p.sae, p.dtype, p.ctx, p.batch_size, p.limit],
        help="top-activating contexts, activation histogram and logit effects of one latent")
    exp.add_argument("latent", metavar="LATENT", help="latent index, or a feature name with --catalog")
    exp.add_argument("--texts", nargs="+", default=None, help="JSONL/text files or directories to scan")
    exp.add_argument("--html", default=None, metavar="OUT.html", help="also write a self-contained dashboard page")
    exp.add_argument("--catalog", default=None, help="catalog to resolve a feature name")
    exp.add_argument("-n", type=int, default=10, help="contexts to show")
    exp.add_argument("--window", type=int, default=12, help="tokens either side of the peak")
    exp.add_argument("-k", type=int, default=10, help="promoted/suppressed tokens to show")
    exp.add_argument("--no-color", action="store_true")
    exp.set_defaults(func=cmd_explain)

    evl = subparsers.add_parser(
        "eval", parents=[p.model, p.sae, p.catalog, p.limit, p.batch_size, p.json],
        help="detection per category: AUROC, TPR at 1%% and 5%% FPR, precision/recall of decisions")
    evl.add_argument("--data", required=True, help="labeled JSONL (text, prompt+response or messages; label; category)")
    evl.add_argument("--policies", help="policy directory or file (default: the shipped policies)")
    evl.add_argument("--train", help="labeled JSONL to fit the baselines on (residual probe; bandit on Python rows)")
    evl.add_argument("--benign", help="JSONL of ordinary traffic (labels ignored): adds TPR at 1%% benign FPR")
    evl.add_argument("--group-by", default="source", metavar="FIELD",
                     help="also report every measure per value of FIELD (source, language, cwe, "
                          "subtype; 'none': no groups)")
    evl.add_argument("--leave-one-out", default=None, metavar="FIELD",
                     help="also fit the residual probe on all groups of FIELD but one and score the one left out")
    evl.add_argument("--items", action="store_true", help="with --json: include per-item scores and decisions")
    evl.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    evl.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                     help="precision of the forward passes: float32 (default) is the live monitor's; bfloat16 "
                          "runs them under autocast, 2-3x faster on CPUs with native bfloat16 and on GPUs")
    evl.set_defaults(func=cmd_eval)


def cmd_train(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``sae-monitor train``: extract activations, train, write a SAELens-format SAE."""
    from monitor.train import TrainConfig, run_training

    cfg = TrainConfig(d_sae=args.d_sae, k=args.k, architecture=args.architecture,
                      batch_tokens=args.batch_tokens, lr=args.lr, epochs=args.epochs, seed=args.seed)
    def log(figures: dict[str, Any]) -> None:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()),
              file=err, flush=True)

    run_training(model=args.model, data=args.data, layer=args.layer, site=args.site,
                 max_tokens=args.tokens, ctx=args.ctx, out=Path(args.out), cfg=cfg,
                 progress=progress_line(err, "extract", False), on_log=log)
    return 0


def cmd_sae_eval(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``sae-monitor sae-eval``: reconstruction and sparsity measures of an SAE on texts."""
    from monitor.data import iter_texts
    from monitor.models import load_model
    from monitor.sae import load_sae
    from monitor.sae_eval import evaluate_sae

    model, tokenizer = load_model(args.model)
    sae = load_sae(args.sae)
    texts = list(iter_texts([args.texts], tokenizer))
    if args.limit:
        texts = texts[: args.limit]
    result = evaluate_sae(model, tokenizer, sae, texts, ctx=args.ctx,
                          progress=progress_line(err, "texts", bool(args.json)))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2), file=out)
    else:
        for key, value in result.to_dict().items():
            print(f"{key:<14} {value:.4f}" if isinstance(value, float) else f"{key:<14} {value}",
                  file=out)
    return 0


def parse_names(pairs: list[str]) -> dict[int, str]:
    """``["4711=a.b", ...]`` -> ``{4711: "a.b"}``; a malformed pair is a :class:`MonitorError`."""
    names = {}
    for pair in pairs:
        latent, sep, name = pair.partition("=")
        if not sep or not latent.strip().isdigit() or not name.strip():
            raise MonitorError(f"--name {pair!r}: expected LATENT=NAME, e.g. 4711=unsafe_code.shell_injection")
        names[int(latent)] = name.strip()
    return names


def cmd_discover(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``sae-monitor discover``: rank latents on labeled texts; with ``--out``, write a catalog."""
    names = parse_names(args.name)
    writes = bool(names or args.catalog_top or args.probe)
    if writes and not args.out:
        raise MonitorError("--name, --catalog-top and --probe write a catalog: give --out CATALOG.yaml")
    if args.out and not writes:
        raise MonitorError("--out needs features to write: --name LATENT=NAME, --catalog-top N or --probe NAME")

    import torch

    from monitor import discover as disc
    from monitor.catalog_build import write_discovered
    from monitor.data import iter_texts
    from monitor.metrics import sae_identity
    from monitor.models import load_model
    from monitor.sae import load_sae

    quiet = args.json or args.quiet
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype))
    sae = load_sae(args.sae)
    sae_id = args.sae_id or (args.sae if args.sae == "default" else sae_identity(sae))
    items = disc.load_discovery_items(tokenizer, data=args.data or (), category=args.category,
                                      positive=args.positive or (), negative=args.negative or (),
                                      per_label=args.per_label, seed=args.seed)
    result = disc.discover(model, tokenizer, sae, items, top=args.top, direction=args.direction,
                           ctx=args.ctx, batch_size=args.batch_size,
                           progress=progress_line(err, "texts", quiet))
    report: dict[str, Any] = {"sae": sae_id, **result.to_dict()}
    if not args.json:
        print(result.table("markdown" if args.markdown else "terminal"), file=out)
    if args.fit_on:
        moved = disc.transfer(result, args.fit_on, key=args.transfer_key, top=args.top)
        report["transfer"] = moved.to_dict()
        if not args.json:
            print(f"Transfer: latents picked on {args.transfer_key}={args.fit_on}, AUROC elsewhere\n",
                  file=out)
            print(moved.table(), file=out)
    if args.out:
        def stage_progress(stage: str, done: int, total: int) -> None:
            line = progress_line(err, stage, quiet)
            if line is not None:
                line(done, total)

        corpus = list(iter_texts(args.max_corpus, tokenizer)) if args.max_corpus else None
        written = write_discovered(model, tokenizer, sae, result, items, args.out, sae_id=sae_id,
                                   names=names, catalog_top=args.catalog_top, probe=args.probe,
                                   probe_l2=args.probe_l2, corpus=corpus, ctx=args.ctx,
                                   batch_size=args.batch_size, seed=args.seed,
                                   progress=stage_progress)
        if written.probe is not None:
            report["probe"] = dict(written.probe)
            if not args.json:
                print(f"probe {args.probe}: held-out AUROC "
                      f"{written.probe.get('auroc_heldout', 'n/a')} "
                      f"({written.probe['n_heldout']} texts)", file=out)
        report["catalog"] = {"path": str(written.path), "written": list(written.written)}
        if not args.json:
            print(f"wrote {len(written.written)} feature(s) to {written.path}: "
                  f"{', '.join(written.written)}", file=out)
    if args.json:
        print(json.dumps(report, indent=2), file=out)
    return 0


def cmd_explain(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``sae-monitor explain``: what one latent (or a named catalog feature) responds to."""
    import torch

    from monitor.catalog import load_catalog
    from monitor.data import iter_texts
    from monitor.explain import (format_contexts, format_logit_effects, logit_effects, render_html,
                                 scan_latents)
    from monitor.models import load_model
    from monitor.sae import load_sae

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
                            progress=progress_line(err, "texts", not err.isatty()))[latent]
        contexts, histogram = scan.contexts, scan.histogram
    color = not args.no_color and out.isatty()
    title = f"latent {latent}" + (f" ({name})" if name else "")
    if texts is not None and histogram is not None:
        print(format_contexts(contexts, color=color, title=f"{title}: top {len(contexts)} of {len(texts)} texts, "
                              f"fires on {histogram.density:.2%} of tokens"), file=out)
    else:
        print(f"{title}: no --texts given, showing logit effects only", file=out)
    print(format_logit_effects(effects), file=out)
    if args.html:
        path = render_html(latent, contexts, histogram, effects, args.html, name=name,
                           description=description, texts=texts)
        print(f"wrote {path}", file=out)
    return 0


def cmd_eval(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``sae-monitor eval``: detection per category against baselines, as a table or JSON."""
    from monitor.evaluation.run import run_eval

    print(run_eval(args.data, policies=args.policies, train=args.train, limit=args.limit or None,
                   sae=args.sae, model=args.model, catalog=args.catalog, as_json=args.json,
                   items=args.items, progress=progress_line(err, "items", args.no_progress),
                   group_by=None if args.group_by.lower() == "none" else args.group_by,
                   leave_one_out=args.leave_one_out, benign=args.benign,
                   batch_size=args.batch_size, dtype=args.dtype), end="", file=out)
    return 0
