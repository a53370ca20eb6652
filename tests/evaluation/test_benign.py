"""The benign-traffic generator: seeded, ordinary sources only, dialogues end with the assistant."""

from __future__ import annotations

import json

import pytest

from monitor.errors import DataError
from monitor.evaluation.benign import benign_rows, main
from monitor.evaluation.items import load_eval_items


def corpus(tmp_path):
    rows = []
    for i in range(6):
        messages = [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i} " * 50}]
        rows.append({"text": f"User: question {i}\nAssistant: answer {i}", "source": "teknium1/GPTeacher:x.json",
                     "kind": "chat", "messages": messages})
        rows.append({"text": f"line {i}\n" * 100, "source": "pytorch/examples:input.txt", "kind": "prose"})
    rows.append({"text": "red team", "source": "anthropics/hh-rlhf:harmless-base", "kind": "chat",
                 "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_benign_rows_are_seeded_and_ordinary(tmp_path):
    path = corpus(tmp_path)
    rows = benign_rows(path, n=6, chat_share=0.5, seed=3, max_chars=100)
    assert rows == benign_rows(path, n=6, chat_share=0.5, seed=3, max_chars=100)
    assert rows != benign_rows(path, n=6, chat_share=0.5, seed=4, max_chars=100)
    assert all(r["label"] == 0 and not r["source"].startswith("anthropics/") for r in rows)
    chats = [r for r in rows if "messages" in r]
    assert len(chats) == 3 and all(r["messages"][-1]["role"] == "assistant" for r in chats)
    assert all(len(r["messages"][-1]["content"]) <= 100 for r in chats)
    assert all(len(r["text"]) <= 100 for r in rows if "messages" not in r)
    with pytest.raises(DataError, match="dialogues"):
        benign_rows(path, n=20)


def test_written_file_loads_as_eval_items(tmp_path):
    out = tmp_path / "benign.jsonl"
    assert main(["--corpus", str(corpus(tmp_path)), "--out", str(out), "--n", "4"]) == 0
    items = load_eval_items(out, label=0)
    assert len(items) == 4 and {i.label for i in items} == {0}
    assert sum(1 for i in items if i.prompt and i.prompt.startswith("User: question")) == 2
