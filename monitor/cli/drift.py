"""``sae-monitor drift``: did a fine-tune make the model more likely to do what the policies watch for?

Follows the command-module convention of :mod:`monitor.cli`: ``add_parser(subparsers,
parents)`` registers the command, ``cmd_drift(args, out, err) -> int`` runs it. Exit status:
1 when an enforce rule's firing rate increased under any candidate (a CI gate), 0 otherwise,
2 for bad input (one plain line naming the path and the problem).
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace
from typing import Any, TextIO

EXAMPLES = """examples:
  sae-monitor drift --candidate runs/lora-adapter
  sae-monitor drift --base default --candidate ckpt-100 --candidate ckpt-200 --candidate ckpt-300 \\
      --prompts prompts.jsonl --texts texts.jsonl --html drift.html
"""


def _fallback_parents() -> Any:
    """Parent parsers for a CLI without shared ones (the options the shared ones would give)."""
    def one(*flags: str, **kwargs: Any) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(add_help=False)
        p.add_argument(*flags, **kwargs)
        return p

    return SimpleNamespace(
        sae=one("--sae", default="default", help="'default' (the shipped SAE) or an SAE directory"),
        catalog=one("--catalog", default=None, help="feature catalog YAML (default: the shipped SAE's catalog)"),
        json=one("--json", action="store_true", help="print JSON instead of tables"),
        seed=one("--seed", type=int, default=0))


def add_parser(subparsers: Any, parents: Any = None) -> None:
    """Register ``drift`` on ``subparsers`` (``parents``: the CLI's shared parent parsers)."""
    parents = parents if parents is not None else _fallback_parents()
    p = subparsers.add_parser(
        "drift", parents=[parents.sae, parents.catalog, parents.json, parents.seed],
        help="compare a fine-tuned model (checkpoint or LoRA adapter) with its base under the SAE and policies",
        description=__doc__.split("\n\n")[0], epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="default", help="'default' or a model directory (default: default)")
    # its own option, not the shared parent's: set_defaults on a shared parent's action would
    # change the default of every command
    p.add_argument("--batch-size", type=int, default=None,
                   help="prompts/texts per forward pass (default: sized for generation)")
    p.add_argument("--candidate", action="append", required=True, metavar="MODEL",
                   help="a checkpoint directory or a PEFT adapter directory; repeat for a checkpoint series")
    p.add_argument("--prompts", default=None, help="JSONL of prompts both models answer (default: a built-in set)")
    p.add_argument("--texts", default=None, help="JSONL of unrelated texts for the lens and KL (default: built-in)")
    p.add_argument("--policies", default=None, help="policy files or directory (default: the shipped policies)")
    p.add_argument("--direction", action="append", default=None, metavar="PAIRS.jsonl",
                   help="minimal-pair file (e.g. datasets/unsafe_code_pairs.jsonl) whose concept direction "
                        "to follow: the candidate's shift along concept minus contrast (repeat; default: none)")
    p.add_argument("--preference", action="append", default=None, metavar="PAIRS.jsonl",
                   help="minimal-pair file on which to measure the candidate's change of preference (likelihood) "
                        "for the concept side, e.g. vulnerable over fixed code the fine-tune never saw (repeat)")
    p.add_argument("--html", default=None, metavar="REPORT.html", help="also write an HTML report")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--passes", default="greedy,sampled", help="comma-separated: greedy, sampled (default: both)")
    p.add_argument("--fdr", type=float, default=0.05, help="false-discovery rate of the verdicts")
    p.add_argument("--kl-tokens", type=int, default=32, help="first N tokens of each text for the KL")
    p.add_argument("--lens-tokens", type=int, default=8, help="first N tokens of each text for the difference lens")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--include-text", action="store_true",
                   help="put prompts, answers and contexts in the JSON (off: no text leaves the report)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_drift)


def _progress(err: TextIO, quiet: bool) -> Any:
    if quiet:
        return None
    from tqdm import tqdm  # type: ignore[import-untyped]

    bars: dict[str, Any] = {}

    def report(stage: str, advance: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            for old in bars.values():
                old.close()
            bars.clear()
            bar = bars[stage] = tqdm(total=total, desc=stage, file=err, leave=False, dynamic_ncols=True)
        bar.update(advance)

    return report


def cmd_drift(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from monitor.drift import DriftInputError, Options, drift
    from monitor.drift.render import render_html, table, to_json

    passes = tuple(p.strip() for p in args.passes.split(",") if p.strip())
    bad = [p for p in passes if p not in ("greedy", "sampled")]
    if bad or not passes:
        raise DriftInputError(f"--passes {args.passes!r}: use greedy, sampled or greedy,sampled")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    options = Options(max_new_tokens=args.max_new_tokens, passes=passes, seed=args.seed, fdr=args.fdr,
                      batch_size=args.batch_size or Options.batch_size, kl_tokens=args.kl_tokens,
                      lens_tokens=args.lens_tokens)
    result = drift(args.base, args.candidate, prompts=args.prompts, texts=args.texts, sae=args.sae,
                   catalog=args.catalog, policies=args.policies, options=options,
                   directions=args.direction, preferences=args.preference,
                   progress=_progress(err, args.quiet))
    out.write(to_json(result, include_text=args.include_text) + "\n" if args.json else table(result))
    if args.html:
        path = render_html(result, args.html)
        print(f"wrote {path}", file=err)
    return result.exit_code
