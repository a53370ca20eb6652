"""Batched activation extraction for the detection comparison (issue 14, item 3).

    nohup nice -n 10 python scripts/detection/extract.py > runs/detection/extract.log 2>&1 &
    python scripts/detection/extract.py --sets datasets benign   # only some sets
    python scripts/detection/extract.py --list                   # what would be extracted

Runs the default model once over every labeled row (sampled, seeded) and a benign set, batched
(length-sorted, padded, no grad, the forward stopped after the deepest layer), and writes, per
row and for layers 9, 12, 15, 18, 21 (``blocks.L.hook_resid_post``):

* ``mean``, ``max``, ``last``: mean- and max-pooled residual over the row's in-scope tokens, and
  the residual at the last in-scope token, ``[n, 5, 576]`` float16;
* ``tok``: every in-scope token's residual ``[n_tokens, 5, 576]`` float16 with ``offsets [n+1]``
  (for per-token probes scored as the max over tokens, which is how the runtime applies them);
* ``sae_max``, ``sae_mean``: the shipped SAE's (layer 15) latents, max and mean over the scope,
  ``[n, 8192]`` float16.

Scope follows ``monitor.discover.labeled_item``: the final response of a dialogue, the changed
lines of a code fix, else the whole text; position 0 and tokens the SAE refuses (massive
activations, ``SAE.input_mask`` at layer 15) never count. Texts longer than 256 tokens (192 for
the corpus and PurpleLlama, whose texts are long and whole-text scoped) are cut to a window that
starts a quarter-window before the first in-scope token.

Output: ``runs/detection/acts/<set>/chunk_NNN.npz`` + ``chunk_NNN.jsonl`` (row metadata). Sets
are split into chunks of 128 rows of a seeded shuffle (pairs kept together), so a larger
``--per-file`` only adds chunks, and chunks already on disk are skipped: the job can be killed and
restarted. Chunks are processed round-robin across sets, so early results cover every source.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from monitor.activations import length_batches  # noqa: E402
from monitor.capture import HookPoint, forward_through  # noqa: E402
from monitor.data import read_jsonl  # noqa: E402
from monitor.discover import labeled_item  # noqa: E402

SHARED = ROOT.parent.parent / "shared" / "data" if (ROOT.parent.parent / "shared").exists() else Path("/work/shared/data")
LAYERS = (9, 12, 15, 18, 21)
CTX = 256
CHUNK = 128
# DETECTION_ACTS: another activation store (e.g. a copy with one set re-extracted)
OUT = Path(os.environ.get("DETECTION_ACTS", ROOT / "runs" / "detection" / "acts"))

DEV = {  # set name: (path, rows cap)
    "dev_unsafe_sven": (SHARED / "unsafe_code/sven_pairs.jsonl", 256),
    "dev_unsafe_juliet": (SHARED / "unsafe_code/juliet_c_pairs.jsonl", 256),
    "dev_unsafe_purplellama": (SHARED / "unsafe_code/purplellama_insecure_positives.jsonl", 128),
    "dev_backdoor_juliet": (SHARED / "backdoor/juliet_c_pairs.jsonl", 256),
    "dev_syc_political": (SHARED / "sycophancy/anthropic_political_pairs.jsonl", 256),
    "dev_syc_truthfulqa": (SHARED / "sycophancy/truthfulqa_constructed_pairs.jsonl", 256),
}


PRIORITY = {"benign_corpus": 1, "dev_unsafe_purplellama": 2}
SHORT_CTX = {"benign_corpus": 192, "dev_unsafe_purplellama": 192}  # long texts: a shorter window


def dataset_sets() -> dict[str, tuple[Path, int]]:
    sets = {}
    for path in sorted((ROOT / "datasets").glob("*.jsonl")):
        sets[f"ds_{path.stem}"] = (path, 100000)
    for prose in (ROOT / "datasets" / "devsets" / "backdoor_prose.jsonl",  # since main moved it
                  ROOT / "policies" / "devsets" / "backdoor_prose.jsonl"):
        if prose.exists():
            sets["ds_backdoor_prose"] = (prose, 100000)
            break
    return sets


def corpus_rows(n: int, seed: int = 7) -> list[dict]:
    """Benign rows from the corpus: chat (rendered with the chat template), code and prose."""
    rows = []
    with gzip.open(SHARED / "corpus" / "corpus.jsonl.gz", "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i % 7:  # a spread-out subset is enough; keeps reading fast
                continue
            row = json.loads(line)
            rows.append(row)
    random.Random(seed).shuffle(rows)
    out = []
    for j, row in enumerate(rows[:n]):
        r = {"id": f"corpus-{j}", "label": 0, "category": "benign", "source": f"corpus:{row.get('kind', '')}",
             "kind": row.get("kind", "")}
        msgs = row.get("messages")
        if msgs and msgs[-1].get("role") == "assistant":
            r["messages"] = msgs
            r["response"] = msgs[-1]["content"]
            r["text"] = row["text"][:6000]
        else:
            r["text"] = row["text"][:6000]
        out.append(r)
    return out


def ordered(rows: list[dict], cap: int, seed: int = 13) -> list[dict]:
    """Seeded shuffle of pair groups, then the first ``cap`` rows (pairs kept whole)."""
    groups: dict[str, list[dict]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(str(row.get("pair_id") or f"_row{i}"), []).append(row)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    out: list[dict] = []
    for k in keys:
        if len(out) >= cap:
            break
        out += groups[k]
    return out


def all_sets(names: list[str]) -> dict[str, list[dict]]:
    sets: dict[str, list[dict]] = {}
    want = set(names)
    if want & {"dev", "all"}:
        for name, (path, cap) in DEV.items():
            sets[name] = ordered(list(read_jsonl(path)), cap)
    if want & {"datasets", "all"}:
        for name, (path, cap) in dataset_sets().items():
            if name == "ds_benign":
                continue
            sets[name] = ordered(list(read_jsonl(path)), cap)
    if want & {"benign", "all"}:
        sets["benign_corpus"] = corpus_rows(384)
        path = ROOT / "datasets" / "benign.jsonl"
        if path.exists():
            sets["ds_benign"] = ordered(list(read_jsonl(path)), 100000)
    for n in names:
        if n not in {"dev", "datasets", "benign", "all"}:
            if n in DEV:
                sets[n] = ordered(list(read_jsonl(DEV[n][0])), DEV[n][1])
            elif n in dataset_sets():
                sets[n] = ordered(list(read_jsonl(dataset_sets()[n][0])), 100000)
            else:
                raise SystemExit(f"unknown set {n!r}")
    return sets


def window(item, tokenizer, ctx: int = CTX) -> tuple[list[int], list[bool]]:
    enc = tokenizer(item.text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if item.spans:
        scope = [e > s and any(a < e and s < b for a, b in item.spans) for s, e in offsets]
    else:
        scope = [True] * len(ids)
    if ids:
        scope[0] = False
    if not any(scope):
        scope = [True] * len(ids)
        if ids:
            scope[0] = False
    first = scope.index(True) if any(scope) else 0
    start = 0 if first < ctx - 16 else max(0, first - ctx // 4)
    ids, scope = ids[start:start + ctx], scope[start:start + ctx]
    if start > 0:
        scope[0] = False
    return ids, scope


META_KEYS = ("id", "pair_id", "label", "category", "source", "language", "cwe", "subtype", "family",
             "kind", "user_view", "variant")


@torch.no_grad()
def run_chunk(model, tokenizer, sae, rows: list[dict], batch_tokens: int = 4096, ctx: int = CTX):
    items = [labeled_item(r, tokenizer) for r in rows]
    wins = [window(it, tokenizer, ctx) for it in items]
    n, L, d = len(rows), len(LAYERS), model.config.hidden_size
    mean = np.zeros((n, L, d), np.float16)
    mx = np.zeros((n, L, d), np.float16)
    last = np.zeros((n, L, d), np.float16)
    smax = np.zeros((n, sae.cfg.d_sae), np.float16)
    smean = np.zeros((n, sae.cfg.d_sae), np.float16)
    toks: list[np.ndarray | None] = [None] * n
    ntok = np.zeros(n, np.int32)
    points = {HookPoint(layer): layer for layer in LAYERS}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for padded in length_batches(wins, max(1, n), pad, max_tokens=batch_tokens):
        batch, ids, attn, scope = padded.indices, padded.ids, padded.attention_mask, padded.scope
        got: dict[int, torch.Tensor] = {}

        def grab(layer):
            def hook(resid):
                got[layer] = resid.detach().float()
            return hook

        forward_through(model, {p: grab(layer) for p, layer in points.items()}, input_ids=ids, attention_mask=attn)
        stack = torch.stack([got[layer] for layer in LAYERS], dim=2)  # [B, T, L, d]
        ok = scope & sae.input_mask(got[15])
        for r, i in enumerate(batch):
            pos = ok[r].nonzero().squeeze(1)
            if not len(pos):
                pos = scope[r].nonzero().squeeze(1)[-1:]
            if not len(pos):
                pos = torch.tensor([len(wins[i][0]) - 1])
            x = stack[r, pos]  # [t, L, d]
            mean[i] = x.mean(0).numpy()
            mx[i] = x.max(0).values.numpy()
            last[i] = x[-1].numpy()
            toks[i] = x.to(torch.float16).numpy()
            ntok[i] = len(pos)
            f = sae.encode(x[:, LAYERS.index(15)])
            smax[i] = f.max(0).values.numpy()
            smean[i] = f.mean(0).numpy()
    offsets = np.concatenate([[0], np.cumsum(ntok)]).astype(np.int64)
    tok = np.concatenate([t for t in toks], axis=0)
    meta = []
    for r, w in zip(rows, wins):
        m = {k: r[k] for k in META_KEYS if k in r}
        m["n_window"] = len(w[0])
        meta.append(m)
    return dict(mean=mean, max=mx, last=last, tok=tok, offsets=offsets, sae_max=smax, sae_mean=smean), meta


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", nargs="*", default=["all"])
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    sets = all_sets(args.sets)
    todo = []
    for name, rows in sets.items():
        for c in range(0, len(rows), CHUNK):
            todo.append((c // CHUNK, name, rows[c:c + CHUNK]))
    # chunk-index major (every source gets its first chunk early); the small hand-written
    # sets first within a round
    # the small hand-written sets first, then chunk-index major, so every source gets its
    # first chunk early
    todo.sort(key=lambda t: (not t[1].startswith("ds_"), t[0], PRIORITY.get(t[1], 0)))
    if args.list:
        for name, rows in sets.items():
            print(name, len(rows), sum(r.get("label", 0) == 1 for r in rows))
        return
    torch.set_num_threads(args.threads)
    from monitor.models import load_default_model
    from monitor.sae import load_sae
    model, tokenizer = load_default_model()
    model = model.to(getattr(torch, args.dtype)).eval()
    sae = load_sae("default")
    t0 = time.time()
    done_rows = 0
    for k, name, rows in todo:
        out = OUT / name
        npz = out / f"chunk_{k:03d}.npz"
        if npz.exists():
            continue
        out.mkdir(parents=True, exist_ok=True)
        t1 = time.time()
        arrays, meta = run_chunk(model, tokenizer, sae, rows, ctx=SHORT_CTX.get(name, CTX))
        tmp = out / f".tmp_{k:03d}.npz"
        np.savez(tmp, **arrays)
        (out / f"chunk_{k:03d}.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
        tmp.rename(npz)
        done_rows += len(rows)
        ntoks = int(sum(m["n_window"] for m in meta))
        print(f"{time.strftime('%H:%M:%S')} {name} chunk {k}: {len(rows)} rows, {ntoks} tokens in "
              f"{time.time() - t1:.0f}s ({ntoks / (time.time() - t1):.0f} tok/s); total {done_rows} rows "
              f"{time.time() - t0:.0f}s", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    main()
