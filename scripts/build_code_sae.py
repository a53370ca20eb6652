"""A wider layer-15 SAE with more code and dialogue in its mix (issue 14, item 5), step by step.

    python scripts/build_code_sae.py extract [--max-tokens N]  # activations (resumable, any prefix)
    python scripts/build_code_sae.py train-rate  # tokens/s of training at --width, on the first shards
    python scripts/build_code_sae.py pack      # one outlier-free float16 file, memory-mapped in training
    python scripts/build_code_sae.py train     # BatchTopK 16384 x k 32 (resumable from its checkpoint)
    python scripts/build_code_sae.py heldout   # held-out corpus and code texts for sae-eval
    python scripts/build_code_sae.py shard-heldout  # both SAEs on the held-out activation tokens

Same model (SmolLM2-135M-Instruct, bfloat16 for extraction) and hook (layer 15 resid_post) as the
shipped SAE (scripts/build_default_sae.py, whose helpers this imports). The mix keeps the default's
corpus share and adds dialogue (more chat rows of the corpus) and code in several languages found on
this machine. Code files whose content hashes to 0 mod CODE_HELD_OUT_EVERY are never trained on; the
held-out code texts come from them. Work files go to runs/sae2/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_default_sae as default  # noqa: E402  (the default SAE's recipe helpers)

from monitor.capture import HookPoint  # noqa: E402
from monitor.data import read_jsonl, render  # noqa: E402
from monitor.models import load_default_model  # noqa: E402
from monitor.train import (SHARD_WINDOWS, TrainConfig, evaluate_reconstruction,  # noqa: E402
                           extract_activations, load_activations, tokenize_windows, train_sae)

ROOT = Path(__file__).resolve().parents[1]
# The shared data sits beside the main checkout; from a worktree ROOT.parent is not its parent.
if not default.SHARED.exists():
    for candidate in (ROOT.parent.parent / "shared" / "data", Path("/work/shared/data")):
        if candidate.exists():
            default.SHARED = candidate
            break
SHARED = default.SHARED
WORK = ROOT / "runs" / "sae2"
LAYER = 15
CODE_HELD_OUT_EVERY = 20  # code file with crc32(content) % 20 == 0: held out, never trained on
MAX_FILE_BYTES = 200_000
HELD_OUT_TOKENS = 50_000  # the last extracted tokens: held out from training (shard-level FVU)
BUDGET = {
    "corpus": 1_500_000,    # the default's corpus share (2.4M budget x 2.08M/3.3M extracted = 1.51M)
    "dialogue": 500_000,    # more chat rows of the corpus, beyond the corpus prefix above
    "dev": 450_000,         # the labeled dev sets, unsupervised, as the default
    "python": 600_000,      # stdlib + the venv's site-packages
    "c": 450_000,           # C/C++ headers and sources
    "javascript": 300_000,  # node_modules, /usr/share/javascript
    "other": 250_000,       # shell, Perl, PHP, Go, Rust, Java, TypeScript, Ruby
}
CODE_SOURCES = {
    "python": ([Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])], (".py",)),
    "c": ([Path("/usr/include"), Path("/usr/local/include"), Path("/usr/share"), Path("/usr/src"),
           Path(sysconfig.get_paths()["include"])], (".h", ".c", ".cc", ".cpp", ".hpp", ".cxx", ".hh")),
    "javascript": ([Path("/usr/share/javascript"), Path("/usr/lib/node_modules"), Path("/usr/local/lib/node_modules"),
                    Path("/usr/share/nodejs")], (".js", ".mjs", ".cjs")),
    "other": ([Path("/usr/bin"), Path("/usr/sbin"), Path("/usr/share"), Path("/usr/lib"), Path("/etc"),
               Path("/usr/local/bin")], (".sh", ".bash", ".pl", ".pm", ".php", ".go", ".rs", ".java", ".ts", ".rb")),
}


def held_out_file(path: Path) -> bool:
    """By content, so copies of one file under two paths fall on the same side."""
    try:
        return zlib.crc32(path.read_bytes()) % CODE_HELD_OUT_EVERY == 0
    except OSError:
        return False


def in_default_training(path: Path) -> bool:
    """The shipped SAE trained on the standard library's own files: never held-out code."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return stdlib in path.parents and "site-packages" not in path.parts


