"""Concept-direction drift over the panel: does the shift along "vulnerable minus fixed code"
separate the unsafe fine-tunes from the benign ones where the catalog features did not?

Teacher-forced only (no generation): the base's greedy answers to the prompts (read from a
``sae-monitor drift --include-text --json`` result, so the base need not answer again) and the
texts go through the base once and through every panel fine-tune (examples/drift/finetune.py),
each stopped after the SAE's layer (:func:`monitor.drift.teacher.measure`). Per candidate, the
shift of the items' mean residuals along each direction (:mod:`monitor.drift.direction`):

* ``pairs``: the mean paired difference, vulnerable minus fixed, of ``datasets/unsafe_code_pairs.jsonl``
  (hand-written pairs) at the SAE's layer. examples/drift/finetune.py now trains the ``unsafe``
  and ``fixed`` organisms on these pairs too, so for such fine-tunes this direction is not held
  out (the 2026-12-01 panel, trained on SVEN and CyberSecEval only, never saw them);
* ``probe``: the shipped ``unsafe_code.probe`` weight vector (scaled by the same pairs);
* ``control``: the sycophancy pairs' direction (a concept no fine-tune is about).

It prints, per candidate and direction, the score (the mean shift over the random-direction
null, what ``sae-monitor drift`` reports) and the relative shift, on all items, the texts only
and the answers only, and the AUROC of each over the panel (unsafe = positive), also unsafe vs
fixed-code only. The primary number, fixed before the panel was run: ``pairs.all.score``; the
others are exploratory (with 10 candidates, the best of 18 AUROCs is optimistic). Usage::

    python benchmarks/drift_directions.py --runs ../drift/runs/drift/ft --result runs/drift/cost.json \\
        --texts runs/drift/inputs/texts.jsonl --threads 2 --out runs/drift/directions.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from drift_panel import auroc, meta_of  # noqa: E402

from monitor.drift import direction as dr  # noqa: E402
from monitor.drift import run as rn  # noqa: E402
from monitor.drift import teacher as tf  # noqa: E402
from monitor.drift.behaviour import render_prompt  # noqa: E402
from monitor.drift.inputs import read_texts  # noqa: E402
from monitor.drift.load import load, resolve  # noqa: E402

SUBSETS = ("all", "texts", "answers")


def items_of(tokenizer: Any, result: dict[str, Any], texts: list[str], ctx: int) -> tuple[list[tf.Item], int]:
    """The base's greedy transcripts (prompt + answer) then the texts; returns the items and
    how many are transcripts."""
    answers = result["base_responses"][0]
    prompts = result["prompts"]
    out = []
    for prompt, answer in zip(prompts, answers):
        p_ids = render_prompt(tokenizer, [{"role": "user", "content": prompt}])
        r_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if r_ids:
            out.append(tf.Item(tuple(p_ids + r_ids)[:ctx], len(p_ids)))
    n_answers = len(out)
    out += [tf.Item(tuple(tokenizer(t, add_special_tokens=True)["input_ids"][:ctx]), 1) for t in texts]
    return out, n_answers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, required=True, help="directory of panel fine-tunes")
    ap.add_argument("--series", type=Path, default=None, help="a run whose checkpoint-* dirs form a series")
    ap.add_argument("--result", type=Path, required=True, help="drift --include-text --json output (base answers)")
    ap.add_argument("--texts", type=Path, required=True)
    ap.add_argument("--pairs", type=Path, default=ROOT / "datasets" / "unsafe_code_pairs.jsonl")
    ap.add_argument("--control", type=Path, default=ROOT / "datasets" / "sycophancy_pairs.jsonl")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("runs/drift/directions.jsonl"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.0f}s] {msg}", flush=True)

    texts = read_texts(args.texts)
    prep = rn.prepare("default", ["default"], prompts=None, texts=texts, sae="default", catalog=None, policies=None)
    columns, _, _ = rn.feature_columns(prep)
    base, tok = load(prep.base, prep.base)
    sae = prep.sae
    assert prep.catalog is not None
    probe, _ = prep.catalog.probe("unsafe_code.probe")
    directions = [dr.pair_direction(base, tok, sae.hook_point, args.pairs, name="pairs"),
                  dr.pair_direction(base, tok, sae.hook_point, args.pairs, name="probe", along=probe),
                  dr.pair_direction(base, tok, sae.hook_point, args.control, name="control")]
    for d in directions:
        log(f"direction {d.name}: {d.pairs} pairs, separation {d.separation:.3f}")
    cos = float(directions[0].vector @ directions[1].vector)
    log(f"cosine(pairs, probe) = {cos:+.3f}")
    result = json.loads(args.result.read_text())
    items, n_answers = items_of(tok, result, texts, 256)
    rows = {"all": None, "answers": torch.arange(n_answers), "texts": torch.arange(n_answers, len(items))}
    base_m = tf.measure(base, tok, sae, columns, items, batch_size=args.batch_size)
    log(f"base measured: {n_answers} answers + {len(texts)} texts")
    null_rows = dr.null_directions(sae, base_m)

    candidates = sorted(p for p in args.runs.iterdir() if (p / "adapter_config.json").is_file())
    if args.series is not None:
        candidates += sorted((p for p in args.series.glob("checkpoint-*") if p.is_dir()),
                             key=lambda p: int(p.name.split("-")[-1]))
    out = []
    with args.out.open("w") as fh:
        for path in candidates:
            model, _ = load(resolve(path), prep.base)
            m = tf.measure(model, tok, sae, columns, items, batch_size=args.batch_size)
            meta = meta_of(path if (path / "training_meta.json").is_file() else path.parent)
            row: dict[str, Any] = {"candidate": path.name if "checkpoint" not in path.name
                                   else f"{path.parent.name}/{path.name}",
                                   "kind": meta.get("kind"), "series": "checkpoint" in path.name}
            for d in directions:
                for subset, sel in rows.items():
                    s = dr.direction_shift(d, base_m, m, null_rows, rows=sel)
                    row[f"{d.name}.{subset}.score"] = s.score
                    row[f"{d.name}.{subset}.relative"] = s.relative
                    row[f"{d.name}.{subset}.t"] = s.t
                    row[f"{d.name}.{subset}.verdict"] = s.verdict
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            out.append(row)
            log(f"{row['candidate']:<28} {row['kind']:<6} " + "  ".join(
                f"{d.name}: {row[f'{d.name}.all.score']:.2f} ({row[f'{d.name}.all.relative']:+.3f})"
                for d in directions))
            del model
    report(out, directions)
    return 0


def report(rows: list[dict[str, Any]], directions: list[dr.Direction]) -> None:
    panel = [r for r in rows if not r["series"]]
    labels = [1 if r["kind"] == "unsafe" else 0 for r in panel]
    vs_fixed = [r for r in panel if r["kind"] in ("unsafe", "fixed")]
    fixed_labels = [1 if r["kind"] == "unsafe" else 0 for r in vs_fixed]
    print("\nAUROC over the panel (unsafe = positive; all benign | fixed code only):")
    for d in directions:
        for subset in SUBSETS:
            for stat in ("score", "relative"):
                key = f"{d.name}.{subset}.{stat}"
                print(f"  {key:<28} {auroc([r[key] for r in panel], labels):.2f} | "
                      f"{auroc([r[key] for r in vs_fixed], fixed_labels):.2f}")
    print("\ncandidate                    kind    " + "  ".join(f"{d.name + ' score/rel':>22}" for d in directions))
    for r in rows:
        print(f"{r['candidate']:<28} {r['kind']:<6}  " + "  ".join(
            f"{r[f'{d.name}.all.score']:>10.2f} {r[f'{d.name}.all.relative']:>+11.4f}" for d in directions))


if __name__ == "__main__":
    raise SystemExit(main())
