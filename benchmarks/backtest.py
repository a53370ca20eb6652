"""Backtest throughput, measured in one run: the local path at batch sizes 1, 8 and 32 in float32
and in bfloat16 (``--dtype``; autocast forward), the scan stage alone at batch 32 (one forward per
conversation against every turn as its own forward row), Ray Data with 1 and 2 workers (float32
and bfloat16), bfloat16 at larger padded-token budgets, and today's one-at-a-time
``Monitor.scan`` (float32) on the same conversations.

    python benchmarks/backtest.py                       # the repo's sample conversations x 2
    python benchmarks/backtest.py --data logs.jsonl --limit 200 --skip-ray

Prints conversations/s and tokens/s per configuration and the ratio of each to both
one-at-a-time scans. Two baselines, both on the same conversations: ``scan (last turn)`` is one
``Monitor.scan(messages)`` per conversation, which evaluates only the last turn as a request;
``scan (every turn)`` is one ``scan`` per assistant turn (what it takes to get the backtest's
per-turn answer with ``scan``). Every configuration writes its results to a fresh directory
(the whole job: reading, scanning, committing chunks, merging, summary).

Then the agreement of bfloat16 with float32 (local batch 32 runs): conversations flagged (any
rule fired), per-conversation decisions, (conversation, rule) firings and their first
positions; and whether the last-turn ``scan`` (float32) flagged any conversation or rule that
each run did not (the guarantee, which holds between runs at the same precision).
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
    return f"{name:<36} {seconds:8.1f} s  {rate:8.2f} conv/s  {tokens / seconds:9.0f} tok/s{ratios}"


def firings(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """key -> rule -> first firing (candidate version) of scanned rows."""
    return {r["key"]: {f["rule"]: f for f in r["candidate_firings"]} for r in rows if r["status"] == "scanned"}


def agreement(a: list[dict], b: list[dict]) -> dict:
    """How the rows of two runs of the same records agree (b against a)."""
    fa, fb = firings(a), firings(b)
    da = {r["key"]: r["candidate_decision"] for r in a if r["status"] == "scanned"}
    db = {r["key"]: r["candidate_decision"] for r in b if r["status"] == "scanned"}
    flagged_a = {k for k, v in fa.items() if v}
    flagged_b = {k for k, v in fb.items() if v}
    pairs_a = {(k, rule) for k, v in fa.items() for rule in v}
    pairs_b = {(k, rule) for k, v in fb.items() for rule in v}
    both = pairs_a & pairs_b
    same_place = sum(fa[k][r]["position"] == fb[k][r]["position"] and fa[k][r]["turn"] == fb[k][r]["turn"]
                     for k, r in both)
    act = [abs(fa[k][r]["activation"] - fb[k][r]["activation"]) for k, r in both
           if fa[k][r]["position"] == fb[k][r]["position"] and fa[k][r]["turn"] == fb[k][r]["turn"]]
    return {"conversations": len(da), "flagged": [len(flagged_a), len(flagged_b)],
            "flagged_only_first": sorted(flagged_a - flagged_b), "flagged_only_second": sorted(flagged_b - flagged_a),
            "decisions_equal": sum(da[k] == db.get(k) for k in da),
            "decision_changes": sorted(f"{k}: {da[k]} -> {db.get(k)}" for k in da if da[k] != db.get(k)),
            "rule_firings": [len(pairs_a), len(pairs_b)], "rule_firings_both": len(both),
            "rule_firings_only_first": sorted(f"{k} {r}" for k, r in pairs_a - pairs_b),
            "rule_firings_only_second": sorted(f"{k} {r}" for k, r in pairs_b - pairs_a),
            "first_firing_same_place": same_place,
            "max_abs_activation_diff_at_same_first_firing": max(act, default=0.0)}


def scan_guarantee(scan_rules: dict[str, set[str]], rows: list[dict]) -> dict:
    """Conversations and (conversation, rule) pairs the last-turn scan flagged that ``rows`` did not."""
    fr = firings(rows)
    missed = sorted(k for k, rules in scan_rules.items() if rules and not fr.get(k))
    missed_rules = sorted(f"{k} {r}" for k, rules in scan_rules.items() for r in rules - set(fr.get(k, {})))
    return {"scan_flagged": sum(bool(v) for v in scan_rules.values()), "flagged_by_scan_not_backtest": missed,
            "rules_by_scan_not_backtest": missed_rules}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "tests" / "backtest" / "data" / "conversations.jsonl"))
    ap.add_argument("--repeat", type=int, default=2, help="copies of the data (distinct records)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--policies", default=str(shipped_policies_dir()))
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--skip-stage", action="store_true", help="skip the two scan-stage-only lines")
    ap.add_argument("--max-batch-tokens", type=int, default=MAX_BATCH_TOKENS)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="local path precisions (comma-separated)")
    ap.add_argument("--ray-dtypes", default="float32,bfloat16", help="Ray precisions (comma-separated)")
    ap.add_argument("--bf16-budgets", default="8192,16384",
                    help="extra --max-batch-tokens for bfloat16 at batch 32 (comma-separated; empty: none)")
    args = ap.parse_args()
    dtypes = [d for d in args.dtypes.split(",") if d]
    ray_dtypes = [d for d in args.ray_dtypes.split(",") if d]
    budgets = [int(b) for b in args.bf16_budgets.split(",") if b]

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
    rows: dict[str, list[dict]] = {}

    def record(name: str, seconds: float, tokens: int) -> None:
        results[name] = {"seconds": seconds, "conversations": len(convs), "tokens": tokens}
        print(f"  measured {name}: {seconds:.1f} s", flush=True)

    bases: list[float] = []
    scan_rules: dict[str, set[str]] = {}
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
        scan_rules = {c.key: {h.rule_id for h in r.hits} for c, r in zip(convs, reports)}
        record("scan (last turn)", t, 0)
        turns = [[dict(m) for m in c.messages[:i + 1]]
                 for c in convs for i, m in enumerate(c.messages) if m["role"] == "assistant"]
        started = time.perf_counter()
        for messages in turns:
            mon.scan(messages)
        record("scan (every turn)", time.perf_counter() - started, 0)
        mon.close()
        bases = [len(convs) / results[k]["seconds"] for k in ("scan (last turn)", "scan (every turn)")]

    def local(bs: int, dtype: str, budget: int) -> None:
        name = f"local {dtype} batch {bs}" + ("" if budget == args.max_batch_tokens else f" ({budget} tok)")
        cfg = BacktestConfig(data=[str(data)], policies=args.policies, out=str(work / name.replace(" ", "-")),
                             batch_size=bs, max_batch_tokens=budget, dtype=dtype)
        started = time.perf_counter()
        outcome = run_backtest(cfg, parts)
        record(name, time.perf_counter() - started, outcome.summary["tokens"])
        rows[name] = outcome.rows

    for dtype in dtypes:
        for bs in (1, 8, 32):
            local(bs, dtype, args.max_batch_tokens)
    if "bfloat16" in dtypes:
        for budget in budgets:
            local(32, "bfloat16", budget)
    # the scan stage alone (no reading or writing), batch 32: one forward per conversation vs one row per turn
    if not args.skip_stage:
        versions = prepare(BacktestConfig(data=[str(data)], policies=args.policies, out=str(work / "scanner")),
                           parts)[0]
        for one_forward in (True, False):
            scanner = Scanner(parts.model, parts.tokenizer, parts.sae, [v.policy for v in versions], parts.catalog,
                              batch_size=32, max_batch_tokens=args.max_batch_tokens, one_forward=one_forward)
            started = time.perf_counter()
            scanner.scan(convs)
            record(f"scan stage float32, {'one forward' if one_forward else 'row per turn'}",
                   time.perf_counter() - started, 0)

    if not args.skip_ray:
        import ray

        from monitor.backtest.ray_runner import connect, run_on_ray

        for dtype in ray_dtypes:
            for workers in (1, 2):
                connect(None, num_cpus=workers + 1)
                name = f"ray {dtype} {workers} worker{'s' if workers > 1 else ''} (batch 8)"
                cfg = BacktestConfig(data=[str(data)], policies=args.policies, out=str(work / name.replace(" ", "-")),
                                     batch_size=8, max_batch_tokens=args.max_batch_tokens, dtype=dtype)
                started = time.perf_counter()
                versions, store, paths = prepare(cfg, parts)
                run_on_ray(paths, versions, store, factory=default_parts, workers=workers, batch_size=cfg.batch_size,
                           chunk_size=cfg.chunk_size, max_batch_tokens=cfg.max_batch_tokens, dtype=dtype)
                outcome = finish(cfg, versions, store)
                record(name, time.perf_counter() - started, outcome.summary["tokens"])
                rows[name] = outcome.rows
                ray.shutdown()

    # tokens/s counts every token of every conversation (the backtest's count) for all lines
    tokens = next((r["tokens"] for n, r in results.items() if r["tokens"]), 0)
    print(f"{'configuration':<36} {'time':>10}  {'rate':>13}  {'tokens':>13}  vs scan: last turn, every turn")
    for name, r in results.items():
        print(line(name, r["seconds"], r["conversations"], tokens, bases))
    print("(Ray times include starting the actors, each loading the model and SAE)")
    report: dict = {"results": results}
    fp32, bf16 = "local float32 batch 32", "local bfloat16 batch 32"
    if fp32 in rows and bf16 in rows:
        report["agreement_bf16_vs_fp32"] = agreement(rows[fp32], rows[bf16])
        print("agreement, local batch 32, bfloat16 against float32:",
              json.dumps(report["agreement_bf16_vs_fp32"], indent=1))
    if scan_rules:
        report["scan_guarantee"] = {name: scan_guarantee(scan_rules, r) for name, r in rows.items()}
        print("last-turn scan (float32) flagged but the run did not:",
              json.dumps(report["scan_guarantee"], indent=1))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
