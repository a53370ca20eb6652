"""Backtest throughput, measured in one run: the local path at batch sizes 1, 8 and 32 (and at 32
with every turn as its own forward row, the plan the one-forward replay replaces), Ray Data with
1 and 2 workers, and today's one-at-a-time ``Monitor.scan`` on the same conversations.

    python benchmarks/backtest.py                       # the repo's sample conversations x 2
    python benchmarks/backtest.py --data logs.jsonl --limit 200 --skip-ray

Prints conversations/s and tokens/s per configuration and the ratio of each to both
one-at-a-time scans. Two baselines, both on the same conversations: ``scan (last turn)`` is one
``Monitor.scan(messages)`` per conversation, which evaluates only the last turn as a request;
``scan (every turn)`` is one ``scan`` per assistant turn (what it takes to get the backtest's
per-turn answer with ``scan``). Every configuration writes its results to a fresh directory
(the whole job: reading, scanning, committing chunks, merging, summary).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from monitor.backtest.read import Conversation, expand, read_records  # noqa: E402
from monitor.backtest.run import BacktestConfig, default_parts, finish, prepare, run_backtest  # noqa: E402
from monitor.backtest.scan import MAX_BATCH_TOKENS, Scanner  # noqa: E402
from monitor.shipped import shipped_policies_dir  # noqa: E402


def line(name: str, seconds: float, convs: int, tokens: int, bases: list[float]) -> str:
    rate = convs / seconds
    ratios = "".join(f"  {rate / b:6.1f}x" for b in bases)
    return f"{name:<30} {seconds:8.1f} s  {rate:8.2f} conv/s  {tokens / seconds:9.0f} tok/s{ratios}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "tests" / "backtest" / "data" / "conversations.jsonl"))
    ap.add_argument("--repeat", type=int, default=2, help="copies of the data (distinct records)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--policies", default=str(shipped_policies_dir()))
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--max-batch-tokens", type=int, default=MAX_BATCH_TOKENS)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="backtest-bench-"))
    lines = [ln for p in expand(args.data) for ln in p.read_text().splitlines() if ln.strip()]
    lines = (lines * args.repeat)[: args.limit or None]
    data = work / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    convs = [r for r in read_records([data]) if isinstance(r, Conversation)]
    parts = default_parts()
    import torch

    print(f"{len(convs)} conversations, {torch.get_num_threads()} torch threads, policies {args.policies}")
    results: dict[str, dict] = {}

    def record(name: str, seconds: float, tokens: int) -> None:
        results[name] = {"seconds": seconds, "conversations": len(convs), "tokens": tokens}
        print(f"  measured {name}: {seconds:.1f} s", flush=True)

    bases: list[float] = []
    if not args.skip_baseline:
        from monitor.runtime.hf import Monitor

        from monitor.backtest.policies import compile_dir

        policy = compile_dir(args.policies, parts.catalog, parts.sae.cfg.d_sae)
        mon = Monitor(parts.model, parts.tokenizer, sae=parts.sae, policies=policy, catalog=parts.catalog,
                      self_test=False, on_error="open")
        started = time.perf_counter()
        reports = [mon.scan([dict(m) for m in c.messages]) for c in convs]
        t = time.perf_counter() - started
        assert len(reports) == len(convs)
        record("scan (last turn)", t, 0)
        turns = [[dict(m) for m in c.messages[:i + 1]]
                 for c in convs for i, m in enumerate(c.messages) if m["role"] == "assistant"]
        started = time.perf_counter()
        for messages in turns:
            mon.scan(messages)
        record("scan (every turn)", time.perf_counter() - started, 0)
        mon.close()
        bases = [len(convs) / results[k]["seconds"] for k in ("scan (last turn)", "scan (every turn)")]

    tok_budget = args.max_batch_tokens
    for bs in (1, 8, 32):
        cfg = BacktestConfig(data=[str(data)], policies=args.policies, out=str(work / f"local-{bs}"), batch_size=bs,
                             max_batch_tokens=tok_budget)
        started = time.perf_counter()
        outcome = run_backtest(cfg, parts)
        record(f"backtest local batch {bs}", time.perf_counter() - started, outcome.summary["tokens"])
    # the scan stage alone (no reading or writing), batch 32: one forward per conversation vs one row per turn
    versions = prepare(BacktestConfig(data=[str(data)], policies=args.policies, out=str(work / "scanner")), parts)[0]
    for one_forward in (True, False):
        scanner = Scanner(parts.model, parts.tokenizer, parts.sae, [v.policy for v in versions], parts.catalog,
                          batch_size=32, max_batch_tokens=tok_budget, one_forward=one_forward)
        started = time.perf_counter()
        scanner.scan(convs)
        record(f"scan stage, {'one forward' if one_forward else 'row per turn'}", time.perf_counter() - started, 0)

    if not args.skip_ray:
        import ray

        from monitor.backtest.ray_runner import connect, run_on_ray

        for workers in (1, 2):
            connect(None, num_cpus=workers + 1)
            cfg = BacktestConfig(data=[str(data)], policies=args.policies, out=str(work / f"ray-{workers}"),
                                 batch_size=8, max_batch_tokens=tok_budget)
            started = time.perf_counter()
            versions, store, paths = prepare(cfg, parts)
            run_on_ray(paths, versions, store, factory=default_parts, workers=workers, batch_size=cfg.batch_size,
                       chunk_size=cfg.chunk_size, max_batch_tokens=cfg.max_batch_tokens)
            outcome = finish(cfg, versions, store)
            record(f"backtest ray {workers} worker{'s' if workers > 1 else ''}", time.perf_counter() - started,
                   outcome.summary["tokens"])
            ray.shutdown()

    # tokens/s counts every token of every conversation (the backtest's count) for all lines
    tokens = next((r["tokens"] for n, r in results.items() if n.startswith("backtest")), 0)
    print(f"{'configuration':<30} {'time':>10}  {'rate':>13}  {'tokens':>13}  vs scan: last turn, every turn")
    for name, r in results.items():
        print(line(name, r["seconds"], r["conversations"], tokens, bases))
    print("(Ray times include starting the actors, each loading the model and SAE)")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
