"""``sae-monitor info``: the default model, SAE and policy paths and whether each is present."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TextIO

from monitor.cli.common import Parents, Subparsers
from monitor.errors import MonitorError
from monitor.version import __version__


def add_parser(subparsers: Subparsers, parents: Parents) -> None:
    """Register ``info``."""
    info = subparsers.add_parser("info", parents=[parents.json], help=(
        "show the default model, SAE and policy paths and whether each is present"))
    info.set_defaults(func=cmd_info)


def _present(path: Path | None) -> str:
    return "present" if path is not None and path.exists() else "missing"


def cmd_info(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """One row per artifact: name, path (or why there is none) and ``present``/``missing``."""
    from monitor import models, sae
    from monitor.shipped import shipped_policies_dir

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
        print(json.dumps({name.strip(): {"value": value, "status": status}
                          for name, value, status in rows}, indent=2), file=out)
    else:
        for name, value, status in rows:
            print(f"{name:<18} {value}" + (f"  [{status}]" if status else ""), file=out)
    return 0
