"""``last_report`` is typed ``Report``: it is always a report, or a clear error before any call."""

from __future__ import annotations

import threading

import pytest
import torch

from monitor.errors import MonitorError
from monitor.report import Report
from monitor.testing import tiny_monitor


def test_last_report_before_any_call_is_a_clear_error_then_the_calls_report():
    mon = tiny_monitor()
    with pytest.raises(MonitorError, match="before any call"):
        mon.last_report
    mon.generate(torch.tensor([[5, 17, 42]]), max_new_tokens=2, do_sample=False)
    report = mon.last_report
    assert isinstance(report, Report) and report.outcome == "allowed"

    # Per thread: another thread that has made no call has no report yet.
    seen: list[object] = []

    def read() -> None:
        try:
            seen.append(mon.last_report)
        except MonitorError as exc:
            seen.append(exc)

    thread = threading.Thread(target=read)
    thread.start()
    thread.join()
    assert len(seen) == 1 and isinstance(seen[0], MonitorError)
    assert mon.last_report is report
