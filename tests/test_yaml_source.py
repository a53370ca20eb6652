"""The one YAML document loader: limits on hostile input and files that are not what they seem.

Each limit is checked through the public loader and the errors must be located
(``file:line:column``), never MemoryError, RecursionError or a hang.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from monitor.errors import MonitorError
from monitor.yaml_source import (MAX_ALIAS_NODES, MAX_DEPTH, DocumentKind, YamlDocumentError,
                                 YamlSyntaxError, load_document, parse_yaml, read_text)

KIND = DocumentKind(what="test document", needs="'a'", keys="'a'", max_bytes=4096)

# The classic "billion laughs": 9 levels of 9 aliases expand to 9**9 (387 million) strings.
ALIAS_BOMB = textwrap.dedent("""\
    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
    b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
    d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
    e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
    f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
    g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
    h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
    i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
    """)


def deep_not(levels: int) -> str:
    """A block-style chain of ``levels`` nested ``not:`` mappings."""
    lines = [" " * (2 * i) + "not:" for i in range(levels)]
    return "\n".join(lines) + "\n" + " " * (2 * levels) + "{latent: 1, above: 1}\n"


def test_alias_bomb_is_refused_at_the_alias_that_crosses_the_limit():
    assert len(ALIAS_BOMB) < 400
    with pytest.raises(YamlSyntaxError) as err:
        parse_yaml(ALIAS_BOMB, "bomb.yaml")
    message = err.value.message
    # Lines 2-4 add 90 + 819 + 7,380 values; the first alias on line 5 adds 7,381 more.
    assert f"more than {MAX_ALIAS_NODES:,} values" in message and "alias bomb" in message
    assert message.startswith("bomb.yaml:5:8: aliases")  # the first alias on that line
    assert isinstance(err.value, MonitorError)


def test_moderate_aliases_and_merge_keys_still_load():
    src = parse_yaml(textwrap.dedent("""\
        base: &base {severity: low, scope: response}
        rule: {<<: *base, id: r}
        again: [*base, *base]
        """), "ok.yaml")
    assert src.data["rule"] == {"severity": "low", "scope": "response", "id": "r"}
    assert src.data["again"] == [src.data["base"]] * 2
    assert src.where(("rule", "id")) == "ok.yaml:2:23"


def test_recursive_alias_is_refused():
    with pytest.raises(YamlSyntaxError, match=r"^loop\.yaml:1:11: alias '\*a' refers to a "
                                              "collection that contains it"):
        parse_yaml("a: &a [1, *a]\n", "loop.yaml")


@pytest.mark.parametrize("text", [deep_not(3000), "[" * 3000 + "]" * 3000],
                         ids=["block-mappings", "flow-lists"])
def test_deep_nesting_is_refused_at_the_limit_not_with_recursion_error(text):
    with pytest.raises(YamlSyntaxError) as err:
        parse_yaml(text, "deep.yaml")
    assert f"nested more than {MAX_DEPTH} levels" in err.value.message
    line = int(err.value.message.split(":")[1])
    assert line == (MAX_DEPTH + 1 if text.startswith("not") else 1)


def test_nesting_up_to_the_limit_is_accepted():
    src = parse_yaml(deep_not(MAX_DEPTH - 1), "ok.yaml")
    assert src.data is not None


def test_an_alias_cannot_smuggle_depth_past_the_limit():
    deep = "[" * (MAX_DEPTH - 2) + "]" * (MAX_DEPTH - 2)
    with pytest.raises(YamlSyntaxError, match=r"^d\.yaml:2:\d+: nested more than"):
        parse_yaml(f"a: &a {deep}\nb: [[[*a]]]\n", "d.yaml")


def test_size_limit_names_the_size_and_the_limit(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * 5000 + "\na: 1\n")
    with pytest.raises(YamlDocumentError) as err:
        load_document(path, KIND)
    assert err.value.message == (f"{path}: test document is 5,008 bytes, over the limit of 4,096 "
                                 "bytes; split it into smaller files")


def test_files_that_are_not_readable_files_are_named(tmp_path):
    missing = tmp_path / "missing.yaml"
    dangling = tmp_path / "dangling.yaml"
    dangling.symlink_to(tmp_path / "nowhere.yaml")
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)
    directory = tmp_path / "dir.yaml"
    directory.mkdir()
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("a: caf\xe9\n".encode("latin-1"))
    expected = {
        missing: "cannot read test document: no such file",
        dangling: f"broken symbolic link to '{tmp_path / 'nowhere.yaml'}'",
        loop: "symbolic link loop",
        directory: "is a directory, not a test document",
        fifo: "not a regular file (a FIFO, socket or device)",
        latin: "not UTF-8 text (invalid continuation byte at byte 6)",
    }
    for path, text in expected.items():
        with pytest.raises(YamlDocumentError) as err:
            read_text(path, KIND)  # the FIFO must not block: it is never opened
        assert err.value.message.startswith(f"{path}: ") and text in err.value.message


@pytest.mark.parametrize(("text", "message"), [
    ("", "x.yaml:1:1: the file is empty; a test document needs 'a'"),
    ("- 1\n", "x.yaml:1:1: a test document must be a mapping with keys 'a', not a list"),
])
def test_empty_and_non_mapping_documents(tmp_path, text, message):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(YamlDocumentError) as err:
        load_document(path, KIND)
    assert err.value.message == f"{Path(tmp_path)}/{message}"
