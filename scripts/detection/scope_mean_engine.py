"""The scope_mean probes through the real runtime: one scan, then LOSO measured by the engine.

    # 1. fit the probes and scan every labeled and benign row once (the model; use the lock)
    python scripts/detection/scope_mean_engine.py scan
    # 2. calibrate and measure through the policy engine and the evaluation harness (no model)
    python scripts/detection/scope_mean_engine.py measure --min-tokens 8
    # 3. write the <category>.final probes into monitor/saes/default/catalog.probes.safetensors
    python scripts/detection/scope_mean_engine.py ship

``scan``: per category, the layer-15 mean-pool probe + benign negatives (compare.py's best
transferring recipe; fitted on extract.py's activations) is fitted once per left-out source
(``<category>.fold_<n>``, on all the category's other sources) and once on every source
(``<category>.final``, what ships). All of them go into a temporary catalog and a policy that reads
them, and every row of the activation database (the same rows: dev sample, datasets/*.jsonl,
benign) is scanned by ``Monitor``'s own pieces exactly as ``Monitor.scan_many`` does it
(``monitor.evaluation.items`` cut, ``scan_token_ids``, ``read_residual`` in float32, the
monitor's ``FeatureEncoder``, ``monitor_mask`` & ``content_mask``). The per-token columns are
saved (runs/detection/scope_mean/scan.pt) so that calibration and measurement need no model.

``measure``: per fold, a one-rule shadow policy ``{feature: <c>.fold_<n>, above: T, aggregate:
{scope_mean: {min_tokens: k}}}`` with ``T`` the smallest threshold at which at most 1% of the
benign *calibration* half fires **in the engine** (the rule fires when the running mean crosses
at any token from the k-th on). The saved columns are replayed through ``Session`` /
``CompiledPolicy.step`` and scored by ``monitor.evaluation.evaluate`` (the harness behind
``sae-monitor eval``) on the left-out source, with the benign *held-apart* half as benign
traffic: AUROC, TPR at 1% benign FPR and pair accuracy of the eval score (the final scope mean),
and the rule's decisions (recall, benign firing rate). The final probes get the same
calibration; their rates on the benign halves are reported. Writes
runs/detection/scope_mean/measure.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import actsdb  # noqa: E402
import compare  # noqa: E402
import extract  # noqa: E402
from monitor.evaluation import evaluate  # noqa: E402
from monitor.evaluation.items import as_eval_items  # noqa: E402
from monitor.policy import PolicySet, Rule, compile_policies  # noqa: E402
from monitor.probes import save_probe  # noqa: E402

OUT = actsdb.ROOT / "runs" / "detection" / "scope_mean"


def fit_probes(A: actsdb.Acts, layer: int) -> tuple[dict[str, Any], list[dict]]:
    """{feature name: (weight, bias)} and the fold table (category, source, feature)."""
    meta = A.meta
    D = compare.Detectors(A, {})
    fit = D.plus_benign(D.pooled("mean", actsdb.LAYERS.index(layer)))
    probes: dict[str, Any] = {}
    folds = []
    for c in compare.CATS:
        rows = np.array([i for i, m in enumerate(meta) if m["category"] == c])
        groups = sorted({meta[i]["group"] for i in rows})
        trainable = [g for g in groups if len({meta[i]["label"] for i in rows if meta[i]["group"] == g}) == 2]
        for n, g in enumerate(groups):
            train = rows[[meta[i]["group"] != g and meta[i]["group"] in trainable for i in rows]]
            score = fit(train)
            probes[f"{c}.fold_{n}"] = (score.weight, score.bias)
            folds.append({"category": c, "source": g, "feature": f"{c}.fold_{n}"})
        score = fit(rows[[meta[i]["group"] in trainable for i in rows]])
        probes[f"{c}.final"] = (score.weight, score.bias)
    return probes, folds


def source_rows(meta: list[dict]) -> list[dict]:
    """The labeled rows behind the activation database, in its order (extract.py is seeded)."""
    sets = extract.all_sets(["all"])
    by_id = {(name, str(r.get("id"))): r for name, rows in sets.items() for r in rows}
    out = []
    for m in meta:
        row = by_id.get((m["set"], str(m["id"])))
        if row is None:
            raise SystemExit(f"row {m['id']} of set {m['set']} not found: re-run extract.py's sets")
        out.append(dict(row))
    return out


def shadow_rule(rule_id: str, feature: str, threshold: float, min_tokens: int) -> Rule:
    return Rule.model_validate({"id": rule_id, "description": "scope_mean measurement", "severity": "info",
                                "mode": "shadow", "scope": "response", "actions": ["log"],
                                "when": {"feature": feature, "above": threshold,
                                         "aggregate": {"scope_mean": {"min_tokens": min_tokens}}}})


def fit(args: argparse.Namespace) -> tuple[actsdb.Acts, dict[str, Any], list[dict]]:
    """Fit the fold and final probes and write them as a catalog under runs/."""
    A = actsdb.load(with_tokens=False)
    probes, folds = fit_probes(A, args.layer)
    OUT.mkdir(parents=True, exist_ok=True)
    tensors = OUT / "catalog.probes.safetensors"
    tensors.unlink(missing_ok=True)
    for name, (w, b) in probes.items():
        save_probe(tensors, name.replace(".", "_"), torch.from_numpy(np.asarray(w, np.float32)), float(b))
    (OUT / "catalog.yaml").write_text(yaml.safe_dump({"sae": "default", "layer": args.layer, "features": [
        {"name": name, "probe": name.replace(".", "_"), "description": "scope_mean measurement probe"}
        for name in probes]}))
    return A, probes, folds


def scan(args: argparse.Namespace) -> None:
    from monitor.catalog import load_catalog
    from monitor.models import load_default_model
    from monitor.runtime.hf import Monitor
    from monitor.runtime.scan import (ScanItem, length_buckets, monitor_mask, pad_batch, read_residual,
                                      scan_token_ids)
    from monitor.sae import load_sae

    torch.set_num_threads(args.threads)
    A, probes, folds = fit(args)
    catalog = load_catalog(OUT / "catalog.yaml")
    names = sorted(probes)
    policy = compile_policies(PolicySet.from_rules([shadow_rule(f"m{i}", n, 0.0, 1) for i, n in enumerate(names)]),
                              catalog, d_sae=load_sae("default").cfg.d_sae)
    model, tokenizer = load_default_model()
    mon = Monitor(model.float().eval(), tokenizer, sae=load_sae("default"), policies=policy, catalog=catalog,
                  self_test=False)
    rows = source_rows(A.meta)
    meta = A.meta
    if args.limit:  # a smoke run: a spread of rows
        keep = list(range(0, len(rows), max(1, len(rows) // args.limit)))[:args.limit]
        rows, meta = [rows[i] for i in keep], [meta[i] for i in keep]
    items = as_eval_items(rows, tokenizer)
    parsed = [scan_token_ids(tokenizer, ScanItem(i.transcript if isinstance(i.transcript, str)
                                                 else [dict(m) for m in i.transcript], i.prompt)) for i in items]
    lengths = [len(p) + len(r) for p, r in parsed]
    encoder = mon.encoder_for(policy)
    feats: list[torch.Tensor | None] = [None] * len(items)
    masks: list[torch.Tensor | None] = [None] * len(items)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    done = 0
    for batch in length_buckets(lengths, args.batch_size, args.max_batch_tokens):
        real = [i for i in batch if lengths[i] > 0]
        if real:
            ids, attention = pad_batch([parsed[i][0] + parsed[i][1] for i in real], pad)
            resid = read_residual(mon, ids, attention)
            x = encoder.encode(resid)
            mask = monitor_mask(ids, attention.sum(1), mon.special_ids, mon.include_special_tokens)
            mask &= encoder.content_mask(resid).cpu()
            for row, i in enumerate(real):
                feats[i] = x[row, :lengths[i]].clone()
                masks[i] = mask[row, :lengths[i]].clone()
        done += len(batch)
        print(f"{done}/{len(items)}", flush=True)
    tokenizer.save_pretrained(str(OUT / "tokenizer"))
    torch.save({"names": [f.name for f in policy.features], "feats": feats, "masks": masks,
                "splits": [len(p) for p, _ in parsed], "meta": meta, "rows": rows, "folds": folds},
               OUT / "scan.pt")
    print("done", flush=True)


class Replay:
    """What ``evaluate`` needs of a monitor, answering ``scan_many`` from the saved columns: each
    item's prompt and response are stepped through a real :class:`Session` on ``policy``."""

    def __init__(self, tokenizer: Any, policy: Any, entries: list[tuple[torch.Tensor, torch.Tensor, int]]):
        self.tokenizer, self.policy, self.entries = tokenizer, policy, entries

    def scan_many(self, items: list, *, batch_size: int = 8, progress: Any = None) -> list:
        from monitor.runtime.session import Session

        assert len(items) == len(self.entries)
        reports = []
        for x, m, split in self.entries:
            session = Session(self.policy, None, 1, on_error="open")  # type: ignore[arg-type]
            for scope, lo, hi in (("prompt", 0, split), ("response", split, len(m))):
                if hi > lo:
                    session.observe_features(x[None, lo:hi], scope, m[None, lo:hi])  # type: ignore[arg-type]
            reports.append(session.finish())
        if progress:
            progress(len(items))
        return reports


