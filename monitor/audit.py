"""Durable audit trail of enforcement decisions: one JSON line per block or steer.

:class:`AuditTrail` is a Monitor callback. Callbacks run before the monitored call returns, and
each decision is written with one ``write(2)`` on an ``O_APPEND`` descriptor, then
``fsync``-ed, so a response the caller has seen always has its audit record on disk already,
even if the process is killed the next instant.

Log rotation: before each write the path is ``stat``-ed; if the file disappeared or is a
different file (another inode, as after ``logrotate``'s rename-and-create), the trail reopens
the path (the semantics of :class:`logging.handlers.WatchedFileHandler`). ``copytruncate``
rotation also works, since writes are appends. Thread-safe (one lock per trail).

A failed write raises ``OSError`` out of the callback, so the monitored call fails rather than
returning a response whose decision was not recorded (fail closed).

Record fields: ``time`` (ISO 8601 UTC), ``request_id``, ``rule``, ``action`` (``block`` or
``steer``), ``scope``, ``row``, ``token_index``, ``feature``, ``activation``,
``policy_version``; steer records add ``target``, ``op``, ``value``, ``duration``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import threading
from pathlib import Path
from typing import Any

from monitor.report import Decision, Report, ReportObserver, decisions

__all__ = ["AuditTrail", "Decision", "decisions", "record"]


def record(report: Report, decision: Decision, now: dt.datetime | None = None) -> dict[str, Any]:
    """The audit record (a JSON-ready dict) of one decision."""
    when = (now or dt.datetime.now(dt.timezone.utc)).isoformat(timespec="microseconds")
    out: dict[str, Any] = {
        "time": when, "request_id": report.request_id, "rule": decision.rule,
        "action": decision.action, "scope": decision.scope, "row": decision.row,
        "token_index": decision.token_index, "feature": decision.feature,
        "activation": _finite(decision.activation), "policy_version": report.policy_version}
    d = decision.steer
    if d is not None:
        out.update(target=f"latent:{d.latent}" if d.latent is not None else d.probe, op=d.op,
                   value=d.value, duration=d.duration)
    return out


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


class AuditTrail(ReportObserver):
    """Append every block and steer decision to the JSONL file at ``path`` (created if absent,
    parent directories too). Register with :meth:`attach` (or pass as a Monitor callback);
    :meth:`close` when done."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._ident: tuple[int, int] | None = None

    def __call__(self, report: Report) -> None:
        """Write and fsync one line per decision of ``report`` (nothing when there is none)."""
        for decision in decisions(report):
            self.write(record(report, decision))

    def write(self, entry: dict[str, Any]) -> None:
        """Append ``entry`` as one JSON line, durably (write, then fsync)."""
        line = (json.dumps(entry, ensure_ascii=False, allow_nan=False, default=str) + "\n")
        data = line.encode("utf-8")
        with self._lock:
            fd = self._open()
            written = os.write(fd, data)
            while written < len(data):  # short writes are rare but legal
                written += os.write(fd, data[written:])
            os.fsync(fd)

    def _open(self) -> int:
        """The descriptor for the file now at ``path``, reopening after rotation."""
        try:
            st = os.stat(self.path)
            current: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            current = None
        if self._fd is not None and current == self._ident:
            return self._fd
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                     0o640)
        st = os.fstat(fd)
        self._fd, self._ident = fd, (st.st_dev, st.st_ino)
        if current is None:  # a new file: make its directory entry durable too
            _fsync_dir(self.path.parent)
        return fd

    def close(self) -> None:
        """Close the file (a later decision reopens it)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd, self._ident = None, None

    def __enter__(self) -> AuditTrail:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
