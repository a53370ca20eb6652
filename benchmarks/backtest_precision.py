"""How far a bfloat16 backtest (``--dtype bfloat16``) is from the float32 one, measured on the same
conversations in one run: the conversations flagged, the per-conversation decisions, the
(conversation, rule) firings and their first positions, the largest difference of each watched
feature's peak (max over a conversation's monitored tokens), and whether the last-turn
``Monitor.scan`` (float32, one at a time) flagged a conversation or a rule that either run did not.

    python benchmarks/backtest_precision.py                 # 80 rows from each of three dev sets + the samples
    python benchmarks/backtest_precision.py --per-file 20 --skip-scan

The conversations: the backtest samples (``tests/backtest/data``) and, from the development data
(``/work/shared/data``, not copied), TruthfulQA and Anthropic political sycophancy dialogues
(``messages``) and PurpleLlama insecure-code prompt/response rows (the code cut to 3000
characters). The shipped policies; the default model on this machine's CPU.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from backtest import agreement, scan_guarantee  # noqa: E402
from monitor.backtest.read import Conversation, read_records  # noqa: E402
from monitor.backtest.replay import Replay, plan  # noqa: E402
from monitor.backtest.run import BacktestConfig, default_parts, prepare, run_backtest  # noqa: E402
from monitor.backtest.scan import forward_precision  # noqa: E402
from monitor.capture import forward_through  # noqa: E402
from monitor.runtime.encoder import FeatureEncoder  # noqa: E402
from monitor.runtime.scan import length_buckets, monitor_mask, pad_batch  # noqa: E402
from monitor.shipped import shipped_policies_dir  # noqa: E402

SHARED = Path("/work/shared/data")
SAMPLES = ROOT / "tests" / "backtest" / "data" / "conversations.jsonl"


def build_data(path: Path, per_file: int) -> None:
    rows = [json.loads(x) for x in SAMPLES.read_text().splitlines() if x.strip()]
    for name in ("sycophancy/truthfulqa_constructed_pairs.jsonl", "sycophancy/anthropic_political_pairs.jsonl"):
        src = [json.loads(x) for x in (SHARED / name).read_text().splitlines()[:per_file]]
        rows += [{"id": r["id"], "messages": r["messages"]} for r in src]
    src = [json.loads(x) for x in (SHARED / "unsafe_code/purplellama_insecure_positives.jsonl").read_text()
           .splitlines()[:per_file]]
    rows += [{"id": r["id"], "prompt": r.get("prompt") or "Write the code.", "response": r["text"][:3000]}
             for r in src]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@torch.no_grad()
def peaks(parts, encoder: FeatureEncoder, convs: list[Conversation], dtype: str) -> dict[str, torch.Tensor]:
    """key -> the max of each watched feature over the conversation's monitored tokens (the
    backtest's masks), from forwards at ``dtype`` (batch 16, as the backtest runs them)."""
    replays = [plan(parts.tokenizer, c, 1 << 30) for c in convs]
    rows = [(c.key, r.rows[-1].ids) for c, r in zip(convs, replays) if isinstance(r, Replay)]
    special = torch.tensor(sorted(set(parts.tokenizer.all_special_ids)), dtype=torch.long)
    out: dict[str, torch.Tensor] = {}
    pad = parts.tokenizer.pad_token_id if parts.tokenizer.pad_token_id is not None else 0
    for bucket in length_buckets([len(ids) for _, ids in rows], 16, 4096):
        ids, attention = pad_batch([rows[i][1] for i in bucket], pad)
        captured: list[torch.Tensor] = []
        with forward_precision(dtype, torch.device("cpu")):
            forward_through(parts.model, {parts.sae.hook_point: captured.append}, input_ids=ids,
                            attention_mask=None if bool(attention.all()) else attention)
        resid = captured[0].float()
        feats = encoder.encode(resid)
        mask = monitor_mask(ids, attention.sum(1), special, False) & encoder.content_mask(resid)
        feats = feats.masked_fill(~mask[..., None], float("-inf")).amax(1)
        for n, i in enumerate(bucket):
            out[rows[i][0]] = feats[n]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-file", type=int, default=80)
    ap.add_argument("--policies", default=str(shipped_policies_dir()))
    ap.add_argument("--skip-scan", action="store_true", help="skip the one-at-a-time last-turn scan check")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="backtest-precision-"))
    data = work / "data.jsonl"
    build_data(data, args.per_file)
    parts = default_parts()
    convs = [r for r in read_records([data]) if isinstance(r, Conversation)]
    print(f"{len(convs)} conversations, {torch.get_num_threads()} torch threads", flush=True)
    report: dict = {"conversations": len(convs)}
    rows = {}
    for dtype in ("float32", "bfloat16"):
        cfg = BacktestConfig(data=[str(data)], policies=args.policies, out=str(work / dtype), batch_size=32,
                             dtype=dtype)
        started = time.perf_counter()
        outcome = run_backtest(cfg, parts)
        report[f"seconds_{dtype}"] = time.perf_counter() - started
        report["tokens"] = outcome.summary["tokens"]
        rows[dtype] = outcome.rows
        print(f"  {dtype}: {report[f'seconds_{dtype}']:.1f} s", flush=True)
    report["agreement_bf16_vs_fp32"] = agreement(rows["float32"], rows["bfloat16"])

    version = prepare(BacktestConfig(data=[str(data)], policies=args.policies, out=str(work / "p")), parts)[0][0]
    encoder = FeatureEncoder(parts.sae, version.policy, parts.catalog)
    names = [f.name or f"{f.kind} {f.index}" for f in version.policy.features]
    p32, p16 = peaks(parts, encoder, convs, "float32"), peaks(parts, encoder, convs, "bfloat16")
    diff = torch.stack([(p32[k] - p16[k]).abs() for k in p32])  # [conversations, features]
    scale = torch.stack([p32[k] for k in p32]).abs().amax(0).clamp_min(1e-6)
    worst = int(diff.amax(0).argmax())
    report["peaks"] = {
        "features": len(names), "max_abs_diff": float(diff.max()),
        "max_abs_diff_feature": names[worst], "max_abs_diff_relative_to_feature_max": float((diff / scale).max()),
        "median_abs_diff": float(diff.median()), "p99_abs_diff": float(torch.quantile(diff.flatten(), 0.99)),
        "per_feature_max": {n: round(float(d), 4) for n, d in zip(names, diff.amax(0))},
        "per_feature_fp32_max_peak": {n: round(float(s), 4) for n, s in zip(names, scale)}}
    print("peaks:", json.dumps(report["peaks"], indent=1), flush=True)

    if not args.skip_scan:
        from monitor.backtest.policies import compile_dir
        from monitor.runtime.hf import Monitor

        mon = Monitor(parts.model, parts.tokenizer, sae=parts.sae,
                      policies=compile_dir(args.policies, parts.catalog, parts.sae.cfg.d_sae), catalog=parts.catalog,
                      self_test=False, on_error="open")
        started = time.perf_counter()
        scan_rules = {c.key: {h.rule_id for h in mon.scan([dict(m) for m in c.messages]).hits} for c in convs}
        report["seconds_scan_last_turn"] = time.perf_counter() - started
        mon.close()
        report["scan_guarantee"] = {d: scan_guarantee(scan_rules, r) for d, r in rows.items()}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
