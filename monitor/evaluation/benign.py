"""A benign-traffic set: general text and ordinary chat, for TPR at 1% benign FPR.

An alert rate is set by what ordinary traffic does, not by the hard negatives of a labeled set
(the fixed side of a vulnerable/fixed pair). :func:`benign_rows` samples such traffic from a
corpus in the dev-data format (``text``, ``source``, ``kind``, optional ``messages``) by a fixed
seed: half ordinary dialogues that end with the assistant's turn, half general text (prose and
code), each cut to ``max_chars``. Sources whose documents are not ordinary traffic (red-team
dialogues, persona statements: ``EXCLUDED_SOURCES``) are left out.

Make the file once and pass it to ``evaluate(benign_items=...)`` (``sae-monitor eval --benign``):

    python -m monitor.evaluation.benign --corpus ../shared/data/corpus/corpus.jsonl.gz \\
        --out runs/benign.jsonl --n 400 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monitor.data import read_jsonl
from monitor.errors import DataError

EXCLUDED_SOURCES = ("anthropics/",)


def _is_dialogue(row: dict[str, Any]) -> bool:
    messages = row.get("messages")
    return (isinstance(messages, list) and len(messages) >= 2 and messages[-1].get("role") == "assistant"
            and all(isinstance(m.get("content"), str) for m in messages))


def _cut(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    return head[:head.rfind("\n")] if "\n" in head[max_chars // 2:] else head


def benign_rows(corpus: str | Path, *, n: int = 400, chat_share: float = 0.5, seed: int = 0,
                max_chars: int = 2000) -> list[dict[str, Any]]:
    """``n`` rows (label 0, category ``benign``) sampled from ``corpus`` by ``seed``:
    ``round(n * chat_share)`` dialogues, the rest general text. Same arguments, same rows."""
    chats: list[tuple[int, dict[str, Any]]] = []
    texts: list[tuple[int, dict[str, Any]]] = []
    for lineno, row in enumerate(read_jsonl(corpus), 1):
        source = str(row.get("source", ""))
        if source.startswith(EXCLUDED_SOURCES) or not isinstance(row.get("text"), str):
            continue
        (chats if _is_dialogue(row) else texts).append((lineno, row))
    n_chat = round(n * chat_share)
    if len(chats) < n_chat or len(texts) < n - n_chat:
        raise DataError(f"{corpus}: has {len(chats)} dialogues and {len(texts)} texts outside "
                        f"{', '.join(EXCLUDED_SOURCES)}; {n_chat} and {n - n_chat} were asked for")
    rng = random.Random(seed)
    out = []
    for lineno, row in rng.sample(chats, n_chat):
        messages = [dict(m) for m in row["messages"]]
        messages[-1]["content"] = _cut(messages[-1]["content"], max_chars)
        out.append({"id": f"benign-chat-{lineno}", "label": 0, "category": "benign", "source": row.get("source", ""),
                    "kind": row.get("kind", "chat"), "messages": messages,
                    "prompt": "".join(f"{m['role'].title()}: {m['content']}\n" for m in messages[:-1])
                    + "Assistant: ", "response": messages[-1]["content"]})
    for lineno, row in rng.sample(texts, n - n_chat):
        out.append({"id": f"benign-text-{lineno}", "label": 0, "category": "benign", "source": row.get("source", ""),
                    "kind": row.get("kind", "text"), "text": _cut(row["text"], max_chars)})
    return out


def write_jsonl(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--chat-share", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-chars", type=int, default=2000)
    args = parser.parse_args(argv)
    write_jsonl(args.out, benign_rows(args.corpus, n=args.n, chat_share=args.chat_share, seed=args.seed,
                                      max_chars=args.max_chars))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