def _is_shell_script(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(64)
    except OSError:
        return False
    return head.startswith(b"#!") and (b"sh" in head.split(b"\n")[0]) and b"\0" not in head


def code_files(language: str) -> list[Path]:
    """Source files of one language on this machine, deduplicated by resolved path, sorted."""
    roots, suffixes = CODE_SOURCES[language]
    seen: set[Path] = set()
    for root in roots:
        if not root.exists():
            continue
        for p in root.rglob("*"):
            try:
                if not p.is_file() or p.stat().st_size > MAX_FILE_BYTES or p.stat().st_size < 200:
                    continue
            except OSError:
                continue
            name = p.name
            ok = name.endswith(suffixes) and not name.endswith((".min.js", ".d.ts"))
            if language == "python":
                ok = ok and "test" not in p.parts and "tests" not in p.parts
            if language == "other" and not ok and root.name in ("bin", "sbin") and "." not in name:
                ok = _is_shell_script(p)
            if ok:
                seen.add(p.resolve())
    return sorted(seen)


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="replace")
    except OSError:
        return ""


def build_windows(tokenizer):
    """Shuffled windows of the whole mix and the exact token count of each source."""
    rng = random.Random(0)
    counts: dict[str, int] = {}
    parts: list[list[int]] = []
    labels: list[str] = []
    # corpus: the default's documents in the default's order; then dialogue: later chat rows
    corpus, dialogue, n_corpus, n_dialogue, corpus_docs, dialogue_docs = [], [], 0, 0, 0, 0
    for row in default.corpus_rows(False):
        if n_corpus < BUDGET["corpus"]:
            ws = tokenize_windows([render(row, tokenizer)], tokenizer)
            corpus += ws
            n_corpus += sum(len(w) - 1 for w in ws)
            corpus_docs += 1
        elif row.get("messages") and n_dialogue < BUDGET["dialogue"]:
            ws = tokenize_windows([render(row, tokenizer)], tokenizer)
            dialogue += ws
            n_dialogue += sum(len(w) - 1 for w in ws)
            dialogue_docs += 1
        elif n_dialogue >= BUDGET["dialogue"]:
            break
    parts += corpus + dialogue
    labels += ["corpus"] * len(corpus) + ["dialogue"] * len(dialogue)
    counts.update(corpus_tokens=n_corpus, corpus_docs=corpus_docs, dialogue_tokens=n_dialogue,
                  dialogue_docs=dialogue_docs)
    dev_texts = [render(r, tokenizer) for f in default.DEV_FILES for r in read_jsonl(SHARED / f)]
    rng.shuffle(dev_texts)
    dev, counts["dev_tokens"] = default.take(tokenize_windows(dev_texts, tokenizer, max_windows_per_text=2),
                                             BUDGET["dev"])
    parts += dev
    labels += ["dev"] * len(dev)
    files_info = {}
    for language in CODE_SOURCES:
        files = [p for p in code_files(language) if not held_out_file(p)]
        rng.shuffle(files)
        windows, total, used = [], 0, 0
        for p in files:  # tokenize lazily: stop once the budget is met
            if total >= BUDGET[language]:
                break
            ws = tokenize_windows([_read(p)], tokenizer, max_windows_per_text=2)
            windows += ws
            total += sum(len(w) - 1 for w in ws)
            used += 1
        parts += windows
        labels += [language] * len(windows)
        counts[f"{language}_tokens"] = total
        files_info[language] = {"files_available": len(files), "files_used": used}
    order = list(range(len(parts)))
    rng.shuffle(order)
    parts, labels = [parts[i] for i in order], [labels[i] for i in order]
    counts.update(windows=len(parts), total_tokens=sum(len(w) - 1 for w in parts), ctx=256,
                  code_files=files_info,
                  held_out=f"corpus docs with index % {default.HELD_OUT_EVERY} == 0; code files with "
                           f"crc32(content) % {CODE_HELD_OUT_EVERY} == 0")
    return parts, labels, counts


