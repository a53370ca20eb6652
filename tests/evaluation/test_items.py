"""Evaluation items: how rows are cut for the scan, loading, grouping fields."""

from __future__ import annotations

import json

import pytest

from monitor.errors import DataError
from monitor.evaluation.items import EvalItem, check_group_key, eval_item, group_of, load_eval_items


def test_scope_mapping_of_rows():
    code = "import os\nx = 1\nos.system(cmd)\ny = 2\nz = 3\n"
    item = eval_item({"text": code, "changed_lines": ["os.system(cmd)"], "label": 1, "language": "python"})
    assert (item.prompt, item.transcript, item.code_lines, item.widened) == ("import os\nx = 1\n", "os.system(cmd)",
                                                                            (3,), False)
    spread = eval_item({"text": code, "changed_lines": ["x = 1", "z = 3"], "label": 0})
    assert spread.transcript == "x = 1\nos.system(cmd)\ny = 2\nz = 3" and spread.widened
    assert spread.code_lines == (2, 5)
    dialogue = eval_item({"prompt": "User: q\nAssistant: ", "response": "an answer", "label": 0})
    assert (dialogue.prompt, dialogue.transcript) == ("User: q\nAssistant: ", "an answer")
    whole = eval_item({"text": "no scope here", "label": 1}, context_chars=3, scope_chars=4)
    assert (whole.prompt, whole.transcript, whole.truncated) == (None, "no s", True)
    cut = eval_item({"text": code, "changed_lines": ["z = 3"], "label": 1}, context_chars=6)
    assert cut.prompt == "y = 2\n" and cut.truncated
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    chat = eval_item({"messages": messages, "text": "User: q\nAssistant: a", "response": "a", "label": 1},
                     _Templated())
    assert chat.transcript == tuple(messages) and chat.prompt is None


class _Templated:
    """Just enough of a tokenizer for eval_item to choose the chat path."""

    chat_template = "{{ messages }}"


def test_load_eval_items_limit(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{i}", "label": i % 2, "category": "c"}) for i in range(5)))
    items = load_eval_items(path, limit=3)
    assert len(items) == 3 and all(isinstance(i, EvalItem) for i in items)




def test_group_of_reads_source_and_row_fields():
    row = {"text": "x = 1", "label": 1, "category": "unsafe_code", "source": "eth-sri/sven:train/cwe-089.jsonl",
           "pair_id": 7, "language": "python", "cwe": "CWE-89"}
    item = eval_item(row)
    assert (item.source, item.pair_id) == ("eth-sri/sven", "7")
    assert [group_of(item, k) for k in ("source", "category", "language", "cwe", "label", "subtype")] == \
        ["eth-sri/sven", "unsafe_code", "python", "CWE-89", "1", ""]
    assert check_group_key("cwe") == "cwe"
    with pytest.raises(DataError, match="cannot group by 'sorce'; choose one of source, category"):
        check_group_key("sorce")
