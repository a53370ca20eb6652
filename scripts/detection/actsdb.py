"""Reading the activations written by scripts/detection/extract.py, and the source grouping.

``load(names)`` concatenates the chunks of each set: row metadata, pooled residuals
``mean/max/last [n, 5, d]``, SAE ``sae_max/sae_mean [n, 8192]``, and per-token residuals
``tok [N, 5, d]`` with ``offsets [n+1]``. ``group(meta)`` gives each row its leave-one-source-out
group (see GROUPING), and ``benign_half(meta)`` splits the benign rows into a calibration half and
a held-apart test half by a stable hash of the row id.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
# DETECTION_ACTS: another activation store (e.g. a copy with one set re-extracted)
ACTS = Path(os.environ.get("DETECTION_ACTS", ROOT / "runs" / "detection" / "acts"))
LAYERS = (9, 12, 15, 18, 21)

GROUPING = """\
Sources (leave-one-source-out groups): each dev file of ../shared/data is one source, except
SVEN, split by language (C/C++ vs Python: different projects and languages); each family of the
shipped datasets/*.jsonl is one source (e.g. unsafe_code_pairs#injection); the backdoor prose
devset is one source. purplellama_insecure_positives has no negatives: it is only ever a test
source, scored against the benign held-apart half, and never used for fitting."""


def group(m: dict) -> str:
    src = m.get("source", "")
    if src.startswith("sae-monitor/datasets:"):
        return "ds:" + src.split(":", 1)[1].replace(".jsonl", "")
    if "sven" in src:
        return "sven:" + ("python" if m.get("language") == "python" else "c/c++")
    if "juliet" in src:
        return "juliet_c" + ("" if m.get("category") == "unsafe_code" else "_backdoor")
    if "PurpleLlama" in src:
        return "purplellama(pos only)"
    if "political" in src:
        return "anthropic_political"
    if "truthful" in src.lower() or "rnngineering" in src:
        return "truthfulqa_constructed"
    if m.get("category") == "benign":
        return "benign"
    if m.get("category") == "backdoor":
        return "backdoor_prose"
    return src.split(":")[0]


def benign_half(m: dict) -> str:
    h = int(hashlib.sha256(str(m.get("id")).encode()).hexdigest()[:8], 16)
    return "calib" if h % 2 == 0 else "test"


class Acts:
    def __init__(self, meta, arrays):
        self.meta = meta
        self.a = arrays

    def __len__(self):
        return len(self.meta)

    def tokens(self, layer_idx: int) -> tuple[np.ndarray, np.ndarray]:
        return self.a["tok"][:, layer_idx], self.a["offsets"]


def load(names: list[str] | None = None, with_tokens: bool = True) -> Acts:
    dirs = sorted(p for p in ACTS.iterdir() if p.is_dir()) if names is None else [ACTS / n for n in names]
    meta: list[dict] = []
    parts: dict[str, list[np.ndarray]] = {}
    tok_offset = 0
    for d in dirs:
        for npz in sorted(d.glob("chunk_*.npz")):
            z = np.load(npz)
            rows = [json.loads(x) for x in (npz.with_suffix(".jsonl")).read_text().splitlines()]
            for r in rows:
                r["set"] = d.name
                r["group"] = group(r)
            meta += rows
            for k in ("mean", "max", "last", "sae_max", "sae_mean"):
                parts.setdefault(k, []).append(z[k])
            if with_tokens:
                parts.setdefault("tok", []).append(z["tok"])
                parts.setdefault("offsets", []).append(z["offsets"][:-1] + tok_offset)
                tok_offset += int(z["offsets"][-1])
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    if with_tokens:
        arrays["offsets"] = np.concatenate([arrays["offsets"], [tok_offset]]).astype(np.int64)
    return Acts(meta, arrays)
