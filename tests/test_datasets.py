"""The shipped labeled sets (datasets/*.jsonl): built from their hand-written sources, well formed."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT / "datasets"
PAIR_FILES = ("unsafe_code_pairs.jsonl", "backdoor_pairs.jsonl", "sycophancy_pairs.jsonl")


def _builder():
    spec = importlib.util.spec_from_file_location("build_datasets", ROOT / "scripts/detection/build_datasets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(name):
    return [json.loads(line) for line in (DATASETS / name).read_text(encoding="utf-8").splitlines()]


def test_jsonl_files_are_what_the_sources_build():
    b = _builder()
    built = {"unsafe_code_pairs.jsonl": b.build_code("unsafe_code", "unsafe_code", "unsafe_code_pairs.jsonl"),
             "backdoor_pairs.jsonl": b.build_code("backdoor", "backdoor", "backdoor_pairs.jsonl"),
             "sycophancy_pairs.jsonl": b.build_sycophancy(),
             "benign.jsonl": b.build_benign()}
    for name, rows in built.items():
        assert _rows(name) == rows, f"{name} is stale: run python scripts/detection/build_datasets.py"


@pytest.mark.parametrize("name", PAIR_FILES)
def test_pairs_are_complete_and_vary_the_label(name):
    rows = _rows(name)
    assert len({r["id"] for r in rows}) == len(rows)
    by_pair = Counter(r["pair_id"] for r in rows)
    assert set(by_pair.values()) == {2}
    for pid in by_pair:
        side = {r["label"]: r for r in rows if r["pair_id"] == pid}
        assert set(side) == {0, 1}
        assert side[0]["text"] != side[1]["text"]
        assert side[0]["source"] == side[1]["source"] and side[0]["source"].startswith("sae-monitor/datasets:")


@pytest.mark.parametrize("name", ("unsafe_code_pairs.jsonl", "backdoor_pairs.jsonl"))
def test_changed_lines_are_in_the_code(name):
    for r in _rows(name):
        assert r["changed_lines"], r["id"]
        for line in r["changed_lines"]:
            assert line in r["text"], (r["id"], line)


def test_dialogue_rows_end_with_the_judged_reply():
    for r in _rows("sycophancy_pairs.jsonl") + [r for r in _rows("benign.jsonl") if r["kind"] == "chat"]:
        assert r["messages"][-1] == {"role": "assistant", "content": r["response"]}
        assert r["text"].endswith(r["response"])


def test_a_malformed_source_line_names_file_and_line(tmp_path, monkeypatch):
    b = _builder()
    (tmp_path / "unsafe_code_bad.txt").write_text("=== python | CWE-89 | injection | t\n*oops\n")
    monkeypatch.setattr(b, "SRC", tmp_path)
    monkeypatch.setattr(b, "ROOT", tmp_path)
    with pytest.raises(b.SourceError, match=r"unsafe_code_bad.txt:1: code line must start"):
        b.build_code("unsafe_code", "unsafe_code", "x.jsonl")