def running_scores(x: torch.Tensor, m: torch.Tensor, split: int, k: int) -> float:
    """What the engine fires on: the max running mean over response tokens from the k-th on."""
    v = x[split:].double().reshape(len(m) - split, -1)[m[split:], 0]
    if len(v) < k:
        return -float("inf")
    run = v.cumsum(0) / torch.arange(1, len(v) + 1, dtype=torch.float64)
    return float(run[k - 1:].max())


def measure(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from monitor.catalog import load_catalog

    saved = torch.load(args.scan or OUT / "scan.pt", weights_only=False)
    names, meta, rows = saved["names"], saved["meta"], saved["rows"]
    catalog = load_catalog(OUT / "catalog.yaml")
    tokenizer = AutoTokenizer.from_pretrained(str(OUT / "tokenizer"))
    benign = [i for i, mm in enumerate(meta) if mm["category"] == "benign"]
    calib = [i for i in benign if actsdb.benign_half(meta[i]) == "calib"]
    held = [i for i in benign if actsdb.benign_half(meta[i]) == "test"]
    ds_benign = [i for i in benign if meta[i]["set"] == "ds_benign"]

    def column(i: int, feature: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        return saved["feats"][i][:, names.index(feature)].unsqueeze(-1), saved["masks"][i], saved["splits"][i]

    def calibrate(feature: str) -> float:
        s = np.sort([running_scores(*column(i, feature), args.min_tokens) for i in calib])[::-1]
        return float(s[int(0.01 * len(s))])

    def run(feature: str, thr: float, idx: list[int], benign_idx: list[int]) -> Any:
        policy = compile_policies(PolicySet.from_rules([shadow_rule(f"{feature.split('.')[0]}.rule", feature, thr,
                                                                    args.min_tokens)]), catalog, d_sae=8192)
        for r in (*idx, *benign_idx):
            rows[r].setdefault("category", meta[r]["category"])
        scanner = Replay(tokenizer, policy, [column(i, feature) for i in (*idx, *benign_idx)])
        return evaluate(scanner, [rows[i] for i in idx], benign_items=[rows[i] for i in benign_idx],
                        group_by=None, batch_size=8)

    results: list[dict] = []
    for fold in saved["folds"]:
        c, g, feature = fold["category"], fold["source"], fold["feature"]
        idx = [i for i, mm in enumerate(meta) if mm["category"] == c and mm["group"] == g]
        if not idx:
            continue
        thr = calibrate(feature)
        res = run(feature, thr, idx, held)
        (cat,) = res.categories
        score, decisions = cat.measures[0], cat.measures[1]
        results.append({"category": c, "source": g, "threshold": thr, "n_pos": cat.positives,
                        "n_neg": cat.items - cat.positives, "auroc": score.auroc,
                        "tpr1": score.tpr_at_1pct_benign_fpr,
                        "pair_acc": score.pairs.accuracy if score.pairs else None,
                        "recall": decisions.recall, "benign_heldapart_fire": decisions.benign_flagged_rate,
                        "neg_fire": (decisions.flagged - round((decisions.recall or 0) * cat.positives))
                        / max(1, cat.items - cat.positives)})
        print(json.dumps(results[-1]), flush=True)
    finals = {}
    corpus_held = [i for i in held if meta[i]["set"] == "benign_corpus"]
    for c in compare.CATS:
        feature = f"{c}.final"
        # The shipped threshold: at most 1% of datasets/benign.jsonl fires in the engine.
        s = np.sort([running_scores(*column(i, feature), args.min_tokens) for i in ds_benign])[::-1]
        thr = float(s[int(0.01 * len(s))])
        fire = {}
        for label, idx in (("datasets_benign_jsonl", ds_benign), ("benign_calib", calib),
                           ("benign_heldapart", held), ("corpus_heldapart (never fitted or calibrated on)", corpus_held)):
            fire[label] = [int(sum(running_scores(*column(i, feature), args.min_tokens) > thr for i in idx)), len(idx)]
        res = run(feature, thr, [i for i, mm in enumerate(meta) if mm["category"] == c], ds_benign)
        (cat,) = res.categories
        fire["engine_decisions_datasets_benign_jsonl_rate"] = cat.measures[1].benign_flagged_rate
        fire["in_sample_recall"] = cat.measures[1].recall
        fire["in_sample_negatives_fired"] = ((cat.measures[1].flagged - round((cat.measures[1].recall or 0) * cat.positives))
                                             / max(1, cat.items - cat.positives))
        finals[c] = {"threshold": thr, "fires": fire}
        print(c, json.dumps(finals[c]), flush=True)
    (OUT / f"measure_k{args.min_tokens}.json").write_text(json.dumps({"folds": results, "finals": finals}, indent=1))
    print(summary(results))


def summary(results: list[dict]) -> str:
    lines = ["| category | source | pos/neg | AUROC | TPR@1% benign | pair acc | threshold | recall at it | "
             "negatives fired | benign held-apart fired |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    f = lambda x: "–" if x is None or x != x else f"{x:.2f}"  # noqa: E731
    for r in results:
        lines.append(f"| {r['category']} | {r['source']} | {r['n_pos']}/{r['n_neg']} | {f(r['auroc'])} | {f(r['tpr1'])} | "
                     f"{f(r['pair_acc'])} | {r['threshold']:.3g} | {f(r['recall'])} | {f(r['neg_fire'] if r['n_neg'] else None)} | "
                     f"{f(r['benign_heldapart_fire'])} |")
    for c in compare.CATS:
        rs = [r for r in results if r["category"] == c]
        m = [np.nanmean([np.nan if r[k] is None else r[k] for r in rs]) for k in
             ("auroc", "tpr1", "pair_acc", "recall", "benign_heldapart_fire")]
        nf = np.mean([r["neg_fire"] for r in rs if r["n_neg"]])
        lines.append(f"| {c} | **mean over {len(rs)} sources** | | {f(m[0])} | {f(m[1])} | {f(m[2])} | | {f(m[3])} | "
                     f"{f(nf)} | {f(m[4])} |")
    return "\n".join(lines)


def ship(args: argparse.Namespace) -> None:
    """Copy the ``<category>.final`` probes into the shipped catalog's probe file (keys
    ``<category>_probe``), saying how far each moved from the probe shipped before."""
    from safetensors.torch import load_file

    shipped = actsdb.ROOT / "monitor" / "saes" / "default" / "catalog.probes.safetensors"
    new, old = load_file(str(OUT / "catalog.probes.safetensors")), load_file(str(shipped))
    for c in compare.CATS:
        w, b = new[f"{c}_final.weight"], new[f"{c}_final.bias"]
        was = old.get(f"{c}_probe.weight")
        moved = float((w - was).abs().max()) if was is not None else float("nan")
        print(f"{c}_probe: max |w - shipped w| = {moved:.3g}, bias {float(b):.4g}", flush=True)
        if not args.dry_run:
            save_probe(shipped, f"{c}_probe", w, float(b))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["fit", "scan", "measure", "ship"])
    ap.add_argument("--dry-run", action="store_true", help="ship: only compare with the shipped probes")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-batch-tokens", type=int, default=1024)
    ap.add_argument("--min-tokens", type=int, default=8)
    ap.add_argument("--limit", type=int, default=0, help="scan: only this many rows (a smoke run)")
    ap.add_argument("--scan", default=None, help="measure: the saved scan (default runs/detection/scope_mean/scan.pt)")
    args = ap.parse_args()
    {"fit": fit, "scan": scan, "measure": measure, "ship": ship}[args.stage](args)


if __name__ == "__main__":
    main()
