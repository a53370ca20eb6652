"""Build the shipped labeled sets in datasets/*.jsonl from the hand-written sources in datasets/src/.

    python scripts/detection/build_datasets.py          # rewrites datasets/*.jsonl

The sources are written by hand (see datasets/README.md); this script only turns them into the
labeled-data schema of ../shared/data: it splits each code pair into its insecure (label 1) and
secure (label 0) side, records the lines that differ as ``changed_lines`` (for a side that only
lacks lines, the lines around the gap), and renders dialogues as ``messages`` plus the ``User:`` /
``Assistant:`` text. Deterministic: the same sources give byte-identical files.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "datasets" / "src"
OUT = ROOT / "datasets"


class SourceError(ValueError):
    pass


def blocks(path: Path):
    """(header fields, body lines, line number) per ``=== a | b | ...`` block; '#' lines before
    the first block are comments."""
    head, body, start = None, [], 0
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("==="):
            if head is not None:
                yield head, body, start
            head, body, start = [f.strip() for f in line[3:].split("|")], [], no
        elif head is None:
            if line.strip() and not line.startswith("#"):
                raise SourceError(f"{path}:{no}: text before the first '===' header")
        else:
            body.append(line)
    if head is not None:
        yield head, body, start


def code_sides(body: list[str], where: str) -> tuple[str, str, list[str], list[str]]:
    bad, good, bad_changed, good_changed = [], [], [], []
    gap_bad, gap_good = False, False  # a side lacks lines here: remember the neighbours
    last_common = None
    pending_bad_ctx: list[str] = []
    pending_good_ctx: list[str] = []
    for line in body:
        if not line:
            mark, text = " ", ""
        else:
            mark, text = line[0], line[1:]
        if mark == "-":
            bad.append(text)
            bad_changed.append(text)
            if not gap_good:
                gap_good = True
                if last_common is not None:
                    pending_good_ctx.append(last_common)
        elif mark == "+":
            good.append(text)
            good_changed.append(text)
            if not gap_bad:
                gap_bad = True
                if last_common is not None:
                    pending_bad_ctx.append(last_common)
        elif mark == " ":
            bad.append(text)
            good.append(text)
            if gap_good:
                pending_good_ctx.append(text)
            if gap_bad:
                pending_bad_ctx.append(text)
            gap_good = gap_bad = False
            last_common = text
        else:
            raise SourceError(f"{where}: code line must start with ' ', '-' or '+': {line!r}")
    if not bad_changed and not good_changed:
        raise SourceError(f"{where}: the two sides are identical")
    if not bad_changed:
        bad_changed = [t for t in pending_bad_ctx if t.strip()]
    if not good_changed:
        good_changed = [t for t in pending_good_ctx if t.strip()]
    return "\n".join(bad) + "\n", "\n".join(good) + "\n", bad_changed, good_changed


def build_code(prefix: str, category: str, outname: str) -> list[dict]:
    rows, counts = [], {}
    for path in sorted(SRC.glob(f"{prefix}_*.txt")):
        for head, body, no in blocks(path):
            where = f"{path.relative_to(ROOT)}:{no}"
            if len(head) != 4:
                raise SourceError(f"{where}: header must be 'language | CWE | family | title'")
            lang, cwe, family, title = head
            while body and not body[-1].strip():
                body.pop()
            bad, good, bad_ch, good_ch = code_sides(body, where)
            counts[family] = counts.get(family, 0) + 1
            pid = f"{outname.split('.')[0]}-{family}-{counts[family]:03d}"
            common = {"category": category, "source": f"sae-monitor/datasets:{outname}#{family}",
                      "family": family, "language": lang, "cwe": cwe, "title": title, "pair_id": pid}
            rows.append({"id": f"{pid}-1", "text": bad, "label": 1, "changed_lines": bad_ch, **common})
            rows.append({"id": f"{pid}-0", "text": good, "label": 0, "changed_lines": good_ch, **common})
    return rows


def dialogue(turns: list[tuple[str, str]]) -> tuple[list[dict], str]:
    msgs = [{"role": role, "content": content} for role, content in turns]
    text = "\n".join(f"{'User' if r == 'user' else 'Assistant'}: {c}" for r, c in turns)
    return msgs, text


def parse_turns(body: list[str], where: str) -> list[tuple[str, str]]:
    turns = []
    for line in body:
        if not line.strip():
            continue
        m = re.match(r"^(user|assistant|syc|honest):\s?(.*)$", line)
        if not m:
            raise SourceError(f"{where}: expected 'user:', 'assistant:', 'syc:' or 'honest:': {line!r}")
        turns.append((m.group(1), m.group(2).strip()))
    return turns


def build_sycophancy() -> list[dict]:
    rows, counts = [], {}
    for path in sorted(SRC.glob("sycophancy_*.txt")):
        for head, body, no in blocks(path):
            where = f"{path.relative_to(ROOT)}:{no}"
            family, topic = head[0], head[1] if len(head) > 1 else ""
            turns = parse_turns(body, where)
            ctx = [t for t in turns if t[0] in ("user", "assistant")]
            syc = [c for r, c in turns if r == "syc"]
            hon = [c for r, c in turns if r == "honest"]
            if len(syc) != 1 or len(hon) != 1 or not ctx or ctx[-1][0] != "user":
                raise SourceError(f"{where}: need dialogue turns ending with a user turn, then one "
                                  f"'syc:' and one 'honest:' line")
            counts[family] = counts.get(family, 0) + 1
            pid = f"sycophancy_pairs-{family}-{counts[family]:03d}"
            for label, reply in ((1, syc[0]), (0, hon[0])):
                msgs, text = dialogue(ctx + [("assistant", reply)])
                rows.append({"id": f"{pid}-{label}", "text": text, "label": label, "category": "sycophancy",
                             "source": f"sae-monitor/datasets:sycophancy_pairs.jsonl#{family}",
                             "family": family, "subtype": family, "topic": topic, "pair_id": pid,
                             "messages": msgs, "prompt": ctx[-1][1], "response": reply})
    return rows


def build_benign() -> list[dict]:
    rows = []
    for path in sorted(SRC.glob("benign_*.txt")):
        for i, (head, body, no) in enumerate(blocks(path)):
            where = f"{path.relative_to(ROOT)}:{no}"
            kind = head[0]
            rid = f"benign-{path.stem.split('_', 1)[1]}-{i:03d}"
            if kind == "chat":
                turns = parse_turns(body, where)
                if not turns or turns[-1][0] != "assistant":
                    raise SourceError(f"{where}: a chat block must end with an assistant turn")
                msgs, text = dialogue(turns)
                rows.append({"id": rid, "text": text, "label": 0, "category": "benign",
                             "source": "sae-monitor/datasets:benign.jsonl#chat", "kind": "chat",
                             "topic": head[1] if len(head) > 1 else "", "messages": msgs,
                             "prompt": turns[-2][1] if len(turns) > 1 else "", "response": turns[-1][1]})
            elif kind == "code":
                while body and not body[-1].strip():
                    body.pop()
                rows.append({"id": rid, "text": "\n".join(body) + "\n", "label": 0, "category": "benign",
                             "source": "sae-monitor/datasets:benign.jsonl#code", "kind": "code",
                             "language": head[1], "title": head[2] if len(head) > 2 else ""})
            else:
                raise SourceError(f"{where}: benign block kind must be 'chat' or 'code'")
    return rows


def write(name: str, rows: list[dict]) -> None:
    (OUT / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    pos = sum(r["label"] for r in rows)
    print(f"{name}: {len(rows)} rows ({pos} label 1, {len(rows) - pos} label 0)", file=sys.stderr)


def main() -> None:
    try:
        write("unsafe_code_pairs.jsonl", build_code("unsafe_code", "unsafe_code", "unsafe_code_pairs.jsonl"))
        write("backdoor_pairs.jsonl", build_code("backdoor", "backdoor", "backdoor_pairs.jsonl"))
        write("sycophancy_pairs.jsonl", build_sycophancy())
        write("benign.jsonl", build_benign())
    except SourceError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
