"""Reading logs: every shape, every kind of bad input counted with file and line."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from monitor.backtest.read import (Conversation, FieldMap, Problem, expand, read_records, record_from_json,
                                   record_to_json)
from monitor.errors import DataError

GOOD = {"id": "a", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_every_bad_line_is_a_problem_with_file_and_line(tmp_path):
    path = tmp_path / "logs.jsonl"
    lines = [
        json.dumps(GOOD).encode(),                                                         # 1 ok
        b'{"messages": [',                                                                 # 2 malformed
        json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(),           # 3 unknown role
        json.dumps({"messages": []}).encode(),                                             # 4 empty
        b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',                         # 5 latin-1 byte
        b"",                                                                               # 6 blank: no record
        json.dumps([1, 2]).encode(),                                                       # 7 not an object
        json.dumps({"messages": [{"role": "user", "content": {"x": 1}}]}).encode(),        # 8 no text
        json.dumps({"foo": 1}).encode(),                                                   # 9 unknown shape
        json.dumps({"prompt": "p", "response": "r", "id": 7}).encode(),                    # 10 ok
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    records = list(read_records(expand(path)))
    kinds = {r.line: (r.kind if isinstance(r, Problem) else "ok") for r in records}
    assert kinds == {1: "ok", 2: "malformed", 3: "unknown_role", 4: "empty", 5: "encoding", 7: "malformed",
                     8: "bad_message", 9: "unknown_shape", 10: "ok"}
    assert all(r.key == f"{path}:{r.line}" for r in records)
    assert "wizard" in next(r for r in records if r.line == 3).detail
    pr = next(r for r in records if r.line == 10)
    assert isinstance(pr, Conversation) and pr.id == "7" and [m["role"] for m in pr.messages] == ["user", "assistant"]


def test_project_logs_and_audit_records(tmp_path):
    rows = [
        {"event": "request_completed", "request_id": "r1", "prompt": [{"role": "user", "content": "q"}],
         "response": "a", "outcome": "allowed"},                                       # log_text=True: replays
        {"event": "request_completed", "request_id": "r2", "prompt_sha256": "sha256:00", "response_sha256": None},
        {"event": "rule_hit", "request_id": "r3", "rule": "x"},
        {"time": "t", "request_id": "r4", "rule": "x", "action": "block", "scope": "response", "row": 0,
         "token_index": 3, "feature": "f", "activation": 1.0, "policy_version": "v"},  # audit trail
    ]
    path = tmp_path / "serve.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = list(read_records([path]))
    assert isinstance(recs[0], Conversation) and recs[0].id == "r1"
    assert recs[0].messages[-1] == {"role": "assistant", "content": "a"}
    assert [r.kind for r in recs[1:]] == ["no_text", "no_text", "no_text"]
    assert "log_text" in recs[1].detail and "audit" in recs[3].detail


def test_parquet_field_mapping_and_content_parts(tmp_path):
    table = pa.Table.from_pylist([
        {"uuid": "u1", "conv": {"turns": [{"speaker": "user", "text": "hi"}]}},
        {"uuid": "u2", "conv": {"turns": [{"speaker": "robot", "text": "x"}]}},
    ])
    path = tmp_path / "d" / "part.parquet"
    path.parent.mkdir()
    pq.write_table(table, path)
    fields = FieldMap.parse(["messages=conv.turns", "id=uuid", "role=speaker", "content=text"])
    recs = list(read_records(expand(tmp_path / "d"), fields))
    assert isinstance(recs[0], Conversation) and recs[0].id == "u1" and recs[0].key.endswith("part.parquet:1")
    assert recs[1].kind == "unknown_role" and recs[1].line == 2
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    (tmp_path / "p.jsonl").write_text(json.dumps(parts) + "\n")
    (rec,) = read_records([tmp_path / "p.jsonl"])
    assert rec.messages[0]["content"] == "ab"


def test_unreadable_parquet_is_a_problem_not_a_crash(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all")
    (rec,) = read_records([path])
    assert isinstance(rec, Problem) and rec.kind == "malformed"


def test_inputs_and_skip(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    (tmp_path / "notes.txt").write_text("ignored")
    files = expand(str(tmp_path / "*.jsonl"))
    assert files == [tmp_path / "a.jsonl"]
    recs = list(read_records(files, skip={f"{tmp_path / 'a.jsonl'}:1"}))
    assert [r.line for r in recs] == [2]
    assert record_from_json(record_to_json(recs[0])) == recs[0]
    with pytest.raises(DataError, match="no JSONL or Parquet"):
        expand(str(tmp_path / "missing*.jsonl"))
    with pytest.raises(DataError, match="NAME=PATH"):
        FieldMap.parse(["colour=x"])
