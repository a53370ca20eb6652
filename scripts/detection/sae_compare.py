"""Leave-one-source-out: the shipped SAE against another SAE, from the saved per-token residuals.

    python scripts/detection/sae_compare.py --sae runs/sae2/sae            # both SAEs, all categories
    python scripts/detection/sae_compare.py --sae runs/sae2/sae --check-only

No model runs: the per-token layer-15 residuals that scripts/detection/extract.py saved (``tok[:, 2]``,
in-scope tokens only, position 0 and massive activations already excluded) are encoded with each
SAE and max-pooled per row, which is how ``sae_max`` was made for the shipped SAE. First the
shipped SAE's re-encoding is compared with the stored ``sae_max`` (the saved tokens are float16,
the stored pooling saw float32), so the comparison is like-for-like. Then each SAE's matrix is put
in place of ``sae_max`` and compare.py's own SAE detectors (best latent, sparse probe over the
top-32 latents, the same with benign negatives) are fitted and scored by leave-one-source-out with
compare.py's measures. Results: stdout (markdown) and ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import actsdb  # noqa: E402
import compare  # noqa: E402
from monitor.sae import load_sae  # noqa: E402

L15 = actsdb.LAYERS.index(15)


@torch.no_grad()
def max_pool(sae, tok: np.ndarray, offsets: np.ndarray, rows_per_batch: int = 64) -> np.ndarray:
    """Per-row max over its saved tokens of the SAE's latents: float16 [rows, d_sae]."""
    n = len(offsets) - 1
    out = np.zeros((n, sae.cfg.d_sae), np.float16)
    for a in range(0, n, rows_per_batch):
        b = min(n, a + rows_per_batch)
        x = torch.from_numpy(tok[offsets[a]:offsets[b]].astype(np.float32))
        f = sae.encode(x)
        starts = offsets[a:b + 1] - offsets[a]
        out[a:b] = torch.stack([f[s:e].max(0).values for s, e in zip(starts[:-1], starts[1:])]).numpy()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sae", required=True, help="directory of the SAE to compare with the shipped one")
    ap.add_argument("--label", default="new SAE")
    ap.add_argument("--cats", nargs="*", default=list(compare.CATS))
    ap.add_argument("--out", default=str(actsdb.ROOT / "runs/sae2/sae_compare.json"))
    ap.add_argument("--check-only", action="store_true", help="only the re-encoding check of the shipped SAE")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    A = actsdb.load(with_tokens=True)
    tok, offsets = A.tokens(L15)
    stored = A.a["sae_max"]
    shipped = max_pool(load_sae("default"), tok, offsets)
    diff = np.abs(shipped.astype(np.float32) - stored.astype(np.float32))
    check = {"rows": len(A), "tokens": int(offsets[-1]), "max_abs_diff": float(diff.max()),
             "mean_abs_diff": float(diff.mean()), "stored_max": float(stored.max()),
             "rows_same_argmax": float((shipped.argmax(1) == stored.argmax(1)).mean()),
             "encode_s": round(time.time() - t0, 1)}
    print(json.dumps(check), file=sys.stderr, flush=True)
    if args.check_only:
        return
    new_sae = load_sae(args.sae)
    t1 = time.time()
    new = max_pool(new_sae, tok, offsets)
    check["new_encode_s"] = round(time.time() - t1, 1)
    check["new_d_sae"] = new_sae.cfg.d_sae
    benign_test = np.array([i for i, m in enumerate(A.meta) if m["category"] == "benign" and actsdb.benign_half(m) == "test"])
    results: list[dict] = []
    for label, matrix in (("shipped SAE (stored sae_max)", stored), ("shipped SAE (re-encoded)", shipped),
                          (f"{args.label} ({new_sae.cfg.d_sae})", new)):
        A.a["sae_max"] = matrix
        D = compare.Detectors(A, {})
        dets = {"best latent (chosen on train)": D.best_latent(),
                "sparse probe (top-32 latents, max-pooled)": D.sae_sparse(),
                "sparse probe + benign negatives": D.plus_benign(D.sae_sparse())}
        results += compare.loso(D.meta, dets, args.cats, benign_test, f"{label}: ")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"check": check, "results": results}, indent=1))
    print(json.dumps(check))
    print(compare.report(results, A.meta, benign_test))
    print(f"\n(total {time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