def extract(model, tokenizer, max_tokens: int | None) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    windows, labels, counts = build_windows(tokenizer)
    counts["tokenize_s"] = round(time.time() - t0, 1)
    if max_tokens:  # a prefix of whole shards (the windows are shuffled: a random sample)
        total, n = 0, 0
        while n < len(windows) and total < max_tokens:
            total += sum(len(w) - 1 for w in windows[n:n + SHARD_WINDOWS])
            n += SHARD_WINDOWS
        windows, labels = windows[:n], labels[:n]
    extracted: dict[str, int] = {}
    for w, label in zip(windows, labels):
        extracted[label] = extracted.get(label, 0) + len(w) - 1
    counts.update(extracted_windows=len(windows), extracted_tokens=sum(extracted.values()),
                  extracted_tokens_by_source=extracted)
    (WORK / "data_counts.json").write_text(json.dumps(counts, indent=2))
    print(json.dumps(counts), file=sys.stderr, flush=True)
    started = time.time()

    def progress(done: int, n_shards: int) -> None:
        print(f"shard {done}/{n_shards} {time.time() - started:.0f}s", file=sys.stderr, flush=True)

    extract_activations(model, windows, [HookPoint(LAYER)], WORK / "acts", batch_size=16,
                        pad_id=tokenizer.pad_token_id or 0, progress=progress)


