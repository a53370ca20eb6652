"""What every ``sae-monitor`` command shares: the command signature, the parent parsers of
repeated options, the input-path check and a stderr progress line.

Imports nothing heavy: the parser is built on every invocation (``--version`` included), so
this module and every command module import torch, transformers and the model code only
inside command functions.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from monitor.errors import DataError

#: A command: parsed arguments, stdout, stderr -> exit status (0 ok; 2 a ``MonitorError``).
Command = Callable[[argparse.Namespace, TextIO, TextIO], int]

#: ``add_subparsers()`` result (argparse keeps its type private).
Subparsers = Any


@dataclass(frozen=True)
class Parents:
    """Parent parsers of the options several commands take, so each is spelled, defaulted and
    explained once: ``subparsers.add_parser("x", parents=[parents.model, parents.sae])``."""

    model: argparse.ArgumentParser
    sae: argparse.ArgumentParser
    catalog: argparse.ArgumentParser
    dtype: argparse.ArgumentParser
    json: argparse.ArgumentParser
    batch_size: argparse.ArgumentParser
    ctx: argparse.ArgumentParser
    limit: argparse.ArgumentParser
    seed: argparse.ArgumentParser


def _parent(*flags: str, **kwargs: Any) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(*flags, **kwargs)
    return parser


def build_parents() -> Parents:
    """Fresh parent parsers (one set per top-level parser)."""
    return Parents(
        model=_parent("--model", default="default",
                      help="'default' (SmolLM2-135M-Instruct) or a Hugging Face model directory"),
        sae=_parent("--sae", default="default",
                    help="'default' (the shipped SAE) or an SAE directory"),
        catalog=_parent("--catalog", default=None, help=(
            "feature catalog YAML resolving feature names (default: the shipped SAE's catalog "
            "with --sae default)")),
        dtype=_parent("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                      help="model precision (bfloat16 is faster on CPU)"),
        json=_parent("--json", action="store_true", help="print JSON instead of tables"),
        batch_size=_parent("--batch-size", type=int, default=8, help="texts per forward pass"),
        ctx=_parent("--ctx", type=int, default=256, help="tokens per text (longer ones are cut)"),
        limit=_parent("--limit", type=int, default=0, help="use only the first N texts (0: all)"),
        seed=_parent("--seed", type=int, default=0),
    )


# Arguments that name input files or directories (never the 'default' SAE or model names).
INPUT_PATH_ARGS = ("data", "texts", "positive", "negative", "train", "benign", "catalog",
                   "policies")


def check_input_paths(args: argparse.Namespace) -> None:
    """Fail on a missing input file before a command spends seconds loading the model."""
    for name in INPUT_PATH_ARGS:
        value = getattr(args, name, None)
        for path in [value] if isinstance(value, str) else value or ():
            if not Path(path).exists():
                option = "--" + name.replace("_", "-")
                raise DataError(f"{option} {path}: no such file or directory")


def positive_int(text: str) -> int:
    """argparse ``type=`` for counts and limits: a usage error, not a traceback, for 0 or less."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 1 or more")
    return value


def progress_line(err: TextIO, label: str, quiet: bool) -> Callable[[int, int], None] | None:
    """A ``progress(done, total)`` callback drawing ``label done/total`` on one line of
    ``err``; None when ``quiet``."""
    if quiet:
        return None

    def report(done: int, total: int) -> None:
        print(f"\r{label} {done}/{total}", end="\n" if done == total else "", file=err, flush=True)

    return report
