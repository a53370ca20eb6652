"""``sae-monitor backtest``: what would these policies have done on logged traffic?

Registered by the CLI package through :func:`add_parser` (``add_parser(subparsers, parents)``);
the command is :func:`cmd_backtest` ``(args, out, err) -> int``. The work happens in
:mod:`monitor.backtest`; this module only parses, shows progress on ``err`` and prints.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TextIO

DEFAULT_OUT = "backtest-results"


def add_parser(subparsers: Any, parents: Any = None) -> argparse.ArgumentParser:
    """Register ``backtest`` (``parents`` is accepted for the CLI convention; unused here)."""
    p = subparsers.add_parser(
        "backtest", help="replay logged conversations through the model's features under one or two policy versions",
        description="Backtest policies on logged traffic (JSONL or Parquet of OpenAI-chat messages, prompt/response "
                    "rows, or sae-monitor's own logs): per conversation the rules that fired and where, a per-rule "
                    "summary, and with --against the diff between two policy versions.")
    p.add_argument("--data", dest="logs", nargs="+", required=True, metavar="LOGS",
                   help="files, directories or globs of .jsonl / .jsonl.gz / .parquet")
    p.add_argument("--policies", default=None, metavar="DIR",
                   help="the candidate policy directory (default: the shipped policies)")
    p.add_argument("--against", default=None, metavar="DIR_OR_GIT_REV",
                   help="the baseline: a policy directory, or a git revision of the --policies files (e.g. main~1)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="RESULTS",
                   help=f"results directory, resumed if it holds a run of the same versions (default: {DEFAULT_OUT})")
    p.add_argument("--fresh", action="store_true", help="refuse to resume: fail if --out already holds a run")
    p.add_argument("--html", default=None, metavar="REPORT.html", help="also write the HTML report")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    p.add_argument("--batch-size", type=int, default=16, help="conversations per forward pass (default 16)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="padded tokens per forward pass; conversations are bucketed by length (default 4096)")
    p.add_argument("--dtype", default="float32", metavar="{float32,bfloat16}",
                   help="the forward's precision: float32 (default; exactly what `scan` computes) or bfloat16 "
                        "(autocast: 2-3x faster where the CPU or GPU has bfloat16, results differ by rounding)")
    p.add_argument("--chunk-size", type=int, default=256, help="records per committed chunk (default 256)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="skip longer conversations, with a reason (default: the model's context)")
    p.add_argument("--include-text", action="store_true",
                   help="keep conversation text in results and examples (default: sha256 digests only)")
    p.add_argument("--field", action="append", default=[], metavar="NAME=PATH",
                   help="where a field lives in other shapes: messages=, prompt=, response=, id=, role=, content= "
                        "(dotted paths reach nested objects); repeatable")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray Data: a cluster address (auto, ray://host:10001) or none for a local runtime")
    p.add_argument("--workers", type=int, default=2, help="Ray actors, each holding one model + SAE (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_backtest)
    return p


def cmd_backtest(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run the backtest, print the summary (table or JSON), write the HTML report if asked."""
    from monitor.backtest.read import FieldMap, expand
    from monitor.backtest.report import render_html, render_json, render_table
    from monitor.backtest.run import BacktestConfig, default_parts, finish, prepare, run_backtest
    from monitor.shipped import shipped_policies_dir

    sizes = {} if args.max_batch_tokens is None else {"max_batch_tokens": args.max_batch_tokens}
    config = BacktestConfig(
        data=list(args.logs), policies=str(args.policies or shipped_policies_dir()), out=args.out,
        against=args.against, batch_size=args.batch_size, chunk_size=args.chunk_size, max_tokens=args.max_tokens,
        include_text=args.include_text, fields=FieldMap.parse(args.field), dtype=args.dtype, **sizes)
    expand(config.data)  # a missing input fails now, not after the model loads
    parts = default_parts()
    bar = None
    if not args.no_progress:
        from tqdm import tqdm  # type: ignore[import-untyped]

        bar = tqdm(file=err, unit="conv", desc="backtest", dynamic_ncols=True)

    seen = [0]  # tokens so far

    def progress(records: int, tokens: int) -> None:
        seen[0] += tokens
        if bar is not None:
            bar.set_postfix(tokens=seen[0], refresh=False)
            bar.update(records)

    try:
        if args.ray is None:
            outcome = run_backtest(config, parts, progress=progress, resume=not args.fresh)
        else:  # the versions compile here, so policy errors surface before the cluster starts
            from monitor.backtest.ray_runner import connect, run_on_ray

            versions, store, paths = prepare(config, parts, resume=not args.fresh)
            connect(None if args.ray == "local" else args.ray)
            run_on_ray(paths, versions, store, factory=default_parts, workers=args.workers,
                       batch_size=config.batch_size, chunk_size=config.chunk_size, max_tokens=config.max_tokens,
                       max_batch_tokens=config.max_batch_tokens, include_text=config.include_text,
                       fields=config.fields, progress=progress, dtype=config.dtype)
            outcome = finish(config, versions, store)
    finally:
        if bar is not None:
            bar.close()
    out.write(render_json(outcome.summary) + "\n" if args.json else render_table(outcome.summary))
    if args.html:
        render_html(outcome.summary, Path(args.html))
    return 0