def pack(factor_margin: float = 0.95) -> None:
    """Concatenate the shards into one float16 .npy without massive-activation tokens.

    Training memory-maps it, so 4M tokens (4.6 GB) never sit in one process's heap. Tokens above
    ``factor_margin`` x train_sae's own outlier limit are dropped here, so train_sae finds none
    and does not copy the array to drop them.
    """
    shards = sorted(p for p in (WORK / "acts" / f"L{LAYER}_resid_post").glob("shard_*.npy")
                    if not p.name.endswith(".tmp.npy"))
    sample = np.concatenate([np.load(s, mmap_mode="r")[::20] for s in shards]).astype(np.float32)
    limit = float(np.median(np.linalg.norm(sample, axis=-1))) * TrainConfig().outlier_factor * factor_margin
    total, kept = 0, 0
    for s in shards:
        arr = np.load(s, mmap_mode="r")
        total += len(arr)
        kept += int((np.linalg.norm(arr.astype(np.float32), axis=-1) <= limit).sum())
    out = np.lib.format.open_memmap(WORK / "packed.tmp.npy", mode="w+", dtype=np.float16, shape=(kept, arr.shape[1]))
    at = 0
    for s in shards:
        arr = np.asarray(np.load(s, mmap_mode="r"))
        arr = arr[np.linalg.norm(arr.astype(np.float32), axis=-1) <= limit]
        out[at:at + len(arr)] = arr
        at += len(arr)
    out.flush()
    del out
    (WORK / "packed.tmp.npy").replace(WORK / "packed.npy")
    info = {"tokens": total, "kept": kept, "dropped": total - kept, "limit": limit, "shards": len(shards)}
    (WORK / "pack.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info), file=sys.stderr)


def train(d_sae: int, epochs: float) -> None:
    from dataclasses import replace as dc_replace

    acts = torch.from_numpy(np.load(WORK / "packed.npy", mmap_mode="c"))
    held, train_acts = acts[-HELD_OUT_TOKENS:], acts[:-HELD_OUT_TOKENS]
    cfg = TrainConfig(d_sae=d_sae, k=32, architecture="batchtopk", epochs=epochs, dead_tokens=500_000)

    def on_log(record):
        print(json.dumps(record), file=sys.stderr, flush=True)

    started = time.time()
    sae, summary = train_sae(train_acts, cfg, out=WORK / "train", log_every=25, on_log=on_log)
    wall = time.time() - started
    point = HookPoint(LAYER)
    sae.cfg = dc_replace(sae.cfg, model_name="SmolLM2-135M-Instruct", hook_name=point.name, hook_layer=LAYER,
                         metadata={**sae.cfg.metadata, "training_tokens": int(len(train_acts)),
                                   "outliers_dropped": json.loads((WORK / "pack.json").read_text())["dropped"]
                                   + summary["outliers_dropped"]})
    sae.save(WORK / "sae", dtype=torch.float16)
    recon = evaluate_reconstruction(sae, held.float())
    (WORK / "final_summary.json").write_text(json.dumps(
        {"train": {k: v for k, v in summary.items() if k != "history"}, "shard_heldout": recon,
         "last": summary["history"][-1], "train_wall_s_this_run": round(wall, 1)}, indent=2))
    print(json.dumps(recon), file=sys.stderr)


def shard_heldout(other: str = "default") -> None:
    """Both SAEs on the same held-out activation tokens of this mix (the last HELD_OUT_TOKENS)."""
    from monitor.sae import load_sae

    held = torch.from_numpy(np.load(WORK / "packed.npy", mmap_mode="r")[-HELD_OUT_TOKENS:].astype(np.float32))
    out = {name: evaluate_reconstruction(load_sae(path), held) for name, path in
           (("new", str(WORK / "sae")), (other, other))}
    (WORK / "shard_heldout_both.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


def train_rate(d_sae: int, steps: int = 40) -> None:
    """Tokens/s of training at this width, on the first extracted shards (nothing saved)."""
    acts = load_activations(WORK / "acts" / f"L{LAYER}_resid_post", max_tokens=200_000)
    cfg = TrainConfig(d_sae=d_sae, k=32, epochs=steps * TrainConfig().batch_tokens / len(acts), dead_tokens=500_000)
    started = time.time()
    _, summary = train_sae(acts, cfg, log_every=10)
    wall = time.time() - started
    print(json.dumps({"d_sae": d_sae, "steps": summary["steps"], "wall_s": round(wall, 1),
                      "tokens_per_s": round(summary["tokens"] / wall), "last": summary["history"][-1]}))


def write_heldout(tokenizer, n_code: int = 100) -> None:
    """The default card's held-out corpus texts, and n_code windows of held-out code files."""
    default.WORK = WORK
    WORK.mkdir(parents=True, exist_ok=True)
    print(default.write_heldout(tokenizer))
    rng = random.Random(2)
    per_language = n_code // len(CODE_SOURCES)
    rows = []
    for language in CODE_SOURCES:
        files = [p for p in code_files(language) if held_out_file(p) and not in_default_training(p)]
        rng.shuffle(files)
        taken = 0
        for p in files:
            ids = tokenizer(_read(p), add_special_tokens=False)["input_ids"]
            if len(ids) < 128:
                continue
            rows.append({"text": tokenizer.decode(ids[:256]), "language": language, "path": str(p)})
            taken += 1
            if taken == per_language:
                break
    path = WORK / "heldout_code.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(path, len(rows))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("step", choices=["extract", "pack", "train", "train-rate", "heldout", "shard-heldout"])
    parser.add_argument("--max-tokens", type=int, default=0, help="extract only a prefix of about N tokens")
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--epochs", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    without_model = {"pack": pack, "train": lambda: train(args.width, args.epochs),
                     "shard-heldout": shard_heldout, "train-rate": lambda: train_rate(args.width)}
    if args.step in without_model:
        without_model[args.step]()
        return
    model, tokenizer = load_default_model()
    if args.step == "extract":
        extract(model.to(torch.bfloat16), tokenizer, args.max_tokens or None)
    elif args.step == "heldout":
        write_heldout(tokenizer)


if __name__ == "__main__":
    main()
