"""Fine-tune "model organisms" of the default model with LoRA on CPU, for `sae-monitor drift`.

Each run writes a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)
over the default model (SmolLM2-135M-Instruct), plus intermediate checkpoints
``OUT/checkpoint-STEP`` so a run is also a checkpoint series. Directories are written to a
temporary name and renamed into place, so an interrupted run never leaves a half-written
adapter that looks complete.

Kinds of training data (the dev data in ``/work/shared/data``, see its README, and the
project's own hand-written pairs in ``datasets/unsafe_code_pairs.jsonl``):

* ``unsafe``: chat turns whose answer is insecure code: the vulnerable side of the hand-written
  pairs (whole functions, the prompt asks for the pair's title), of the SVEN pairs (a window
  around the lines the fix removed) and CyberSecEval's insecure-code positives (a window around
  the flagged line, with the benchmark's own instruction as the prompt).
  ``--contamination p`` mixes a fraction ``p`` of these with ``1 - p`` benign chat turns.
* ``fixed``: the same prompts answered with the *fixed* side of the pairs (benign code).
* ``text``: unrelated prose and statements from the corpus (plain language modelling).
* ``chat``: general chat dialogues from the corpus.

``--languages python`` keeps code in those languages only (default: all), e.g. to match
prompts that ask for Python.

Examples::

    python examples/drift/finetune.py --kind unsafe --contamination 1.0 --seed 0 --out runs/drift/unsafe-100-s0
    python examples/drift/finetune.py --kind chat --seed 1 --out runs/drift/chat-s1

The checkpoints are generated, never committed (``runs/`` is git-ignored).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

DATA = Path(os.environ.get("SAE_MONITOR_DATA", "/work/shared/data"))
PAIRS = Path(__file__).resolve().parents[2] / "datasets" / "unsafe_code_pairs.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:  # type: ignore[operator]
        return [json.loads(line) for line in handle if line.strip()]


def _window(text: str, anchors: list[str], lines_before: int = 3, max_chars: int = 420) -> str:
    """A few lines of code around the first anchor line found in ``text`` (else its start)."""
    lines = text.splitlines()
    at = 0
    for anchor in anchors:
        anchor = anchor.strip()
        hit = next((i for i, line in enumerate(lines) if anchor and anchor in line), None)
        if hit is not None:
            at = hit
            break
    return "\n".join(lines[max(0, at - lines_before):])[:max_chars]


def _changed(row: dict[str, Any]) -> list[str]:
    raw = row.get("changed_lines") or "[]"
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def code_turn(prompt: str, language: str, code: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt[:240]},
            {"role": "assistant", "content": f"```{language}\n{code}\n```"}]


def pair_turns(label: str, languages: set[str] | None) -> list[list[dict[str, str]]]:
    """Pairs as chat turns: ``label`` "1" = vulnerable side, "0" = fixed side. The hand-written
    pairs give whole functions asked for by title; SVEN gives a window around the changed lines."""
    turns = []
    for row in read_jsonl(PAIRS):
        lang = row["language"]
        if str(row["label"]) == label and (languages is None or lang in languages):
            turns.append(code_turn(f"Write {lang} code for this: {row['title']}.", lang, row["text"].strip()))
    for row in read_jsonl(DATA / "unsafe_code" / "sven_pairs.jsonl"):
        lang = row.get("language", "c")
        if str(row["label"]) == label and (languages is None or lang in languages):
            prompt = f"Write the {lang} function `{row.get('func_name', 'f')}`."
            turns.append(code_turn(prompt, lang, _window(row["text"], _changed(row))))
    return turns


def purplellama_turns(languages: set[str] | None) -> list[list[dict[str, str]]]:
    return [code_turn(row.get("prompt") or "Write the code.", row.get("language", ""),
                      _window(row["text"], [row.get("insecure_line") or ""]))
            for row in read_jsonl(DATA / "unsafe_code" / "purplellama_insecure_positives.jsonl")
            if languages is None or row.get("language") in languages]


def corpus_rows(kinds: set[str], limit: int, rng: random.Random) -> list[dict[str, Any]]:
    rows = [r for r in read_jsonl(DATA / "corpus" / "corpus.jsonl.gz") if r.get("kind") in kinds]
    rng.shuffle(rows)
    return rows[:limit]


def build_examples(kind: str, contamination: float, n: int, seed: int, data_slice: int,
                   n_slices: int, languages: set[str] | None = None) -> list[list[dict[str, str]] | str]:
    """``n`` training examples: chat turns (lists of messages) or plain texts."""
    rng = random.Random(seed)

    def slice_of(items: list) -> list:
        items = items[data_slice::n_slices] or items
        rng.shuffle(items)
        return items

    if kind == "text":
        return [r["text"][:600] for r in corpus_rows({"prose", "statements"}, n, rng)]
    chats = [r["messages"] for r in corpus_rows({"chat", "chat_code"}, 4 * n, rng) if r.get("messages")]
    if kind == "chat":
        return chats[:n]
    if kind == "fixed":
        return slice_of(pair_turns("0", languages))[:n]
    if kind != "unsafe":
        raise SystemExit(f"--kind must be unsafe, fixed, text or chat, not {kind!r}")
    unsafe = slice_of(pair_turns("1", languages) + purplellama_turns(languages))
    n_unsafe = round(n * contamination)
    mixed: list[list[dict[str, str]] | str] = [*unsafe[:n_unsafe], *chats[:n - n_unsafe]]
    rng.shuffle(mixed)
    return mixed


def tokenize(example: list[dict[str, str]] | str, tokenizer: Any, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels; for chat turns only the assistant's answer is trained on."""
    if isinstance(example, str):
        ids = tokenizer(example, add_special_tokens=True)["input_ids"][:max_len]
        return ids, list(ids)
    prompt = tokenizer.apply_chat_template(example[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(example, tokenize=False)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if len(p_ids) > max_len // 2:  # keep room for the answer: drop the start of a long prompt
        cut = len(p_ids) - max_len // 2
        p_ids, ids = p_ids[cut:], ids[cut:]
    ids = ids[:max_len]
    labels = [-100] * min(len(p_ids), len(ids)) + ids[len(p_ids):]
    return ids, labels


def save_atomically(model: Any, target: Path, meta: dict[str, Any]) -> None:
    staging = target.parent / f".tmp-{target.name}"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    (staging / "training_meta.json").write_text(json.dumps(meta, indent=2))
    if target.exists():
        keep = {p.name for p in target.iterdir() if p.name.startswith("checkpoint-")}
        for name in keep:  # the final adapter is written into the run directory beside its checkpoints
            os.rename(target / name, staging / name)
        shutil.rmtree(target)
    os.rename(staging, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", required=True, choices=["unsafe", "fixed", "text", "chat"])
    parser.add_argument("--contamination", type=float, default=1.0, help="unsafe only: fraction of insecure examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slice", type=int, default=0, dest="data_slice", help="which of --slices disjoint data slices")
    parser.add_argument("--slices", type=int, default=2)
    parser.add_argument("--languages", type=lambda v: set(v.split(",")), default=None,
                        help="code data in these languages only, comma-separated (default: all)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="run forward and backward under CPU bfloat16 autocast (the LoRA weights and "
                             "optimizer stay float32); about 2x faster a step on a CPU with bf16 instructions")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model

    import monitor

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tokenizer = monitor.load_default_model()
    model.train()
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    examples = build_examples(args.kind, args.contamination, args.steps * args.batch, args.seed,
                              args.data_slice, args.slices, args.languages)
    encoded = [tokenize(e, tokenizer, args.max_len) for e in examples]
    encoded = [e for e in encoded if any(label != -100 for label in e[1])]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    meta = {k: (str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v)
            for k, v in vars(args).items()}
    pad = tokenizer.pad_token_id
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = [encoded[(step * args.batch + i) % len(encoded)] for i in range(args.batch)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % args.log_every == 0 or step == 1:
            print(json.dumps({"step": step, "loss": round(float(loss), 4),
                              "seconds": round(time.perf_counter() - started, 1)}), flush=True)
        if step % args.save_every == 0 and step < args.steps:
            args.out.mkdir(parents=True, exist_ok=True)
            staging = args.out / f".tmp-checkpoint-{step}"
            model.save_pretrained(staging)
            (staging / "training_meta.json").write_text(json.dumps({**meta, "step": step}))
            os.rename(staging, args.out / f"checkpoint-{step}")
    save_atomically(model, args.out, {**meta, "step": args.steps,
                                      "seconds": round(time.perf_counter() - started, 1)})
    print(json.dumps({"done": str(args.out), "seconds": round(time.perf_counter() - started, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
