"""Backtest results on disk: committed chunks, a manifest of done records, merged outputs.

Third stage of a backtest (read -> scan -> **results** -> summary/diff -> report). One row per
input record (a scanned conversation or a skipped one, with its problem), keyed ``file:line``.

Crash safety (why a killed run resumes without scanning a record twice or losing one): rows are
written in chunks; a chunk's files are written under temporary names, fsync-ed and renamed, and
only then is the chunk's line (its number and every key in it) appended to ``manifest.jsonl``
and fsync-ed. A record is done exactly when its key is in a complete manifest line. On resume,
chunk files that no manifest line names (a crash between rename and manifest) are deleted and
their records scanned again; a torn last manifest line is ignored the same way.

Layout of ``out/``: ``run.json`` (policy versions; a resume with other versions is refused),
``manifest.jsonl``, ``chunks/part-NNNNN.parquet``, then after :meth:`ResultStore.finalize`:
``conversations.parquet`` and ``conversations.jsonl`` (one row per record, sorted by file and
line) and ``firings.parquet`` (one row per conversation, version and rule that fired).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from monitor.backtest.read import Problem
from monitor.backtest.scan import ScanResult
from monitor.errors import DataError, MonitorError

FIRING_FIELDS = ("rule", "turn", "scope", "token", "position", "tokens_fired", "feature", "activation",
                 "mode", "action")


def to_row(item: ScanResult | Problem, labels: Sequence[str], messages: Any = None) -> dict[str, Any]:
    """The flat row of one record (``messages``: the text, only when the operator opted in)."""
    row: dict[str, Any] = {"key": item.key, "source": item.source, "line": item.line}
    if isinstance(item, Problem):
        row.update(id=None, status="skipped", problem=item.kind, detail=item.detail, tokens=None, turns=None,
                   replay=None, text_sha256=None, messages=None)
        for label in labels:
            row[f"{label}_decision"] = None
            row[f"{label}_firings"] = []
        return row
    row.update(id=item.id, status="scanned", problem=None, detail=None, tokens=item.tokens, turns=item.turns,
               replay=item.replay, text_sha256=item.text_sha256,
               messages=json.dumps(list(messages), ensure_ascii=False) if messages is not None else None)
    for label, version in zip(labels, item.versions):
        row[f"{label}_decision"] = version.decision
        row[f"{label}_firings"] = [asdict(f) for f in version.firings]
    return row


def schema(labels: Sequence[str]) -> Any:
    """The Parquet schema of conversation rows for these version labels."""
    import pyarrow as pa

    firing = pa.struct([("rule", pa.string()), ("turn", pa.int32()), ("scope", pa.string()),
                        ("token", pa.int32()), ("position", pa.int32()), ("tokens_fired", pa.int32()),
                        ("feature", pa.string()), ("activation", pa.float64()), ("mode", pa.string()),
                        ("action", pa.string())])
    fields = [("key", pa.string()), ("source", pa.string()), ("line", pa.int64()), ("id", pa.string()),
              ("status", pa.string()), ("problem", pa.string()), ("detail", pa.string()),
              ("tokens", pa.int32()), ("turns", pa.int32()), ("replay", pa.string()), ("text_sha256", pa.string()),
              ("messages", pa.string())]
    for label in labels:
        fields += [(f"{label}_decision", pa.string()), (f"{label}_firings", pa.list_(firing))]
    return pa.schema(fields)


def _fsync_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class ResultStore:
    """The results directory of one backtest run (see the module doc).

    ``versions``: ``[{"label", "version_id", "source"}]`` per policy version, in scan order.
    ``resume``: continue a run found in ``out`` (refused when its versions or its forward
    precision ``dtype`` differ); without it a directory holding a run is an error, so results
    are never mixed by accident.
    """

    def __init__(self, out: str | Path, versions: Sequence[dict[str, str]], *, resume: bool = True,
                 dtype: str = "float32") -> None:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise MonitorError("backtest results are written as Parquet with pyarrow, which is not installed: "
                               "pip install 'sae-monitor[backtest]'") from None
        self.out = Path(out)
        self.versions = [dict(v) for v in versions]
        self.labels = [v["label"] for v in self.versions]
        self.chunks = self.out / "chunks"
        self.manifest = self.out / "manifest.jsonl"
        run = self.out / "run.json"
        if run.is_file():
            previous = json.loads(run.read_text())
            if not resume:
                raise DataError(f"{self.out} already holds a backtest run; pass --resume to continue it "
                                "or choose another --out")
            if previous.get("versions") != self.versions:
                raise DataError(f"{self.out} holds a run of other policy versions "
                                f"({', '.join(v['version_id'] for v in previous.get('versions', []))}); "
                                "resume only with the same --policies/--against, or choose another --out")
            if previous.get("dtype", "float32") != dtype:
                raise DataError(f"{self.out} holds a run at --dtype {previous.get('dtype', 'float32')}; resume it "
                                f"at that precision (not {dtype}), or choose another --out")
        self.dtype = dtype
        self.chunks.mkdir(parents=True, exist_ok=True)
        if not run.is_file():
            _fsync_write(run, json.dumps({"versions": self.versions, "dtype": dtype}, indent=2).encode())
        self._drop_torn_tail()
        self._done, committed = self._read_manifest()
        for stray in self.chunks.iterdir():  # uncommitted leftovers of a killed run
            if stray.name not in committed:
                stray.unlink()
        self._next = 1 + max((int(n.split("-")[1].split(".")[0]) for n in committed), default=-1)

    def _drop_torn_tail(self) -> None:
        """Cut a last manifest line that a kill left without its newline (its chunk never
        committed), so the next line is appended whole."""
        if not self.manifest.is_file():
            return
        data = self.manifest.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.manifest, "r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)
                os.fsync(handle.fileno())

    def _read_manifest(self) -> tuple[set[str], set[str]]:
        done: set[str] = set()
        names: set[str] = set()
        if not self.manifest.is_file():
            return done, names
        for line in self.manifest.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line: that chunk never committed
            names.add(entry["chunk"])
            done.update(entry["keys"])
        return done, names

    @property
    def done(self) -> frozenset[str]:
        """Keys of every committed record."""
        return frozenset(self._done)

    def commit(self, rows: Sequence[dict[str, Any]]) -> None:
        """Write ``rows`` as one chunk and record it in the manifest (durably, in that order)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [r for r in rows if r["key"] not in self._done]
        if not rows:
            return
        name = f"part-{self._next:05d}.parquet"
        table = pa.Table.from_pylist(list(rows), schema=schema(self.labels))
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        _fsync_write(self.chunks / name, sink.getvalue().to_pybytes())
        keys = [r["key"] for r in rows]
        entry = (json.dumps({"chunk": name, "keys": keys}) + "\n").encode()
        fd = os.open(self.manifest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, entry)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._done.update(keys)
        self._next += 1

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every committed row, chunk by chunk."""
        import pyarrow.parquet as pq

        _, names = self._read_manifest()
        for name in sorted(names):
            yield from pq.read_table(self.chunks / name).to_pylist()

    def finalize(self) -> list[dict[str, Any]]:
        """Merge the chunks into the sorted outputs (see the module doc); returns the rows.
        A key committed twice would be a bug in the runner: it raises rather than hide it."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = sorted(self.rows(), key=lambda r: (r["source"], r["line"]))
        keys = [r["key"] for r in rows]
        if len(set(keys)) != len(keys):
            raise DataError(f"{self.out}: a record was committed twice; the results are not trustworthy")
        pq.write_table(pa.Table.from_pylist(rows, schema=schema(self.labels)), self.out / "conversations.parquet")
        with open(self.out / "conversations.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        firings = list(firing_rows(rows, self.labels))
        pq.write_table(pa.Table.from_pylist(firings, schema=firing_schema()), self.out / "firings.parquet")
        return rows


def firing_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("key", pa.string()), ("id", pa.string()), ("version", pa.string()), ("rule", pa.string()),
                      ("turn", pa.int32()), ("scope", pa.string()), ("token", pa.int32()),
                      ("position", pa.int32()), ("tokens_fired", pa.int32()), ("feature", pa.string()),
                      ("activation", pa.float64()), ("mode", pa.string()), ("action", pa.string())])


def firing_rows(rows: Iterable[dict[str, Any]], labels: Sequence[str]) -> Iterator[dict[str, Any]]:
    """One row per (conversation, version, rule that fired): the long table teams query."""
    for row in rows:
        for label in labels:
            for f in row.get(f"{label}_firings") or []:
                yield {"key": row["key"], "id": row["id"], "version": label, **{k: f[k] for k in FIRING_FIELDS}}
