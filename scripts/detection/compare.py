"""Leave-one-source-out comparison of detectors (issue 14, item 3), from saved activations.

    python scripts/detection/extract.py            # once (slow; background it)
    python scripts/detection/compare.py            # prints the markdown tables
    python scripts/detection/compare.py --quick    # layer 15 only, fewer detectors

For every category and every source S of it, each trainable detector is fitted on all the other
sources of the category (rows weighted so every (source, label) cell counts the same) and scored
on S; nothing about S is used for fitting or for choosing. Catalog latents are not fitted, so
their numbers on S are transfer numbers too. Measures on S:

* AUROC: S's positives against S's negatives (for the positives-only PurpleLlama source, against
  the benign held-apart half);
* TPR@1%: the share of S's positives above the score that at most 1% of the benign held-apart half
  exceeds (benign = hand-written chat and code in datasets/benign.jsonl + corpus documents);
* pair accuracy: the share of S's minimal pairs where the positive side scores higher.

"single-source fit" rows fit on each other source alone and report the mean over those sources.
Results go to stdout (markdown) and runs/detection/compare.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import actsdb  # noqa: E402
from monitor.probes import fit_logistic  # noqa: E402

CATS = ("unsafe_code", "backdoor", "sycophancy")
L2 = 1e-2
TOKENS_PER_ROW = 16


def catalog_latents() -> dict[str, dict[str, int]]:
    import yaml
    cat = yaml.safe_load((actsdb.ROOT / "monitor/saes/default/catalog.yaml").read_text())
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for f in cat["features"]:
        if "latent" in f:
            c, name = f["name"].split(".", 1)
            out[c][name] = int(f["latent"])
    return out


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    if not len(pos) or not len(neg):
        return float("nan")
    neg = np.sort(neg)
    lo = np.searchsorted(neg, pos, "left")
    hi = np.searchsorted(neg, pos, "right")
    return float((lo + 0.5 * (hi - lo)).sum() / (len(pos) * len(neg)))


def tpr_at(pos: np.ndarray, benign: np.ndarray, fpr: float = 0.01) -> float:
    allowed = int(fpr * len(benign))
    thr = np.sort(benign)[::-1][allowed]  # at most `allowed` benign scores are strictly above
    return float((pos > thr).mean()) if len(pos) else float("nan")


def pair_acc(scores: np.ndarray, meta: list[dict], idx: np.ndarray) -> float:
    by: dict[str, dict[int, float]] = defaultdict(dict)
    for s, i in zip(scores, idx):
        pid = meta[i].get("pair_id")
        if pid is not None:
            by[pid][meta[i]["label"]] = float(s)
    wins = [1.0 if p[1] > p[0] else 0.5 if p[1] == p[0] else 0.0 for p in by.values() if 0 in p and 1 in p]
    return float(np.mean(wins)) if wins else float("nan")


def cell_weights(meta, idx) -> np.ndarray:
    cells = defaultdict(int)
    for i in idx:
        cells[(meta[i]["group"], meta[i]["label"])] += 1
    w = np.array([1.0 / cells[(meta[i]["group"], meta[i]["label"])] for i in idx])
    y = np.array([meta[i]["label"] for i in idx])
    for v in (0, 1):  # each class half the weight
        w[y == v] /= 2 * w[y == v].sum()
    return w


class Detectors:
    """Each detector: fit(train_idx) -> score(idx) for any rows (held-out source and benign)."""

    def __init__(self, A: actsdb.Acts, latents: dict[str, dict[str, int]]):
        self.A, self.meta, self.latents = A, A.meta, latents
        self.y = np.array([m["label"] for m in self.meta])
        self.off = A.a.get("offsets")  # None when loaded without per-token residuals
        self.rng = np.random.default_rng(0)
        self._tokcache: dict[int, np.ndarray] = {}

    def _tok32(self, li: int) -> np.ndarray:
        return self.A.a["tok"][:, li]

    # --- dense pooled probes
    def pooled(self, pool: str, li: int, l2: float = L2):
        X = self.A.a[pool][:, li]

        def fit(train):
            w, b = fit_logistic(torch.from_numpy(X[train].astype(np.float32)), torch.from_numpy(self.y[train].astype(np.float32)),
                                sample_weight=torch.from_numpy(cell_weights(self.meta, train)), l2=l2)
            w = w.numpy()

            def score(idx):
                return X[idx].astype(np.float32) @ w + b
            score.weight, score.bias = w, b  # type: ignore[attr-defined]
            return score
        return fit

    # --- a mean-pool probe applied per token, each row's per-token scores reduced to one score
    def _per_token(self, li: int, l2: float, reduce):
        tok, off, base = self._tok32(li), self.off, self.pooled("mean", li, l2)

        def fit(train):
            inner = base(train)
            w, b = inner.weight, inner.bias

            def score(idx):
                return np.array([reduce(tok[off[i]:off[i + 1]].astype(np.float32) @ w + b) for i in idx],
                                np.float32)
            score.weight, score.bias = w, b  # type: ignore[attr-defined]
            return score
        return fit

    # --- run-time aggregate window_mean(n): max over windows of the per-token scores' mean
    def windowed(self, li: int, n: int = 16, l2: float = L2):
        def reduce(s):
            c = np.concatenate([[0.0], np.cumsum(s)])
            t = np.arange(1, len(s) + 1)
            lo = np.maximum(0, t - n)
            return ((c[t] - c[lo]) / (t - lo)).max()
        return self._per_token(li, l2, reduce)

    # --- run-time aggregate scope_mean(min_tokens): the running mean over the scope, max over the
    # tokens from the min_tokens-th on (what the engine fires on); rows with fewer tokens can
    # never fire and score -inf
    def scope_mean(self, li: int, min_tokens: int = 8, l2: float = L2, final: bool = False):
        def reduce(s):
            run = np.cumsum(s.astype(np.float64)) / np.arange(1, len(s) + 1)
            if final:
                return run[-1]
            return run[min_tokens - 1:].max() if len(s) >= min_tokens else -np.inf
        return self._per_token(li, l2, reduce)

    # --- per-token probe, scored as the max over tokens (the runtime rule)
    def tokmax(self, li: int, l2: float = L2):
        tok = self._tok32(li)
        off = self.off

        def rows_tokens(idx, k):
            sel, owner = [], []
            for j, i in enumerate(idx):
                a, b = off[i], off[i + 1]
                pos = np.arange(a, b)
                if len(pos) > k:
                    pos = np.sort(self.rng.choice(pos, k, replace=False))
                sel.append(pos)
                owner.append(np.full(len(pos), j))
            return np.concatenate(sel), np.concatenate(owner)

        def fit(train):
            sel, owner = rows_tokens(train, TOKENS_PER_ROW)
            counts = np.bincount(owner, minlength=len(train))
            rw = cell_weights(self.meta, train)
            w_tok = rw[owner] / counts[owner]
            y_tok = self.y[train][owner]
            w, b = fit_logistic(torch.from_numpy(tok[sel].astype(np.float32)), torch.from_numpy(y_tok.astype(np.float32)),
                                sample_weight=torch.from_numpy(w_tok), l2=l2)
            w = w.numpy()

            def score(idx):
                out = np.empty(len(idx), np.float32)
                for j, i in enumerate(idx):
                    out[j] = (tok[off[i]:off[i + 1]].astype(np.float32) @ w).max() + b
                return out
            score.weight, score.bias = w, b  # type: ignore[attr-defined]
            return score
        return fit

    # --- SAE latents
    def catalog_latent(self, latent: int):
        S = self.A.a["sae_max"]
        return lambda train: (lambda idx: S[idx, latent].astype(np.float32))

    def best_latent(self):
        S = self.A.a["sae_max"]

        def fit(train):
            y = self.y[train]
            au = _col_auroc(S[train].astype(np.float32), y)
            j = int(np.argmax(au))
            return lambda idx: S[idx, j].astype(np.float32)
        return fit

    def sae_sparse(self, k: int = 32, l2: float = 1e-1):
        S = self.A.a["sae_max"]

        def fit(train):
            y = self.y[train]
            au = _col_auroc(S[train].astype(np.float32), y)
            sel = np.argsort(-np.abs(au - 0.5))[:k]
            X = np.log1p(np.maximum(S[:, sel].astype(np.float32), 0))
            w, b = fit_logistic(torch.from_numpy(X[train]), torch.from_numpy(y.astype(np.float32)),
                                sample_weight=torch.from_numpy(cell_weights(self.meta, train)), l2=l2)
            w = w.numpy()
            return lambda idx: X[idx] @ w + b
        return fit

    def plus_benign(self, factory):
        """The same detector, with the benign *calibration* half added to training as negatives
        (its own cell); the benign held-apart half used for TPR@1% is never trained on."""
        calib = np.array([i for i, m in enumerate(self.meta) if m["category"] == "benign" and actsdb.benign_half(m) == "calib"])
        return lambda train: factory(np.concatenate([train, calib]))

    def ensemble(self, members):
        def fit(train):
            scorers = [m(train) for m in members]
            stats = []
            for s in scorers:
                t = s(train)
                stats.append((float(t.mean()), float(t.std() + 1e-6)))
            return lambda idx: np.mean([(s(idx) - mu) / sd for s, (mu, sd) in zip(scorers, stats)], axis=0)
        return fit


def loso(meta: list[dict], detectors: dict, cats, benign_test: np.ndarray, label: str = "") -> list[dict]:
    """The leave-one-source-out protocol of this module for ``detectors`` (name -> fit(train) ->
    score(rows)): per category and left-out source, one cell as in ``main`` (AUROC, TPR@1%
    benign FPR, pair accuracy), without the single-source fits. ``label`` prefixes the names."""
    results = []
    for c in cats:
        rows = np.array([i for i, m in enumerate(meta) if m["category"] == c])
        groups = sorted({meta[i]["group"] for i in rows})
        trainable = [g for g in groups if len({meta[i]["label"] for i in rows if meta[i]["group"] == g}) == 2]
        for name, det in detectors.items():
            for g in groups:
                test = rows[[meta[i]["group"] == g for i in rows]]
                train = rows[[meta[i]["group"] != g and meta[i]["group"] in trainable for i in rows]]
                score = det(train)
                s_test, s_ben = score(test), score(benign_test)
                y = np.array([meta[i]["label"] for i in test])
                pos, neg = s_test[y == 1], s_test[y == 0]
                results.append({"category": c, "detector": f"{label}{name}", "fit": "all other sources", "source": g,
                                "n_pos": int((y == 1).sum()), "n_neg": int((y == 0).sum()),
                                "auroc": auroc(pos, neg) if len(neg) else auroc(pos, s_ben),
                                "tpr1": tpr_at(pos, s_ben), "pair_acc": pair_acc(s_test, meta, test)})
            print(f"{label}{c}: {name}", file=sys.stderr, flush=True)
    return results


def _col_auroc(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    from monitor.stats import auroc as t_auroc
    return t_auroc(torch.from_numpy(X), torch.from_numpy(y)).numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="layer 15 only and fewer detectors")
    ap.add_argument("--single", nargs="*", default=["dense L15 mean-pool", "dense L15 token-max (per-token probe)",
                                                     "SAE sparse probe (top-32 latents, max-pooled)"],
                    help="detectors also fitted on each single other source (none: no such fits)")
    ap.add_argument("--out", default=str(actsdb.ROOT / "runs/detection/compare.json"))
    ap.add_argument("--cats", nargs="*", default=list(CATS), help="categories to measure")
    ap.add_argument("--merge", nargs="*", default=[], help="with --report-only: more result files to add")
    ap.add_argument("--resume", action="store_true", help="keep the cells already in --out")
    ap.add_argument("--report-only", action="store_true", help="print the tables from --out")
    args = ap.parse_args()
    t0 = time.time()
    A = actsdb.load(with_tokens=not args.report_only)
    meta = A.meta
    if args.report_only:
        bt = [i for i, m in enumerate(meta) if m["category"] == "benign" and actsdb.benign_half(m) == "test"]
        res = json.loads(Path(args.out).read_text())
        for extra in args.merge:
            res += json.loads(Path(extra).read_text())
        print(report(res, meta, np.array(bt)))
        return
    D = Detectors(A, catalog_latents())
    benign_test = np.array([i for i, m in enumerate(meta) if m["category"] == "benign" and actsdb.benign_half(m) == "test"])
    layers = [15] if args.quick else list(actsdb.LAYERS)
    dets: dict[str, object] = {}
    for c, lat in D.latents.items():
        for name, j in lat.items():
            dets[f"catalog latent {c}.{name}"] = D.catalog_latent(j)
    dets["SAE best latent (chosen on train)"] = D.best_latent()
    dets["SAE sparse probe (top-32 latents, max-pooled)"] = D.sae_sparse()
    for L in layers:
        li = actsdb.LAYERS.index(L)
        for pool in ("mean", "max", "last"):
            if args.quick and pool == "last":
                continue
            dets[f"dense L{L} {pool}-pool"] = D.pooled(pool, li)
        if L in (15, 21):  # per-token fits are the slow ones
            dets[f"dense L{L} token-max (per-token probe)"] = D.tokmax(li)
        if L == 15:
            dets[f"dense L{L} mean-pool probe as window_mean(32)"] = D.windowed(li, 32)
    for L in ([15] if args.quick else [15, 21]):
        li = actsdb.LAYERS.index(L)
        dets[f"dense L{L} mean-pool + benign negatives"] = D.plus_benign(D.pooled("mean", li))
        dets[f"dense L{L} token-max + benign negatives"] = D.plus_benign(D.tokmax(li))
        if L == 15:
            dets[f"dense L{L} window_mean(32) + benign negatives"] = D.plus_benign(D.windowed(li, 32))
    dets["SAE sparse probe + benign negatives"] = D.plus_benign(D.sae_sparse())
    if not args.quick:
        dets["ensemble: mean-pool probes L9-L21"] = D.ensemble([D.pooled("mean", i) for i in range(len(actsdb.LAYERS))])
    l15 = actsdb.LAYERS.index(15)
    dets["ensemble: L15 mean + L15 token-max + SAE-32"] = D.ensemble([D.pooled("mean", l15), D.tokmax(l15), D.sae_sparse()])

    results: list[dict] = []
    if args.resume and Path(args.out).exists():  # keep (category, detector) cells already measured
        results = [r for r in json.loads(Path(args.out).read_text()) if r["detector"] in dets]
    done = {(r["category"], r["detector"]) for r in results}
    for c in args.cats:
        rows = np.array([i for i, m in enumerate(meta) if m["category"] == c])
        groups = sorted({meta[i]["group"] for i in rows})
        trainable = [g for g in groups if len({meta[i]["label"] for i in rows if meta[i]["group"] == g}) == 2]
        for name, det in dets.items():
            if name.startswith("catalog latent") and not name.startswith(f"catalog latent {c}."):
                continue
            if (c, name) in done:
                continue
            for g in groups:
                test = rows[[meta[i]["group"] == g for i in rows]]
                train = rows[[meta[i]["group"] != g and meta[i]["group"] in trainable for i in rows]]
                score = det(train)  # type: ignore[operator]
                s_test, s_ben = score(test), score(benign_test)
                y = np.array([meta[i]["label"] for i in test])
                pos, neg = s_test[y == 1], s_test[y == 0]
                au = auroc(pos, neg) if len(neg) else auroc(pos, s_ben)
                results.append({"category": c, "detector": name, "fit": "all other sources", "source": g,
                                "n_pos": int((y == 1).sum()), "n_neg": int((y == 0).sum()), "auroc": au,
                                "tpr1": tpr_at(pos, s_ben), "pair_acc": pair_acc(s_test, meta, test)})
                if name in args.single:
                    for g2 in trainable:
                        if g2 == g:
                            continue
                        tr2 = rows[[meta[i]["group"] == g2 for i in rows]]
                        sc2 = det(tr2)  # type: ignore[operator]
                        s2, b2 = sc2(test), sc2(benign_test)
                        results.append({"category": c, "detector": name, "fit": f"single:{g2}", "source": g,
                                        "auroc": auroc(s2[y == 1], s2[y == 0]) if (y == 0).any() else auroc(s2[y == 1], b2),
                                        "tpr1": tpr_at(s2[y == 1], b2), "pair_acc": pair_acc(s2, meta, test)})
            print(f"[{time.time() - t0:.0f}s] {c}: {name}", file=sys.stderr, flush=True)
            Path(args.out).write_text(json.dumps(results, indent=1))  # partial results survive a kill
    print(report(results, meta, benign_test))


def fmt(x: float) -> str:
    return "–" if x != x else f"{x:.2f}"


def report(results: list[dict], meta: list[dict], benign_test: np.ndarray) -> str:
    out = [f"Benign held-apart half: {len(benign_test)} rows. Cells: AUROC / TPR@1% benign FPR / pair accuracy, "
           "each on the source left out.\n", actsdb.GROUPING, ""]
    for c in CATS:
        rs = [r for r in results if r["category"] == c and r["fit"] == "all other sources"]
        if not rs:
            continue
        srcs = sorted({r["source"] for r in rs})
        counts = {r["source"]: f"{r['n_pos']}/{r['n_neg']}" for r in rs}
        out.append(f"### {c}\n")
        out.append("| detector | " + " | ".join(f"{s} ({counts[s]})" for s in srcs) + " | mean AUROC | mean TPR@1% | mean pair acc |")
        out.append("| --- |" + " ---: |" * (len(srcs) + 3))
        dets = list(dict.fromkeys(r["detector"] for r in rs))
        for d in dets:
            cells = {r["source"]: r for r in rs if r["detector"] == d}
            line = [d] + [f"{fmt(cells[s]['auroc'])} / {fmt(cells[s]['tpr1'])} / {fmt(cells[s]['pair_acc'])}" for s in srcs]
            line += [fmt(np.nanmean([cells[s]["auroc"] for s in srcs])), fmt(np.nanmean([cells[s]["tpr1"] for s in srcs])),
                     fmt(np.nanmean([cells[s]["pair_acc"] for s in srcs]))]
            out.append("| " + " | ".join(line) + " |")
        single = [r for r in results if r["category"] == c and r["fit"].startswith("single:")]
        if single:
            out.append("\nFit on one other source at a time (mean over the fit sources), vs all others together:\n")
            out.append("| detector | fit | mean AUROC | mean TPR@1% | mean pair acc |")
            out.append("| --- | --- | ---: | ---: | ---: |")
            for d in dict.fromkeys(r["detector"] for r in single):
                for label, sel in (("one source", [r for r in single if r["detector"] == d]),
                                   ("all others", [r for r in rs if r["detector"] == d])):
                    per_src = defaultdict(list)
                    for r in sel:
                        per_src[r["source"]].append(r)
                    m = lambda k: np.nanmean([np.nanmean([r[k] for r in v]) for v in per_src.values()])  # noqa: E731
                    out.append(f"| {d} | {label} | {fmt(m('auroc'))} | {fmt(m('tpr1'))} | {fmt(m('pair_acc'))} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
