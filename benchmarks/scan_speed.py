#!/usr/bin/env python
"""How fast does evaluation read items? One at a time (today's path) against batched, in one run.

    python benchmarks/scan_speed.py                       # default model, shipped SAE and policies
    python benchmarks/scan_speed.py --n 200 --batch-size 16 --json runs/scan_speed.json
    python benchmarks/scan_speed.py --tiny                # tiny random model: a smoke run

Items: ``--n`` rows drawn by a fixed seed, in equal shares, from the dev files (``--data``;
default: SVEN code pairs, Juliet backdoor pairs, TruthfulQA dialogues and political-opinion
dialogues from ``../shared/data``), cut by :func:`monitor.evaluation.items.eval_item` exactly as
``sae-monitor eval`` cuts them. Modes, each over the same items:

* ``scan, one at a time``: ``Monitor.scan`` per item, the path ``eval`` took (a full forward of
  the whole model at batch 1, then the policy engine);
* ``scan_many, batched``: ``Monitor.scan_many(items, batch_size)``, when the monitor has it;
* ``scan_many, batched, bfloat16``: the same with ``dtype="bfloat16"`` (``eval --dtype bfloat16``);
* ``extraction, batched``: the watched latents' peaks over each item's scan scope through
  :func:`monitor.activations.pool_windows` (what discover, probes and the eval baselines use),
  length-bucketed, right-padded batches of ``--batch-size``, the forward stopped after the SAE's
  layer; with ``--all-modes`` also at batch 1 (``extraction, one at a time``).

The items are split in ``--chunks`` chunks and every chunk runs every mode, in alternating order,
so load drift on a shared machine hits all modes alike. Reported: items/s per mode and the ratio
to ``scan, one at a time``; and the largest difference between the batched extraction's peaks and
the peaks in the one-at-a-time scans' reports (the per-item results must agree).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FILES = ("unsafe_code/sven_pairs.jsonl", "backdoor/juliet_c_pairs.jsonl",
                 "sycophancy/truthfulqa_constructed_pairs.jsonl", "sycophancy/anthropic_political_pairs.jsonl")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="items in all (default 200)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--data", nargs="+", help="labeled JSONL files (default: four dev files)")
    parser.add_argument("--data-dir", default=str(Path("/work/shared/data")))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--tiny", action="store_true", help="tiny random model and SAE (smoke run)")
    parser.add_argument("--all-modes", action="store_true",
                        help="also the one-at-a-time extraction (separates early stopping from batching)")
    return parser.parse_args(argv)


def sample_rows(files: Sequence[Path], n: int, seed: int) -> list[dict[str, Any]]:
    from monitor.data import read_jsonl

    rng = random.Random(seed)
    rows = []
    for k, path in enumerate(files):
        share = n // len(files) + (k < n % len(files))
        every = list(read_jsonl(path))
        rows += rng.sample(every, min(share, len(every)))
    rng.shuffle(rows)
    return rows


def build_tiny() -> tuple[Any, list[dict[str, Any]]]:
    """A tiny random model, a tied SAE and one rule; rows of mixed lengths."""
    import tempfile

    from monitor.policy import compile_policies, load_policies
    from monitor.runtime.hf import Monitor
    from monitor.testing import tied_sae, tiny_model, tiny_tokenizer

    path = Path(tempfile.mkdtemp()) / "p.yaml"
    path.write_text("version: '1'\nrules:\n  - id: c.r\n    description: d\n    severity: low\n    mode: shadow\n"
                    "    when: {any: [{latent: 1, above: 0.5}, {latent: 4, above: 0.5}]}\n    actions: [log]\n")
    policy = compile_policies(load_policies(path), None, d_sae=16)
    monitor = Monitor(tiny_model("llama"), tiny_tokenizer(), sae=tied_sae(2), policies=policy, self_test=False)
    rng = random.Random(0)
    rows = [{"prompt": "User: " + "q" * rng.randint(1, 20) + "\nAssistant: ",
             "response": " ".join("w" * rng.randint(1, 6) for _ in range(rng.randint(1, 30))),
             "label": i % 2, "category": "c"} for i in range(24)]
    return monitor, rows


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from monitor.activations import max_pool, pool_windows, sae_encoder
    from monitor.evaluation.items import eval_item, scan_window
    from monitor.evaluation.run import monitor_for_eval
    from monitor.runtime.scan import ScanItem

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        monitor, rows = build_tiny()
        setup = "tiny random llama, tied SAE, one rule"
    else:
        files = [Path(f) for f in args.data] if args.data else [Path(args.data_dir) / f for f in DEFAULT_FILES]
        rows = sample_rows(files, args.n, args.seed)
        monitor, _ = monitor_for_eval()
        setup = "default model (fp32), shipped SAE and policies"
    tok = monitor.tokenizer
    items = [eval_item(row, tok, source=f"row {n}") for n, row in enumerate(rows)]
    latents = [f.index for f in monitor.policy.features if f.kind == "latent"]
    point = monitor.point
    encoders = {point: sae_encoder(monitor.sae, latents)}
    windows = [scan_window(tok, item) for item in items]
    pad = tok.pad_token_id or 0

    def scan(chunk: list[int]) -> list[Any]:
        return [monitor.scan(items[i].transcript if isinstance(items[i].transcript, str)
                             else list(items[i].transcript), prompt=items[i].prompt) for i in chunk]

    def scan_many(dtype: str) -> Callable[[list[int]], list[Any]]:
        def run(chunk: list[int]) -> list[Any]:
            return monitor.scan_many([ScanItem(items[i].transcript if isinstance(items[i].transcript, str)
                                               else list(items[i].transcript), items[i].prompt) for i in chunk],
                                     batch_size=args.batch_size, dtype=dtype)
        return run

    def extract(batch_size: int) -> Callable[[list[int]], torch.Tensor]:
        def run(chunk: list[int]) -> torch.Tensor:
            return pool_windows(monitor.model, [windows[i] for i in chunk], encoders, pad_id=pad,
                                pool=max_pool(None), batch_size=batch_size)[point]
        return run

    modes: dict[str, Callable[[list[int]], Any]] = {"scan, one at a time": scan}
    if hasattr(monitor, "scan_many"):
        modes["scan_many, batched"] = scan_many("float32")
        modes["scan_many, batched, bfloat16"] = scan_many("bfloat16")
    if args.all_modes:
        modes["extraction, one at a time"] = extract(1)
    modes["extraction, batched"] = extract(args.batch_size)
    scan(list(range(min(2, len(items)))))                       # warm up outside the timed region
    order = list(range(len(items)))
    chunks = [order[c::args.chunks] for c in range(args.chunks)]
    seconds = dict.fromkeys(modes, 0.0)
    reports: dict[int, Any] = {}
    peaks: dict[int, torch.Tensor] = {}
    names = list(modes)
    for c, chunk in enumerate(chunks):
        for name in (names if c % 2 == 0 else names[::-1]):
            took, out = timed(lambda: modes[name](chunk))
            seconds[name] += took
            print(f"chunk {c + 1}/{len(chunks)} {name}: {len(chunk)} items in {took:.1f} s",
                  file=sys.stderr, flush=True)
            if name == "scan, one at a time":
                reports.update(zip(chunk, out))
            elif name == "extraction, batched":
                peaks.update(zip(chunk, out))
    diff = 0.0
    scale = 0.0
    n_latents = len(latents)
    for i, report in reports.items():
        found = report.peaks.get("response")
        if found is None:
            continue
        got = peaks[i]
        want = found[0][:n_latents].float()
        both = torch.isfinite(got) & torch.isfinite(want) & (want > 0)
        if bool(both.any()):
            diff = max(diff, float((got[both] - want[both]).abs().max()))
            scale = max(scale, float(want[both].abs().max()))
    base = len(items) / seconds["scan, one at a time"]
    rows_out = [{"mode": name, "seconds": round(s, 2), "items_per_second": round(len(items) / s, 3),
                 "ratio_to_scan": round(len(items) / s / base, 2)} for name, s in seconds.items()]
    result = {"setup": setup, "items": len(items), "batch_size": args.batch_size, "rows": rows_out,
              "peak_max_abs_diff": diff, "peak_scale": scale,
              "tokens": sum(len(w[0]) for w in windows),
              "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                              "cpu": platform.processor() or platform.machine()}}
    print(markdown(result), end="")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    monitor.close()
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Scan speed: {result['items']} items ({result['tokens']} tokens), {result['setup']}, "
             f"batch size {result['batch_size']}, {result['environment']['threads']} threads", "",
             "| mode | seconds | items/s | × scan one at a time |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['mode']} | {r['seconds']} | {r['items_per_second']} | {r['ratio_to_scan']} |"
              for r in result["rows"]]
    lines += ["", f"largest |batched extraction peak - scan report peak| over watched latents: "
              f"{result['peak_max_abs_diff']:.2e} (largest peak {result['peak_scale']:.2f})"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
