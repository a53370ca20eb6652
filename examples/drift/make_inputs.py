"""Write prompt and text files for `sae-monitor drift` from the dev data's general corpus.

Prompts: half code requests (the first user turn of ``chat_code`` dialogues), half other
requests (``prompt`` and ``chat`` rows); texts: unrelated prose, statements and chat. None of
these rows is used by examples/drift/finetune.py's unsafe or fixed data (the corpus holds no
labeled dev items); the chat/text fine-tunes draw from the same corpus, so use a different
``--seed`` than they did if that matters to you.

    python examples/drift/make_inputs.py --prompts 200 --texts 200 --out runs/drift/inputs
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

CORPUS = Path("/work/shared/data/corpus/corpus.jsonl.gz")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--texts", type=int, default=200)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--out", type=Path, default=Path("runs/drift/inputs"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with gzip.open(args.corpus, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    rng.shuffle(rows)

    def first_user(row: dict) -> str | None:
        for m in row.get("messages") or []:
            if m.get("role") == "user" and 20 <= len(m.get("content", "")) <= 600:
                return m["content"]
        return None

    code = [p for r in rows if r.get("kind") == "chat_code" for p in [first_user(r)] if p]
    other = [p for r in rows if r.get("kind") in ("prompt", "chat") for p in [first_user(r) or (
        r["text"] if r.get("kind") == "prompt" and 20 <= len(r["text"]) <= 600 else None)] if p]
    half = args.prompts // 2
    prompts = code[:half] + other[:args.prompts - half]
    texts = [r["text"][:800] for r in rows if r.get("kind") in ("prose", "statements", "chat")][-args.texts:]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (args.out / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    print(f"wrote {len(prompts)} prompts and {len(texts)} texts to {args.out}")


if __name__ == "__main__":
    main()
